"""/proc readings and process clean-up for inflight_bench.py (Linux only).

Owns what the in-flight benchmark reads about processes: CPU ticks (own and of reaped
children) from /proc/PID/stat, PSS and RSS from /proc/PID/smaps_rollup, a process's
children from /proc/PID/task/*/children, the members of a session; and `Sessions`, the
registry of every process group the benchmark started, killed whole at exit, on Ctrl-C
and on SIGTERM. It never starts a process itself and never reads the task store.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cpu:
    """CPU seconds of one process: its own, and of its children it has reaped."""
    own_s: float
    reaped_s: float

    def __sub__(self, other: "Cpu") -> "Cpu":
        return Cpu(self.own_s - other.own_s, self.reaped_s - other.reaped_s)

    def __add__(self, other: "Cpu") -> "Cpu":
        return Cpu(self.own_s + other.own_s, self.reaped_s + other.reaped_s)


ZERO = Cpu(0.0, 0.0)


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after the last ')'
    return data.rsplit(b")", 1)[1].split()


def cpu(pid: int) -> Cpu | None:
    """utime+stime and cutime+cstime of `pid` (fields 14-17 of /proc/PID/stat)."""
    f = _stat_fields(pid)
    if f is None:
        return None
    return Cpu((int(f[11]) + int(f[12])) * TICK_S, (int(f[13]) + int(f[14])) * TICK_S)


def session_of(pid: int) -> int | None:
    f = _stat_fields(pid)
    return None if f is None else int(f[3])


def session_members(sid: int) -> list[int]:
    """Every live process whose session id is `sid` (a walk of /proc: call it rarely).
    Zombies are left out: they hold no memory, and no signal can end them."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = _stat_fields(int(name))
            if f is not None and int(f[3]) == sid and f[0] != b"Z":
                out.append(int(name))
    return out


def session_cpu(sid: int) -> Cpu:
    """Sum of `cpu()` over the live members of a session."""
    total = ZERO
    for pid in session_members(sid):
        c = cpu(pid)
        if c is not None:
            total = total + c
    return total


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/PID/task/*/children (no walk of /proc)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out.extend(int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except OSError:
            continue
    return out


@dataclass(frozen=True)
class Memory:
    processes: int
    pss_kib: int
    rss_kib: int


def memory(pids: list[int]) -> Memory:
    """PSS and RSS summed over `pids` from smaps_rollup (processes gone meanwhile are skipped)."""
    n = pss = rss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        got = 0
        for line in text.splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1])
                got += 1
            elif line.startswith("Rss:"):
                rss += int(line.split()[1])
                got += 1
        n += got == 2
    return Memory(n, pss, rss)


def kill_session(sid: int, sig: int = signal.SIGKILL) -> int:
    """Signal every member of session `sid`; returns how many were signalled."""
    n = 0
    for pid in session_members(sid):
        try:
            os.kill(pid, sig)
            n += 1
        except (ProcessLookupError, PermissionError):
            pass
    return n


class Sessions:
    """Every process the benchmark starts, each in a session of its own (its pid is the
    session id). `kill_all()` ends each session whole, task processes and pool children
    included (they stay in the session even after their own setpgid), and runs at exit,
    on SIGTERM and on Ctrl-C."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        atexit.register(self.kill_all)
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum, frame) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def add(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """`sig` to the process, wait up to `timeout`, then SIGKILL whatever is left of its session."""
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
                proc.wait(timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        self._end(proc)

    def _end(self, proc: subprocess.Popen) -> None:
        for _ in range(20):  # members may fork while being killed: repeat until none is left
            if kill_session(proc.pid) == 0:
                break
            time.sleep(0.05)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if proc in self.procs:
            self.procs.remove(proc)

    def kill_all(self) -> None:
        for proc in list(self.procs):
            self._end(proc)
