"""Preloaded only after a SIGHUP reload adds it: a type the first fork server lacks."""

import os

from workers import task


@task("t.extra")
def extra(payload, ctx):
    return {"extra": True, "pid": os.getpid(), "ppid": os.getppid()}
