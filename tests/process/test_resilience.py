"""Failures around the task, on a real supervisor: a task process SIGKILLed from outside,
the database locked while a task ends (the loop keeps reaping, the outcome waits in
memory), several supervisors on one database file, and a supervisor that stops renewing
its leases (SIGSTOP) while another one rescues its task, without overlap."""

from __future__ import annotations

import os
import signal

import apsw
import pytest

from tests.process.conftest import assert_dead
from tests.support import pid_alive, wait_until


@pytest.mark.timeout(60)
def test_task_process_killed_from_outside_is_crashed_and_retried(supervisor_proc):
    sup = supervisor_proc(supervisor={"pool_size": 1})
    task_id = sup.enqueue("t.slow_first", max_attempts=3)
    wait_until(lambda: sup.runs().get(task_id), timeout=10)
    pid = sup.runs()[task_id][0][2]
    os.kill(pid, signal.SIGKILL)
    task = sup.wait_status(task_id, "succeeded", timeout=15)
    assert task.attempts == 2  # the killed attempt was spent
    first, second = task.history
    assert first.outcome == "crashed" and first.signal == "SIGKILL"
    assert "OOM" in first.reason  # SIGKILL not sent by taskvisor: hint at the OOM killer
    assert second.outcome == "succeeded"
    assert task.result == {"attempt": 2}


@pytest.mark.timeout(60)
def test_database_locked_while_a_task_ends(supervisor_proc):
    """The loop keeps reaping while every write fails, and records the outcome once
    SQLite answers again."""
    sup = supervisor_proc(supervisor={"pool_size": 1, "busy_timeout_s": 0.05, "lease_s": 10})
    task_id = sup.enqueue("t.log", {"s": 0.3})
    wait_until(lambda: sup.runs().get(task_id), timeout=10)
    pid = sup.runs()[task_id][0][2]
    locker = apsw.Connection(str(sup.db_path))
    locker.execute("PRAGMA busy_timeout = 5000")
    locker.execute("BEGIN EXCLUSIVE")
    try:
        wait_until(lambda: sup.runs()[task_id][0][1] is not None, timeout=10)
        assert_dead(pid, what="task process (reaped while the database is locked)")
        sup.wait_log("keeping 1 outcome(s) in memory", timeout=10)
        assert sup.proc.poll() is None
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    task = sup.wait_status(task_id, "succeeded", timeout=10)
    assert task.attempts == 1 and [a.outcome for a in task.history] == ["succeeded"]
    # and it claims again afterwards
    sup.wait_status(sup.enqueue("t.ok"), "succeeded", timeout=10)
    assert sup.stop() == 0


@pytest.mark.timeout(90)
def test_two_supervisors_on_one_database_run_each_task_once(supervisor_proc):
    a = supervisor_proc(name="a", supervisor={"pool_size": 2})
    b = supervisor_proc(name="b", supervisor={"pool_size": 2})
    ids = [a.enqueue("t.log", {"s": 0.2}) for _ in range(12)]
    tasks = a.wait_all(ids, "succeeded", timeout=40)
    assert all(t.attempts == 1 and len(t.history) == 1 for t in tasks)
    owners = {t.history[0].owner for t in tasks}
    assert len(owners) == 2, "both supervisors should have claimed"
    starts = [e for e in a.events() if e[0] == "start"]
    assert sorted(e[1] for e in starts) == sorted(ids)  # exactly one run each
    assert a.stop() == 0 and b.stop() == 0


@pytest.mark.timeout(90)
def test_stalled_supervisor_loses_its_lease_without_overlap(supervisor_proc):
    """A is frozen (SIGSTOP) mid-task: A's fork server kills the task process at the fence
    (before the lease expires), B rescues the expired lease after the margin and runs the
    task; when A resumes, it records nothing."""
    a = supervisor_proc(name="a", supervisor={"pool_size": 1, "lease_s": 2},
                        defaults={"max_attempts": 5})
    task_id = a.enqueue("t.log", {"s": 6})
    wait_until(lambda: a.runs().get(task_id), timeout=10)
    first_pid = a.runs()[task_id][0][2]
    a.signal(signal.SIGSTOP)
    try:
        b = supervisor_proc(name="b", supervisor={"pool_size": 1, "lease_s": 2},
                            defaults={"max_attempts": 5})
        wait_until(lambda: not pid_alive(first_pid), timeout=5,
                   message="A's fork server did not fence the task of a stopped supervisor")
        wait_until(lambda: len(a.runs()[task_id]) == 2, timeout=15)
    finally:
        a.signal(signal.SIGCONT)
    task = b.wait_status(task_id, "succeeded", timeout=20)
    first, second = task.history
    assert first.outcome == "lost" and "lease expired" in first.reason
    assert second.outcome == "succeeded" and second.owner != first.owner
    overlaps = [e for e in a.events() if e[0] == "overlap"]
    assert not overlaps
    (s1, e1, _, _), (s2, e2, _, _) = a.runs()[task_id]
    assert e1 is None and e2 is not None and s2 > s1
    assert a.proc.poll() is None  # A survived its stall
    assert a.stop() == 0 and b.stop() == 0
