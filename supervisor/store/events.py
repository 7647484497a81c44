"""The live tables: the event log, streamed output and task logs (migration 0010).

Owns every SQL statement on `task_events`, `task_events_state`, `task_output` and `task_logs`, each
one function taking a `Connection`, the small transactions around them, and `LiveOps`, the
Store methods everything outside the store calls them through. Task events
themselves are written by the triggers of migration 0010, in the transaction of each
change; this module switches them on and off (`subscribe`, `disable_if_idle`), reads
and prunes them. Writes called inside an open write transaction (the supervisor's pass)
join it. It never decides when to prune or how much output a task may keep: the caller
passes ids and limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.store.connection import Connection

EVENT_COLUMNS = "id, kind, task_id, type, workflow, data"


@dataclass(frozen=True)
class Event:
    """One row of the event log; `data` is the JSON text sent to SSE clients."""
    id: int
    kind: str
    task_id: str
    type: str
    workflow: str | None
    data: str


@dataclass(frozen=True)
class LogState:
    enabled: bool
    subscribed_at: float | None
    since_id: int   # the log is complete after this id (it was off before)


# -- the event log -------------------------------------------------------------------------

MARK = "mark"  # a row that only takes an id (see subscribe); never read or sent


def subscribe(conn: Connection, now: float) -> LogState:
    """Switch the event triggers on (if off) and note a subscriber at `now`. When it was
    off, events after `since_id` are complete from here on.

    Switching on after the log was off writes a `mark` row and `since_id` is its id: a
    client that saw the newest event before the log went off holds an id below it and is
    told of the gap (changes made while it was off were never logged). With since_id at
    the newest id itself that client resumed with no gap and missed them silently."""
    with conn.write(savepoint=False) as db:
        enabled, since_id = db.execute(
            "SELECT enabled, since_id FROM task_events_state WHERE id = 1").fetchall()[0]
        if not enabled:
            since_id = db.execute("SELECT coalesce(max(id), 0) FROM task_events").fetchall()[0][0]
            if since_id:  # ids were handed out before: what follows them is incomplete
                db.execute("INSERT INTO task_events (kind, task_id, type, workflow, data) "
                           "VALUES (?, '', '', NULL, '{}')", (MARK,))
                since_id = db.last_insert_rowid()
        db.execute("UPDATE task_events_state SET enabled = 1, subscribed_at = ?, since_id = ? "
                   "WHERE id = 1", (now, since_id))
    return LogState(True, now, since_id)


def disable_if_idle(conn: Connection, now: float, idle_s: float) -> bool:
    """Switch the triggers off when no supervisor noted a subscriber for `idle_s`
    (every supervisor with subscribers refreshes `subscribed_at`). True if switched off."""
    with conn.write(savepoint=False) as db:
        db.execute("UPDATE task_events_state SET enabled = 0 WHERE id = 1 AND enabled = 1 "
                   "AND (subscribed_at IS NULL OR subscribed_at < ?)", (now - idle_s,))
        return db.changes() > 0


def state(conn: Connection) -> LogState:
    with conn.read() as db:
        enabled, at, since_id = db.execute(
            "SELECT enabled, subscribed_at, since_id FROM task_events_state WHERE id = 1").fetchall()[0]
    return LogState(bool(enabled), at, since_id)


def newest_id(conn: Connection) -> int:
    with conn.read() as db:
        return db.execute("SELECT coalesce(max(id), 0) FROM task_events").fetchall()[0][0]


def oldest_id(conn: Connection) -> int:
    with conn.read() as db:
        return _oldest(db)


def _oldest(db) -> int:
    return db.execute("SELECT coalesce(min(id), 0) FROM task_events").fetchall()[0][0]


def read(conn: Connection, after_id: int, limit: int = 1000) -> list[Event]:
    """Events with id > after_id, oldest first, at most `limit` (`mark` rows left out)."""
    with conn.read() as db:
        return _after(db, after_id, limit)


def _after(db, after_id: int, limit: int) -> list[Event]:
    return [Event(*row) for row in db.execute(
        f"SELECT {EVENT_COLUMNS} FROM task_events WHERE id > ? AND kind != '{MARK}' "
        "ORDER BY id LIMIT ?", (after_id, limit))]


def read_kept(conn: Connection, after_id: int, limit: int = 1000) -> tuple[int, list[Event]]:
    """The oldest id kept (0: none) and the events after `after_id`, as `read`, in one
    read transaction: when the oldest id is above after_id + 1, rows after `after_id`
    were pruned before these were read. (Read apart, a prune between the two reads let
    a resuming client skip events with no gap event.)"""
    with conn.read() as db:
        return _oldest(db), _after(db, after_id, limit)


def prune(conn: Connection, below_id: int) -> int:
    """Delete events with id < below_id, always keeping the newest row (so the next id
    is never one a client has already seen). Returns how many were deleted."""
    with conn.write(savepoint=False) as db:
        db.execute("DELETE FROM task_events WHERE id < min(?, (SELECT max(id) FROM task_events))",
                   (below_id,))
        return db.changes()


# -- streamed output -----------------------------------------------------------------------

_FENCED = ("EXISTS (SELECT 1 FROM tasks WHERE id = ?1 AND attempts = ?2 AND lease_owner = ?3 "
           "AND status = 'running')")


def append_output(conn: Connection, lease, seq: int, pos: int, text: str,
                  truncated: bool = False) -> bool:
    """Store one output chunk of the attempt `lease` holds (False, nothing written, when
    it no longer does). Chunk 0 of an attempt first drops the output of the task's
    earlier attempts, so a task keeps one attempt's output."""
    args = (lease.id, lease.attempt, lease.owner, seq, pos, text, int(truncated))
    with conn.write(savepoint=False) as db:
        db.execute(f"INSERT OR IGNORE INTO task_output (task_id, attempt, seq, pos, text, truncated) "
                   f"SELECT ?1, ?2, ?4, ?5, ?6, ?7 WHERE {_FENCED}", args)
        if not db.changes():
            return False
        if seq == 0:
            db.execute("DELETE FROM task_output WHERE task_id = ? AND attempt != ?",
                       (lease.id, lease.attempt))
    return True


@dataclass(frozen=True)
class Output:
    task_id: str
    attempt: int | None
    text: str
    truncated: bool


def read_output(conn: Connection, task_id: str, attempt: int | None = None) -> Output:
    """The whole stored output of `attempt` (default: the attempt that has output)."""
    with conn.read() as db:
        if attempt is None:
            attempt = db.execute("SELECT max(attempt) FROM task_output WHERE task_id = ?",
                                 (task_id,)).fetchall()[0][0]
        rows = db.execute("SELECT text, truncated FROM task_output WHERE task_id = ? "
                          "AND attempt = ? ORDER BY seq", (task_id, attempt)).fetchall()
    return Output(task_id, attempt, "".join(r[0] for r in rows), any(r[1] for r in rows))


def read_output_after(conn: Connection, task_id: str, attempt: int, after_seq: int
                      ) -> list[tuple[int, int, str, bool]]:
    """(seq, pos, text, truncated) of the chunks of `attempt` after `after_seq`."""
    with conn.read() as db:
        return [(seq, pos, text, bool(cut)) for seq, pos, text, cut in db.execute(
            "SELECT seq, pos, text, truncated FROM task_output WHERE task_id = ? "
            "AND attempt = ? AND seq > ? ORDER BY seq", (task_id, attempt, after_seq))]


# -- task logs -----------------------------------------------------------------------------

def append_log(conn: Connection, lease, seq: int, pos: int, data: bytes,
               keep_from_pos: int | None = None) -> bool:
    """Store one chunk of the stdout/stderr of the attempt `lease` holds (False when it
    no longer does); with `keep_from_pos`, delete the chunks that end at or before it,
    so the log keeps its tail."""
    args = (lease.id, lease.attempt, lease.owner, seq, pos, data)
    with conn.write(savepoint=False) as db:
        db.execute(f"INSERT OR IGNORE INTO task_logs (task_id, attempt, seq, pos, data) "
                   f"SELECT ?1, ?2, ?4, ?5, ?6 WHERE {_FENCED}", args)
        if not db.changes():
            return False
        if keep_from_pos is not None:
            db.execute("DELETE FROM task_logs WHERE task_id = ? AND attempt = ? "
                       "AND pos + length(data) <= ?", (lease.id, lease.attempt, keep_from_pos))
    return True


@dataclass(frozen=True)
class LogChunk:
    attempt: int
    seq: int
    pos: int
    data: bytes


def log_attempts(conn: Connection, task_id: str) -> list[int]:
    with conn.read() as db:
        return [r[0] for r in db.execute(
            "SELECT DISTINCT attempt FROM task_logs WHERE task_id = ? ORDER BY attempt",
            (task_id,))]


def read_log(conn: Connection, task_id: str, attempt: int, after_seq: int = -1) -> list[LogChunk]:
    with conn.read() as db:
        return [LogChunk(attempt, seq, pos, bytes(data)) for seq, pos, data in db.execute(
            "SELECT seq, pos, data FROM task_logs WHERE task_id = ? AND attempt = ? "
            "AND seq > ? ORDER BY seq", (task_id, attempt, after_seq))]


# -- the operations Store offers (each one transaction, or joins the caller's) -------------

class LiveOps:
    """Store methods for the event log, streamed output and task logs; mixed into `Store`,
    whose `conn` they use. The fan-out process, the loop's output buffers, the HTTP side
    and `taskvisor watch/logs` go through these, never through a store's connection."""

    conn = None  # set by Store

    def subscribe_events(self, now: float) -> LogState:
        return subscribe(self.conn, now)

    def disable_events_if_idle(self, now: float, idle_s: float) -> bool:
        return disable_if_idle(self.conn, now, idle_s)

    def newest_event_id(self) -> int:
        return newest_id(self.conn)

    def oldest_event_id(self) -> int:
        return oldest_id(self.conn)

    def read_events(self, after_id: int, limit: int = 1000) -> list[Event]:
        return read(self.conn, after_id, limit)

    def read_kept_events(self, after_id: int, limit: int = 1000) -> tuple[int, list[Event]]:
        return read_kept(self.conn, after_id, limit)

    def prune_events(self, below_id: int) -> int:
        return prune(self.conn, below_id)

    def append_output(self, lease, seq: int, pos: int, text: str, truncated: bool = False) -> bool:
        return append_output(self.conn, lease, seq, pos, text, truncated)

    def read_output(self, task_id: str, attempt: int | None = None) -> Output:
        return read_output(self.conn, task_id, attempt)

    def read_output_after(self, task_id: str, attempt: int, after_seq: int
                          ) -> list[tuple[int, int, str, bool]]:
        return read_output_after(self.conn, task_id, attempt, after_seq)

    def append_log(self, lease, seq: int, pos: int, data: bytes,
                   keep_from_pos: int | None = None) -> bool:
        return append_log(self.conn, lease, seq, pos, data, keep_from_pos)

    def log_attempts(self, task_id: str) -> list[int]:
        return log_attempts(self.conn, task_id)

    def read_log(self, task_id: str, attempt: int, after_seq: int = -1) -> list[LogChunk]:
        return read_log(self.conn, task_id, attempt, after_seq)
