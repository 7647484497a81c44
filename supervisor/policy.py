"""Pure rules: retry and backoff, which outcomes spend an attempt, admission arithmetic.

Every function takes what it needs (including `now` where time matters) and returns a
value; nothing here does I/O, reads a clock or touches a process. Backoff maths is
tenacity's (exponential with jitter), not ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import tenacity

from supervisor.store.rows import Outcome

# Outcomes that give the attempt back: the task did nothing wrong.
REFUNDED = frozenset({Outcome.INTERRUPTED, Outcome.RESCHEDULED})


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 1.0
    max_s: float = 300.0

    def delay_s(self, attempt: int) -> float:
        """Delay before the retry that follows failed attempt number `attempt` (1-based):
        initial * 2^(attempt-1) plus up to `initial` of random jitter, capped at max."""
        wait = tenacity.wait_exponential_jitter(
            multiplier=self.initial_s, max=self.max_s, jitter=self.initial_s)
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
        state.attempt_number = max(1, attempt)
        return float(wait(state))


@dataclass(frozen=True)
class Decision:
    """What to do with a task after an attempt that did not succeed."""
    action: str              # "requeue" | "fail" | "cancel"
    run_after: float | None  # for requeue
    refund: bool             # requeue without spending the attempt
    reason: str | None = None  # why it fails, when the outcome alone does not say


def after_failure(outcome: Outcome, *, attempt: int, max_attempts: int, retryable: bool,
                  cancel_requested: bool, now: float, backoff: Backoff,
                  delay_s: float | None = None, reschedules: int = 0,
                  max_reschedules: int | None = None) -> Decision:
    """Decide the task's next status after a non-successful attempt. `reschedules` is how
    many times the task already rescheduled itself; a reschedule past `max_reschedules`
    (None: no limit) fails it for good, since a reschedule never spends an attempt."""
    if outcome is Outcome.CANCELLED or cancel_requested:
        return Decision("cancel", None, False)
    if outcome is Outcome.RESCHEDULED and max_reschedules is not None \
            and reschedules >= max_reschedules:
        return Decision("fail", None, False, reason=(
            f"raised Retry {reschedules + 1} times, more than max_reschedules "
            f"({max_reschedules}): failed for good (raise the limit in [defaults] or the "
            "type's config if it should keep waiting)"))
    if outcome in REFUNDED:
        return Decision("requeue", now + max(0.0, delay_s or 0.0), True)
    if retryable and attempt < max_attempts:
        return Decision("requeue", now + backoff.delay_s(attempt), False)
    return Decision("fail", None, False)


def fence_margin_s(lease_s: float) -> float:
    """How long before its lease expires a task process is killed when the lease was not
    renewed, and how long after it another supervisor waits before rescuing the task: a
    quarter of the lease, at most 5 s. Between the two, no attempt can overlap another."""
    return min(5.0, lease_s / 4)


def renew_interval_s(lease_s: float) -> float:
    """How often leases (and with them the fence) are renewed: three times a lease."""
    return max(0.2, lease_s / 3)


def memory_budget_mb(configured_mb: float | None, total_mb: float) -> float:
    """The admission budget: the configured one, else 80% of the machine's memory."""
    return total_mb * 0.8 if configured_mb is None else float(configured_mb)


def free_memory_mb(budget_mb: float | None, reserved_mb: float) -> float:
    """What a new claim may declare; an unset budget admits everything."""
    if budget_mb is None:
        return float("inf")
    return budget_mb - reserved_mb
