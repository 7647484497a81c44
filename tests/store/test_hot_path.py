"""The claim + complete hot path: what the speed-ups of its statements must not change.

Claim statement variants (clauses that cannot exclude anything are left out), the cached
JSON of per-type memory, Task rows built without the dataclass __init__, the claim's
savepoint-free nesting, and prune finding succeeded tasks through their attempts since
migration 0004 took them out of tasks_finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest

from supervisor.errors import ForkedConnection, NotFound
from supervisor.policy import Backoff
from supervisor.store import Status, Store, Task
from supervisor.store import flow
from supervisor.store import claim_queries as cq
from supervisor.store import queries as q
from tests.store.forking import reap
from tests.store.factory import LEASE_S, T0, error, new, ok

BACKOFF = Backoff(initial_s=1.0, max_s=60.0)


def plan(store: Store, sql: str, params) -> list[str]:
    return [row[3] for row in store.conn.db.execute("EXPLAIN QUERY PLAN " + sql, params)]


def fill_and_analyse(store: Store, n: int = 2000) -> None:
    store.enqueue_many([new(type=f"t{i % 7}", priority=i % 5) for i in range(n)], T0)
    for i in range(n // 2):
        task = store.claim("o", T0 + i, lease_s=LEASE_S)
        if i % 10:
            store.complete(task.lease, ok(), T0 + i)
        else:
            store.fail(task.lease, error(retryable=False), T0 + i, BACKOFF)
    store.conn.db.execute("ANALYZE")


# -- plans of the statements the claim runs -------------------------------------------------

# Whole plan lines: a table read any other way (a bare SCAN, another index) fails the test.
SCAN_CLAIM = re.compile(r"SCAN tasks USING (COVERING )?INDEX tasks_claim")
SEEK_GROUP = re.compile(r"SEARCH tasks USING (COVERING )?INDEX tasks_claim_limited \(limit_keys=\?\)")
SEEK_ID = re.compile(r"SEARCH tasks USING (INDEX sqlite_autoindex_tasks_1|PRIMARY KEY) \(id=\?\)")
SCAN_HEADS = re.compile(r"SCAN (limit_groups|g) USING (COVERING )?INDEX limit_groups_head")


@pytest.fixture(scope="module")
def queued(tmp_path_factory):
    """A file with 5,000 queued tasks (a third of them in four limit groups, two thirds not
    due yet, seven types, five priorities) and 1,000 finished, analysed: its statistics must
    not tempt the planner away from the claim's indexes."""
    store = Store(tmp_path_factory.mktemp("plans") / "taskvisor.db")
    try:
        store.enqueue_many([new(type=f"t{i % 7}", priority=i % 5, run_after=T0 + i % 3,
                                limit_keys=(f"g:{i % 4}",) if i % 3 == 0 else ())
                            for i in range(6000)], T0)
        for _ in range(1000):
            task = store.claim("o", T0 + 5, lease_s=LEASE_S)
            store.complete(task.lease, ok(), T0 + 5)
        store.conn.db.execute("ANALYZE")
        db = store.conn.db
        assert db.execute("SELECT count(*) FROM tasks WHERE status = 'queued'").fetchall() == [(5000,)]
        (group,), = db.execute("SELECT keys FROM limit_groups WHERE queued > 0 LIMIT 1")
        yield store, {"owner": "o", "now": T0, "lease_s": LEASE_S, "default_mb": 0,
                      "full_types": json.dumps(["t1"]), "free_mb": 1000,
                      "type_mb": json.dumps({"t2": 10}), "grp": group, "id": task.id}
    finally:
        store.close()


def reads(lines: list[str], *tables: str) -> list[str]:
    """The plan lines that read one of `tables` (names or aliases): SCAN or SEARCH."""
    return [line for line in lines if line.split(" ")[0] in ("SCAN", "SEARCH")
            and line.split(" ")[1] in tables]


def assert_reads(lines: list[str], tables: tuple[str, ...], *expected: re.Pattern) -> None:
    """`tables` are read exactly as `expected` (one pattern per read, in plan order), and
    no ORDER BY needs a temp b-tree."""
    got = reads(lines, *tables)
    assert len(got) == len(expected) and all(
        p.fullmatch(line) for p, line in zip(expected, got)), lines
    assert not any("TEMP B-TREE" in line for line in lines), lines


@pytest.mark.parametrize("key", ["plain"] + sorted(cq._GUARDED_VARIANTS))
def test_the_guarded_claim_walks_the_claim_index_and_checks_groups_by_theirs(queued, key):
    """What `Store.claim` runs first while no limit group had queued tasks: the outer
    UPDATE finds its row by id, the candidate is the first match of tasks_claim in
    order (LIMIT 1 over the index: no sort), the guard reads limit_groups_head."""
    store, params = queued
    if key == "plain":  # the common case, bound by position
        sql, params = cq._GUARDED_PLAIN, ("o", T0, LEASE_S, 0)
        assert ":" not in sql.split("RETURNING")[0], "a named parameter left behind"
    else:
        sql = cq._GUARDED_VARIANTS[key]
    lines = plan(store, sql, params)
    assert_reads(lines, ("tasks",), SEEK_ID, SCAN_CLAIM)
    assert_reads(lines, ("limit_groups",), SCAN_HEADS)


@pytest.mark.parametrize("key", sorted(cq._BEST_VARIANTS))
def test_every_best_task_variant_reads_only_its_own_index(queued, key):
    """The candidates `Store._best_candidate` reads: of no group, the first match of
    tasks_claim in order; of a group, one seek to the group in tasks_claim_limited."""
    store, params = queued
    grouped = key[0]
    lines = plan(store, cq._BEST_VARIANTS[key], params)
    assert_reads(lines, ("tasks",), SEEK_GROUP if grouped else SCAN_CLAIM)


@pytest.mark.parametrize("typed", sorted(cq._CLAIM_ID_VARIANTS))
def test_the_claim_by_id_seeks_its_row(queued, typed):
    store, params = queued
    assert_reads(plan(store, cq._CLAIM_ID_VARIANTS[typed], params), ("tasks",), SEEK_ID)


def test_the_open_groups_are_read_in_head_order_from_their_index(queued):
    store, _ = queued
    lines = plan(store, flow._OPEN_GROUPS, ())
    assert_reads(lines, ("g", "limit_groups"), SCAN_HEADS)


def test_without_budget_or_caps_memory_is_still_reserved(store):
    """The lean statement (no budget, no caps) still records what a task declared, so a
    supervisor with a budget sharing the file counts it."""
    a = store.enqueue(new(type="big"), T0)
    b = store.enqueue(new(type="other", memory_mb=5), T0)
    c = store.enqueue(new(type="other"), T0)
    got = {t.id: t.reserved_mb for t in
           (store.claim("o", T0, lease_s=LEASE_S, type_memory_mb={"big": 300}, default_memory_mb=7)
            for _ in range(3))}
    assert got == {a: 300, b: 5, c: 7}


def test_type_memory_cache_follows_the_content_of_the_dict(store):
    sizes = {"t": 100}
    first = store.enqueue(new(type="t"), T0)
    second = store.enqueue(new(type="t"), T0)
    assert store.claim("o", T0, lease_s=LEASE_S, type_memory_mb=sizes).reserved_mb == 100
    sizes["t"] = 250  # the same dict object, changed: the cache must not serve the old JSON
    task = store.claim("o", T0, lease_s=LEASE_S, type_memory_mb=sizes)
    assert (task.id, task.reserved_mb) == (second, 250)
    assert store.get(first).reserved_mb == 100


def test_budget_and_caps_still_exclude_with_the_cached_json(store):
    store.enqueue(new(type="big"), T0)
    small = store.enqueue(new(type="small"), T0)
    kw = {"memory_budget_mb": 200, "type_memory_mb": {"big": 300, "small": 50}}
    assert store.claim("o", T0, lease_s=LEASE_S, **kw).id == small
    assert store.claim("o", T0, lease_s=LEASE_S, **kw) is None


# -- rows ----------------------------------------------------------------------------------

def test_task_from_row_equals_the_dataclass_built_the_usual_way(store):
    task_id = store.enqueue(new(payload={"k": [1, 2]}, priority=3), T0)
    claimed = store.claim("sup", T0, lease_s=LEASE_S)
    row = q.select_task(store.conn.db, task_id)
    values = list(row)
    values[2], values[4], values[19], values[22] = (
        json.loads(values[2]), Status(values[4]), bool(values[19]), None)
    values[29] = bool(values[29])  # run_on_failure
    values[31] = ()  # limit_keys: NULL is no keys
    usual = Task(*values, depends_on=("x",))
    fast = Task.from_row(row, ("x",))
    assert fast == usual and fast == dataclasses.replace(claimed, depends_on=("x",))
    assert fast.status is Status.RUNNING and fast.payload == {"k": [1, 2]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.status = Status.QUEUED  # type: ignore[misc]
    assert dataclasses.asdict(fast)["priority"] == 3


# -- grouping ------------------------------------------------------------------------------

def test_claim_in_a_grouped_transaction_commits_with_it_and_rolls_back_with_it(store):
    store.enqueue_many([new(), new()], T0)
    with store.transaction():
        first = store.claim("o", T0, lease_s=LEASE_S)
    with pytest.raises(RuntimeError), store.transaction():
        store.complete(first.lease, ok(), T0)
        store.claim("o", T0, lease_s=LEASE_S)
        raise RuntimeError("the pass failed")
    assert store.get(first.id).status is Status.RUNNING
    assert [t.status for t in store.list(status="queued")] == [Status.QUEUED]
    assert store.conn._depth == 0 and not store.conn.db.in_transaction


def test_a_claim_error_inside_a_grouped_transaction_keeps_the_other_operations(store):
    done = store.enqueue(new(), T0)
    store.enqueue(new(), T0)
    task = store.claim("o", T0, lease_s=LEASE_S)
    assert task.id == done
    with store.transaction():
        store.complete(task.lease, ok(), T0)
        with pytest.raises(TypeError):
            store.claim("o", T0, lease_s=LEASE_S, caps={"t": "not a number"})
    assert store.get(done).status is Status.SUCCEEDED
    assert store.conn._depth == 0


def test_a_child_forked_inside_a_transaction_cannot_join_it(store):
    store.enqueue(new(), T0)
    with store.transaction():
        pid = os.fork()
        if pid == 0:  # the child: every nested write must refuse the inherited connection
            code = 1
            try:
                store.claim("child", T0, lease_s=LEASE_S)
            except ForkedConnection:
                code = 0
            except BaseException:  # noqa: BLE001 - anything else is the bug
                code = 2
            os._exit(code)
        code = reap(pid)
    assert code == 0
    assert store.claim("parent", T0, lease_s=LEASE_S) is not None


# -- prune since 0004 ----------------------------------------------------------------------

def test_tasks_finished_holds_only_failed_and_cancelled_tasks(store):
    (sql,) = store.conn.db.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'tasks_finished'").fetchall()[0]
    assert "WHERE status IN ('failed','cancelled')" in sql


def test_prune_of_a_task_that_failed_then_succeeded(store):
    task_id = store.enqueue(new(max_attempts=3), T0)
    assert store.fail(store.claim("o", T0, lease_s=LEASE_S).lease, error(), T0 + 1, BACKOFF) is Status.QUEUED
    store.complete(store.claim("o", T0 + 100, lease_s=LEASE_S).lease, ok(), T0 + 100)
    assert store.prune(T0 + 50) == 0  # an attempt ended before the cutoff, the task after it
    assert store.prune(T0 + 101) == 1
    assert store.conn.db.execute("SELECT count(*) FROM attempts").fetchall()[0][0] == 0
    with pytest.raises(NotFound):
        store.get(task_id)


def test_prune_of_cancelled_and_dependency_failed_tasks_without_attempts(store):
    cancelled = store.enqueue(new(), T0)
    store.cancel(cancelled, T0 + 1)
    parent = store.enqueue(new(max_attempts=1), T0)
    child = store.enqueue(new(depends_on=[parent]), T0)
    store.fail(store.claim("o", T0, lease_s=LEASE_S).lease, error(), T0 + 2, BACKOFF)
    assert {store.get(i).status for i in (cancelled, parent, child)} == {Status.CANCELLED, Status.FAILED}
    assert store.prune(T0 + 3) == 3
    assert store.list() == []


def test_prune_statements_use_indexes(store):
    fill_and_analyse(store)
    for line in plan(store, _prune_sql()[0], {"before": T0 + 10}) + \
            plan(store, _prune_sql()[1], (T0 + 10,)):
        assert not line.startswith("SCAN"), line


def _prune_sql() -> tuple[str, str]:
    """The two statements of queries.prune_finished, captured as it runs them."""
    seen = []

    class Spy:
        def execute(self, sql, args=()):
            seen.append(sql)
            return iter(())

        def changes(self):
            return 0

    q.prune_finished(Spy(), T0)
    assert len(seen) == 2
    return seen[0], seen[1]
