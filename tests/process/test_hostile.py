"""A task can harm only itself: adversarial handlers against a real supervisor.

A task that lies on its report channel ends its own attempt as `crashed` with a reason
that names the protocol, and the supervisor runs the next task; a handler that forks and
leaves children behind cannot hold the attempt open or break the supervisor; helpers that
daemonize themselves still count against the task's memory limit; and a supervisor
stopped between a claim and the task's start (SIGSTOP past its lease, while a second
supervisor shares the file) never lets the task run twice at once: its fork server fences
it.
"""

from __future__ import annotations

import contextlib
import signal
import time

import psutil
import pytest

from tests.process.conftest import assert_dead
from tests.support import pid_alive, wait_until

HOSTILE = {"preload": ["tvp_handlers", "tvp_hostile"]}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("what", ["bad_outcome", "garbage", "unknown_kind", "wrong_type",
                                  "array", "no_newline_flood", "second_outcome"])
def test_a_task_that_lies_on_its_report_channel_ends_only_its_own_attempt(supervisor_proc, what):
    sup = supervisor_proc(supervisor={"pool_size": 2, **HOSTILE})
    liar = sup.enqueue("h.lie", {"what": what}, max_attempts=1)
    task = sup.wait_status(liar, "failed", timeout=20)
    (attempt,) = task.history
    assert attempt.outcome == "crashed"
    assert "broke the report protocol" in attempt.reason
    assert attempt.wall_s < 4, "the liar should be stopped at once, not after its sleep"
    assert_dead(attempt.pid, what="the lying task process")
    assert sup.proc.poll() is None, "the supervisor died of a task's lie"
    assert sup.wait_status(sup.enqueue("t.ok"), "succeeded").result["attempt"] == 1
    assert sup.stop() == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("libc", [False, True], ids=["os.fork", "libc-fork"])
def test_a_handler_that_forks_and_leaves_a_child_cannot_hurt_the_supervisor(supervisor_proc, libc):
    """Six such tasks in a row (the reported failure left 0 succeeded, 4 running): each
    ends succeeded when its handler returns, the children it left are killed, and the
    child of os.fork could not report on the task's channel."""
    sup = supervisor_proc(supervisor={"pool_size": 2, **HOSTILE})
    ids = [sup.enqueue("h.fork_leave", {"libc": libc, "child_s": 5}) for _ in range(6)]
    tasks = sup.wait_all(ids, "succeeded", timeout=30)
    for task in tasks:
        assert task.history[-1].wall_s < 3, "the attempt waited for the forked child"
        assert_dead(task.result["child"], what="child left behind by a handler")
    assert sup.proc.poll() is None
    assert "FORKED CHILD COULD REPORT" not in sup.log()
    assert sup.wait_status(sup.enqueue("t.ok"), "succeeded")
    assert sup.stop() == 0


@pytest.mark.timeout(90)
def test_a_task_that_reports_its_outcome_and_stays_is_killed_and_cannot_multiply(supervisor_proc):
    """A process that has reported its outcome holds no slot while it exits (the next task
    starts meanwhile). One that reports and then stays (TERM ignored) is killed
    EXIT_AFTER_FINAL_S later, its outcome standing, and at most pool_size of them count
    as free: six such tasks at pool 2 never run more than four processes at once."""
    from supervisor.children import EXIT_AFTER_FINAL_S
    sup = supervisor_proc(supervisor={"pool_size": 2, **HOSTILE})
    ids = [sup.enqueue("h.done_early", {"s": 60}, max_attempts=1) for _ in range(6)]
    most = 0

    def all_done() -> bool:
        nonlocal most
        procs = 0
        for server in sup.fork_servers():
            for proc in server.children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    procs += proc.name() != "taskvisor-spare"
        most = max(most, procs)
        return all(sup.get(i).status == "succeeded" for i in ids)

    wait_until(all_done, timeout=60, interval=0.02)
    assert 3 <= most <= 4, f"{most} task processes at once at pool_size 2"
    for task_id in ids:
        task = sup.get(task_id)
        (attempt,) = task.history
        assert task.result == "early" and attempt.signal == "SIGKILL", attempt
        assert EXIT_AFTER_FINAL_S - 0.5 < attempt.wall_s < EXIT_AFTER_FINAL_S + 5, attempt
        assert_dead(attempt.pid, what="a task process that reported and stayed")
    assert sup.log().count("reported its outcome 5s ago and has not exited") == 6
    assert sup.wait_status(sup.enqueue("t.ok"), "succeeded")
    assert sup.stop() == 0


@pytest.mark.timeout(90)
def test_daemonized_helpers_count_against_the_memory_limit(supervisor_proc):
    """Helpers that setsid() and double-fork are re-parented to the task process (a child
    subreaper), so its tree, and the watchdog, still hold them."""
    sup = supervisor_proc(supervisor={"pool_size": 1, **HOSTILE},
                          defaults={"memory_mb": 200})
    task_id = sup.enqueue("h.daemon_hog", {"mb": 150, "helpers": 2, "s": 20}, max_attempts=1)
    task = sup.wait_status(task_id, "failed", timeout=40)
    (attempt,) = task.history
    assert attempt.outcome == "memory_limit", attempt.reason
    assert attempt.peak_rss_bytes > 200 * 1024 * 1024
    helpers = [int(p) for p in (sup.dir / "pids").read_text().split()]
    for pid in helpers:
        assert_dead(pid, what="daemonized helper of a task over its memory limit")
    assert sup.stop() == 0


@pytest.mark.timeout(120)
def test_a_supervisor_paused_between_claim_and_start_never_runs_a_task_twice(supervisor_proc):
    """The fork is made slow (1 s) so the pause lands after the claim commit and before
    the task's pid is known. A stays stopped past its lease (2 s) while B rescues and runs
    the task; A's fork server kills the attempt at the fence, and nothing overlaps."""
    settings = dict(supervisor={"pool_size": 1, "lease_s": 2, **HOSTILE},
                    defaults={"max_attempts": 5})
    a = supervisor_proc(name="a", **settings)
    (a.dir / "slow_fork").touch()
    # The spare task process the fork server keeps ready would start the task without a
    # fork: kill it, so this task's fork is a slow one.
    spares = wait_until(lambda: [p for s in a.fork_servers() for p in s.children()
                                 if p.name() == "taskvisor-spare"], timeout=10)
    for spare in spares:
        spare.kill()
        assert_dead(spare.pid, what="the spare")
    task_id = a.enqueue("h.fenced", {"s": 4})
    wait_until(lambda: a.get(task_id).status == "running", timeout=10, interval=0.005)
    a.signal(signal.SIGSTOP)
    paused_at = time.monotonic()
    try:
        claimed = a.get(task_id)
        assert claimed.pid is None, "the pause missed the claim-to-start window"
        assert f":{a.pid}:" in claimed.lease_owner
        b = supervisor_proc(name="b", **settings)
        task = b.wait_status(task_id, "succeeded", timeout=30)
        wait_until(lambda: time.monotonic() - paused_at > 6, timeout=10, interval=0.05)
    finally:
        a.signal(signal.SIGCONT)
    first, second = task.history
    assert first.outcome == "lost" and second.outcome == "succeeded"
    assert f":{b.pid}:" in second.owner
    overlaps = [e for e in a.events() if e[0] == "overlap"]
    assert not overlaps, f"the task ran twice at once: {overlaps}"
    for start, end, pid, _ in a.runs()[task_id]:
        if end is None:
            assert not pid_alive(pid), "an attempt of the paused supervisor still runs"
    wait_until(lambda: a.get(task_id).status == "succeeded", timeout=5)  # A wrote nothing over it
    assert a.proc.poll() is None
    assert a.stop() == 0 and b.stop() == 0


@pytest.mark.timeout(90)
def test_a_setsid_helper_does_not_survive_the_restart_after_a_kill_9(supervisor_proc):
    """kill -9 of the supervisor: its fork server and task processes die with it, but a
    helper in its own session is re-parented to init. The next supervisor rescuing the
    dead one's tasks finds it by the owner marker in its environment and kills it."""
    sup = supervisor_proc(supervisor={"pool_size": 1, **HOSTILE})
    task_id = sup.enqueue("h.daemon_wait", {"s": 60}, max_attempts=3)
    helper = int(wait_until(lambda: (sup.dir / "helper").exists() and (sup.dir / "helper").read_text(),
                            timeout=10))
    sup.kill9()
    assert pid_alive(helper), "the helper should outlive the kill -9 until the restart"
    sup.restart()
    assert_dead(helper, timeout=10, what="setsid helper left by a kill -9'd supervisor")
    wait_until(lambda: sup.get(task_id).history and sup.get(task_id).history[0].outcome == "lost",
               timeout=15)
    assert sup.stop() == 0


@pytest.mark.timeout(90)
def test_the_fence_also_kills_what_the_task_runs_in_a_session_of_its_own(supervisor_proc):
    """A stopped supervisor's fork server kills a task's whole tree at the fence, helpers
    in another session included (a `shell` command, say), while the supervisor is still
    stopped: nothing of the attempt runs on into the rescuer's."""
    sup = supervisor_proc(supervisor={"pool_size": 1, "lease_s": 2, **HOSTILE})
    task_id = sup.enqueue("h.daemon_wait", {"s": 60}, max_attempts=3)
    helper = int(wait_until(lambda: (sup.dir / "helper").exists() and (sup.dir / "helper").read_text(),
                            timeout=10))
    task_pid = sup.get(task_id).pid or wait_until(lambda: sup.get(task_id).pid, timeout=5)
    sup.signal(signal.SIGSTOP)
    try:
        assert_dead(helper, timeout=5, what="the task's setsid helper, at the fence")
        assert_dead(task_pid, timeout=1, what="the task process, at the fence")
    finally:
        sup.signal(signal.SIGCONT)
    first = wait_until(lambda: next((a for a in sup.get(task_id).history if a.outcome), None),
                       timeout=15)
    assert first.outcome == "lost" and "fenced" in first.reason
    assert sup.stop() == 0
