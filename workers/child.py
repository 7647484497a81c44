"""The task process: post-fork set-up, one handler call, one reported outcome, os._exit.

Owns everything between the fork server's fork() and the process's end: its own process
group, the parent-death signal, waiting as a spare for a task when it was forked ahead
of one, limits, the report pipe, running a plain or async handler, and turning what
happened into exactly one outcome message. It must never return to the fork server's
loop, never run atexit handlers of the fork server (it leaves with os._exit) and never
write task state anywhere but the pipe.
"""

from __future__ import annotations

import _signal
import _socket
import json
import os
import sys
from _signal import (SIG_BLOCK, SIG_DFL, SIG_UNBLOCK, SIGKILL, SIGTERM, pthread_sigmask,
                     set_wakeup_fd)
from _signal import signal as set_handler
from json.encoder import c_make_encoder, encode_basestring
from os import _exit, close, closerange, dup2, getpid, getppid, read, setpgid, write

from workers import wire
from workers.context import Fail, Retry, TaskCancelled, TaskContext
from workers.limits import LimitError, ResourceLimits, apply
from workers.outcome import EXIT_BOOT_ERROR, EXIT_OK, EXIT_PARENT_GONE
from workers.pdeathsig import set_child_subreaper, set_parent_death_signal, set_process_name
from workers.registry import lookup

SPARE_NAME = b"taskvisor-spare"  # /proc/PID/comm of a spare waiting for its task

# Every page a task process writes to is copied from the fork server first (a page
# fault each), and Python writes to every object it touches. So the path from fork
# to exit calls C functions directly where the Python wrappers do extra work: `_signal`'s
# functions, not `signal`'s (which turn each return value into an enum, a fault per
# object touched), and json's C encoder, not json.dumps (which builds an encoder per call). It
# uses names imported into this module rather than `os.x`: an attribute of a module is
# looked up through its type's attribute cache, whose entries the fork server never
# filled, so each first lookup in a task process writes one (dozens of faults a task).
_TERM = (SIGTERM,)
_READY = b'{"kind":"%s","pid":%%d}\n' % wire.READY.encode()
_RESULT = b'{"kind":"%s","result":%%s}\n' % wire.RESULT.encode()
QUICKEN_CALLS = 10  # CPython 3.11 specialises a function at its eighth call (warm_up)
_RESET = (_signal.SIGCHLD, _signal.SIGINT, _signal.SIGHUP)
_FDS_SPACE = _socket.CMSG_SPACE(3 * 4)  # a spare's task: up to 3 descriptors


def _not_json(obj):
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _result_encoder():
    """obj -> compact JSON text, as json.dumps(obj, separators=(",", ":"),
    ensure_ascii=False, allow_nan=False) makes it."""
    if c_make_encoder is None:  # a Python without the _json accelerator
        return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                                allow_nan=False).encode
    make = c_make_encoder

    def encode(obj) -> str:
        if isinstance(obj, str):
            return encode_basestring(obj)
        # markers (a dict) catch circular references; allow_nan=False
        return "".join(make({}, _not_json, encode_basestring, None, ":", ",",
                            False, False, False)(obj, 0))
    return encode


_encode_result = _result_encoder()


class Reporter:
    """Writes report lines (workers.wire) on the attempt's report socket, blocking, whole
    lines; `request` also waits for the supervisor's answer on the same socket."""

    def __init__(self, fd: int):
        self.fd = fd
        self.seq = 0
        self.pending = b""  # bytes read past an answer line (never more than one answer)

    def send(self, kind: str, **fields) -> None:
        self.write(wire.encode_report(kind, fields))

    def write(self, data: bytes) -> None:
        """Write one whole, newline-terminated message."""
        fd = self.fd
        if fd < 0:  # a process the handler forked: the channel is its parent's
            raise OSError("the report channel belongs to the task process, not to a process it forked")
        while data:
            data = data[write(fd, data):]

    def request(self, kind: str, **fields) -> None:
        """Send a request (a kind in wire.REQUESTS) and block until the supervisor has
        acted on it; raises RuntimeError with the supervisor's reason when it refused."""
        self.seq += 1
        seq = self.seq
        self.send(kind, seq=seq, **fields)
        buf = self.pending
        while True:
            nl = buf.find(b"\n")
            if nl >= 0:
                line, buf = buf[:nl], buf[nl + 1:]
                got, error = wire.parse_ack(line)
                if got == seq:
                    self.pending = buf
                    if error is not None:
                        raise RuntimeError(error)
                    return
                continue
            data = read(self.fd, 4096)
            if not data:
                raise OSError("the supervisor closed the report channel")
            buf += data

    def detach(self) -> None:
        """In a process forked by the handler: close our copy of the channel, so that
        neither its writes nor its lifetime touch the task's report."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                close(fd)
            except OSError:
                pass


_current: list = [None]  # this task process's Reporter, once it runs its handler


def detach_after_fork() -> None:
    """Registered once by the fork server with os.register_at_fork(after_in_child=...),
    so every task process inherits it (registering per task cost page faults):
    in a process forked by a handler it closes that process's copy of the report channel;
    in a task process just forked by the fork server there is no Reporter yet."""
    reporter = _current[0]
    if reporter is not None:
        _current[0] = None
        reporter.detach()


def warm_up() -> None:
    """Called by the fork server once it has preloaded: run, and throw away the results of,
    the parts of a task process's path that touch nothing outside this process (the
    TaskContext, Reporter and ResourceLimits it builds, applying no limits, the ready and
    result lines into a pipe, the handler lookup, the parent-death call, the flush of
    stdout and stderr at exit), QUICKEN_CALLS times. Two reasons, both page faults in
    every task: a lookup that misses the types' attribute cache writes its entry, and
    CPython 3.11 counts the calls of a function in its code object until the eighth,
    when it specialises it, so code the fork server never ran is written to by each task
    process that runs it. (The parent-death call is harmless here: the fork server has
    this parent-death signal already.)"""
    r, w = os.pipe()
    try:
        reporter = Reporter(w)
        for _ in range(QUICKEN_CALLS):
            ctx = TaskContext(id="", type="", attempt=1, max_attempts=1, deadline_at=None,
                              reporter=reporter, config=None, log_settings=(False, "INFO"))
            apply(ResourceLimits.from_dict({}))  # none: nothing to apply
            reporter.write(_READY % 0)
            lookup("")
            ctx.close_output()
            send_result(reporter, None, 1 << 20)
            send_result(reporter, {"k": [1, 2.5, "v", None, True]}, 1 << 20)
            set_parent_death_signal(SIGKILL)
            sys.stdout.flush()
            sys.stderr.flush()
            read(r, 1 << 16)
    finally:
        close(r)
        close(w)


def run(spec: dict | bytes | int, report_fd: int, log_fd: int, parent_pid: int,
        keep_fds: tuple[int, ...] = ()) -> None:
    """Entry point in the forked child; never returns. `spec` is the spec (parsed by the
    fork server before the fork: that costs the task process fewer page faults), its JSON
    text, or a descriptor to read it from (a memfd, for a spec too big for one packet).
    `report_fd` (the report socket) and `log_fd` (the write end of the attempt's output
    pipe, or -1) must be close-on-exec already."""
    code = EXIT_BOOT_ERROR
    try:
        keep = (report_fd, log_fd, spec) if isinstance(spec, int) else (report_fd, log_fd)
        prepare(parent_pid, keep_fds=keep + keep_fds if keep_fds else keep)
        code = start(spec, report_fd, log_fd)
    except BaseException:  # set-up failed: say so on stderr, exit with the boot code
        _print_exc()
    finally:
        _leave(code)


def run_spare(sock_fd: int, parent_pid: int, name: bytes = b"python") -> None:
    """Entry point of a spare: a task process forked before its task is known. It does
    the set-up that needs no spec, then waits on `sock_fd` for one message from the fork
    server: the spec (or nothing, and a memfd with it), the report socket and the output
    pipe. It becomes
    that task's process, named `name` again; end of file (the fork server stops) makes
    it leave quietly. Never returns."""
    code = EXIT_BOOT_ERROR
    try:
        prepare(parent_pid, keep_fds=(sock_fd,))
        set_process_name(SPARE_NAME)
        # While it waits, a TERM ends it (the fork server forks another): held back
        # until the handler ran, a stray TERM would cancel the next task instead.
        set_handler(SIGTERM, SIG_DFL)
        pthread_sigmask(SIG_UNBLOCK, _TERM)
        sock = _socket.socket(fileno=sock_fd)
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(wire.MAX_PACKET, _FDS_SPACE)
        finally:
            sock.close()
        fds = wire.received_fds(ancillary)
        pthread_sigmask(SIG_BLOCK, _TERM)
        if len(fds) < 2:
            code = EXIT_PARENT_GONE  # not a task: the fork server is stopping
            return
        set_process_name(name)
        for fd in fds:
            os.set_inheritable(fd, False)  # the handler's subprocesses must not hold them
        code = start(fds[2] if len(fds) > 2 else data, fds[0], fds[1])
    except BaseException:
        _print_exc()
    finally:
        _leave(code)


def prepare(parent_pid: int, keep_fds: tuple[int, ...] = ()) -> None:
    """The set-up that needs no spec, right after fork: its own process group, the
    parent-death signal, the fork server's signal handling undone, other descriptors
    closed. Raises on failure; exits at once if the fork server is already gone."""
    # A TERM (timeout, cancel, shutdown) that arrives during set-up waits until the
    # handler runs inside its try block, where it becomes TaskCancelled.
    pthread_sigmask(SIG_BLOCK, _TERM)
    setpgid(0, 0)
    set_parent_death_signal(SIGKILL)
    # Orphans of the task's own subprocesses (a helper that double-forks and calls
    # setsid()) are re-parented here, not to the supervisor: the watchdog's walk of this
    # process's tree then counts their memory against the task's limit.
    set_child_subreaper()
    if getppid() != parent_pid:
        _exit(EXIT_PARENT_GONE)
    _reset_signals()
    _close_fds_except(keep_fds)


def start(spec: dict | bytes | int, report_fd: int, log_fd: int) -> int:
    """Route stdout and stderr to the attempt's output pipe, read the spec, apply its
    limits, report ready, run the handler; the exit code. Runs after `prepare`; raises
    if set-up fails before the handler."""
    if log_fd >= 0:  # inheritable copies: the handler's subprocesses write there too
        dup2(log_fd, 1)
        dup2(log_fd, 2)
        close(log_fd)
    if isinstance(spec, int):
        data = _read_all(spec)
        close(spec)
        spec = data
    if not isinstance(spec, dict):
        spec = json.loads(spec)
    for name in spec.get("unset_env") or ():  # e.g. the relay, for an isolated attempt
        os.environ.pop(name, None)
    reporter = Reporter(report_fd)
    task = spec["task"]
    log_settings = (spec.get("log_format") == "json", spec.get("log_level", "INFO"))
    tasklog = sys.modules.get("workers.tasklog")
    if tasklog is not None:  # the fork server set logging up (a preload module uses it)
        tasklog.for_task(*log_settings, task["id"], task["type"])
    try:
        apply(ResourceLimits.from_dict(spec.get("limits") or {}))
    except LimitError as exc:
        reporter.send(wire.ERROR, type="LimitError", message=str(exc), traceback="",
                      retryable=False, outcome="crashed")
        return EXIT_BOOT_ERROR
    reporter.write(_READY % getpid())
    return _run_handler(spec, reporter, log_settings)


def _print_exc() -> None:
    try:
        import traceback
        traceback.print_exc()
    except BaseException:
        pass


def _format_exc(limit: int) -> str:
    """The current exception's traceback. traceback (with linecache and tokenize) is
    imported here, on the error path, and not into the fork server that every fork copies."""
    import traceback
    return traceback.format_exc(limit=limit)


def _leave(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    _exit(code)


def _run_handler(spec: dict, reporter: Reporter, log_settings: tuple[bool, str]) -> int:
    task = spec["task"]
    ctx = TaskContext(id=task["id"], type=task["type"], attempt=task["attempt"],
                      max_attempts=task["max_attempts"], deadline_at=spec.get("deadline_at"),
                      reporter=reporter, config=spec.get("config"), log_settings=log_settings,
                      context=spec.get("context"), known_type=_known_type,
                      max_state_bytes=spec.get("max_result_bytes", 1 << 20),
                      limit_keys=spec.get("limit_keys") or (),
                      type_limits=spec.get("type_limits") or ())

    def on_term(signum, frame):
        ctx.cancelled = True
        raise TaskCancelled()

    set_handler(SIGTERM, on_term)
    # A process the handler forks (os.fork, multiprocessing) gets no copy of the report
    # channel: what it writes, and how long it lives, cannot touch this attempt's report
    # (the fork server registered detach_after_fork; see there).
    _current[0] = reporter
    handler = lookup(task["type"])
    try:
        pthread_sigmask(SIG_UNBLOCK, _TERM)
        if handler is None:
            reporter.send(
                wire.ERROR, type="UnknownTaskType", traceback="", retryable=False,
                outcome="error",
                message=(f"no handler for task type {task['type']!r}: register one with "
                         f"@task({task['type']!r}) in a module listed in [supervisor] preload, "
                         f"or set [types.\"{task['type']}\"] handler = \"module:function\""))
            return EXIT_OK
        try:
            result = handler(task["payload"], ctx)
            if result is not None and hasattr(type(result), "__await__"):  # inspect.isawaitable
                import asyncio  # not at the top: with ssl it is MiBs that every fork would copy
                result = asyncio.run(_await(result))
        finally:
            ctx.close_output()  # streamed output goes out before the outcome
        send_result(reporter, result, spec.get("max_result_bytes", 1 << 20), ctx.spawned)
    except TaskCancelled:
        set_handler(SIGTERM, SIG_DFL)
        reporter.send(wire.CANCELLED)
    except SystemExit as exc:  # the handler called sys.exit(n): honour n, skip atexit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        os._exit(code)
    except BaseException as exc:
        send_failure(reporter, exc)
    return EXIT_OK


def send_failure(reporter: Reporter, exc: BaseException) -> None:
    """The outcome line for what a handler raised (call it in the except block: the
    traceback is the current exception's): Retry, TaskCancelled, MemoryError, else an
    error, whose outcome and retry decision a Fail chooses (any other: retryable)."""
    if isinstance(exc, Retry):
        reporter.send(wire.RETRY, delay_s=exc.delay_s, reason=exc.reason,
                      pause_limit=exc.pause_limit)
    elif isinstance(exc, TaskCancelled):
        reporter.send(wire.CANCELLED)
    elif isinstance(exc, MemoryError):
        reporter.send(wire.ERROR, type="MemoryError", message="the task ran out of memory "
                      "(its memory limit, RLIMIT_DATA, refused an allocation)",
                      traceback=_format_exc(20), retryable=True,
                      outcome="memory_limit")
    else:
        chosen = isinstance(exc, Fail)
        reporter.send(wire.ERROR, type=type(exc).__qualname__[:300], message=str(exc)[:4000],
                      traceback=_format_exc(50)[-16000:],
                      retryable=exc.retryable if chosen else True,
                      outcome=exc.outcome if chosen else "error")


async def _await(awaitable):
    return await awaitable


def _known_type(name: str) -> bool:
    return lookup(name) is not None


def send_result(reporter: Reporter, result, limit: int, spawned: list | None = None) -> None:
    """The outcome line of a handler's return value: its JSON text, or an error when it is not
    JSON or over `limit` bytes."""
    try:
        text = "null" if result is None else _encode_result(result)
    except (TypeError, ValueError, RecursionError) as exc:
        reporter.send(wire.ERROR, type="ResultNotJSON", retryable=False, outcome="error",
                      traceback="", message=f"the handler returned a value that is not JSON "
                      f"serialisable ({exc}); return dicts, lists, strings, numbers, None")
        return
    size = len(text.encode())
    if size > limit:
        reporter.send(wire.ERROR, type="ResultTooLarge", retryable=False, outcome="error",
                      traceback="", message=f"the result is {size} bytes, over the "
                      f"{limit}-byte limit ([supervisor] max_result_bytes); store large output "
                      "in a file and return its path")
        return
    if spawned:  # ctx.spawn requests ride on the result: stored with the success only
        reporter.send(wire.RESULT, result=text, spawn=spawned)
        return
    # One dumps, not two: the line is {"kind":"result","result":<the text as a string>}.
    reporter.write(_RESULT % encode_basestring(text).encode())


def _reset_signals() -> None:
    """Undo the fork server's signal set-up (SIGPIPE stays ignored, as Python sets it)."""
    try:
        set_wakeup_fd(-1)
    except ValueError:
        pass
    for sig in _RESET:
        set_handler(sig, SIG_DFL)


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        data = os.read(fd, 1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _close_fds_except(keep: tuple[int, ...]) -> None:
    """Close every descriptor from 3 up but those in `keep` (the fork server's socket above
    all, so its death is seen); os.closerange uses the close_range system call where there
    is one. No set and no generator: each allocation here can cost a task process a page
    fault (with them: 14 more in a child that runs only this, 3 more at pool 4)."""
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            closerange(low, fd)
            low = fd + 1
    closerange(low, 1 << 16)
