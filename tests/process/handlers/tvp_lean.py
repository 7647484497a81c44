"""A preload module that imports nothing but `os`, `sys` and `workers`: the fork server
it runs in must stay lean (no logging, no threading), and ctx.logger still works."""

import os
import sys

from workers import task

WATCHED = ("logging", "threading", "inspect", "traceback", "typing", "dataclasses")


@task("lean.log")
def log_line(payload, ctx):
    before = sorted(m for m in WATCHED if m in sys.modules)
    ctx.logger.warning("lean line of %s", ctx.id)
    return {"loaded_at_start": before, "logging_after": "logging" in sys.modules,
            "pid": os.getpid()}


@task("lean.fail")
def fail(payload, ctx):
    raise ValueError("lean failure")
