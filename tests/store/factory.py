"""Small helpers shared by the store tests: new tasks, attempt endings, a fixed epoch, and
the dependency invariants every store state must keep.

Every test passes `now` explicitly, counting from T0; nothing here reads a clock.
"""

from __future__ import annotations

import json

from supervisor.store import AttemptEnd, NewTask, Outcome, Store

T0 = 1_800_000_000.0  # 2027-01-15, a fixed epoch so ids and times are reproducible
LEASE_S = 30.0


def new(type: str = "t", payload: dict | None = None, **fields) -> NewTask:
    """A NewTask with a JSON payload; keyword fields pass through (priority, depends_on …)."""
    if "depends_on" in fields:
        fields["depends_on"] = tuple(fields["depends_on"])
    return NewTask(type=type, payload=json.dumps(payload or {}), **fields)


def ok(result: dict | None = None, **fields) -> AttemptEnd:
    return AttemptEnd(Outcome.SUCCEEDED, result=json.dumps(result) if result is not None else None,
                      **fields)


def error(reason: str = "ValueError: boom", **fields) -> AttemptEnd:
    return AttemptEnd(Outcome.ERROR, reason=reason, **fields)


def dependency_violations(store: Store) -> list[str]:
    """Tasks left waiting on a dependency that finished without success, queued or running
    ahead of an unfinished dependency, or blocked though every dependency succeeded."""
    rows = store.conn.db.execute(
        "SELECT t.id, t.status, group_concat(d.status) FROM tasks t "
        "JOIN task_deps e ON e.task_id = t.id JOIN tasks d ON d.id = e.depends_on "
        "WHERE t.status IN ('blocked','queued','running') GROUP BY t.id, t.status").fetchall()
    bad = []
    for task_id, status, dep_statuses in rows:
        deps = dep_statuses.split(",")
        if any(s in ("failed", "cancelled") for s in deps):
            bad.append(f"{task_id} is {status} but depends on a {'/'.join(deps)} task")
        elif status in ("queued", "running") and any(s != "succeeded" for s in deps):
            bad.append(f"{task_id} is {status} before its dependencies succeeded")
        elif status == "blocked" and all(s == "succeeded" for s in deps):
            bad.append(f"{task_id} is blocked though every dependency succeeded")
    return bad
