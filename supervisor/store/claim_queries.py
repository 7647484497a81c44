"""The claim's SQL statements: the next due queued task that fits, leased in one statement
(or, with limit groups, chosen by reads and leased by id in the same transaction), and what
the claim reads to decide (running counts by type, reserved memory).

Each takes a raw apsw connection already inside the caller's write transaction
(`supervisor.store.tasks.Store.claim`) and `now`. Every statement seeks by an index:
tests/store/test_hot_path.py pins their plans. This module must never open connections
or transactions.
"""

from __future__ import annotations

import json

import apsw

from supervisor.store.queries import T, _one
from supervisor.store.rows import Task


def count_running_by_type(db: apsw.Connection, types: list[str]) -> dict[str, int]:
    return dict(db.execute(
        "SELECT type, count(*) FROM tasks WHERE status = 'running' "
        "AND type IN (SELECT value FROM json_each(?)) GROUP BY type", (json.dumps(types),)))


def sum_reserved_mb(db: apsw.Connection) -> int:
    return _one(db.execute("SELECT total(reserved_mb) FROM tasks WHERE status = 'running' "
                           "AND reserved_mb > 0"))[0]


# A type whose attempts run in no process of their own (`llm.chat` hosted by a model-call
# relay) is UNRESERVED_MB in :type_mb: its tasks reserve nothing, whatever they declare.
UNRESERVED_MB = -1

# The effective declared memory of a queued row: its own, else its type's, else the default
# (0 for an unreserved type). json_each keys compare as plain strings; `:type_mb ->> type`
# would read a type such as "$x" (or "") as a JSON path and make the whole claim fail.
_DECLARED_MB = ("coalesce((SELECT CASE WHEN j.value < 0 THEN 0 ELSE coalesce(tasks.memory_mb, "
                "j.value) END FROM json_each(:type_mb) AS j WHERE j.key = tasks.type), "
                "memory_mb, :default_mb)")
_DEFAULT_MB = "coalesce(memory_mb, :default_mb)"  # the same when no type declares memory


def _claim_sql(capped: bool, budget: bool, typed: bool) -> str:
    """The claim of the best task of no limit group, made only while no limit group has
    queued tasks, checked in the same statement: the claim of a file without limited work
    costs no statement more than it did before limits existed (migration 0009). Without
    the clauses that cannot exclude anything: no type at its cap, no memory budget, no
    per-type memory. Each variant is one prepared statement in apsw's cache."""
    declared = _DECLARED_MB if typed else _DEFAULT_MB
    where = _claim_where(capped, budget, declared)
    return _lease(declared, f"""id = (
    SELECT id FROM tasks INDEXED BY tasks_claim
    WHERE limit_keys IS NULL AND {where}
    ORDER BY priority DESC, id
    LIMIT 1)
  AND NOT EXISTS (SELECT 1 FROM limit_groups INDEXED BY limit_groups_head WHERE queued > 0)""")


def _lease(declared: str, where: str) -> str:
    """The UPDATE that leases the queued row `where` picks, returning it."""
    return f"""
UPDATE tasks SET status = 'running', attempts = attempts + 1, lease_owner = :owner,
       lease_expires_at = :now + :lease_s, started_at = :now, reserved_mb = {declared},
       pid = NULL, pid_started_at = NULL, progress = NULL, progress_message = NULL
WHERE {where}
RETURNING {T}
"""


def _claim_where(capped: bool, budget: bool, declared: str) -> str:
    where = ["status = 'queued'", "run_after <= :now"]
    if capped:
        where.append("type NOT IN (SELECT value FROM json_each(:full_types))")
    if budget:
        where.append(f"{declared} <= :free_mb")
    return " AND ".join(where)


def _best_sql(grouped: bool, capped: bool, budget: bool, typed: bool) -> str:
    """(priority, id) of the best due queued task that fits: of no group, or of the limit
    group :grp (one seek into its index, migration 0009). `(:grp || '')`, not `:grp`:
    compared bare, the parameter's value takes part in the partial-index check, so SQLite
    re-prepared the statement on every bind, ~20x its cost."""
    where = _claim_where(capped, budget, _DECLARED_MB if typed else _DEFAULT_MB)
    if grouped:
        return (f"SELECT priority, id FROM tasks INDEXED BY tasks_claim_limited "
                f"WHERE limit_keys IS NOT NULL AND limit_keys = (:grp || '') AND {where} "
                "ORDER BY priority DESC, id LIMIT 1")
    return (f"SELECT priority, id FROM tasks INDEXED BY tasks_claim WHERE limit_keys IS NULL "
            f"AND {where} ORDER BY priority DESC, id LIMIT 1")


def _claim_id_sql(typed: bool) -> str:
    """Lease the queued task :id (chosen by `_best_sql` reads in the same transaction)."""
    return _lease(_DECLARED_MB if typed else _DEFAULT_MB, "id = :id AND status = 'queued'")


# No cap reached, no budget, no per-type memory, with numbered parameters:
# ?1 owner, ?2 now, ?3 lease_s, ?4 default_mb.
_GUARDED_PLAIN = (_claim_sql(False, False, False).replace(":owner", "?1").replace(":now", "?2")
                  .replace(":lease_s", "?3").replace(":default_mb", "?4"))
_GUARDED_VARIANTS = {(c, b, t): _claim_sql(c, b, t)
                     for c in (False, True) for b in (False, True) for t in (False, True)}
_BEST_VARIANTS = {(g, c, b, t): _best_sql(g, c, b, t) for g in (False, True)
                  for c in (False, True) for b in (False, True) for t in (False, True)}
_CLAIM_ID_VARIANTS = {t: _claim_id_sql(t) for t in (False, True)}


def claim_task(db: apsw.Connection, *, owner: str, now: float, lease_s: float,
               full_types: list[str], free_mb: float | None, type_mb: str,
               default_mb: int) -> Task | None:
    """Lease the next due queued task of no limit group whose type is not at its cap and
    whose memory fits, only if no limit group has queued tasks: None also when one has
    (the caller then picks with `select_best_task` and leases with `claim_task_id`).

    `free_mb` None: no memory budget. `type_mb`: {type: MB} as JSON text (the store
    caches it: the same few types on every claim)."""
    typed = type_mb != "{}"
    if full_types or free_mb is not None or typed:
        args = _claim_args(now, full_types, free_mb, type_mb, default_mb)
        args.update(owner=owner, lease_s=lease_s)
        cursor = db.execute(_GUARDED_VARIANTS[bool(full_types), free_mb is not None, typed], args)
    else:  # the common case, bound by position (cheaper than a dict)
        cursor = db.execute(_GUARDED_PLAIN, (owner, now, lease_s, default_mb))
    row = _one(cursor)
    return Task.from_row(row) if row else None


def _claim_args(now: float, full_types: list[str], free_mb: float | None, type_mb: str,
                default_mb: int) -> dict:
    args = {"now": now, "default_mb": default_mb}
    if full_types:
        args["full_types"] = json.dumps(full_types)
    if free_mb is not None:
        args["free_mb"] = free_mb
    if type_mb != "{}":
        args["type_mb"] = type_mb
    return args


def select_best_task(db: apsw.Connection, *, now: float, full_types: list[str],
                     free_mb: float | None, type_mb: str, default_mb: int,
                     group: str | None = None) -> tuple[int, str] | None:
    """(priority, id) of the task `claim_task` would lease, of no group (`group` None)
    or of the limit group `group` (its limit_keys text); None when none is due and fits."""
    args = _claim_args(now, full_types, free_mb, type_mb, default_mb)
    if group is not None:
        args["grp"] = group
    sql = _BEST_VARIANTS[group is not None, bool(full_types), free_mb is not None, type_mb != "{}"]
    row = _one(db.execute(sql, args))
    return (row[0], row[1]) if row else None


def claim_task_id(db: apsw.Connection, task_id: str, *, owner: str, now: float,
                  lease_s: float, type_mb: str, default_mb: int) -> Task | None:
    """Lease the queued task `task_id` (picked by `select_best_task` in this transaction)."""
    args = {"id": task_id, "owner": owner, "now": now, "lease_s": lease_s,
            "default_mb": default_mb}
    typed = type_mb != "{}"
    if typed:
        args["type_mb"] = type_mb
    row = _one(db.execute(_CLAIM_ID_VARIANTS[typed], args))
    return Task.from_row(row) if row else None
