"""What this machine lets one supervisor run at once: descriptors and processes.

Owns raising the supervisor's own open-files soft limit to its hard limit at start, and
the check that `pool_size` fits what the machine allows (each task in flight holds two
descriptors in the supervisor, its report socket and its output pipe, and at least one
process), with a message that says what to raise. Runs before the fork server starts;
never forks, never touches the database.
"""

from __future__ import annotations

import os
import resource

FDS_PER_TASK = 2   # the report socket and the output pipe, held by the supervisor
FDS_SPARE = 256    # the database, HTTP clients, fork servers, logs
PROCS_SPARE = 64   # the supervisor, fork servers, threads, other processes of the user
# Task processes that reported their outcome and are exiting hold no slot (the next task
# starts meanwhile): at most min(pool_size, EXITING_MAX) of them, with their descriptors.
EXITING_MAX = 64


def raise_open_files() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def problems(pool_size: int) -> list[str]:
    """Why `pool_size` tasks cannot run at once here (empty: they can)."""
    out = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    tasks = pool_size + min(pool_size, EXITING_MAX)
    need = tasks * FDS_PER_TASK + FDS_SPARE
    if soft != resource.RLIM_INFINITY and need > soft:
        most = (soft - FDS_SPARE) // FDS_PER_TASK
        most -= min((most + 1) // 2, EXITING_MAX)
        # Below FDS_SPARE + 2 no pool_size fits: "at most 1" sent people to a value
        # refused with the same advice.
        lower = f"lower pool_size to at most {most}, or " if most >= 1 else ""
        out.append(f"pool_size = {pool_size} needs about {need} open files in the supervisor, "
                   f"but its limit is {soft} (hard limit {hard}): {lower}raise the limit to "
                   f"at least {need} (LimitNOFILE= in the systemd unit, `ulimit -n` in a shell)")
    procs = tasks + PROCS_SPARE
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    if os.geteuid() != 0 and nproc != resource.RLIM_INFINITY and procs > nproc:
        out.append(f"pool_size = {pool_size} needs at least {procs} processes, but "
                   f"RLIMIT_NPROC is {nproc}: lower pool_size or raise it (LimitNPROC= in "
                   "the systemd unit, `ulimit -u` in a shell)")
    for path, what in (("/proc/sys/kernel/pid_max", "kernel.pid_max"),
                       ("/proc/sys/kernel/threads-max", "kernel.threads-max")):
        limit = _read_int(path)
        if limit is not None and procs > limit // 2:
            out.append(f"pool_size = {pool_size} needs at least {procs} processes, more than "
                       f"half of {what} ({limit}): lower pool_size or raise {what} with sysctl")
    return out


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
