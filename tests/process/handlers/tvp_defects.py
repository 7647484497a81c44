"""Handlers of the issue-10 defect tests: a task that raises Retry for ever, and one
whose answer is a constant a test rewrites in this file's copy before a SIGHUP."""

from workers import Retry, task

VERSION = "original"


@task("t.retry_forever")
def retry_forever(payload, ctx):
    raise Retry(float(payload.get("delay_s", 0.01)), "not yet")


@task("t.version")
def version(payload, ctx):
    return {"version": VERSION}
