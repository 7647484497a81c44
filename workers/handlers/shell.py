"""`shell`: run one command as a task, keeping the tails of its output.

Payload: {"argv": ["prog", "arg", ...]} (no shell), or {"cmd": "a | b", "shell": true}
(a `cmd` without shell=true is split like a shell would, but never run by one); optional
"cwd", "env" (additions; a null value removes a variable) and "input" (text for stdin).
Result: {exit_code, stdout_tail, stderr_tail, duration_s} with the last ~4 KiB of each
stream, decoded with errors="replace". A non-zero exit raises `CommandFailed` (outcome
error, retried by the policy) with the tail in its message; a command that cannot be
started is a `Fail` (not retried). The command runs in the task's process group, so the
supervisor's TERM/KILL on a timeout or cancel reaches it; the time limit is the task's.
Runs in task processes only.
"""

from __future__ import annotations

import os
import selectors
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import Any

from workers import task
from workers.handlers import Fail

TAIL_BYTES = 4096
PROGRESS_EVERY_S = 1.0


class CommandFailed(Exception):
    """The command exited non-zero or was killed by a signal (retryable)."""


def command_line(payload: Mapping[str, Any]) -> tuple[list[str] | str, bool]:
    """(argv or shell string, use_shell) from a payload; raises Fail on a bad payload."""
    if not isinstance(payload, Mapping):
        raise Fail("shell payload must be a JSON object")
    argv, cmd, use_shell = payload.get("argv"), payload.get("cmd"), bool(payload.get("shell"))
    if (argv is None) == (cmd is None):
        raise Fail('shell payload needs exactly one of "argv" (a list of strings) or "cmd" '
                   '(a string; add "shell": true to run it through /bin/sh)')
    if argv is not None:
        if use_shell or not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise Fail('"argv" must be a non-empty list of strings, without "shell" '
                       '(use "cmd" with "shell": true for a shell command line)')
        return argv, False
    if not isinstance(cmd, str) or not cmd.strip():
        raise Fail('"cmd" must be a non-empty string')
    if use_shell:
        return cmd, True
    try:
        return shlex.split(cmd), False
    except ValueError as exc:
        raise Fail(f'cannot split "cmd" into arguments ({exc}); pass "argv" instead') from None


def environment(additions: Any) -> dict[str, str]:
    env = dict(os.environ)
    if additions is None:
        return env
    if not isinstance(additions, Mapping):
        raise Fail('"env" must be an object of NAME: "value" additions')
    for name, value in additions.items():
        if value is None:
            env.pop(name, None)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            env[str(name)] = str(value)
        else:
            raise Fail(f'"env" value for {name} must be a string (or null to remove it)')
    return env


class Tail:
    """The last `limit` bytes written to it, plus the total count."""

    def __init__(self, limit: int = TAIL_BYTES):
        self.limit = limit
        self.buf = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        self.buf += data
        if len(self.buf) > 2 * self.limit:
            del self.buf[:-self.limit]

    def text(self) -> str:
        return bytes(self.buf[-self.limit:]).decode("utf-8", errors="replace")

    def last_line(self) -> str:
        lines = bytes(self.buf[-512:]).decode("utf-8", errors="replace").strip().splitlines()
        return lines[-1][-200:] if lines else ""


@task("shell")
def shell(payload: Mapping[str, Any], ctx: Any = None) -> dict:
    """The `shell` handler. See the module docstring."""
    args, use_shell = command_line(payload)
    env = environment(payload.get("env"))
    cwd = payload.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise Fail('"cwd" must be a path string')
    text_in = payload.get("input")
    if text_in is not None and not isinstance(text_in, str):
        raise Fail('"input" must be a string')
    started = time.monotonic()
    try:
        # No start_new_session: the command stays in the task's process group, which the
        # supervisor signals on a timeout or cancel (and kills, grandchildren included).
        proc = subprocess.Popen(args, shell=use_shell, cwd=cwd, env=env,
                                stdin=subprocess.PIPE if text_in is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError as exc:
        what = "working directory" if cwd and not os.path.isdir(cwd) else "command"
        raise Fail(f"{what} not found: {exc.filename or args}") from None
    except (PermissionError, NotADirectoryError, OSError) as exc:
        raise Fail(f"cannot start {args!r}: {exc}") from None
    try:
        out, err = _collect(proc, text_in, ctx)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # cancelled or failed while it ran: never leave it behind
            proc.kill()
            proc.wait()
    duration = round(time.monotonic() - started, 3)
    if code != 0:
        raise CommandFailed(_failure(args, code, out, err))
    return {"exit_code": code, "stdout_tail": out.text(), "stderr_tail": err.text(),
            "duration_s": duration}


def _collect(proc: subprocess.Popen, text_in: str | None, ctx: Any) -> tuple[Tail, Tail]:
    """Read both pipes until EOF (so neither fills up), reporting the last line of stdout."""
    if text_in is not None:
        threading.Thread(target=_feed, args=(proc.stdin, text_in.encode()), daemon=True).start()
    out, err = Tail(), Tail()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    progress_mono = time.monotonic()
    with sel:
        while sel.get_map():
            for key, _ in sel.select(timeout=PROGRESS_EVERY_S):
                data = os.read(key.fd, 65536)
                if data:
                    key.data.add(data)
                else:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
            now = time.monotonic()
            if ctx is not None and now - progress_mono >= PROGRESS_EVERY_S:
                progress_mono = now
                line = out.last_line() or err.last_line()
                ctx.progress(None, line or f"running ({out.total + err.total} bytes of output)")
    return out, err


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except OSError:  # the command exited without reading it all
        pass


def _failure(args, code: int, out: Tail, err: Tail) -> str:
    name = args if isinstance(args, str) else shlex.join(args)
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    tail = (err.text() or out.text()).strip()[-1500:]
    return f"{name[:300]} {how}" + (f"; output ends with:\n{tail}" if tail else " (no output)")
