"""The task process: post-fork set-up, one handler call, one reported outcome, os._exit.

Owns everything between the fork server's fork() and the process's end: its own process
group, the parent-death signal, limits, the report pipe, running a plain or async
handler, and turning what happened into exactly one outcome message. It must never
return to the fork server's loop, never run atexit handlers of the fork server (it
leaves with os._exit) and never write task state anywhere but the pipe.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import sys
import traceback

from workers import outcome as proto
from workers import registry
from workers.context import Retry, TaskCancelled, TaskContext
from workers.limits import LimitError, Limits, apply
from workers.pdeathsig import set_parent_death_signal

log = logging.getLogger("taskvisor.task")


class Reporter:
    """Writes newline-delimited JSON messages on the report pipe (blocking, whole lines)."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, kind: str, **fields) -> None:
        line = json.dumps({"kind": kind, **fields}, separators=(",", ":"),
                          ensure_ascii=False, default=str) + "\n"
        data = line.encode()
        while data:
            data = data[os.write(self.fd, data):]


def run(spec_fd: int, report_fd: int, parent_pid: int, keep_fds: tuple[int, ...] = ()) -> None:
    """Entry point in the forked child; never returns."""
    code = proto.EXIT_BOOT_ERROR
    try:
        os.setpgid(0, 0)
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent_pid:
            os._exit(proto.EXIT_PARENT_GONE)
        _reset_signals()
        os.set_inheritable(report_fd, False)
        _close_fds_except({0, 1, 2, spec_fd, report_fd, *keep_fds})
        with os.fdopen(spec_fd, "rb", closefd=True) as f:
            spec = json.loads(f.read())
        reporter = Reporter(report_fd)
        _setup_logging(spec)
        try:
            apply(Limits.from_dict(spec.get("limits") or {}))
        except LimitError as exc:
            reporter.send(proto.ERROR, type="LimitError", message=str(exc), traceback="",
                          retryable=False, outcome="crashed")
            os._exit(proto.EXIT_BOOT_ERROR)
        reporter.send(proto.READY, pid=os.getpid())
        code = _run_handler(spec, reporter)
    except BaseException:  # set-up failed: say so on stderr, exit with the boot code
        try:
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code)


def _run_handler(spec: dict, reporter: Reporter) -> int:
    task = spec["task"]
    ctx = TaskContext(id=task["id"], type=task["type"], attempt=task["attempt"],
                      max_attempts=task["max_attempts"], deadline_at=spec.get("deadline_at"),
                      reporter=reporter)

    def on_term(signum, frame):
        ctx.cancelled = True
        raise TaskCancelled()

    signal.signal(signal.SIGTERM, on_term)
    handler = registry.lookup(task["type"])
    try:
        if handler is None:
            reporter.send(
                proto.ERROR, type="UnknownTaskType", traceback="", retryable=False,
                outcome="error",
                message=(f"no handler for task type {task['type']!r}: register one with "
                         f"@task({task['type']!r}) in a module listed in [supervisor] preload, "
                         f"or set [types.\"{task['type']}\"] handler = \"module:function\""))
            return proto.EXIT_OK
        result = handler(task["payload"], ctx)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        _send_result(reporter, result, spec.get("max_result_bytes", 1 << 20))
    except Retry as exc:
        reporter.send(proto.RETRY, delay_s=exc.delay_s, reason=exc.reason)
    except TaskCancelled:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        reporter.send(proto.CANCELLED)
    except SystemExit as exc:  # the handler called sys.exit(n): honour n, skip atexit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        os._exit(code)
    except MemoryError:
        reporter.send(proto.ERROR, type="MemoryError", message="the task ran out of memory "
                      "(its memory limit, RLIMIT_DATA, refused an allocation)",
                      traceback=traceback.format_exc(limit=20), retryable=True,
                      outcome="memory_limit")
    except BaseException as exc:
        reporter.send(proto.ERROR, type=type(exc).__qualname__, message=str(exc)[:4000],
                      traceback=traceback.format_exc(limit=50)[-16000:], retryable=True,
                      outcome="error")
    return proto.EXIT_OK


async def _await(awaitable):
    return await awaitable


def _send_result(reporter: Reporter, result, limit: int) -> None:
    try:
        text = json.dumps(result, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        reporter.send(proto.ERROR, type="ResultNotJSON", retryable=False, outcome="error",
                      traceback="", message=f"the handler returned a value that is not JSON "
                      f"serialisable ({exc}); return dicts, lists, strings, numbers, None")
        return
    size = len(text.encode())
    if size > limit:
        reporter.send(proto.ERROR, type="ResultTooLarge", retryable=False, outcome="error",
                      traceback="", message=f"the result is {size} bytes, over the "
                      f"{limit}-byte limit ([supervisor] max_result_bytes); store large output "
                      "in a file and return its path")
        return
    reporter.send(proto.RESULT, result=text)


def _reset_signals() -> None:
    """Undo the fork server's signal set-up: the handler gets default behaviour."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def _close_fds_except(keep: set[int]) -> None:
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 256))
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


class _TaskFormatter(logging.Formatter):
    def __init__(self, fmt_json: bool):
        super().__init__("%(asctime)s %(levelname)s task=%(task_id)s type=%(task_type)s %(name)s: %(message)s")
        self.fmt_json = fmt_json

    def format(self, record: logging.LogRecord) -> str:
        for key in ("task_id", "task_type"):
            if not hasattr(record, key):
                setattr(record, key, self.task.get(key.removeprefix("task_")))
        if not self.fmt_json:
            return super().format(record)
        out = {"ts": record.created, "level": record.levelname, "logger": record.name,
               "task_id": record.task_id, "type": record.task_type, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _setup_logging(spec: dict) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    fmt = _TaskFormatter(spec.get("log_format") == "json")
    fmt.task = {"id": spec["task"]["id"], "type": spec["task"]["type"]}
    handler.setFormatter(fmt)
    root.addHandler(handler)
    root.setLevel(spec.get("log_level", "INFO"))
