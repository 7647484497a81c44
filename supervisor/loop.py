"""The supervisor loop: lease tasks, run each attempt through the fork server, record.

Owns `Supervisor.run()` and its steps, each a short method that takes the pass's one
clock reading; `step()` is one pass, so tests drive the loop pass by pass with a fake
clock and a fake fork server. It is the only writer of task state after a claim, and it
keeps execution fenced: the fork server is told how far the leases reach (minus a margin)
and kills every task past that, and nothing is spawned past it, so a supervisor that is
stopped or stuck cannot run a task that another may have rescued (`supervisor.lease`).
A step that raises is logged and counted and the loop goes on. Reaping works with the
database down: outcomes wait in memory until SQLite answers. It never imports user code
and never sleeps: it waits on a selector until the next deadline. Running children
belong to `supervisor.children`, a fork server's death and replacement to
`supervisor.respawn`, SIGHUP's reload to `supervisor.reloading`, and what other threads
read to `supervisor.snapshot`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable

from supervisor import (__version__, checkpointing, handlercode, policy, proctree, reloading,
                        spawning)
from supervisor.children import Child, Children
from supervisor.client import Queue
from supervisor.config import Config
from supervisor.errors import InputError, StoreError
from supervisor.forkserver import ForkServer, ForkServers
from supervisor.lease import Leases, new_owner
from supervisor.respawn import Respawn
from supervisor.retention import Retention
from supervisor.schedule import Scheduler
from supervisor.service import Notifier
from supervisor.signals import Signals
from supervisor.snapshot import Snapshot
from supervisor.store import AttemptEnd, Outcome, Store, Task
from supervisor.wake import WakeSender, WakeSocket
from supervisor.watchdog import SAMPLE_S, machine_memory_mb

log = logging.getLogger("taskvisor.supervisor")
CANCEL_CHECK_S = 0.25     # how often running tasks' cancel flags may be read
PROGRESS_FLUSH_S = 0.5    # progress is written at most this often
CANCEL_GRACE_S = 0.5      # TERM -> KILL for a cancel (cancel takes effect within 1 s)
ORPHAN_SWEEP_S = 0.1      # at most this often, a sweep for what ended tasks left behind
SNAPSHOT_RUNNING_S = 0.5  # the per-task part of the published snapshot, at most this often
STEP_ERROR_PAUSE_S = 0.1  # after a step raised: no faster than this, so errors cannot spin
DBFILE_CHECK_S = 1.0      # how often the database path is checked against the open file
WAKE_OTHERS_S = 0.05      # at most this often, a full supervisor wakes the others of its file


class SystemClock:
    @staticmethod
    def now() -> float:
        return time.time()

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()


@dataclasses.dataclass
class Timers:
    """Monotonic times at which the periodic steps are next due."""
    poll: float = 0.0
    expire: float = 0.0
    extend: float = 0.0
    cancels: float = 0.0
    progress: float = 0.0
    orphans: float = 0.0
    sample: float = 0.0
    store_retry: float = 0.0
    running_snapshot: float = 0.0
    step_error: float = 0.0
    next_due: float = float("inf")  # when the next delayed task becomes due
    dbfile: float = 0.0             # the database file's identity check
    wake_others: float = 0.0        # the next wake-up of the other supervisors may go


class Supervisor:
    """One supervisor process. Construct in the main thread after the fork server started."""

    def __init__(self, config: Config, fork_server: ForkServer, *, clock=SystemClock,
                 events: Callable[[str, dict], None] | None = None, owner: str | None = None):
        self.config = config
        self.clock = clock
        self.events = events
        self.host = socket.gethostname()
        self.owner = owner or new_owner(self.host)
        self.servers = ForkServers(fork_server, owner=self.owner)
        self.store: Store | None = None
        self.selector = selectors.DefaultSelector()
        self.children = Children(self.selector, config, clock, self.emit,
                                 max_log_bytes=config.supervisor.max_log_bytes)
        self.timers = Timers()
        self.leases = Leases(self)
        self.respawn = Respawn(self)
        self.scheduler = Scheduler()
        self.retention = Retention()
        self.started_at = proctree.start_time(os.getpid())  # with the pid, names this process
        self.signals = Signals()
        self.notifier = Notifier()
        self.wake = WakeSocket()
        self.others: WakeSender | None = None  # to wake the other supervisors of the file
        self.stopping = False
        self.stop_deadline: float | None = None
        self.claim_needed = True
        self.last_loop_at = 0.0
        self.store_ok = False
        self.kept_logged = False  # that outcomes wait in memory since a write failed
        self.data_version = -1  # of the store, when cancel requests were last read
        self.memory_budget_mb = policy.memory_budget_mb(config.supervisor.memory_budget_mb,
                                                        machine_memory_mb())
        self._status = ""
        self.snapshot = Snapshot.of(self, running={})
        self.cgroup_dir: str | None = None  # set by supervisor.start when delegated
        self.dbfile = None  # supervisor.dbfile.DatabaseFile, set by supervisor.start when ready
        self.handler_code = handlercode.HandlerCode()  # what the fork server loaded
        self.database_problem: str | None = None  # the file was deleted or replaced
        # Called once the database is migrated and rescued, before READY=1 (the HTTP
        # server binds here), and at shutdown after the last task was recorded.
        self.on_ready: list[Callable[["Supervisor"], None]] = []
        self.on_shutdown: list[Callable[["Supervisor"], None]] = []
        # After each pass's commit (the event stream reads the log there), and children
        # of ours that are not tasks (the event fan-out process), spared by kill_orphans.
        self.on_commit: list[Callable[[], None]] = []
        self.helper_pids: set[int] = set()
        self.relays = None  # supervisor.relay.Relays, set by supervisor.start ([llm] relay)

    # -- life cycle ----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit code (0 after a drain)."""
        self.start()
        while self.step():
            self.wait(self.next_deadline(self.clock.monotonic()) - self.clock.monotonic())
        self.shutdown()
        return 0

    def start(self) -> None:
        self.signals.install()
        self.selector.register(self.signals, selectors.EVENT_READ, ("signals", self.signals))
        self.selector.register(self.wake, selectors.EVENT_READ, ("wake", None))
        self.selector.register(self.server, selectors.EVENT_READ, ("server", self.server))
        self.open_store()
        self.leases.rescue(self.clock.now())
        reloading.warn_unhandled_schedules(self.config, self.server.types)
        # Ready means served: the HTTP server binds in on_ready, and its first /healthz
        # must see an open store and a live loop, not the snapshot made before them.
        self.last_loop_at = self.clock.now()
        self.snapshot = Snapshot.of(self, running={})
        for hook in self.on_ready:
            hook(self)
        self.emit("started", owner=self.owner)
        self.notifier.ready(self.status_line())
        log.info("supervisor %s ready: pool_size=%d database=%s", self.owner,
                 self.config.supervisor.pool_size, self.config.supervisor.database)

    def step(self) -> bool:
        """One pass of the loop; False once a stop has drained every task."""
        now, mono = self.clock.now(), self.clock.monotonic()
        self.last_loop_at = now
        for relay in self.relays.all if self.relays else ():
            # first: before reap's wait4(-1) can take its exit status
            self.guard(relay.tend, mono)
        self.guard(self.handle_signals, mono)
        self.guard(self.respawn.tend_fork_servers, mono)
        self.guard(self.children.reap, self.helpers(), mono)
        self.guard(self.kill_orphans, mono)
        self.guard(self.enforce_limits, mono)
        self.guard(self.check_database, mono)
        self.guard(self.sync, now, mono)
        if self.stopping and not self.children and not self.children.pending:
            return False
        self.guard(self.leases.expire, now, mono)
        self.guard(self.leases.extend, now, mono)
        self.guard(self.check_cancels, mono)
        self.guard(self.fire_schedules, now, mono)
        self.guard(self.prune_finished, now, mono)
        self.guard(self.publish, now, mono)
        if self.relays is not None and not self.children and not self.stopping:
            self.guard(self.relays.warm_when_idle, self.children.emptied_at, mono)
        return True

    def helpers(self) -> list:
        """Our helper processes that the pass's wait4(-1) may reap: the fork servers and
        the model-call relays."""
        return self.servers.all() + (self.relays.all if self.relays else [])

    def guard(self, step: Callable, *args) -> None:
        """Run a step; an exception is logged and counted, never the end of the loop."""
        try:
            step(*args)
        except Exception as exc:
            log.exception("supervisor step %s failed; going on", step.__name__)
            self.timers.step_error = self.clock.monotonic() + STEP_ERROR_PAUSE_S
            self.emit("step_failed", step=step.__name__, error=repr(exc))

    def open_store(self) -> None:
        sup = self.config.supervisor
        self.store = Store(sup.database, synchronous=sup.synchronous,
                           busy_timeout_s=sup.busy_timeout_s, background_checkpoints=True)
        self.others = WakeSender(self.store, self.host, skip=self.wake.port)
        self.register()
        self.store_ok = True

    def register(self) -> None:
        self.store.register_supervisor(
            owner=self.owner, host=self.host, pid=os.getpid(), pid_started_at=self.started_at,
            now=self.clock.now(), wake_port=None if self.stopping else self.wake.port,
            pool_size=self.config.supervisor.pool_size, version=__version__)

    def shutdown(self) -> None:
        self.notifier.stopping("stopped")
        for hook in self.on_shutdown:
            try:
                hook(self)
            except Exception:
                log.exception("shutdown hook failed")
        for server in self.servers.all():
            server.stop()
            server.close()
        try:
            self.store.unregister_supervisor(self.owner)
        except StoreError as exc:
            log.warning("could not unregister from the database: %s", exc)
        self.emit("stopped")
        log.info("supervisor %s stopped", self.owner)
        self.signals.restore()
        if self.others is not None:
            self.others.close()
        self.wake.close()
        self.store.close()

    def emit(self, name: str, **fields) -> None:
        if self.events is not None:
            try:
                self.events(name, fields)
            except Exception:  # an observer must never stop the loop
                log.exception("event observer failed on %s", name)

    # -- signals and reload --------------------------------------------------------------

    def handle_signals(self, mono: float) -> None:
        for sig in self.signals.drain():
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.begin_stop(mono, fast=self.stopping)
            elif sig == signal.SIGHUP:
                reloading.reload(self)
            elif sig == signal.SIGUSR1:
                log.info("status: %s", self.status_line())

    def check_database(self, mono: float) -> None:
        """Every DBFILE_CHECK_S, one stat: is the database path still the file we opened?
        Deleted, every later write goes to a file nobody can open (lost at exit); replaced,
        writes through our -wal could corrupt the new file. So: log it, close the store (no
        more writes of any kind), stop at once, drop outcomes that can no longer be
        recorded (runs before sync); supervisor.start then exits non-zero."""
        kids, t = self.children, self.timers
        if self.database_problem:
            if kids.pending:
                log.warning("%d outcome(s) not recorded: %s", len(kids.pending),
                            self.database_problem)
            kids.pending.clear()
            kids.pending_pids.clear()
            kids.progressed.clear()
            t.expire = t.extend = t.cancels = float("inf")  # the steps that use the store
            return
        if self.dbfile is None or mono < t.dbfile:
            return
        t.dbfile = mono + DBFILE_CHECK_S
        problem = self.dbfile.problem()
        if problem is not None:
            self.database_problem = problem
            log.error("%s: stopping now, running tasks are interrupted (restore the file, or "
                      "start again on a new database)", problem)
            self.begin_stop(mono, fast=True)
            self.store.close()
            self.check_database(mono)

    def begin_stop(self, mono: float, fast: bool) -> None:
        grace = 0.0 if fast else self.config.supervisor.shutdown_grace_s
        if not self.stopping:
            log.info("stopping: no new claims; %d running task(s) get %.0fs to finish",
                     len(self.children), grace)
            self.notifier.stopping(f"draining {len(self.children)} task(s)")
        else:
            log.info("second stop signal: interrupting %d running task(s) now", len(self.children))
        self.stopping = True
        self.stop_deadline = mono + grace
        self.timers.extend = mono  # unregister the wake port promptly
        self.emit("stopping", fast=fast)

    # -- fork servers --------------------------------------------------------------------

    @property
    def server(self) -> ForkServer:
        return self.servers.current

    # -- children ------------------------------------------------------------------------

    def kill_orphans(self, mono: float) -> None:
        """KILL what tasks that ended left behind in other groups or sessions: after a
        task ended, at most every ORPHAN_SWEEP_S."""
        if self.children.orphans_due and mono >= self.timers.orphans:
            self.children.orphans_due = False
            self.timers.orphans = mono + ORPHAN_SWEEP_S
            servers = {s.pid for s in self.servers.all()}
            proctree.kill_orphans(lambda pid: pid in servers or self.children.is_known(pid)
                                  or pid in self.helper_pids)

    def enforce_limits(self, mono: float) -> None:
        """Time limits, boot deadlines and KILL-after-TERM from the timer heap; a bounded
        batch of memory samples per tick; the end of the shutdown grace."""
        self.children.check_timers(mono)
        if mono >= self.timers.sample:
            self.timers.sample = mono + SAMPLE_S
            self.children.sample_memory()
        if self.stopping and self.stop_deadline is not None and mono >= self.stop_deadline:
            self.stop_deadline = None
            self.children.stop_all(Outcome.INTERRUPTED, "supervisor shutdown; the attempt is "
                                   "given back", mono, grace=self.config.supervisor.kill_grace_s)

    # -- database steps ------------------------------------------------------------------

    def sync(self, now: float, mono: float) -> None:
        """One transaction a pass: pids, progress and finished attempts, then a claim for
        every free slot (a slot is free once its process reported its outcome:
        Children.busy), so what an outcome made ready is claimed in the same commit.
        If SQLite fails, outcomes stay in memory (reaping goes on) and nothing is claimed."""
        sup = self.config.supervisor
        kids = self.children
        if mono >= self.timers.poll or mono >= self.timers.next_due:
            self.claim_needed = True
            self.timers.poll = mono + sup.poll_interval_s
            self.timers.next_due = float("inf")
        progress_due = bool(kids.progressed) and mono >= self.timers.progress
        claiming = self.can_claim(mono)
        output_due = kids.output.due(mono)
        if not (kids.pending or kids.pending_pids or progress_due or claiming or kids.acking
                or kids.checkpointing or output_due):
            return
        if mono < self.timers.store_retry:
            return
        was_empty = not kids
        try:
            with self.store.transaction(all_or_nothing=True):  # on error: none of it
                self.write_pids()
                if progress_due:
                    self.flush_progress(mono)
                answers = checkpointing.write(self.store, kids, now)  # before any outcome
                if output_due:  # before outcomes: an attempt's output precedes its end
                    kids.output.flush(self.store, mono)
                statuses = [self.record(child, end, now) for child, end in kids.pending]
                # Asked again after the outcomes: a success may have made its dependents
                # ready, for this transaction to claim (and then wake_others, when full).
                free = sup.pool_size - kids.busy()
                claimed = self.claim(now, free) if self.can_claim(mono) else []
        except StoreError as exc:
            # Once a failing streak, and again when outcomes first wait in memory (a claim
            # may fail first: a slot frees before its process's outcome is in).
            if self.store_ok or kids.pending and not self.kept_logged:
                log.error("database write failed, keeping %d outcome(s) in memory: %s",
                          len(kids.pending), exc)
                self.kept_logged = bool(kids.pending)
            self.store_ok = False
            self.timers.store_retry = mono + 0.5
            return
        self.store_ok = True
        self.kept_logged = False
        kids.output.committed()
        for hook in self.on_commit:
            hook()
        kids.pending_pids.clear()
        checkpointing.committed(kids, answers)
        kids.send_acks()
        recorded, kids.pending = kids.pending, []
        for (child, end), status in zip(recorded, statuses):
            self.emit("recorded", task=child.task, end=end, status=status)
        if claimed:
            if was_empty:  # these are the only leases held: the fence may move up to them
                self.leases.advance_fence(mono)
            self.start_attempts(claimed, now, mono)
        if recorded and (self.stopping or kids.busy() >= sup.pool_size):
            self.wake_others(mono)

    def wake_others(self, mono: float) -> None:
        """This supervisor cannot take more (full, or stopping), and its commit recorded
        ends, which may have made tasks ready (a success releases dependents and spawns, a
        failure those that run on failure) or freed a place of a limit: wake the other
        supervisors of the file, which would otherwise see them only at their next poll.
        At most every WAKE_OTHERS_S; a hint only (supervisor.wake), never an error."""
        if mono < self.timers.wake_others:
            return
        self.timers.wake_others = mono + WAKE_OTHERS_S
        try:
            self.others.notify()
        except OSError as exc:
            log.debug("could not wake the other supervisors: %s", exc)

    def write_pids(self) -> None:
        for child in self.children.pending_pids:  # only if still running: most no-ops are not
            # (one that reported its outcome is exiting: its pid goes with the outcome)
            if child.key in self.children.table and child.status is None and not child.released:
                if child.pid_started_at is None:
                    child.pid_started_at = proctree.start_time(child.pid)
                if child.pid_started_at is not None:
                    self.store.set_pid(child.lease, child.pid, child.pid_started_at)

    def start_attempts(self, claimed: list[Task], now: float, mono: float) -> None:
        """Spawn what was claimed at `mono` (a reading taken before the claim's write),
        each to start before that claim's fence or not at all: a process stopped between
        the claim and a spawn (or a request that waits in the fork server's socket) may
        find the lease already another supervisor's. Such an attempt is given back."""
        lease_s = self.config.supervisor.lease_s
        start_by = mono + lease_s - policy.fence_margin_s(lease_s)
        for task in claimed:
            fresh = self.clock.monotonic()  # read per task: a pause can fall between two
            if fresh >= start_by:
                self.children.give_back(task, self.server, fresh, "the supervisor was paused "
                                        "between the claim and the start; the attempt is given back")
            else:
                self.children.spawn(task, self.host_for(task), self.config, now, fresh,
                                    self.cgroup_dir, start_by=start_by)
                self.emit("claimed", task=task)

    def hosts_llm_chat(self) -> bool:
        """`llm.chat` attempts run in a model-call relay (while one is up): [llm]
        run_in_relay, and the type keeps its built-in handler."""
        if self.relays is None or not self.config.llm.run_in_relay:
            return False
        spec = self.config.types.get("llm.chat")
        return spec is None or not spec.handler

    def unreserved_types(self) -> tuple[str, ...]:
        """Types whose attempts reserve no memory at their claim: a hosted call has no
        process for `memory_mb` to limit, and costs the relay ~0.07 MiB."""
        return ("llm.chat",) if self.hosts_llm_chat() else ()

    def host_for(self, task: Task):
        """Where an attempt runs: `llm.chat` in the model-call relay ([llm] run_in_relay,
        while the relay is up, the type keeps its built-in handler and the task's attempts
        have not been lost with their relay too often: Children.isolated), else a process
        forked by the current fork server."""
        if task.type == "llm.chat" and self.hosts_llm_chat() and not self.children.isolated(task):
            relay = self.relays.pick()
            if relay is not None:
                return relay
        return self.server

    def flush_progress(self, mono: float) -> None:
        updates = [(c.lease, *c.progress) for c in self.children.progressed.values() if c.progress]
        if updates:
            self.store.set_progress(updates)
        for child in self.children.progressed.values():
            child.progress = None
        self.children.progressed.clear()
        self.timers.progress = mono + PROGRESS_FLUSH_S

    def record(self, child: Child, end: AttemptEnd, now: float) -> str | None:
        """Write one outcome under its lease; returns the task's new status (None: lost)."""
        lease = child.lease
        if end.spawn:  # ctx.spawn: checked now, stored with the success (or it fails)
            end = spawning.prepared(end, self.config, self.store, child.server.types, now)
        if end.outcome is Outcome.SUCCEEDED:
            ok = self.store.complete(lease, end, now)
            status = "succeeded" if ok else None
            # It may have queued what it spawned or its dependents, in our own commit
            # (no wake-up, no data_version change): claim again in the next pass.
            self.claim_needed = True
        else:
            status = self.store.fail(lease, end, now, self.backoff(child.task.type),
                                     max_reschedules=self.config.setting(
                                         child.task.type, "max_reschedules"))
        if child.task.limit_keys or end.pause_limits:
            self.store.settle_limits(child.task, end, self.config.limit_table(), now)
        if status is None:
            log.warning("outcome of %s attempt %d not recorded: the lease was lost (another "
                        "supervisor rescued it)", lease.id, lease.attempt, extra={"task_id": lease.id})
        return None if status is None else str(status)

    def backoff(self, type_name: str) -> policy.Backoff:
        return policy.Backoff(self.config.setting(type_name, "backoff_initial_s"),
                              self.config.setting(type_name, "backoff_max_s"))

    def check_cancels(self, mono: float) -> None:
        """Cancel requests come from other connections: read them only when the file
        changed (PRAGMA data_version), at most every CANCEL_CHECK_S."""
        if not self.children or mono < self.timers.cancels:
            return
        self.timers.cancels = mono + CANCEL_CHECK_S
        try:
            version = self.store.data_version()
            if version == self.data_version:
                return
            self.data_version = version
            wanted = set(self.store.cancel_requests(self.owner))
        except StoreError:
            return
        if not wanted:
            return
        grace = min(CANCEL_GRACE_S, self.config.supervisor.kill_grace_s)
        for child in self.children:
            if child.task.id in wanted and child.stop is None:
                self.children.stop(child, Outcome.CANCELLED, "cancelled on request", mono,
                                   grace=grace)

    def claim(self, now: float, free: int) -> list[Task]:
        """Lease up to `free` tasks (inside the caller's transaction)."""
        cfg = self.config
        caps = cfg.concurrency_caps()
        type_mb = {n: t.memory_mb for n, t in cfg.types.items() if t.memory_mb}
        unreserved = self.unreserved_types()
        claimed: list[Task] = []
        reserved = self.store.reserved_mb()  # once a pass; each claim adds its own
        while len(claimed) < free:
            task = self.store.claim(
                self.owner, now, lease_s=cfg.supervisor.lease_s, caps=caps,
                memory_budget_mb=self.memory_budget_mb, type_memory_mb=type_mb,
                default_memory_mb=cfg.defaults.memory_mb, reserved_mb=reserved,
                limits=cfg.limit_table(), unreserved_types=unreserved)
            if task is None:
                self.claim_needed = False
                # Wake up for the next delayed task, not a poll interval later.
                due_at = self.store.next_run_after(now)
                if due_at is not None:
                    self.timers.next_due = self.clock.monotonic() + max(0.0, due_at - now)
                if self.store.limit_room_s is not None:  # ... or for a limit to have room
                    self.timers.next_due = min(self.timers.next_due,
                                               self.clock.monotonic() + self.store.limit_room_s)
                break
            claimed.append(task)
            reserved += task.reserved_mb or 0
        return claimed

    def fire_schedules(self, now: float, mono: float) -> None:
        """Enqueue the schedules' due fires (once across supervisors; supervisor.schedule)."""
        if self.stopping:
            return
        # A fire's task gets the client's checks and per-type defaults (opens nothing).
        prepare = lambda *task: Queue(self.config).prepare(*task)  # noqa: E731
        try:
            if self.scheduler.step(self.store, self.config, prepare, now, mono):
                self.claim_needed = True
        except (StoreError, InputError) as exc:
            log.error("schedule step failed, trying again in 1s: %s", exc)
            self.scheduler.due_mono = mono + 1.0

    def prune_finished(self, now: float, mono: float) -> None:
        """One small batch of retention when due (supervisor.retention)."""
        try:
            self.retention.step(self.store, self.config.supervisor.retain_finished, now, mono,
                                self.config.limit_table())
        except StoreError as exc:
            log.error("retention batch failed: %s", exc)
            self.retention.due_mono = mono + 5.0

    # -- status and waiting --------------------------------------------------------------

    def status_line(self) -> str:
        return (f"{self.children.busy()}/{self.config.supervisor.pool_size} slots busy"
                + (", stopping" if self.stopping else ""))

    def publish(self, now: float, mono: float) -> None:
        """The snapshot for the HTTP and metrics threads, and systemd's status."""
        running = self.snapshot.running
        if mono >= self.timers.running_snapshot:
            self.timers.running_snapshot = mono + SNAPSHOT_RUNNING_S
            running = {c.task.id: (c.peak_rss, c.timeout_s) for c in self.children.values()}
        self.snapshot = Snapshot.of(self, running)
        status = self.status_line()
        if status != self._status:
            self._status = status
            self.notifier.status(status)
        self.notifier.watchdog(mono)

    def can_claim(self, mono: float) -> bool:
        """A free slot, maybe a task for it, and a fork server and a database to use."""
        return (self.claim_needed and not self.stopping and not self.server.exited
                and self.children.busy() < self.config.supervisor.pool_size
                and mono >= self.timers.store_retry)

    def next_deadline(self, mono: float) -> float:
        t = self.timers
        if self.can_claim(mono):
            return max(mono, t.step_error)  # no waiting
        times = [t.poll, t.expire, t.extend, t.next_due]
        kids = self.children
        if kids.pending or kids.pending_pids or kids.acking or kids.checkpointing or (self.claim_needed and t.store_retry > mono):
            times.append(t.store_retry)
        if kids.orphans_due:
            times.append(t.orphans)
        if kids:
            if len(kids.watchdog):
                times.append(t.sample)
            times.append(t.cancels)
            if kids.progressed:
                times.append(t.progress)
        if self.dbfile is not None:
            times.append(t.dbfile)
        times += (self.scheduler.due_mono, self.retention.due_mono)
        output_at = kids.output.next_due()
        if output_at is not None:  # not before a failed write may be retried
            times.append(max(output_at, t.store_retry))
        for extra in (kids.next_timer(), self.stop_deadline, self.servers.restart_at,
                      self.notifier.next_watchdog_mono(),
                      *(r.restart_at for r in (self.relays.all if self.relays else ()))):
            if extra is not None:
                times.append(extra)
        return max(min(times), t.step_error)

    def wait(self, timeout: float) -> None:
        self.update_write_interest()
        for key, events in self.selector.select(max(0.0, min(timeout, 5.0))):
            kind, target = key.data
            try:
                self.dispatch(kind, target, events, self.clock.monotonic())
            except Exception:
                log.exception("handling a %s event failed; going on", kind)

    def dispatch(self, kind: str, target, events: int, mono: float) -> None:
        """One ready descriptor, by the tag it was registered with."""
        if kind == "report":
            self.children.on_report(target, mono)
        elif kind == "output":
            self.children.on_output(target)
        elif kind == "server":  # a fork server's or a relay's channel (supervisor.channel)
            if events & selectors.EVENT_WRITE:
                target.flush()
            if events & selectors.EVENT_READ:
                for msg in target.events():
                    self.children.on_server_event(target, msg, mono)
        elif kind == "wake":
            self.wake.drain()
            self.claim_needed = True
            self.timers.cancels = 0.0
            self.data_version = -1
        elif kind == "signals":  # drained at the top of the next pass
            target.set_readable()

    def update_write_interest(self) -> None:
        """Ask to hear when a fork server's socket can take more, while its outbox holds
        packets: sends never block, and nothing waits in the outbox unwatched."""
        for server in self.servers.all():
            self._want_writes(server)
        for relay in self.relays.all if self.relays else ():
            self._want_writes(relay)

    def _want_writes(self, channel) -> None:
        if channel.sock is None:
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if channel.outbox else 0)
        key = self.selector.get_map().get(channel.sock)
        if key is not None and key.events != want:
            self.selector.modify(channel.sock, want, ("server", channel))
