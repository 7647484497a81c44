"""Harness for the HTTP tests (no tests here): a real supervisor process (the launcher of
tests/support/launcher.py) on a temporary config with `[http] listen = "127.0.0.1:0"`,
its bound URL read from its ready file, a small HTTP client, and a finalizer that kills
its process tree.

The task handlers live in a module written into tmp_path and preloaded by the fork server.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import wait_until
from tests.support.launcher import ROOT, SupervisorProcess, render_config  # noqa: F401

HANDLERS = '''
import time
from workers import task

@task("ok")
def ok(payload, ctx):
    return {"echo": payload}

@task("sleep")
def sleep(payload, ctx):
    steps = int(payload.get("steps", 20))
    for i in range(steps):
        ctx.progress(i / steps, f"step {i + 1} of {steps}")
        if ctx.cancelled:
            return None
        time.sleep(float(payload.get("step_s", 0.25)))
    return {"steps": steps}

@task("spawner")
def spawner(payload, ctx):
    kids = [ctx.spawn("ok", {"n": n}) for n in range(int(payload.get("n", 2)))]
    return {"children": kids}

@task("fail")
def fail(payload, ctx):
    raise ValueError(payload.get("why", "boom"))

@task("hog")
def hog(payload, ctx):
    block = bytearray(int(payload.get("mb", 40)) * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(float(payload.get("s", 0.3)))
    return len(block)
'''


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    @property
    def json(self):
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class Supervisor(SupervisorProcess):
    """A supervisor whose config and handlers are in `root`; `url`, `port` and `token` are
    known once it is ready (`start()` below)."""

    def __init__(self, root: Path, config: Path, log: Path | None = None, port: int = 0,
                 token: str = "", db: Path | None = None):
        """`Supervisor(root, config_path)`, then `start()` (or use it as a context manager)."""
        super().__init__(root, None, pythonpath=[root], config_path=config,
                         log_path=log or root / "supervisor.log")
        self.root = root
        self.db = db or root / "taskvisor.db"
        self.token = token
        self._port = port

    @property
    def port(self) -> int:
        return self._port or SupervisorProcess.port.fget(self)

    @port.setter
    def port(self, value: int) -> None:
        self._port = value

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body=None, *, token: str | None = "",
                headers: dict | None = None, timeout: float = 10) -> Response:
        """`token=""` sends the right token, None none at all; a dict body is sent as JSON."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        hdrs = dict(headers or {})
        if token is not None:
            hdrs.setdefault("Authorization", f"Bearer {token or self.token}")
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=body, headers=hdrs)
            res = conn.getresponse()
            return Response(res.status, {k.lower(): v for k, v in res.getheaders()}, res.read())
        finally:
            conn.close()

    def get(self, path: str, **kw) -> Response:
        return self.request("GET", path, token=None, **kw)

    def post(self, path: str, body=None, **kw) -> Response:
        return self.request("POST", path, body, **kw)

    def enqueue(self, **fields) -> dict:
        res = self.post("/api/tasks", fields)
        assert res.status == 201, res.body
        return res.json

    def task(self, task_id: str) -> dict:
        res = self.get(f"/api/tasks/{task_id}")
        assert res.status == 200, res.body
        return res.json

    def wait_status(self, task_id: str, *statuses: str, timeout: float = 15) -> dict:
        return wait_until(lambda: (t := self.task(task_id))["status"] in statuses and t,
                          timeout=timeout, message=f"task {task_id} never became {statuses}")

    def log_text(self) -> str:
        return self.log()

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait: the graceful path (drain, on_shutdown hooks)."""
        return super().stop(timeout)


def write_config(root: Path, *, listen: str = "127.0.0.1:0", pool_size: int = 2,
                 extra: str = "") -> Path:
    """The handlers module and taskvisor.toml in `root`; `extra` is TOML text appended to
    the [http] section (more keys there, or more sections)."""
    (root / "tvtest_handlers.py").write_text(HANDLERS)
    config = root / "taskvisor.toml"
    config.write_text(render_config({
        "supervisor": {"database": "taskvisor.db", "pool_size": pool_size,
                       "preload": ["tvtest_handlers"], "poll_interval_s": 0.5,
                       "shutdown_grace_s": 2, "kill_grace_s": 1},
        "defaults": {"max_attempts": 1, "backoff_initial_s": 0.1},
        # so /api/schedules has one (it fires on Jan 1st)
        "schedules": {"yearly": {"cron": "0 3 1 1 *", "type": "ok"}},
    }) + render_config({"http": {"listen": listen}}).rstrip("\n") + "\n" + extra)
    return config


def start(root: Path, token_file: Path | None = None, **config_kw) -> Supervisor:
    """Start a supervisor in `root` and wait until it is ready and serving HTTP."""
    if token_file is not None:
        config_kw["extra"] = config_kw.get("extra", "") + f'token_file = "{token_file}"\n'
    sup = Supervisor(root, write_config(root, **config_kw))
    try:
        sup.start(timeout=30)
        assert sup.http_url, f"ready without HTTP:\n{sup.log()[-4000:]}"
        sup.token = (token_file or root / "taskvisor.token").read_text().strip()
    except BaseException:
        sup.close(graceful_s=0)
        raise
    return sup


@pytest.fixture
def supervisor(tmp_path: Path):
    sup = start(tmp_path)
    yield sup
    sup.close(graceful_s=0)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One supervisor for a module's tests that never run a task (a running task process
    would outlive its test and trip the process-leak guard)."""
    sup = start(tmp_path_factory.mktemp("shared"))
    yield sup
    sup.close(graceful_s=0)


def wait_for(predicate, timeout: float = 15, message: str | None = None):
    return wait_until(predicate, timeout=timeout, interval=0.05, message=message)
