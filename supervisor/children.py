"""The child table: every attempt this supervisor is running, from spawn to recorded end.

Owns running task processes as the supervisor sees them: the `Child` record of each
attempt, the spawn request and the fork server's events about it, the report channel
(every line checked by workers.wire; a task that breaks the protocol ends its own attempt
as `crashed`), its output pipe (read into supervisor.output), reaping, the time, boot and
memory limits (deadlines in a heap and a bounded watchdog, so the cost is per event, not
per task in flight), which attempts hold a slot (not one whose process reported its
outcome and is exiting: its channels are read once more at its reap, and it is killed if
it stays), stopping an attempt, turning how it ended into an AttemptEnd that
waits in `pending` until the loop writes it, and counting the hosted attempts each task
lost with its relay (`isolated`: from the second, the task runs apart from the relay). It
never touches the database and never imports user code.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import selectors
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from supervisor import proctree
from supervisor.capacity import EXITING_MAX
from supervisor.output import LiveOutput
from supervisor.store import AttemptEnd, Lease, Outcome, Task
from supervisor.watchdog import Watchdog
from workers import outcome as codes
from workers import wire
from workers.relaycall import RELAY_ENV

if TYPE_CHECKING:
    from supervisor.forkserver import ForkServer

log = logging.getLogger("taskvisor.supervisor")
MIB = 1024 * 1024
MAX_LOG_BYTES = 256 * 1024  # the tail of a task's stdout and stderr kept per attempt
REPORT_READ = 65536
# A task whose hosted attempts were lost with their relay this many times runs its next
# attempts in a task process of its own that calls the model directly: a payload that
# kills the relay (a crash in the TLS stack, an answer that exhausts its memory) must not
# take every call the relay hosts down with it again and again, nor hop from relay to
# relay. Such losses spend no attempt; in a task process a crash does. The count is the
# task row's (relay_losses): it holds across restarts and the supervisors of a file.
ISOLATE_AFTER = 2
# A task process that reported its outcome is killed if it has not exited this long after
# (its report stands): it holds no slot meanwhile (Children.busy), and must not stay.
EXIT_AFTER_FINAL_S = 5.0


@dataclass(eq=False)
class Child:
    """One attempt in flight. `key` is "<task id>:<attempt>"."""
    key: str
    task: Task
    lease: Lease
    server: "ForkServer"
    spawned_mono: float
    timeout_s: float | None
    memory_mb: int | None
    cpu_s: float | None
    report_fd: int = -1                # the supervisor's end of the report socket
    output_fd: int = -1                # the read end of the task's stdout/stderr pipe
    pid: int | None = None
    forked_mono: float | None = None   # when the fork server said it forked it
    pid_started_at: float | None = None
    ready: bool = False
    buf: bytearray = field(default_factory=bytearray)
    final: dict | None = None          # result / error / retry / cancelled message
    progress: tuple | None = None      # (fraction, message) not yet written
    heartbeat_mono: float = 0.0
    stop: tuple | None = None          # (Outcome, reason) when the supervisor ended it
    kill_at_mono: float | None = None  # when KILL follows
    peak_rss: int = 0
    status: int | None = None          # wait status, once reaped
    rusage: dict | None = None
    eof: bool = False
    acks: list = field(default_factory=list)  # (seq, error) to answer after the commit
    checkpoints: list = field(default_factory=list)  # (seq, state JSON) not yet written
    spent_tokens: int | None = None    # what ctx.spend reported, summed
    type_limits: tuple = ()            # its type's limits when it started (its ctx.type_limits)
    relay_lost: bool = False           # hosted, and its relay ended without its outcome
    released: bool = False             # its outcome is in: no slot, its channels unwatched
    overdue: bool = False              # released, and not gone EXIT_AFTER_FINAL_S later
    ending: bool = False               # finish() runs for it

    @property
    def deadline_mono(self) -> float | None:
        return None if self.timeout_s is None else self.spawned_mono + self.timeout_s

    @property
    def hosted(self) -> bool:
        """Run by the model-call relay as a coroutine (workers.hosting), not a process:
        no pid; it ends when the relay closes its report socket."""
        return self.server is not None and self.server.hosts_attempts

    @property
    def started(self) -> bool:
        """It began: forked, or (hosted) the relay said it is ready."""
        return self.pid is not None or self.hosted and self.ready


def limits_of(task: Task, config) -> tuple[float | None, int | None, float | None]:
    """(timeout_s, memory_mb, cpu_s) of an attempt: the task's, else its type's, else
    [defaults]."""
    return (task.timeout_s or config.setting(task.type, "timeout_s"),
            task.memory_mb or config.setting(task.type, "memory_mb"),
            task.cpu_s or config.setting(task.type, "cpu_s"))


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_handler_configs: list = [None, b""]  # [the config it was built from, its JSON]


def spec_for(task: Task, config, now: float, limits: tuple, cgroup_dir: str | None,
             unset_env: tuple[str, ...] = ()) -> bytes:
    """The JSON text a task process reads: the task (its payload passed through as the
    stored text, never decoded here), the deadline, limits and handler settings, and the
    environment variables it must not see (`unset_env`: an isolated llm.chat attempt
    does not use the relay)."""
    timeout_s, memory_mb, cpu_s = limits
    if _handler_configs[0] is not config:  # ctx.config: llm.chat's settings, never a secret
        from dataclasses import asdict
        _handler_configs[:] = [config, _encode({"llm": asdict(config.llm)}).encode()]
    head = _encode({"id": task.id, "type": task.type, "attempt": task.attempts,
                    "max_attempts": task.max_attempts})
    rest = _encode({
        "deadline_at": now + timeout_s if timeout_s else None,
        "limits": {"memory_mb": memory_mb, "cpu_s": cpu_s,
                   "open_files": config.setting(task.type, "open_files"),
                   "cgroup_dir": cgroup_dir, "nice": config.setting(task.type, "nice")},
        "max_result_bytes": config.supervisor.max_result_bytes,
        "log_format": config.log.format, "log_level": config.log.level,
        # workflow inputs, event data, checkpoint state (read at claim: Store.claim)
        **({"context": task.context} if task.context else {}),
        # The named limits it draws from, and those of its type (llm.chat pauses these).
        "limit_keys": list(task.limit_keys), "type_limits": list(config.type_limits(task.type)),
        **({"unset_env": list(unset_env)} if unset_env else {})})
    return b"".join((b'{"task":', head[:-1].encode(), b',"payload":', task.payload_text.encode(),
                     b'},"config":', _handler_configs[1], b",", rest[1:].encode()))


class Children:
    """The table of running attempts, keyed by "<task id>:<attempt>"."""

    def __init__(self, selector: selectors.BaseSelector, config, clock, emit,
                 max_log_bytes: int = MAX_LOG_BYTES):
        self.selector = selector
        self.config = config  # replaced by the loop on reload
        self.clock = clock
        self.emit = emit
        # Streamed output (ctx.stream) and stdout/stderr of running attempts, stored by
        # the loop's pass (supervisor.output), which keeps the last max_log_bytes.
        self.output = LiveOutput(config.supervisor.max_output_bytes, max_log_bytes)
        self.table: dict[str, Child] = {}
        self.released = 0  # children in the table whose outcome is in (Child.released)
        self.emptied_at = clock.monotonic()  # when the table last became empty
        self.by_pid: dict[int, Child] = {}
        self.pending: list[tuple[Child, AttemptEnd]] = []  # ended, not yet recorded
        self.pending_pids: list[Child] = []                # pid not yet recorded
        self.progressed: dict[str, Child] = {}             # progress not yet recorded
        self.acking: list[Child] = []                      # answers due after the commit
        self.checkpointing: dict[str, Child] = {}          # checkpoints not yet written
        self.watchdog = Watchdog()
        self._timers: list[tuple[float, int, Child]] = []  # (when, seq, child): a heap
        self._seq = 0
        self.orphans_due = False
        self.fence_mono: float | None = None  # set by the loop; past it tasks are killed

    def __len__(self) -> int:
        return len(self.table)

    def busy(self) -> int:
        """The slots taken: every attempt in the table but those whose process reported
        its outcome and is exiting. The outcome is written once the process is reaped (its
        exit status and CPU time are part of it), but the next task need not wait for that
        exit: on a busy machine the fork server's reaping and its message are a slot's
        idle time. At most min(pool_size, EXITING_MAX) such processes count as free, so a
        task that reports and then does not exit cannot multiply processes."""
        free = min(self.released, self.config.supervisor.pool_size, EXITING_MAX)
        return len(self.table) - free

    def __iter__(self):
        return iter(list(self.table.values()))

    def values(self):
        return self.table.values()

    # -- spawn and the fork server's events ----------------------------------------------

    def spawn(self, task: Task, server: "ForkServer", config, now: float, mono: float,
              cgroup_dir: str | None = None, start_by: float | None = None) -> Child:
        limits = limits_of(task, config)
        child = Child(key=f"{task.id}:{task.attempts}", task=task, lease=task.lease,
                      server=server, spawned_mono=mono, timeout_s=limits[0],
                      memory_mb=limits[1], cpu_s=limits[2],
                      type_limits=tuple(config.type_limits(task.type)))
        self.table[child.key] = child
        if child.hosted:
            server.hosting += 1  # finish() counts it out
        unset = (RELAY_ENV,) if not child.hosted and self.isolated(task) else ()
        try:
            child.report_fd, child.output_fd = server.spawn(
                child.key, spec_for(task, config, now, limits, cgroup_dir, unset), start_by)
        except OSError as exc:
            what = "the model-call relay" if child.hosted else "the fork server"
            log.error("could not reach %s: %s", what, exc)
            if not child.hosted:  # a relay's send error says so itself (Channel.flush);
                server.exited = True  # its socketpair failing (EMFILE) must not retire it
            child.stop = (Outcome.INTERRUPTED, f"could not reach {what}: {exc}")
            self.finish(child, mono)
            return child
        self.selector.register(child.report_fd, selectors.EVENT_READ, ("report", child))
        if child.output_fd >= 0:  # a hosted attempt has none
            self.selector.register(child.output_fd, selectors.EVENT_READ, ("output", child))
        if child.deadline_mono is not None:
            self.at(child.deadline_mono, child)
        return child

    def isolated(self, task: Task) -> bool:
        """Whether the task's attempts run apart from the model-call relay (ISOLATE_AFTER)."""
        return task.relay_losses >= ISOLATE_AFTER

    def _lost_with_relay(self, child: Child) -> str:
        """Mark a started hosted attempt whose relay ended without its outcome (its
        outcome's write counts it on the task's row); the reason its attempt gives."""
        child.relay_lost = True
        n = child.task.relay_losses + 1
        reason = ("the model-call relay ended without an outcome for it (it died or was "
                  "killed); the attempt is given back")
        if n >= ISOLATE_AFTER:
            reason += (f". The relay ended {n} times while hosting this task, so its next "
                       f"attempts run in a task process of their own that calls the model "
                       f"directly")
            log.warning("task %s: the model-call relay ended %d times while hosting its "
                        "attempts; its next attempts run in a task process of their own",
                        child.task.id, n, extra={"task_id": child.task.id})
        return reason

    def give_back(self, task: Task, server: "ForkServer", mono: float, reason: str) -> None:
        """Record a claimed attempt as interrupted without starting it."""
        timeout_s, memory_mb, cpu_s = limits_of(task, self.config)
        child = Child(key=f"{task.id}:{task.attempts}", task=task, lease=task.lease,
                      server=server, spawned_mono=mono, timeout_s=timeout_s,
                      memory_mb=memory_mb, cpu_s=cpu_s, stop=(Outcome.INTERRUPTED, reason))
        self.table[child.key] = child
        self.finish(child, mono)

    def on_server_event(self, server: "ForkServer", msg: dict, mono: float) -> None:
        op = msg["op"]
        if op == "spawned":
            child = self.table.get(msg["key"])
            if child is None or child.pid is not None or child.server is not server:
                return
            child.pid = msg["pid"]
            child.forked_mono = mono
            self.by_pid[child.pid] = child
            self.pending_pids.append(child)  # its start time is read when it is written
            if child.memory_mb:
                self.watchdog.watch(child)
            if child.stop is not None:  # stopped before its pid was known
                proctree.kill_tree(child.pid)
            else:
                self.at(mono + self.config.supervisor.boot_timeout_s, child)
        elif op == "exited":
            child = self.by_pid.get(msg["pid"])
            if child is not None and child.status is None:
                child.status = msg["status"]
                child.rusage = msg
                self.finish(child, mono)
        elif op == "spawn_failed":
            child = self.table.get(msg["key"])
            if child is not None and child.pid is None:
                fenced = msg["error"].startswith("fenced")
                child.stop = (Outcome.LOST if fenced else Outcome.INTERRUPTED,
                              f"could not start: {msg['error']}")
                self.finish(child, mono)
        elif op == "fenced":
            for child in self:
                if child.server is server and child.stop is None and child.status is None and child.final is None:
                    child.stop = (Outcome.LOST, "fenced: the supervisor did not renew its lease "
                                  "in time (it was stopped, swapped out or its database writes "
                                  "stalled), so the fork server killed the task before the lease "
                                  "could pass to another supervisor")

    def server_died(self, server: "ForkServer", mono: float) -> int:
        """Its task processes die with it: their attempts are given back. How many."""
        orphans = [c for c in self if c.server is server and c.status is None]
        for child in orphans:
            if child.stop is None:
                child.stop = (Outcome.INTERRUPTED, "its fork server died; the attempt is given back")
            if child.eof or child.pid is None:
                self.finish(child, mono)
        return len(orphans)

    # -- reports and output --------------------------------------------------------------

    def on_report(self, child: Child, mono: float) -> None:
        """Read what the report socket holds and act on each whole line."""
        if child.report_fd < 0:
            return
        limit = 2 * self.config.supervisor.max_result_bytes + wire.REPORT_LINE_SLACK
        while True:
            try:
                data = os.read(child.report_fd, REPORT_READ)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ECONNRESET and the like: the channel is gone
                log.debug("report channel of %s: %s", child.key, exc)
                data = b""
            if not data:
                child.eof = True
                self.close_report(child)
                if child.hosted:  # the relay closes it once the attempt has ended
                    # What it said first (a refusal, the fence) comes before this end.
                    for msg in child.server.events():
                        self.on_server_event(child.server, msg, mono)
                    self.finish(child, mono)
                break
            child.buf += data
            if len(child.buf) > limit and child.buf.find(b"\n") < 0:
                self.broke_protocol(child, f"a report line over {limit} bytes", mono)
                return
            self._lines(child, mono)
            if child.report_fd < 0:
                return

    def _lines(self, child: Child, mono: float) -> None:
        buf = child.buf
        start = 0
        while child.report_fd >= 0:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = bytes(buf[start:nl])
            start = nl + 1
            try:
                msg = wire.parse_report(line)
            except wire.ProtocolError as exc:
                self.broke_protocol(child, str(exc), mono)
                return
            handler = REPORT_HANDLERS[msg["kind"]]
            error = handler(self, child, msg, mono)
            if error:
                self.broke_protocol(child, error, mono)
                return
        del buf[:start]

    def _ready(self, child: Child, msg: dict, mono: float) -> str | None:
        child.ready = True
        self.emit("ready", task_id=child.task.id, pid=child.pid)
        return None

    def _progress(self, child: Child, msg: dict, mono: float) -> str | None:
        child.progress = (msg.get("fraction"), msg.get("message"))
        child.heartbeat_mono = mono
        self.progressed[child.key] = child
        return None

    def _heartbeat(self, child: Child, msg: dict, mono: float) -> str | None:
        child.heartbeat_mono = mono
        return None

    def _spend(self, child: Child, msg: dict, mono: float) -> str | None:
        child.spent_tokens = (child.spent_tokens or 0) + msg["tokens"]
        return None

    def _stream(self, child: Child, msg: dict, mono: float) -> str | None:
        self.output.on_stream(child.key, child.lease, msg["text"], mono)
        return None

    def _final(self, child: Child, msg: dict, mono: float) -> str | None:
        if child.final is not None:
            return f"a second outcome ({msg['kind']} after {child.final['kind']})"
        child.final = msg
        if not child.hosted and not child.released:  # a relay ends the attempt itself
            self.on_output(child)  # what it wrote so far, while the pipe is still watched
            self.release(child, mono)
        return None

    def release(self, child: Child, mono: float) -> None:
        """Its outcome is in: it holds no slot (busy) and must exit within
        EXIT_AFTER_FINAL_S. Nothing more is due on its channels before its exit: they leave
        the selector and are read at its reap (finish), not at the end of file each one
        reaches as it exits (a pass of its own)."""
        child.released = True
        self.released += 1
        if child.kill_at_mono is None:
            child.kill_at_mono = mono + EXIT_AFTER_FINAL_S
            self.at(child.kill_at_mono, child)
        for fd in (child.report_fd, child.output_fd):
            if fd >= 0:
                self.selector.unregister(fd)

    def _checkpoint(self, child: Child, msg: dict, mono: float) -> str | None:
        """ctx.checkpoint: written in the pass's transaction (supervisor.checkpointing),
        answered after its commit; a state over max_result_bytes is refused."""
        state, limit = msg["state"], self.config.supervisor.max_result_bytes
        size = len(state.encode())
        if size > limit:
            self.ack(child, msg["seq"], f"the checkpoint state is {size} bytes, over the "
                     f"{limit}-byte limit ([supervisor] max_result_bytes)")
            return None
        try:
            json.loads(state)
        except ValueError:
            return "a checkpoint state that is not JSON text"
        child.checkpoints.append((msg["seq"], state))
        self.checkpointing[child.key] = child
        return None

    def broke_protocol(self, child: Child, why: str, mono: float) -> None:
        """The task wrote something wire.py does not declare: end its attempt as crashed."""
        child.final = None
        if child.stop is None:
            log.warning("task %s broke the report protocol: %s", child.key, why,
                        extra={"task_id": child.task.id, "task_type": child.task.type})
            self.stop(child, Outcome.CRASHED, f"the task broke the report protocol ({why}); "
                      "only taskvisor's own TaskContext may write to the report channel", mono, 0)
        self.close_report(child)

    def close_report(self, child: Child) -> None:
        if child.report_fd >= 0:
            self._close_channel(child, child.report_fd)
            child.report_fd = -1

    def close_output(self, child: Child) -> None:
        if child.output_fd >= 0:
            self._close_channel(child, child.output_fd)
            child.output_fd = -1

    def _close_channel(self, child: Child, fd: int) -> None:
        if not child.released:  # release() took its channels out of the selector already
            self.selector.unregister(fd)
        os.close(fd)

    def ack(self, child: Child, seq: int, error: str | None = None) -> None:
        """Answer a request line after the commit (`send_acks`)."""
        child.acks.append((seq, error))
        self.acking.append(child)

    def send_acks(self) -> None:
        for child in self.acking:
            for seq, error in child.acks:
                if child.report_fd >= 0:
                    try:  # a few bytes on a socket the task is blocked reading: never blocks
                        os.write(child.report_fd, wire.encode_ack(seq, error))
                    except OSError:
                        pass
            child.acks.clear()
        self.acking.clear()

    def on_output(self, child: Child) -> None:
        """Read the task's stdout/stderr into its attempt's log (supervisor.output keeps
        the tail, max_log_bytes)."""
        while child.output_fd >= 0:
            try:
                data = os.read(child.output_fd, REPORT_READ)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.close_output(child)
                return
            self.output.on_log(child.key, child.lease, data, self.clock.monotonic())

    # -- limits, timers, stopping ----------------------------------------------------------

    def at(self, when: float, child: Child) -> None:
        """Look at `child` again at monotonic time `when` (boot deadline, time limit, KILL
        after TERM): a heap entry, so no pass walks the whole table."""
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, child))

    def next_timer(self) -> float | None:
        timers = self._timers
        while timers and timers[0][2].key not in self.table:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def check_timers(self, mono: float) -> None:
        boot_timeout_s = self.config.supervisor.boot_timeout_s
        timers = self._timers
        while timers and timers[0][0] <= mono:
            _, _, child = heapq.heappop(timers)
            if child.key not in self.table or child.status is not None:
                continue
            if child.kill_at_mono is not None and mono >= child.kill_at_mono:
                if child.released and child.stop is None and child.pid and not child.overdue:
                    child.overdue = True  # said once; the KILL is repeated until its reap
                    log.warning("task %s reported its outcome %.0fs ago and has not exited; "
                                "killing its process (the outcome stands)", child.key,
                                EXIT_AFTER_FINAL_S, extra={"task_id": child.task.id})
                if child.pid:
                    proctree.kill_tree(child.pid)
                elif child.hosted and child.server.pid:
                    # It did not end when asked: its coroutine is stuck, and only the
                    # relay's death ends it for sure (its other attempts are given back).
                    log.error("the model-call relay did not end attempt %s within %.1fs of "
                              "being asked; killing the relay", child.key,
                              mono - child.kill_at_mono + 1.0)
                    child.server.kill()
                child.kill_at_mono = mono + 1.0  # keep at it until the process is reaped
                self.at(child.kill_at_mono, child)
            if child.stop is not None:
                continue
            if (not child.ready and child.forked_mono is not None
                    and mono - child.forked_mono >= boot_timeout_s):
                self.stop(child, Outcome.CRASHED, f"did not become ready within "
                          f"{boot_timeout_s:g}s of its fork", mono, grace=0)
            elif child.deadline_mono is not None and mono >= child.deadline_mono:
                self.stop(child, Outcome.TIMEOUT, f"ran past its {child.timeout_s:g}s time limit",
                          mono, grace=self.config.supervisor.kill_grace_s)

    def sample_memory(self) -> None:
        """One watchdog tick: measure a bounded batch of the tasks with a memory limit."""
        for child, rss in self.watchdog.tick():
            child.peak_rss = max(child.peak_rss, rss)
            if child.memory_mb and rss > child.memory_mb * MIB and child.stop is None:
                self.stop(child, Outcome.MEMORY_LIMIT, f"used {rss / MIB:.0f} MiB (process "
                          f"tree RSS), over its {child.memory_mb} MiB limit",
                          self.clock.monotonic(), grace=0)

    def stop(self, child: Child, outcome: Outcome, reason: str, mono: float, grace: float) -> None:
        """End an attempt on the supervisor's decision: TERM now, KILL after `grace`."""
        child.stop = (outcome, reason)
        if child.hosted:
            child.server.cancel(child.key)
        elif child.pid and child.status is None:  # once reaped, its pid may name another process
            if grace <= 0:
                proctree.kill_tree(child.pid)
            else:
                proctree.terminate(child.pid)
        child.kill_at_mono = mono + (grace if grace > 0 else 1.0)
        self.at(child.kill_at_mono, child)
        log.info("stopping %s attempt (%s): %s", child.task.type, outcome, reason,
                 extra={"task_id": child.task.id, "task_type": child.task.type})

    def stop_all(self, outcome: Outcome, reason: str, mono: float, grace: float) -> None:
        for child in self:
            if child.stop is None and child.status is None:
                self.stop(child, outcome, reason, mono, grace)

    # -- the end of an attempt -------------------------------------------------------------

    def reap(self, helpers, mono: float) -> None:
        """waitpid our own children: the helpers (fork servers, the model-call relay: each
        is handed its wait status by `reaped`), and task processes re-parented to us (we
        are their subreaper) after their fork server died."""
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for helper in helpers:
                if helper.pid == pid:
                    helper.reaped(status)
            child = self.by_pid.get(pid)
            if child is not None and child.status is None:
                child.status = status
                child.rusage = {"utime": ru.ru_utime, "stime": ru.ru_stime, "maxrss_kb": ru.ru_maxrss}
                self.finish(child, mono)

    def finish(self, child: Child, mono: float) -> None:
        """The process is gone: read what is left, classify, queue the outcome for writing."""
        if self.table.get(child.key) is not child or child.ending:
            return
        child.ending = True
        self.on_report(child, mono)
        self.close_report(child)
        if child.output_fd >= 0:
            self.on_output(child)
            self.close_output(child)  # a descendant may still hold the pipe: stop listening
        del self.table[child.key]
        if not self.table:
            self.emptied_at = mono
        if child.released:
            self.released -= 1
        if child.hosted:
            child.server.hosting -= 1
        self.output.end(child.key)
        self.progressed.pop(child.key, None)
        if child.pid is not None:
            self.by_pid.pop(child.pid, None)
            self.watchdog.forget(child)
            proctree.kill_group(child.pid)  # what it left in its process group dies with it
        self.orphans_due = True
        fenced = self.fence_mono is not None and mono >= self.fence_mono
        if (child.stop is None and child.final is None and fenced
                and child.status is not None and os.WIFSIGNALED(child.status)
                and os.WTERMSIG(child.status) == signal.SIGKILL):
            child.stop = (Outcome.LOST, "fenced: killed by its fork server when the lease was "
                          "not renewed in time")
        if child.hosted and child.stop is None and child.final is None:
            if fenced:
                child.stop = (Outcome.LOST, "fenced: ended by the model-call relay when the "
                              "lease was not renewed in time")
            elif child.started:
                child.stop = (Outcome.INTERRUPTED, self._lost_with_relay(child))
            else:
                child.stop = (Outcome.INTERRUPTED, "the model-call relay ended before the "
                              "attempt started; the attempt is given back")
        end = classify(child, mono)
        self.pending.append((child, end))
        level = logging.INFO if end.outcome in (Outcome.SUCCEEDED, Outcome.RESCHEDULED) else logging.WARNING
        log.log(level, "%s attempt %d ended %s: %s", child.task.type, child.lease.attempt,
                end.outcome, end.reason,
                extra={"task_id": child.task.id, "task_type": child.task.type,
                       "attempt": child.lease.attempt, "outcome": str(end.outcome), "pid": child.pid})
        self.emit("finished", task=child.task, end=end, child=child)

    def is_known(self, pid: int) -> bool:
        return pid in self.by_pid


REPORT_HANDLERS = {
    wire.READY: Children._ready,
    wire.PROGRESS: Children._progress,
    wire.HEARTBEAT: Children._heartbeat,
    wire.RESULT: Children._final,
    wire.ERROR: Children._final,
    wire.RETRY: Children._final,
    wire.CANCELLED: Children._final,
    wire.CHECKPOINT: Children._checkpoint,
    wire.SPEND: Children._spend,
    wire.STREAM: Children._stream,
}
assert set(REPORT_HANDLERS) == set(wire.REPORT), "every report kind needs its handler"


def classify(child: Child, mono: float | None = None) -> AttemptEnd:
    """How the attempt ended, from what the supervisor did, what the process said, and
    its exit status (in that order of precedence, except that a reported result wins)."""
    st = child.status
    mono = time.monotonic() if mono is None else mono
    figures = dict(
        # An attempt that never had a process (given back between claim and start, or
        # refused by its fork server) spent nothing: its claim's estimate is refunded.
        spent_tokens=child.spent_tokens if child.started else 0, started=child.started,
        pid=child.pid, ran_in="relay" if child.hosted else "process",
        peak_rss_bytes=max(child.peak_rss, (child.rusage or {}).get("maxrss_kb", 0) * 1024) or None,
        cpu_s=None if not child.rusage else round(child.rusage["utime"] + child.rusage["stime"], 4),
        wall_s=mono - child.spawned_mono,
        exit_code=os.WEXITSTATUS(st) if st is not None and os.WIFEXITED(st) else None,
        signal=proctree.signal_name(os.WTERMSIG(st)) if st is not None and os.WIFSIGNALED(st) else None)
    final = child.final or {}
    kind = final.get("kind")
    if kind == wire.RESULT:
        return AttemptEnd(Outcome.SUCCEEDED, reason="succeeded", result=final["result"],
                          spawn=final.get("spawn") or (), **figures)
    if child.stop is not None:
        outcome, reason = child.stop
        return AttemptEnd(outcome, reason=reason, relay_lost=child.relay_lost, **figures)
    if kind == wire.ERROR:
        error = {k: final.get(k) for k in ("type", "message", "traceback")}
        return AttemptEnd(Outcome(final["outcome"]), reason=f"{final['type']}: {final['message']}",
                          error=error, retryable=final["retryable"], **figures)
    if kind == wire.RETRY:
        pause = final.get("pause_limit") or ()
        pause = (pause,) if isinstance(pause, str) else tuple(k for k in pause if isinstance(k, str))
        # Its own keys (fixed at enqueue) and its type's when it started (ctx.type_limits,
        # what llm.chat pauses after a 429; a reload may have added one since the enqueue).
        own = (*child.task.limit_keys, *child.type_limits)
        if foreign := [k for k in pause if k not in own]:
            # Only limits the task draws from: a typo, or a task that should not, would
            # shut a provider that other tasks use.
            log.warning("task %s (%s): Retry(pause_limit=%s) not applied: the task draws from "
                        "no such limit (its limits: %s)", child.task.id, child.task.type,
                        ", ".join(map(repr, foreign))[:500], ", ".join(own) or "none")
        return AttemptEnd(Outcome.RESCHEDULED, reason=final.get("reason"),
                          delay_s=float(final["delay_s"]),
                          pause_limits=tuple(k for k in pause if k in own)[:16], **figures)
    if kind == wire.CANCELLED:
        return AttemptEnd(Outcome.CANCELLED, reason="cancelled", **figures)
    if st is not None and os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGXCPU:
        return AttemptEnd(Outcome.TIMEOUT, reason=f"the CPU time limit of {child.cpu_s:g}s was "
                          "reached (RLIMIT_CPU sent SIGXCPU)", **figures)
    return AttemptEnd(Outcome.CRASHED, reason=_crash_reason(child, st), **figures)


def _crash_reason(child: Child, st: int | None) -> str:
    when = "" if child.ready else " before it was ready"
    if st is None:
        return f"the task process vanished{when} (its fork server died and the exit status was lost)"
    if os.WIFSIGNALED(st):
        sig = os.WTERMSIG(st)
        name = proctree.signal_name(sig)
        if sig == signal.SIGKILL:
            return (f"killed by SIGKILL{when}, not sent by taskvisor: often the kernel's OOM "
                    "killer (check `dmesg` or `journalctl -k` for 'Out of memory')")
        if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT, signal.SIGFPE):
            return f"crashed with {name}{when} (a fault in native code, or os.abort())"
        return f"killed by {name}{when}"
    code = os.WEXITSTATUS(st)
    if code in codes.EXIT_NAMES:
        return f"exited with code {code}: {codes.EXIT_NAMES[code]}"
    return f"exited with code {code}{when} without reporting an outcome (sys.exit or os._exit in the handler?)"
