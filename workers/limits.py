"""Resource limits of one task process: rlimits, and cgroup v2 memory.max where delegated.

Owns turning a task's limits into `resource.setrlimit` calls (RLIMIT_DATA for memory:
RLIMIT_AS breaks ML libraries that reserve address space; RLIMIT_CPU; RLIMIT_NOFILE;
RLIMIT_CORE = 0), the task's CPU priority (`nice` steps below the fork server's) and,
when the supervisor found a delegated cgroup v2 subtree, moving the process into its own
cgroup with `memory.max`. Runs in the task process after fork and
before user code; it must never raise past `apply` without saying which limit failed.
"""

from __future__ import annotations

import os
from os import nice as _renice

# Names, not resource.x: in a task process each first module-attribute lookup writes a
# page (see workers.child).
from resource import (RLIM_INFINITY, RLIMIT_CORE, RLIMIT_CPU, RLIMIT_DATA, RLIMIT_NOFILE,
                      getrlimit, setrlimit)

MIB = 1024 * 1024


class ResourceLimits:
    """A task's limits, each None when unset. A plain class, not a dataclass: this module
    is loaded in the fork server, and dataclasses imports inspect and ast into it."""

    __slots__ = ("memory_mb", "cpu_s", "open_files", "cgroup_dir", "nice")

    def __init__(self, memory_mb: int | None = None, cpu_s: float | None = None,
                 open_files: int | None = None, cgroup_dir: str | None = None,
                 nice: int | None = None):
        self.memory_mb = memory_mb
        self.cpu_s = cpu_s
        self.open_files = open_files
        self.cgroup_dir = cgroup_dir  # a delegated cgroup v2 folder to create our cgroup in
        self.nice = nice              # steps below the fork server's CPU priority

    @classmethod
    def from_dict(cls, d: dict) -> "ResourceLimits":
        return cls(d.get("memory_mb"), d.get("cpu_s"), d.get("open_files"), d.get("cgroup_dir"),
                   d.get("nice"))


class LimitError(Exception):
    """A limit could not be applied; the message names it."""


def _lower(which: int, name: str, value: int) -> None:
    soft, hard = getrlimit(which)
    if hard != RLIM_INFINITY:
        value = min(value, hard)
    try:
        setrlimit(which, (value, hard if hard != RLIM_INFINITY else value))
    except (ValueError, OSError) as exc:
        raise LimitError(f"cannot set {name} to {value}: {exc}") from exc


def no_core_dumps() -> None:
    """RLIMIT_CORE = 0: a crash must not dump gigabytes. Called once by the fork server,
    whose task processes inherit it (one step less in each of them). Raises LimitError."""
    _lower(RLIMIT_CORE, "RLIMIT_CORE", 0)


def apply(limits: ResourceLimits) -> None:
    """Apply a task's limits to this process, which inherited RLIMIT_CORE = 0 from the
    fork server. Raises LimitError."""
    if limits.memory_mb:
        _lower(RLIMIT_DATA, "RLIMIT_DATA", int(limits.memory_mb) * MIB)
    if limits.cpu_s:
        # Soft limit: SIGXCPU; the hard limit one second later: SIGKILL.
        soft = max(1, int(limits.cpu_s + 0.999))
        try:
            setrlimit(RLIMIT_CPU, (soft, soft + 1))
        except (ValueError, OSError) as exc:
            raise LimitError(f"cannot set RLIMIT_CPU to {soft}s: {exc}") from exc
    if limits.open_files:
        _lower(RLIMIT_NOFILE, "RLIMIT_NOFILE", int(limits.open_files))
    if limits.cgroup_dir and limits.memory_mb:
        join_cgroup(limits.cgroup_dir, limits.memory_mb)
    if limits.nice:
        # Below the supervisor, its fan-out and fork server: on a busy machine the task
        # processes yield the CPU to them (event delivery p99, benchmarks/README.md).
        try:
            _renice(int(limits.nice))
        except OSError as exc:
            raise LimitError(f"cannot lower the CPU priority by nice {limits.nice}: {exc}") from exc


def join_cgroup(parent: str, memory_mb: int) -> str:
    """Create `parent/task-<pid>` with memory.max and move this process into it."""
    path = os.path.join(parent, f"task-{os.getpid()}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "memory.max"), "w") as f:
            f.write(str(int(memory_mb) * MIB))
        with open(os.path.join(path, "memory.swap.max"), "w") as f:
            f.write("0")
    except FileNotFoundError:
        pass  # no swap controller: memory.max alone still holds
    except OSError as exc:
        raise LimitError(f"cannot create cgroup {path}: {exc}") from exc
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write("0")
    except OSError as exc:
        raise LimitError(f"cannot join cgroup {path}: {exc}") from exc
    return path


def delegated_cgroup() -> tuple[str | None, str]:
    """Find a cgroup v2 folder where this process may create child cgroups with the
    memory controller. Returns (folder or None, a sentence saying what was found).

    Called once by the supervisor at start; the folder it returns is `<own>/tasks`.
    """
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None, "no /proc/self/cgroup (not Linux): memory limits use RLIMIT_DATA and the RSS watchdog"
    rel = next((line.split("::", 1)[1] for line in lines if line.startswith("0::")), None)
    if rel is None:
        return None, "cgroup v2 is not mounted: memory limits use RLIMIT_DATA and the RSS watchdog"
    own = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
    try:
        with open(os.path.join(own, "cgroup.controllers")) as f:
            controllers = f.read().split()
    except OSError:
        return None, f"cannot read {own}/cgroup.controllers: memory limits use RLIMIT_DATA and the RSS watchdog"
    if "memory" not in controllers:
        return None, ("the cgroup v2 memory controller is not delegated to this service "
                      "(systemd: Delegate=yes): memory limits use RLIMIT_DATA and the RSS watchdog")
    tasks_dir = os.path.join(own, "tasks")
    try:
        # cgroup v2 lets a folder hand controllers to children only when it holds no
        # process itself: move this process (and so the fork server it starts later)
        # into a leaf of its own first.
        leaf = os.path.join(own, "supervisor")
        os.makedirs(leaf, exist_ok=True)
        with open(os.path.join(leaf, "cgroup.procs"), "w") as f:
            f.write("0")
        os.makedirs(tasks_dir, exist_ok=True)
        with open(os.path.join(own, "cgroup.subtree_control"), "w") as f:
            f.write("+memory")
        with open(os.path.join(tasks_dir, "cgroup.subtree_control"), "w") as f:
            f.write("+memory")
    except OSError as exc:
        return None, (f"cannot enable the memory controller under {own} ({exc.strerror}): "
                      "memory limits use RLIMIT_DATA and the RSS watchdog")
    return tasks_dir, f"cgroup v2 memory.max per task under {tasks_dir}"
