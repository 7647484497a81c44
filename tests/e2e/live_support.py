"""Harness for the live tests (no tests here): a real supervisor with HTTP on TCP or on a
Unix socket (the launcher of tests/support/launcher.py: ready, and its address known, from
its ready file), handlers that stream and print, and a small SSE reader in Python."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.http_support import Supervisor
from tests.support import kill_tree
from tests.support.launcher import render_config

HANDLERS = '''
import sys, time
from workers import task

@task("stream")
def stream(payload, ctx):
    for i in range(int(payload.get("n", 10))):
        ctx.stream(payload.get("piece", "tok%d " % i))
        if payload.get("gap_s"):
            time.sleep(payload["gap_s"])
    return {"n": payload.get("n", 10)}

@task("flaky")
def flaky(payload, ctx):
    print("attempt %d" % ctx.attempt, flush=True)
    time.sleep(float(payload.get("s", 1.5)))
    if ctx.attempt < int(payload.get("fail", 1)) + 1:
        raise RuntimeError("attempt %d fails" % ctx.attempt)
    return None

@task("pieces")
def pieces(payload, ctx):
    """Writes each piece (latin-1 text: its code points are the bytes) to stdout raw,
    with a flush, or with "stream" streams it (ctx.stream, sent at once); piece i > 0
    once the file `go`/i exists, so a test decides when."""
    import os
    for i, piece in enumerate(payload["pieces"]):
        gate = os.path.join(payload["go"], str(i))
        deadline = time.monotonic() + 30
        while i and not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError("no " + gate)
            time.sleep(0.005)
        if payload.get("stream"):
            ctx.stream(piece, flush=True)
        else:
            sys.stdout.buffer.write(piece.encode("latin-1"))
            sys.stdout.flush()
    return None

@task("print")
def print_(payload, ctx):
    line = b"x" * 1023 + b"\\n"
    block = line * 1024
    for _ in range(int(payload.get("mb", 1))):
        sys.stdout.buffer.write(block)
    sys.stdout.flush()
    print("the last line", file=sys.stderr, flush=True)
    ctx.logger.info("a logger line")
    return None
'''


def start_live(root: Path, *, listen: str = "127.0.0.1:0", extra: str = "",
               preload: tuple[str, ...] = ("tvlive_handlers",), pool_size: int = 4) -> Supervisor:
    (root / "tvlive_handlers.py").write_text(HANDLERS)
    config = root / "taskvisor.toml"
    config.write_text(render_config({  # [http] last: `extra` is more of its keys, or sections
        "supervisor": {"database": "taskvisor.db", "pool_size": pool_size,
                       "preload": list(preload), "poll_interval_s": 0.5,
                       "shutdown_grace_s": 2, "kill_grace_s": 1},
        "defaults": {"max_attempts": 1},
        "http": {"listen": listen},
    }).rstrip("\n") + "\n" + extra)
    sup = Supervisor(root, config)
    try:
        sup.start(timeout=30)  # ready when its ready file says so; it names the bound address
        url = sup.http_url
        assert url, f"ready without HTTP:\n{sup.log()[-4000:]}"
        if url.startswith("unix:"):
            sup.unix = url[len("unix:"):]
        else:
            sup.token = (root / "taskvisor.token").read_text().strip()
    except BaseException:
        sup.close(graceful_s=0)
        raise
    return sup


def stop(sup: Supervisor) -> None:
    if sup.proc.poll() is None:
        kill_tree(sup.proc.pid)
    sup.proc.wait(timeout=10)


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


@dataclass
class Event:
    id: int | None
    event: str
    data: dict


class EventStream:
    """GET /api/events on a connection of its own; `next()` returns the next Event."""

    def __init__(self, sup: Supervisor, query: str = "", last_id: int | None = None,
                 headers: dict | None = None, timeout: float = 10):
        self.conn = (UnixConnection(sup.unix, timeout) if getattr(sup, "unix", None)
                     else http.client.HTTPConnection("127.0.0.1", sup.port, timeout=timeout))
        hdrs = dict(headers or {})
        if last_id is not None:
            hdrs["Last-Event-ID"] = str(last_id)
        self.conn.request("GET", "/api/events" + query, headers=hdrs)
        self.res = self.conn.getresponse()
        self.status = self.res.status

    def next(self) -> Event:
        ev = {"id": None, "event": "message", "data": []}
        while True:
            line = self.res.fp.readline()
            if not line:
                raise EOFError("the event stream ended")
            line = line.decode().rstrip("\n")
            if line == "":
                if ev["data"]:
                    return Event(None if ev["id"] is None else int(ev["id"]), ev["event"],
                                 json.loads("\n".join(ev["data"])))
                ev = {"id": None, "event": "message", "data": []}
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                ev["data"].append(value)
            elif field in ("id", "event"):
                ev[field] = value

    def until(self, predicate, limit: int = 10000) -> list[Event]:
        got = []
        for _ in range(limit):
            ev = self.next()
            got.append(ev)
            if predicate(ev):
                return got
        raise AssertionError(f"no matching event in {limit}: {got[-5:]}")

    def close(self) -> None:
        self.conn.close()


def unix_request(path: str, method: str, url: str, body=None, headers: dict | None = None):
    conn = UnixConnection(path)
    hdrs = dict(headers or {})
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    try:
        conn.request(method, url, body=body, headers=hdrs)
        res = conn.getresponse()
        return res.status, json.loads(res.read() or b"null")
    finally:
        conn.close()
