"""Task handlers for inflight_bench.py, preloaded by the taskvisor fork server.

Not a test and not user-facing. `inflight.sleep` stands in for a model call that waits:
it sleeps `payload["s"]` seconds, using no CPU meanwhile, and returns the wall-clock time
at which it was entered. `inflight.stamp` returns that time at once: the enqueue-to-start
probe reads it from the result. (The chat variant uses the built-in `llm.chat`.)
"""

import time

from workers import task


@task("inflight.sleep")
def sleep(payload, ctx):
    entered = time.time()
    time.sleep(float(payload.get("s", 3.0)))
    return {"t": entered}


@task("inflight.stamp")
def stamp(payload, ctx):
    return {"t": time.time()}
