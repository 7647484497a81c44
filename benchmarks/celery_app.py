"""The Celery app for supervisor_bench.py: Redis broker, no result backend.

Tasks mirror rq_jobs.py: `noop(run, total)` counts itself in Redis (first start, last
completion), `stamp(run, i)` records the time it was entered. The broker URL comes from
BENCH_REDIS_URL, set by the benchmark, which also starts the worker:
`celery -A celery_app worker -c 2 [--max-tasks-per-child=1]`.
"""

import os
import time

import redis
from celery import Celery

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("bench", broker=URL)
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_serializer="json",
    accept_content=["json"],
)

_client = None
_client_pid = None


def _redis():
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client, _client_pid = redis.Redis.from_url(URL), os.getpid()
    return _client


@app.task(name="bench.noop")
def noop(run, total):
    t = time.time()
    r = _redis()
    pipe = r.pipeline(transaction=False)
    pipe.setnx(f"{run}:first", t)
    pipe.incr(f"{run}:done")
    _, n = pipe.execute()
    if n == total:
        r.set(f"{run}:last", time.time())


@app.task(name="bench.stamp")
def stamp(run, i):
    t = time.time()
    _redis().set(f"{run}:stamp:{i}", repr(t))
