"""Many tasks in flight at once: no deadlock between the supervisor and its fork server.

With hundreds of spawns asked for in one pass, both sides used to block for good, each
sending to the other with full socket buffers (measured: the hang began near 280 spawns).
Sends from the supervisor never block now (an outbox, flushed when the socket can take
more): a burst far past that point drains, and a TERM still stops the supervisor.
"""

from __future__ import annotations

import signal

import pytest

from tests.support import wait_until


@pytest.mark.timeout(240)
def test_a_burst_of_600_claims_at_once_goes_through(supervisor_proc):
    sup = supervisor_proc(start=False, supervisor={"pool_size": 600, "lease_s": 30},
                          defaults={"timeout_s": 120})
    ids = sup.queue.enqueue_many([{"type": "t.sleep", "payload": {"s": 1.0}}
                                    for _ in range(1200)])
    sup.start()
    # The first wave runs 600 at once: the supervisor must claim and start all of them.
    wait_until(lambda: sup.store.stats(0).counts.get("running", {}).get("t.sleep", 0) >= 400,
               timeout=60, interval=0.2, message="the burst did not start")
    tasks = sup.wait_all(ids, "succeeded", timeout=150)
    assert all(t.attempts == 1 for t in tasks)
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(timeout=30) == 0
