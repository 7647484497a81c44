"""Running task processes as the supervisor sees them: one `Child` record per attempt,
and the classification of how each one ended.

Owns reading report messages, `terminate` (TERM to the process group) and `kill` (KILL to the
group and to every descendant psutil finds, since a grandchild that called setsid()
escapes killpg), a task process's start time (`start_time`, the number `kill_leftover`
compares), and turning an exit status plus messages into an `AttemptEnd`. It never
touches the database and never imports user code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import TYPE_CHECKING
from dataclasses import dataclass, field

import psutil

from supervisor.store import AttemptEnd, Lease, Outcome, Task
from workers import outcome as proto

if TYPE_CHECKING:
    from supervisor.forkserver import ForkServer

@dataclass
class Child:
    """One attempt in flight. `key` is "<task id>:<attempt>"."""
    key: str
    task: Task
    lease: Lease
    report_fd: int
    server: "ForkServer"
    spawned_mono: float
    timeout_s: float | None
    memory_mb: int | None
    cpu_s: float | None
    pid: int | None = None
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

    @classmethod
    def for_task(cls, task: Task, config, server, now: float, mono: float,
                 cgroup_dir: str | None = None) -> tuple["Child", dict]:
        """The record of a new attempt and the spec its process reads: limits resolved
        from the task, else its type, else [defaults]."""
        timeout_s = task.timeout_s or config.setting(task.type, "timeout_s")
        memory_mb = task.memory_mb or config.setting(task.type, "memory_mb")
        cpu_s = task.cpu_s or config.setting(task.type, "cpu_s")
        spec = {
            "task": {"id": task.id, "type": task.type, "payload": task.payload,
                     "attempt": task.attempts, "max_attempts": task.max_attempts},
            "deadline_at": now + timeout_s if timeout_s else None,
            "limits": {"memory_mb": memory_mb, "cpu_s": cpu_s,
                       "open_files": config.setting(task.type, "open_files"),
                       "cgroup_dir": cgroup_dir},
            "max_result_bytes": config.supervisor.max_result_bytes,
            "log_format": config.log.format, "log_level": config.log.level,
            # What built-in handlers read as ctx.config: llm.chat's base_url, model,
            # api_key_env and timeouts. Never a secret: the key stays in the environment.
            "config": _handler_config(config),
        }
        child = cls(key=f"{task.id}:{task.attempts}", task=task, lease=task.lease, report_fd=-1,
                    server=server, spawned_mono=mono, timeout_s=timeout_s, memory_mb=memory_mb,
                    cpu_s=cpu_s)
        return child, spec

    @property
    def deadline_mono(self) -> float | None:
        return None if self.timeout_s is None else self.spawned_mono + self.timeout_s

    def read(self) -> list[dict]:
        """Read what the pipe holds (non-blocking); return complete messages."""
        while not self.eof:
            try:
                data = os.read(self.report_fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                self.eof = True
                break
            self.buf += data
        msgs = []
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(self.buf[:nl])
            del self.buf[:nl + 1]
            try:
                msgs.append(json.loads(line))
            except ValueError:
                continue
        return msgs

    def close(self) -> None:
        if self.report_fd >= 0:
            os.close(self.report_fd)
            self.report_fd = -1


def terminate(child: Child) -> None:
    """SIGTERM to the task's process group."""
    if child.pid:
        _signal_group(child.pid, signal.SIGTERM)


def kill(child: Child) -> None:
    """SIGKILL to the process group and to every descendant (setsid() escapees too)."""
    if not child.pid:
        return
    try:
        descendants = psutil.Process(child.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    _signal_group(child.pid, signal.SIGKILL)
    for proc in descendants:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:  # not yet its own group leader (killed before setpgid): the process alone
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_leftover(pid: int | None, started_at: float | None) -> bool:
    """Kill a task process from an earlier supervisor life, but only if `pid` still names
    the same process (same start time), so a reused pid is never hit. True if killed."""
    if not pid or not is_same_process(pid, started_at):
        return False
    try:
        proc = psutil.Process(pid)
        procs = proc.children(recursive=True) + [proc]
    except psutil.Error:
        return False
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=2)
    return True


def is_same_process(pid: int, started_at: float | None) -> bool:
    """`pid` still names the process that started at `started_at` (start_time's clock,
    to within a clock tick and the boot time's rounding), not a later one that reused it."""
    now_started = None if started_at is None else start_time(pid)
    return now_started is not None and abs(now_started - started_at) <= 0.05


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_boot: list[float] = [0.0, -1e9]  # [boot time (epoch s), when it was read (monotonic)]


def start_time(pid: int) -> float | None:
    """The process's start time as psutil's `Process(pid).create_time()` gives it (what
    `kill_leftover` compares), from one read of /proc/<pid>/stat: boot time plus the
    starttime field over clock ticks. psutil re-reads the boot time and the stat file
    twice per call; this keeps the boot time for 10 s. None when the process is gone."""
    try:  # os.open and os.read: a third of the cost of open() and its buffered reader
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return None
    except OSError:
        try:  # not Linux
            return psutil.Process(pid).create_time()
        except psutil.Error:
            return None
    mono = time.monotonic()
    if mono - _boot[1] > 10.0:
        _boot[:] = [psutil.boot_time(), mono]
    # Fields after the command name in parentheses (which may hold spaces): starttime
    # is field 22 of the line, the 20th after the ")".
    ticks = int(data[data.rfind(b")") + 2:].split()[19])
    return ticks / _CLOCK_TICKS + _boot[0]


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal_name(os.WTERMSIG(status))}"
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)}"
    return f"wait status {status}"


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def classify(child: Child) -> AttemptEnd:
    """How the attempt ended, from what the supervisor did, what the process said, and
    its exit status (in that order of precedence, except that a reported result wins)."""
    st = child.status
    figures = dict(
        pid=child.pid, peak_rss_bytes=max(child.peak_rss, (child.rusage or {}).get("maxrss_kb", 0) * 1024) or None,
        cpu_s=None if not child.rusage else round(child.rusage["utime"] + child.rusage["stime"], 4),
        wall_s=time.monotonic() - child.spawned_mono,
        exit_code=os.WEXITSTATUS(st) if st is not None and os.WIFEXITED(st) else None,
        signal=signal_name(os.WTERMSIG(st)) if st is not None and os.WIFSIGNALED(st) else None)
    final = child.final or {}
    kind = final.get("kind")
    if kind == proto.RESULT:
        return AttemptEnd(Outcome.SUCCEEDED, reason="succeeded", result=final["result"], **figures)
    if child.stop is not None:
        outcome, reason = child.stop
        return AttemptEnd(outcome, reason=reason, **figures)
    if kind == proto.ERROR:
        out = Outcome(final.get("outcome") or "error")
        error = {k: final.get(k) for k in ("type", "message", "traceback")}
        return AttemptEnd(out, reason=f"{final.get('type')}: {final.get('message')}", error=error,
                          retryable=bool(final.get("retryable", True)), **figures)
    if kind == proto.RETRY:
        return AttemptEnd(Outcome.RESCHEDULED, reason=final.get("reason"),
                          delay_s=float(final.get("delay_s") or 0), **figures)
    if kind == proto.CANCELLED:
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
        name = signal_name(sig)
        if sig == signal.SIGKILL:
            return (f"killed by SIGKILL{when}, not sent by taskvisor: often the kernel's OOM "
                    "killer (check `dmesg` or `journalctl -k` for 'Out of memory')")
        if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT, signal.SIGFPE):
            return f"crashed with {name}{when} (a fault in native code, or os.abort())"
        return f"killed by {name}{when}"
    code = os.WEXITSTATUS(st)
    if code in proto.EXIT_NAMES:
        return f"exited with code {code}: {proto.EXIT_NAMES[code]}"
    return f"exited with code {code}{when} without reporting an outcome (sys.exit or os._exit in the handler?)"


_handler_configs: list = [None, {}]  # [the config it was built from, the dict]


def _handler_config(config) -> dict:
    """ctx.config of built-in handlers, built once per config rather than per spawn (the
    spec is serialised at once, so one dict serves every task)."""
    if _handler_configs[0] is not config:
        _handler_configs[:] = [config, {"llm": dataclasses.asdict(config.llm)}]
    return _handler_configs[1]


def kill_orphans(known: set[int]) -> None:
    """KILL every child of this process not in `known`, with its descendants: as the
    child subreaper the supervisor inherits what a finished task left behind in another
    process group or session (a grandchild that called setsid())."""
    for pid in _child_pids():
        if pid in known:
            continue
        try:
            proc = psutil.Process(pid)
            tree = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
        for p in tree:
            try:
                p.kill()
            except psutil.Error:
                pass


def _child_pids() -> set[int]:
    """Pids of this process's children: /proc/self/task/*/children (tens of microseconds),
    read for every thread, since an orphan may be handed to any of them."""
    pids: set[int] = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            fd = os.open(f"/proc/self/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
            try:
                pids.update(map(int, os.read(fd, 1 << 16).split()))
            finally:
                os.close(fd)
    except OSError:
        try:
            pids = {p.pid for p in psutil.Process().children()}
        except psutil.Error:
            pass
    return pids


def kill_group(pgid: int) -> None:
    """SIGKILL whatever is left in a process group (nothing happens when it is empty)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
