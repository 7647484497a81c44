"""Process trees on this machine: naming, measuring and signalling a task's processes.

Owns the one way each of these is done: a process's start time (`start_time`, which with
the pid names a process for good, so a reused pid is never hit), the tree below a task
process (`tree`: its children files, which hold every descendant because a task process is
a child subreaper), the tree's RSS, TERM to a process group, KILL to a group and to every
descendant (a grandchild that called setsid() escapes killpg), the sweep of orphans
re-parented to the supervisor, the search for the processes a dead supervisor left
behind (its fork server passes the owner marker down in the environment), and starting
the supervisor's helper interpreters (the fork server, the model-call relay) with that
marker, in a process group of their own. It never touches the database and never
decides anything: callers do.
"""

from __future__ import annotations

import os
import signal
import time

import psutil

OWNER_ENV = "TASKVISOR_OWNER"  # set for the fork server; every task process inherits it
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_boot: list[float] = [0.0, -1e9]  # [boot time (epoch s), when it was read (monotonic)]


def helper_env(owner: str | None) -> dict[str, str]:
    """The environment of a helper interpreter the supervisor starts: its own, with the
    owner marker (found by `kill_marked` if the supervisor dies with kill -9), the package
    on PYTHONPATH (a source checkout works too), and no systemd variables (only the
    supervisor talks to systemd)."""
    env = dict(os.environ)
    if owner:
        env[OWNER_ENV] = owner
    else:
        env.pop(OWNER_ENV, None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    return env


def spawn_helper(argv: list[str], env: dict[str, str]) -> int:
    """Start a helper interpreter (argv[0] is the program) in a process group of its own,
    stdin from /dev/null; its pid. Its own group: a signal aimed at the supervisor's group
    (^C or ^Z in a terminal) leaves it running, and the supervisor decides its end."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        return os.posix_spawn(argv[0], argv, env, setpgroup=0,
                              file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0)])
    finally:
        os.close(devnull)


def _read(path: str, size: int = 1 << 16) -> bytes | None:
    """One file of /proc with os.open and os.read (a third of open()'s cost); None when
    it is gone or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def start_time(pid: int) -> float | None:
    """The process's start time as psutil's `Process(pid).create_time()` gives it, from one
    read of /proc/<pid>/stat (the boot time is kept for 10 s). None when it is gone."""
    data = _read(f"/proc/{pid}/stat", 4096)
    if data is None:
        if os.path.isdir("/proc/self"):
            return None
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


def is_same_process(pid: int, started_at: float | None) -> bool:
    """`pid` still names the process that started at `started_at`, not a later one that
    reused it. Within 1.1 s: the kernel's boot time (/proc/stat btime, which every start
    time is counted from) is whole seconds and moves by one when the wall clock is
    adjusted, so two processes can read start times a second apart for the same process.
    (At 0.05 s, two live supervisors took each other for dead and killed each other's
    fork servers.) A pid reused within a second of the first process's start would have
    to wrap around the whole pid space."""
    now_started = None if started_at is None else start_time(pid)
    return now_started is not None and abs(now_started - started_at) <= 1.1


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, read from /proc/<pid>/task/*/children (every thread's)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return _psutil_children(pid, recursive=False)
    out: list[int] = []
    for tid in tids:
        data = _read(f"/proc/{pid}/task/{tid}/children")
        if data:
            out.extend(map(int, data.split()))
    return out


def tree(pid: int) -> list[int]:
    """`pid` and every descendant (children files, breadth first; a few reads for a task
    with no subprocess). Not all of /proc, as psutil's recursive walk reads."""
    out = [pid]
    i = 0
    while i < len(out) and len(out) < 10000:
        out.extend(children_of(out[i]))
        i += 1
    return out


def rss_bytes(pids: list[int]) -> int | None:
    """Summed RSS of `pids` from /proc/<pid>/statm; None when the first one is gone."""
    total = 0
    for n, pid in enumerate(pids):
        data = _read(f"/proc/{pid}/statm", 256)
        if data is None:
            if n == 0:
                return None
            continue
        total += int(data.split()[1]) * _PAGE
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU seconds of `pids` so far (those gone count nothing)."""
    total = 0
    for pid in pids:
        data = _read(f"/proc/{pid}/stat", 4096)
        if data:
            fields = data[data.rfind(b")") + 2:].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    return total / _CLOCK_TICKS


def terminate(pid: int) -> None:
    """SIGTERM to the process group `pid` leads (or the process alone before its setpgid)."""
    _signal_group(pid, signal.SIGTERM)


def kill_tree(pid: int) -> None:
    """SIGKILL to the process group and to every descendant (setsid() escapees too)."""
    descendants = tree(pid)[1:]
    _signal_group(pid, signal.SIGKILL)
    for child in descendants:
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass


def kill_group(pgid: int) -> None:
    """SIGKILL whatever is left in a process group (nothing happens when it is empty)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
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
    """Kill a task process from an earlier supervisor life and its tree, but only if `pid`
    still names the same process (same start time). True if killed."""
    if not pid or not is_same_process(pid, started_at):
        return False
    procs = []
    for member in tree(pid):
        try:
            procs.append(psutil.Process(member))
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=2)
    return True


def kill_marked(owner: str) -> list[int]:
    """KILL every process whose environment carries OWNER_ENV=`owner`: what the fork server
    of a supervisor that died (kill -9) left running, task processes' daemonized helpers
    included (re-parented to init, in their own sessions, found by no tree). Returns the
    pids killed. Reads /proc/*/environ: run it once per dead owner, not per pass."""
    marker = f"{OWNER_ENV}={owner}".encode()
    killed = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        env = _read(f"/proc/{name}/environ", 1 << 20)
        if env and marker in env.split(b"\0"):
            try:
                os.kill(int(name), signal.SIGKILL)
                killed.append(int(name))
            except OSError:
                pass
    return killed


def kill_orphans(is_known) -> None:
    """KILL every child of this process for which `is_known(pid)` is false, with its tree:
    as the child subreaper the supervisor inherits what a finished task left behind (a
    task process's own orphans, once the task process is gone)."""
    for pid in children_of(os.getpid()):
        if is_known(pid):
            continue
        for member in tree(pid):
            try:
                os.kill(member, signal.SIGKILL)
            except OSError:
                pass


def _psutil_children(pid: int, recursive: bool) -> list[int]:
    try:  # not Linux
        return [p.pid for p in psutil.Process(pid).children(recursive=recursive)]
    except psutil.Error:
        return []


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
