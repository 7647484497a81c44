"""Handlers of the flow-control process tests (named limits, spend, pauses).

`f.work` logs start/end lines in events.log like tvp_handlers' handlers, sleeps
`payload["s"]`, reports `payload["spend"]` tokens with ctx.spend, and on its first run
raises Retry(`payload["retry_s"]`, pause_limit=`payload["pause"]`) when asked to.
Nothing here may import taskvisor's supervisor side.
"""

from __future__ import annotations

import os
import time

from tvp_handlers import append, mark_end, mark_start
from workers import Retry, task


@task("f.work")
def work(payload, ctx):
    mark_start(payload, ctx)
    if payload.get("pause"):
        marker = os.path.join(payload["dir"], f"paused-{ctx.id}")
        if not os.path.exists(marker):
            append(marker, "1")
            mark_end(payload, ctx)
            raise Retry(float(payload["retry_s"]), "HTTP 429", pause_limit=payload["pause"])
    time.sleep(float(payload.get("s", 0)))
    if payload.get("spend") is not None:
        ctx.spend(int(payload["spend"]))
    mark_end(payload, ctx)
    return {"keys": list(ctx.limit_keys), "type_limits": list(ctx.type_limits)}


task("f.other")(work)  # the same body under a type with no limits
