"""The claim: its query plan, its order, and what it admits (due time, type caps, memory).

While no limit group has queued tasks, one `UPDATE … WHERE id = (SELECT … ORDER BY
priority DESC, id LIMIT 1) … RETURNING` in a BEGIN IMMEDIATE; its cost must not grow
with the queue, so the plan is checked too (test_hot_path checks every variant).
"""

from __future__ import annotations

import json

import pytest

from supervisor.store import Status, Store
from supervisor.store import claim_queries as cq
from tests.store.factory import LEASE_S, T0, new, ok

PLAN_PARAMS = {"owner": "o", "now": T0, "lease_s": LEASE_S, "full_types": json.dumps(["x"]),
               "free_mb": 1000, "type_mb": json.dumps({"t": 10}), "default_mb": 0}


def claim_plan(store: Store) -> list[str]:
    """The plan of the claim with every clause: caps, budget, per-type memory."""
    sql = cq._GUARDED_VARIANTS[True, True, True]
    return [row[3] for row in store.conn.db.execute("EXPLAIN QUERY PLAN " + sql, PLAN_PARAMS)]


def claim_all(store: Store, now: float = T0, **kw) -> list:
    out = []
    while (task := store.claim("o", now, lease_s=LEASE_S, **kw)) is not None:
        out.append(task)
    return out


# -- the plan -----------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [0, 2000])
def test_claim_uses_the_partial_index_and_never_sorts(store, rows):
    if rows:  # a filled table, analysed, must not tempt the planner elsewhere
        store.enqueue_many([new(type=f"t{i % 7}", priority=i % 5, run_after=T0 + i % 3)
                            for i in range(rows)], T0)
        for _ in range(rows // 4):
            task = store.claim("o", T0, lease_s=LEASE_S)
            store.complete(task.lease, ok(), T0)
        store.conn.db.execute("ANALYZE")
    plan = claim_plan(store)
    assert any("USING INDEX tasks_claim" in line or "USING COVERING INDEX tasks_claim" in line
               for line in plan), plan
    assert not any("TEMP B-TREE" in line for line in plan), plan
    # The only scan of tasks is the index; the outer UPDATE finds its row by primary key.
    assert not any(line.startswith("SCAN tasks") and "tasks_claim" not in line for line in plan), plan


def test_index_tasks_claim_is_partial_on_queued(store):
    (sql,) = store.conn.db.execute("SELECT sql FROM sqlite_master WHERE name = 'tasks_claim'").fetchall()[0]
    assert "(priority DESC, id" in sql and "WHERE status = 'queued'" in sql


# -- order ----------------------------------------------------------------------------------

def test_claim_order_is_priority_desc_then_enqueue_order(store):
    priorities = [0, 5, 0, 5, -1, 10, 0, 5]
    ids = [store.enqueue(new(payload={"i": i}, priority=p), T0) for i, p in enumerate(priorities)]
    expected = [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-priorities[i], i))]
    assert [t.id for t in claim_all(store)] == expected


def test_fifo_within_a_batch_follows_the_batch_order(store):
    ids = store.enqueue_many([new(payload={"i": i}) for i in range(50)], T0)
    more = store.enqueue_many([new(payload={"i": i}) for i in range(50, 60)], T0)
    assert [t.id for t in claim_all(store)] == ids + more


def test_fifo_holds_when_the_caller_clock_steps_back(store):
    first = store.enqueue(new(), T0 + 10)
    second = store.enqueue(new(), T0)  # e.g. NTP stepped the wall clock back
    assert [t.id for t in claim_all(store, T0 + 10)] == [first, second]


def test_claim_sets_the_lease_and_records_an_attempt(store):
    task_id = store.enqueue(new(), T0)
    task = store.claim("sup-1", T0 + 5, lease_s=LEASE_S)
    assert (task.id, task.status, task.attempts) == (task_id, Status.RUNNING, 1)
    assert (task.lease_owner, task.lease_expires_at, task.started_at) == ("sup-1", T0 + 5 + LEASE_S, T0 + 5)
    (attempt,) = store.get(task_id).history
    assert (attempt.attempt, attempt.owner, attempt.started_at, attempt.ended_at) == (1, "sup-1", T0 + 5, None)


def test_nothing_to_claim_returns_none(store):
    assert store.claim("o", T0, lease_s=LEASE_S) is None


# -- due time ---------------------------------------------------------------------------------

def test_future_run_after_is_not_claimed_until_now_reaches_it(store):
    later = store.enqueue(new(priority=9, run_after=T0 + 60), T0)
    assert store.claim("o", T0, lease_s=LEASE_S) is None
    assert store.claim("o", T0 + 59.999, lease_s=LEASE_S) is None
    assert store.claim("o", T0 + 60, lease_s=LEASE_S).id == later


def test_a_due_task_goes_before_a_higher_priority_one_not_yet_due(store):
    later = store.enqueue(new(priority=9, run_after=T0 + 60), T0)
    due = store.enqueue(new(priority=0), T0)
    assert [t.id for t in claim_all(store, T0)] == [due]
    assert [t.id for t in claim_all(store, T0 + 61)] == [later]


# -- per-type caps -------------------------------------------------------------------------------

def test_type_cap_holds(store):
    t1, t2, t3 = (store.enqueue(new(type="t", priority=5), T0) for _ in range(3))
    u = store.enqueue(new(type="u"), T0)
    caps = {"t": 1}
    assert [t.id for t in claim_all(store, caps=caps)] == [t1, u]
    store.complete(store.get(t1).lease, ok(), T0 + 1)
    assert [t.id for t in claim_all(store, T0 + 1, caps=caps)] == [t2]
    assert store.get(t3).status is Status.QUEUED


def test_type_cap_of_two_and_uncapped_types(store):
    for _ in range(5):
        store.enqueue(new(type="t"), T0)
    for _ in range(3):
        store.enqueue(new(type="free"), T0)
    claimed = claim_all(store, caps={"t": 2})
    assert sorted(t.type for t in claimed) == ["free"] * 3 + ["t"] * 2


def test_type_cap_holds_across_two_stores_on_one_file(db_path):
    a, b = Store(db_path), Store(db_path)
    try:
        for _ in range(4):
            a.enqueue(new(type="t"), T0)
        caps = {"t": 1}
        assert a.claim("sup-a", T0, lease_s=LEASE_S, caps=caps) is not None
        assert b.claim("sup-b", T0, lease_s=LEASE_S, caps=caps) is None
        assert b.claim("sup-b", T0, lease_s=LEASE_S, caps={"t": 2}) is not None
    finally:
        a.close()
        b.close()


# -- memory-aware admission ------------------------------------------------------------------------

MEMORY = {"memory_budget_mb": 1000, "type_memory_mb": {"medium": 300}, "default_memory_mb": 100}


def test_declared_memory_is_task_then_type_then_default(store):
    own = store.enqueue(new(type="medium", memory_mb=50), T0)
    typed = store.enqueue(new(type="medium"), T0)
    default = store.enqueue(new(type="other"), T0)
    reserved = {t.id: t.reserved_mb for t in claim_all(store, **MEMORY)}
    assert reserved == {own: 50, typed: 300, default: 100}
    assert store.stats(T0).running_reserved_mb == 450


def test_an_unreserved_type_reserves_nothing_whatever_it_declares(store):
    """`llm.chat` hosted by a relay has no process for memory_mb to limit: its claims
    reserve 0 MB, by its type's figure, the default or its own, and leave the budget to
    the tasks that have a process."""
    hosted = [store.enqueue(new(type="llm.chat"), T0) for _ in range(3)]
    declared = store.enqueue(new(type="llm.chat", memory_mb=900), T0)
    other = store.enqueue(new(type="medium"), T0)
    memory = {**MEMORY, "type_memory_mb": {"medium": 300, "llm.chat": 600}}
    reserved = {t.id: t.reserved_mb for t in claim_all(store, **memory,
                                                         unreserved_types=("llm.chat",))}
    assert reserved == {**{h: 0 for h in hosted}, declared: 0, other: 300}
    assert store.stats(T0).running_reserved_mb == 300
    # Without it (calls in task processes), the same tasks reserve their type's figure.
    more = [store.enqueue(new(type="llm.chat"), T0) for _ in range(2)]
    first = store.claim("o", T0, lease_s=LEASE_S, **memory)
    assert first.id == more[0] and first.reserved_mb == 600
    assert store.claim("o", T0, lease_s=LEASE_S, **memory) is None  # 1000-300-600 < 600


def test_small_task_backfills_when_a_big_one_does_not_fit(store):
    big = store.enqueue(new(type="big", memory_mb=800, priority=9), T0)
    big2 = store.enqueue(new(type="big", memory_mb=800, priority=9), T0)
    medium = store.enqueue(new(type="medium", priority=5), T0)
    small = store.enqueue(new(type="small"), T0)
    assert store.claim("o", T0, lease_s=LEASE_S, **MEMORY).id == big
    # 200 MB left: the second big one (800) and medium (300) wait, small (100) backfills.
    assert store.claim("o", T0, lease_s=LEASE_S, **MEMORY).id == small
    assert store.claim("o", T0, lease_s=LEASE_S, **MEMORY) is None
    assert store.stats(T0).running_reserved_mb == 900
    # Finishing the big one frees its reservation: the next big one is first in line again.
    store.complete(store.get(big).lease, ok(), T0 + 1)
    assert store.claim("o", T0 + 1, lease_s=LEASE_S, **MEMORY).id == big2
    assert store.claim("o", T0 + 1, lease_s=LEASE_S, **MEMORY) is None  # 1000-800-100 = 100 < 300
    store.complete(store.get(small).lease, ok(), T0 + 2)
    assert store.claim("o", T0 + 2, lease_s=LEASE_S, **MEMORY) is None  # 200 free < 300
    store.complete(store.get(big2).lease, ok(), T0 + 3)
    assert store.claim("o", T0 + 3, lease_s=LEASE_S, **MEMORY).id == medium


def test_a_task_that_fits_exactly_is_admitted(store):
    store.enqueue(new(memory_mb=1000), T0)
    assert store.claim("o", T0, lease_s=LEASE_S, memory_budget_mb=1000) is not None
    store.enqueue(new(memory_mb=1), T0)
    assert store.claim("o", T0, lease_s=LEASE_S, memory_budget_mb=1000) is None


def test_reservation_is_released_by_fail_and_requeue(store):
    from supervisor.policy import Backoff
    from tests.store.factory import error
    store.enqueue(new(memory_mb=600, max_attempts=2), T0)
    task = store.claim("o", T0, lease_s=LEASE_S, memory_budget_mb=1000)
    assert store.stats(T0).running_reserved_mb == 600
    assert store.fail(task.lease, error(), T0, Backoff(0, 0)) is Status.QUEUED
    assert store.stats(T0).running_reserved_mb == 0
    task = store.claim("o", T0, lease_s=LEASE_S, memory_budget_mb=1000)
    assert store.fail(task.lease, error(), T0, Backoff(0, 0)) is Status.FAILED
    assert store.stats(T0).running_reserved_mb == 0


def test_without_a_budget_memory_is_not_checked(store):
    store.enqueue(new(memory_mb=10**9), T0)
    assert store.claim("o", T0, lease_s=LEASE_S).reserved_mb == 10**9


def test_type_names_with_dots_and_spaces_find_their_declared_memory(store):
    store.enqueue(new(type="llm.chat v2"), T0)
    task = store.claim("o", T0, lease_s=LEASE_S, memory_budget_mb=1000,
                       type_memory_mb={"llm.chat v2": 700})
    assert task.reserved_mb == 700


@pytest.mark.parametrize("weird", ["$", "$x", "$.a", ""])
def test_a_type_name_that_looks_like_a_json_path_does_not_break_the_claim(store, weird):
    """BUG (reported): the claim looked the type up with `:type_mb ->> type`; SQLite reads a
    right operand starting with '$' (or empty) as a JSON path, so the claim raises
    'bad JSON path' (every claim fails while such a task is queued: the queue is wedged)
    or, for '$', gets the whole object back as text and never admits the task."""
    odd = store.enqueue(new(type=weird), T0)
    normal = store.enqueue(new(type="normal"), T0)
    assert {t.id for t in claim_all(store)} == {odd, normal}
