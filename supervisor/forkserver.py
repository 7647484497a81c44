"""The fork servers, seen from the supervisor: the process handle and its generations.

Owns starting a fork server (`python -m workers.zygote`, a fresh interpreter that
imports the preload modules), the spawn request (the report pipe passed as a file
descriptor, the task spec in the same packet, or in a memfd when it is too big for one,
so a spec of any size crosses), its events, and the generations: the current server,
the retiring ones that keep running their tasks after a reload, and the restart backoff
after a crash. It never imports user code and never touches the database.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

from supervisor.children import describe_status
from workers import outcome as proto

MAX_PACKET = proto.MAX_PACKET
INLINE_SPEC_MAX = 60000  # bytes: under MAX_PACKET with room for the header line; bigger: a memfd
# One encoder for every spec (json.dumps with arguments builds one per call).
_encode_spec = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class ForkServerError(Exception):
    """The fork server failed to start; `detail` holds its traceback or exit status."""

    def __init__(self, message: str, detail: str = ""):
        self.detail = detail
        super().__init__(message)


class ForkServer:
    """The supervisor's handle on one fork server process (one generation)."""

    def __init__(self, preload: tuple[str, ...], handlers: dict[str, str], generation: int = 1,
                 log_format: str = "text", log_level: str = "INFO"):
        self.log_format = log_format
        self.log_level = log_level
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
                                 "handlers": self.handlers, "log_format": self.log_format,
                                 "log_level": self.log_level}).encode())
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
        head = b"spawn " + key.encode()
        body = _encode_spec(spec).encode()
        report_r, report_w = os.pipe()
        fds = [report_w]
        if len(body) <= INLINE_SPEC_MAX:
            packet = head + b"\n" + body
        else:
            packet = head
            fds.append(_spec_file(body))
        try:
            try:  # the socket stays non-blocking: the packet nearly always fits at once
                socket.send_fds(self.sock, [packet], fds)
            except BlockingIOError:
                self.sock.setblocking(True)
                try:
                    socket.send_fds(self.sock, [packet], fds)
                finally:
                    self.sock.setblocking(False)
        except OSError:
            os.close(report_r)
            raise
        finally:
            for fd in fds:
                os.close(fd)
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
            out.append(parse_event(data))
        return out

    def stop(self) -> None:
        """Ask it to exit once idle; its running task processes keep running."""
        if self.sock is not None:
            try:
                self.sock.setblocking(True)
                self.sock.send(b"stop")
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


def parse_event(data: bytes) -> dict:
    """One per-task message of the fork server (a text line, see workers.zygote) as a dict
    with its "op"; anything else is taken as JSON."""
    op, _, rest = data.partition(b" ")
    if op == b"exited":
        pid, status, utime, stime, maxrss = rest.split()
        return {"op": "exited", "pid": int(pid), "status": int(status), "utime": float(utime),
                "stime": float(stime), "maxrss_kb": int(maxrss)}
    if op == b"spawned":
        key, pid = rest.split()
        return {"op": "spawned", "key": key.decode(), "pid": int(pid)}
    if op == b"spawn_failed":
        key, _, error = rest.partition(b" ")
        return {"op": "spawn_failed", "key": key.decode(), "error": error.decode(errors="replace")}
    return json.loads(data)


def _child_env() -> dict:
    env = dict(os.environ)
    # The fork server must find the package even when run from a source checkout.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
    env.pop("WATCHDOG_USEC", None)
    # Bind every symbol of the interpreter and of the preloaded extension modules when
    # they load, in the fork server: with lazy binding each task process resolved its
    # own first calls (a write to a shared page, and a symbol search, per function).
    # The fork server takes it out of its environment at once (workers.zygote.main), so
    # task processes and the programs they run do not inherit it.
    if "LD_BIND_NOW" not in env:  # the operator's own setting is left as it is
        env["LD_BIND_NOW"] = "1"
        env["TASKVISOR_UNSET_LD_BIND_NOW"] = "1"
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



RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10, 30, 60)
STABLE_S = 60.0  # a fork server up this long before dying resets the backoff


class ForkServers:
    """The current fork server, the retiring ones, and when to restart a dead current one."""

    def __init__(self, first: ForkServer):
        self.current = first
        self.retiring: list[ForkServer] = []
        self.restarts = 0
        self.restart_at: float | None = None
        self.current_since_mono = time.monotonic()

    def all(self) -> list[ForkServer]:
        return [self.current, *self.retiring]

    def launch(self, config) -> ForkServer:
        """Start the next generation (raises ForkServerError); the caller installs it."""
        return launch(config, generation=self.current.generation + 1)

    def take_due_restart(self, mono: float) -> bool:
        """True (and counted) when a scheduled restart is due now."""
        if self.restart_at is None or mono < self.restart_at:
            return False
        self.restart_at = None
        self.restarts += 1
        return True

    def replace(self, new: ForkServer) -> None:
        """`new` takes the new tasks; the old one exits once its tasks have ended."""
        old, self.current = self.current, new
        self.current_since_mono = time.monotonic()
        if not old.exited:
            old.stop()
            self.retiring.append(old)

    def schedule_restart(self, mono: float, *, died: bool) -> float:
        """Back off by the number of restarts so far; returns the delay in seconds.
        `died`: the current one just died (not: a restart of it failed)."""
        if died and mono - self.current_since_mono > STABLE_S:
            self.restarts = 0  # it had been fine for a while: not a crash loop
        delay = RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]
        self.restart_at = mono + delay
        return delay


def launch(config, generation: int = 1) -> ForkServer:
    """A started fork server for `config`'s preload, handlers and logging (raises
    ForkServerError with the preload's traceback)."""
    server = ForkServer(config.supervisor.preload, handlers_of(config), generation=generation,
                        log_format=config.log.format, log_level=config.log.level)
    server.start(timeout_s=max(60.0, config.supervisor.boot_timeout_s))
    return server


def handlers_of(config) -> dict[str, str]:
    """The `[types."x"] handler = "module:function"` entries the fork server imports."""
    return {name: t.handler for name, t in config.types.items() if t.handler}
