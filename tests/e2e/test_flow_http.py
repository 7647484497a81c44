"""Flow control through a real supervisor's HTTP API and the CLI: /api/limits,
/api/schedules with pause and resume (token required), limit_keys at enqueue, the limit
metrics, `taskvisor limits` and `taskvisor schedules`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.http_support import ROOT, start, wait_for
from tests.support import kill_tree

LIMITS = '''
[limits."tenant:*"]
concurrency = 1
requests_per_minute = 60

[types."sleep"]
limits = ["tenant:default"]
'''


@pytest.fixture
def flow_sup(tmp_path):
    # extra lands after [http] listen: tables of their own.
    sup = start(tmp_path, extra=LIMITS)
    yield sup
    if sup.proc.poll() is None:
        kill_tree(sup.proc.pid)
    sup.proc.wait(timeout=10)


def cli(sup, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKVISOR_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "supervisor", "--config",
                           str(sup.root / "taskvisor.toml"), *args],
                          capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.timeout(90)
def test_limits_over_http_cli_and_metrics(flow_sup):
    sup = flow_sup
    first = sup.enqueue(type="sleep", payload={"steps": 40, "step_s": 0.05},
                        limit_keys=["tenant:7"])
    assert first["limit_keys"] == ["tenant:7", "tenant:default"]
    second = sup.enqueue(type="ok", limit_keys=["tenant:7"])
    bad = sup.post("/api/tasks", {"type": "ok", "limit_keys": ["openai"]})
    assert bad.status == 400 and bad.json["field"] == "limit_keys"
    assert sup.post("/api/tasks", {"type": "ok", "limit_keys": "tenant:1"}).status == 400
    sup.wait_status(first["id"], "running")
    rows = {r["key"]: r for r in sup.get("/api/limits").json["limits"]}
    assert rows["tenant:7"]["running"] == 1 and rows["tenant:7"]["limit"] == "tenant:*"
    assert rows["tenant:7"]["blocked_by"] in ("concurrency", "requests")
    assert rows["tenant:7"]["waiting"] == 1  # the second task waits on the first
    assert sup.task(second["id"])["status"] == "queued"
    metrics = sup.get("/metrics").body.decode()
    assert 'taskvisor_limit_available{kind="concurrency",limit="tenant:7"} 0.0' in metrics
    assert 'taskvisor_limit_wait_seconds{limit="tenant:7"}' in metrics
    out = cli(sup, "limits")
    assert out.returncode == 0 and "tenant:7" in out.stdout and "tenant:*" in out.stdout, out
    as_json = json.loads(cli(sup, "limits", "--json").stdout)
    assert {r["key"] for r in as_json} >= {"tenant:7", "tenant:default"}
    sup.wait_status(second["id"], "succeeded", timeout=30)


@pytest.mark.timeout(60)
def test_schedules_pause_and_resume_over_http_and_cli(flow_sup):
    sup = flow_sup
    (row,) = sup.get("/api/schedules").json["schedules"]
    assert row["name"] == "yearly" and row["cron"] == "0 3 1 1 *" and not row["paused"]
    assert row["next_fire_at"].endswith("-01-01T03:00:00.000Z")
    assert sup.post("/api/schedules/yearly/pause", token=None).status == 401
    paused = sup.post("/api/schedules/yearly/pause")
    assert paused.status == 200 and paused.json["paused"] and paused.json["next_fire_at"] is None
    assert sup.post("/api/schedules/nope/pause").status == 404
    out = cli(sup, "schedules")
    assert out.returncode == 0 and "yearly" in out.stdout and "paused" in out.stdout, out
    assert cli(sup, "schedules", "resume", "yearly").stdout.strip() == "running"
    assert not sup.get("/api/schedules").json["schedules"][0]["paused"]
    bad = cli(sup, "schedules", "pause", "nope")
    assert bad.returncode == 2 and "no schedule named 'nope'" in bad.stderr
    doc = sup.get("/api/openapi.json").json
    name = doc["paths"]["/api/schedules/{name}/pause"]["post"]["parameters"][0]
    assert name["schema"]["enum"] == ["yearly"]
