"""Schedule fires and retention batches in the store, on a real SQLite file."""

from __future__ import annotations

import threading
import time

from supervisor.retention import Retention
from supervisor.store import Store
from tests.store.factory import LEASE_S, T0, error, new, ok
from supervisor.policy import Backoff


def test_a_fire_is_enqueued_once_however_many_stores_race_for_it(db_path):
    stores = [Store(db_path, busy_timeout_s=10) for _ in range(4)]
    stores[0].init_schedule("tick", T0)
    won: list[str | None] = []
    barrier = threading.Barrier(len(stores))

    def fire(store):
        barrier.wait()
        for k in range(1, 21):
            task = new("s.tick", schedule="tick", scheduled_for=T0 + k)
            won.append(store.fire_schedule("tick", T0 + k, T0 + k, task, T0 + k))
    threads = [threading.Thread(target=fire, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        tasks = stores[0].list(limit=1000)
        assert sorted(t.scheduled_for for t in tasks) == [T0 + k for k in range(1, 21)]
        assert sum(w is not None for w in won) == 20
        assert {t.schedule for t in tasks} == {"tick"}
        states, fires = stores[0].schedule_states()
        assert states["tick"] == (False, T0 + 20) and fires["tick"][0] == T0 + 20
    finally:
        for s in stores:
            s.close()


def test_a_paused_schedule_fires_nothing_and_resumes_from_now(store):
    store.init_schedule("tick", T0)
    store.set_schedule_paused("tick", True, T0 + 1)
    assert store.fire_schedule("tick", T0 + 2, T0 + 2, new("s"), T0 + 2) is None
    store.set_schedule_paused("tick", False, T0 + 10)
    assert store.schedule_states()[0]["tick"] == (False, T0 + 10)
    assert store.fire_schedule("tick", T0 + 5, T0 + 5, new("s"), T0 + 11) is None  # before resume
    assert store.fire_schedule("tick", T0 + 12, T0 + 12, new("s"), T0 + 12) is not None


def test_retention_deletes_only_old_finished_tasks_in_bounded_batches(store):
    backoff = Backoff(0, 0)
    old_ok = [store.enqueue(new(), T0) for _ in range(300)]
    for _ in old_ok:
        t = store.claim("sup", T0, lease_s=LEASE_S)
        store.complete(t.lease, ok(), T0 + 1)
    failed = store.enqueue(new(max_attempts=1), T0)
    t = store.claim("sup", T0, lease_s=LEASE_S)
    store.fail(t.lease, error(), T0 + 1, backoff)
    cancelled = store.enqueue(new(), T0)
    store.cancel(cancelled, T0 + 1)
    fresh = store.enqueue(new(), T0 + 50)
    t = store.claim("sup", T0 + 50, lease_s=LEASE_S)
    store.complete(t.lease, ok(), T0 + 51)
    waiting = store.enqueue(new(), T0)
    assert store.prune_batch(T0 + 10, 100) == 100  # at most the batch
    total = 100
    while (n := store.prune_batch(T0 + 10, 100)):
        total += n
    assert total == 302
    left = {t.id for t in store.list(limit=100)}
    assert left == {fresh, waiting}
    assert store.stats(T0 + 60).counts.get("succeeded") == {"t": 1}
    assert store.conn.db.execute("SELECT count(*) FROM attempts").fetchall()[0][0] == 1


def test_a_retention_step_holds_the_write_lock_for_milliseconds(db_path):
    """20,000 old finished tasks: every step is a small batch (the loop waits at most
    this long for it), and the steps delete all of them."""
    store = Store(db_path)
    try:
        ids = store.enqueue_many([new()] * 20_000, T0)
        with store.transaction():
            for _ in ids:
                t = store.claim("sup", T0, lease_s=LEASE_S)
                store.complete(t.lease, ok(), T0 + 1)
        retention = Retention()
        mono, steps = 0.0, 0
        while store.list(status="succeeded", limit=1):
            retention.step(store, 86400.0, T0 + 2 * 86400, mono)
            mono = retention.due_mono
            steps += 1
        assert retention.deleted == 20_000
        assert retention.longest_batch_s < 0.05, retention.longest_batch_s
        assert steps > 20  # small batches, not one big delete
        assert retention.due_mono - mono <= 60  # nothing left: next look within a minute
    finally:
        store.close()


def test_retention_forgets_limit_keys_idle_for_a_day(store):
    from supervisor.budget import LimitSpec, Limits
    limits = Limits({"tenant:*": LimitSpec("tenant:*", requests_per_minute=60)})
    store.enqueue(new(limit_keys=("tenant:old",)), T0)
    done = store.claim("sup", T0, lease_s=LEASE_S, limits=limits)
    store.complete(done.lease, ok(), T0 + 1)
    store.enqueue(new(limit_keys=("tenant:busy",)), T0)
    assert store.claim("sup", T0, lease_s=LEASE_S, limits=limits) is not None  # still running
    store.pause_limit("tenant:paused", T0 + 10 * 86400, "maintenance")
    # A debt longer than a day to repay (a task spent far more than its estimate): a
    # missing row would be a full bucket, so forgetting the key forgave the debt.
    store.conn.db.execute("INSERT INTO limit_state (key, tokens, updated_at) VALUES (?, ?, ?)",
                          ("tenant:owes", -5e6, T0))
    store.prune_batch(T0 - 1, 100, T0 + 2 * 86400)
    keys = {r[0] for r in store.conn.db.execute("SELECT key FROM limit_state")}
    assert keys == {"tenant:busy", "tenant:paused", "tenant:owes"}


def test_retention_keeps_a_limit_key_until_its_debt_is_repaid_and_never_longer(store):
    """A small debt (routine: a call over a second's share of tokens_per_minute, or a
    request bucket at -1e-10) is repaid within seconds: the row must go after a day idle
    like any other, or limit_state grows with every tenant ever seen. A debt that takes
    longer than a day stays until it is repaid; a key no limit names any more goes."""
    from supervisor.budget import LimitSpec, Limits
    limits = Limits({"tenant:*": LimitSpec("tenant:*", requests_per_minute=60,
                                           tokens_per_minute=600)})
    rows = {"tenant:small": (-1e-10, -10.0), "tenant:owes": (0.0, -5e6),
            "gone": (0.0, -5e6)}  # 5e6 tokens at 10 a second: about six days
    for key, (requests, tokens) in rows.items():
        store.conn.db.execute("INSERT INTO limit_state (key, requests, tokens, updated_at) "
                              "VALUES (?, ?, ?, ?)", (key, requests, tokens, T0))
    store.prune_batch(T0 - 1, 100, T0 + 2 * 86400, limits)
    keys = {r[0] for r in store.conn.db.execute("SELECT key FROM limit_state")}
    assert keys == {"tenant:owes"}
    store.prune_batch(T0 - 1, 100, T0 + 7 * 86400, limits)  # repaid by then
    assert not list(store.conn.db.execute("SELECT key FROM limit_state"))


def test_retention_deletes_sent_events_older_than_it_and_a_later_await_waits_again(store):
    store.send_event("old", '{"ok":true}', T0)
    store.send_event("recent", None, T0 + 50)
    store.prune_batch(T0 + 10, 100)
    names = {r[0] for r in store.conn.db.execute("SELECT name FROM events")}
    assert names == {"recent"}
    late = store.enqueue(new(await_event="old"), T0 + 60)
    assert store.get(late).status == "blocked"  # no longer released by the pruned send
    assert store.send_event("old", None, T0 + 61) == (True, [late])
    kept = store.enqueue(new(await_event="recent"), T0 + 60)
    assert store.get(kept).status == "queued"


def test_prune_on_demand_deletes_old_events_too(store):
    store.send_event("old", None, T0)
    store.send_event("recent", None, T0 + 50)
    store.prune(T0 + 10)
    assert {r[0] for r in store.conn.db.execute("SELECT name FROM events")} == {"recent"}


def test_retention_keeps_what_a_waiting_dependent_or_an_unfinished_workflow_needs(store):
    """A succeeded dependency whose dependent still waits (for an event, for another
    dependency), a failed one a run_on_failure dependent will read, and the root of a
    workflow with members still to run are kept however old; pruned once nothing needs
    them. Deleted, the dependent ran with its input missing from ctx.inputs, and the
    workflow's id named no workflow any more."""
    backoff = Backoff(0, 0)
    done = store.enqueue(new(), T0)
    t = store.claim("sup", T0, lease_s=LEASE_S)
    store.complete(t.lease, ok({"x": 1}), T0 + 1)
    broken = store.enqueue(new(max_attempts=1), T0)
    t = store.claim("sup", T0, lease_s=LEASE_S)
    store.fail(t.lease, error(), T0 + 1, backoff)
    root = store.enqueue(new(), T0)
    t = store.claim("sup", T0, lease_s=LEASE_S)
    store.complete(t.lease, ok(), T0 + 1)
    waiting = store.enqueue(new(depends_on=[done], await_event="approve"), T0 + 2)
    cleanup = store.enqueue(new(depends_on=[broken], run_on_failure=True,
                                await_event="approve"), T0 + 2)
    member = store.enqueue(new(workflow_id=root, await_event="approve"), T0 + 2)
    unneeded = store.enqueue(new(), T0)
    t = store.claim("sup", T0, lease_s=LEASE_S)
    store.complete(t.lease, ok(), T0 + 1)
    while store.prune_batch(T0 + 100, 100):
        pass
    kept = {t.id for t in store.list(limit=100)}
    assert {done, broken, root} <= kept and unneeded not in kept
    assert store.prune(T0 + 100) == 0  # on demand too
    store.send_event("approve", None, T0 + 200)
    claimed = {}
    while (t := store.claim("sup", T0 + 201, lease_s=LEASE_S)) is not None:
        claimed[t.id] = t
    assert claimed[waiting].context["inputs"] == {done: '{"x": 1}'}
    assert list(claimed[cleanup].context["inputs"]) == [broken]
    for t in claimed.values():
        store.complete(t.lease, ok(), T0 + 202)
    store.prune_batch(T0 + 100, 100)
    assert not {done, broken, root} & {t.id for t in store.list(limit=100)}
    assert {waiting, cleanup, member} <= {t.id for t in store.list(limit=100)}
