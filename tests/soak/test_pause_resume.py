"""Pause/resume with two supervisors on one file: supervisor A is stopped (SIGSTOP) again
and again for longer than its lease while B keeps working, then resumed (SIGCONT).

`lease_s = 2`, tasks of 1.5-3 s, each pause 5 s. Most pauses are aimed at the claim-to-pid
window: A stops itself at its "claimed" event (tests/soak/pausing.py), when the claim is
committed and the task handed to its fork server but the task's pid is not yet recorded,
so B cannot kill A's process when it rescues the expired lease. The others land at random
moments. At least 10 aimed pauses (short run); the long run keeps pausing for its share
of --soak-minutes. The promise under test: never two executions of one task at once.

An aimed stop catches both halves of the window: the task whose "claimed" event stopped A
is already with its fork server and runs on while A is stopped, and a task A claimed in
the same transaction is not yet handed over, so A would start it only after SIGCONT, when
B may already run its next attempt. Before execution fencing, about half of the pauses
ended in an overlap (5-7 of 13 in the short run).
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.support import wait_until

LEASE = {"pool_size": 2, "lease_s": 2}
PAUSE_S = 5.0
LOW, HIGH = 1.5, 3.0


@pytest.mark.timeout(1800)
def test_paused_supervisor_never_lets_a_task_run_twice_at_once(soak, scale):
    aimed_goal = max(10, int(scale.share(0.4) / 8)) if scale.long else 10
    random_goal = max(4, aimed_goal // 3) if scale.long else 3
    a = soak.supervisor(name="a", supervisor=LEASE, defaults={"max_attempts": 50})
    b = soak.supervisor(name="b", supervisor=LEASE, defaults={"max_attempts": 50})
    plan = ["aimed"] * aimed_goal + ["random"] * random_goal
    soak.rng.shuffle(plan)
    for kind in plan:
        t = soak.totals(a)
        if t["queued"] < 6:  # keep both supervisors busy, and a claim always at hand
            soak.enqueue(a, 8, LOW, HIGH, max_attempts=50)
        if kind == "aimed":
            a.arm_path.touch()
            wait_until(a.stopped, timeout=30, interval=0.005,
                       message="A never stopped at a claim: no 'claimed' event reached "
                               "tests/soak/pausing.py")
            soak.counts["aimed"] += 1
        else:
            soak.at_random_moment(2.0)
            a.signal(signal.SIGSTOP)
            wait_until(a.stopped, timeout=5, interval=0.005)
        soak.disrupted("pauses")
        stopped_at = time.monotonic()
        time.sleep(PAUSE_S)  # the pause itself: longer than the lease, by design
        assert time.monotonic() - stopped_at >= PAUSE_S
        a.signal(signal.SIGCONT)
        soak.last_disruption = time.monotonic()
        wait_until(lambda: not a.stopped(), timeout=5)
    drain_s = soak.wait_drained(a, timeout=120)
    aimed = len((soak.dir / "a.arm.log").read_text().splitlines())
    assert aimed == soak.counts["aimed"] >= 10, f"{aimed} aimed pauses, not {soak.counts['aimed']}"
    soak.finish(drain_s, earlier={"lost", "crashed", "interrupted"},
                extra={"notes": f"A stopped {PAUSE_S:g}s each time, lease_s 2, tasks {LOW}-{HIGH}s"})
