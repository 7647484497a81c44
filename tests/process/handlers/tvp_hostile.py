"""Handlers that attack the supervisor from inside a task: a task that lies on its report
channel, forks and leaves children holding our descriptors, daemonizes memory hogs, or
makes its fork slow (to widen the window between a claim and the task's start). Preloaded
beside tvp_handlers. Nothing here may import taskvisor's supervisor side.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

from tests.process.handlers.tvp_handlers import logged, note_pid
from workers import task

# A fork of the fork server waits here while a file named "slow_fork" exists in its
# working directory (the test's folder): the claim is committed, the task not yet started.
os.register_at_fork(before=lambda: time.sleep(1.0) if os.path.exists("slow_fork") else None)

LIES = {
    "bad_outcome": b'{"kind": "error", "outcome": "nope"}\n',
    "garbage": b"\x00\xff not json at all\n",
    "unknown_kind": b'{"kind": "launch", "target": "moon"}\n',
    "wrong_type": b'{"kind": "progress", "fraction": "lots"}\n',
    "array": b'[1, 2, 3]\n',
    "no_newline_flood": b"x" * (8 * 1024 * 1024),
    "second_outcome": b'{"kind":"result","result":"1"}\n{"kind":"result","result":"2"}\n',
}


@task("h.lie")
def lie(payload, ctx):
    """Write a lie straight onto the report channel, then keep running a while."""
    _write_all(ctx._reporter.fd, LIES[payload["what"]])
    time.sleep(float(payload.get("s", 5)))
    return "should not count"


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass  # the supervisor hung up on us: that is the point


@task("h.done_early")
def done_early(payload, ctx):
    """Report a result straight onto the report channel, then stay: TERM ignored, no
    return. Its slot is free once the result is read; its process must not stay."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _write_all(ctx._reporter.fd, b'{"kind":"result","result":"\\"early\\""}\n')
    time.sleep(float(payload.get("s", 60)))
    return "should not count"


@task("h.fork_leave")
def fork_leave(payload, ctx):
    """Fork (os.fork, or libc's fork behind Python's back) and leave the child running."""
    if payload.get("libc"):
        pid = ctypes.CDLL(None).fork()
    else:
        pid = os.fork()
    if pid == 0:
        try:
            if not payload.get("libc"):
                try:  # the report channel must not be ours any more
                    ctx.heartbeat()
                    os.write(1, b"FORKED CHILD COULD REPORT\n")
                except OSError:
                    pass
            time.sleep(float(payload.get("child_s", 3)))
        finally:
            os._exit(0)
    note_pid(payload, pid)
    return {"child": pid}


@task("h.daemon_hog")
def daemon_hog(payload, ctx):
    """Start helpers that setsid() and double-fork, each touching `mb` MiB, then wait."""
    for _ in range(int(payload.get("helpers", 2))):
        pid = os.fork()
        if pid == 0:
            os.setsid()
            if os.fork() == 0:
                note_pid(payload, os.getpid())
                block = bytearray(int(payload["mb"]) * 1024 * 1024)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                time.sleep(60)
            os._exit(0)
        os.waitpid(pid, 0)
    time.sleep(float(payload.get("s", 10)))
    return "the helpers were not noticed"


task("h.fenced")(logged)  # t.log under this module's name: start/end lines, a sleep


@task("h.daemon_wait")
def daemon_wait(payload, ctx):
    """Start a `sleep 1000` in a session of its own, then wait: a kill -9 of the supervisor
    leaves the helper re-parented to init, found by no process tree."""
    import subprocess
    p = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    note_pid(payload, p.pid)
    with open(os.path.join(payload["dir"], "helper"), "w") as f:
        f.write(str(p.pid))
    time.sleep(float(payload.get("s", 60)))
    return "done"
