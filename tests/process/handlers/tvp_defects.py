"""Handlers of the issue-10 defect tests: a task that raises Retry for ever."""

from workers import Retry, task


@task("t.retry_forever")
def retry_forever(payload, ctx):
    raise Retry(float(payload.get("delay_s", 0.01)), "not yet")
