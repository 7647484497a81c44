"""Harness for the live tests (no tests here): a real supervisor with HTTP on TCP or on a
Unix socket, handlers that stream and print, and a small SSE reader in Python."""

from __future__ import annotations

import http.client
import json
import re
import socket
import textwrap
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.http_support import Supervisor, spawn
from tests.support import kill_tree, wait_until

LISTENING = re.compile(r"http: listening on (http://127\.0\.0\.1:(\d+)/|unix:(\S+)) ")

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
    mods = ", ".join(json.dumps(m) for m in preload)
    config = root / "taskvisor.toml"
    config.write_text(textwrap.dedent(f"""
        [supervisor]
        database = "taskvisor.db"
        pool_size = {pool_size}
        preload = [{mods}]
        poll_interval_s = 0.5
        shutdown_grace_s = 2
        kill_grace_s = 1

        [defaults]
        max_attempts = 1

        [http]
        listen = "{listen}"
    """) + extra)
    proc = spawn(root, config)
    sup = Supervisor(proc, root, root / "supervisor.log", db=root / "taskvisor.db")
    try:
        def bound():
            assert proc.poll() is None, f"supervisor exited {proc.returncode}: {sup.log_text()}"
            return LISTENING.search(sup.log_text())
        m = wait_until(bound, timeout=30, interval=0.05)
        if m.group(3):
            sup.unix = m.group(3)
        else:
            sup.port = int(m.group(2))
            sup.token = (root / "taskvisor.token").read_text().strip()
    except BaseException:
        kill_tree(proc.pid)
        proc.wait()
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
