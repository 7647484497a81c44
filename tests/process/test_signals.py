"""Signals to a real supervisor: SIGTERM/SIGINT drain (and the requeue of what outlives the
grace), a second signal that stops at once, and SIGHUP reloads (pool size, a type's
timeout, an invalid file, a changed preload)."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.process.conftest import assert_dead, max_concurrent
from tests.support import wait_until


def running_now(sup) -> int:
    return len(sup.store.list(status="running"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_stop_signal_drains_running_tasks(supervisor_proc, sig):
    sup = supervisor_proc(supervisor={"pool_size": 2, "shutdown_grace_s": 10})
    ids = [sup.enqueue("t.log", {"s": 0.8}) for _ in range(2)]
    later = sup.enqueue("t.ok", delay=0.1, priority=-1)
    wait_until(lambda: running_now(sup) == 2 and len(sup.events()) >= 2, timeout=10)
    t0 = time.monotonic()
    sup.signal(sig)
    assert sup.wait_exit(15) == 0
    assert time.monotonic() - t0 < 8  # finished with the tasks, not at the grace
    for task_id in ids:
        task = sup.get(task_id)
        assert task.status == "succeeded" and task.attempts == 1
    # no new claim after the signal
    assert sup.get(later).status == "queued" and sup.get(later).attempts == 0
    assert "stopping: no new claims" in sup.log()


@pytest.mark.timeout(60)
def test_task_longer_than_the_grace_is_interrupted_and_requeued(supervisor_proc):
    sup = supervisor_proc(supervisor={"pool_size": 1, "shutdown_grace_s": 1})
    task_id = sup.enqueue("t.sleep", {"s": 1000}, max_attempts=2)
    wait_until(lambda: sup.get(task_id).pid, timeout=10)
    pid = sup.get(task_id).pid
    t0 = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(15) == 0
    elapsed = time.monotonic() - t0
    assert 0.9 < elapsed < 6, elapsed
    task = sup.get(task_id)
    assert task.status == "queued"
    assert task.attempts == 0  # the attempt was given back
    assert task.outcome == "interrupted"
    assert task.history[-1].outcome == "interrupted"
    assert "shutdown" in task.history[-1].reason
    assert_dead(pid)
    # It runs again (from the start) at the next life and its attempt is counted then.
    sup.restart()
    wait_until(lambda: sup.get(task_id).status == "running" and sup.get(task_id).pid, timeout=10)
    assert sup.get(task_id).attempts == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_second_signal_stops_at_once_and_still_requeues(supervisor_proc, second):
    sup = supervisor_proc(supervisor={"pool_size": 2, "shutdown_grace_s": 30})
    ids = [sup.enqueue("t.sleep", {"s": 1000}) for _ in range(2)]
    wait_until(lambda: all(sup.get(i).pid for i in ids), timeout=10)
    pids = [sup.get(i).pid for i in ids]
    sup.signal(signal.SIGTERM)
    sup.wait_log("stopping: no new claims")
    assert sup.proc.poll() is None  # draining: the grace is 30 s
    t0 = time.monotonic()
    sup.signal(second)
    assert sup.wait_exit(10) == 0
    assert time.monotonic() - t0 < 5  # well before the 30 s grace
    for task_id in ids:
        task = sup.get(task_id)
        assert (task.status, task.attempts, task.outcome) == ("queued", 0, "interrupted")
    for pid in pids:
        assert_dead(pid)


@pytest.mark.timeout(90)
def test_sighup_changes_pool_size_and_type_timeout(supervisor_proc):
    sup = supervisor_proc(supervisor={"pool_size": 1},
                          types={"t.sleep": {"timeout_s": 30}})
    # Under pool_size 1, three tasks run one after the other.
    first = [sup.enqueue("t.log", {"s": 0.3}) for _ in range(3)]
    sup.wait_all(first, "succeeded", timeout=20)
    assert max_concurrent(sup.runs()) == 1

    sup.write_config({"supervisor": {"pool_size": 3},
                      "types": {"t.sleep": {"timeout_s": 1}}})
    sup.signal(signal.SIGHUP)
    sup.wait_log("config reloaded from")
    assert "pool_size=3" in sup.log()

    # Three at once now.
    second = [sup.enqueue("t.log", {"s": 1.5}) for _ in range(3)]
    wait_until(lambda: running_now(sup) == 3, timeout=10,
               message="pool_size 3 did not apply after SIGHUP")
    sup.wait_all(second, "succeeded", timeout=20)
    runs = {k: v for k, v in sup.runs().items() if k in second}
    assert max_concurrent(runs) == 3

    # The type's new timeout applies to a new claim.
    hang = sup.enqueue("t.sleep", {"s": 1000}, max_attempts=1)
    task = sup.wait_status(hang, "failed", timeout=10)
    assert task.history[-1].outcome == "timeout"
    assert "1s time limit" in task.history[-1].reason
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_sighup_with_an_invalid_config_keeps_the_old_one(supervisor_proc):
    sup = supervisor_proc(supervisor={"pool_size": 1})
    good = sup.config_path.read_text()
    sup.write_config(text=good.replace("pool_size = 1", "pool_size = -4\nno_such_key = 1"))
    sup.signal(signal.SIGHUP)
    sup.wait_log("reload rejected: keeping the running config")
    log = sup.log()
    assert "pool_size" in log and "no_such_key" in log  # every error is logged
    assert sup.proc.poll() is None
    # still serving, still with one slot
    ids = [sup.enqueue("t.log", {"s": 0.3}) for _ in range(2)]
    sup.wait_all(ids, "succeeded", timeout=15)
    assert max_concurrent(sup.runs()) == 1
    # and a syntax error is rejected too
    sup.write_config(text="[supervisor\npool_size = ")
    sup.signal(signal.SIGHUP)
    sup.wait_log("reload rejected: keeping the running config", count=2)
    assert sup.proc.poll() is None
    sup.wait_status(sup.enqueue("t.ok"), "succeeded")
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_sighup_with_a_broken_preload_keeps_the_old_fork_server(supervisor_proc):
    sup = supervisor_proc(supervisor={"pool_size": 1})
    (server,) = sup.fork_servers()
    sup.write_config({"supervisor": {"preload": ["tvp_handlers", "tvp_broken"]}})
    sup.signal(signal.SIGHUP)
    sup.wait_log("keeping the old one")
    assert "tvp_broken fails to import on purpose" in sup.log()
    assert [p.pid for p in sup.fork_servers()] == [server.pid]
    task = sup.wait_status(sup.enqueue("t.ok"), "succeeded")
    assert task.result["ppid"] == server.pid
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_sighup_with_a_new_preload_starts_a_new_fork_server(supervisor_proc):
    sup = supervisor_proc(supervisor={"pool_size": 2})
    (old_server,) = sup.fork_servers()
    # t.extra is unknown to the first fork server
    unknown = sup.enqueue("t.extra", max_attempts=1)
    assert sup.wait_status(unknown, "failed").history[-1].error["type"] == "UnknownTaskType"

    long = sup.enqueue("t.log", {"s": 2.0})
    wait_until(lambda: sup.runs().get(long), timeout=10)
    sup.write_config({"supervisor": {"preload": ["tvp_handlers", "tvp_extra"]}})
    sup.signal(signal.SIGHUP)
    sup.wait_log("config reloaded from")
    new_servers = [p for p in sup.fork_servers() if p.pid != old_server.pid]
    assert len(new_servers) == 1

    extra = sup.enqueue("t.extra")
    task = sup.wait_status(extra, "succeeded", timeout=10)
    assert task.result["ppid"] == new_servers[0].pid  # forked by the new fork server

    # The task running on the old fork server finished on it, untouched.
    done = sup.wait_status(long, "succeeded", timeout=10)
    assert done.attempts == 1 and [a.outcome for a in done.history] == ["succeeded"]
    (run,) = sup.runs()[long]
    assert run[1] is not None and run[1] - run[0] >= 1.9
    # Once idle, the old fork server goes away.
    assert_dead(old_server.pid, timeout=10, what="old fork server")
    assert sup.stop() == 0


class _LowFileLimit:
    """`taskvisor run` under RLIMIT_NOFILE 1024:1024 (its soft limit cannot be raised)."""

    def argv(self) -> list[str]:
        import sys
        script = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
                  "(1024, 1024)); sys.argv[0] = 'taskvisor'; "
                  "runpy.run_module('supervisor', run_name='__main__')")
        return [sys.executable, "-c", script, *super().argv()[3:]]


@pytest.mark.timeout(60)
def test_sighup_refuses_a_pool_size_the_descriptors_cannot_serve(supervisor_proc):
    """`run` refuses pool_size = 1000 under 1024 open files; a reload took it."""
    sup = supervisor_proc(start=False, supervisor={"pool_size": 1})
    sup.__class__ = type("LowFileLimitProc", (_LowFileLimit, type(sup)), {})
    sup.start()
    sup.write_config({"supervisor": {"pool_size": 1000}})
    sup.signal(signal.SIGHUP)
    sup.wait_log("reload rejected: keeping the running config")
    assert "reload rejected: pool_size = 1000 needs about 2384 open files" in sup.log()
    assert "config reloaded from" not in sup.log()
    ids = [sup.enqueue("t.log", {"s": 0.3}) for _ in range(2)]
    sup.wait_all(ids, "succeeded", timeout=15)
    assert max_concurrent(sup.runs()) == 1
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_sighup_says_which_changed_settings_wait_for_a_restart(supervisor_proc):
    """A changed [http] listen was taken silently ("config reloaded") and never applied."""
    sup = supervisor_proc(supervisor={"pool_size": 1})
    sup.write_config({"supervisor": {"pool_size": 2, "busy_timeout_s": 9},
                      "http": {"listen": "127.0.0.1:0"}})
    sup.signal(signal.SIGHUP)
    sup.wait_log("config reloaded from")
    log = sup.log()
    assert "reload: [http] listen changed; it applies at the next start" in log
    assert "reload: [supervisor] busy_timeout_s changed" in log
    assert "pool_size changed" not in log and "pool_size=2" in log
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_sighup_names_a_changed_database_and_applies_log_to_the_supervisor(supervisor_proc):
    """A changed [supervisor] database was ignored without a word, and a changed [log]
    reached task processes but left the supervisor's own lines in the old format."""
    sup = supervisor_proc(supervisor={"pool_size": 1})
    sup.write_config({"supervisor": {"database": "moved.db"}, "log": {"format": "json"}})
    sup.signal(signal.SIGHUP)
    sup.wait_log("config reloaded from")
    log = sup.log()
    assert "reload: [supervisor] database changed; it applies at the next start" in log
    reloaded = [ln for ln in log.splitlines() if "config reloaded from" in ln]
    assert json.loads(reloaded[-1])["msg"].startswith("config reloaded from"), reloaded
    # Still on the database it opened: a task enqueued there runs; no new file appears.
    task_id = sup.enqueue("t.log", {"s": 0})
    sup.wait_status(task_id, "succeeded", timeout=15)
    assert not (sup.dir / "moved.db").exists()
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_sighup_under_db_option_ignores_the_files_database(supervisor_proc):
    """--db names the database: the file's [supervisor] database is not used, so a reload
    that changes it has nothing to report."""
    sup = supervisor_proc(start=False, supervisor={"pool_size": 1})
    sup.args += ["--db", str(sup.db_path)]
    sup.start()
    sup.write_config({"supervisor": {"database": "moved.db", "busy_timeout_s": 9}})
    sup.signal(signal.SIGHUP)
    sup.wait_log("config reloaded from")
    log = sup.log()
    assert "reload: [supervisor] busy_timeout_s changed" in log
    assert "database changed" not in log
    assert sup.stop() == 0
