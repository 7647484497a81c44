"""supervisor.metrics without a process or a file: the events sink, the scrape-time
collectors over fake supervisor and store objects, label capping, and health()."""

from __future__ import annotations

from types import SimpleNamespace

import time

import pytest

from supervisor.budget import Limits
from prometheus_client.parser import text_string_to_metric_families

from supervisor.api import health
from supervisor.errors import StoreUnavailable
from supervisor.metrics import (
    DURATION_BUCKETS, MAX_TYPES, OTHER_TYPE, RSS_BUCKETS, Metrics, TypeLabels, fanout)
from supervisor.store import AttemptEnd, Outcome, Stats

MIB = 1024 * 1024


class FakeStore:
    def __init__(self):
        self.counts: dict[str, dict[str, int]] = {}
        self.oldest: dict[str, float] = {}
        self.reserved_mb = 0
        self.down = False

    def stats(self, now):
        if self.down:
            raise StoreUnavailable("the database is gone")
        return Stats(self.counts, min(self.oldest.values(), default=None), dict(self.oldest),
                     self.reserved_mb)

    def supervisors(self):
        if self.down:
            raise StoreUnavailable("the database is gone")
        return []

    def limit_report(self, limits, now):
        if self.down:
            raise StoreUnavailable("the database is gone")
        return self.limits

    limits: list = []


class FakeDatabase:
    """LockedStore's interface: `with database as store`."""

    def __init__(self, store):
        self.store = store

    def __enter__(self):
        return self.store

    def __exit__(self, *exc):
        return None


def fake_sup(**kw):
    """A supervisor as the metrics thread sees it: only the snapshot the loop publishes."""
    config = SimpleNamespace(supervisor=SimpleNamespace(pool_size=4, poll_interval_s=1.0),
                             limit_table=lambda: Limits({}))
    values = dict(busy=0, pool_size=4, config=config, memory_budget_mb=1024.0,
                  last_loop_at=0.0, owner="host:1:abc", host="host", store_ok=True,
                  stopping=False, running={})
    values.update(kw)
    return SimpleNamespace(snapshot=SimpleNamespace(**values))


def task(type_="llm.chat", run_after=100.0, started_at=100.25, created_at=99.0):
    return SimpleNamespace(type=type_, run_after=run_after, started_at=started_at,
                           created_at=created_at)


def scrape(metrics: Metrics) -> dict:
    """{(name, frozenset(labels)): value} of every sample."""
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def bound():
    metrics = Metrics()
    store = FakeStore()
    sup = fake_sup()
    metrics.bind(sup, FakeDatabase(store))
    return metrics, store, sup


def test_finished_attempts_feed_counters_and_histograms():
    metrics = Metrics()
    metrics("claimed", {"task": task()})
    end = AttemptEnd(Outcome.SUCCEEDED, wall_s=1.5, peak_rss_bytes=300 * MIB)
    metrics("finished", {"task": task(), "end": end, "child": None})
    metrics("finished", {"task": task(), "end": AttemptEnd(Outcome.TIMEOUT, wall_s=4000.0),
                         "child": None})
    metrics("expired", {"task": task()})
    metrics("forkserver_restarted", {"pid": 5})
    metrics("stopping", {"fast": False})  # events without metrics are ignored
    s = scrape(metrics)
    assert value(s, "taskvisor_task_attempts_total", type="llm.chat", outcome="succeeded") == 1
    assert value(s, "taskvisor_task_attempts_total", type="llm.chat", outcome="timeout") == 1
    assert value(s, "taskvisor_task_queue_wait_seconds_count", type="llm.chat") == 1
    assert value(s, "taskvisor_task_queue_wait_seconds_sum", type="llm.chat") == pytest.approx(0.25)
    assert value(s, "taskvisor_task_duration_seconds_bucket", type="llm.chat", le="2.5") == 1
    assert value(s, "taskvisor_task_duration_seconds_bucket", type="llm.chat", le="+Inf") == 2
    assert value(s, "taskvisor_task_peak_rss_bytes_count", type="llm.chat") == 1
    assert value(s, "taskvisor_leases_expired_total") == 1
    assert value(s, "taskvisor_forkserver_restarts_total") == 1
    assert not any(name.endswith("_created") for name, _ in s)


def test_buckets_span_5ms_to_an_hour_and_1mib_to_32gib():
    assert DURATION_BUCKETS[0] == 0.005 and DURATION_BUCKETS[-1] == 3600
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)
    assert RSS_BUCKETS[0] == MIB and RSS_BUCKETS[-1] == 32 * 1024 * MIB


def test_a_loop_step_that_raised_is_counted_by_step():
    metrics = Metrics()
    metrics("step_failed", {"step": "sync", "error": "RuntimeError()"})
    metrics("step_failed", {"step": "sync", "error": "RuntimeError()"})
    assert value(scrape(metrics), "taskvisor_loop_step_failures_total", step="sync") == 2


def test_a_task_claimed_before_it_was_due_counts_zero_wait():
    metrics = Metrics()
    metrics("claimed", {"task": task(run_after=200.0, started_at=199.0)})
    s = scrape(metrics)
    assert value(s, "taskvisor_task_queue_wait_seconds_sum", type="llm.chat") == 0


def test_loop_gauges_and_build_info_come_from_the_supervisor(bound):
    metrics, store, sup = bound
    sup.snapshot.busy = 2
    sup.snapshot.last_loop_at = 1_800_000_000.5
    store.reserved_mb = 512
    s = scrape(metrics)
    assert value(s, "taskvisor_workers_busy") == 2
    assert value(s, "taskvisor_pool_size") == 4
    assert value(s, "taskvisor_supervisor_last_loop_timestamp_seconds") == 1_800_000_000.5
    assert value(s, "taskvisor_memory_reserved_bytes") == 512 * MIB
    from supervisor import __version__
    assert value(s, "taskvisor_build_info", version=__version__) == 1
    assert value(s, "process_resident_memory_bytes") > 0


def test_task_gauges_have_every_status_and_the_oldest_queued(bound):
    metrics, store, _ = bound
    store.counts = {"queued": {"a": 3}, "failed": {"a": 1, "b": 2}}
    store.oldest = {"a": 1234.5}
    s = scrape(metrics)
    assert value(s, "taskvisor_tasks", status="queued", type="a") == 3
    assert value(s, "taskvisor_tasks", status="running", type="a") == 0
    assert value(s, "taskvisor_tasks", status="blocked", type="b") == 0
    assert value(s, "taskvisor_tasks", status="failed", type="b") == 2
    assert value(s, "taskvisor_oldest_queued_task_timestamp_seconds", type="a") == 1234.5
    assert value(s, "taskvisor_oldest_queued_task_timestamp_seconds", type="b") is None


def test_enqueued_total_counts_growth_from_the_start_and_never_goes_back():
    metrics, store, sup = Metrics(), FakeStore(), fake_sup()
    store.counts = {"succeeded": {"a": 10}}          # before the supervisor started
    metrics.bind(sup, FakeDatabase(store))
    assert value(scrape(metrics), "taskvisor_tasks_enqueued_total", type="a") is None
    store.counts = {"succeeded": {"a": 10}, "queued": {"a": 2, "b": 1}}
    s = scrape(metrics)
    assert value(s, "taskvisor_tasks_enqueued_total", type="a") == 2
    assert value(s, "taskvisor_tasks_enqueued_total", type="b") == 1
    store.counts = {"queued": {"a": 2, "b": 1}}       # prune removed the 10 finished ones
    s = scrape(metrics)
    assert value(s, "taskvisor_tasks_enqueued_total", type="a") == 2
    store.counts = {"queued": {"a": 5, "b": 1}}
    assert value(scrape(metrics), "taskvisor_tasks_enqueued_total", type="a") == 5


def test_a_database_failure_leaves_queue_metrics_out_but_the_scrape_works(bound):
    metrics, store, _ = bound
    store.counts = {"queued": {"a": 1}}
    store.down = True
    s = scrape(metrics)
    assert value(s, "taskvisor_pool_size") == 4
    assert not any(name == "taskvisor_tasks" for name, _ in s)


def test_type_labels_are_capped():
    labels = TypeLabels(limit=3)
    assert [labels(t) for t in "abcde"] == ["a", "b", "c", OTHER_TYPE, OTHER_TYPE]
    assert labels("a") == "a"
    metrics = Metrics()
    for n in range(MAX_TYPES + 20):
        metrics("finished", {"task": task(f"t{n}"), "end": AttemptEnd(Outcome.ERROR), "child": None})
    s = scrape(metrics)
    types = {dict(labels)["type"] for name, labels in s if name == "taskvisor_task_attempts_total"}
    assert len(types) == MAX_TYPES + 1 and OTHER_TYPE in types
    assert value(s, "taskvisor_task_attempts_total", type=OTHER_TYPE, outcome="error") == 20


def test_fanout_calls_every_sink_even_when_one_fails():
    seen = []

    def broken(name, fields):
        raise RuntimeError("observer bug")
    sink = fanout(broken, None, lambda name, fields: seen.append(name))
    sink("claimed", {})
    assert seen == ["claimed"]
    assert fanout(None) is None
    only = seen.append
    assert fanout(only, None) is only


def test_health_is_ok_when_the_loop_is_recent_and_the_database_answers():
    store = FakeStore()
    code, body = health(fake_sup(last_loop_at=1000.0), FakeDatabase(store), now=1001.0)
    assert code == 200 and body["status"] == "ok" and body["reasons"] == []
    assert body["loop_age_s"] == 1.0


@pytest.mark.parametrize("sup, down, reason", [
    (fake_sup(last_loop_at=0.0), False, "has not started"),
    (fake_sup(last_loop_at=990.0), False, "last ran 11.0s ago"),
    (fake_sup(last_loop_at=1000.0), True, "database does not answer"),
    (fake_sup(last_loop_at=1000.0, store_ok=False), False, "write failed"),
])
def test_health_is_503_with_the_reason(sup, down, reason):
    store = FakeStore()
    store.down = down
    code, body = health(sup, FakeDatabase(store), now=1001.0)
    assert code == 503 and body["status"] == "unhealthy"
    assert any(reason in r for r in body["reasons"]), body["reasons"]


def test_health_allows_three_poll_intervals_when_they_are_long():
    sup = fake_sup(last_loop_at=1000.0)
    sup.snapshot.config.supervisor.poll_interval_s = 10.0
    assert health(sup, FakeDatabase(FakeStore()), now=1025.0)[0] == 200
    assert health(sup, FakeDatabase(FakeStore()), now=1031.0)[0] == 503


def test_limit_gauges_show_what_each_key_has_left_and_how_long_tasks_wait(bound):
    metrics, store, sup = bound
    now = time.time()
    store.limits = [
        {"key": "openai", "limit": "openai", "available": {"requests": 7.5, "tokens": -120,
         "concurrency": 3}, "paused_until": None, "waiting": 4, "oldest_waiting_at": now - 30},
        {"key": "tenant:1", "limit": "tenant:*", "available": {"requests": None,
         "tokens": None, "concurrency": 1}, "paused_until": now + 9, "waiting": 0,
         "oldest_waiting_at": None}]
    s = scrape(metrics)
    assert s[("taskvisor_limit_available", frozenset({("kind", "requests"), ("limit", "openai")}))] == 7.5
    assert s[("taskvisor_limit_available", frozenset({("kind", "tokens"), ("limit", "openai")}))] == -120
    assert s[("taskvisor_limit_available", frozenset({("kind", "concurrency"), ("limit", "tenant:1")}))] == 0
    assert 29 <= s[("taskvisor_limit_wait_seconds", frozenset({("limit", "openai")}))] <= 40
    assert s[("taskvisor_limit_wait_seconds", frozenset({("limit", "tenant:1")}))] == 0
    assert s[("taskvisor_limit_waiting_tasks", frozenset({("limit", "openai")}))] == 4
