"""Task handlers for supervisor_bench.py, preloaded by the taskvisor fork server.

Not a test and not user-facing: `noop` does nothing (the throughput benchmark), `stamp`
returns the wall-clock time at which the handler was entered (the latency benchmarks
read it from the task's result).
"""

import time

from workers import task


@task("noop")
def noop(payload, ctx):
    return None


@task("stamp")
def stamp(payload, ctx):
    return {"t": time.time()}
