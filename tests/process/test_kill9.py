"""`kill -9` of the supervisor while tasks run, at several moments: after a restart on the
same database every task succeeds, none is lost, and no two executions of one task ever
overlap in time. Handlers log "start"/"end" lines with fsync (tvp_handlers.mark_start),
and each start first checks that no earlier unfinished run of its task is still alive."""

from __future__ import annotations

import pytest

from tests.process.conftest import assert_dead
from tests.support import pid_alive, wait_until

N_TASKS = 10


def check_no_overlap(sup, ids) -> None:
    """No run of a task starts while an earlier one is alive.

    Within one supervisor life, runs of a task are sequential ([start, end] intervals do
    not overlap). A run cut by a kill has no end: the next run must come from a later
    life, and its handler found the cut run's process dead when it started (no
    "overlap" line: tvp_handlers.mark_start checks the pid)."""
    overlaps = [e for e in sup.events() if e[0] == "overlap"]
    assert not overlaps, f"a task ran while an earlier run of it was alive: {overlaps}"
    runs = sup.runs()
    killed_lives = set(range(1, len(sup.lives)))
    for task_id in ids:
        assert task_id in runs, f"{task_id} never ran"
        mine = runs[task_id]
        assert all(life is not None for *_, life in mine), mine
        assert mine[-1][1] is not None, f"the last run of {task_id} did not end: {mine}"
        for (s1, e1, pid1, life1), (s2, _, _, life2) in zip(mine, mine[1:]):
            assert s2 > s1
            if e1 is None:
                assert life1 in killed_lives, f"run {pid1} of {task_id} never ended: {mine}"
                assert life2 > life1, f"{task_id} ran again in the life that lost it: {mine}"
            else:
                assert s2 > e1, f"runs of {task_id} overlap: {mine}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("moment", ["after_enqueue", "mid_run", "while_finishing", "twice"])
def test_kill9_loses_nothing_and_never_overlaps(supervisor_proc, moment):
    sup = supervisor_proc(supervisor={"pool_size": 3},
                          defaults={"max_attempts": 10, "backoff_initial_s": 0.05,
                                    "backoff_max_s": 0.2})
    durations = [0.2 + 0.1 * (i % 5) for i in range(N_TASKS)]
    ids = [sup.enqueue("t.log", {"s": s}) for s in durations]

    def started() -> int:
        return sum(1 for e in sup.events() if e[0] == "start")

    def ended() -> int:
        return sum(1 for e in sup.events() if e[0] == "end")

    if moment == "after_enqueue":
        sup.kill9()
    elif moment == "mid_run":
        wait_until(lambda: started() >= 2, timeout=15)
        sup.kill9()
    elif moment == "while_finishing":
        wait_until(lambda: ended() >= N_TASKS // 2, timeout=30)
        sup.kill9()
    else:  # twice: mid-run, restart, mid-run again
        wait_until(lambda: started() >= 2, timeout=15)
        sup.kill9()
        before = started()
        sup.restart()
        wait_until(lambda: started() >= before + 2, timeout=15)
        sup.kill9()

    sup.restart()
    orphans = [pid for runs in sup.runs().values() for _, end, pid, life in runs
               if end is None and life < len(sup.lives)]
    tasks = sup.wait_all(ids, "succeeded", timeout=60)
    for pid in orphans:
        assert not pid_alive(pid), f"task process {pid} of the killed supervisor is alive"
    check_no_overlap(sup, ids)
    # Every interrupted attempt is accounted for as lost, none silently dropped.
    for task in tasks:
        outcomes = [a.outcome for a in task.history]
        assert outcomes[-1] == "succeeded"
        assert set(outcomes[:-1]) <= {"lost"}, outcomes
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_killed_attempt_is_recorded_lost_and_run_again(supervisor_proc):
    """The attempt cut by the kill ends `lost` (its supervisor is gone), its process is
    dead by the time the restarted supervisor is ready, and the task runs once more."""
    sup = supervisor_proc(supervisor={"pool_size": 1},
                          defaults={"max_attempts": 5, "backoff_initial_s": 0.05})
    task_id = sup.enqueue("t.log", {"s": 1.5})
    wait_until(lambda: any(e[0] == "start" for e in sup.events()), timeout=10)
    first_pid = next(e[3] for e in sup.events() if e[0] == "start")
    sup.kill9()
    sup.restart()
    assert not pid_alive(first_pid)
    task = sup.wait_status(task_id, "succeeded", timeout=20)
    assert [a.outcome for a in task.history] == ["lost", "succeeded"]
    assert "supervisor is gone" in task.history[0].reason
    check_no_overlap(sup, [task_id])


@pytest.mark.timeout(60)
def test_task_processes_die_with_the_supervisor(supervisor_proc):
    """No restart: the parent-death signals alone take the fork server and every task
    process down with a SIGKILLed supervisor."""
    sup = supervisor_proc(supervisor={"pool_size": 3})
    ids = [sup.enqueue("t.sleep", {"s": 1000}) for _ in range(3)]
    pids = wait_until(lambda: all(sup.get(i).pid for i in ids) and [sup.get(i).pid for i in ids],
                      timeout=10)
    (server,) = sup.fork_servers()
    sup.kill9()
    for pid in [server.pid, *pids]:
        assert_dead(pid, timeout=5, what="process of the SIGKILLed supervisor")
