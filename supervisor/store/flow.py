"""The SQL of flow control: limit state, schedule fires and retention batches.

Owns every statement on `limit_groups`, `limit_state`, `schedules` and `schedule_fires`
(migration 0009) and the batched deletes of retention, plus the small operations built
on them that the claim and the supervisor call inside their transactions. Bucket
arithmetic is `supervisor.budget`'s (pure); `now` is always the caller's. It must never
open a connection or a transaction of its own (the callers in `tasks` do), and never
decide admission by itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import apsw

from supervisor import budget
from supervisor.budget import KeyState
from supervisor.store import queries as q
from supervisor.store import workflow_queries as wq

_STATE_COLUMNS = "key, running, requests, tokens, updated_at, paused_until, pause_reason"


# -- limits ------------------------------------------------------------------------------

_OPEN_GROUPS = (
    "SELECT g.keys, g.head_priority, g.head_id, s.running, s.requests, s.tokens, "
    "s.updated_at, s.paused_until, s.pause_reason "
    "FROM limit_groups AS g INDEXED BY limit_groups_head "
    # The state of the group's first key comes along: most groups have one key, so the
    # claim reads no other statement to decide whether the group has room.
    "LEFT JOIN limit_state AS s ON s.key = json_extract(g.keys, '$[0]') WHERE g.queued > 0 "
    "ORDER BY g.head_priority DESC, g.head_id")


def select_open_groups(db: apsw.Connection):
    """Rows (keys, head_priority, head_id, *state of the first key or NULLs) of the limit
    groups that have queued tasks, best head first (priority, then id): a lazy cursor
    over limit_groups_head, so a caller that stops early reads only what it used."""
    return db.execute(_OPEN_GROUPS)


def select_key_state(db: apsw.Connection, key: str) -> KeyState:
    for row in db.execute(f"SELECT {_STATE_COLUMNS} FROM limit_state WHERE key = ?", (key,)):
        return KeyState(*row)
    return KeyState(key)


def select_key_states(db: apsw.Connection, keys: Iterable[str] | None = None) -> dict[str, KeyState]:
    """limit_state rows of `keys` (None: every row)."""
    if keys is None:
        rows = db.execute(f"SELECT {_STATE_COLUMNS} FROM limit_state")
    else:
        rows = db.execute(f"SELECT {_STATE_COLUMNS} FROM limit_state WHERE key IN "
                          "(SELECT value FROM json_each(?))", (json.dumps(sorted(set(keys))),))
    return {r[0]: KeyState(*r) for r in rows}


def write_levels(db: apsw.Connection, key: str, requests: float | None, tokens: float | None,
                 now: float) -> None:
    """Store bucket levels computed at `now` from the row's state. A `now` older than the
    row's (a supervisor's pass reads the clock once, then may wait for the write lock)
    refilled nothing, so the levels are still as of the row's time: keep it, or the next
    claim refills the span between the two times a second time."""
    db.execute("INSERT INTO limit_state (key, requests, tokens, updated_at) VALUES (?,?,?,?) "
               "ON CONFLICT (key) DO UPDATE SET requests = excluded.requests, "
               "tokens = excluded.tokens, "
               "updated_at = max(coalesce(updated_at, excluded.updated_at), excluded.updated_at)",
               (key, requests, tokens, now))


def pause_key(db: apsw.Connection, key: str, until: float, reason: str | None) -> None:
    """Pause a key until `until` (a later pause already in place is kept)."""
    db.execute("INSERT INTO limit_state (key, paused_until, pause_reason) VALUES (?,?,?) "
               "ON CONFLICT (key) DO UPDATE SET pause_reason = CASE WHEN "
               "coalesce(paused_until, 0) < excluded.paused_until THEN excluded.pause_reason "
               "ELSE pause_reason END, paused_until = max(coalesce(paused_until, 0), "
               "excluded.paused_until)", (key, until, reason))


def select_waiting_by_key(db: apsw.Connection) -> dict[str, int]:
    """Queued tasks per limit key (a task in several limits counts in each)."""
    out: dict[str, int] = {}
    for keys, n in db.execute("SELECT keys, queued FROM limit_groups WHERE queued > 0"):
        for key in budget.group_keys(keys):
            out[key] = out.get(key, 0) + n
    return out


def select_oldest_waiting(db: apsw.Connection, now: float) -> dict[str, float]:
    """Limit key -> created_at of the oldest due queued task drawing from it: one seek
    per group into tasks_claim_limited (its head by priority, then id)."""
    out: dict[str, float] = {}
    for keys, created in db.execute(
            "SELECT g.keys, (SELECT min(created_at) FROM tasks INDEXED BY tasks_claim_limited "
            "  WHERE status = 'queued' AND limit_keys IS NOT NULL AND limit_keys = g.keys "
            "  AND run_after <= ?) FROM limit_groups AS g WHERE g.queued > 0", (now,)):
        if created is None:
            continue
        for key in budget.group_keys(keys):
            out[key] = min(created, out.get(key, created))
    return out


def delete_empty_groups(db: apsw.Connection) -> None:
    db.execute("DELETE FROM limit_groups WHERE queued <= 0")


def charge_claim(db: apsw.Connection, keys: tuple[str, ...], task_tokens: int | None,
                 states: dict[str, KeyState], limits: budget.Limits, now: float) -> None:
    """Take one request and the task's token estimate from each of its keys' buckets."""
    for key in keys:
        spec = limits.spec(key)
        if spec is None or (spec.requests_per_minute is None and spec.tokens_per_minute is None):
            continue
        state = states.get(key) or KeyState(key)
        req, tok = budget.charge(spec, state, now, budget.estimate(task_tokens, spec))
        write_levels(db, key, req, tok, now)


def settle_spend(db: apsw.Connection, keys: tuple[str, ...], task_tokens: int | None,
                 spent: int, limits: budget.Limits, now: float, unsent: bool = False) -> None:
    """Correct the token buckets of `keys` by estimate minus what the attempt spent; an
    `unsent` attempt (it never had a process) also gives back the request its claim took."""
    states = select_key_states(db, keys)
    for key in keys:
        spec = limits.spec(key)
        if spec is None:
            continue
        state = states.get(key) or KeyState(key)
        req, tok = budget.levels(spec, state, now)
        refund = unsent and req is not None
        if tok is None and not refund:
            continue  # nothing of this key's to correct
        if tok is not None:
            tok = budget.correct(spec, state, now, budget.estimate(task_tokens, spec) - spent)
        if refund:
            req = min(spec.request_capacity, req + 1.0)
        write_levels(db, key, req, tok, now)


# -- schedules -------------------------------------------------------------------------

def select_schedules(db: apsw.Connection) -> dict[str, tuple[bool, float | None]]:
    """name -> (paused, last_fire_at)."""
    return {r[0]: (bool(r[1]), r[2]) for r in
            db.execute("SELECT name, paused, last_fire_at FROM schedules")}


def insert_schedule(db: apsw.Connection, name: str, last_fire_at: float | None) -> None:
    db.execute("INSERT OR IGNORE INTO schedules (name, last_fire_at) VALUES (?, ?)",
               (name, last_fire_at))


def advance_schedule(db: apsw.Connection, name: str, fire_at: float) -> None:
    db.execute("UPDATE schedules SET last_fire_at = ? WHERE name = ? "
               "AND (last_fire_at IS NULL OR last_fire_at < ?)", (fire_at, name, fire_at))


def set_schedule_paused(db: apsw.Connection, name: str, paused: bool, now: float) -> None:
    # A resumed schedule starts from now: fires that passed while paused are not run.
    db.execute("INSERT INTO schedules (name, paused, last_fire_at) VALUES (?, ?, ?) "
               "ON CONFLICT (name) DO UPDATE SET paused = excluded.paused, "
               "last_fire_at = CASE WHEN excluded.paused THEN last_fire_at "
               "ELSE max(coalesce(last_fire_at, 0), excluded.last_fire_at) END",
               (name, 1 if paused else 0, now))


def insert_fire(db: apsw.Connection, name: str, fire_at: float, task_id: str) -> bool:
    """Claim one fire; False when another supervisor already did."""
    db.execute("INSERT OR IGNORE INTO schedule_fires (name, fire_at, task_id) VALUES (?,?,?)",
               (name, fire_at, task_id))
    return db.changes() > 0


def select_last_fires(db: apsw.Connection) -> dict[str, tuple[float, str]]:
    """name -> (fire time, task id) of its latest fire."""
    return {r[0]: (r[1], r[2]) for r in db.execute(
        "SELECT name, max(fire_at), task_id FROM schedule_fires GROUP BY name")}


# -- retention -------------------------------------------------------------------------

def prune_finished_batch(db: apsw.Connection, before: float, limit: int) -> int:
    """Delete at most `limit` finished tasks completed before `before` (each with its
    attempts and dependency rows, by cascade), oldest first, but none an unfinished task
    still needs (`queries.still_needed`); returns how many."""
    # What an unfinished task still needs is passed over inside the LIMIT, so old kept
    # tasks never fill the batch and hold back the ones behind them.
    db.execute("DELETE FROM tasks WHERE id IN (SELECT task_id FROM attempts "
               "WHERE ended_at < :before AND outcome = 'succeeded' "
               f"AND NOT {q.still_needed('attempts.task_id')} ORDER BY ended_at LIMIT :n) "
               "AND status = 'succeeded' AND completed_at < :before",
               {"before": before, "n": limit})
    n = db.changes()
    if n < limit:
        db.execute("DELETE FROM tasks WHERE id IN (SELECT id FROM tasks INDEXED BY tasks_finished "
                   "WHERE status IN ('failed','cancelled') AND completed_at < :before "
                   f"AND NOT {q.still_needed('tasks.id')} "
                   "ORDER BY completed_at LIMIT :n)", {"before": before, "n": limit - n})
        n += db.changes()
    return n


def prune_idle_keys(db: apsw.Connection, now: float, limit: int,
                    limits: budget.Limits | None = None) -> int:
    """Forget the state of keys (a tenant's, say) nothing ran under for a day: none running,
    no pause in force, buckets untouched since and full again by now (the row then says
    nothing a missing row would not). A bucket still in debt (a task spent far more than
    its estimate) keeps its row until it is repaid: a missing row would forgive the debt.
    `limits` tells how fast each refills; a key no limit names any more goes at once;
    without `limits`, a row with a level below zero stays."""
    rows = db.execute(f"SELECT {_STATE_COLUMNS} FROM limit_state WHERE running = 0 "
                      "AND coalesce(paused_until, 0) < :now AND coalesce(updated_at, 0) < "
                      ":now - 86400 ORDER BY updated_at LIMIT :n", {"now": now, "n": limit}).fetchall()
    gone = []
    for row in rows:
        state = KeyState(*row)
        spec = limits.spec(state.key) if limits is not None else None
        if limits is not None and spec is not None:
            req, tok = budget.levels(spec, state, now)
            repaid = all(level is None or level >= -budget.EPSILON for level in (req, tok))
        elif limits is not None:
            repaid = True
        else:
            repaid = (state.requests or 0) >= 0 and (state.tokens or 0) >= 0
        if repaid:
            gone.append(state.key)
    if gone:
        db.execute("DELETE FROM limit_state WHERE key IN (SELECT value FROM json_each(?))",
                   (json.dumps(gone),))
    return len(gone)


def prune_fires_batch(db: apsw.Connection, before: float, limit: int) -> int:
    db.execute("DELETE FROM schedule_fires WHERE (name, fire_at) IN (SELECT name, fire_at "
               "FROM schedule_fires WHERE fire_at < ? LIMIT ?)", (before, limit))
    return db.changes()


# -- the operations Store offers (each one transaction) ------------------------------------

class FlowOps:
    """Store methods for limits, schedules and retention; mixed into `Store`, whose
    `conn` they use. Each is one transaction (or joins the caller's)."""

    conn = None  # set by Store

    def settle_limits(self, task, end, limits: budget.Limits, now: float) -> None:
        """After an attempt of a task with limit keys: correct token buckets by what it
        spent (ctx.spend) and pause the keys its Retry named (pause_limit)."""
        if end.spent_tokens is None and not end.pause_limits:
            return
        with self.conn.write() as db:
            if end.spent_tokens is not None and task.limit_keys and limits:
                settle_spend(db, task.limit_keys, task.estimated_tokens, end.spent_tokens,
                             limits, now, unsent=not end.started)
            for key in end.pause_limits:
                pause_key(db, key, now + (end.delay_s or 0.0),
                          f"task {task.id} ({task.type}): {end.reason or 'Retry'}")

    def pause_limit(self, key: str, until: float, reason: str | None = None) -> None:
        with self.conn.write() as db:
            pause_key(db, key, until, reason)

    def limit_report(self, limits: budget.Limits, now: float) -> list[dict]:
        """Every configured entry and every key with state or waiting tasks: its budget,
        use, pause and who waits (the rows of `taskvisor limits` and /api/limits)."""
        with self.conn.read() as db:
            states = select_key_states(db)
            waiting = select_waiting_by_key(db)
            oldest = select_oldest_waiting(db, now)
        keys = {n for n in limits.specs if not n.endswith("*")} | set(states) | set(waiting)
        out = []
        for key in sorted(keys):
            spec = limits.spec(key)
            state = states.get(key) or KeyState(key)
            paused = state.paused_until is not None and state.paused_until > now
            wait = budget.wait_s(spec, state, now)
            out.append({
                "key": key, "limit": spec.name if spec else None,
                "requests_per_minute": spec and spec.requests_per_minute,
                "tokens_per_minute": spec and spec.tokens_per_minute,
                "concurrency": spec and spec.concurrency,
                "burst": spec and spec.request_capacity,
                "running": state.running, "available": budget.available(spec, state, now),
                "blocked_by": budget.blocked_by(spec, state, now),
                "paused_until": state.paused_until if paused else None,
                "pause_reason": state.pause_reason if paused else None,
                "waiting": waiting.get(key, 0),
                "oldest_waiting_at": oldest.get(key),
                "room_in_s": None if wait == float("inf") else round(wait, 3),
            })
        return out

    # -- schedules ---------------------------------------------------------------------

    def schedule_states(self) -> tuple[dict, dict]:
        """({name: (paused, last_fire_at)}, {name: (last fire time, its task id)})."""
        with self.conn.read() as db:
            return select_schedules(db), select_last_fires(db)

    def set_schedule_paused(self, name: str, paused: bool, now: float) -> None:
        with self.conn.write() as db:
            set_schedule_paused(db, name, paused, now)

    def fire_schedule(self, name: str, fire_at: float | None, advance_to: float,
                      task, now: float) -> str | None:
        """In one transaction: move the schedule's last fire time to `advance_to` and,
        when `fire_at` is given and nobody claimed that fire yet, enqueue `task` for it.
        Returns the new task's id, or None (skipped, paused or already fired elsewhere)."""
        from supervisor.store.ids import new_id
        with self.conn.write() as db:
            insert_schedule(db, name, None)
            paused, last = select_schedules(db)[name]
            task_id = None
            if fire_at is not None and not paused and (last is None or last <= fire_at):
                task_id = task.id or new_id(now)
                if insert_fire(db, name, fire_at, task_id):
                    self._insert(db, task_id, task, now)
                else:
                    task_id = None
            advance_schedule(db, name, advance_to)
            return task_id

    def init_schedule(self, name: str, now: float) -> None:
        with self.conn.write() as db:
            insert_schedule(db, name, now)

    # -- retention ---------------------------------------------------------------------

    def prune_batch(self, before: float, limit: int, now: float | None = None,
                    limits: budget.Limits | None = None) -> int:
        """One small batch of retention: finished tasks, schedule fires and sent events
        older than `before`, and (given `now`) the state of limit keys idle for a day
        whose buckets `limits` says are full again; returns the tasks."""
        with self.conn.write() as db:
            n = prune_finished_batch(db, before, limit)
            if n:
                q.delete_empty_counts(db)
            prune_fires_batch(db, before, limit)
            wq.prune_events_batch(db, before, limit)
            delete_empty_groups(db)
            if now is not None:
                prune_idle_keys(db, now, limit, limits)
            return n
