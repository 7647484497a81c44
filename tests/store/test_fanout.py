"""The fan-out's writes on a real file and real sockets (no fork): a client whose socket
is full gets the rest, in order and once, when it reads again; a client that reads
nothing is dropped past the backlog limit while the others go on."""

from __future__ import annotations

import re
import socket

import pytest

from supervisor import broadcast
from supervisor.broadcast import FanOut, Filter
from tests.store.factory import T0, new


def _fan_out(db_path) -> tuple[FanOut, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    return FanOut(str(db_path), 600.0, theirs), ours


def _client(fan: FanOut, sndbuf: int) -> socket.socket:
    """A stream socket pair: the fan-out writes one end, the test reads the other."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    fan.attach(a, Filter(), fan.last_id)
    return b


def _ids(data: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"(?:^|\n)id: (\d+)\n", data)]


def _pump(fan: FanOut, sock: socket.socket, want: int, rounds: int = 10000) -> bytes:
    """Read what `sock` has and let the fan-out flush, until `want` frames arrived."""
    got = b""
    sock.setblocking(False)
    for _ in range(rounds):
        try:
            got += sock.recv(1 << 20)
        except BlockingIOError:
            pass
        for client in list(fan.clients.values()):
            if client.writing:
                fan.flush(client)
        if len(_ids(got)) >= want:
            return got
    raise AssertionError(f"{len(_ids(got))} of {want} frames")


@pytest.mark.timeout(60)
def test_a_client_with_a_full_socket_gets_the_rest_in_order_once(store, db_path):
    store.subscribe_events(T0)
    fan, _ctrl = _fan_out(db_path)
    try:
        slow = _client(fan, 4096)        # takes a few frames, then its socket is full
        fast = _client(fan, 1 << 20)
        for i in range(20):              # batches: some go straight out, some wait
            store.enqueue_many([new() for _ in range(50)], T0 + i)
            fan.read_new()
        newest = store.newest_event_id()
        assert fan.last_id == newest
        assert any(c.out for c in fan.clients.values())  # the slow one has a backlog
        for sock in (fast, slow):
            assert _ids(_pump(fan, sock, 1000)) == list(range(newest - 999, newest + 1))
    finally:
        fan.store.close()


@pytest.mark.timeout(60)
def test_a_client_that_never_reads_is_dropped_past_the_backlog_limit(store, db_path,
                                                                     monkeypatch):
    monkeypatch.setattr(broadcast, "MAX_BACKLOG", 64 * 1024)
    store.subscribe_events(T0)
    fan, _ctrl = _fan_out(db_path)
    try:
        stuck = _client(fan, 4096)
        reader = _client(fan, 1 << 20)
        got = b""
        reader.setblocking(False)
        for i in range(40):
            store.enqueue_many([new() for _ in range(50)], T0 + i)
            fan.read_new()
            got += reader.recv(1 << 22)
        assert len(fan.clients) == 1     # the stuck one is gone, its socket closed:
        left = b""                       # what it had received, then end of file
        while chunk := stuck.recv(1 << 20):
            left += chunk
        assert _ids(left) == list(range(_ids(left)[0], _ids(left)[0] + len(_ids(left))))
        newest = store.newest_event_id()
        assert _ids(got) == list(range(newest - 1999, newest + 1))
    finally:
        fan.store.close()
