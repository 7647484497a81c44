"""A handler module that takes 2 s to import, for supervisor_bench.py's start-cost test.

Stands in for a module that imports torch, transformers or a big SDK. `stamp` returns the
wall-clock time at which the handler was entered. Importing it prints nothing.
"""

import os
import time

from workers import task

time.sleep(float(os.environ.get("BENCH_SLOW_IMPORT_S", "2.0")))


@task("slow.stamp")
def stamp(payload, ctx):
    return {"t": time.time()}
