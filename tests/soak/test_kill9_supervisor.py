"""kill -9 of the supervisor at random moments under load, restarting it each time.

Short: 300 tasks, 8 kills. Long (--soak-minutes N): 50 kills and 2,000 tasks at N = 10,
more kills for a longer budget (40 tasks a kill). Every kill lands at a random moment of
a busy queue (claims, forks, completions and their commits all in flight); the restarted
supervisor rescues what the dead one held, and at the end every task has succeeded once,
with earlier attempts ended `lost` and no two executions of a task alive together.
"""

from __future__ import annotations

import pytest

SETTINGS = dict(supervisor={"pool_size": 4, "lease_s": 2},
                defaults={"max_attempts": 100, "backoff_initial_s": 0.05,
                          "backoff_max_s": 0.2})


@pytest.mark.timeout(1800)
def test_kill9_of_the_supervisor_at_random_moments(soak, scale):
    kills = max(50, int(scale.minutes * 5)) if scale.long else 8
    n_tasks = 40 * kills if scale.long else 300
    low, high = 0.05, 0.4
    sup = soak.supervisor(**SETTINGS)
    soak.enqueue(sup, n_tasks, low, high)
    # Spread the kills over about 70% of the time the queue takes at full speed.
    busy_s = n_tasks * (low + high) / 2 / SETTINGS["supervisor"]["pool_size"]
    gap = 0.7 * busy_s / kills
    for _ in range(kills):
        if not soak.unfinished(sup):
            break
        soak.at_random_moment(2 * gap)
        sup.kill9()
        soak.disrupted("sup kills")
        sup.restart()
    drain_s = soak.wait_drained(sup, timeout=max(120.0, busy_s * 2))
    soak.finish(drain_s, earlier={"lost"})
