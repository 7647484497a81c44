"""Retention: deleting finished tasks older than `[supervisor] retain_finished`.

Owns the pace of the background prune: one small batch per step (finished tasks with
their attempts and dependency rows, and schedule fires, older than the horizon; the
state of limit keys idle for a day), the
batch size adapted so a step holds the write lock for about TARGET_S, and the next step
soon while a backlog remains, else a minute later. It never blocks the loop for long
and never writes SQL itself (`Store.prune_batch` does).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("taskvisor.retention")
TARGET_S = 0.002          # aim for a batch this long (the write lock is held meanwhile)
BACKLOG_PAUSE_S = 0.05    # between batches while old rows remain
IDLE_PAUSE_S = 60.0       # after a batch that found less than it could take
MIN_BATCH, MAX_BATCH = 10, 500


class Retention:
    def __init__(self) -> None:
        self.due_mono = 0.0
        self.batch = 50
        self.deleted = 0
        self.last_batch_s = 0.0   # the duration of the latest batch (for tests and status)
        self.longest_batch_s = 0.0

    def step(self, store, retain_s: float | None, now: float, mono: float, limits=None) -> int:
        """Delete one batch if due; returns how many tasks went. Raises StoreError."""
        if mono < self.due_mono:
            return 0
        if retain_s is None:  # "forever"
            self.due_mono = mono + IDLE_PAUSE_S
            return 0
        started = time.perf_counter()
        n = store.prune_batch(now - retain_s, self.batch, now, limits)
        took = time.perf_counter() - started
        self.last_batch_s = took
        self.longest_batch_s = max(self.longest_batch_s, took)
        self.deleted += n
        full = n >= self.batch
        if full and took < TARGET_S / 2:
            self.batch = min(MAX_BATCH, self.batch * 2)
        elif took > TARGET_S:
            self.batch = max(MIN_BATCH, self.batch // 2)
        # A short horizon (tests, "1m") is checked more often than once a minute.
        self.due_mono = mono + (BACKLOG_PAUSE_S if full else
                                min(IDLE_PAUSE_S, max(BACKLOG_PAUSE_S, retain_s / 4)))
        if n:
            log.debug("retention deleted %d finished task(s) in %.1f ms", n, took * 1000)
        return n
