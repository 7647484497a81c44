"""WAL checkpoints off the hot path: a thread with its own connection.

Owns moving pages from the WAL into the database file for a process that commits often
(the supervisor). With SQLite's automatic checkpoint, the commit that crosses 1,000 WAL
pages pays for the checkpoint and its fsync (a stall: benchmarks/README.md); this thread
does the same work every second instead, PASSIVE so it never waits for or blocks a
writer, while the hot connection checkpoints itself only past 10,000 pages. It never
writes task state.
"""

from __future__ import annotations

import logging
import threading

from supervisor.store.connection import Connection

log = logging.getLogger("taskvisor.store")


class Checkpointer:
    def __init__(self, path: str, *, interval_s: float = 1.0, busy_timeout_s: float = 5.0):
        self.path = path
        self.interval_s = interval_s
        self.busy_timeout_s = busy_timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.checkpoints = 0
        self.failures = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="taskvisor-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = None
        while not self._stop.wait(self.interval_s):
            try:
                if conn is None:
                    conn = Connection(self.path, busy_timeout_s=self.busy_timeout_s, create=False)
                conn.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self.checkpoints += 1
            except Exception as exc:  # keep trying: the next pass may succeed
                self.failures += 1
                if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                    log.warning("WAL checkpoint failed (%d times so far): %s", self.failures, exc)
        if conn is not None:
            try:
                conn.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except Exception:
                pass
            conn.close()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
