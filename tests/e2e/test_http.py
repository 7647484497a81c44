"""The JSON API against a real supervisor process: every endpoint, the token, bad input,
unknown ids and paths, the size limit, security headers, files' modes, start and stop."""

from __future__ import annotations

import http.client
import os
import re
import stat
import time

import pytest

from supervisor import Queue
from supervisor.store import Status
from tests.support import kill_tree
from tests.e2e.http_support import (  # noqa: F401  (fixtures)
    Supervisor, shared, start, supervisor, wait_for, write_config)

ID = re.compile(r"[0-9A-Z]{26}\Z")


def test_enqueue_runs_and_shows_the_task_with_its_attempts(supervisor):
    task = supervisor.enqueue(type="ok", payload={"n": 1}, priority=3, timeout_s=30,
                              memory_mb=256, max_attempts=2, dedupe_key="k1")
    assert ID.match(task["id"])
    assert (task["type"], task["payload"], task["priority"], task["max_attempts"],
            task["timeout_s"], task["memory_mb"], task["dedupe_key"]) == (
        "ok", {"n": 1}, 3, 2, 30, 256, "k1")
    done = supervisor.wait_status(task["id"], "succeeded")
    assert done["result"] == {"echo": {"n": 1}}
    assert [a["outcome"] for a in done["history"]] == ["succeeded"]
    attempt = done["history"][0]
    assert attempt["wall_s"] > 0 and attempt["peak_rss_bytes"] > 0 and attempt["pid"] > 0
    # The same dedupe key on a finished task makes a new one (201).
    again = supervisor.post("/api/tasks", {"type": "ok", "dedupe_key": "k1"})
    assert again.status == 201 and again.json["id"] != task["id"]


def test_dedupe_hit_answers_200_with_the_existing_task(supervisor):
    first = supervisor.enqueue(type="sleep", delay=3600, dedupe_key="same")
    res = supervisor.post("/api/tasks", {"type": "sleep", "dedupe_key": "same"})
    assert res.status == 200 and res.json["id"] == first["id"]


def test_run_at_takes_epoch_seconds_or_iso_time(supervisor):
    at = supervisor.enqueue(type="ok", run_at=4102444800)  # 2100-01-01
    assert at["run_after"] == "2100-01-01T00:00:00.000Z" and at["status"] == "queued"
    iso = supervisor.enqueue(type="ok", run_at="2100-01-01T01:00:00+01:00")
    assert iso["run_after"] == "2100-01-01T00:00:00.000Z"
    later = supervisor.enqueue(type="ok", delay=600)
    assert later["status"] == "queued"


def test_list_is_newest_first_filtered_and_paged(supervisor):
    ids = [supervisor.enqueue(type="sleep", delay=3600, payload={"i": i})["id"] for i in range(5)]
    other = supervisor.enqueue(type="other.kind", delay=3600)["id"]
    page = supervisor.get("/api/tasks?type=sleep&limit=2").json
    assert [t["id"] for t in page["tasks"]] == ids[::-1][:2]
    assert "history" not in page["tasks"][0]
    seen = [t["id"] for t in page["tasks"]]
    while page["next_before"]:
        page = supervisor.get(f"/api/tasks?type=sleep&limit=2&before={page['next_before']}").json
        seen += [t["id"] for t in page["tasks"]]
    assert seen == ids[::-1]
    queued = supervisor.get("/api/tasks?status=queued&type=&before=").json["tasks"]
    assert {t["id"] for t in queued} == {*ids, other}
    assert supervisor.get("/api/tasks?status=succeeded").json == {"tasks": [], "next_before": None}


def test_writes_need_the_token(supervisor):
    for token in (None, "wrong-token", ""):
        headers = {"Authorization": "Basic abc"} if token == "" else None
        res = supervisor.request("POST", "/api/tasks", {"type": "ok"}, token=token, headers=headers)
        assert res.status == 401, res.body
        assert res.header("WWW-Authenticate").startswith("Bearer")
        assert res.json["error"]
    task = supervisor.enqueue(type="sleep", delay=3600)
    for verb in ("cancel", "retry"):
        res = supervisor.post(f"/api/tasks/{task['id']}/{verb}", token="nope")
        assert res.status == 401
    assert supervisor.task(task["id"])["status"] == "queued"
    assert len(supervisor.get("/api/tasks").json["tasks"]) == 1  # nothing else was written
    # Reads are open on loopback.
    assert supervisor.get("/api/tasks").status == 200


@pytest.mark.parametrize("body, field", [
    ({}, "type"),
    ({"type": ""}, "type"),
    ({"type": 5}, "type"),
    ({"type": "ok", "payload": [1, 2]}, "payload"),
    ({"type": "ok", "payload": "text"}, "payload"),
    ({"type": "ok", "priority": "high"}, "priority"),
    ({"type": "ok", "priority": 1.5}, "priority"),
    ({"type": "ok", "priority": 1 << 70}, "priority"),
    ({"type": "ok", "delay": -1}, "delay"),
    ({"type": "ok", "delay": 1, "run_at": 2}, "delay"),
    ({"type": "ok", "run_at": "tomorrow"}, "run_at"),
    ({"type": "ok", "run_at": "2030-01-01T00:00:00"}, "run_at"),
    ({"type": "ok", "run_at": 1e15}, "run_at"),
    ({"type": "ok", "timeout_s": 0}, "timeout_s"),
    ({"type": "ok", "memory_mb": 0}, "memory_mb"),
    ({"type": "ok", "max_attempts": 0}, "max_attempts"),
    ({"type": "ok", "depends_on": "01ABC"}, "depends_on"),
    ({"type": "ok", "depends_on": ["01NOSUCHTASK000000000000000"]}, "depends_on"),
    ({"type": "ok", "dedupe_key": ""}, "dedupe_key"),
    ({"type": "ok", "colour": "red"}, "colour"),
    ([1, 2], "body"),
])
def test_bad_input_gets_400_naming_the_field(shared, body, field):
    res = shared.post("/api/tasks", body)
    assert res.status == 400, res.body
    assert res.json["field"] == field and res.json["error"]
    assert shared.get("/api/tasks").json["tasks"] == []


@pytest.mark.parametrize("raw", [b"{not json", b"", "{\"type\": \"\\ud800\"}".encode(),
                                 b"\xff\xfe", b'{"type": "ok", "priority": NaN}'])
def test_malformed_bodies_get_400(shared, raw):
    res = shared.post("/api/tasks", raw, headers={"Content-Type": "application/json"})
    assert res.status == 400 and res.json["field"] == "body", res.body


def test_a_body_that_is_not_json_gets_415(shared):
    res = shared.post("/api/tasks", b"type=ok",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert res.status == 415 and res.json["field"] == "Content-Type"


def test_every_write_with_a_body_that_is_not_json_gets_415_and_changes_nothing(shared):
    """POST /api/events/{name} took a text/plain body and sent the event."""
    form = {"Content-Type": "text/plain"}
    res = shared.post("/api/events/not-json-415", b'{"data": 1}', headers=form)
    assert res.status == 415 and res.json["field"] == "Content-Type", res.body
    task_id = shared.enqueue(type="ok", delay=3600)["id"]
    res = shared.post(f"/api/tasks/{task_id}/cancel", b"x=1", headers=form)
    assert res.status == 415, res.body
    assert shared.task(task_id)["status"] == "queued"
    # Nothing was sent: the first JSON send is the one that sends it.
    assert shared.post("/api/events/not-json-415", {"data": 1}).json["sent"] is True
    assert shared.post(f"/api/tasks/{task_id}/cancel").json["status"] == "cancelled"


@pytest.mark.parametrize("query, field", [("limit=0", "limit"), ("limit=1001", "limit"),
                                          ("limit=ten", "limit"), ("status=done", "status")])
def test_bad_query_gets_400(shared, query, field):
    res = shared.get(f"/api/tasks?{query}")
    assert res.status == 400 and res.json["field"] == field
    if field == "limit":
        assert shared.get(f"/api/queued?{query}").status == 400


NO_TASK = "01MNPQRSTVWXYZ000000000000"  # a task id by its form; no such task


@pytest.mark.parametrize("method, path, param", [
    ("GET", "/api/tasks?befor=01ABC", "befor"),          # a typo: every task came back
    ("GET", "/api/tasks?limit=5&colour=red", "colour"),
    ("GET", "/api/queued?status=queued", "status"),
    ("GET", f"/api/tasks/{NO_TASK}/output?atempt=1", "atempt"),
    ("GET", f"/api/tasks/{NO_TASK}/logs?after=3", "after"),
    ("GET", f"/api/workflows/{NO_TASK}?limit=1", "limit"),
    ("GET", "/api/stats?x=1", "x"),
    ("GET", "/healthz?verbose=1", "verbose"),
    ("POST", "/api/tasks?dry_run=1", "dry_run"),
])
def test_an_unknown_query_parameter_gets_400_naming_it(shared, method, path, param):
    """Unknown parameters were ignored: `?befor=` listed everything, `?dry_run=1` enqueued."""
    body = {"type": "dry.run", "delay": 3600} if method == "POST" else None
    res = shared.request(method, path, body)
    assert res.status == 400, res.body
    assert res.json["field"] == param and repr(param) in res.json["error"], res.json
    assert shared.get("/api/tasks?type=dry.run").json["tasks"] == []
    assert shared.get("/api/events?nope=1").json["field"] == "nope"  # as it was


@pytest.mark.parametrize("before", ["zzz", "01abcdefghjkmnpqrstvwxyz01", "0" * 25, "0" * 27,
                                    "0" * 25 + "U", "0" * 25 + "%20", "%E2%82%AC" * 26])
def test_before_that_is_not_a_task_id_gets_400(shared, before):
    """`before=zzz` sorted after every id: 200 and the first page, as if no cursor."""
    res = shared.get(f"/api/tasks?before={before}")
    assert res.status == 400 and res.json["field"] == "before", res.body
    assert "task id" in res.json["error"]
    # A cursor of the right form need not name a task (it may have been pruned since).
    assert shared.get(f"/api/tasks?before={NO_TASK}").status == 200


def test_unknown_ids_and_paths(shared):
    for method, path in [("GET", "/api/tasks/01NOSUCHTASK000000000000000"),
                         ("POST", "/api/tasks/01NOSUCHTASK000000000000000/cancel"),
                         ("POST", "/api/tasks/nope/retry"), ("GET", "/api/nothing"),
                         ("GET", "/nothing"), ("GET", "/api/tasks/a/b")]:
        res = shared.request(method, path)
        assert res.status == 404, (method, path, res.body)
        assert res.header("Content-Type") == "application/json" and res.json["error"]
    res = shared.request("DELETE", "/api/tasks")
    assert res.status == 405 and set(res.header("Allow").split(", ")) == {"GET", "HEAD", "POST"}
    assert shared.request("PUT", "/api/tasks/x/cancel").status == 405
    assert shared.request("POST", "/metrics").status == 405


def test_a_body_over_the_limit_gets_413_before_it_is_read(shared):
    conn = http.client.HTTPConnection("127.0.0.1", shared.port, timeout=10)
    conn.putrequest("POST", "/api/tasks")
    conn.putheader("Authorization", f"Bearer {shared.token}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(50 * 1024 * 1024))
    conn.endheaders()  # no body sent: the server must answer from the header alone
    res = conn.getresponse()
    assert res.status == 413
    assert b"over the limit" in res.read()
    conn.close()
    # The same with "Expect: 100-continue" (curl's way): refused before the body is sent.
    conn = http.client.HTTPConnection("127.0.0.1", shared.port, timeout=10)
    conn.putrequest("POST", "/api/tasks")
    conn.putheader("Authorization", f"Bearer {shared.token}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(50 * 1024 * 1024))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    res = conn.getresponse()
    assert res.status == 413 and res.getheader("Connection") == "close"
    conn.close()
    # A payload over max_payload_bytes inside the slack: 400 naming the payload.
    res = shared.post("/api/tasks", {"type": "ok", "payload": {"x": "a" * (1024 * 1024)}})
    assert res.status == 400 and res.json["field"] == "payload"


def test_cancel_and_retry(supervisor):
    waiting = supervisor.enqueue(type="sleep", delay=3600)
    res = supervisor.post(f"/api/tasks/{waiting['id']}/cancel")
    assert res.status == 200 and res.json["status"] == "cancelled"
    res = supervisor.post(f"/api/tasks/{waiting['id']}/retry")
    assert res.status == 200 and res.json["status"] in ("queued", "running")  # due at once
    assert res.json["completed_at"] is None and res.json["error"] is None
    res = supervisor.post(f"/api/tasks/{waiting['id']}/retry")
    assert res.status == 409 and res.json["field"] == "id"
    running = supervisor.enqueue(type="sleep", payload={"steps": 200, "step_s": 0.05})
    supervisor.wait_status(running["id"], "running")
    res = supervisor.post(f"/api/tasks/{running['id']}/cancel")
    assert res.status == 200 and res.json["status"] in ("running", "cancelled")
    done = supervisor.wait_status(running["id"], "cancelled", timeout=10)
    assert done["history"][-1]["outcome"] == "cancelled"
    # Cancelling a finished task leaves it as it is.
    assert supervisor.post(f"/api/tasks/{running['id']}/cancel").json["status"] == "cancelled"


def test_running_queued_stats_and_throughput(supervisor):
    supervisor.enqueue(type="ok")
    failed = supervisor.enqueue(type="fail", payload={"why": "bad input file"})
    supervisor.wait_status(failed["id"], "failed")
    low = supervisor.enqueue(type="sleep", delay=3600, priority=0)
    high = supervisor.enqueue(type="sleep", delay=3600, priority=9)
    slow = supervisor.enqueue(type="sleep", payload={"steps": 100, "step_s": 0.05})

    def progressing():
        tasks = supervisor.get("/api/running").json["tasks"]
        return tasks and tasks[0]["progress"] and tasks[0]["rss_bytes"] and tasks[0]
    running = wait_for(progressing)
    assert running["id"] == slow["id"] and running["type"] == "sleep" and running["local"]
    assert running["elapsed_s"] >= 0 and running["pid"] > 0 and running["cpu_s"] >= 0
    assert running["progress_message"].startswith("step ")
    queued = supervisor.get("/api/queued").json["tasks"]
    assert [t["id"] for t in queued] == [high["id"], low["id"]]
    assert queued[0]["due"] is False
    stats = supervisor.get("/api/stats").json
    assert stats["totals"]["queued"] == 2 and stats["totals"]["failed"] == 1
    assert stats["by_type"]["failed"] == {"fail": 1}
    assert stats["supervisor"]["pool_size"] == 2 and stats["supervisor"]["workers_busy"] >= 1
    failures = supervisor.get("/api/tasks?status=failed").json["tasks"]
    assert failures[0]["error"] == "ValueError: bad input file"
    throughput = supervisor.get("/api/throughput").json
    assert len(throughput["buckets"]) == 60 and throughput["bucket_s"] == 60
    assert sum(b["succeeded"] for b in throughput["buckets"]) >= 1
    assert sum(b["failed"] for b in throughput["buckets"]) >= 1


def test_openapi_document_names_every_route(shared):
    from supervisor.http import ROUTES
    doc = shared.get("/api/openapi.json").json
    assert doc["openapi"].startswith("3.")
    for method, path, _, auth in ROUTES:
        path = re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", path)
        op = doc["paths"][path][method.lower()]
        assert ("security" in op) == auth, path
    assert {"/metrics", "/"} <= set(doc["paths"])


def test_security_headers_and_host_check(shared):
    page = shared.get("/")
    assert page.status == 200 and page.header("Content-Type").startswith("text/html")
    csp = page.header("Content-Security-Policy")
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    for path in ("/", "/api/stats", "/metrics", "/dashboard/app.js"):
        res = shared.get(path)
        assert res.status == 200, path
        assert res.header("X-Content-Type-Options") == "nosniff"
        assert res.header("Cache-Control") == "no-store"
    rebinding = shared.get("/api/stats", headers={"Host": f"evil.example:{shared.port}"})
    assert rebinding.status == 403
    assert shared.get("/api/stats", headers={"Host": f"localhost:{shared.port}"}).status == 200


def test_token_and_database_files_are_private_and_the_token_is_kept(tmp_path):
    sup = start(tmp_path)
    try:
        token_file = tmp_path / "taskvisor.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "taskvisor.db").stat().st_mode) == 0o600
        assert len(sup.token) >= 32
        assert sup.stop() == 0  # the graceful path: the HTTP server stops in on_shutdown
        assert re.search(r"supervisor \S+ stopped", sup.log_text())
    finally:
        _kill(sup)
    again = start(tmp_path)
    try:
        assert again.token == sup.token
        assert again.stop() == 0
    finally:
        _kill(again)


def _kill(sup) -> None:
    if sup.proc.poll() is None:
        kill_tree(sup.proc.pid)  # with its fork server and any task process
        sup.proc.wait()


def test_a_configured_token_file_is_used(tmp_path):
    token_file = tmp_path / "secret.token"
    token_file.write_text("my-own-token\n")
    os.chmod(token_file, 0o600)
    sup = start(tmp_path, token_file=token_file)
    try:
        assert sup.post("/api/tasks", {"type": "ok"}, token="my-own-token").status == 201
        assert not (tmp_path / "taskvisor.token").exists()
    finally:
        _kill(sup)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=["644", "640", "604"])
def test_a_token_file_others_can_read_is_made_private_as_the_database(tmp_path, mode):
    """A token file readable by group or others was only warned about and used as it
    was, while a loose database file is set to 0600: the token file is now too."""
    token_file = tmp_path / "secret.token"
    token_file.write_text("my-own-token\n")
    os.chmod(token_file, mode)
    sup = start(tmp_path, token_file=token_file)
    try:
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert f"the token file {token_file} had mode {mode:o} (readable by other users); " \
               "set it to 600" in sup.log()
        assert "run chmod 600" not in sup.log()
        assert sup.post("/api/tasks", {"type": "ok"}, token="my-own-token").status == 201
    finally:
        _kill(sup)


def test_a_taken_port_leaves_http_off_but_tasks_run(supervisor, tmp_path):
    other = tmp_path / "second"
    other.mkdir()
    config = write_config(other, listen=f"127.0.0.1:{supervisor.port}")
    with Supervisor(other, config) as second:  # ready: its ready file names no HTTP URL
        assert second.http_url is None
        assert "without HTTP" in second.log() and "cannot listen there" in second.log()
        with Queue(other / "taskvisor.db") as queue:
            task_id = queue.enqueue("ok")
            assert queue.wait(task_id, timeout=15).status is Status.SUCCEEDED
        assert supervisor.get("/healthz").status == 200  # the first one is untouched


def test_an_unusable_token_file_leaves_http_off_with_the_reason(tmp_path):
    token_file = tmp_path / "empty.token"
    token_file.write_text("\n")
    config = write_config(tmp_path, extra=f'token_file = "{token_file}"\n')
    with Supervisor(tmp_path, config) as sup:
        assert sup.http_url is None
        log = sup.log()
        assert "without HTTP" in log and "expected one token on one line" in log
        assert "listening on" not in log
        assert sup.proc.poll() is None


def test_enqueues_from_other_processes_wake_the_supervisor(supervisor):
    with Queue(supervisor.db) as queue:
        task_id = queue.enqueue("ok", {"from": "client"})
        assert queue.wait(task_id, timeout=10).status is Status.SUCCEEDED
    listed = supervisor.get("/api/tasks").json["tasks"]
    assert listed[0]["id"] == task_id and listed[0]["status"] == "succeeded"


def test_head_and_keep_alive(shared):
    conn = http.client.HTTPConnection("127.0.0.1", shared.port, timeout=10)
    try:
        for _ in range(3):  # one connection, several requests
            conn.request("GET", "/api/stats")
            res = conn.getresponse()
            assert res.status == 200 and res.read()
        conn.request("HEAD", "/healthz")
        res = conn.getresponse()
        assert res.status == 200 and res.read() == b""
        assert int(res.getheader("Content-Length")) > 0
    finally:
        conn.close()
    started = time.monotonic()
    assert shared.get("/healthz").status == 200
    assert time.monotonic() - started < 1.0
