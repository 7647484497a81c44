"""Workflows in the store (issue 12) on a real file: results flow to dependents, spawned
tasks are stored with the success and only with it, checkpoints are fenced, events
release once, run_on_failure fans in over failures, a workflow cancels in one transaction."""

from __future__ import annotations

import dataclasses
import json
import time

from supervisor import Queue, policy
from supervisor.store import AttemptEnd, Outcome, Status, Store, new_id
from tests.store.factory import LEASE_S, T0, error, new, ok


def claim(store: Store, now: float = T0):
    task = store.claim("owner", now, lease_s=LEASE_S)
    assert task is not None
    return task


def spawned(parent_id: str, type: str = "child", **fields):
    return new(type, id=new_id(T0), parent_id=parent_id, **fields)


def test_a_task_without_dependencies_event_or_checkpoint_reads_nothing_more(store):
    store.enqueue(new("plain"), T0)
    task = claim(store)
    assert task.claim_reads == 0 and task.context is None
    assert task.workflow == task.id and task.to_dict()["workflow_id"] == task.id


def test_inputs_hold_each_dependency_result_under_its_id_and_local_name(store):
    a, b, c = store.enqueue_many([new("a", id="A1"), new("b", id="B1"),
                                  new("c", depends_on=("A1", "B1"),
                                      aliases=(("A1", "first"),))], T0)
    for result in ({"n": 1}, [2]):
        t = claim(store)
        store.complete(t.lease, ok(result), T0)
    t = claim(store)
    assert t.id == c
    assert {k: json.loads(v) for k, v in t.context["inputs"].items()} == {a: {"n": 1}, b: [2]}
    assert t.context["input_aliases"] == {"first": a} and t.context["input_errors"] == []


def test_spawned_tasks_are_stored_with_the_success_in_the_parents_workflow(store):
    parent = store.enqueue(new("plan"), T0)
    task = claim(store)
    kids = [spawned(parent, payload={"i": i}) for i in range(3)]
    join = spawned(parent, "join", depends_on=tuple(k.id for k in kids))
    end = dataclasses.replace(ok({"planned": 3}), spawn=tuple(kids + [join]))
    assert store.check_spawns(end.spawn) is None
    assert store.complete(task.lease, end, T0)
    stored = {t.id: t for t in store.list(workflow_id=parent)}
    assert set(stored) == {parent, join.id, *(k.id for k in kids)}
    for k in kids:
        assert stored[k.id].status is Status.QUEUED and stored[k.id].parent_id == parent
        assert stored[k.id].workflow == parent
    assert stored[join.id].status is Status.BLOCKED
    tasks, edges, _ = store.workflow(parent)
    assert {(e["from"], e["to"], e["kind"]) for e in edges} >= {
        (parent, join.id, "spawned"), *((k.id, join.id, "depends_on") for k in kids)}


def test_a_workflow_past_10000_tasks_says_it_was_cut_and_counts_every_task(store, db_path):
    # Queue.workflow and GET /api/workflows/{id} held the first 10,000 tasks, and counts
    # and finished described only those, with no sign that any were left out.
    root = store.enqueue(new("root"), T0)
    store.enqueue_many([new("step", id=new_id(T0), workflow_id=root, await_event="go")
                        for _ in range(10_000)], T0)
    with Queue(db_path) as queue:
        wf = queue.workflow(root)
        assert len(wf.tasks) == 10_000 and wf.tasks[0].id == root
        assert (wf.total, wf.truncated, wf.finished) == (10_001, True, False)
        assert wf.counts == {"queued": 1, "blocked": 10_000}
        shown = wf.to_dict()
        assert (shown["total"], shown["truncated"]) == (10_001, True)
        assert shown["counts"] == {"queued": 1, "blocked": 10_000} and len(shown["tasks"]) == 10_000
        small = queue.workflow(queue.enqueue("alone")).to_dict()
        assert (small["total"], small["truncated"], small["counts"]) == (1, False, {"queued": 1})
    tasks, edges, counts = store.workflow(root, limit=2)
    assert len(tasks) == 2 and counts == {"queued": 1, "blocked": 10_000}


def test_an_attempt_that_does_not_succeed_spawns_nothing(store):
    parent = store.enqueue(new("plan", max_attempts=2), T0)
    task = claim(store)
    end = dataclasses.replace(error(), spawn=(spawned(parent),))
    assert store.fail(task.lease, end, T0, policy.Backoff(0, 0)) is Status.QUEUED
    assert [t.id for t in store.list()] == [parent]
    # and a stale lease (another supervisor rescued it) stores neither success nor children
    store.claim("owner", T0 + 1, lease_s=LEASE_S)
    end = dataclasses.replace(ok(), spawn=(spawned(parent),))
    assert not store.complete(task.lease, end, T0 + 2)
    assert [t.id for t in store.list()] == [parent]


def test_spawns_of_a_workflow_cancelled_meanwhile_are_dropped(store):
    parent = store.enqueue(new("plan"), T0)
    task = claim(store)
    assert store.cancel_workflow(parent, T0) == {"id": parent, "cancelled": 0, "stopping": 1}
    assert store.complete(task.lease, dataclasses.replace(ok(), spawn=(spawned(parent),)), T0)
    assert [t.id for t in store.list()] == [parent]


def test_a_spawn_cycle_or_unknown_dependency_is_refused_with_a_clear_reason(store):
    parent = store.enqueue(new("plan"), T0)
    a, b = new_id(T0), new_id(T0)
    cycle = (new("x", id=a, depends_on=(b,), parent_id=parent),
             new("y", id=b, depends_on=(a,), parent_id=parent))
    assert "cycle" in store.check_spawns(cycle)
    assert "unknown task NOPE" in store.check_spawns((spawned(parent, depends_on=("NOPE",)),))
    # depending on the parent itself is fine: it succeeds in the same transaction
    assert store.check_spawns((spawned(parent, depends_on=(parent,)),)) is None


def test_checkpoint_writes_from_a_stale_attempt_change_nothing(store):
    store.enqueue(new("agent", max_attempts=3), T0)
    first = claim(store)
    assert store.checkpoint(first.lease, '{"step":1}', T0)
    store.fail(first.lease, error(), T0, policy.Backoff(0, 0))
    second = claim(store, T0 + 1)
    assert second.context == {"checkpoint_state": '{"step":1}'}
    assert not store.checkpoint(first.lease, '{"step":99}', T0 + 2)  # stale attempt
    assert not store.checkpoint(dataclasses.replace(second.lease, owner="other"), '{"step":98}', T0)
    assert store.checkpoint_of(second.id)[:2] == (1, '{"step":1}')
    assert store.checkpoint(second.lease, '{"step":2}', T0 + 3)
    assert store.checkpoint_of(second.id)[:2] == (2, '{"step":2}')


def test_an_event_releases_its_waiting_task_once_and_keeps_its_first_data(store):
    waiting = store.enqueue(new("publish", await_event="approve"), T0)
    assert store.get(waiting).status is Status.BLOCKED
    assert store.awaiting()[0].id == waiting
    assert store.send_event("approve", '{"by":"ann"}', T0) == (True, [waiting])
    assert store.send_event("approve", '{"by":"bob"}', T0) == (False, [])
    task = claim(store)
    assert task.id == waiting and task.context == {"event": '{"by":"ann"}'}
    assert claim_none(store)


def claim_none(store: Store) -> bool:
    return store.claim("owner", T0 + 5, lease_s=LEASE_S) is None


def test_an_event_sent_before_its_task_exists_releases_it_at_once(store):
    store.send_event("early", None, T0)
    task_id = store.enqueue(new("t", await_event="early"), T0)
    assert store.get(task_id).status is Status.QUEUED
    assert claim(store).context == {"event": "null"}


def test_an_event_does_not_release_a_task_whose_dependencies_are_unfinished(store):
    dep = store.enqueue(new("dep"), T0)
    waiting = store.enqueue(new("w", await_event="go", depends_on=(dep,)), T0)
    assert store.send_event("go", None, T0) == (True, [])
    t = claim(store)
    assert t.id == dep
    store.complete(t.lease, ok(), T0)
    assert store.get(waiting).status is Status.QUEUED


def test_run_on_failure_runs_with_the_failed_dependencys_error(store):
    a = store.enqueue(new("a", max_attempts=1), T0)
    b = store.enqueue(new("b"), T0)
    join = store.enqueue(new("join", depends_on=(a, b), run_on_failure=True), T0)
    plain = store.enqueue(new("plain", depends_on=(a,)), T0)
    t = claim(store)
    store.fail(t.lease, error("ValueError: boom"), T0, policy.Backoff(0, 0))
    assert store.get(plain).outcome == "dependency_failed"
    assert store.get(join).status is Status.BLOCKED  # b has not ended yet
    t = claim(store)
    store.complete(t.lease, ok([1]), T0)
    t = claim(store)
    assert t.id == join
    assert t.context["input_errors"] == [a]
    failure = json.loads(t.context["inputs"][a])
    assert failure == {"id": a, "status": "failed", "outcome": "error", "error": "ValueError: boom"}
    assert json.loads(t.context["inputs"][b]) == [1]
    # enqueued after the failure: it runs at once
    late = store.enqueue(new("late", depends_on=(a,), run_on_failure=True), T0)
    assert store.get(late).status is Status.QUEUED


def test_joining_a_workflow_that_does_not_exist_is_refused(store):
    import pytest
    from supervisor.errors import DependencyError
    with pytest.raises(DependencyError, match="unknown workflow"):
        store.enqueue(new("t", workflow_id="NOPE"), T0)
    root = store.enqueue(new("root"), T0)
    joined = store.enqueue(new("t", workflow_id=root), T0)
    assert {t.id for t in store.list(workflow_id=root)} == {root, joined}


def test_cancelling_a_workflow_of_10000_tasks_takes_one_transaction_under_a_second(store):
    root = store.enqueue(new("root"), T0)
    batch = [new("step", id=new_id(T0), workflow_id=root) for _ in range(10_000)]
    # half of them wait on the previous one: blocked and queued both
    batch = [dataclasses.replace(t, depends_on=(batch[i - 1].id,)) if i % 2 else t
             for i, t in enumerate(batch)]
    store.enqueue_many(batch, T0)
    outside = store.enqueue(new("outside", depends_on=(batch[0].id,)), T0)
    running = claim(store)
    commits = []
    store.conn.db.setcommithook(lambda: bool(commits.append(1)))
    started = time.perf_counter()
    result = store.cancel_workflow(root, T0 + 1)
    elapsed = time.perf_counter() - started
    store.conn.db.setcommithook(None)
    assert len(commits) == 1, "one transaction"
    assert elapsed < 1.0, f"cancel took {elapsed:.3f}s"
    assert result == {"id": root, "cancelled": 10_000, "stopping": 1}
    assert store.cancel_requests("owner") == [running.id]
    assert store.get(outside).outcome == "dependency_failed"
    assert store.stats(T0).totals()["cancelled"] == 10_000


def test_joining_through_any_task_of_a_workflow_joins_that_workflow(store):
    root = store.enqueue(new("root"), T0)
    member = store.enqueue(new("t", workflow_id=root), T0)
    via_member = store.enqueue(new("t", workflow_id=member), T0)
    assert store.get(via_member).workflow == root


def test_a_spawned_dedupe_key_held_by_an_unfinished_task_reuses_it(store):
    holder = store.enqueue(new("t", dedupe_key="k"), T0)
    parent = store.enqueue(new("plan"), T0)
    task = store.claim("owner", T0, lease_s=LEASE_S)
    assert task.id == holder
    task = claim(store)
    assert task.id == parent
    dup = spawned(parent, dedupe_key="k")
    after = spawned(parent, "after", depends_on=(dup.id,))
    end = dataclasses.replace(ok(), spawn=(dup, after))
    assert store.check_spawns(end.spawn) is None
    with store.transaction(all_or_nothing=True):
        assert store.complete(task.lease, end, T0)
    stored = store.get(after.id)
    assert stored.depends_on == (holder,)  # the spawn's id stands for the holder
    assert [t.id for t in store.list(type="child")] == []


def test_a_spawned_id_that_is_taken_or_repeated_is_refused(store):
    parent = store.enqueue(new("plan"), T0)
    assert "already taken" in store.check_spawns((new("x", id=parent, parent_id=parent),))
    kid = spawned(parent)
    assert "same id" in store.check_spawns((kid, kid))


def test_wait_all_returns_the_finished_tasks_in_order_or_times_out(db_path):
    import pytest
    from supervisor import Queue
    from supervisor.workflow_client import WaitTimeout
    with Queue(db_path) as queue:
        a, b = queue.enqueue("t"), queue.enqueue("t")
        store = Store(db_path)
        try:
            now = time.time()
            first = store.claim("owner", now, lease_s=LEASE_S)
            store.complete(first.lease, ok({"n": 1}), now)
            with pytest.raises(WaitTimeout) as info:
                queue.wait_all([a, b], timeout=0.2)
            assert [t.id for t in info.value.finished] == [a]
            second = store.claim("owner", now, lease_s=LEASE_S)
            store.fail(second.lease, dataclasses.replace(error(), retryable=False), now,
                       policy.Backoff(0, 0))
        finally:
            store.close()
        done = queue.wait_all([b, a], timeout=5)
        assert [(t.id, t.status) for t in done] == [(b, Status.FAILED), (a, Status.SUCCEEDED)]
        with pytest.raises(Exception, match="no task with id NOPE"):
            queue.wait_all([a, "NOPE"], timeout=1)


def test_the_id_of_a_spawn_deduped_to_another_task_names_that_task(store, db_path):
    """A handler returns the ids ctx.spawn gave it: one whose dedupe key was held is
    stored as the holder, and its id keeps naming the holder everywhere a task id goes
    (get, wait_all, depends_on of a later enqueue or spawn, cancel, a short id), until
    retention deletes the holder."""
    from supervisor import Queue
    holder = store.enqueue(new("t", dedupe_key="k"), T0)
    parent = store.enqueue(new("plan"), T0)
    assert claim(store).id == holder
    task = claim(store)
    dup = spawned(parent, dedupe_key="k")
    end = dataclasses.replace(ok({"child": dup.id}), spawn=(dup,))
    with store.transaction(all_or_nothing=True):
        assert store.complete(task.lease, end, T0)
    assert store.get(dup.id).id == holder
    assert store.tasks_by_ids([dup.id, parent])[dup.id].id == holder
    later = store.enqueue(new("after", depends_on=(dup.id,)), T0)
    assert store.get(later).depends_on == (holder,)
    assert store.check_spawns((spawned(parent, depends_on=(dup.id,)),)) is None
    assert "already taken" in store.check_spawns((new("x", id=dup.id, parent_id=parent),))
    assert store.ids_matching(dup.id, limit=3) == [holder]
    with Queue(db_path) as queue:
        assert queue.get(dup.id).id == holder
        assert queue.resolve_id(dup.id) == holder
        assert store.cancel(dup.id, T0) == Status.RUNNING  # the holder runs: asked to stop
    store.conn.db.execute("DELETE FROM tasks WHERE id = ?", (holder,))
    assert store.conn.db.execute("SELECT count(*) FROM task_aliases").fetchall() == [(0,)]


def test_cancelling_listing_or_reading_through_any_task_of_a_workflow_acts_on_that_workflow(store):
    # `enqueue --workflow MEMBER` joins MEMBER's workflow; `cancel --workflow MEMBER` used to
    # cancel MEMBER alone ("cancelled with its workflow MEMBER") and leave the task just
    # enqueued with that same --workflow waiting, and `list`/`GET` showed MEMBER alone.
    root = store.enqueue(new("root", await_event="never"), T0)
    member = store.enqueue(new("t", workflow_id=root, await_event="never"), T0)
    via_member = store.enqueue(new("t", workflow_id=member, await_event="never"), T0)
    everyone = {root, member, via_member}
    assert {t.id for t in store.list(workflow_id=member)} == everyone
    tasks, edges, _ = store.workflow(member)
    assert {t.id for t in tasks} == everyone and {t.workflow for t in tasks} == {root}
    assert store.cancel_workflow(member, T0 + 1) == {"id": root, "cancelled": 3, "stopping": 0}
    assert {store.get(i).status for i in everyone} == {Status.CANCELLED}
    assert store.get(via_member).error == f"cancelled with its workflow {root}"


def test_an_event_name_error_names_the_character_and_its_index(db_path):
    """"name must be at most 200 printable characters" was all a tab in a name got."""
    import pytest
    from supervisor import InputError, Queue
    with Queue(db_path) as queue:
        cases = [(lambda n: queue.send_event(n), "name"),
                 (lambda n: queue.enqueue("t", await_event=n), "await_event")]
        for call, field in cases:
            for name, what in [("ap\tprove", r"'\t' at index 2 is not printable"),
                               ("x\x1b[31m", r"'\x1b' at index 1 is not printable"),
                               ("go\u2028", r"'\u2028' at index 2 is not printable"),
                               ("e" * 201, "got 201 characters")]:
                with pytest.raises(InputError) as info:
                    call(name)
                assert info.value.field == field
                assert str(info.value) == (f"{field} must be at most 200 printable "
                                           f"characters{': ' if 'index' in what else ', '}"
                                           f"{what}"), str(info.value)
        assert queue.list() == []
        assert queue.send_event("e" * 200)["sent"] is True
