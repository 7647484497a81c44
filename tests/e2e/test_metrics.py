"""GET /metrics from a real supervisor: every contracted name with its labels, values that
follow the work done (including enqueues by other processes), and `promtool check
metrics` on a real scrape."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor import Queue, __version__
from tests.e2e.http_support import supervisor, wait_for  # noqa: F401  (fixture)

CONTRACT = {  # name -> (type, label names)
    "taskvisor_tasks": ("gauge", {"status", "type"}),
    "taskvisor_oldest_queued_task_timestamp_seconds": ("gauge", {"type"}),
    "taskvisor_tasks_enqueued": ("counter", {"type"}),
    "taskvisor_task_attempts": ("counter", {"type", "outcome"}),
    "taskvisor_task_duration_seconds": ("histogram", {"type"}),
    "taskvisor_task_queue_wait_seconds": ("histogram", {"type"}),
    "taskvisor_task_peak_rss_bytes": ("histogram", {"type"}),
    "taskvisor_workers_busy": ("gauge", set()),
    "taskvisor_pool_size": ("gauge", set()),
    "taskvisor_memory_reserved_bytes": ("gauge", set()),
    "taskvisor_leases_expired": ("counter", set()),
    "taskvisor_forkserver_restarts": ("counter", set()),
    "taskvisor_supervisor_last_loop_timestamp_seconds": ("gauge", set()),
    "taskvisor_build_info": ("gauge", {"version"}),
    "process_resident_memory_bytes": ("gauge", set()),
    "process_cpu_seconds": ("counter", set()),
}


def scrape(sup) -> tuple[str, dict]:
    res = sup.get("/metrics")
    assert res.status == 200
    assert res.header("Content-Type").startswith("text/plain; version=0.0.4")
    text = res.body.decode()
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def sample(families: dict, family: str, name: str | None = None, **labels) -> float | None:
    for s in families[family].samples if family in families else ():
        if s.name == (name or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_metrics_follow_the_work(supervisor):
    with Queue(supervisor.db) as queue:  # enqueues from another process count too
        first = queue.enqueue("ok", {"n": 1})
        queue.enqueue("later", delay=3600)
        queue.wait(first, timeout=10)
    failed = supervisor.enqueue(type="fail")
    hog = supervisor.enqueue(type="hog", payload={"mb": 64, "s": 0.2}, memory_mb=512)
    supervisor.wait_status(failed["id"], "failed")
    supervisor.wait_status(hog["id"], "succeeded")

    _, families = wait_for(lambda: (r := scrape(supervisor))[1].get(
        "taskvisor_task_attempts") and sample(r[1], "taskvisor_task_attempts",
                                              "taskvisor_task_attempts_total", type="hog") and r)
    for name, (kind, labels) in CONTRACT.items():
        assert name in families, name
        assert families[name].type == kind, name
        for s in families[name].samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
    total = "taskvisor_task_attempts_total"
    assert sample(families, "taskvisor_task_attempts", total, type="ok", outcome="succeeded") == 1
    assert sample(families, "taskvisor_task_attempts", total, type="fail", outcome="error") == 1
    assert sample(families, "taskvisor_tasks", status="queued", type="later") == 1
    assert sample(families, "taskvisor_tasks", status="succeeded", type="ok") == 1
    assert sample(families, "taskvisor_tasks", status="failed", type="fail") == 1
    enq = "taskvisor_tasks_enqueued_total"
    for type_ in ("ok", "later", "fail", "hog"):
        assert sample(families, "taskvisor_tasks_enqueued", enq, type=type_) == 1, type_
    assert sample(families, "taskvisor_oldest_queued_task_timestamp_seconds", type="later") is None
    peak = sample(families, "taskvisor_task_peak_rss_bytes", "taskvisor_task_peak_rss_bytes_sum",
                  type="hog")
    assert peak >= 64 * 1024 * 1024
    assert sample(families, "taskvisor_task_duration_seconds",
                  "taskvisor_task_duration_seconds_count", type="hog") == 1
    assert sample(families, "taskvisor_task_queue_wait_seconds",
                  "taskvisor_task_queue_wait_seconds_count", type="ok") == 1
    assert sample(families, "taskvisor_pool_size") == 2
    assert sample(families, "taskvisor_build_info", version=__version__) == 1
    assert sample(families, "taskvisor_leases_expired", "taskvisor_leases_expired_total") == 0


def test_gauges_show_running_work(supervisor):
    task = supervisor.enqueue(type="sleep", payload={"steps": 200, "step_s": 0.05}, memory_mb=300)
    supervisor.wait_status(task["id"], "running")
    # The gauges read the snapshot the loop publishes at the end of each pass: the one
    # after the claim's commit shows the task.
    wait_for(lambda: sample(scrape(supervisor)[1], "taskvisor_workers_busy") == 1)
    _, families = scrape(supervisor)
    assert sample(families, "taskvisor_workers_busy") == 1
    assert sample(families, "taskvisor_memory_reserved_bytes") == 300 * 1024 * 1024
    assert sample(families, "taskvisor_tasks", status="running", type="sleep") == 1
    import time
    assert abs(sample(families, "taskvisor_supervisor_last_loop_timestamp_seconds") - time.time()) < 5
    supervisor.post(f"/api/tasks/{task['id']}/cancel")
    supervisor.wait_status(task["id"], "cancelled")
    wait_for(lambda: sample(scrape(supervisor)[1], "taskvisor_workers_busy") == 0)


def test_promtool_accepts_a_real_scrape(supervisor, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    supervisor.enqueue(type="ok")
    wait_for(lambda: "taskvisor_task_duration_seconds_bucket" in scrape(supervisor)[0])
    text, _ = scrape(supervisor)
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr
