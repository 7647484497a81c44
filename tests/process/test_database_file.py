"""The database file deleted or replaced under a running supervisor (`rm t.db*`): the
supervisor notices within a few seconds, says so on /healthz and in its log (naming the
file) and exits non-zero instead of recording into a file nobody can open; meanwhile a
client refuses to create a new, empty database where the live supervisor's registration
says one should be. After it exited, a new database may be created again."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from supervisor.client import Queue
from supervisor.errors import StoreUnavailable
from supervisor.start import EXIT_DATABASE_GONE
from tests.process.conftest import ROOT
from tests.support import wait_until

pytestmark = pytest.mark.timeout(90)
SETTINGS = {"supervisor": {"kill_grace_s": 4}, "http": {"listen": "127.0.0.1:0"}}


def _registration(sup):
    return sup.dir / f".{sup.db_path.name}.supervisor.{sup.pid}"


def _healthz(sup) -> tuple[int, dict]:
    try:  # the bound address from this life's ready file
        with urllib.request.urlopen(f"{sup.http_url}healthz", timeout=5) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _cli_enqueue(sup) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKVISOR_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "supervisor", "--config",
                           str(sup.config_path), "enqueue", "t.ok"], cwd=sup.dir, env=env,
                          capture_output=True, text=True, timeout=30)


def _running_task(sup) -> None:
    task_id = sup.enqueue("t.ignore_term")  # holds the supervisor in its drain for a while
    sup.wait_status(task_id, "running")
    wait_until(lambda: any(e[0] == "start" for e in sup.events()), timeout=10)


def test_database_deleted_under_a_running_supervisor(supervisor_proc):
    sup = supervisor_proc(**SETTINGS)
    _running_task(sup)
    reg = _registration(sup)
    assert stat.S_IMODE(reg.stat().st_mode) == 0o600
    assert json.loads(reg.read_text())["pid"] == sup.pid
    assert _healthz(sup)[0] == 200

    for name in ("t.db", "t.db-wal", "t.db-shm"):  # rm t.db*
        (sup.dir / name).unlink(missing_ok=True)
    removed_at = time.monotonic()

    with Queue(sup.db_path) as queue:  # the client refuses to make a second database
        with pytest.raises(StoreUnavailable, match="deleted under a running supervisor"):
            queue.enqueue("t.ok")
    res = _cli_enqueue(sup)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"taskvisor: error: {sup.db_path}: the database file is "
                                 f"missing, but supervisor pid {sup.pid} is running on it")
    assert not sup.db_path.exists()

    code, body = _healthz(sup)
    assert code == 503 and body["status"] == "unhealthy"
    assert any(f"the database file {sup.db_path} was deleted" in r for r in body["reasons"])

    sup.wait_log(f"ERROR taskvisor.supervisor: the database file {sup.db_path} was deleted",
                 timeout=5)
    assert time.monotonic() - removed_at < 5
    assert sup.wait_exit(timeout=20) == EXIT_DATABASE_GONE
    assert not reg.exists()
    assert not sup.db_path.exists(), "the supervisor must not recreate the file"

    # Nobody serves that path any more: creating a new database is allowed again.
    with Queue(sup.db_path) as queue:
        assert queue.get(queue.enqueue("t.ok")).status == "queued"


def test_database_replaced_under_a_running_supervisor(supervisor_proc):
    sup = supervisor_proc(**SETTINGS)
    _running_task(sup)
    other = sup.dir / "other.db"
    with Queue(other) as queue:
        queue.enqueue("t.ok")
    os.replace(other, sup.db_path)
    sup.wait_log(f"the database file {sup.db_path} was replaced by another file", timeout=5)
    assert sup.wait_exit(timeout=20) == EXIT_DATABASE_GONE
    assert "Traceback" not in sup.log()


def test_clean_exit_removes_the_registration_and_a_dead_ones_is_ignored(supervisor_proc):
    sup = supervisor_proc()
    reg = _registration(sup)
    assert reg.exists()
    assert sup.stop() == 0
    assert not reg.exists()
    # A kill -9 leaves its registration behind; it names a dead process, so a client
    # creates a missing database as usual, and the next start removes the leftover.
    sup.start()
    reg = _registration(sup)
    sup.kill9()
    assert reg.exists()
    for name in ("t.db", "t.db-wal", "t.db-shm"):
        (sup.dir / name).unlink(missing_ok=True)
    with Queue(sup.db_path) as queue:
        queue.enqueue("t.ok")
    sup.start()
    assert not reg.exists()
    assert _registration(sup).exists()
