"""Task handlers for the process tests, preloaded by the fork server of a real supervisor.

Each handler takes `payload["dir"]` (the test's tmp_path) where it may write:
  - `events.log`: "start <id> <time> <pid> <fork server pid>" / "end <id> <time> <pid>"
    lines, appended and
    fsynced, so a test can check ordering and overlap even across a `kill -9`;
  - `pids`: every pid a handler created (its own, its grandchildren), so the test's
    finalizer can kill whatever escaped the process tree.
Nothing here may import taskvisor's supervisor side.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time

from tests.support import pid_alive
from workers import Retry, task


def append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def note_pid(payload: dict, pid: int) -> None:
    if payload.get("dir"):
        append(os.path.join(payload["dir"], "pids"), str(pid))


def mark_start(payload: dict, ctx) -> None:
    """Log the start; first log an "overlap" line if an earlier run of this task that
    never logged its end still has a live process (the at-most-one-at-a-time promise)."""
    path = os.path.join(payload["dir"], "events.log")
    note_pid(payload, os.getpid())
    try:
        with open(path) as f:
            lines = [ln.split() for ln in f if ln.strip()]
    except FileNotFoundError:
        lines = []
    runs: dict[str, bool] = {}
    for parts in lines:
        if len(parts) >= 4 and parts[1] == ctx.id and parts[0] in ("start", "end"):
            runs[parts[3]] = parts[0] == "end"
    for pid, ended in runs.items():
        if not ended and pid_alive(int(pid)):
            append(path, f"overlap {ctx.id} {time.time():.6f} {pid}")
    append(path, f"start {ctx.id} {time.time():.6f} {os.getpid()} {os.getppid()}")


def mark_end(payload: dict, ctx) -> None:
    append(os.path.join(payload["dir"], "events.log"), f"end {ctx.id} {time.time():.6f} {os.getpid()}")


@task("t.ok")
def ok(payload, ctx):
    with open("/proc/self/comm") as f:
        name = f.read().strip()
    return {"echo": payload.get("value"), "pid": os.getpid(), "ppid": os.getppid(),
            "attempt": ctx.attempt, "name": name}


@task("t.limits")
def limits(payload, ctx):
    """The rlimits this process runs under, and its descriptors above stderr with their
    close-on-exec flags (a subprocess of the handler must not inherit the report pipe)."""
    import fcntl
    import resource
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                fds[fd] = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
            except OSError:
                pass  # the listing's own descriptor, closed by now
    return {"core": resource.getrlimit(resource.RLIMIT_CORE),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "data": resource.getrlimit(resource.RLIMIT_DATA)[0],
            "cloexec": sorted(fds.values()), "pid": os.getpid(), "nice": os.nice(0),
            "env": {k: os.environ.get(k) for k in ("LD_BIND_NOW", "TASKVISOR_UNSET_LD_BIND_NOW")}}


@task("t.nice")
def niceness(payload, ctx):
    """This process's nice value and its fork server's (its parent)."""
    return {"nice": os.nice(0), "server": os.getpriority(os.PRIO_PROCESS, os.getppid())}


@task("t.log")
def logged(payload, ctx):
    """Start line, sleep `s` seconds, end line."""
    mark_start(payload, ctx)
    time.sleep(float(payload.get("s", 0)))
    mark_end(payload, ctx)
    return {"pid": os.getpid()}


task("t.conc")(logged)   # the same body under a type with a concurrency cap
task("t.mem")(logged)    # ... and one used for memory admission


@task("t.raise")
def raises(payload, ctx):
    raise ValueError(f"bad input: {payload.get('why', 'on purpose')}")


@task("t.sleep")
def sleeps(payload, ctx):
    """Sleep (a hang), after writing its pid to `pidfile` if given."""
    note_pid(payload, os.getpid())
    if payload.get("dir"):
        mark_start(payload, ctx)
    time.sleep(float(payload.get("s", 1000)))
    if payload.get("dir"):
        mark_end(payload, ctx)
    return "woke"


@task("t.hog")
def hog(payload, ctx):
    """Allocate touched 1 MiB chunks until `mb` is held (or the limit stops it), then hold."""
    chunks = []
    for _ in range(int(payload["mb"])):
        chunks.append(bytearray(b"\x01" * (1 << 20)))
    time.sleep(float(payload.get("hold_s", 30)))
    return len(chunks)


_HOG_CHILD = """
import sys, time
chunks = [bytearray(b"\\x01" * (1 << 20)) for _ in range(int(sys.argv[1]))]
sys.stdout.write("ok\\n"); sys.stdout.flush()
time.sleep(60)
"""


@task("t.hog_tree")
def hog_tree(payload, ctx):
    """Hold memory in `n` grandchildren of `mb` MiB each: each fits the per-process
    RLIMIT_DATA, their sum does not (only the tree-wide RSS watchdog can see it)."""
    procs = []
    for _ in range(int(payload["n"])):
        p = subprocess.Popen([sys.executable, "-c", _HOG_CHILD, str(payload["mb"])],
                             stdout=subprocess.PIPE)
        note_pid(payload, p.pid)
        procs.append(p)
    for p in procs:
        p.stdout.readline()
    time.sleep(60)
    return "not stopped"


@task("t.abort")
def aborts(payload, ctx):
    os.abort()


@task("t.segv")
def segfaults(payload, ctx):
    ctypes.string_at(0)


@task("t.exit")
def exits(payload, ctx):
    sys.exit(int(payload.get("code", 3)))


@task("t.grandchild")
def grandchild(payload, ctx):
    """Start `sleep 1000` (in a new session when `setsid`), write its pid, then hang."""
    p = subprocess.Popen(["sleep", "1000"], start_new_session=bool(payload.get("setsid")))
    note_pid(payload, p.pid)
    append(os.path.join(payload["dir"], "grandchild"), str(p.pid))
    time.sleep(1000)


@task("t.big")
def big(payload, ctx):
    return "x" * int(payload["n"])


@task("t.async")
async def async_ok(payload, ctx):
    await asyncio.sleep(0.01)
    return {"async": True, "value": payload.get("value")}


@task("t.retry")
def retries(payload, ctx):
    """First run: Retry(delay_s). Later runs: succeed. Runs are logged in events.log."""
    mark_start(payload, ctx)
    marker = os.path.join(payload["dir"], f"retried-{ctx.id}")
    if not os.path.exists(marker):
        append(marker, "1")
        mark_end(payload, ctx)
        raise Retry(float(payload.get("delay_s", 0.5)), "busy, come back later")
    mark_end(payload, ctx)
    return {"attempt": ctx.attempt}


@task("t.ignore_term")
def ignore_term(payload, ctx):
    """Ignore SIGTERM: only a KILL stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    note_pid(payload, os.getpid())
    mark_start(payload, ctx)
    time.sleep(float(payload.get("s", 1000)))
    mark_end(payload, ctx)


@task("t.slow_first")
def slow_first(payload, ctx):
    """The first attempt hangs (to be killed from outside); later attempts succeed."""
    mark_start(payload, ctx)
    if ctx.attempt == 1:
        time.sleep(1000)
    mark_end(payload, ctx)
    return {"attempt": ctx.attempt}


@task("t.spin")
def spin(payload, ctx):
    """Burn CPU for up to `s` seconds of wall time."""
    end = time.monotonic() + float(payload.get("s", 30))
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


@task("t.progress")
def progress(payload, ctx):
    """Report progress and log a line through ctx.logger, then wait for `release` to exist."""
    ctx.logger.info("hello from the handler of %s", ctx.id)
    ctx.progress(0.5, "half way")
    release = os.path.join(payload["dir"], "release")
    deadline = time.monotonic() + 30
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
    return "released"


@task("t.daemon")
def daemon(payload, ctx):
    """Leave a `sleep 1000` behind (in a new session when `setsid`) and return at once."""
    p = subprocess.Popen(["sleep", "1000"], start_new_session=bool(payload.get("setsid")))
    note_pid(payload, p.pid)
    append(os.path.join(payload["dir"], "grandchild"), str(p.pid))
    return {"left": p.pid}
