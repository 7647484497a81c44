"""The SQL statements of workflows: events, checkpoints, a workflow's tasks and edges,
cancelling a workflow, and what a claim reads besides the row (claim_reads, 0008).

Same rules as `queries`: each takes a raw apsw connection already inside the caller's
transaction and `now` where time matters; writes of an attempt are fenced by the lease.
This module must never open connections or transactions.
"""

from __future__ import annotations

import json

import apsw

from supervisor.store.queries import READY_TO_RUN, T

READS_INPUTS, READS_EVENT, READS_CHECKPOINT = 1, 2, 4
_IN_WORKFLOW = "(workflow_id = :w OR id = :w)"  # tasks_workflow and the primary key


# -- events ------------------------------------------------------------------------------

def event_sent(db: apsw.Connection, name: str) -> bool:
    return bool(db.execute("SELECT 1 FROM events WHERE name = ?", (name,)).fetchall())


def insert_event(db: apsw.Connection, name: str, data: str | None, now: float) -> bool:
    """Record an event; False when one of that name was already sent (nothing changes)."""
    db.execute("INSERT INTO events (name, data, sent_at) VALUES (?, ?, ?) "
               "ON CONFLICT (name) DO NOTHING", (name, data, now))
    return db.changes() > 0


def prune_events_batch(db: apsw.Connection, before: float, limit: int) -> int:
    """Delete at most `limit` sent events older than `before`; returns how many. Their
    tasks were released when they were sent; a task enqueued later to await the same name
    waits for a new send."""
    db.execute("DELETE FROM events WHERE name IN (SELECT name FROM events "
               "WHERE sent_at < ? LIMIT ?)", (before, limit))
    return db.changes()


def release_awaiting(db: apsw.Connection, name: str) -> list[str]:
    """Queue the blocked tasks awaiting `name` that may run now; returns their ids."""
    return [r[0] for r in db.execute(
        "UPDATE tasks SET status = 'queued' WHERE await_event = :name AND status = 'blocked' "
        f"AND {READY_TO_RUN} RETURNING id", {"name": name})]


def select_awaiting(db: apsw.Connection, limit: int) -> list[tuple]:
    """Blocked tasks that wait for an event, oldest first."""
    return db.execute(
        f"SELECT {T} FROM tasks WHERE await_event IS NOT NULL AND status = 'blocked' "
        "ORDER BY id LIMIT ?", (limit,)).fetchall()


# -- checkpoints -------------------------------------------------------------------------

def mark_checkpointed(db: apsw.Connection, lease) -> bool:
    """The fence of a checkpoint write: the attempt still holds its lease."""
    db.execute(
        "UPDATE tasks SET claim_reads = claim_reads | 4 WHERE id = ? AND attempts = ? "
        "AND lease_owner = ? AND status = 'running'", (lease.id, lease.attempt, lease.owner))
    return db.changes() > 0


def upsert_checkpoint(db: apsw.Connection, lease, state: str, now: float) -> None:
    db.execute(
        "INSERT INTO checkpoints (task_id, attempt, state, saved_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (task_id) DO UPDATE SET attempt = excluded.attempt, "
        "state = excluded.state, saved_at = excluded.saved_at",
        (lease.id, lease.attempt, state, now))


def select_checkpoint(db: apsw.Connection, task_id: str) -> tuple | None:
    """(attempt, state JSON text, saved_at) or None."""
    for row in db.execute("SELECT attempt, state, saved_at FROM checkpoints WHERE task_id = ?",
                          (task_id,)):
        return row
    return None


# -- what a claimed attempt reads ----------------------------------------------------------

def select_inputs(db: apsw.Connection, task_id: str) -> list[tuple]:
    """(dependency id, its alias, status, result JSON, error, outcome) of each dependency."""
    return db.execute(
        "SELECT d.depends_on, d.alias, t.status, t.result, t.error, t.outcome "
        "FROM task_deps d JOIN tasks t ON t.id = d.depends_on WHERE d.task_id = ? "
        "ORDER BY d.depends_on", (task_id,)).fetchall()


def select_event_data(db: apsw.Connection, name: str) -> tuple | None:
    for row in db.execute("SELECT data FROM events WHERE name = ?", (name,)):
        return row
    return None


# -- workflows ---------------------------------------------------------------------------

def select_workflow_of(db: apsw.Connection, task_id: str) -> str | None:
    """The workflow of a task (its own id for a root), or None when no such task."""
    for row in db.execute("SELECT coalesce(workflow_id, id) FROM tasks WHERE id = ?", (task_id,)):
        return row[0]
    return None


def workflow_exists(db: apsw.Connection, workflow_id: str) -> bool:
    return bool(db.execute(f"SELECT 1 FROM tasks WHERE {_IN_WORKFLOW} LIMIT 1",
                           {"w": workflow_id}).fetchall())


def select_workflow_tasks(db: apsw.Connection, workflow_id: str, limit: int) -> list[tuple]:
    """The workflow's tasks, oldest first."""
    return db.execute(f"SELECT {T} FROM tasks WHERE {_IN_WORKFLOW} ORDER BY id LIMIT :limit",
                      {"w": workflow_id, "limit": limit}).fetchall()


def select_workflow_counts(db: apsw.Connection, workflow_id: str) -> dict[str, int]:
    """{status: how many} of every task of the workflow."""
    return dict(db.execute(f"SELECT status, count(*) FROM tasks WHERE {_IN_WORKFLOW} "
                           "GROUP BY status", {"w": workflow_id}).fetchall())


def select_workflow_deps(db: apsw.Connection, task_ids: list[str]) -> list[tuple[str, str]]:
    """(task, dependency) pairs of these tasks."""
    return db.execute(
        "SELECT task_id, depends_on FROM task_deps WHERE task_id IN "
        "(SELECT value FROM json_each(?)) ORDER BY task_id, depends_on",
        (json.dumps(task_ids),)).fetchall()


def cancel_workflow_waiting(db: apsw.Connection, workflow_id: str, now: float) -> list[tuple]:
    """Cancel every blocked or queued task of the workflow; (id, has_dependents) of each."""
    return db.execute(
        "UPDATE tasks SET status = 'cancelled', completed_at = :now, outcome = 'cancelled', "
        "error = 'cancelled with its workflow ' || :w "
        f"WHERE {_IN_WORKFLOW} AND status IN ('blocked','queued') "
        "RETURNING id, has_dependents", {"w": workflow_id, "now": now}).fetchall()


def request_cancel_workflow(db: apsw.Connection, workflow_id: str) -> int:
    """Ask the supervisors to stop the workflow's running tasks (each reads its cancel
    requests every 0.25 s); how many are running."""
    return len(db.execute(f"UPDATE tasks SET cancel_requested = 1 WHERE {_IN_WORKFLOW} "
                          "AND status = 'running' RETURNING id", {"w": workflow_id}).fetchall())


def select_with_waiting_dependents(db: apsw.Connection, task_ids: list[str]) -> list[str]:
    """Which of these tasks still have a blocked or queued dependent (outside what was
    just cancelled)."""
    return [r[0] for r in db.execute(
        "SELECT DISTINCT d.depends_on FROM task_deps d JOIN tasks t ON t.id = d.task_id "
        "WHERE d.depends_on IN (SELECT value FROM json_each(?)) "
        "AND t.status IN ('blocked','queued')", (json.dumps(task_ids),))]


def select_tasks_by_ids(db: apsw.Connection, task_ids: list[str]) -> list[tuple]:
    return db.execute(f"SELECT {T} FROM tasks WHERE id IN (SELECT value FROM json_each(?))",
                      (json.dumps(task_ids),)).fetchall()
