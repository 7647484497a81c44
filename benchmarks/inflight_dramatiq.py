"""The Dramatiq actors of inflight_bench.py: Redis broker (BENCH_REDIS_URL).

`work` runs inflight_work.work_sync; no retries, a 10-minute time limit. Started as
`dramatiq-gevent inflight_dramatiq -p 1 -t N` (N greenlets in one worker process).
"""

import dramatiq
from dramatiq.brokers.redis import RedisBroker

import inflight_work

broker = RedisBroker(url=inflight_work.URL)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="inflight", max_retries=0, time_limit=600_000)
def work(run, total, kind, s, base_url):
    inflight_work.work_sync(run, total, kind, s, base_url)
