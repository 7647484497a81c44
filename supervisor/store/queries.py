"""The SQL statements of tasks, attempts, leases and dependencies, one function per
statement, named verb_noun (the claim's are in claim_queries, workflows' in
workflow_queries, named limits' in flow, the event log's in events).

Each takes a raw apsw connection already inside the right transaction (the caller in
`supervisor.store.tasks` opens it) and `now` where time matters: no statement calls
`datetime('now')`. Writes of an attempt are fenced by (id, attempts, lease_owner) and
report whether they matched. This module must never open connections or transactions.
"""

from __future__ import annotations

import json

import apsw

from supervisor.store.rows import Attempt, Status, Task

T = Task.COLUMNS
UNFINISHED_SQL = "('blocked','queued','running')"


def _one(cursor) -> tuple | None:
    for row in cursor:
        return row
    return None


# -- enqueue ---------------------------------------------------------------------------

def select_unfinished_by_dedupe_key(db: apsw.Connection, key: str) -> str | None:
    row = _one(db.execute(
        f"SELECT id FROM tasks WHERE dedupe_key = ? AND status IN {UNFINISHED_SQL}", (key,)))
    return row[0] if row else None


def select_statuses(db: apsw.Connection, ids: list[str]) -> dict[str, str]:
    return dict(db.execute(
        "SELECT id, status FROM tasks WHERE id IN (SELECT value FROM json_each(?))",
        (json.dumps(ids),)))


def insert_task(db: apsw.Connection, *, id: str, type: str, payload: str, priority: int,
                status: str, now: float, run_after: float, max_attempts: int,
                timeout_s, memory_mb, cpu_s, dedupe_key, error=None, outcome=None,
                completed_at=None, parent_id=None, workflow_id=None, await_event=None,
                run_on_failure=False, claim_reads=0, limit_keys=None, estimated_tokens=None,
                schedule=None, scheduled_for=None) -> None:
    db.execute(
        "INSERT INTO tasks (id, type, payload, priority, status, created_at, run_after, "
        "max_attempts, timeout_s, memory_mb, cpu_s, dedupe_key, error, outcome, completed_at, "
        "parent_id, workflow_id, await_event, run_on_failure, claim_reads, "
        "limit_keys, estimated_tokens, schedule, scheduled_for) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (id, type, payload, priority, status, now, run_after, max_attempts, timeout_s,
         memory_mb, cpu_s, dedupe_key, error, outcome, completed_at, parent_id, workflow_id,
         await_event, 1 if run_on_failure else 0, claim_reads, limit_keys,
         estimated_tokens, schedule, scheduled_for))


_INSERT_QUEUED = ("INSERT INTO tasks (id, type, payload, priority, status, created_at, run_after, "
                  "max_attempts, timeout_s, memory_mb, cpu_s) "
                  "VALUES (?1, ?2, ?3, ?4, 'queued', ?5, coalesce(?6, ?5), ?7, ?8, ?9, ?10)")


def insert_queued_task(db: apsw.Connection, task_id: str, task, now: float) -> None:
    """The single enqueue's statement: a queued task with no key and no dependencies
    (positional, as it is the hottest insert)."""
    db.execute(_INSERT_QUEUED, (task_id, task.type, task.payload, task.priority, now,
                                task.run_after, task.max_attempts, task.timeout_s,
                                task.memory_mb, task.cpu_s))


def insert_deps(db: apsw.Connection, task_id: str, depends_on: list[str],
                aliases: dict[str, str] | None = None) -> None:
    """`aliases`: {dependency id: the name the enqueue_many call gave it}."""
    aliases = aliases or {}
    db.executemany("INSERT OR IGNORE INTO task_deps (task_id, depends_on, alias) VALUES (?, ?, ?)",
                   [(task_id, d, aliases.get(d)) for d in depends_on])
    db.execute("UPDATE tasks SET has_dependents = 1 WHERE id IN (SELECT value FROM json_each(?)) "
               "AND has_dependents = 0", (json.dumps(depends_on),))


# -- the lease (the claim's statements: supervisor.store.claim_queries) ---------------

def insert_attempt(db: apsw.Connection, lease, *, started_at: float | None, now: float, end,
                   pid: int | None) -> None:
    """Write the row of one ended attempt (a running attempt has none: it is the tasks row)."""
    db.execute(
        "INSERT INTO attempts (task_id, attempt, owner, started_at, ended_at, outcome, reason, "
        "error, exit_code, signal, pid, peak_rss_bytes, cpu_s, wall_s, ran_in) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (lease.id, lease.attempt, lease.owner, now if started_at is None else started_at, now,
         str(end.outcome), end.reason, json.dumps(end.error) if end.error else None,
         end.exit_code, end.signal, end.pid if end.pid is not None else pid,
         end.peak_rss_bytes, end.cpu_s, None if end.wall_s is None else round(end.wall_s, 6),
         end.ran_in))


_FENCE = "id = :id AND attempts = :attempt AND lease_owner = :owner AND status = 'running'"


def update_task_pid(db: apsw.Connection, lease, pid: int, pid_started_at: float) -> bool:
    db.execute(f"UPDATE tasks SET pid = :pid, pid_started_at = :ps WHERE {_FENCE}",
               {"pid": pid, "ps": pid_started_at, **_lease(lease)})
    return db.changes() > 0


def update_task_progress(db: apsw.Connection, lease, progress: float | None, message: str | None) -> bool:
    db.execute(f"UPDATE tasks SET progress = :p, progress_message = :m WHERE {_FENCE}",
               {"p": progress, "m": message, **_lease(lease)})
    return db.changes() > 0


def extend_leases(db: apsw.Connection, owner: str, expires_at: float) -> list[tuple[str, int, bool]]:
    """Extend every lease `owner` holds; returns (id, attempts, cancel_requested) of each."""
    return [(r[0], r[1], bool(r[2])) for r in db.execute(
        "UPDATE tasks SET lease_expires_at = ? WHERE status = 'running' AND lease_owner = ? "
        "RETURNING id, attempts, cancel_requested", (expires_at, owner))]


def select_cancel_requested(db: apsw.Connection, owner: str) -> list[str]:
    return [r[0] for r in db.execute(
        "SELECT id FROM tasks WHERE status = 'running' AND lease_owner = ? "
        "AND cancel_requested = 1", (owner,))]


def complete_task(db: apsw.Connection, lease, now: float, result: str | None) -> tuple | None:
    """Mark succeeded; returns (started_at, pid, has_dependents, cancel_requested,
    workflow_id) of the attempt, or None when not leased."""
    # Positional parameters: binding a tuple costs less than a dict, on the hot path.
    for row in db.execute(
            "UPDATE tasks SET status = 'succeeded', completed_at = ?, result = ?, "
            "error = NULL, outcome = 'succeeded', lease_owner = NULL, lease_expires_at = NULL, "
            "reserved_mb = 0, progress = 1.0 WHERE id = ? AND attempts = ? AND lease_owner = ? "
            "AND status = 'running' RETURNING started_at, pid, has_dependents, cancel_requested, "
            "workflow_id",
            (now, result, lease.id, lease.attempt, lease.owner)):
        return row
    return None


def requeue_task(db: apsw.Connection, lease, *, run_after: float, refund: bool,
                 outcome: str, error: str | None) -> bool:
    """Back to queued; `refund` gives the attempt back (shutdown, Retry)."""
    db.execute(
        f"UPDATE tasks SET status = 'queued', run_after = :ra, attempts = attempts - :refund, "
        f"lease_owner = NULL, lease_expires_at = NULL, reserved_mb = 0, pid = NULL, "
        f"pid_started_at = NULL, outcome = :outcome, error = :error WHERE {_FENCE}",
        {"ra": run_after, "refund": 1 if refund else 0, "outcome": outcome, "error": error,
         **_lease(lease)})
    return db.changes() > 0


def select_reschedules(db: apsw.Connection, task_id: str) -> int:
    """How many times the task rescheduled itself since it was enqueued (or retried)."""
    row = _one(db.execute("SELECT reschedules FROM tasks WHERE id = ?", (task_id,)))
    return 0 if row is None else row[0]


def count_reschedule(db: apsw.Connection, lease) -> bool:
    db.execute(f"UPDATE tasks SET reschedules = reschedules + 1 WHERE {_FENCE}", _lease(lease))
    return db.changes() > 0


def count_relay_loss(db: apsw.Connection, lease) -> bool:
    db.execute(f"UPDATE tasks SET relay_losses = relay_losses + 1 WHERE {_FENCE}", _lease(lease))
    return db.changes() > 0


def fail_task(db: apsw.Connection, lease, *, now: float, status: str, outcome: str,
              error: str | None) -> bool:
    """Final: status is 'failed' or 'cancelled'."""
    db.execute(
        f"UPDATE tasks SET status = :status, completed_at = :now, outcome = :outcome, "
        f"error = :error, lease_owner = NULL, lease_expires_at = NULL, reserved_mb = 0 "
        f"WHERE {_FENCE}",
        {"status": status, "now": now, "outcome": outcome, "error": error, **_lease(lease)})
    return db.changes() > 0


def select_expired_leases(db: apsw.Connection, now: float) -> list[Task]:
    return [Task.from_row(r) for r in db.execute(
        f"SELECT {T} FROM tasks WHERE status = 'running' AND lease_expires_at < ?", (now,))]


def select_running_of_owners(db: apsw.Connection, owners: list[str]) -> list[Task]:
    return [Task.from_row(r) for r in db.execute(
        f"SELECT {T} FROM tasks WHERE status = 'running' "
        f"AND lease_owner IN (SELECT value FROM json_each(?))", (json.dumps(owners),))]


def _lease(lease) -> dict:
    return {"id": lease.id, "attempt": lease.attempt, "owner": lease.owner}


# -- dependencies ----------------------------------------------------------------------

# A blocked task may run once every dependency succeeded (or, with run_on_failure, ended
# in any way) and the event it awaits, if any, was sent. The unfinished dependency is
# looked for newest id first: dependencies finish roughly in id order (FIFO claims), so
# for a join over N children the search stops at once instead of walking past every
# finished one. A scalar subquery, not NOT EXISTS, whose ORDER BY SQLite drops, which
# would make a whole fan-in O(N^2) (figures: benchmarks/README.md).
READY_TO_RUN = (
    "(SELECT d.depends_on FROM task_deps d JOIN tasks t ON t.id = d.depends_on "
    "  WHERE d.task_id = tasks.id AND t.status != 'succeeded' "
    "  AND (tasks.run_on_failure = 0 OR t.status NOT IN ('failed','cancelled')) "
    "  ORDER BY d.depends_on DESC LIMIT 1) IS NULL "
    "AND (tasks.await_event IS NULL OR EXISTS "
    "  (SELECT 1 FROM events e WHERE e.name = tasks.await_event))")


def unblock_dependents(db: apsw.Connection, task_id: str) -> list[str]:
    """Queue the blocked dependents of `task_id` that may run now (READY_TO_RUN)."""
    return [r[0] for r in db.execute(
        "UPDATE tasks SET status = 'queued' WHERE +status = 'blocked' "
        "AND id IN (SELECT task_id FROM task_deps WHERE depends_on = :id) "
        f"AND {READY_TO_RUN} RETURNING id", {"id": task_id})]


def fail_dependents(db: apsw.Connection, task_id: str, now: float, error: str) -> list[str]:
    """Fail the unfinished, not running dependents of `task_id` (but those that run on
    failure); returns their ids."""
    return [r[0] for r in db.execute(
        "UPDATE tasks SET status = 'failed', completed_at = :now, outcome = 'dependency_failed', "
        "error = :error WHERE +status IN ('blocked','queued') AND run_on_failure = 0 "
        "AND id IN (SELECT task_id FROM task_deps WHERE depends_on = :id) RETURNING id",
        {"id": task_id, "now": now, "error": error})]


def select_dependency_failed_dependents(db: apsw.Connection, task_id: str) -> list[str]:
    return [r[0] for r in db.execute(
        "SELECT t.id FROM task_deps d JOIN tasks t ON t.id = d.task_id "
        "WHERE d.depends_on = ? AND t.status = 'failed' AND t.outcome = 'dependency_failed'",
        (task_id,))]


def select_broken_deps(db: apsw.Connection, task_id: str) -> list[tuple[str, str]]:
    """(id, status) of the dependencies of `task_id` that failed or were cancelled."""
    return db.execute(
        "SELECT d.depends_on, t.status FROM task_deps d JOIN tasks t ON t.id = d.depends_on "
        "WHERE d.task_id = ? AND t.status IN ('failed','cancelled') ORDER BY d.depends_on",
        (task_id,)).fetchall()


def reblock_task(db: apsw.Connection, task_id: str) -> None:
    db.execute("UPDATE tasks SET status = 'blocked', completed_at = NULL, outcome = NULL, "
               "error = NULL WHERE id = ?", (task_id,))


def count_unsucceeded_deps(db: apsw.Connection, task_id: str) -> int:
    return _one(db.execute(
        "SELECT count(*) FROM task_deps d JOIN tasks t ON t.id = d.depends_on "
        "WHERE d.task_id = ? AND t.status != 'succeeded'", (task_id,)))[0]


# -- cancel, retry, prune --------------------------------------------------------------

def cancel_waiting_task(db: apsw.Connection, task_id: str, now: float) -> bool:
    db.execute("UPDATE tasks SET status = 'cancelled', completed_at = ?, outcome = 'cancelled', "
               "error = 'cancelled before it ran' WHERE id = ? AND status IN ('blocked','queued')",
               (now, task_id))
    return db.changes() > 0


def request_cancel(db: apsw.Connection, task_id: str) -> bool:
    db.execute("UPDATE tasks SET cancel_requested = 1 WHERE id = ? AND status = 'running'",
               (task_id,))
    return db.changes() > 0


def retry_task(db: apsw.Connection, task_id: str, now: float, status: str) -> bool:
    db.execute(
        "UPDATE tasks SET status = ?, attempts = 0, run_after = ?, completed_at = NULL, "
        "started_at = NULL, cancel_requested = 0, result = NULL, error = NULL, outcome = NULL, "
        "progress = NULL, progress_message = NULL, reschedules = 0 "
        "WHERE id = ? AND status IN ('failed','cancelled')",
        (status, now, task_id))
    return db.changes() > 0


def still_needed(task_id: str) -> str:
    """SQL true while the finished task `task_id` (a column) is still read by an
    unfinished task: a dependent (its ctx.inputs hold this task's result, or its error
    for run_on_failure), or a member of the workflow it started (the workflow's id names
    it). Retention keeps such a task however old; each test is one index seek."""
    return (f"(EXISTS (SELECT 1 FROM task_deps AS nd JOIN tasks AS nt ON nt.id = nd.task_id "
            f"WHERE nd.depends_on = {task_id} AND nt.status IN ('blocked','queued','running')) "
            f"OR EXISTS (SELECT 1 FROM tasks AS nw INDEXED BY tasks_workflow "
            f"WHERE nw.workflow_id = {task_id} AND nw.status IN ('blocked','queued','running')))")


def prune_finished(db: apsw.Connection, before: float) -> int:
    """Delete finished tasks completed before `before`: succeeded ones found through their
    succeeded attempt (attempts_ended: complete() ends it at the task's completed_at),
    failed and cancelled ones through the partial index tasks_finished (migration 0004);
    but not one an unfinished task still needs (`still_needed`)."""
    db.execute("DELETE FROM tasks WHERE id IN (SELECT task_id FROM attempts "
               "WHERE ended_at < :before AND outcome = 'succeeded') "
               "AND status = 'succeeded' AND completed_at < :before "
               f"AND NOT {still_needed('tasks.id')}", {"before": before})
    n = db.changes()
    db.execute("DELETE FROM tasks WHERE status IN ('failed','cancelled') AND completed_at < ? "
               f"AND NOT {still_needed('tasks.id')}", (before,))
    return n + db.changes()


# -- reading ---------------------------------------------------------------------------

def select_task(db: apsw.Connection, task_id: str) -> tuple | None:
    return _one(db.execute(f"SELECT {T} FROM tasks WHERE id = ?", (task_id,)))


def insert_aliases(db: apsw.Connection, aliases: dict[str, str]) -> None:
    """Record each alias -> task id (the task exists); an alias already recorded stays."""
    db.execute("INSERT INTO task_aliases (alias, task_id) SELECT key, value FROM json_each(?) "
               "WHERE true ON CONFLICT (alias) DO NOTHING", (json.dumps(aliases),))


def resolve_aliases(db: apsw.Connection, ids: list[str]) -> dict[str, str]:
    """{alias: task id} for those of `ids` that are another name of a task."""
    if not ids:
        return {}
    return dict(db.execute("SELECT alias, task_id FROM task_aliases WHERE alias IN "
                           "(SELECT value FROM json_each(?))", (json.dumps(ids),)).fetchall())


def select_deps(db: apsw.Connection, task_ids: list[str]) -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    for task_id, dep in db.execute(
            "SELECT task_id, depends_on FROM task_deps WHERE task_id IN "
            "(SELECT value FROM json_each(?)) ORDER BY task_id, depends_on", (json.dumps(task_ids),)):
        out.setdefault(task_id, []).append(dep)
    return {k: tuple(v) for k, v in out.items()}


def select_attempts(db: apsw.Connection, task_id: str) -> list[Attempt]:
    return [Attempt.from_row(r) for r in db.execute(
        f"SELECT {Attempt.COLUMNS} FROM attempts WHERE task_id = ? ORDER BY id", (task_id,))]


def select_tasks(db: apsw.Connection, *, status: str | None, type: str | None,
                 before: str | None, limit: int, workflow_id: str | None = None) -> list[tuple]:
    """Newest first; `before` is an id cursor for the next page."""
    where, args = [], []
    if workflow_id:
        where.append("(workflow_id = ? OR id = ?)"); args += [workflow_id, workflow_id]
    if status:
        # A literal, not a parameter, so the partial index of that status can serve it
        # (safe: only the six status names get here).
        where.append(f"status = '{Status(status)}'")
    if type:
        where.append("type = ?"); args.append(type)
    if before:
        where.append("id < ?"); args.append(before)
    sql = f"SELECT {T} FROM tasks"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    return db.execute(sql, (*args, limit)).fetchall()


def select_queued_in_order(db: apsw.Connection, limit: int) -> list[tuple]:
    """Queued tasks in the order a claim would take them (due ones first): the head of
    each claim index (migration 0009 keeps tasks of a limit group in their own)."""
    return db.execute(
        f"SELECT * FROM (SELECT {T} FROM tasks WHERE status = 'queued' AND limit_keys IS NULL "
        f"ORDER BY priority DESC, id LIMIT ?1) UNION ALL "
        f"SELECT * FROM (SELECT {T} FROM tasks WHERE status = 'queued' AND limit_keys IS NOT NULL "
        f"ORDER BY priority DESC, id LIMIT ?1) ORDER BY priority DESC, id LIMIT ?1",
        (limit,)).fetchall()


def count_by_status_type(db: apsw.Connection) -> list[tuple[str, str, int]]:
    """Every status but queued, from the counts the triggers of migrations 0003 and 0005
    keep: O(types), not O(tasks). Queued tasks are counted by `select_queued_by_type`."""
    return db.execute("SELECT status, type, n FROM task_counts WHERE n > 0").fetchall()


def delete_empty_counts(db: apsw.Connection) -> None:
    db.execute("DELETE FROM task_counts WHERE n <= 0")


_FEW_TYPES = 8  # up to this many known types, count them in one unsorted pass


def select_queued_by_type(db: apsw.Connection, now: float) -> list[tuple[str, int, float | None]]:
    """(type, queued tasks, enqueue time of the oldest due one) for types with queued
    tasks: one scan of the covering claim index, O(queued tasks). With a few known types
    (task_types) each gets its own aggregates in that pass; GROUP BY would sort every
    row by type first, about twice as slow (benchmarks/README.md)."""
    types = [r[0] for r in db.execute("SELECT type FROM task_types")]
    if not types:
        return []
    merged: dict[str, list] = {}
    # One scan per claim index (tasks of no limit group, then of any), each covering.
    for part in ("limit_keys IS NULL", "limit_keys IS NOT NULL"):
        if len(types) <= _FEW_TYPES:
            cols = ", ".join(f"count(*) FILTER (WHERE type = ?{i}), "
                             f"min(id) FILTER (WHERE type = ?{i} AND run_after <= ?1)"
                             for i in range(2, len(types) + 2))
            row = db.execute(f"SELECT {cols} FROM tasks WHERE status = 'queued' AND {part}",
                             (now, *types)).fetchall()[0]
            found = [(t, row[2 * i], row[2 * i + 1]) for i, t in enumerate(types) if row[2 * i]]
        else:
            found = db.execute("SELECT type, count(*), min(id) FILTER (WHERE run_after <= ?) "
                               f"FROM tasks WHERE status = 'queued' AND {part} GROUP BY type",
                               (now,)).fetchall()
        for t, n, first in found:
            entry = merged.setdefault(t, [0, None])
            entry[0] += n
            if first is not None and (entry[1] is None or first < entry[1]):
                entry[1] = first
    found = [(t, n, first) for t, (n, first) in merged.items()]
    oldest = [i for _, _, i in found if i is not None]
    created = dict(db.execute("SELECT id, created_at FROM tasks WHERE id IN "
                              "(SELECT value FROM json_each(?))", (json.dumps(oldest),))) if oldest else {}
    return [(t, n, created.get(i)) for t, n, i in found]


def select_next_run_after(db: apsw.Connection, now: float) -> float | None:
    """When the next queued task that is not due yet becomes due (None: none waits). A
    scan of each claim index (tasks of no limit group, then of any: migration 0009), both
    covering: run it after a claim found nothing, not per claim."""
    return db.execute(
        "SELECT min(t) FROM (SELECT min(run_after) AS t FROM tasks WHERE status = 'queued' "
        "AND limit_keys IS NULL AND run_after > ?1 UNION ALL SELECT min(run_after) FROM tasks "
        "WHERE status = 'queued' AND limit_keys IS NOT NULL AND run_after > ?1)",
        (now,)).fetchall()[0][0]


def select_ids_matching(db: apsw.Connection, text: str, limit: int) -> list[str]:
    """`text` if it is an id (or another name of one), else up to `limit` ids that end
    with it (a scan of the id index: for a person typing a short id, never on a hot path)."""
    rows = db.execute("SELECT id FROM tasks WHERE id = ?", (text,)).fetchall()
    if rows:
        return [rows[0][0]]
    named = resolve_aliases(db, [text])
    if named:
        return [named[text]]
    return [r[0] for r in db.execute("SELECT id FROM tasks WHERE substr(id, -?) = ? LIMIT ?",
                                     (len(text), text, limit))]


def select_recent_attempts(db: apsw.Connection, since: float) -> list[tuple]:
    """(ended_at, outcome, type) of attempts that ended since `since`."""
    return db.execute(
        "SELECT a.ended_at, a.outcome, t.type FROM attempts a JOIN tasks t ON t.id = a.task_id "
        "WHERE a.ended_at >= ? ORDER BY a.ended_at", (since,)).fetchall()


# -- supervisors -----------------------------------------------------------------------

def upsert_supervisor(db: apsw.Connection, *, owner: str, host: str, pid: int,
                      pid_started_at: float, now: float, wake_port: int | None,
                      pool_size: int, version: str) -> None:
    db.execute(
        "INSERT INTO supervisors (owner, host, pid, pid_started_at, started_at, heartbeat_at, "
        "wake_port, pool_size, version) VALUES (?,?,?,?,?,?,?,?,?) "
        "ON CONFLICT(owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, "
        "wake_port = excluded.wake_port, pool_size = excluded.pool_size",
        (owner, host, pid, pid_started_at, now, now, wake_port, pool_size, version))


def delete_supervisor(db: apsw.Connection, owner: str) -> None:
    db.execute("DELETE FROM supervisors WHERE owner = ?", (owner,))


def select_supervisors(db: apsw.Connection) -> list[tuple]:
    return db.execute("SELECT owner, host, pid, pid_started_at, started_at, heartbeat_at, "
                      "wake_port, pool_size, version FROM supervisors ORDER BY started_at").fetchall()


def select_wake_ports(db: apsw.Connection, host: str) -> list[int]:
    return [r[0] for r in db.execute(
        "SELECT wake_port FROM supervisors WHERE host = ? AND wake_port IS NOT NULL", (host,))]
