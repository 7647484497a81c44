"""RQ job functions for supervisor_bench.py (imported by `rq worker` work-horses).

`noop(run, total)` counts itself in Redis and records the first start and the last
completion of a run; `stamp(run, i)` records the time the job was entered. Both use the
worker's own Redis connection, so a job costs one extra round trip on loopback.
"""

import time

from rq import get_current_job


def noop(run, total):
    t = time.time()
    r = get_current_job().connection
    pipe = r.pipeline(transaction=False)
    pipe.setnx(f"{run}:first", t)
    pipe.incr(f"{run}:done")
    _, n = pipe.execute()
    if n == total:
        r.set(f"{run}:last", time.time())


def stamp(run, i):
    t = time.time()
    get_current_job().connection.set(f"{run}:stamp:{i}", repr(t))
