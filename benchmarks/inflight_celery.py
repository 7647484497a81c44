"""The Celery app of inflight_bench.py: Redis broker (BENCH_REDIS_URL), no result backend.

One task, `inflight.work`, runs inflight_work.work_sync. The benchmark starts the worker
with `celery -A inflight_celery worker -P threads|prefork -c N`.
"""

from celery import Celery

import inflight_work

app = Celery("inflight", broker=inflight_work.URL)
app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True,
                worker_hijack_root_logger=False, task_serializer="json", accept_content=["json"])


@app.task(name="inflight.work")
def work(run, total, kind, s, base_url):
    inflight_work.work_sync(run, total, kind, s, base_url)
