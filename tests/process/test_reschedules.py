"""A real supervisor ends a task that raises Retry for ever: after max_reschedules (per
type here, else [defaults]) the task fails for good, and the reason says why."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(60)


def test_retry_forever_fails_after_the_types_max_reschedules(supervisor_proc):
    sup = supervisor_proc(supervisor={"preload": ["tvp_handlers", "tvp_defects"]},
                          defaults={"max_reschedules": 50},
                          types={"t.retry_forever": {"max_reschedules": 3}})
    task_id = sup.enqueue("t.retry_forever")
    task = sup.wait_status(task_id, "failed", timeout=30)
    assert task.outcome == "rescheduled"
    assert "more than max_reschedules (3)" in task.error
    assert [a.outcome for a in task.history] == ["rescheduled"] * 4
