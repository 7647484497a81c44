"""A Hypothesis state machine over the store, checked against a plain model of the rules.

Rules drive enqueue (priority, delay, dedupe key, dependencies on existing tasks), claim
(with and without a type cap), complete, fail (every outcome, retryable or not), stale
writes, expire (leases run out, or an owner is declared dead), cancel, retry and the
clock. After every step the whole file is compared with the model: each task's status,
attempts, run_after, lease owner, cancel flag and outcome; the claim order of the queued
tasks; and the dependency invariants.

Backoff(initial_s=1, max_s=1) makes every retry delay exactly 1 s (2^(n-1) + jitter,
capped at 1), so the model can predict run_after without sleeping or seeding random.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from supervisor.errors import InputError
from supervisor.policy import Backoff
from supervisor.store import AttemptEnd, Lease, Outcome, Status, Store, new_id
from tests.store.factory import T0, dependency_violations, new

LEASE_S = 10.0
BACKOFF = Backoff(initial_s=1.0, max_s=1.0)
RETRY_DELAY_S = 1.0

# Two retry bugs (see test_operations.py: test_retry_does_not_strand_* and
# test_retry_when_another_task_now_holds_the_dedupe_key) leave tasks blocked forever or
# raise a bare StoreError. Until they are fixed the machine only retries tasks where the
# current and the fixed rules agree; set this to True after the fix and the model checks
# the fixed rules everywhere (retry refused while a dependency is failed/cancelled or the
# dedupe key is held; dependents with another broken dependency stay failed).
RETRY_ANY = True

WAITING = {"blocked", "queued"}
UNFINISHED = {"blocked", "queued", "running"}
BROKEN = {"failed", "cancelled"}
DEP_ERROR = re.compile(r"dependency (\S+) (failed|cancelled)")


@dataclass
class M:
    """The model of one task."""
    id: str
    seq: int
    type: str
    priority: int
    max_attempts: int
    deps: tuple[str, ...]
    dedupe_key: str | None
    status: str
    run_after: float
    attempts: int = 0
    owner: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    outcome: str | None = None


class Model:
    def __init__(self):
        self.tasks: dict[str, M] = {}
        self.seq = itertools.count()

    def dependents(self, task_id: str) -> list[M]:
        return [t for t in self.tasks.values() if task_id in t.deps]

    def holder(self, key: str | None, but: str | None = None) -> str | None:
        if key is None:
            return None
        return next((t.id for t in self.tasks.values()
                     if t.dedupe_key == key and t.status in UNFINISHED and t.id != but), None)

    def claim_order(self) -> list[str]:
        queued = [t for t in self.tasks.values() if t.status == "queued"]
        return [t.id for t in sorted(queued, key=lambda t: (-t.priority, t.seq))]

    def next_claim(self, now: float, caps: dict[str, int]) -> str | None:
        running = [t.type for t in self.tasks.values() if t.status == "running"]
        full = {k for k, cap in caps.items() if running.count(k) >= cap}
        for task_id in self.claim_order():
            t = self.tasks[task_id]
            if t.run_after <= now and t.type not in full:
                return task_id
        return None

    def fail_dependents(self, task_id: str) -> None:
        pending = [task_id]
        while pending:
            for d in self.dependents(pending.pop()):
                if d.status in WAITING:
                    d.status, d.outcome = "failed", "dependency_failed"
                    pending.append(d.id)

    def unblock_dependents(self, task_id: str) -> None:
        for d in self.dependents(task_id):
            if d.status == "blocked" and all(self.tasks[x].status == "succeeded" for x in d.deps):
                d.status = "queued"

    def end_attempt(self, t: M, outcome: Outcome, retryable: bool, now: float,
                    delay_s: float | None) -> str:
        """What store.fail does, per policy.after_failure; returns the new status."""
        t.owner = t.lease_expires_at = None
        t.outcome = str(outcome)
        if outcome is Outcome.CANCELLED or t.cancel_requested:
            t.status = "cancelled"
            self.fail_dependents(t.id)
        elif outcome in (Outcome.INTERRUPTED, Outcome.RESCHEDULED):
            t.status, t.attempts, t.run_after = "queued", t.attempts - 1, now + max(0.0, delay_s or 0.0)
        elif retryable and t.attempts < t.max_attempts:
            t.status, t.run_after = "queued", now + RETRY_DELAY_S
        else:
            t.status = "failed"
            self.fail_dependents(t.id)
        return t.status

    def retry(self, task_id: str, now: float, *, fixed: bool) -> str:
        """What store.retry does (fixed=False: as the code is today; True: as it should)."""
        t = self.tasks[task_id]
        if t.status not in BROKEN:
            raise InputError("only failed or cancelled")
        if fixed and (any(self.tasks[d].status in BROKEN for d in t.deps) or self.holder(t.dedupe_key, task_id)):
            raise InputError("refused")
        waiting = any(self.tasks[d].status != "succeeded" for d in t.deps)
        t.status = "blocked" if waiting else "queued"
        t.attempts, t.run_after, t.cancel_requested, t.outcome = 0, now, False, None
        pending = [task_id]
        while pending:
            for d in self.dependents(pending.pop()):
                if d.status != "failed" or d.outcome != "dependency_failed":
                    continue
                if fixed and (any(self.tasks[x].status in BROKEN for x in d.deps)
                              or self.holder(d.dedupe_key, d.id)):
                    continue
                d.status, d.outcome = "blocked", None
                pending.append(d.id)
        return t.status

    def retry_is_safe(self, task_id: str, now: float) -> bool:
        """True when today's retry leaves no stranded task and no dedupe clash."""
        trial = copy.deepcopy(self)
        trial.retry(task_id, now, fixed=False)
        for t in trial.tasks.values():
            if t.status in UNFINISHED and any(trial.tasks[d].status in BROKEN for d in t.deps):
                return False
        keys = [t.dedupe_key for t in trial.tasks.values() if t.dedupe_key and t.status in UNFINISHED]
        return len(keys) == len(set(keys))


SPEC = st.fixed_dictionaries({
    "type": st.sampled_from(["x", "y"]), "priority": st.integers(-2, 2),
    "max_attempts": st.integers(1, 3), "delay": st.sampled_from([0.0, 0.0, 2.0]),
    "key": st.sampled_from([None, None, None, "k1", "k2"])})


class StoreMachine(RuleBasedStateMachine):
    folder = None  # set by the test: a tmp_path
    counter = itertools.count()

    def __init__(self):
        super().__init__()
        self.path = self.folder / f"machine-{next(self.counter)}.db"
        self.store = Store(self.path)
        self.model = Model()
        self.now = T0

    def teardown(self):
        self.store.close()
        for suffix in ("", "-wal", "-shm"):
            try:
                (self.folder / f"{self.path.name}{suffix}").unlink()
            except FileNotFoundError:
                pass

    # -- helpers --------------------------------------------------------------------------

    def ids(self, *statuses: str) -> list[str]:
        return sorted(t.id for t in self.model.tasks.values() if not statuses or t.status in statuses)

    def lease(self, task_id: str) -> Lease:
        t = self.model.tasks[task_id]
        return Lease(task_id, t.attempts, t.owner)

    def add_to_model(self, task_id: str, spec: dict) -> None:
        """Record a task the store just accepted (not deduped) as the rules say it starts."""
        assert task_id not in self.model.tasks
        assert all(task_id > other for other in self.model.tasks), "ids not in enqueue order (FIFO)"
        deps = tuple(dict.fromkeys(spec["deps"]))
        statuses = [self.model.tasks[d].status for d in deps]
        if any(s in BROKEN for s in statuses):
            status, outcome = "failed", "dependency_failed"
        elif any(s != "succeeded" for s in statuses):
            status, outcome = "blocked", None
        else:
            status, outcome = "queued", None
        self.model.tasks[task_id] = M(task_id, next(self.model.seq), spec["type"], spec["priority"],
                                      spec["max_attempts"], deps, spec["key"], status,
                                      self.now + spec["delay"], outcome=outcome)

    @staticmethod
    def to_new(spec: dict, now: float, **extra):
        return new(type=spec["type"], priority=spec["priority"], max_attempts=spec["max_attempts"],
                   run_after=now + spec["delay"], dedupe_key=spec["key"], depends_on=spec["deps"], **extra)

    # -- rules --------------------------------------------------------------------------------

    @initialize(data=st.data(), size=st.integers(1, 6))
    def enqueue_batch(self, data, size):
        """Start from one enqueue_many whose tasks may wait on earlier ones by explicit id."""
        ids = [new_id(self.now) for _ in range(size)]
        specs = []
        for i in range(size):
            spec = data.draw(SPEC, label=f"task {i}")
            spec["deps"] = data.draw(st.lists(st.sampled_from(ids[:i]), max_size=2), label="deps") if i else []
            spec["key"] = None
            specs.append(spec)
        got = self.store.enqueue_many([self.to_new(s, self.now, id=i) for s, i in zip(specs, ids)], self.now)
        assert got == ids
        for task_id, spec in zip(ids, specs):
            self.add_to_model(task_id, spec)

    @rule(data=st.data())
    def enqueue(self, data):
        spec = data.draw(SPEC, label="task")
        existing = self.ids()
        spec["deps"] = data.draw(st.lists(st.sampled_from(existing), max_size=3), label="deps") if existing else []
        task_id = self.store.enqueue(self.to_new(spec, self.now), self.now)
        holder = self.model.holder(spec["key"])
        if holder:
            assert task_id == holder
        else:
            self.add_to_model(task_id, spec)

    @precondition(lambda self: self.ids("queued"))
    @rule(owner=st.sampled_from(["a", "b"]), capped=st.booleans())
    def claim(self, owner, capped):
        caps = {"x": 1} if capped else {}
        expected = self.model.next_claim(self.now, caps)
        task = self.store.claim(owner, self.now, lease_s=LEASE_S, caps=caps)
        assert (task and task.id) == expected
        if task:
            t = self.model.tasks[task.id]
            t.status, t.attempts, t.owner = "running", t.attempts + 1, owner
            t.lease_expires_at = self.now + LEASE_S
            assert (task.attempts, task.lease_owner) == (t.attempts, owner)

    @precondition(lambda self: self.ids("running"))
    @rule(data=st.data())
    def complete(self, data):
        task_id = data.draw(st.sampled_from(self.ids("running")), label="task")
        assert self.store.complete(self.lease(task_id), AttemptEnd(Outcome.SUCCEEDED), self.now) is True
        t = self.model.tasks[task_id]
        t.status, t.owner, t.lease_expires_at, t.outcome = "succeeded", None, None, "succeeded"
        self.model.unblock_dependents(task_id)

    @precondition(lambda self: self.ids("running"))
    @rule(data=st.data(), retryable=st.booleans(), outcome=st.sampled_from([
        Outcome.ERROR, Outcome.TIMEOUT, Outcome.CRASHED, Outcome.MEMORY_LIMIT,
        Outcome.CANCELLED, Outcome.INTERRUPTED, Outcome.RESCHEDULED]))
    def fail(self, data, retryable, outcome):
        task_id = data.draw(st.sampled_from(self.ids("running")), label="task")
        delay = 2.0 if outcome is Outcome.RESCHEDULED else None
        end = AttemptEnd(outcome, reason=f"{outcome} in the machine", retryable=retryable, delay_s=delay)
        got = self.store.fail(self.lease(task_id), end, self.now, BACKOFF)
        expected = self.model.end_attempt(self.model.tasks[task_id], outcome, retryable, self.now, delay)
        assert got == Status(expected)

    @precondition(lambda self: self.ids("running"))
    @rule(data=st.data(), how=st.sampled_from(["owner", "attempt"]))
    def stale_write(self, data, how):
        task_id = data.draw(st.sampled_from(self.ids("running")), label="task")
        lease = self.lease(task_id)
        stale = (Lease(task_id, lease.attempt, "intruder") if how == "owner"
                 else Lease(task_id, lease.attempt - 1, lease.owner))
        assert self.store.complete(stale, AttemptEnd(Outcome.SUCCEEDED), self.now) is False
        assert self.store.fail(stale, AttemptEnd(Outcome.ERROR), self.now, BACKOFF) is None

    @precondition(lambda self: self.ids("running"))
    @rule(dead=st.sampled_from([None, "a", "b"]))
    def expire(self, dead):
        if dead is None:
            self.now += LEASE_S + 1  # every lease held now runs out
        rescued = self.store.expire(self.now, BACKOFF, owners=[dead] if dead else [])
        expected = [t for t in self.model.tasks.values() if t.status == "running" and (
            t.lease_expires_at < self.now or t.owner == dead)]
        assert sorted(t.id for t in rescued) == sorted(t.id for t in expected)
        for t in expected:
            self.model.end_attempt(t, Outcome.LOST, True, self.now, None)

    @precondition(lambda self: self.model.tasks)
    @rule(data=st.data())
    def cancel(self, data):
        task_id = data.draw(st.sampled_from(self.ids()), label="task")
        got = self.store.cancel(task_id, self.now)
        t = self.model.tasks[task_id]
        if t.status in WAITING:
            t.status, t.outcome = "cancelled", "cancelled"
            self.model.fail_dependents(task_id)
        elif t.status == "running":
            t.cancel_requested = True
        assert got == Status(t.status)

    @precondition(lambda self: self.ids("failed", "cancelled"))
    @rule(data=st.data())
    def retry(self, data):
        candidates = self.ids("failed", "cancelled")
        if not RETRY_ANY:
            candidates = [i for i in candidates if self.model.retry_is_safe(i, self.now)]
            if not candidates:
                return
        task_id = data.draw(st.sampled_from(candidates), label="task")
        try:
            expected = self.model.retry(task_id, self.now, fixed=True)
        except InputError:
            with pytest.raises(InputError):
                self.store.retry(task_id, self.now)
            return
        assert self.store.retry(task_id, self.now) == Status(expected)

    @precondition(lambda self: self.model.tasks)
    @rule(data=st.data())
    def retry_unfinished_or_succeeded_is_refused(self, data):
        candidates = self.ids("blocked", "queued", "running", "succeeded")
        if candidates:
            with pytest.raises(InputError):
                self.store.retry(data.draw(st.sampled_from(candidates), label="task"), self.now)

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0]))
    def advance(self, seconds):
        self.now += seconds

    # -- checks after every step ------------------------------------------------------------------

    @invariant()
    def every_task_matches_the_model(self):
        rows = {t.id: t for t in self.store.list(limit=10_000)}
        assert set(rows) == set(self.model.tasks)
        for task_id, m in self.model.tasks.items():
            r = rows[task_id]
            got = (str(r.status), r.attempts, r.cancel_requested if m.status == "running" else None,
                   r.lease_owner, r.priority)
            want = (m.status, m.attempts, m.cancel_requested if m.status == "running" else None,
                    m.owner, m.priority)
            assert got == want, f"task {task_id}"
            assert set(r.depends_on) == set(m.deps)
            if m.status == "queued":
                assert r.run_after == m.run_after, f"run_after of {task_id}"
            if m.status == "running":
                assert r.lease_expires_at == m.lease_expires_at
            if m.status in ("succeeded", "failed", "cancelled"):
                assert r.outcome == m.outcome, f"outcome of {task_id}"
                assert r.completed_at is not None
            if m.outcome == "dependency_failed":
                named = DEP_ERROR.fullmatch(r.error or "")
                assert named and named.group(1) in m.deps, r.error

    @invariant()
    def claim_order_matches(self):
        assert [t.id for t in self.store.queued_in_order(limit=10_000)] == self.model.claim_order()

    @invariant()
    def dependencies_hold(self):
        assert dependency_violations(self.store) == []

    @invariant()
    def one_unfinished_holder_per_key(self):
        keys = [t.dedupe_key for t in self.store.list(limit=10_000)
                if t.dedupe_key and str(t.status) in UNFINISHED]
        assert len(keys) == len(set(keys))


@pytest.mark.timeout(300)
def test_store_follows_the_model(tmp_path):
    machine = type("Machine", (StoreMachine,), {"folder": tmp_path, "counter": itertools.count()})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=200, stateful_step_count=40, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
