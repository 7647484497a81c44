"""max_reschedules: a reschedule (the handler raised Retry) spends no attempt, so only
this count ends a task that reschedules itself for ever. Past the limit the task fails
for good with a reason saying so; a manual retry starts the count again."""

from __future__ import annotations

from supervisor import policy
from supervisor.store import AttemptEnd, Outcome, Status
from tests.store.factory import LEASE_S, T0, new

BACKOFF = policy.Backoff(0.0, 0.0)


def retry_end() -> AttemptEnd:
    return AttemptEnd(Outcome.RESCHEDULED, reason="rescheduled: busy", delay_s=0.0)


def reschedule(store, now: float, limit: int | None) -> Status | None:
    task = store.claim("sup", now, lease_s=LEASE_S)
    assert task is not None
    return store.fail(task.lease, retry_end(), now, BACKOFF, max_reschedules=limit)


def test_retry_past_max_reschedules_fails_for_good_with_a_reason(store):
    task_id = store.enqueue(new(max_attempts=1), T0)
    for n in range(3):
        assert reschedule(store, T0 + n, limit=3) is Status.QUEUED
    assert store.get(task_id).attempts == 0  # no attempt spent
    assert reschedule(store, T0 + 3, limit=3) is Status.FAILED
    task = store.get(task_id)
    assert task.status is Status.FAILED and task.outcome == "rescheduled"
    assert "raised Retry 4 times, more than max_reschedules (3)" in task.error
    assert [a.outcome for a in task.history] == ["rescheduled"] * 4
    assert "max_reschedules" in task.history[-1].reason


def test_zero_means_the_first_retry_fails(store):
    task_id = store.enqueue(new(), T0)
    assert reschedule(store, T0, limit=0) is Status.FAILED
    assert "more than max_reschedules (0)" in store.get(task_id).error


def test_no_limit_keeps_rescheduling(store):
    task_id = store.enqueue(new(), T0)
    for n in range(40):
        assert reschedule(store, T0 + n, limit=None) is Status.QUEUED
    assert store.get(task_id).status is Status.QUEUED


def test_other_failures_do_not_count_and_manual_retry_resets_the_count(store):
    task_id = store.enqueue(new(max_attempts=5), T0)
    task = store.claim("sup", T0, lease_s=LEASE_S)
    store.fail(task.lease, AttemptEnd(Outcome.ERROR, reason="boom"), T0, BACKOFF,
               max_reschedules=1)
    assert reschedule(store, T0 + 1, limit=1) is Status.QUEUED
    assert reschedule(store, T0 + 2, limit=1) is Status.FAILED
    assert store.retry(task_id, T0 + 3) is Status.QUEUED
    assert reschedule(store, T0 + 4, limit=1) is Status.QUEUED  # counting from 0 again
    assert reschedule(store, T0 + 5, limit=1) is Status.FAILED


def test_a_lost_lease_counts_nothing(store):
    task_id = store.enqueue(new(), T0)
    task = store.claim("sup", T0, lease_s=LEASE_S)
    stale = task.lease
    store.expire(T0 + LEASE_S + 1, BACKOFF)  # rescued: the old lease is gone
    assert store.fail(stale, retry_end(), T0 + LEASE_S + 2, BACKOFF, max_reschedules=0) is None
    assert store.get(task_id).status is Status.QUEUED
