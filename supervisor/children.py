"""Running task processes as the supervisor sees them: the fork server handle, one
`Child` record per attempt, and the classification of how each one ended.

Owns starting and stopping the fork server (`python -m workers.zygote`), the spawn
request (a report pipe and a memfd holding the task spec, passed as file descriptors),
reading report messages, `terminate` (TERM to the process group) and `kill` (KILL to the
group and to every descendant psutil finds, since a grandchild that called setsid()
escapes killpg), and turning an exit status plus messages into an `AttemptEnd`. It never
touches the database and never imports user code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

import psutil

from supervisor.store import AttemptEnd, Lease, Outcome, Task
from workers import outcome as proto

MAX_PACKET = 65536


class ForkServerError(Exception):
    """The fork server failed to start; `detail` holds its traceback or exit status."""

    def __init__(self, message: str, detail: str = ""):
        self.detail = detail
        super().__init__(message)


class ForkServer:
    """The supervisor's handle on one fork server process (one generation)."""

    def __init__(self, preload: tuple[str, ...], handlers: dict[str, str], generation: int = 1):
        self.preload = tuple(preload)
        self.handlers = dict(handlers)
        self.generation = generation
        self.pid: int | None = None
        self.sock: socket.socket | None = None
        self.types: list[str] = []
        self.exited = False

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the process and wait until it has imported every preload module.

        Runs in the supervisor's main thread (the parent-death signal is per thread).
        Raises ForkServerError with the import traceback."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        os.set_inheritable(theirs.fileno(), True)
        argv = [sys.executable, "-m", "workers.zygote", "--fd", str(theirs.fileno()),
                "--parent", str(os.getpid())]
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            self.pid = os.posix_spawn(sys.executable, argv, _child_env(),
                                      file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0)])
        finally:
            os.close(devnull)
            theirs.close()
        self.sock = ours
        ours.sendall(json.dumps({"op": "boot", "preload": list(self.preload),
                                 "handlers": self.handlers}).encode())
        ours.settimeout(timeout_s)
        try:
            data = ours.recv(MAX_PACKET)
        except socket.timeout:
            self.kill()
            raise ForkServerError(f"the fork server did not finish importing preload modules "
                                  f"within {timeout_s:g}s")
        if not data:
            status = self.wait()
            raise ForkServerError(f"the fork server exited during start-up ({status})")
        msg = json.loads(data)
        if msg["op"] == "boot_error":
            self.wait()
            raise ForkServerError("a preload module or configured handler failed to import",
                                  msg["error"])
        self.types = msg.get("types", [])
        ours.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def spawn(self, key: str, spec: dict) -> int:
        """Ask for one task process; returns the read end of its report pipe. The pid
        comes later in a "spawned" event."""
        report_r, report_w = os.pipe()
        spec_fd = _spec_file(json.dumps(spec, separators=(",", ":"), ensure_ascii=False).encode())
        try:
            self.sock.setblocking(True)
            socket.send_fds(self.sock, [json.dumps({"op": "spawn", "key": key}).encode()],
                            [report_w, spec_fd])
        except OSError:
            os.close(report_r)
            raise
        finally:
            self.sock.setblocking(False)
            os.close(report_w)
            os.close(spec_fd)
        os.set_blocking(report_r, False)
        return report_r

    def events(self) -> list[dict]:
        """Every message waiting from the fork server; [] when none. Sets `exited` on EOF."""
        out = []
        while self.sock is not None:
            try:
                data = self.sock.recv(MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.exited = True
                break
            if not data:
                self.exited = True
                break
            out.append(json.loads(data))
        return out

    def stop(self) -> None:
        """Ask it to exit once idle; its running task processes keep running."""
        if self.sock is not None:
            try:
                self.sock.setblocking(True)
                self.sock.send(b'{"op":"stop"}')
            except OSError:
                pass

    def kill(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self) -> str:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "already reaped"
        self.exited = True
        return describe_status(status)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _child_env() -> dict:
    env = dict(os.environ)
    # The fork server must find the package even when run from a source checkout.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
    env.pop("WATCHDOG_USEC", None)
    return env


def _spec_file(data: bytes) -> int:
    """An anonymous file holding the spec (any size, unlike a socket packet)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("taskvisor-spec", os.MFD_CLOEXEC)
    else:  # pragma: no cover - not Linux
        import tempfile
        fd, path = tempfile.mkstemp(prefix="taskvisor-spec-")
        os.unlink(path)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@dataclass
class Child:
    """One attempt in flight. `key` is "<task id>:<attempt>"."""
    key: str
    task: Task
    lease: Lease
    report_fd: int
    server: ForkServer
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
    term_mono: float | None = None     # when TERM was sent
    kill_at_mono: float | None = None  # when KILL follows
    peak_rss: int = 0
    status: int | None = None          # wait status, once reaped
    rusage: dict | None = None
    eof: bool = False

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
    if not pid or started_at is None:
        return False
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - started_at) > 0.05:
            return False
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
