"""Every Prometheus metric of taskvisor, on a registry of our own.

Owns the metric names, labels, help texts and buckets (a contract: dashboards and alert
rules use them). Counters and histograms are fed from the Supervisor's events (`Metrics`
is an events sink); gauges about the queue are read from the database at scrape time by
a collector with its own connection, and gauges about the loop from the Supervisor's
attributes. Runs only in the supervisor process: prometheus_client state does not cross
fork. Labels are closed sets: never a task id, and at most MAX_TYPES task types.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest

from supervisor import __version__
from supervisor.errors import StoreError
from supervisor.store import Status

log = logging.getLogger("taskvisor.metrics")
MIB = 1024 * 1024
MAX_TYPES = 100          # distinct `type` label values; the rest are counted as OTHER_TYPE
OTHER_TYPE = "_other"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
RSS_BUCKETS = tuple(float(MIB << n) for n in range(16))   # 1 MiB .. 32 GiB, doubling


class TypeLabels:
    """Maps task types to label values: the first MAX_TYPES types seen keep their name,
    later ones share OTHER_TYPE, so a client inventing types cannot blow up cardinality."""

    def __init__(self, limit: int = MAX_TYPES):
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, type_name: str) -> str:
        with self._lock:
            if type_name in self._seen:
                return type_name
            if len(self._seen) < self.limit:
                self._seen.add(type_name)
                return type_name
        return OTHER_TYPE


class Metrics:
    """The registry plus the events sink: `metrics(name, fields)` is called by the loop.

    `bind(supervisor, open_store)` adds the scrape-time collectors; `open_store()` must
    return a Store usable from the HTTP threads (it is guarded by a lock here).
    """

    def __init__(self) -> None:
        # No `_created` series: they double the exposition and no dashboard reads them.
        # (A process-wide switch; only the supervisor process records metrics.)
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.types = TypeLabels()
        r = self.registry
        self.attempts = Counter(
            "taskvisor_task_attempts_total",
            "Attempts that ended in this supervisor, by task type and outcome (succeeded, "
            "error, timeout, memory_limit, crashed, lost, cancelled, interrupted, rescheduled).",
            ["type", "outcome"], registry=r)
        self.duration = Histogram(
            "taskvisor_task_duration_seconds",
            "Wall-clock time of each attempt, from its fork to its exit.",
            ["type"], buckets=DURATION_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "taskvisor_task_queue_wait_seconds",
            "Time from when a task was due (its run_after: enqueue time, scheduled time or "
            "retry time) to its claim by this supervisor.",
            ["type"], buckets=DURATION_BUCKETS, registry=r)
        self.peak_rss = Histogram(
            "taskvisor_task_peak_rss_bytes",
            "Peak resident memory of each attempt's process tree.",
            ["type"], buckets=RSS_BUCKETS, registry=r)
        self.leases_expired = Counter(
            "taskvisor_leases_expired_total",
            "Running tasks rescued by this supervisor because their lease expired or their "
            "supervisor died (each attempt ends `lost`).", registry=r)
        self.llm_tokens = Counter(
            "taskvisor_llm_tokens_total",
            "Model tokens reported in the `usage` of successful results (llm.chat, or any "
            "handler returning OpenAI-style usage), by task type and kind (prompt, completion).",
            ["type", "kind"], registry=r)
        self.forkserver_restarts = Counter(
            "taskvisor_forkserver_restarts_total",
            "Times the fork server died and was restarted.", registry=r)
        self.step_failures = Counter(
            "taskvisor_loop_step_failures_total",
            "Steps of the supervisor loop that raised (logged with their traceback; the "
            "loop went on), by step.", ["step"], registry=r)
        ProcessCollector(namespace="", registry=r)

    # -- the events sink -----------------------------------------------------------------

    def __call__(self, name: str, fields: dict) -> None:
        handler = getattr(self, f"_on_{name}", None)
        if handler is not None:
            handler(fields)

    def _on_claimed(self, fields: dict) -> None:
        task = fields["task"]
        due = task.run_after if task.run_after is not None else task.created_at
        started = task.started_at if task.started_at is not None else time.time()
        self.queue_wait.labels(self.types(task.type)).observe(max(0.0, started - due))

    def _on_finished(self, fields: dict) -> None:
        task, end = fields["task"], fields["end"]
        label = self.types(task.type)
        self.attempts.labels(label, str(end.outcome)).inc()
        if end.wall_s is not None:
            self.duration.labels(label).observe(max(0.0, end.wall_s))
        if end.peak_rss_bytes:
            self.peak_rss.labels(label).observe(end.peak_rss_bytes)
        if end.result and '"usage"' in end.result:  # parse only results that carry usage
            self._count_tokens(label, end.result)

    def _count_tokens(self, label: str, result: str) -> None:
        try:
            usage = json.loads(result).get("usage")
        except (ValueError, AttributeError):
            return
        if isinstance(usage, dict):
            for kind in ("prompt", "completion"):
                n = usage.get(f"{kind}_tokens")
                if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                    self.llm_tokens.labels(label, kind).inc(n)

    def _on_step_failed(self, fields: dict) -> None:
        self.step_failures.labels(str(fields.get("step"))[:40]).inc()

    def _on_expired(self, fields: dict) -> None:
        self.leases_expired.inc()

    def _on_forkserver_restarted(self, fields: dict) -> None:
        self.forkserver_restarts.inc()

    # -- scrape time ---------------------------------------------------------------------

    def bind(self, supervisor, database: "LockedStore") -> None:
        """Add the collectors that read the Supervisor and the database at scrape time."""
        self.registry.register(LoopCollector(supervisor))
        self.registry.register(DatabaseCollector(database, self.types))
        self.registry.register(LimitCollector(supervisor, database))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class LockedStore:
    """A Store opened lazily by `open_store()` and used by one thread at a time."""

    def __init__(self, open_store: Callable[[], object]):
        self._open = open_store
        self._store = None
        self.lock = threading.Lock()

    def __enter__(self):
        self.lock.acquire()
        try:
            if self._store is None:
                self._store = self._open()
        except BaseException:
            self.lock.release()
            raise
        return self._store

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def close(self) -> None:
        with self.lock:
            if self._store is not None:
                self._store.close()
                self._store = None


class LoopCollector:
    """Gauges read from the snapshot the supervisor loop publishes (no database)."""

    def __init__(self, supervisor):
        self.sup = supervisor

    def describe(self):
        return []

    def collect(self):
        sup = self.sup.snapshot
        yield _gauge("taskvisor_workers_busy",
                     "Task processes this supervisor is running now.", sup.busy)
        yield _gauge("taskvisor_pool_size",
                     "How many task processes this supervisor may run at once.",
                     sup.pool_size)
        yield _gauge("taskvisor_memory_budget_bytes",
                     "Memory this supervisor may reserve for running tasks (memory-aware "
                     "admission).", sup.memory_budget_mb * MIB)
        yield _gauge("taskvisor_supervisor_last_loop_timestamp_seconds",
                     "When the supervisor loop last started a pass (epoch seconds); a stale "
                     "value means the loop is stuck.", sup.last_loop_at)
        info = GaugeMetricFamily("taskvisor_build_info", "Always 1; the taskvisor version.",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info


class DatabaseCollector:
    """Gauges and the enqueue counter read from the database at scrape time.

    taskvisor_tasks_enqueued_total counts enqueues by any process (apps, the CLI, the
    HTTP API) since this supervisor started: at each scrape it adds how much each type's
    row count grew. Enqueues made in the same scrape interval as a `prune` of that type
    are undercounted; dedupe hits (no new row) are not enqueues.
    """

    def __init__(self, database: LockedStore, types: TypeLabels):
        self.database = database
        self.types = types
        self.enqueued: dict[str, float] = {}
        self._last_totals: dict[str, int] | None = None
        self._lock = threading.Lock()
        try:
            self.read(time.time())  # the baseline: count from start, not from first scrape
        except StoreError as exc:
            log.warning("metrics: could not read the database at start: %s", exc)

    def describe(self):
        return []

    def read(self, now: float):
        with self.database as store:
            stats = store.stats(now)
        totals: dict[str, int] = {}
        for by_type in stats.counts.values():
            for type_name, n in by_type.items():
                totals[type_name] = totals.get(type_name, 0) + n
        with self._lock:
            if self._last_totals is not None:
                for type_name, n in totals.items():
                    grew = n - self._last_totals.get(type_name, 0)
                    if grew > 0:
                        label = self.types(type_name)
                        self.enqueued[label] = self.enqueued.get(label, 0) + grew
            self._last_totals = totals
        return stats

    def collect(self):
        try:
            stats = self.read(time.time())
        except StoreError as exc:
            log.warning("metrics: database read failed, queue metrics left out: %s", exc)
            return
        tasks = GaugeMetricFamily("taskvisor_tasks",
                                  "Tasks in the database by status and type, now.",
                                  labels=["status", "type"])
        counts: dict[tuple[str, str], int] = {}
        seen_types = set()
        for status, by_type in stats.counts.items():
            for type_name, n in by_type.items():
                label = self.types(type_name)
                seen_types.add(label)
                counts[(status, label)] = counts.get((status, label), 0) + n
        for label in sorted(seen_types):
            for status in Status:  # every status, zeros included, so alerts see 0 not absence
                tasks.add_metric([str(status), label], counts.get((str(status), label), 0))
        yield tasks
        oldest = GaugeMetricFamily(
            "taskvisor_oldest_queued_task_timestamp_seconds",
            "Enqueue time (epoch seconds) of the oldest queued task that is due, by type; "
            "absent when none waits.", labels=["type"])
        by_label: dict[str, float] = {}
        for type_name, at in stats.oldest_queued_by_type.items():
            label = self.types(type_name)
            by_label[label] = min(at, by_label.get(label, at))
        for label, at in sorted(by_label.items()):
            oldest.add_metric([label], at)
        yield oldest
        yield _gauge("taskvisor_memory_reserved_bytes",
                     "Memory declared by the running tasks of every supervisor on this "
                     "database (what admission subtracts from the budget).",
                     stats.running_reserved_mb * MIB)
        enqueued = CounterMetricFamily(
            "taskvisor_tasks_enqueued",
            "Tasks enqueued into the database by any process since this supervisor started, "
            "by type; counted at scrape time from the growth of each type's row count "
            "(dedupe hits are not enqueues; enqueues in an interval where prune removed "
            "tasks of the same type are undercounted).", labels=["type"])
        with self._lock:
            for label, n in sorted(self.enqueued.items()):
                enqueued.add_metric([label], n)
        yield enqueued


class LimitCollector:
    """Named limits at scrape time: what each key has left and how long its oldest
    waiting task has waited. `limit` is the concrete key ("openai", "tenant:42"); at most
    MAX_LIMIT_KEYS keys are exported (configured names first), so per-tenant keys cannot
    blow up cardinality."""

    MAX_LIMIT_KEYS = 100

    def __init__(self, supervisor, database: LockedStore):
        self.sup = supervisor
        self.database = database

    def describe(self):
        return []

    def collect(self):
        now = time.time()
        try:
            with self.database as store:
                rows = store.limit_report(self.sup.snapshot.config.limit_table(), now)
        except StoreError as exc:
            log.warning("metrics: limit state read failed, limit metrics left out: %s", exc)
            return
        rows.sort(key=lambda r: (r["limit"] != r["key"], r["key"]))
        available = GaugeMetricFamily(
            "taskvisor_limit_available",
            "What a named limit has left now, by key and kind: requests (request bucket), "
            "tokens (token bucket; negative while in debt), concurrency (free slots); 0 "
            "for every kind while the limit is paused.", labels=["limit", "kind"])
        waiting = GaugeMetricFamily(
            "taskvisor_limit_wait_seconds",
            "How long the oldest due task waiting on this limit has waited (0 when none).",
            labels=["limit"])
        queued = GaugeMetricFamily(
            "taskvisor_limit_waiting_tasks", "Queued tasks that draw from this limit.",
            labels=["limit"])
        for row in rows[:self.MAX_LIMIT_KEYS]:
            paused = row["paused_until"] is not None
            for kind, value in row["available"].items():
                if value is not None:
                    available.add_metric([row["key"], kind], 0 if paused else value)
            oldest = row["oldest_waiting_at"]
            waiting.add_metric([row["key"]], 0.0 if oldest is None else max(0.0, now - oldest))
            queued.add_metric([row["key"]], row["waiting"])
        yield available
        yield waiting
        yield queued


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def fanout(*sinks: Callable[[str, dict], None] | None) -> Callable[[str, dict], None] | None:
    """One events sink calling each given sink in turn (None entries are skipped)."""
    live = [s for s in sinks if s is not None]
    if not live:
        return None
    if len(live) == 1:
        return live[0]

    def emit(name: str, fields: dict) -> None:
        for sink in live:
            try:
                sink(name, fields)
            except Exception:  # one observer failing must not starve the others
                log.exception("event observer %r failed on %s", sink, name)
    return emit
