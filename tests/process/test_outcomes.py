"""Every attempt outcome, each caused by a real handler in a real task process forked by a
real supervisor: succeeded, error, timeout, memory_limit (RLIMIT_DATA and the tree-wide
RSS watchdog), crashed (abort, segfault, sys.exit), the CPU limit, an unknown type, a
too-large result, an async handler, Retry, progress and task logs, and grandchildren that
must die with their task (stopped by a timeout or a cancel, or left behind by a task that
returned)."""

from __future__ import annotations

import json
import time

import pytest

from tests.process.conftest import assert_dead
from tests.support import pid_alive, wait_until

MIB = 1024 * 1024


@pytest.fixture
def sup(supervisor_proc):
    return supervisor_proc(supervisor={"pool_size": 3, "max_result_bytes": 1000},
                           types={"t.spin": {"cpu_s": 1}})


@pytest.mark.timeout(60)
def test_success_records_the_result_and_figures(sup):
    task_id = sup.enqueue("t.ok", {"value": "hello"})
    task = sup.wait_status(task_id, "succeeded")
    assert task.result["echo"] == "hello"
    assert task.outcome == "succeeded" and task.attempts == 1
    (attempt,) = task.history
    assert attempt.outcome == "succeeded"
    assert attempt.exit_code == 0 and attempt.signal is None
    assert attempt.pid == task.result["pid"]
    assert attempt.peak_rss_bytes and attempt.peak_rss_bytes > 1 * MIB
    assert attempt.cpu_s is not None and attempt.wall_s is not None and attempt.wall_s > 0
    assert not pid_alive(attempt.pid)


@pytest.mark.timeout(60)
def test_raise_records_type_message_and_traceback(sup):
    task_id = sup.enqueue("t.raise", {"why": "no such file"}, max_attempts=2)
    task = sup.wait_status(task_id, "failed")
    assert task.attempts == 2 and len(task.history) == 2
    for attempt in task.history:
        assert attempt.outcome == "error"
        assert attempt.error["type"] == "ValueError"
        assert attempt.error["message"] == "bad input: no such file"
        assert "Traceback" in attempt.error["traceback"]
        assert "tvp_handlers.py" in attempt.error["traceback"]
        assert "raise ValueError" in attempt.error["traceback"]
    assert "ValueError: bad input: no such file" in task.error


@pytest.mark.timeout(60)
def test_hang_past_timeout_is_stopped(sup):
    task_id = sup.enqueue("t.sleep", {"s": 1000}, timeout_s=1, max_attempts=1)
    task = sup.wait_status(task_id, "failed", timeout=10)
    (attempt,) = task.history
    assert attempt.outcome == "timeout" and task.outcome == "timeout"
    assert "1s" in attempt.reason
    assert 0.9 < attempt.wall_s < 5
    assert_dead(attempt.pid, what="timed-out task process")


@pytest.mark.timeout(60)
def test_type_timeout_applies_and_term_ignored_gets_kill(sup):
    """A per-task timeout on a handler that ignores TERM ends with KILL after kill_grace_s."""
    task_id = sup.enqueue("t.ignore_term", {"s": 1000}, timeout_s=1, max_attempts=1)
    task = sup.wait_status(task_id, "failed", timeout=10)
    (attempt,) = task.history
    assert attempt.outcome == "timeout"
    assert attempt.signal == "SIGKILL"
    assert 1.4 < attempt.wall_s < 5  # timeout (1 s) + kill grace (0.5 s)
    assert_dead(attempt.pid)


@pytest.mark.timeout(60)
def test_memory_limit_by_rlimit_data(sup):
    """One process allocating past memory_mb: RLIMIT_DATA refuses the allocation."""
    task_id = sup.enqueue("t.hog", {"mb": 1000}, memory_mb=150, max_attempts=1)
    task = sup.wait_status(task_id, "failed", timeout=20)
    (attempt,) = task.history
    assert attempt.outcome == "memory_limit", (attempt.reason, attempt.error)
    assert attempt.error and attempt.error["type"] == "MemoryError"
    assert "RLIMIT_DATA" in attempt.reason or "RLIMIT_DATA" in attempt.error["message"]
    # it got close to the limit before the refusal (order of magnitude)
    assert 60 * MIB < attempt.peak_rss_bytes < 400 * MIB, attempt.peak_rss_bytes
    assert_dead(attempt.pid)


@pytest.mark.timeout(60)
def test_memory_limit_by_tree_rss_watchdog(sup):
    """Three grandchildren of 70 MiB each: each fits the 150 MiB per-process RLIMIT_DATA,
    the tree (210+ MiB) does not, so the watchdog must kill the whole tree."""
    task_id = sup.enqueue("t.hog_tree", {"n": 3, "mb": 70}, memory_mb=150, max_attempts=1)
    task = sup.wait_status(task_id, "failed", timeout=20)
    (attempt,) = task.history
    assert attempt.outcome == "memory_limit", (attempt.reason, attempt.error)
    assert "process tree RSS" in attempt.reason and "150 MiB" in attempt.reason
    assert attempt.peak_rss_bytes >= 150 * MIB, attempt.peak_rss_bytes
    assert attempt.peak_rss_bytes < 2000 * MIB
    assert_dead(attempt.pid)
    grandchildren = [p for p in sup.recorded_pids() if p != attempt.pid]
    assert len(grandchildren) == 3
    for pid in grandchildren:
        assert_dead(pid, what="memory-hogging grandchild")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind, sig", [("t.abort", "SIGABRT"), ("t.segv", "SIGSEGV")])
def test_native_crash_is_crashed_with_signal_name(sup, kind, sig):
    task_id = sup.enqueue(kind, max_attempts=1)
    task = sup.wait_status(task_id, "failed")
    (attempt,) = task.history
    assert attempt.outcome == "crashed"
    assert attempt.signal == sig
    assert sig in attempt.reason
    assert attempt.exit_code is None


@pytest.mark.timeout(60)
def test_sys_exit_is_crashed_with_exit_code(sup):
    task_id = sup.enqueue("t.exit", {"code": 3}, max_attempts=1)
    task = sup.wait_status(task_id, "failed")
    (attempt,) = task.history
    assert attempt.outcome == "crashed"
    assert attempt.exit_code == 3 and attempt.signal is None
    assert "code 3" in attempt.reason


@pytest.mark.timeout(60)
def test_unknown_type_fails_at_once_without_retry(sup):
    task_id = sup.enqueue("t.nobody_handles_this", max_attempts=5)
    task = sup.wait_status(task_id, "failed")
    assert task.attempts == 1 and len(task.history) == 1
    assert task.history[0].outcome == "error"
    assert task.history[0].error["type"] == "UnknownTaskType"
    assert "t.nobody_handles_this" in task.error


@pytest.mark.timeout(60)
def test_too_large_result_is_an_error_naming_the_limit(sup):
    task_id = sup.enqueue("t.big", {"n": 5000}, max_attempts=3)
    task = sup.wait_status(task_id, "failed")
    assert task.attempts == 1  # not retryable: the same code gives the same result
    (attempt,) = task.history
    assert attempt.outcome == "error"
    assert attempt.error["type"] == "ResultTooLarge"
    assert "1000-byte limit" in attempt.error["message"]
    assert "max_result_bytes" in attempt.error["message"]
    assert task.result is None


@pytest.mark.timeout(60)
def test_result_at_the_limit_succeeds(sup):
    task_id = sup.enqueue("t.big", {"n": 998})  # 998 chars + 2 quotes = 1000 bytes
    task = sup.wait_status(task_id, "succeeded")
    assert task.result == "x" * 998


@pytest.mark.timeout(60)
def test_async_handler_succeeds(sup):
    task_id = sup.enqueue("t.async", {"value": 7})
    task = sup.wait_status(task_id, "succeeded")
    assert task.result == {"async": True, "value": 7}


@pytest.mark.timeout(60)
def test_retry_reschedules_without_spending_an_attempt(sup):
    task_id = sup.enqueue("t.retry", {"delay_s": 0.7}, max_attempts=1)
    task = sup.wait_status(task_id, "succeeded", timeout=15)
    assert task.attempts == 1  # max_attempts = 1 and it still ran twice
    assert [a.outcome for a in task.history] == ["rescheduled", "succeeded"]
    assert "busy, come back later" in task.history[0].reason
    runs = sup.runs()[task_id]
    assert len(runs) == 2
    (_, first_end, _, _), (second_start, _, _, _) = runs
    assert second_start - first_end >= 0.65  # the delay was honoured
    assert task.result == {"attempt": 1}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("setsid", [False, True], ids=["same-group", "setsid"])
@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_grandchild_dies_with_its_task(sup, setsid, how):
    kw = {"timeout_s": 1} if how == "timeout" else {}
    task_id = sup.enqueue("t.grandchild", {"setsid": setsid}, max_attempts=1, **kw)
    gpid = int(wait_until(lambda: (sup.dir / "grandchild").exists()
                          and (sup.dir / "grandchild").read_text().strip(), timeout=10))
    assert pid_alive(gpid)
    if how == "cancel":
        sup.queue.cancel(task_id)
    task = sup.wait_status(task_id, "failed", "cancelled", timeout=10)
    assert task.history[-1].outcome == ("timeout" if how == "timeout" else "cancelled")
    assert_dead(task.history[-1].pid, what="task process")
    assert_dead(gpid, timeout=3, what=f"grandchild ({'setsid' if setsid else 'same group'})")


@pytest.mark.timeout(60)
def test_outcomes_are_json_in_the_public_shape(sup):
    """The attempt history serialises (CLI/HTTP use to_dict) with figures present."""
    task_id = sup.enqueue("t.exit", {"code": 3}, max_attempts=1)
    task = sup.wait_status(task_id, "failed")
    shape = json.loads(json.dumps(task.to_dict()))
    (attempt,) = shape["history"]
    assert attempt["exit_code"] == 3 and attempt["outcome"] == "crashed"
    assert attempt["wall_s"] is not None and attempt["peak_rss_bytes"]
    assert time.time() - task.completed_at < 60


@pytest.mark.timeout(60)
def test_cpu_limit_ends_the_attempt(sup):
    """[types."t.spin"] cpu_s = 1: RLIMIT_CPU's SIGXCPU ends a busy loop long before its
    60 s wall-clock timeout."""
    task_id = sup.enqueue("t.spin", {"s": 30}, max_attempts=1)
    task = sup.wait_status(task_id, "failed", timeout=15)
    (attempt,) = task.history
    assert attempt.outcome == "timeout"
    assert "CPU time limit" in attempt.reason
    assert attempt.signal in ("SIGXCPU", "SIGKILL")
    assert 0.5 <= attempt.cpu_s < 5  # rusage and RLIMIT_CPU count ticks differently
    assert attempt.wall_s < 10


@pytest.mark.timeout(60)
def test_progress_and_task_logs_reach_the_supervisor(sup):
    task_id = sup.enqueue("t.progress")
    wait_until(lambda: sup.get(task_id).progress == 0.5, timeout=10)
    assert sup.get(task_id).progress_message == "half way"
    line = sup.wait_task_log(task_id, "hello from the handler of")  # the task's own log
    assert f"task={task_id}" in line
    assert "hello from the handler of" not in sup.log()  # not the supervisor's (issue 14)
    (sup.dir / "release").touch()
    assert sup.wait_status(task_id, "succeeded").result == "released"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("setsid", [False, True], ids=["same-group", "setsid"])
def test_grandchild_left_behind_by_a_finished_task_is_killed(sup, setsid):
    """A task that returns while a subprocess it started still runs: the subprocess must
    not outlive its task (nothing else would ever stop it)."""
    task_id = sup.enqueue("t.daemon", {"setsid": setsid})
    task = sup.wait_status(task_id, "succeeded")
    gpid = task.result["left"]
    assert_dead(gpid, timeout=3, what=f"grandchild left by a finished task ({'setsid' if setsid else 'same group'})")
