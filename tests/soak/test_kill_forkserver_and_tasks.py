"""kill -9 of fork servers and of task processes under load, on one supervisor.

At random moments the test SIGKILLs either a running task process (chosen from the run
log: begun, not ended, alive) or the current fork server (the supervisor's child running
workers.zygote). The supervisor must record each cut attempt (`crashed` for a killed task,
`interrupted` for the tasks of a dead fork server), restart the fork server with backoff,
retry, and never run a task twice at once. Short: 150 tasks, 3 fork server kills, 10 task
kills; long: more of both over its share of --soak-minutes (fork server kills at least
60 s apart after the first three, so its restart backoff resets).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.soak.harness import read_runs
from tests.support import pid_alive, wait_until

SETTINGS = dict(supervisor={"pool_size": 4, "lease_s": 2},
                defaults={"max_attempts": 100, "backoff_initial_s": 0.05,
                          "backoff_max_s": 0.2})
LOW, HIGH = 0.1, 0.8


def live_task_pids(soak) -> list[int]:
    return [r.pid for r in read_runs(soak.dir) if r.end is None and pid_alive(r.pid)]


def current_fork_server(sup) -> int | None:
    """The pid of the fork server the supervisor last logged as started, if it is alive
    and the supervisor's child. (Matching the command line is not enough: a task process
    re-parented to the supervisor after its fork server died carries the same one.)"""
    started = list(sup.fork_server_lives())
    if not started:
        return None
    pid = started[-1]
    return pid if any(p.pid == pid for p in sup.fork_servers()) else None


@pytest.mark.timeout(1800)
def test_kill9_of_fork_servers_and_task_processes(soak, scale):
    if scale.long:
        budget = scale.share(0.25)
        server_kills = 3 + int(max(0.0, budget - 20) // 60)
        task_kills = max(30, int(budget / 2))
    else:
        server_kills, task_kills = 3, 10
    # Enough work to outlast the plan (the waits for the fork server's backoff included),
    # so that every kill lands under load.
    plan_s = budget + 61 * max(0, server_kills - 3) if scale.long else 20
    n_tasks = int(plan_s * 4 / ((LOW + HIGH) / 2))
    sup = soak.supervisor(**SETTINGS)
    soak.enqueue(sup, n_tasks, LOW, HIGH)
    plan = ["server"] * server_kills + ["task"] * task_kills
    soak.rng.shuffle(plan)
    gap = (budget if scale.long else 16) / len(plan)
    last_server_kill = None
    for kind in plan:
        if not soak.unfinished(sup):
            break
        soak.at_random_moment(2 * gap)
        if kind == "server":
            if last_server_kill is not None and soak.counts["fs kills"] >= 3:
                # after three quick ones, wait out the backoff reset (STABLE_S = 60)
                time.sleep(max(0.0, 61 - (time.monotonic() - last_server_kill)))
            server = wait_until(lambda: current_fork_server(sup), timeout=30,
                                message="no fork server came back after the last kill")
            os.kill(server, signal.SIGKILL)
            last_server_kill = time.monotonic()
            soak.disrupted("fs kills")
        else:
            pids = wait_until(lambda: live_task_pids(soak), timeout=15,
                              message="no task process running to kill")
            os.kill(soak.rng.choice(pids), signal.SIGKILL)
            soak.disrupted("task kills")
    drain_s = soak.wait_drained(sup, timeout=180)
    soak.finish(drain_s, earlier={"crashed", "interrupted", "lost"})
