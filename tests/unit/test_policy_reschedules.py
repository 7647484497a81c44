"""policy.after_failure and max_reschedules: a pure decision, no store."""

from __future__ import annotations

from supervisor import policy
from supervisor.store import Outcome

KW = dict(attempt=1, max_attempts=3, retryable=True, cancel_requested=False, now=100.0,
          backoff=policy.Backoff(1.0, 1.0))


def test_reschedules_up_to_the_limit_then_fail_with_a_reason():
    ok = policy.after_failure(Outcome.RESCHEDULED, delay_s=5, reschedules=24,
                              max_reschedules=25, **KW)
    assert (ok.action, ok.run_after, ok.refund, ok.reason) == ("requeue", 105.0, True, None)
    no = policy.after_failure(Outcome.RESCHEDULED, delay_s=5, reschedules=25,
                              max_reschedules=25, **KW)
    assert (no.action, no.refund) == ("fail", False)
    assert no.reason.startswith("raised Retry 26 times, more than max_reschedules (25)")


def test_no_limit_and_other_outcomes_are_unaffected():
    assert policy.after_failure(Outcome.RESCHEDULED, reschedules=10 ** 6, **KW).action == "requeue"
    err = policy.after_failure(Outcome.ERROR, reschedules=99, max_reschedules=0, **KW)
    assert (err.action, err.reason) == ("requeue", None)
    cancel = policy.after_failure(Outcome.RESCHEDULED, reschedules=99, max_reschedules=0,
                                  **{**KW, "cancel_requested": True})
    assert cancel.action == "cancel"
