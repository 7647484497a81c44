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
