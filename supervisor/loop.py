"""The supervisor loop: lease tasks, run each attempt through the fork server, record.

Owns `Supervisor.run()` and its steps, each a method of at most ~30 lines that takes
the pass's one clock reading. It is the only writer of task state after a claim and the
only code that signals task processes. Reaping works with the database down: outcomes
wait in memory (`pending`) until SQLite answers. It never imports user code (the fork
server does) and never sleeps: it waits on a selector until the next deadline.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
import uuid
from collections.abc import Callable


from supervisor import __version__, policy
from supervisor.children import (Child, classify, kill, kill_group, kill_orphans, start_time,
                                 terminate)
from supervisor.forkserver import ForkServer, ForkServerError, ForkServers, handlers_of
from supervisor.recovery import Recovery
from supervisor.config import Config, load
from supervisor.errors import ConfigError, StoreError
from supervisor.service import Notifier
from supervisor.signals import Signals
from supervisor.store import AttemptEnd, Outcome, Store, Task
from supervisor.wake import WakeSocket
from supervisor.watchdog import Watchdog, machine_memory_mb
from workers import outcome as proto

log = logging.getLogger("taskvisor.supervisor")
MIB = 1024 * 1024
SAMPLE_S = 0.25           # RSS watchdog period
CANCEL_CHECK_S = 0.25     # how often running tasks' cancel flags are read
PROGRESS_FLUSH_S = 0.5    # progress is written at most this often
CANCEL_GRACE_S = 0.5      # TERM -> KILL for a cancel (cancel takes effect within 1 s)
ORPHAN_SWEEP_S = 0.1      # at most this often, a sweep for what ended tasks left behind


class SystemClock:
    @staticmethod
    def now() -> float:
        return time.time()

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()


class Supervisor:
    """One supervisor process. Construct in the main thread after the fork server started."""

    def __init__(self, config: Config, fork_server: ForkServer, *, clock=SystemClock,
                 events: Callable[[str, dict], None] | None = None):
        self.config = config
        self.clock = clock
        self.events = events
        self.servers = ForkServers(fork_server)
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.store: Store | None = None
        self.children: dict[str, Child] = {}
        self.by_pid: dict[int, Child] = {}
        self.pending: list[tuple[Child, AttemptEnd]] = []
        self.pending_pids: list[Child] = []
        self.watchdog = Watchdog()
        self.recovery = Recovery(self.host, self.owner)
        self.started_at = start_time(os.getpid())  # with the pid, names this process
        self.signals = Signals()
        self.notifier = Notifier()
        self.wake = WakeSocket()
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.stop_deadline: float | None = None
        self.claim_needed = True
        self.orphans_due = False  # a task ended since the last sweep for its orphans
        self.last_loop_at = 0.0
        self.store_ok = False
        self.due: dict[str, float] = {}   # step name -> next monotonic time it runs
        self.memory_budget_mb = policy.memory_budget_mb(config.supervisor.memory_budget_mb, machine_memory_mb())
        self._status = ""
        self.cgroup_dir: str | None = None  # set by supervisor.start when delegated
        # Called once the database is migrated and rescued, before READY=1 (the HTTP
        # server binds here), and at shutdown after the last task was recorded.
        self.on_ready: list[Callable[["Supervisor"], None]] = []
        self.on_shutdown: list[Callable[["Supervisor"], None]] = []

    # -- life cycle ----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit code (0 after a drain)."""
        self.signals.install()
        self.selector.register(self.signals, selectors.EVENT_READ, "signals")
        self.selector.register(self.wake, selectors.EVENT_READ, "wake")
        self.selector.register(self.server, selectors.EVENT_READ, self.server)

        self.open_store()
        self.rescue(self.clock.now())
        for hook in self.on_ready:
            hook(self)
        self.emit("started", owner=self.owner)
        self.notifier.ready(self.status_line())
        log.info("supervisor %s ready: pool_size=%d database=%s", self.owner,
                 self.config.supervisor.pool_size, self.config.supervisor.database)
        while True:
            now, mono = self.clock.now(), self.clock.monotonic()
            self.last_loop_at = now
            self.handle_signals(mono)
            self.tend_fork_servers(mono)
            self.reap_children(mono)
            self.kill_orphans(mono)
            self.enforce_limits(mono)
            self.sync(now, mono)
            if self.stopping and not self.children and not self.pending:
                break
            self.expire_leases(now, mono)
            self.extend_leases(now, mono)
            self.check_cancels(mono)
            self.publish_status(now, mono)
            self.wait(self.next_deadline(mono) - mono)
        self.shutdown()
        return 0

    def open_store(self) -> None:
        sup = self.config.supervisor
        self.store = Store(sup.database, synchronous=sup.synchronous,
                           busy_timeout_s=sup.busy_timeout_s, background_checkpoints=True)
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
                self.reload()
            elif sig == signal.SIGUSR1:
                log.info("status: %s", self.status_line())

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
        self.due["extend"] = mono  # unregister the wake port promptly
        self.emit("stopping", fast=fast)

    def reload(self) -> None:
        try:
            new = load(self.config.path) if self.config.path else self.config
            new = new.with_database(self.config.supervisor.database)
        except ConfigError as exc:
            for line in exc.errors:
                log.error("reload rejected: %s", line)
            log.error("reload rejected: keeping the running config (%d error(s))", len(exc.errors))
            return
        self.notifier.reloading()
        old = self.config
        self.config = new
        self.memory_budget_mb = policy.memory_budget_mb(new.supervisor.memory_budget_mb, machine_memory_mb())
        self.claim_needed = True
        if (new.supervisor.preload, handlers_of(new)) != (old.supervisor.preload, handlers_of(old)):
            self.replace_fork_server("preload or handlers changed")
        log.info("config reloaded from %s: pool_size=%d", new.path, new.supervisor.pool_size)
        self.emit("reloaded", pool_size=new.supervisor.pool_size)
        self.notifier.ready(self.status_line())

    def replace_fork_server(self, why: str) -> bool:
        """Start a new fork server for new tasks; the old one stays until its tasks end."""
        try:
            new = self.servers.launch(self.config)
        except ForkServerError as exc:
            log.error("new fork server failed (%s), keeping the old one: %s\n%s", why, exc, exc.detail)
            return False
        self.servers.replace(new)
        self.selector.register(new, selectors.EVENT_READ, new)
        log.info("fork server %d started (%s); %d retiring", new.pid, why, len(self.servers.retiring))
        return True

    # -- fork servers --------------------------------------------------------------------

    @property
    def server(self) -> ForkServer:
        return self.servers.current

    def tend_fork_servers(self, mono: float) -> None:
        """Notice a dead fork server; restart the current one with backoff."""
        servers = self.servers
        for server in servers.all():
            if not server.exited:
                continue
            if server.sock is not None:
                self.selector.unregister(server)
                server.close()
            orphans = [c for c in self.children.values() if c.server is server and c.status is None]
            for child in orphans:  # they die with it; the attempt is given back
                if child.stop is None:
                    child.stop = (Outcome.INTERRUPTED, "its fork server died; the attempt is given back")
                if child.eof or child.pid is None:
                    self.finish(child, mono)
            if server is not servers.current:
                if not orphans:
                    servers.retiring.remove(server)
            elif servers.restart_at is None:
                delay = servers.schedule_restart(mono, died=True)
                log.error("fork server %s died; restarting in %.1fs", server.pid, delay)
        if not self.stopping and servers.take_due_restart(mono):
            if self.replace_fork_server("the previous one died"):
                self.claim_needed = True
                self.emit("forkserver_restarted", pid=servers.current.pid)
            else:
                servers.schedule_restart(mono, died=False)

    def on_server_event(self, server: ForkServer, msg: dict, mono: float) -> None:
        op = msg.get("op")
        if op == "spawned":
            child = self.children.get(msg["key"])
            if child is None:
                return
            child.pid = msg["pid"]
            self.by_pid[child.pid] = child
            self.pending_pids.append(child)  # its start time is read when it is written
        elif op == "exited":
            child = self.by_pid.get(msg["pid"])
            if child is not None and child.status is None:
                child.status = msg["status"]
                child.rusage = msg
                self.finish(child, mono)
        elif op == "spawn_failed":
            child = self.children.get(msg["key"])
            if child is not None:
                child.stop = (Outcome.INTERRUPTED, f"could not start: {msg.get('error')}")
                self.finish(child, mono)

    # -- children ------------------------------------------------------------------------

    def reap_children(self, mono: float) -> None:
        """waitpid our own children: fork servers, and task processes re-parented to us
        (we are their subreaper) after their fork server died."""
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for server in self.servers.all():
                if server.pid == pid:
                    server.exited = True
            child = self.by_pid.get(pid)
            if child is not None and child.status is None:
                child.status = status
                child.rusage = {"utime": ru.ru_utime, "stime": ru.ru_stime, "maxrss_kb": ru.ru_maxrss}
                self.finish(child, mono)

    def on_child_messages(self, child: Child, mono: float) -> None:
        for msg in child.read():
            kind = msg.get("kind")
            if kind == proto.READY:
                child.ready = True
                self.emit("ready", task_id=child.task.id, pid=child.pid)
            elif kind == proto.PROGRESS:
                child.progress = (msg.get("fraction"), msg.get("message"))
                child.heartbeat_mono = mono
            elif kind == proto.HEARTBEAT:
                child.heartbeat_mono = mono
            elif kind in (proto.RESULT, proto.ERROR, proto.RETRY, proto.CANCELLED):
                child.final = msg
        if child.eof and child.report_fd >= 0:
            self.selector.unregister(child.report_fd)
            child.close()

    def finish(self, child: Child, mono: float) -> None:
        """The process is gone: read what is left, classify, queue the outcome for writing."""
        if child.key not in self.children:
            return
        if child.report_fd >= 0:
            self.on_child_messages(child, mono)
            if child.report_fd >= 0:
                self.selector.unregister(child.report_fd)
                child.close()
        del self.children[child.key]
        if child.pid is not None:
            self.by_pid.pop(child.pid, None)
            self.watchdog.forget(child.pid)
            if self.cgroup_dir:
                try:
                    os.rmdir(os.path.join(self.cgroup_dir, f"task-{child.pid}"))
                except OSError:
                    pass
            kill_group(child.pid)  # what it left behind in its process group dies with it
        self.orphans_due = True
        end = classify(child)
        self.pending.append((child, end))
        self.claim_needed = True
        level = logging.INFO if end.outcome in (Outcome.SUCCEEDED, Outcome.RESCHEDULED) else logging.WARNING
        log.log(level, "%s attempt %d ended %s: %s", child.task.type, child.lease.attempt,
                end.outcome, end.reason,
                extra={"task_id": child.task.id, "task_type": child.task.type,
                       "attempt": child.lease.attempt, "outcome": str(end.outcome), "pid": child.pid})
        self.emit("finished", task=child.task, end=end, child=child)

    def kill_orphans(self, mono: float) -> None:
        """KILL what tasks that ended left behind in other groups or sessions: after a
        task ended, at most every ORPHAN_SWEEP_S (a sweep reads /proc once per thread)."""
        if self.orphans_due and mono >= self.due.get("orphans", 0.0):
            self.orphans_due = False
            self.due["orphans"] = mono + ORPHAN_SWEEP_S
            kill_orphans(known={s.pid for s in self.servers.all()} | set(self.by_pid))

    def enforce_limits(self, mono: float) -> None:
        sup = self.config.supervisor
        sample = mono >= self.due.get("sample", 0.0)
        if sample:
            self.due["sample"] = mono + SAMPLE_S
        for child in list(self.children.values()):
            if child.pid is None or child.status is not None:
                continue
            if not child.ready and child.stop is None and mono - child.spawned_mono > sup.boot_timeout_s:
                self.stop_child(child, Outcome.CRASHED, f"did not become ready within "
                                f"{sup.boot_timeout_s:g}s of its fork", mono, grace=0)
            deadline = child.deadline_mono
            if deadline is not None and mono >= deadline and child.stop is None:
                self.stop_child(child, Outcome.TIMEOUT, f"ran past its {child.timeout_s:g}s time "
                                "limit", mono, grace=sup.kill_grace_s)
            if sample:
                self.sample_memory(child, mono)
            if child.kill_at_mono is not None and mono >= child.kill_at_mono:
                kill(child)
                child.kill_at_mono = mono + 1.0  # keep at it until the process is reaped
            if self.stopping and child.stop is None and mono >= (self.stop_deadline or mono):
                self.stop_child(child, Outcome.INTERRUPTED, "supervisor shutdown; the attempt "
                                "is given back", mono, grace=sup.kill_grace_s)

    def sample_memory(self, child: Child, mono: float) -> None:
        rss = self.watchdog.rss_bytes(child.pid, mono, child.spawned_mono)
        if rss is None:
            return
        child.peak_rss = max(child.peak_rss, rss)
        if child.memory_mb and rss > child.memory_mb * MIB and child.stop is None:
            self.stop_child(child, Outcome.MEMORY_LIMIT, f"used {rss / MIB:.0f} MiB (process "
                            f"tree RSS), over its {child.memory_mb} MiB limit", mono, grace=0)

    def stop_child(self, child: Child, outcome: Outcome, reason: str, mono: float, grace: float) -> None:
        """End an attempt on the supervisor's decision: TERM now, KILL after `grace`."""
        child.stop = (outcome, reason)
        if grace <= 0:
            kill(child)
            child.kill_at_mono = mono + 1.0
        else:
            terminate(child)
            child.kill_at_mono = mono + grace
        log.info("stopping %s attempt (%s): %s", child.task.type, outcome, reason,
                 extra={"task_id": child.task.id, "task_type": child.task.type})

    # -- database steps ------------------------------------------------------------------

    def sync(self, now: float, mono: float) -> None:
        """One transaction a pass: pids, progress and finished attempts, then a claim for
        every free slot, so a slot freed by a completion is refilled in the same commit.
        If SQLite fails, outcomes stay in memory (reaping goes on) and nothing is claimed."""
        sup = self.config.supervisor
        if mono >= self.due.get("poll", 0.0):
            self.claim_needed = True
            self.due["poll"] = mono + sup.poll_interval_s
        progress_due = mono >= self.due.get("progress", 0.0) and any(
            c.progress for c in self.children.values())
        free = sup.pool_size - len(self.children)
        claiming = self.can_claim(mono)
        if not (self.pending or self.pending_pids or progress_due or claiming):
            return
        if mono < self.due.get("flush_retry", 0.0):
            return
        try:
            with self.store.transaction(all_or_nothing=True):  # on error: none of it
                for child in self.pending_pids:  # only if still running: most no-ops are not
                    if child.key in self.children and child.status is None:
                        if child.pid_started_at is None:
                            child.pid_started_at = start_time(child.pid)
                        if child.pid_started_at is not None:
                            self.store.set_pid(child.lease, child.pid, child.pid_started_at)
                if progress_due:
                    self.flush_progress(mono)
                statuses = [self.record(child, end, now) for child, end in self.pending]
                claimed = self.claim(now, free) if claiming else []
        except StoreError as exc:
            if self.store_ok:
                log.error("database write failed, keeping %d outcome(s) in memory: %s",
                          len(self.pending), exc)
            self.store_ok = False
            self.due["flush_retry"] = mono + 0.5
            return
        self.store_ok = True
        self.pending_pids.clear()
        recorded, self.pending = self.pending, []
        for (child, end), status in zip(recorded, statuses):
            self.emit("recorded", task=child.task, end=end, status=status)
        for task in claimed:
            self.spawn(task, now, mono)

    def flush_progress(self, mono: float) -> None:
        updates = [(c.lease, *c.progress) for c in self.children.values() if c.progress]
        if updates:
            self.store.set_progress(updates)
            for child in self.children.values():
                child.progress = None
        self.due["progress"] = mono + PROGRESS_FLUSH_S

    def record(self, child: Child, end: AttemptEnd, now: float) -> str | None:
        """Write one outcome under its lease; returns the task's new status (None: lost)."""
        lease = child.lease
        if end.outcome is Outcome.SUCCEEDED:
            ok = self.store.complete(lease, end, now)
            status = "succeeded" if ok else None
        else:
            status = self.store.fail(lease, end, now, self.backoff(child.task.type))
        if status is None:
            log.warning("outcome of %s attempt %d not recorded: the lease was lost (another "
                        "supervisor rescued it)", lease.id, lease.attempt, extra={"task_id": lease.id})
        return None if status is None else str(status)

    def backoff(self, type_name: str) -> policy.Backoff:
        return policy.Backoff(self.config.setting(type_name, "backoff_initial_s"),
                              self.config.setting(type_name, "backoff_max_s"))

    def rescue(self, now: float) -> None:
        """Requeue tasks of dead supervisors on this host, and expired leases of anyone."""
        rescued = self.recovery.rescue(self.store, now, self.backoff)
        for task in rescued:
            self.emit("expired", task=task)
        if rescued:
            self.claim_needed = True

    def expire_leases(self, now: float, mono: float) -> None:
        if mono < self.due.get("expire", 0.0):
            return
        self.due["expire"] = mono + max(0.5, self.config.supervisor.lease_s / 2)
        try:
            self.rescue(now)
        except StoreError as exc:
            log.error("lease rescue failed: %s", exc)

    def extend_leases(self, now: float, mono: float) -> None:
        if mono < self.due.get("extend", 0.0):
            return
        sup = self.config.supervisor
        self.due["extend"] = mono + max(0.2, sup.lease_s / 3)
        try:
            held = self.store.extend(self.owner, now, sup.lease_s)
            self.register()
        except StoreError as exc:
            log.error("lease extension failed: %s", exc)
            return
        for child in list(self.children.values()):
            if child.task.id not in held and child.stop is None and not any(
                    c is child for c, _ in self.pending):
                self.stop_child(child, Outcome.LOST, "the lease was lost: another supervisor "
                                "rescued this task", mono, grace=0)

    def check_cancels(self, mono: float) -> None:
        if not self.children or mono < self.due.get("cancel", 0.0):
            return
        self.due["cancel"] = mono + CANCEL_CHECK_S
        try:
            wanted = set(self.store.cancel_requests(self.owner))
        except StoreError:
            return
        for child in list(self.children.values()):
            if child.task.id in wanted and child.stop is None:
                grace = min(CANCEL_GRACE_S, self.config.supervisor.kill_grace_s)
                self.stop_child(child, Outcome.CANCELLED, "cancelled on request", mono, grace=grace)

    def claim(self, now: float, free: int) -> list[Task]:
        """Lease up to `free` tasks (inside the caller's transaction)."""
        cfg = self.config
        caps = cfg.concurrency_caps()
        type_mb = {n: t.memory_mb for n, t in cfg.types.items() if t.memory_mb}
        claimed: list[Task] = []
        while len(claimed) < free:
            task = self.store.claim(
                self.owner, now, lease_s=cfg.supervisor.lease_s, caps=caps,
                memory_budget_mb=self.memory_budget_mb, type_memory_mb=type_mb,
                default_memory_mb=cfg.defaults.memory_mb)
            if task is None:
                self.claim_needed = False
                break
            claimed.append(task)
        return claimed

    def spawn(self, task: Task, now: float, mono: float) -> None:
        child, spec = Child.for_task(task, self.config, self.server, now, mono, self.cgroup_dir)
        key = child.key
        self.children[key] = child
        try:
            child.report_fd = self.server.spawn(key, spec)
        except OSError as exc:
            log.error("could not reach the fork server: %s", exc)
            self.server.exited = True
            child.stop = (Outcome.INTERRUPTED, f"could not reach the fork server: {exc}")
            self.finish(child, mono)
            return
        self.selector.register(child.report_fd, selectors.EVENT_READ, child)
        self.emit("claimed", task=task)

    # -- status and waiting --------------------------------------------------------------

    def status_line(self) -> str:
        return (f"{len(self.children)}/{self.config.supervisor.pool_size} slots busy"
                + (", stopping" if self.stopping else ""))

    def publish_status(self, now: float, mono: float) -> None:
        status = self.status_line()
        if status != self._status:
            self._status = status
            self.notifier.status(status)
        self.notifier.watchdog(mono)

    def can_claim(self, mono: float) -> bool:
        """A free slot, maybe a task for it, and a fork server and a database to use."""
        return (self.claim_needed and not self.stopping and not self.server.exited
                and len(self.children) < self.config.supervisor.pool_size
                and mono >= self.due.get("flush_retry", 0.0))

    def next_deadline(self, mono: float) -> float:
        if self.can_claim(mono):
            return mono  # no waiting
        retry_at = self.due.get("flush_retry", 0.0)  # after a database error
        times = [self.due.get(k, mono) for k in ("poll", "expire", "extend")]
        if self.pending or self.pending_pids or (self.claim_needed and retry_at > mono):
            times.append(retry_at)
        if self.orphans_due:
            times.append(self.due.get("orphans", mono))
        if self.children:
            times.append(self.due.get("sample", mono))
            times.append(self.due.get("cancel", mono))
            if any(c.progress for c in self.children.values()):
                times.append(self.due.get("progress", mono))
            boot_s = self.config.supervisor.boot_timeout_s
            for child in self.children.values():  # no generator per child: a pass each time
                for t in (child.deadline_mono, child.kill_at_mono,
                          None if child.ready else child.spawned_mono + boot_s):
                    if t is not None:
                        times.append(t)
        for t in (self.stop_deadline, self.servers.restart_at, self.notifier.next_watchdog_mono()):
            if t is not None:
                times.append(t)
        return min(times)

    def wait(self, timeout: float) -> None:
        for key, _ in self.selector.select(max(0.0, min(timeout, 5.0))):
            target = key.data
            mono = self.clock.monotonic()
            if target == "signals":
                continue  # drained at the top of the next pass
            if target == "wake":
                self.wake.drain()
                self.claim_needed = True
                self.due["cancel"] = 0.0
            elif isinstance(target, ForkServer):
                for msg in target.events():
                    self.on_server_event(target, msg, mono)
            elif isinstance(target, Child):
                self.on_child_messages(target, mono)
