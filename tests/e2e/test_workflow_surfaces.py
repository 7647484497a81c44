"""Workflows through the CLI (`taskvisor wait ID...`, `cancel --workflow`, `list --workflow`,
`send-event`, `enqueue --await-event`) and the HTTP API (`GET /api/workflows/{id}`,
`POST /api/workflows/{id}/cancel`, `POST /api/events/{name}` with the token)."""

from __future__ import annotations

import json
import time

import pytest

from supervisor import Queue
from supervisor.store import Status, Store
from tests.e2e.http_support import supervisor  # noqa: F401  (fixture)
from tests.e2e.test_cli import enqueue, finish, tv


def test_wait_for_many_exits_0_1_or_124(tmp_path):
    a, b = enqueue(tmp_path, "t"), enqueue(tmp_path, "t")
    res = tv(tmp_path, "wait", a, b, "--timeout", "0.3")
    assert res.returncode == 124 and "2 of 2 task(s) still unfinished" in res.stderr
    finish(tmp_path / "taskvisor.db", ok=True)
    res = tv(tmp_path, "wait", a, b, "--timeout", "0.3")
    assert res.returncode == 124 and "1 of 2" in res.stderr
    finish(tmp_path / "taskvisor.db", ok=True)
    res = tv(tmp_path, "wait", a, b, "--timeout", "5")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [a, "succeeded", b, "succeeded"]
    c = enqueue(tmp_path, "t")
    finish(tmp_path / "taskvisor.db", ok=False)
    res = tv(tmp_path, "wait", a, c)
    assert res.returncode == 1 and f"task {c} failed" in res.stderr
    res = tv(tmp_path, "wait", a, "NOPE")
    assert res.returncode == 2 and "no task with id NOPE" in res.stderr


def test_send_event_releases_a_waiting_task_once(tmp_path):
    task_id = enqueue(tmp_path, "t", "--await-event", "approve")
    res = tv(tmp_path, "list", "--status", "blocked", "--json")
    assert json.loads(res.stdout)[0]["await_event"] == "approve"
    res = tv(tmp_path, "send-event", "approve", '{"ok": true}')
    assert res.returncode == 0 and res.stdout.split() == ["1", "task", "released", task_id]
    res = tv(tmp_path, "send-event", "approve", '{"ok": false}')
    assert res.returncode == 0 and "already sent" in res.stderr
    assert res.stdout.startswith("0 tasks released")
    res = tv(tmp_path, "send-event", "x", "{not json")
    assert res.returncode == 2 and "event data is not valid JSON" in res.stderr


def test_cancel_and_list_a_workflow(tmp_path):
    root = enqueue(tmp_path, "t")
    step = enqueue(tmp_path, "t", "--workflow", root, "--depends-on", root)
    other = enqueue(tmp_path, "t")
    res = tv(tmp_path, "list", "--workflow", root, "--json")
    assert {t["id"] for t in json.loads(res.stdout)} == {root, step}
    res = tv(tmp_path, "cancel", "--workflow", root)
    assert res.returncode == 0 and res.stdout.strip() == "2 cancelled, 0 running asked to stop"
    store = Store(tmp_path / "taskvisor.db")
    try:
        assert store.get(step).status is Status.CANCELLED
        assert store.get(other).status is Status.QUEUED
    finally:
        store.close()
    res = tv(tmp_path, "cancel")
    assert res.returncode == 2 and "--workflow" in res.stderr
    res = tv(tmp_path, "cancel", "--workflow", "NOPE")
    assert res.returncode == 2 and "no workflow with id NOPE" in res.stderr
    res = tv(tmp_path, "enqueue", "t", "--workflow", "NOPE")
    assert res.returncode == 2 and "no workflow with id NOPE" in res.stderr


@pytest.mark.timeout(60)
def test_http_workflow_events_and_cancel(supervisor):  # noqa: F811
    root = supervisor.enqueue(type="ok", payload={"n": 1})["id"]
    waiting = supervisor.enqueue(type="ok", workflow_id=root, depends_on=[root],
                                 await_event="go")
    assert waiting["workflow_id"] == root and waiting["await_event"] == "go"
    supervisor.wait_status(root, "succeeded")
    res = supervisor.get("/api/awaiting")
    assert [t["id"] for t in res.json["tasks"]] == [waiting["id"]]
    assert supervisor.post("/api/events/go", {"data": {"who": "me"}}, token=None).status == 401
    res = supervisor.post("/api/events/go", {"data": {"who": "me"}})
    assert res.status == 200 and res.json == {"name": "go", "sent": True,
                                               "released": [waiting["id"]]}
    assert supervisor.post("/api/events/go", {"data": 2}).json["sent"] is False
    supervisor.wait_status(waiting["id"], "succeeded")
    res = supervisor.get(f"/api/workflows/{root}")
    assert res.status == 200 and res.json["finished"] is True
    assert {t["id"] for t in res.json["tasks"]} == {root, waiting["id"]}
    assert res.json["edges"] == [{"from": root, "to": waiting["id"], "kind": "depends_on"}]
    assert res.json["counts"] == {"succeeded": 2}
    sleeper = supervisor.enqueue(type="sleep", payload={"steps": 400, "step_s": 0.05})["id"]
    supervisor.wait_status(sleeper, "running")
    assert supervisor.post(f"/api/workflows/{sleeper}/cancel", token=None).status == 401
    started = time.monotonic()
    res = supervisor.post(f"/api/workflows/{sleeper}/cancel")
    assert res.status == 200 and res.json == {"id": sleeper, "cancelled": 0, "stopping": 1}
    supervisor.wait_status(sleeper, "cancelled", timeout=5)
    assert time.monotonic() - started < 1.5
    assert supervisor.get("/api/workflows/NOPE").status == 404
    assert supervisor.post("/api/workflows/NOPE/cancel").status == 404
    assert supervisor.post("/api/events/go", b"[1]",
                           headers={"Content-Type": "application/json"}).status == 400


@pytest.mark.timeout(60)
def test_cancelling_a_workflow_through_a_member_answers_with_the_workflow_id(supervisor):  # noqa: F811
    # GET /api/workflows/MEMBER answered with the root's id, POST .../MEMBER/cancel with
    # MEMBER: a client keeping the answer's id kept a task's id, not the workflow's.
    root = supervisor.enqueue(type="ok", await_event="never")["id"]
    member = supervisor.enqueue(type="ok", workflow_id=root, await_event="never")["id"]
    assert supervisor.get(f"/api/workflows/{member}").json["id"] == root
    res = supervisor.post(f"/api/workflows/{member}/cancel")
    assert res.status == 200 and res.json == {"id": root, "cancelled": 2, "stopping": 0}, res.body
    res = supervisor.post(f"/api/workflows/{member}/cancel")  # nothing left to cancel
    assert res.status == 200 and res.json == {"id": root, "cancelled": 0, "stopping": 0}
    # Whole ids only, as GET: an end of one ("0" ends many ids) was a 500 from the
    # Queue's short-id lookup, an unknown one is a 404.
    for short in ("0", root[-8:]):
        res = supervisor.post(f"/api/workflows/{short}/cancel")
        assert res.status == 404 and res.json["field"] == "id", (short, res.body)
        assert supervisor.get(f"/api/workflows/{short}").status == 404


@pytest.mark.timeout(120)
def test_a_workflow_past_10000_tasks_says_it_was_cut(supervisor):  # noqa: F811
    # GET /api/workflows/{id} answered the first 10,000 tasks, with counts and finished of
    # those alone, and nothing said that more existed.
    root = supervisor.enqueue(type="ok", await_event="never")["id"]
    with Queue(supervisor.db) as queue:
        queue.enqueue_many([{"type": "ok", "workflow_id": root, "await_event": "never"}
                            for _ in range(10_000)])
    res = supervisor.get(f"/api/workflows/{root}", timeout=60)
    assert res.status == 200, res.body
    wf = res.json
    assert (wf["id"], wf["total"], wf["truncated"], wf["finished"]) == (root, 10_001, True, False)
    assert wf["counts"] == {"blocked": 10_001} and len(wf["tasks"]) == 10_000
    assert wf["tasks"][0]["id"] == root  # oldest first: the rest page through /api/tasks
    page = supervisor.get(f"/api/tasks?workflow_id={root}&limit=1").json
    assert page["tasks"][0]["id"] not in {t["id"] for t in wf["tasks"]}
    alone = supervisor.enqueue(type="ok", await_event="never")["id"]
    wf = supervisor.get(f"/api/workflows/{alone}").json
    assert (wf["total"], wf["truncated"], len(wf["tasks"])) == (1, False, 1)


def test_show_names_the_workflow_and_the_event(tmp_path):
    root = enqueue(tmp_path, "t")
    task_id = enqueue(tmp_path, "t", "--workflow", root, "--await-event", "go", "--run-on-failure")
    res = tv(tmp_path, "show", task_id)
    assert res.returncode == 0, res.stderr
    assert f"workflow    {root}" in res.stdout and "awaits      event 'go'" in res.stdout
    shown = json.loads(tv(tmp_path, "show", task_id, "--json").stdout)
    assert (shown["workflow_id"], shown["await_event"], shown["run_on_failure"]) == (root, "go", True)


@pytest.mark.timeout(60)
def test_an_event_name_in_the_path_is_percent_decoded_as_utf8_or_refused(supervisor):  # noqa: F811
    # %FF%FE used to be decoded with replacement characters: 200, and an event named
    # "\ufffd\ufffd" was sent, which no task awaiting the name the client meant could get.
    waiting = supervisor.enqueue(type="ok", await_event="été/1")["id"]
    res = supervisor.post("/api/events/%FF%FE")
    assert res.status == 400 and res.json["field"] == "name", res.body
    assert "UTF-8" in res.json["error"]
    assert supervisor.post("/api/tasks/%FF/cancel").status == 400
    res = supervisor.post("/api/events/%C3%A9t%C3%A9%2F1", {"data": 1})
    assert res.status == 200 and res.json["released"] == [waiting]
    store = Store(supervisor.db)
    try:
        assert store.awaiting() == []
        assert store.send_event("\ufffd\ufffd", None, time.time())[0], "never sent"
    finally:
        store.close()
