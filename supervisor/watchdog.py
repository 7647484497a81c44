"""The RSS watchdog: which running tasks to measure on this tick, and their memory.

Owns measuring the memory of running tasks that have a memory limit (the task process
plus every descendant, so a subprocess, a multiprocessing pool or a helper that
daemonized itself counts against its task: a task process is a child subreaper, so its
tree holds them all) and reading the machine's memory (the default admission budget).
Its cost is bounded per tick, not per task in flight: each tick measures at most `batch`
tasks, in turn. Tasks without a memory limit are not sampled (their peak comes from
wait4). It never sends a signal: the caller decides.
"""

from __future__ import annotations

import collections

import psutil

from supervisor import proctree

SAMPLE_S = 0.25    # a tick
SAMPLE_BATCH = 64  # tasks measured per tick at most (each: a few reads of /proc)


def machine_memory_mb() -> float:
    return psutil.virtual_memory().total / (1024 * 1024)


class Watchdog:
    """Round-robin over the watched tasks (anything with a `pid`); `tick` measures the
    next `batch` of them and returns (task, rss_bytes) for those still alive."""

    def __init__(self, batch: int = SAMPLE_BATCH) -> None:
        self.batch = batch
        self._ring: collections.deque = collections.deque()
        self._watched: set = set()

    def watch(self, item) -> None:
        if item not in self._watched:
            self._watched.add(item)
            self._ring.append(item)

    def forget(self, item) -> None:
        self._watched.discard(item)  # dropped from the ring when its turn comes

    def __len__(self) -> int:
        return len(self._watched)

    def tick(self) -> list[tuple[object, int]]:
        out = []
        for _ in range(min(self.batch, len(self._ring))):
            item = self._ring.popleft()
            if item not in self._watched:
                continue
            self._ring.append(item)
            rss = proctree.rss_bytes(proctree.tree(item.pid))
            if rss is not None:
                out.append((item, rss))
        return out
