"""The arq worker of inflight_bench.py: asyncio jobs on Redis (BENCH_REDIS_URL); run as a
script, it fills the queue (`python inflight_arq.py RUN N KIND S BASE_URL`).

`work` runs inflight_work.work_async on the worker's own Redis connection; `max_jobs`
(the number in flight) comes from BENCH_CONCURRENCY. Started as `arq inflight_arq.WorkerSettings`.
"""

import os

from arq.connections import RedisSettings

import inflight_work


async def work(ctx, run, total, kind, s, base_url):
    await inflight_work.work_async(ctx["redis"], run, total, kind, s, base_url)


class WorkerSettings:
    functions = [work]
    redis_settings = RedisSettings.from_dsn(inflight_work.URL)
    max_jobs = int(os.environ.get("BENCH_CONCURRENCY", "10"))
    keep_result = 0
    job_timeout = 600
    poll_delay = 0.1


async def _fill(run, n, kind, s, base_url):
    """Enqueue n jobs (the benchmark fills the queue before the worker starts)."""
    import asyncio

    from arq import create_pool
    pool = await create_pool(WorkerSettings.redis_settings)
    try:
        for i in range(0, n, 200):
            await asyncio.gather(*(pool.enqueue_job("work", run, n, kind, s, base_url)
                                   for _ in range(min(200, n - i))))
    finally:
        await pool.aclose()


if __name__ == "__main__":
    import asyncio
    import sys

    run_id, total, kind_, seconds, url = sys.argv[1:6]
    asyncio.run(_fill(run_id, int(total), kind_, float(seconds), url or None))
