"""The event stream, streamed output, the Unix socket and CORS against a real supervisor:
events in order with increasing ids from every writer (a client's enqueue and cancel,
the supervisor's claims, progress, output and outcomes), resumption with Last-Event-ID
that loses nothing and repeats nothing, filters, and a Node.js client as an Electron
main process would run it, over TCP and over the Unix socket."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from supervisor.client import Queue
from supervisor.store import Store
from supervisor.store import events as live
from tests.e2e.live_support import EventStream, start_live, stop, unix_request
from tests.store.factory import new
from tests.support.openai_server import FakeOpenAI, Stream

FINAL = {"succeeded", "failed", "cancelled"}
NODE_CLIENT = Path(__file__).resolve().parent / "node" / "sse_client.mjs"
MODEL_TEXT = " ".join(f"word{i}" for i in range(60)) + "."


@pytest.fixture
def sup(tmp_path):
    s = start_live(tmp_path)
    yield s
    stop(s)


def output_text(events) -> str:
    """Concatenate output events, checking each starts where the previous one ended."""
    text = ""
    for ev in events:
        if ev.event == "output":
            assert ev.data["pos"] == len(text), (ev.data, len(text))
            text += ev.data["text"]
    return text


@pytest.mark.timeout(60)
def test_events_of_a_streaming_task_arrive_in_order_and_resume_after_last_event_id(sup):
    stream = EventStream(sup, "?type=stream")
    assert stream.status == 200
    assert stream.res.getheader("Content-Type").startswith("text/event-stream")
    task = sup.enqueue(type="stream", payload={"n": 40, "gap_s": 0.01})
    got = stream.until(lambda e: e.event == "output")
    stream.close()
    assert [e.data["status"] for e in got if e.event == "task"][:2] == ["queued", "running"]
    # Reconnect from the last id seen: the rest, nothing twice.
    resumed = EventStream(sup, f"?task={task['id']}", last_id=got[-1].id)
    rest = resumed.until(lambda e: e.event == "task" and e.data["status"] in FINAL)
    resumed.close()
    every = got + rest
    ids = [e.id for e in every]
    assert ids == sorted(set(ids)), ids
    assert all(e.data["id"] == task["id"] for e in every)
    assert output_text(every) == "".join(f"tok{i} " for i in range(40))
    assert every[-1].data["status"] == "succeeded" and every[-1].data["attempt"] == 1
    # Everything the log holds for the task was delivered.
    with _store(sup.db) as store:
        logged = [e.id for e in live.read(store.conn, 0) if e.task_id == task["id"]]
    assert ids == logged
    body = sup.get(f"/api/tasks/{task['id']}/output").json
    assert body == {"id": task["id"], "status": "succeeded", "attempt": 1,
                    "text": "".join(f"tok{i} " for i in range(40)), "truncated": False}


class _store:
    def __init__(self, path):
        self.store = Store(path, migrate=False, create=False)

    def __enter__(self) -> Store:
        return self.store

    def __exit__(self, *exc) -> None:
        self.store.close()


@pytest.mark.timeout(60)
def test_changes_by_other_processes_and_filters(sup):
    by_type = EventStream(sup, "?type=stream")
    everything = EventStream(sup)
    q = Queue(str(sup.db))
    try:
        a = q.enqueue("stream", {"n": 1}, delay=3600)     # a client's enqueue and cancel
        q.cancel(a)
        b = q.enqueue("other.type", {}, delay=3600)
        c = q.enqueue("stream", {"n": 1})
    finally:
        q.close()
    seen = by_type.until(lambda e: e.data["id"] == c and e.data.get("status") == "succeeded")
    assert [(e.data["id"], e.data["status"]) for e in seen if e.event == "task"][:2] == [
        (a, "queued"), (a, "cancelled")]
    assert all(e.data["type"] == "stream" for e in seen)
    all_seen = everything.until(lambda e: e.data["id"] == b)
    assert [e.data["id"] for e in all_seen] == [a, a, b]
    by_task = EventStream(sup, f"?task={c}", last_id=seen[0].id - 1)
    assert {e.data["id"] for e in by_task.until(
        lambda e: e.data.get("status") == "succeeded")} == {c}
    for s in (by_type, everything, by_task):
        s.close()


def test_bad_requests_are_refused_with_the_field(sup):
    res = sup.get("/api/events", headers={"Last-Event-ID": "abc"})
    assert res.status == 400 and res.json["field"] == "Last-Event-ID"
    res = sup.get("/api/events?since=3")
    assert res.status == 400 and res.json["field"] == "since"
    assert sup.get("/api/tasks/nope/output").status == 404
    assert sup.get("/api/tasks/nope/logs").status == 404
    res = sup.get("/api/events", headers={"Host": "evil.example:80"})
    assert res.status == 403


@pytest.mark.timeout(60)
def test_a_last_event_id_older_than_the_log_gets_a_gap_event(sup):
    first = EventStream(sup)  # switches the log on
    sup.enqueue(type="stream", payload={"n": 1})
    ev = first.next()
    first.close()
    with _store(sup.db) as store:  # what retention pruning does
        store.enqueue(new(), 0)
        live.prune(store.conn, live.newest_id(store.conn))
    again = EventStream(sup, last_id=ev.id - 1)
    gap = again.next()
    assert gap.event == "gap" and gap.data["after"] == ev.id - 1
    again.close()


def test_unix_socket_is_0600_needs_no_token_and_serves_events(tmp_path):
    path = tmp_path / "run" / "api.sock"
    path.parent.mkdir()
    s = start_live(tmp_path, listen=f"unix:{path}")
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        stream = EventStream(s)
        status, task = unix_request(str(path), "POST", "/api/tasks",
                                    {"type": "stream", "payload": {"n": 3}})
        assert status == 201, task
        got = stream.until(lambda e: e.data["id"] == task["id"]
                           and e.data.get("status") == "succeeded")
        assert output_text(got) == "tok0 tok1 tok2 "
        stream.close()
        status, out = unix_request(str(path), "GET", f"/api/tasks/{task['id']}/output")
        assert status == 200 and out["text"] == "tok0 tok1 tok2 "
    finally:
        stop(s)


def test_cors_answers_allowed_origins_only(tmp_path):
    s = start_live(tmp_path, extra='allow_origins = ["http://localhost:5173", "app://desk"]\n')
    try:
        pre = s.request("OPTIONS", "/api/tasks", token=None, headers={
            "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status == 204
        assert pre.header("Access-Control-Allow-Origin") == "http://localhost:5173"
        assert "Authorization" in pre.header("Access-Control-Allow-Headers")
        assert "POST" in pre.header("Access-Control-Allow-Methods")
        got = s.get("/api/stats", headers={"Origin": "app://desk"})
        assert got.status == 200 and got.header("Access-Control-Allow-Origin") == "app://desk"
        refused = s.request("OPTIONS", "/api/tasks", token=None, headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert refused.status == 403 and refused.header("Access-Control-Allow-Origin") is None
        assert s.get("/api/stats", headers={"Origin": "http://evil.example"}).status == 403
        # The dashboard itself (same origin) needs no entry.
        same = s.get("/api/stats", headers={"Origin": s.url})
        assert same.status == 200 and same.header("Access-Control-Allow-Origin") is None
    finally:
        stop(s)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_node_client_gets_events_and_tokens_in_order_across_a_reconnect(tmp_path, transport):
    node = shutil.which("node")
    assert node, "Node.js 20 is needed for this test (apt-get install nodejs)"
    listen = f"unix:{tmp_path / 'api.sock'}" if transport == "unix" else "127.0.0.1:0"
    with FakeOpenAI(Stream(text=MODEL_TEXT, delay_s=0.02)) as model:
        s = start_live(tmp_path, listen=listen,
                       preload=("workers.handlers.llm", "tvlive_handlers"))
        try:
            target = f"unix:{s.unix}" if transport == "unix" else s.url
            res = subprocess.run([node, str(NODE_CLIENT), target, s.token, model.base_url],
                                 capture_output=True, text=True, timeout=60)
        finally:
            stop(s)
    assert res.returncode == 0, res.stderr + res.stdout
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    done = lines[-1]
    events = [x for x in lines if "event" in x]
    assert done["reconnects"] == 1
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(set(ids)), ids                     # in order, nothing twice
    statuses = [e["data"]["status"] for e in events if e["event"] == "task"]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded"
    assert "running" in statuses
    text, pos = "", 0
    for e in events:
        if e["event"] == "output":
            assert e["data"]["pos"] == pos                  # nothing lost across the reconnect
            text += e["data"]["text"]
            pos += len(e["data"]["text"])
    assert text == MODEL_TEXT
    assert done["output"]["text"] == MODEL_TEXT
    # The reconnect really happened mid-stream: output arrived on both connections.
    first_out = next(i for i, e in enumerate(events) if e["event"] == "output")
    assert any(e["event"] == "output" for e in events[first_out + 1:])
