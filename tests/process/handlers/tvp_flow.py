"""Handlers of the flow-control process tests (named limits, spend, pauses, slots).

`f.work` logs start/end lines in events.log like tvp_handlers' handlers, sleeps
`payload["s"]`, reports `payload["spend"]` tokens with ctx.spend, and on its first run
raises Retry(`payload["retry_s"]`, pause_limit=`payload["pause"]`) when asked to.
`f.slot` counts the runs of a limit alive at once with flocks (its docstring).
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


@task("f.slot")
def slot(payload, ctx):
    """Hold one of `payload["n"]` slot files under a non-blocking flock while it runs; none
    free means more than n runs of the limit are alive at once: an "over" line. The kernel
    frees a slot only when the process is gone, so a run killed with kill -9 (or orphaned
    by its supervisor) holds its slot exactly as long as it lives. Then, by the attempt:
    `payload["modes"][attempt - 1]` is "ok" (sleep s), "kill" (SIGKILL itself after s),
    "error" (raise after s) or "hang" (sleep until killed by its time limit)."""
    import fcntl
    import signal
    folder = os.path.join(payload["dir"], "slots")
    os.makedirs(folder, exist_ok=True)
    held = None
    for i in range(int(payload["n"])):
        fd = os.open(os.path.join(folder, str(i)), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = fd
            break
        except BlockingIOError:
            os.close(fd)
    if held is None:
        append(os.path.join(payload["dir"], "over"), f"{ctx.id} {ctx.attempt} {time.time():.6f}")
    mark_start(payload, ctx)
    modes = payload.get("modes") or ["ok"]
    mode = modes[min(ctx.attempt, len(modes)) - 1]
    if mode == "hang":
        time.sleep(3600)
    time.sleep(float(payload.get("s", 0)))
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "error":
        raise RuntimeError("asked to fail")
    mark_end(payload, ctx)
    return {"attempt": ctx.attempt}
