"""Workflows end to end (issue 12): real supervisor, real fork, real handlers
(tests/process/handlers/tvp_workflow.py). Results flow into ctx.inputs, ctx.spawn stores
children with the success only, checkpoints survive a SIGKILL of the task, a timeout and
a kill -9 of the supervisor, events release once, workflows cancel as a whole."""

from __future__ import annotations

import time

import pytest

from supervisor.store import Status
from tests.support import wait_until


@pytest.fixture
def sup(supervisor_proc):
    return supervisor_proc(supervisor={"pool_size": 3, "preload": ["tvp_handlers", "tvp_workflow"]})


def lines(sup) -> list[str]:
    try:
        return (sup.dir / "workflow.log").read_text().splitlines()
    except FileNotFoundError:
        return []


def children_of(sup, parent: str):
    return [t for t in sup.store.list(workflow_id=parent, limit=1000) if t.id != parent]


@pytest.mark.timeout(60)
def test_spawned_children_run_and_a_join_reads_their_results(sup):
    parent = sup.enqueue("wf.plan", {"numbers": [1, 2, 3]})
    result = sup.wait_status(parent, "succeeded").result
    join = sup.wait_status(result["join"], "succeeded")
    assert join.result["total"] == 1 + 4 + 9
    assert set(join.result["inputs"]) == set(result["children"])
    kids = children_of(sup, parent)
    assert len(kids) == 4
    assert all(k.parent_id == parent and k.workflow == parent for k in kids)
    assert set(join.depends_on) == set(result["children"])
    wf = sup.queue.workflow(parent)
    assert wf.finished and len(wf.tasks) == 5
    assert sum(e["kind"] == "spawned" for e in wf.edges) == 4
    assert sum(e["kind"] == "depends_on" for e in wf.edges) == 3


@pytest.mark.timeout(60)
def test_children_of_a_failed_attempt_are_never_stored(sup):
    parent = sup.enqueue("wf.plan", {"numbers": [5, 6], "fail_in": [1, 2]}, max_attempts=3)
    task = sup.wait_status(parent, "succeeded")
    assert task.attempts == 3
    assert [ln for ln in lines(sup) if ln.startswith("plan")] == [
        f"plan attempt {n} spawned 3" for n in (1, 2, 3)]
    kids = children_of(sup, parent)
    assert len(kids) == 3, "only the successful attempt's spawns"
    assert {k.id for k in kids} == {*task.result["children"], task.result["join"]}
    sup.wait_status(task.result["join"], "succeeded")


@pytest.mark.timeout(60)
def test_a_spawn_of_an_unknown_type_fails_the_attempt_for_good(sup):
    task = sup.wait_status(sup.enqueue("wf.spawn_unknown", max_attempts=3), "failed")
    assert task.attempts == 1
    assert "no handler for task type 'no.such.type'" in task.error
    assert task.history[0].error["type"] == "SpawnError"
    assert children_of(sup, task.id) == []


@pytest.mark.timeout(60)
def test_a_spawn_dependency_cycle_fails_the_attempt_with_a_clear_error(sup):
    task = sup.wait_status(sup.enqueue("wf.spawn_cycle", max_attempts=3), "failed")
    assert task.attempts == 1 and task.outcome == "error"
    assert "spawned tasks cannot be stored" in task.error and "cycle" in task.error
    assert children_of(sup, task.id) == []


@pytest.mark.timeout(60)
def test_inputs_carry_local_ids_and_input_is_the_single_result(sup):
    ids = sup.queue.enqueue_many([
        {"id": "a", "type": "wf.square", "payload": {"x": 3}},
        {"id": "j", "type": "wf.join", "depends_on": ["a"]}])
    join = sup.wait_status(ids[1], "succeeded")
    assert join.result["inputs"] == {ids[0]: 9, "a": 9}
    assert join.result["single"] == 9


@pytest.mark.timeout(60)
def test_a_checkpointed_loop_resumes_from_its_last_step_after_a_sigkill(sup):
    task_id = sup.enqueue("wf.steps", {"steps": 5, "die_after": 3}, max_attempts=3)
    task = sup.wait_status(task_id, "succeeded", timeout=30)
    assert task.attempts == 2 and task.history[0].outcome == "crashed"
    assert task.result["done"] == [0, 1, 2, 3, 4]
    log = lines(sup)
    assert "steps attempt 2 resumes at 3" in log
    assert not any(ln.startswith("steps attempt 2 did") and int(ln.split()[-1]) < 3 for ln in log)
    assert sup.store.checkpoint_of(task_id)[0] == 2


@pytest.mark.timeout(60)
def test_a_checkpointed_loop_resumes_after_a_timeout(sup):
    task_id = sup.enqueue("wf.steps", {"steps": 4, "hang_after": 2}, max_attempts=3,
                          timeout_s=3)
    task = sup.wait_status(task_id, "succeeded", timeout=30)
    assert [a.outcome for a in task.history] == ["timeout", "succeeded"]
    assert "steps attempt 2 resumes at 2" in lines(sup)


@pytest.mark.timeout(90)
def test_a_checkpointed_loop_resumes_after_kill_9_of_the_supervisor(supervisor_proc):
    sup = supervisor_proc(supervisor={"preload": ["tvp_handlers", "tvp_workflow"]})
    task_id = sup.enqueue("wf.steps", {"steps": 4, "hang_after": 2}, max_attempts=3)
    wait_until(lambda: "steps attempt 1 did 1" in lines(sup), timeout=20)
    sup.kill9()
    sup.restart()
    task = sup.wait_status(task_id, "succeeded", timeout=40)
    assert task.result["done"] == [0, 1, 2, 3]
    assert "steps attempt 2 resumes at 2" in lines(sup)


@pytest.mark.timeout(60)
def test_an_event_releases_its_task_once_with_its_data(sup):
    task_id = sup.enqueue("wf.event", await_event="approve-1")
    time.sleep(0.5)  # a blocked task must not run: give the supervisor a few passes
    assert sup.get(task_id).status is Status.BLOCKED
    assert [t.id for t in sup.queue.awaiting()] == [task_id]
    first = sup.queue.send_event("approve-1", {"by": "ann"})
    second = sup.queue.send_event("approve-1", {"by": "bob"})
    assert first == {"name": "approve-1", "sent": True, "released": [task_id]}
    assert second == {"name": "approve-1", "sent": False, "released": []}
    task = sup.wait_status(task_id, "succeeded")
    assert task.result == {"event": {"by": "ann"}} and task.attempts == 1
    later = sup.enqueue("wf.event", await_event="approve-1")  # sent before it existed
    assert sup.wait_status(later, "succeeded").result == {"event": {"by": "ann"}}
    assert sum(ln.startswith("event ran") for ln in lines(sup)) == 2


@pytest.mark.timeout(60)
def test_run_on_failure_fans_in_over_a_failed_dependency(sup):
    bad = sup.enqueue("wf.fail", max_attempts=1)
    good = sup.enqueue("wf.square", {"x": 4})
    fanin = sup.enqueue("wf.fanin", depends_on=[bad, good], run_on_failure=True)
    plain = sup.enqueue("wf.join", depends_on=[bad, good])
    result = sup.wait_status(fanin, "succeeded").result
    assert result[good] == {"ok": {"x": 4, "square": 16}}
    assert result[bad]["failed"]["status"] == "failed"
    assert "this dependency fails" in result[bad]["failed"]["error"]
    assert sup.wait_status(plain, "failed").outcome == "dependency_failed"


@pytest.mark.timeout(60)
def test_cancelling_a_workflow_stops_its_running_tasks_within_a_second(sup):
    root = sup.enqueue("wf.sleep")
    running = [sup.enqueue("wf.sleep", workflow_id=root) for _ in range(1)]
    waiting = sup.enqueue("wf.square", {"x": 1}, workflow_id=root, depends_on=[root])
    outside = sup.enqueue("wf.square", {"x": 2})
    wait_until(lambda: sum(ln.startswith("sleep started") for ln in lines(sup)) == 2, timeout=15)
    started = time.monotonic()
    assert sup.queue.cancel_workflow(root) == {"id": root, "cancelled": 1, "stopping": 2}
    for task_id in [root, *running]:
        sup.wait_status(task_id, "cancelled", timeout=5)
    assert time.monotonic() - started < 1.5  # stopped within a second (plus polling)
    assert sup.get(waiting).status is Status.CANCELLED
    assert sup.wait_status(outside, "succeeded")
    assert {t.status for t in sup.queue.list(workflow_id=root)} == {Status.CANCELLED}


@pytest.mark.timeout(60)
def test_a_checkpointed_task_resumes_after_its_memory_limit(sup):
    task_id = sup.enqueue("wf.steps_hog", memory_mb=200, max_attempts=2)
    task = sup.wait_status(task_id, "succeeded", timeout=30)
    assert [a.outcome for a in task.history] == ["memory_limit", "succeeded"]
    assert task.result == {"resumed_at": 1}
    assert "hog attempt 2 resumes at 1" in lines(sup)


@pytest.mark.timeout(60)
def test_a_checkpoint_over_max_result_bytes_is_refused(supervisor_proc):
    sup = supervisor_proc(supervisor={"preload": ["tvp_handlers", "tvp_workflow"],
                                      "max_result_bytes": 1000})
    task = sup.wait_status(sup.enqueue("wf.big_checkpoint", {"size": 5000}), "succeeded")
    assert "over the 1000-byte limit" in task.result["refused"]
    assert sup.store.checkpoint_of(task.id) is None
    ok = sup.wait_status(sup.enqueue("wf.big_checkpoint", {"size": 100}), "succeeded")
    assert ok.result == {"stored": True} and sup.store.checkpoint_of(ok.id) is not None


@pytest.mark.timeout(60)
def test_spawn_takes_the_named_limit_options_of_enqueue(supervisor_proc):
    # ctx.spawn takes Queue.enqueue's options; limit_keys and estimated_tokens used to fail
    # the attempt for good with "spawn: unknown option 'limit_keys'".
    sup = supervisor_proc(supervisor={"preload": ["tvp_handlers", "tvp_workflow"]},
                          limits={"tenant:*": {"concurrency": 1}})
    parent = sup.enqueue("wf.spawn_with", {"options": {"limit_keys": ["tenant:7"],
                                                       "estimated_tokens": 30}})
    task = sup.wait_status(parent, "succeeded")
    child = sup.wait_status(task.result["child"], "succeeded")
    assert child.limit_keys == ("tenant:7",) and child.estimated_tokens == 30
    bad = sup.wait_status(sup.enqueue("wf.spawn_with", {"options": {"limit_keys": ["nope"]}}),
                          "failed")
    assert "spawned tasks cannot be stored" in bad.error and "'nope'" in bad.error


@pytest.mark.timeout(60)
def test_state_or_a_spawn_payload_nested_too_deeply_is_refused_as_not_json(sup):
    # Both used to raise RecursionError: ctx.checkpoint documents ValueError, and a spawn
    # was retried (a retry spawns the same) instead of failing for good with SpawnError.
    task = sup.wait_status(sup.enqueue("wf.deep_checkpoint"), "succeeded")
    assert "not JSON-serialisable: nested too deeply" in task.result["refused"]
    task = sup.wait_status(sup.enqueue("wf.deep_spawn", max_attempts=3), "failed")
    assert task.attempts == 1 and task.history[0].error["type"] == "SpawnError"
    assert "not JSON-serialisable: nested too deeply" in task.error
    assert children_of(sup, task.id) == []
