"""Many tasks in flight at once: no deadlock between the supervisor and its fork server.

With hundreds of spawns asked for in one pass, both sides used to block for good, each
sending to the other with full socket buffers (measured: the hang began near 280 spawns).
Sends from the supervisor never block now (an outbox, flushed when the socket can take
more): a burst far past that point drains, and a TERM still stops the supervisor.
"""

from __future__ import annotations

import signal

import pytest

from tests.support import pid_alive, wait_until


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


@pytest.mark.timeout(120)
def test_the_fence_holds_while_a_stopped_supervisor_reads_nothing(supervisor_proc):
    """Stopped, the supervisor reads none of the fork server's messages: 300 task exits
    fill that socket. The fork server must not block on it: it still kills the long task
    at the fence."""
    sup = supervisor_proc(start=False, supervisor={"pool_size": 301, "lease_s": 4,
                                                   "preload": ["tvp_handlers", "tvp_hostile"]},
                          defaults={"max_attempts": 3})
    short = sup.queue.enqueue_many([{"type": "t.sleep", "payload": {"s": 1.0}} for _ in range(300)])
    long_id = sup.enqueue("h.fenced", {"s": 30}, priority=10)
    sup.start()
    wait_until(lambda: sup.runs().get(long_id), timeout=30, message="the long task did not start")
    wait_until(lambda: sup.store.stats(0).counts.get("running", {}).get("t.sleep", 0) >= 250,
               timeout=30, interval=0.1)
    long_pid = sup.runs()[long_id][0][2]
    sup.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: not pid_alive(long_pid), timeout=8,
                   message="the fork server did not fence the long task of a stopped supervisor")
    finally:
        sup.signal(signal.SIGCONT)
    first = wait_until(lambda: next((a for a in sup.get(long_id).history if a.outcome), None),
                       timeout=15, message="the fenced attempt was not recorded")
    assert first.outcome == "lost" and "fenced" in first.reason, first.reason
    sup.wait_all(short, "succeeded", timeout=60)
    assert sup.stop(timeout=60) in (0,)
