"""supervisor.policy: backoff arithmetic and the decision after a failed attempt.

Pure functions: no disk, no fork, no clock. Jitter is random, so delays are checked
against their bounds over many draws, and exactly where the cap removes the randomness.
"""

from __future__ import annotations

import warnings

import pytest

from supervisor.policy import REFUNDED, Backoff, Decision, after_failure, free_memory_mb
from supervisor.store import Outcome

NOW = 1_800_000_000.0
DRAWS = 300


def delays(backoff: Backoff, attempt: int) -> list[float]:
    return [backoff.delay_s(attempt) for _ in range(DRAWS)]


# -- Backoff ------------------------------------------------------------------------------

def test_defaults():
    assert (Backoff().initial_s, Backoff().max_s) == (1.0, 300.0)


@pytest.mark.parametrize("initial", [1.0, 0.5, 3.0])
def test_delay_grows_exponentially_with_jitter_of_at_most_initial(initial):
    backoff = Backoff(initial_s=initial, max_s=10_000)
    for attempt in range(1, 9):
        base = initial * 2 ** (attempt - 1)
        got = delays(backoff, attempt)
        assert all(base <= d <= base + initial for d in got), (attempt, min(got), max(got))
        assert max(got) - min(got) > 0  # there is jitter…
    # …and it never reorders consecutive attempts beyond one `initial` of overlap.
    assert min(delays(backoff, 4)) >= max(delays(backoff, 2))


def test_delay_doubles_on_average():
    backoff = Backoff(initial_s=1.0, max_s=10_000)
    means = [sum(delays(backoff, a)) / DRAWS for a in (3, 4, 5, 6)]
    # mean = 2^(a-1) + 0.5; successive means differ by the previous 2^(a-1)
    for a, mean in zip((3, 4, 5, 6), means):
        assert abs(mean - (2 ** (a - 1) + 0.5)) < 0.15


@pytest.mark.parametrize("attempt", [10, 20, 200, 5000])
def test_delay_is_capped_at_max(attempt):
    backoff = Backoff(initial_s=1.0, max_s=60.0)
    assert set(delays(backoff, attempt)) == {60.0}  # past the cap the jitter cannot push over it


def test_jitter_is_capped_too_near_the_max():
    backoff = Backoff(initial_s=1.0, max_s=8.5)
    got = delays(backoff, 4)  # 8 + U(0, 1) capped at 8.5
    assert all(8.0 <= d <= 8.5 for d in got)
    assert 8.5 in got


@pytest.mark.parametrize("attempt", [0, -3])
def test_attempt_below_one_counts_as_the_first(attempt):
    backoff = Backoff(initial_s=2.0, max_s=100)
    assert all(2.0 <= d <= 4.0 for d in delays(backoff, attempt))


def test_zero_backoff_is_immediate():
    backoff = Backoff(initial_s=0, max_s=0)
    assert {backoff.delay_s(a) for a in range(1, 20)} == {0.0}


def test_initial_equal_to_max_is_a_fixed_delay():
    # The store state machine relies on this to predict run_after exactly.
    backoff = Backoff(initial_s=1.0, max_s=1.0)
    assert {backoff.delay_s(a) for a in range(1, 30)} == {1.0}


def test_delay_is_a_float():
    assert type(Backoff().delay_s(1)) is float


@pytest.mark.parametrize("initial", [0.5, 2.0, 0])
def test_backoff_uses_no_deprecated_tenacity_api(initial):
    """tenacity 9.2 deprecated wait_exponential_jitter(initial=…) for `multiplier`; using
    it warns on every call (an error under -W error, a TypeError once it is removed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Backoff(initial_s=initial, max_s=10).delay_s(2)


# -- after_failure --------------------------------------------------------------------------

BACKOFF = Backoff(initial_s=1.0, max_s=60.0)


def decide(outcome=Outcome.ERROR, *, attempt=1, max_attempts=3, retryable=True,
           cancel_requested=False, backoff=BACKOFF, delay_s=None) -> Decision:
    return after_failure(outcome, attempt=attempt, max_attempts=max_attempts, retryable=retryable,
                         cancel_requested=cancel_requested, now=NOW, backoff=backoff, delay_s=delay_s)


@pytest.mark.parametrize("outcome", [Outcome.ERROR, Outcome.TIMEOUT, Outcome.MEMORY_LIMIT,
                                     Outcome.CRASHED, Outcome.LOST])
def test_retryable_failure_with_attempts_left_is_requeued_after_the_backoff(outcome):
    for attempt, low in ((1, 1.0), (2, 2.0), (3, 4.0)):
        d = decide(outcome, attempt=attempt, max_attempts=4)
        assert (d.action, d.refund) == ("requeue", False)
        assert NOW + low <= d.run_after <= NOW + low + 1.0


@pytest.mark.parametrize("attempt", [3, 4, 10])
def test_spent_attempts_fail_for_good(attempt):
    assert decide(attempt=attempt, max_attempts=3) == Decision("fail", None, False)


def test_max_attempts_of_one_never_retries():
    assert decide(attempt=1, max_attempts=1).action == "fail"


def test_non_retryable_fails_with_attempts_left():
    assert decide(attempt=1, max_attempts=10, retryable=False) == Decision("fail", None, False)


def test_cancelled_outcome_cancels_whatever_the_attempts():
    for attempt in (1, 3, 7):
        assert decide(Outcome.CANCELLED, attempt=attempt, max_attempts=3) == Decision("cancel", None, False)


@pytest.mark.parametrize("outcome", [Outcome.ERROR, Outcome.LOST, Outcome.INTERRUPTED,
                                     Outcome.RESCHEDULED, Outcome.TIMEOUT])
def test_cancel_requested_wins_over_every_other_rule(outcome):
    assert decide(outcome, cancel_requested=True, attempt=1, max_attempts=5).action == "cancel"


def test_refunded_outcomes():
    assert REFUNDED == {Outcome.INTERRUPTED, Outcome.RESCHEDULED}


@pytest.mark.parametrize("outcome", sorted(REFUNDED))
@pytest.mark.parametrize("attempt, retryable", [(1, True), (3, True), (3, False), (99, False)])
def test_refunded_outcome_requeues_even_when_attempts_are_spent(outcome, attempt, retryable):
    d = decide(outcome, attempt=attempt, max_attempts=3, retryable=retryable)
    assert d == Decision("requeue", NOW, True)


@pytest.mark.parametrize("delay_s, run_after", [(None, NOW), (0, NOW), (30.0, NOW + 30), (-5.0, NOW)])
def test_rescheduled_delay_is_honoured_and_never_negative(delay_s, run_after):
    assert decide(Outcome.RESCHEDULED, delay_s=delay_s).run_after == run_after


def test_zero_backoff_requeues_at_now():
    assert decide(backoff=Backoff(initial_s=0, max_s=0)) == Decision("requeue", NOW, False)


# -- admission arithmetic ---------------------------------------------------------------------------

def test_free_memory():
    assert free_memory_mb(None, 10_000) == float("inf")
    assert free_memory_mb(4096, 1024) == 3072
    assert free_memory_mb(1000, 1200) == -200  # over-committed: nothing more fits
