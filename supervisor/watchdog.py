"""The RSS watchdog: psutil samples of each task's whole process tree.

Owns measuring memory of running tasks (the task process plus every descendant, so a
subprocess or a multiprocessing pool counts against its task) and naming the ones over
their limit, and reading the machine's memory (the default admission budget). The tree is walked at most once a second per task, and not at all in a task's
first second (a walk reads all of /proc; most tasks are over by then), when only the
task process's own RSS is read; the members' RSS is read at every sample (4+ times a
second). It never sends a signal: the loop decides.
"""

from __future__ import annotations

import os
import time

import psutil

TREE_REFRESH_S = 1.0
TREE_AFTER_S = 1.0  # a task younger than this is measured alone
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def machine_memory_mb() -> float:
    return psutil.virtual_memory().total / (1024 * 1024)


class Watchdog:
    def __init__(self) -> None:
        self._trees: dict[int, tuple[float, list[psutil.Process]]] = {}

    def rss_bytes(self, pid: int, now_mono: float | None = None,
                  started_mono: float | None = None) -> int | None:
        """Total RSS of `pid` and its descendants (of `pid` alone in the first
        TREE_AFTER_S after `started_mono`); None when the process is gone."""
        now_mono = time.monotonic() if now_mono is None else now_mono
        entry = self._trees.get(pid)
        if entry is None and started_mono is not None and now_mono - started_mono < TREE_AFTER_S:
            return _own_rss(pid)
        try:
            if entry is None or now_mono - entry[0] >= TREE_REFRESH_S:
                root = entry[1][0] if entry else psutil.Process(pid)
                entry = (now_mono, [root, *root.children(recursive=True)])
                self._trees[pid] = entry
        except psutil.Error:
            self._trees.pop(pid, None)
            return None
        total = 0
        alive = []
        for proc in entry[1]:
            try:
                total += proc.memory_info().rss
                alive.append(proc)
            except psutil.Error:
                if proc is entry[1][0]:
                    self._trees.pop(pid, None)
                    return None
        if len(alive) != len(entry[1]):
            self._trees[pid] = (entry[0], alive)
        return total

    def forget(self, pid: int) -> None:
        self._trees.pop(pid, None)


def _own_rss(pid: int) -> int | None:
    """RSS of one process from /proc/<pid>/statm (psutil's figure, without a Process)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except FileNotFoundError:
        return None
    except OSError:  # not Linux
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return None
