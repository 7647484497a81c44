"""A request body shorter than its Content-Length: 400 at once when the client closes its
side, 408 within a few seconds when it stalls, never a 500 after the 15 s idle timeout;
the server goes on answering others meanwhile."""

from __future__ import annotations

import socket
import time

import pytest

from supervisor.http import BODY_TIMEOUT_S
from tests.e2e.http_support import shared  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(60)


def _send_short(sup, announced: int, sent: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", sup.port), timeout=20)
    head = (f"POST /api/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {sup.token}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {announced}\r\n\r\n")
    sock.sendall(head.encode() + sent)
    return sock


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def test_client_that_closes_early_gets_400_at_once(shared):
    started = time.monotonic()
    sock = _send_short(shared, 100, b'{"type": "ok"')
    sock.shutdown(socket.SHUT_WR)
    status, body = _answer(sock)
    assert status == 400, body
    assert b"ended after 13 of the 100 bytes" in body and b'"field":"body"' in body
    assert time.monotonic() - started < 2
    assert shared.get("/api/tasks").json["tasks"] == []


def test_client_that_stalls_gets_408_after_the_short_body_timeout(shared):
    started = time.monotonic()
    sock = _send_short(shared, 100, b'{"type": ')
    # Others are served while that one waits.
    assert shared.get("/healthz").status == 200
    status, body = _answer(sock)
    took = time.monotonic() - started
    assert status == 408, body
    assert BODY_TIMEOUT_S - 0.5 <= took < BODY_TIMEOUT_S + 3, took
    assert b"9 of the 100 bytes" in body
    assert "ERROR taskvisor.http" not in shared.log_text()


@pytest.mark.parametrize("path, field", [
    ("/api/tasks?limit=%C2%B2", "limit"),            # "²": str.isdigit() yet not int()
    ("/api/queued?limit=%C2%B2", "limit"),
    ("/api/tasks/{id}/output?attempt=%C2%B2", "attempt"),
    ("/api/tasks/{id}/logs?after_seq=%C2%B2", "after_seq"),
    ("/api/tasks/{id}/logs?after_seq=--5", "after_seq"),
    ("/api/events?last_event_id=%C2%B2", "Last-Event-ID"),
    ("/api/tasks?limit=%D9%A1", "limit"),            # an Arabic-Indic 1
])
def test_a_number_that_is_not_ascii_digits_is_a_400_naming_the_parameter(shared, path, field):
    """These were 500s, with a traceback in the log, from int() of a Unicode digit."""
    task_id = shared.enqueue(type="ok", delay=3600)["id"]
    res = shared.get(path.format(id=task_id))
    assert res.status == 400, res.body
    assert res.json["field"] == field, res.json
    shared.post(f"/api/tasks/{task_id}/cancel")
    assert "Traceback" not in shared.log_text()


@pytest.mark.parametrize("expect", [False, True])
def test_a_content_length_that_is_not_ascii_digits_is_a_400(shared, expect):
    sock = socket.create_connection(("127.0.0.1", shared.port), timeout=20)
    head = ("POST /api/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + ("Expect: 100-continue\r\n" if expect else "")
            + f"Authorization: Bearer {shared.token}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1\xb2\r\n\r\n")
    sock.sendall(head.encode("latin-1"))
    sock.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    if expect:  # told to go on, then refused
        continue_, _, data = data.partition(b"\r\n\r\n")
        assert continue_.startswith(b"HTTP/1.1 100 "), continue_
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert b'"field":"Content-Length"' in data
    assert "Traceback" not in shared.log_text()
