"""The soak tests' task handler, preloaded by the fork server of a real supervisor.

`soak.run` holds a non-blocking `fcntl.flock` on `<dir>/locks/<task id>` for the whole life
of its process (the descriptor is never closed: the kernel drops the lock when the process
dies, and only then), so a second execution of the same task that starts while an earlier
one is still alive finds the lock taken. Every run appends to `<dir>/runs.log` (O_APPEND,
one write per line, so lines of concurrent runs never interleave):

    begin <task id> <attempt> <pid> <start> [OVERLAP]          when it starts
    run   <task id> <attempt> <pid> <start> <end> [OVERLAP]    when its sleep is over

"OVERLAP" means the flock was already held: another run of this task was alive. A run
killed before its end leaves only its "begin" line. Nothing here imports taskvisor's
supervisor side.
"""

from __future__ import annotations

import fcntl
import os
import time

from workers import task

_held: list[int] = []  # lock descriptors, kept open until the process exits


def append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@task("soak.run")
def run(payload, ctx):
    """Sleep `payload["s"]` seconds under the task's flock, logging the run."""
    folder = payload["dir"]
    locks = os.path.join(folder, "locks")
    os.makedirs(locks, exist_ok=True)
    fd = os.open(os.path.join(locks, ctx.id), os.O_RDWR | os.O_CREAT, 0o600)
    _held.append(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        flag = ""
    except BlockingIOError:
        flag = " OVERLAP"
    log = os.path.join(folder, "runs.log")
    start = time.time()
    append(log, f"begin {ctx.id} {ctx.attempt} {os.getpid()} {start:.6f}{flag}")
    time.sleep(float(payload.get("s", 0)))
    append(log, f"run {ctx.id} {ctx.attempt} {os.getpid()} {start:.6f} {time.time():.6f}{flag}")
    return {"attempt": ctx.attempt, "pid": os.getpid()}
