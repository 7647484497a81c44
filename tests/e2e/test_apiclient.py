"""The Python client of the HTTP API (`supervisor.apiclient.ApiClient`, as the README shows
it) against a real supervisor: a task in and out, the errors it raises (the README names
them: `supervisor.ApiError` with the status and the field, `NotFound`, `StoreUnavailable`),
and the events of a task over the Unix socket."""

from __future__ import annotations

import queue
import socket
import threading

import pytest

import supervisor as tv
from supervisor.apiclient import ApiClient, ApiError
from tests.e2e.http_support import supervisor  # noqa: F401  (fixture)
from tests.e2e.live_support import start_live


@pytest.mark.timeout(60)
def test_a_task_in_and_out_and_the_errors_users_catch(supervisor):  # noqa: F811
    with ApiClient(supervisor.url, token=supervisor.token) as api:
        task = api.enqueue("ok", {"n": 1})
        supervisor.wait_status(task["id"], "succeeded")
        assert api.get(task["id"])["result"] == {"echo": {"n": 1}}

        with pytest.raises(tv.ApiError) as refused:
            api.enqueue("ok", {"n": 1}, priority="high")
        assert ApiError is tv.ApiError and isinstance(refused.value, tv.InputError)
        assert refused.value.status == 400 and refused.value.field == "priority"
        assert "the supervisor answered HTTP 400" in str(refused.value)

        with pytest.raises(tv.NotFound):
            api.get("0" * 26)
    with ApiClient(supervisor.url) as api, pytest.raises(tv.ApiError) as refused:
        api.enqueue("ok")  # a write without the token
    assert refused.value.status == 401

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once it is closed
    with ApiClient(f"http://127.0.0.1:{port}") as api, pytest.raises(tv.StoreUnavailable):
        api.get(task["id"])


@pytest.mark.timeout(60)
def test_over_the_unix_socket_with_events(tmp_path):
    sup = start_live(tmp_path, listen=f"unix:{tmp_path / 'api.sock'}")
    try:
        with ApiClient(f"unix:{sup.unix}") as api:  # no token on the socket
            ids: list[str] = []
            text, final = "", None

            def enqueue():  # once the stream is open, so no event of the task is missed
                ids.append(api.enqueue("stream", {"n": 3})["id"])
            for _id, kind, data in api.events(type="stream", on_open=enqueue):
                if data.get("id") != ids[0]:
                    continue
                if kind == "output":
                    text += data["text"]
                elif data.get("status") in ("succeeded", "failed", "cancelled"):
                    final = data["status"]
                    break
        assert final == "succeeded" and text == "tok0 tok1 tok2 ", text
    finally:
        sup.close(graceful_s=0)


@pytest.mark.timeout(90)
def test_events_resume_across_a_supervisor_restart_before_the_first_event(tmp_path):
    """The stream gave no id until its first event: a client whose connection dropped
    before one (here: the supervisor killed) reconnected without Last-Event-ID, from
    "now", and never heard of the cancel made while it was away."""
    sup = start_live(tmp_path, listen=f"unix:{tmp_path / 'api.sock'}")
    api = ApiClient(f"unix:{sup.unix}")
    try:
        tid = api.enqueue("stream", {"n": 1}, delay=3600)["id"]
        got: queue.Queue = queue.Queue()
        opened = threading.Event()

        def pump() -> None:
            try:
                for item in api.events(task=tid, on_open=opened.set, reconnect_s=0.1):
                    got.put(item)
            except Exception as exc:  # the client closed at the end of the test
                got.put(exc)
        threading.Thread(target=pump, daemon=True).start()
        assert opened.wait(20)
        sup.kill9()
        sup.queue.cancel(tid)           # while no supervisor serves the stream
        sup.restart()
        _id, kind, data = got.get(timeout=30)
        assert (kind, data["id"], data["status"]) == ("task", tid, "cancelled")
    finally:
        api.close()
        sup.close(graceful_s=0)
