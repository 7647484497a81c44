"""Store operations one by one: enqueue, dedupe, the lease fence, fail and retry policy,
cancel, retry, dependencies, expire, prune, stats, list and the attempts history.

Each test runs against a real file in tmp_path and passes `now` explicitly (T0 + …).
"""

from __future__ import annotations

import apsw
import pytest

from supervisor.errors import DependencyError, InputError, NotFound, StoreError
from supervisor.policy import Backoff
from supervisor.store import AttemptEnd, Lease, Outcome, Status, Store
from tests.store.factory import LEASE_S, T0, dependency_violations, error, new, ok

BACKOFF = Backoff(initial_s=1.0, max_s=60.0)  # delay after attempt n: 2^(n-1) + U(0, 1), <= 60


def claim(store: Store, now: float = T0, owner: str = "o", **kw):
    task = store.claim(owner, now, lease_s=LEASE_S, **kw)
    assert task is not None, "nothing to claim"
    return task


def claim_id(store: Store, task_id: str, now: float = T0, owner: str = "o"):
    """Claim until `task_id` comes out (the others are put back as they were)."""
    task = claim(store, now, owner)
    assert task.id == task_id, f"claimed {task.id}, wanted {task_id}"
    return task


def count(store: Store, sql: str, *args) -> int:
    return store.conn.db.execute(sql, args).fetchall()[0][0]


# -- enqueue -------------------------------------------------------------------------------

def test_enqueue_stores_every_field(store):
    task_id = store.enqueue(new(type="embed", payload={"file": "a.txt"}, priority=3, timeout_s=9.5,
                                memory_mb=256, cpu_s=4.0, max_attempts=5), T0)
    task = store.get(task_id)
    assert len(task_id) == 26
    assert (task.type, task.payload, task.priority, task.status) == ("embed", {"file": "a.txt"}, 3, Status.QUEUED)
    assert (task.created_at, task.run_after, task.started_at, task.completed_at) == (T0, T0, None, None)
    assert (task.attempts, task.max_attempts, task.timeout_s, task.memory_mb, task.cpu_s) == (0, 5, 9.5, 256, 4.0)
    assert (task.lease_owner, task.result, task.error, task.outcome, task.history) == (None, None, None, None, ())


def test_enqueue_with_run_after_in_the_future(store):
    task_id = store.enqueue(new(run_after=T0 + 90), T0)
    assert store.get(task_id).run_after == T0 + 90


def test_enqueue_many_is_all_or_nothing_on_a_bad_dependency(store):
    before = store.enqueue(new(), T0)
    batch = [new(payload={"i": i}) for i in range(100)] + [new(depends_on=["01NOSUCHTASK"])]
    with pytest.raises(DependencyError, match="01NOSUCHTASK"):
        store.enqueue_many(batch, T0)
    assert [t.id for t in store.list(limit=1000)] == [before]
    assert count(store, "SELECT count(*) FROM task_deps") == 0


def test_enqueue_many_is_all_or_nothing_on_a_failing_insert(store):
    taken = store.enqueue(new(id="01TAKEN"), T0)
    with pytest.raises(StoreError):
        store.enqueue_many([new(payload={"i": 1}), new(id=taken)], T0)
    assert [t.id for t in store.list()] == [taken]


def test_in_batch_dependencies_by_explicit_id_in_any_order(store):
    ids = store.enqueue_many([
        new(id="c", depends_on=["b"]),  # listed before what it waits on
        new(id="b", depends_on=["a"]),
        new(id="a"),
        new(id="d", depends_on=["a", "c"]),
    ], T0)
    assert ids == ["c", "b", "a", "d"]
    assert {i: store.get(i).status for i in ids} == {
        "a": Status.QUEUED, "b": Status.BLOCKED, "c": Status.BLOCKED, "d": Status.BLOCKED}
    assert store.get("d").depends_on == ("a", "c")


def test_duplicate_dependencies_are_stored_once(store):
    a = store.enqueue(new(), T0)
    b = store.enqueue(new(depends_on=[a, a]), T0)
    assert store.get(b).depends_on == (a,)


@pytest.mark.parametrize("batch", [
    [new(id="a", depends_on=["b"]), new(id="b", depends_on=["a"])],
    [new(id="a", depends_on=["c"]), new(id="b", depends_on=["a"]), new(id="c", depends_on=["b"])],
    [new(id="x"), new(id="a", depends_on=["x", "b"]), new(id="b", depends_on=["a"])],
])
def test_a_cycle_is_refused_and_nothing_written(store, batch):
    with pytest.raises(DependencyError, match="cycle"):
        store.enqueue_many(batch, T0)
    assert store.list() == []


def test_self_dependency_is_refused(store):
    with pytest.raises(DependencyError, match="depends on itself"):
        store.enqueue(new(id="me", depends_on=["me"]), T0)
    assert store.list() == []


def test_unknown_dependency_is_refused_naming_it(store):
    known = store.enqueue(new(), T0)
    with pytest.raises(DependencyError, match="unknown task 01GHOST") as info:
        store.enqueue(new(depends_on=[known, "01GHOST"]), T0)
    assert info.value.field == "depends_on"
    assert len(store.list()) == 1


def test_dependency_on_a_finished_task(store):
    good = store.enqueue(new(), T0)
    store.complete(claim(store).lease, ok(), T0)
    bad = store.enqueue(new(max_attempts=1), T0)
    store.fail(claim(store).lease, error(), T0, BACKOFF)
    gone = store.enqueue(new(), T0)
    store.cancel(gone, T0)
    assert store.get(store.enqueue(new(depends_on=[good]), T0 + 1)).status is Status.QUEUED
    for dep, word in ((bad, "failed"), (gone, "cancelled")):
        task = store.get(store.enqueue(new(depends_on=[good, dep]), T0 + 1))
        assert (task.status, task.outcome, task.completed_at) == (Status.FAILED, "dependency_failed", T0 + 1)
        assert task.error == f"dependency {dep} {word}"


# -- dedupe -------------------------------------------------------------------------------------

def test_dedupe_key_returns_the_unfinished_holder_then_allows_a_new_task(store):
    first = store.enqueue(new(dedupe_key="sync:42"), T0)
    assert store.enqueue(new(dedupe_key="sync:42", payload={"other": 1}), T0) == first
    task = claim(store)
    assert store.enqueue(new(dedupe_key="sync:42"), T0) == first  # running still holds it
    assert store.enqueue_many([new(dedupe_key="sync:42"), new(dedupe_key="other")], T0)[0] == first
    store.complete(task.lease, ok(), T0 + 1)
    second = store.enqueue(new(dedupe_key="sync:42"), T0 + 2)
    assert second != first
    assert store.get(first).payload == {}  # the holder was never overwritten
    assert store.enqueue(new(dedupe_key="sync:42"), T0 + 3) == second


def test_dedupe_within_one_batch(store):
    ids = store.enqueue_many([new(dedupe_key="k"), new(dedupe_key="k"), new()], T0)
    assert ids[0] == ids[1] != ids[2]
    assert len(store.list()) == 2


def test_dedupe_holder_may_be_blocked(store):
    dep = store.enqueue(new(), T0)
    held = store.enqueue(new(dedupe_key="k", depends_on=[dep]), T0)
    assert store.enqueue(new(dedupe_key="k"), T0) == held


def test_a_batch_task_may_depend_on_an_explicit_id_that_deduped_to_the_holder(store):
    """A batch task naming the explicit id of a batch member that deduped to an existing
    holder waits on that holder (it used to be refused as 'unknown task')."""
    holder = store.enqueue(new(dedupe_key="fetch:1"), T0)
    ids = store.enqueue_many([new(id="fetch", dedupe_key="fetch:1"),
                              new(id="parse", depends_on=["fetch"])], T0)
    assert ids == [holder, "parse"]
    assert store.get("parse").depends_on == (holder,)


# -- the lease fence -----------------------------------------------------------------------------

def test_writes_with_a_wrong_owner_or_a_stale_attempt_change_nothing(store):
    task_id = store.enqueue(new(), T0)
    task = claim(store, owner="sup-1")
    before = store.get(task_id)
    for lease in (Lease(task_id, task.attempts, "sup-2"), Lease(task_id, task.attempts - 1, "sup-1"),
                  Lease(task_id, task.attempts + 1, "sup-1"), Lease("01OTHER", task.attempts, "sup-1")):
        assert store.complete(lease, ok({"x": 1}), T0 + 1) is False
        assert store.fail(lease, error(), T0 + 1, BACKOFF) is None
        assert store.set_pid(lease, 4242, T0) is False
        assert store.set_progress([(lease, 0.5, "half")]) == 0
    after = store.get(task_id)
    assert after == before
    assert [(a.ended_at, a.pid) for a in after.history] == [(None, None)]
    assert store.complete(task.lease, ok({"x": 1}), T0 + 2) is True
    assert store.get(task_id).result == {"x": 1}


def test_a_stale_owner_cannot_write_after_its_lease_was_rescued(store):
    task_id = store.enqueue(new(), T0)
    old = claim(store, owner="sup-1")
    store.expire(T0 + LEASE_S + 1, BACKOFF)
    new_lease = claim(store, T0 + LEASE_S + 100, owner="sup-2").lease
    assert store.complete(old.lease, ok(), T0 + 200) is False
    assert store.fail(old.lease, error(), T0 + 200, BACKOFF) is None
    assert store.get(task_id).lease_owner == "sup-2"
    assert store.complete(new_lease, ok(), T0 + 201) is True
    assert store.complete(new_lease, ok(), T0 + 202) is False  # a second completion neither


def test_finished_task_ignores_every_attempt_write(store):
    store.enqueue(new(), T0)
    task = claim(store)
    assert store.complete(task.lease, ok(), T0 + 1)
    assert store.fail(task.lease, error(), T0 + 2, BACKOFF) is None
    assert store.get(task.id).status is Status.SUCCEEDED


def test_set_pid_progress_and_extend(store):
    a = store.enqueue(new(), T0)
    b = store.enqueue(new(), T0)
    ta, tb = claim(store, owner="mine"), claim(store, owner="theirs")
    assert store.set_pid(ta.lease, 1234, T0 + 0.5)
    assert store.set_progress([(ta.lease, 0.25, "a quarter"), (tb.lease, 0.5, None)]) == 2
    assert store.extend("mine", T0 + 10, LEASE_S) == {a: (1, False)}
    got = store.get(a)
    assert (got.pid, got.pid_started_at, got.progress, got.progress_message) == (1234, T0 + 0.5, 0.25, "a quarter")
    assert got.lease_expires_at == T0 + 10 + LEASE_S
    assert got.history[0].pid == 1234
    assert store.get(b).lease_expires_at == T0 + LEASE_S


# -- fail and the retry policy ----------------------------------------------------------------------

def test_fail_backs_off_exponentially_then_fails_for_good(store):
    task_id = store.enqueue(new(max_attempts=3), T0)
    now = T0
    for attempt, low in ((1, 1.0), (2, 2.0)):
        task = claim(store, now)
        assert task.attempts == attempt
        assert store.fail(task.lease, error(f"boom {attempt}"), now, BACKOFF) is Status.QUEUED
        got = store.get(task_id)
        assert now + low <= got.run_after <= now + low + 1.0  # 2^(n-1) + jitter up to 1 s
        assert (got.attempts, got.outcome, got.error, got.lease_owner) == (attempt, "error", f"boom {attempt}", None)
        assert store.claim("o", got.run_after - 0.001, lease_s=LEASE_S) is None
        now = got.run_after
    task = claim(store, now)
    assert store.fail(task.lease, error("boom 3"), now, BACKOFF) is Status.FAILED
    got = store.get(task_id)
    assert (got.status, got.attempts, got.completed_at, got.error) == (Status.FAILED, 3, now, "boom 3")
    assert [a.outcome for a in got.history] == ["error"] * 3
    assert store.claim("o", now + 10_000, lease_s=LEASE_S) is None


def test_a_non_retryable_failure_fails_at_once(store):
    task_id = store.enqueue(new(max_attempts=5), T0)
    task = claim(store)
    end = AttemptEnd(Outcome.MEMORY_LIMIT, reason="peak RSS 2.1 GiB over 2 GiB", retryable=False)
    assert store.fail(task.lease, end, T0, BACKOFF) is Status.FAILED
    got = store.get(task_id)
    assert (got.attempts, got.outcome, got.error) == (1, "memory_limit", "peak RSS 2.1 GiB over 2 GiB")


def test_reason_defaults_to_the_outcome(store):
    task_id = store.enqueue(new(max_attempts=1), T0)
    store.fail(claim(store).lease, AttemptEnd(Outcome.TIMEOUT), T0, BACKOFF)
    assert store.get(task_id).error == "timeout"


@pytest.mark.parametrize("outcome, delay_s, run_after", [
    (Outcome.INTERRUPTED, None, T0), (Outcome.RESCHEDULED, 30.0, T0 + 30)])
def test_interrupted_and_rescheduled_refund_the_attempt(store, outcome, delay_s, run_after):
    task_id = store.enqueue(new(max_attempts=1), T0)
    for _ in range(4):  # more times than max_attempts: a refund never spends one
        task = claim(store, run_after)
        assert task.attempts == 1
        end = AttemptEnd(outcome, reason=str(outcome), delay_s=delay_s)
        assert store.fail(task.lease, end, T0, BACKOFF) is Status.QUEUED
        got = store.get(task_id)
        assert (got.status, got.attempts, got.run_after, got.outcome) == (Status.QUEUED, 0, run_after, str(outcome))
    assert [a.outcome for a in store.get(task_id).history] == [str(outcome)] * 4


def test_an_attempt_lost_with_its_relay_is_counted_on_the_row_and_a_stale_one_is_not(store, db_path):
    """The count that sends a task's attempts to a process of their own
    (supervisor.children.ISOLATE_AFTER) is the row's: the next claim, by any supervisor
    of the file or after a restart, returns it."""
    task_id = store.enqueue(new(type="llm.chat", max_attempts=1), T0)
    lost = AttemptEnd(Outcome.INTERRUPTED, reason="its relay died", relay_lost=True)
    for n in (1, 2):
        task = claim(store)
        assert task.relay_losses == n - 1
        assert store.fail(task.lease, lost, T0, BACKOFF) is Status.QUEUED
        assert store.fail(task.lease, lost, T0, BACKOFF) is None  # stale: nothing counted
    other = Store(db_path)
    try:
        task = other.claim("another", T0, lease_s=LEASE_S)
        assert (task.id, task.relay_losses, task.attempts) == (task_id, 2, 1)
        # an interruption of another kind (a shutdown) is not counted
        other.fail(task.lease, AttemptEnd(Outcome.INTERRUPTED, reason="shutdown"), T0, BACKOFF)
        assert other.claim("another", T0, lease_s=LEASE_S).relay_losses == 2
    finally:
        other.close()


# -- cancel ---------------------------------------------------------------------------------------------

def test_cancel_queued_and_blocked_fails_their_dependents_naming_it(store):
    a = store.enqueue(new(), T0)
    b = store.enqueue(new(depends_on=[a]), T0)
    c = store.enqueue(new(depends_on=[b]), T0)
    other = store.enqueue(new(), T0)
    assert store.cancel(a, T0 + 1) is Status.CANCELLED
    got = {i: store.get(i) for i in (a, b, c, other)}
    assert (got[a].status, got[a].completed_at, got[a].outcome) == (Status.CANCELLED, T0 + 1, "cancelled")
    assert (got[b].status, got[b].outcome, got[b].error) == (Status.FAILED, "dependency_failed", f"dependency {a} cancelled")
    assert (got[c].status, got[c].error) == (Status.FAILED, f"dependency {b} failed")
    assert got[other].status is Status.QUEUED
    x = store.enqueue(new(), T0)
    y = store.enqueue(new(depends_on=[x]), T0)
    assert store.cancel(y, T0 + 2) is Status.CANCELLED  # a blocked one
    assert store.get(x).status is Status.QUEUED
    assert dependency_violations(store) == []


def test_cancel_running_marks_it_and_the_attempt_end_makes_it_cancelled(store):
    task_id = store.enqueue(new(max_attempts=5), T0)
    dependent = store.enqueue(new(depends_on=[task_id]), T0)
    task = claim(store, owner="sup")
    assert store.cancel(task_id, T0 + 1) is Status.RUNNING
    assert store.get(task_id).cancel_requested is True
    assert store.cancel_requests("sup") == [task_id]
    assert store.cancel_requests("someone-else") == []
    assert store.extend("sup", T0 + 2, LEASE_S) == {task_id: (1, True)}
    # The supervisor kills it; however the attempt ends, the task ends cancelled.
    end = AttemptEnd(Outcome.CRASHED, reason="killed by SIGTERM", signal="SIGTERM")
    assert store.fail(task.lease, end, T0 + 3, BACKOFF) is Status.CANCELLED
    got = store.get(task_id)
    assert (got.status, got.completed_at, got.attempts) == (Status.CANCELLED, T0 + 3, 1)
    assert got.error == "cancelled while running (killed by SIGTERM)"
    assert store.get(dependent).error == f"dependency {task_id} cancelled"


def test_cancelled_outcome_of_a_running_task(store):
    task_id = store.enqueue(new(), T0)
    task = claim(store)
    assert store.fail(task.lease, AttemptEnd(Outcome.CANCELLED, reason="cancelled by user"), T0, BACKOFF) is Status.CANCELLED
    assert store.get(task_id).error == "cancelled by user"


def test_cancel_of_a_finished_task_changes_nothing_and_unknown_raises(store):
    task_id = store.enqueue(new(), T0)
    store.complete(claim(store).lease, ok(), T0)
    assert store.cancel(task_id, T0 + 1) is Status.SUCCEEDED
    assert store.get(task_id).completed_at == T0
    with pytest.raises(NotFound):
        store.cancel("01NOPE", T0)


# -- retry ----------------------------------------------------------------------------------------------

def test_retry_failed_resets_attempts_and_reblocks_dependents_that_failed_because_of_it(store):
    a = store.enqueue(new(max_attempts=2), T0)
    b = store.enqueue(new(depends_on=[a]), T0)
    c = store.enqueue(new(depends_on=[b]), T0)
    for now in (T0, T0 + 10):
        store.fail(claim(store, now).lease, error(), now, Backoff(initial_s=1, max_s=1))
    assert [store.get(i).status for i in (a, b, c)] == [Status.FAILED] * 3
    assert store.retry(a, T0 + 20) is Status.QUEUED
    got = store.get(a)
    assert (got.status, got.attempts, got.run_after, got.completed_at, got.error, got.outcome) == (
        Status.QUEUED, 0, T0 + 20, None, None, None)
    assert len(got.history) == 2  # the history is kept
    assert [store.get(i).status for i in (b, c)] == [Status.BLOCKED] * 2
    # …and they run later, in dependency order.
    for task_id in (a, b, c):
        store.complete(claim_id(store, task_id, T0 + 21).lease, ok(), T0 + 21)
    assert [store.get(i).status for i in (a, b, c)] == [Status.SUCCEEDED] * 3


def test_retry_cancelled(store):
    task_id = store.enqueue(new(), T0)
    dependent = store.enqueue(new(depends_on=[task_id]), T0)
    store.cancel(task_id, T0)
    assert store.retry(task_id, T0 + 1) is Status.QUEUED
    assert store.get(dependent).status is Status.BLOCKED
    assert store.get(task_id).cancel_requested is False


def test_retry_refuses_unfinished_and_succeeded_and_unknown(store):
    queued = store.enqueue(new(), T0)
    with pytest.raises(InputError, match="only failed or cancelled"):
        store.retry(queued, T0)
    store.complete(claim(store).lease, ok(), T0)
    with pytest.raises(InputError, match="only failed or cancelled"):
        store.retry(queued, T0)
    with pytest.raises(NotFound):
        store.retry("01NOPE", T0)


def test_retry_does_not_strand_a_dependent_whose_other_dependency_failed(store):
    """BUG (reported): retrying A re-blocks every dependent that failed because of A, even
    one that also depends on X, which failed too and is not retried: that task then stays
    `blocked` forever (nothing will ever fail or unblock it)."""
    a = store.enqueue(new(type="a", max_attempts=1), T0)
    x = store.enqueue(new(type="x", max_attempts=1), T0)
    both = store.enqueue(new(depends_on=[a, x]), T0)
    for _ in range(2):
        store.fail(claim(store).lease, error(), T0, BACKOFF)
    assert store.get(both).status is Status.FAILED
    store.retry(a, T0 + 1)
    assert dependency_violations(store) == []
    store.complete(claim_id(store, a, T0 + 1).lease, ok(), T0 + 2)
    assert dependency_violations(store) == []
    assert store.get(both).status is Status.FAILED


def test_retry_of_a_task_whose_dependency_failed_does_not_strand_it(store):
    """BUG (reported): retrying B, which failed only because its dependency A failed, puts
    B in `blocked` while A is still failed: B waits forever. Retry should refuse (or leave
    B failed) until A is retried."""
    a = store.enqueue(new(max_attempts=1), T0)
    b = store.enqueue(new(depends_on=[a]), T0)
    store.fail(claim(store).lease, error(), T0, BACKOFF)
    try:
        store.retry(b, T0 + 1)
    except InputError:
        pass
    assert dependency_violations(store) == []


def test_retry_when_another_task_now_holds_the_dedupe_key(store):
    """Refused as an InputError naming the holder (it used to surface as a bare
    StoreError from the unique index)."""
    old = store.enqueue(new(dedupe_key="k", max_attempts=1), T0)
    store.fail(claim(store).lease, error(), T0, BACKOFF)
    holder = store.enqueue(new(dedupe_key="k"), T0 + 1)
    with pytest.raises(InputError, match=holder):
        store.retry(old, T0 + 2)
    assert store.get(old).status is Status.FAILED


def test_retry_when_a_dependent_s_dedupe_key_is_now_held_elsewhere(store):
    """BUG (reported): retrying A re-blocks B (failed because of A), but B's dedupe key is
    now held by C, enqueued meanwhile: the re-block hits the unique index and the whole
    retry fails with a bare StoreError (ConstraintError). A retry should go through and
    leave B failed (C does its work), or be refused with an InputError."""
    a = store.enqueue(new(max_attempts=1), T0)
    b = store.enqueue(new(dedupe_key="report", depends_on=[a]), T0)
    store.fail(claim(store).lease, error(), T0, BACKOFF)
    assert store.get(b).status is Status.FAILED
    c = store.enqueue(new(dedupe_key="report"), T0 + 1)
    assert c != b
    try:
        status = store.retry(a, T0 + 2)
    except InputError:
        assert store.get(a).status is Status.FAILED
    else:
        assert status is Status.QUEUED
        assert store.get(b).status is Status.FAILED
    assert dependency_violations(store) == []


# -- dependencies -------------------------------------------------------------------------------------

def test_dependency_chain_unblocks_step_by_step(store):
    a = store.enqueue(new(), T0)
    b = store.enqueue(new(depends_on=[a]), T0)
    c = store.enqueue(new(depends_on=[b]), T0)
    d = store.enqueue(new(depends_on=[b, c]), T0)  # diamond-ish: needs both
    for done, queued in ((a, [b]), (b, [c]), (c, [d]), (d, [])):
        assert [t.id for t in store.queued_in_order()] == [done]
        store.complete(claim_id(store, done).lease, ok(), T0 + 1)
        assert [t.id for t in store.queued_in_order()] == queued
        assert dependency_violations(store) == []


def test_failure_of_a_dependency_fails_the_whole_downstream(store):
    a = store.enqueue(new(max_attempts=1), T0)
    b = store.enqueue(new(depends_on=[a]), T0)
    c = store.enqueue(new(depends_on=[b]), T0)
    unrelated = store.enqueue(new(), T0)
    assert store.fail(claim_id(store, a).lease, error(), T0 + 1, BACKOFF) is Status.FAILED
    assert (store.get(b).error, store.get(c).error) == (f"dependency {a} failed", f"dependency {b} failed")
    assert (store.get(b).completed_at, store.get(c).outcome) == (T0 + 1, "dependency_failed")
    assert store.get(unrelated).status is Status.QUEUED


def test_a_retried_failure_does_not_fail_dependents(store):
    a = store.enqueue(new(max_attempts=2), T0)
    b = store.enqueue(new(depends_on=[a]), T0)
    assert store.fail(claim(store).lease, error(), T0, BACKOFF) is Status.QUEUED
    assert store.get(b).status is Status.BLOCKED


# -- expire -----------------------------------------------------------------------------------------------

def test_expire_rescues_an_expired_lease_as_lost_and_spends_the_attempt(store):
    task_id = store.enqueue(new(max_attempts=2), T0)
    task = claim(store, owner="crashed")
    store.set_pid(task.lease, 999, T0 + 0.1)
    assert store.expire(T0 + LEASE_S - 1, BACKOFF) == []
    rescued = store.expire(T0 + LEASE_S + 1, BACKOFF)
    assert [(t.id, t.pid, t.pid_started_at, t.lease_owner) for t in rescued] == [(task_id, 999, T0 + 0.1, "crashed")]
    got = store.get(task_id)
    assert (got.status, got.attempts, got.outcome, got.lease_owner) == (Status.QUEUED, 1, "lost", None)
    assert got.run_after >= T0 + LEASE_S + 1 + 1.0
    (attempt,) = got.history
    assert (attempt.outcome, attempt.ended_at, attempt.pid) == ("lost", T0 + LEASE_S + 1, 999)
    assert "lease expired" in attempt.reason
    # The second loss spends the last attempt: failed for good, dependents too.
    dependent = store.enqueue(new(depends_on=[task_id]), T0)
    claim(store, got.run_after, owner="crashed-again")
    assert len(store.expire(got.run_after + LEASE_S + 1, BACKOFF)) == 1
    got = store.get(task_id)
    assert (got.status, got.attempts, got.outcome) == (Status.FAILED, 2, "lost")
    assert store.get(dependent).status is Status.FAILED


def test_expire_with_dead_owners_rescues_before_the_lease_runs_out(store):
    dead_task = store.enqueue(new(), T0)
    live_task = store.enqueue(new(), T0)
    claim_id(store, dead_task, owner="dead")
    claim_id(store, live_task, owner="alive")
    rescued = store.expire(T0 + 1, BACKOFF, owners=["dead"])
    assert [t.id for t in rescued] == [dead_task]
    assert store.get(dead_task).history[0].reason == "lost: its supervisor is gone"
    assert store.get(dead_task).status is Status.QUEUED
    assert store.get(live_task).status is Status.RUNNING


def test_expire_of_a_cancel_requested_task_cancels_it(store):
    task_id = store.enqueue(new(), T0)
    claim(store)
    store.cancel(task_id, T0)
    store.expire(T0 + LEASE_S + 1, BACKOFF)
    assert store.get(task_id).status is Status.CANCELLED


def test_expire_calls_before_requeue_first_and_takes_a_backoff_per_type(store):
    fast = store.enqueue(new(type="fast", max_attempts=3), T0)
    slow = store.enqueue(new(type="slow", max_attempts=3), T0)
    claim(store)
    claim(store)
    seen = []

    def before_requeue(task):  # the supervisor kills leftovers here: the row is still running
        seen.append((task.id, store.get(task.id).status))

    per_type = {"fast": Backoff(initial_s=1, max_s=1), "slow": Backoff(initial_s=100, max_s=100)}
    now = T0 + LEASE_S + 1
    store.expire(now, per_type.__getitem__, before_requeue=before_requeue)
    assert sorted(seen) == sorted([(fast, Status.RUNNING), (slow, Status.RUNNING)])
    assert store.get(fast).run_after == now + 1
    assert store.get(slow).run_after == now + 100


# -- grouped transactions ------------------------------------------------------------------------------

def test_operations_in_one_transaction_commit_together(store, db_path):
    other = Store(db_path)
    try:
        with store.transaction():
            a = store.enqueue(new(), T0)
            task = claim(store)
            store.complete(task.lease, ok(), T0)
            b = store.enqueue(new(), T0)
            assert other.list() == []  # nothing visible before the one commit
        assert {t.id: t.status for t in other.list()} == {a: Status.SUCCEEDED, b: Status.QUEUED}
    finally:
        other.close()


def test_an_error_leaving_the_transaction_rolls_every_operation_back(store):
    with pytest.raises(RuntimeError), store.transaction():
        store.enqueue(new(), T0)
        store.enqueue(new(), T0)
        raise RuntimeError("the pass failed")
    assert store.list() == []
    store.enqueue(new(), T0)  # and the connection is usable again
    assert len(store.list()) == 1


def test_a_failed_operation_inside_a_transaction_writes_nothing(store):
    """BUG (reported): a write() nested in Store.transaction() just joins the outer
    transaction, so when an operation fails half-way and the caller handles the error
    inside the block, the half that ran is committed with the rest: here the first task
    of an enqueue_many that raised. Nested writes need a SAVEPOINT each."""
    taken = store.enqueue(new(id="01TAKEN"), T0)
    with store.transaction():
        kept = store.enqueue(new(payload={"kept": True}), T0)
        with pytest.raises((StoreError, apsw.Error)):  # which one: the test below
            store.enqueue_many([new(payload={"half": True}), new(id=taken)], T0)
    assert sorted(t.id for t in store.list()) == sorted([taken, kept])


def test_an_all_or_nothing_transaction_takes_no_savepoints_and_rolls_back_whole(store):
    """all_or_nothing=True (the supervisor's pass): nested operations open no savepoint
    (two statements less each), and a failure anywhere undoes the whole group; the next
    default transaction has its savepoints again."""
    taken = store.enqueue(new(id="01TAKEN"), T0)
    statements: list[str] = []

    def trace(cursor, sql, bindings):
        statements.append(sql)
        return True

    store.conn.db.exec_trace = trace
    try:
        with pytest.raises(StoreError), store.transaction(all_or_nothing=True):
            store.enqueue(new(payload={"first": True}), T0)
            store.complete(claim(store).lease, ok(), T0)
            store.enqueue_many([new(payload={"half": True}), new(id=taken)], T0)
        assert not [s for s in statements if "SAVEPOINT" in s.upper()]
        assert [t.id for t in store.list()] == [taken]  # nothing of the group is left
        assert store.get(taken).status is Status.QUEUED  # its claim was undone too
        lease = claim(store).lease
        statements.clear()
        with store.transaction():
            store.complete(lease, ok(), T0)
        assert [s for s in statements if "SAVEPOINT" in s.upper()]
    finally:
        store.conn.db.exec_trace = None


def test_an_operation_failing_inside_a_transaction_raises_a_store_error(store):
    """BUG (reported): the nested write() re-raises apsw's own exception untranslated
    (apsw.ConstraintError here), so `except StoreError` inside a transaction misses it."""
    taken = store.enqueue(new(id="01TAKEN"), T0)
    with pytest.raises(StoreError), store.transaction():
        try:
            store.enqueue_many([new(), new(id=taken)], T0)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - any other type is the bug
            pytest.fail(f"untranslated {type(exc).__module__}.{type(exc).__name__}: {exc}")


# -- prune, stats, list, history ---------------------------------------------------------------------------

def test_prune_removes_finished_tasks_older_than_the_cutoff_with_their_attempts(store):
    old_done = store.enqueue(new(), T0)
    store.complete(claim(store).lease, ok(), T0 + 1)
    old_failed = store.enqueue(new(max_attempts=1), T0)
    dependent = store.enqueue(new(depends_on=[old_failed]), T0)
    store.fail(claim(store).lease, error(), T0 + 2, BACKOFF)
    old_queued = store.enqueue(new(), T0)  # old but unfinished: kept
    recent = store.enqueue(new(), T0)
    store.complete(claim_id(store, old_queued).lease, ok(), T0 + 100)  # finished late: kept
    store.enqueue(new(), T0)
    assert count(store, "SELECT count(*) FROM attempts") == 3
    assert store.prune(T0 + 50) == 3  # old_done, old_failed and its failed dependent
    left = {t.id for t in store.list()}
    assert old_done not in left and old_failed not in left and dependent not in left
    assert {old_queued, recent} <= left and len(left) == 3
    assert count(store, "SELECT count(*) FROM attempts") == 1
    assert count(store, "SELECT count(*) FROM task_deps") == 0
    assert store.prune(T0 + 50) == 0


def test_stats(store):
    store.enqueue_many([new(type="a") for _ in range(3)], T0)
    store.enqueue(new(type="b", run_after=T0 + 500), T0 - 100)  # oldest, but not due
    store.enqueue(new(type="b"), T0 + 1)
    claim(store, T0 + 2, memory_budget_mb=1000, default_memory_mb=64)
    stats = store.stats(T0 + 2)
    assert stats.counts == {"queued": {"a": 2, "b": 2}, "running": {"a": 1}}
    assert stats.totals() == {"blocked": 0, "queued": 4, "running": 1, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert stats.oldest_queued_at == T0
    assert stats.oldest_queued_by_type == {"a": T0, "b": T0 + 1}
    assert stats.running_reserved_mb == 64
    assert stats.to_dict()["totals"]["queued"] == 4
    empty = Store(store.path + ".empty")
    try:
        assert empty.stats(T0).oldest_queued_at is None
    finally:
        empty.close()


@pytest.mark.parametrize("n_types", [3, 12])  # a column per type in one pass; GROUP BY past 8
def test_stats_count_queued_tasks_of_every_type(store, n_types):
    names = [f"type{i:02d}" for i in range(n_types)]
    for i, name in enumerate(names):
        store.enqueue_many([new(type=name) for _ in range(i + 1)], T0 + i)
        store.enqueue(new(type=name, run_after=T0 + 1000), T0 - 50)  # older, not due
    assert claim(store, T0 + 100).type == "type00"  # its only due task
    stats = store.stats(T0 + 100)
    assert stats.counts["queued"] == {name: i + 1 + (i > 0) for i, name in enumerate(names)}
    assert stats.counts["running"] == {"type00": 1}
    assert stats.oldest_queued_by_type == {name: T0 + i for i, name in enumerate(names) if i}
    assert stats.oldest_queued_at == T0 + 1
    # Once a type has nothing queued it leaves the queued counts (it stays known).
    store.cancel(store.list(status="queued", type="type00")[0].id, T0 + 101)
    assert "type00" not in store.stats(T0 + 101).counts["queued"]


def test_list_pages_newest_first_and_filters(store):
    ids = [store.enqueue(new(type="even" if i % 2 == 0 else "odd"), T0 + i) for i in range(25)]
    pages, before = [], None
    while page := store.list(limit=10, before=before):
        pages.append([t.id for t in page])
        before = page[-1].id
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [i for page in pages for i in page] == ids[::-1]
    assert [t.id for t in store.list(type="odd", limit=3)] == ids[23:18:-2]
    claim(store, T0 + 100)
    assert [t.id for t in store.list(status="running")] == [ids[0]]
    assert [t.id for t in store.list(status="queued", type="even", before=ids[5])] == [ids[4], ids[2]]


def test_attempts_history_records_outcome_reason_and_figures(store):
    task_id = store.enqueue(new(max_attempts=3), T0)
    first = claim(store, T0, owner="sup-a")
    store.set_pid(first.lease, 111, T0)
    err = {"type": "ValueError", "message": "bad input", "traceback": "Traceback …"}
    store.fail(first.lease, AttemptEnd(Outcome.ERROR, reason="ValueError: bad input", error=err,
                                       exit_code=1, peak_rss_bytes=50_000_000, cpu_s=0.25, wall_s=1.5),
               T0 + 1.5, Backoff(initial_s=1, max_s=1))
    second = claim(store, T0 + 10, owner="sup-b")
    store.fail(second.lease, AttemptEnd(Outcome.CRASHED, reason="killed by SIGKILL (out of memory?)",
                                        signal="SIGKILL", exit_code=None, pid=222, peak_rss_bytes=9_000_000_000,
                                        cpu_s=3.0, wall_s=4.0123456789), T0 + 14, Backoff(initial_s=1, max_s=1))
    third = claim(store, T0 + 20, owner="sup-a")
    store.complete(third.lease, ok({"answer": 42}, exit_code=0, pid=333, cpu_s=0.5, wall_s=2.0), T0 + 22)
    task = store.get(task_id)
    assert task.result == {"answer": 42}
    rows = [(a.attempt, a.owner, a.started_at, a.ended_at, a.outcome, a.reason, a.exit_code, a.signal,
             a.pid, a.peak_rss_bytes, a.cpu_s, a.wall_s) for a in task.history]
    assert rows == [
        (1, "sup-a", T0, T0 + 1.5, "error", "ValueError: bad input", 1, None, 111, 50_000_000, 0.25, 1.5),
        (2, "sup-b", T0 + 10, T0 + 14, "crashed", "killed by SIGKILL (out of memory?)", None, "SIGKILL",
         222, 9_000_000_000, 3.0, 4.012346),
        (3, "sup-a", T0 + 20, T0 + 22, "succeeded", None, 0, None, 333, None, 0.5, 2.0),
    ]
    assert task.history[0].error == err
    assert task.to_dict()["history"][1]["signal"] == "SIGKILL"
    assert store.get(task_id, history=False).history == ()
