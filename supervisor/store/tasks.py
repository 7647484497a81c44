"""The store's operations on tasks: each one transaction built from `queries` statements.

Owns the rules that must hold inside one transaction: dedupe, dependency checks and
cycles at enqueue, type caps and memory admission at claim, unblocking and failing
dependents, the lease fence on every write of an attempt. It never forks, never kills a
process and never decides a backoff itself (that is `policy`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import apsw

from supervisor import budget, policy
from supervisor.errors import DependencyError, NotFound
from supervisor.store import claim_queries as cq
from supervisor.store import flow
from supervisor.store.events import LiveOps
from supervisor.store import queries as q
from supervisor.store import workflow_queries as wq
from supervisor.store.checkpoint import Checkpointer
from supervisor.store.connection import Connection, translate
from supervisor.store.ids import new_id
from supervisor.store.migrate import migrate as _migrate
from supervisor.store.rows import (
    Attempt, AttemptEnd, Lease, NewTask, Outcome, Stats, Status, Task)
from supervisor.store.workflows import (
    WorkflowStore, check_workflows as _check_workflows, claim_context, fail_dependents,
    workflow_of)


class Store(WorkflowStore, flow.FlowOps, LiveOps):
    """Task state in one SQLite file. One instance per process and thread.

    Every method that changes state is one IMMEDIATE transaction; `now` (epoch seconds)
    is always the caller's. Raises StoreError subclasses; writes of an attempt return
    False when the lease no longer matches (the caller decides whether that is LeaseLost).
    """

    def __init__(self, path: str | os.PathLike, *, synchronous: str = "NORMAL",
                 busy_timeout_s: float = 5.0, migrate: bool = True, create: bool = True,
                 background_checkpoints: bool = False):
        from supervisor.store.migrate import latest_version
        self.conn = Connection(path, synchronous=synchronous, busy_timeout_s=busy_timeout_s,
                               create=create, max_version=latest_version())
        self.path = self.conn.path
        if migrate:
            _migrate(self.conn)
        self.checkpointer = None
        self._type_mb_cache: tuple[tuple, str] | None = None
        self._group_keys: dict[str, tuple[str, ...]] = {}
        # After a claim: seconds until the soonest limit it found without room has room
        # by time alone (a refill, a pause's end), or None.
        self.limit_room_s: float | None = None
        self._groups_seen = False  # did the last claim see limit groups with queued tasks?
        if background_checkpoints:
            # Call from the thread that owns this Store, after any fork it is to survive.
            # The thread checkpoints every second; the commit itself only does so past
            # 10,000 pages (40 MB), the safety net for a writer that never pauses (a
            # PASSIVE checkpoint from another connection never catches up with it, and the
            # WAL would grow without end). The file is truncated back to 64 MB after.
            self.conn.db.execute("PRAGMA wal_autocheckpoint=10000")
            self.conn.db.execute(f"PRAGMA journal_size_limit={64 * 1024 * 1024}")
            self.checkpointer = Checkpointer(self.path, busy_timeout_s=busy_timeout_s)
            self.checkpointer.start()

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stop()
        self.conn.close()

    def transaction(self, *, all_or_nothing: bool = False):
        """Group several operations into one IMMEDIATE transaction (one commit):
        `with store.transaction(): store.complete(...); store.fail(...)`. Each operation
        inside runs in a savepoint, so one that fails leaves nothing behind if the caller
        catches its error; `all_or_nothing=True` is for a caller that catches none inside:
        no savepoints, and any failure rolls the whole group back."""
        return self.conn.write(nested_savepoints=not all_or_nothing)

    # -- enqueue -----------------------------------------------------------------------

    def enqueue(self, task: NewTask, now: float) -> str:
        """Insert one task; returns its id (or the id of the unfinished task holding its key)."""
        if (task.depends_on or task.dedupe_key or task.workflow_id or task.await_event
                or task.parent_id or task.limit_keys or task.schedule):
            return self.enqueue_many([task], now)[0]
        # Nothing to read first: one INSERT is its own transaction (no BEGIN/COMMIT round).
        task_id = task.id or new_id(now)
        try:
            q.insert_queued_task(self.conn.db, task_id, task, now)
        except apsw.Error as exc:
            raise translate(exc, self.path) from exc
        return task_id

    def enqueue_many(self, tasks: Sequence[NewTask], now: float) -> list[str]:
        """Insert every task in one transaction: all or nothing.

        Tasks may name each other in depends_on (by their `id`); a missing dependency or a
        cycle raises DependencyError and nothing is written.
        """
        ids = [t.id or new_id(now) for t in tasks]
        with self.conn.write() as db:
            return self._insert_many(db, tasks, ids, now)

    def _insert_many(self, db, tasks: Sequence[NewTask], ids: list[str], now: float,
                     spawned_by: tuple[str, str] | None = None) -> list[str]:
        """enqueue_many inside the caller's transaction (also the spawns of `complete`:
        `spawned_by` is then (parent id, workflow id), stored as every task's own)."""
        batch: dict[str, NewTask] = {}
        alias: dict[str, str] = {}  # batch id -> the unfinished task its key dedupes to
        named: dict[str, str] = {}  # of those, the ids the caller chose: kept as aliases
        out = []
        for task, task_id in zip(tasks, ids):
            existing = task.dedupe_key and (
                q.select_unfinished_by_dedupe_key(db, task.dedupe_key)
                or next((i for i, t in batch.items() if t.dedupe_key == task.dedupe_key), None))
            if existing:
                alias[task_id] = existing
                if task.id is not None:
                    named[task_id] = existing
                out.append(existing)
                continue
            batch[task_id] = task
            out.append(task_id)
        outside = sorted({d for t in batch.values() for d in t.depends_on
                          if d not in batch and d not in alias})
        alias.update(q.resolve_aliases(db, outside))  # a dependency named by another name
        if alias:
            batch = {i: replace(t, depends_on=tuple(alias.get(d, d) for d in t.depends_on))
                     for i, t in batch.items()}
        _check_dependencies(db, batch)
        if spawned_by is None:  # spawned tasks join their parent's workflow
            _check_workflows(db, batch)
        for task_id in _dependency_order(batch):
            self._insert(db, task_id, batch[task_id], now, spawned_by)
        if named:
            q.insert_aliases(db, named)
        return out

    def _insert(self, db, task_id: str, task: NewTask, now: float,
                spawned_by: tuple[str, str] | None = None) -> None:
        parent_id, workflow_id = spawned_by or (task.parent_id, task.workflow_id)
        deps = list(dict.fromkeys(task.depends_on))
        statuses = q.select_statuses(db, deps) if deps else {}
        broken = [d for d in deps if statuses.get(d) in (Status.FAILED, Status.CANCELLED)]
        status, error, outcome, completed = Status.QUEUED, None, None, None
        done = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED) if task.run_on_failure \
            else (Status.SUCCEEDED,)
        if broken and not task.run_on_failure:
            status, outcome, completed = Status.FAILED, Outcome.DEPENDENCY_FAILED, now
            error = f"dependency {broken[0]} {statuses[broken[0]]}"
        elif any(statuses.get(d) not in done for d in deps):
            status = Status.BLOCKED
        elif task.await_event and not wq.event_sent(db, task.await_event):
            status = Status.BLOCKED
        reads = (wq.READS_INPUTS if deps else 0) | (wq.READS_EVENT if task.await_event else 0)
        q.insert_task(db, id=task_id, type=task.type, payload=task.payload,
                      priority=task.priority, status=str(status), now=now,
                      run_after=now if task.run_after is None else task.run_after,
                      max_attempts=task.max_attempts, timeout_s=task.timeout_s,
                      memory_mb=task.memory_mb, cpu_s=task.cpu_s, dedupe_key=task.dedupe_key,
                      error=error, outcome=outcome and str(outcome), completed_at=completed,
                      parent_id=parent_id,
                      workflow_id=None if workflow_id == task_id else workflow_id,
                      await_event=task.await_event, run_on_failure=task.run_on_failure,
                      claim_reads=reads, limit_keys=budget.group_text(task.limit_keys),
                      estimated_tokens=task.estimated_tokens, schedule=task.schedule,
                      scheduled_for=task.scheduled_for)
        if deps:
            q.insert_deps(db, task_id, deps, dict(task.aliases))

    # -- claim and the lease -----------------------------------------------------------

    def claim(self, owner: str, now: float, *, lease_s: float, caps: dict[str, int] | None = None,
              memory_budget_mb: float | None = None, type_memory_mb: dict[str, int] | None = None,
              default_memory_mb: int | None = None, reserved_mb: float | None = None,
              limits: budget.Limits | None = None,
              unreserved_types: tuple[str, ...] = ()) -> Task | None:
        """Lease the next due task: priority first, then FIFO; None when nothing fits.

        Types whose running count (across every supervisor on the file) has reached
        their cap in `caps` are skipped; so are tasks whose declared memory (task, else
        `type_memory_mb`, else `default_memory_mb`; none for a type in `unreserved_types`,
        whose attempts run in no process of their own) exceeds `memory_budget_mb` minus
        what running tasks reserved (`reserved_mb` when the caller knows it, as after
        `reserved_mb()` in the same transaction plus what it claimed since), and tasks of a
        limit group (migration 0009) any of whose keys has no room by `limits` (or is
        paused); a claimed task of a group is charged one request and its token estimate
        in the same transaction.
        """
        # One statement writes (plus the charge for a task of a limit group), after reads
        # that pick the task in the same IMMEDIATE transaction: no savepoint inside a
        # grouped transaction; the supervisor's pass rolls back as a whole.
        with self.conn.write(savepoint=False) as db:
            if caps:
                running = cq.count_running_by_type(db, list(caps))
                full = [t for t, cap in caps.items() if running.get(t, 0) >= cap]
            else:
                full = []
            if memory_budget_mb is None:
                free = None
            else:
                free = memory_budget_mb - (cq.sum_reserved_mb(db) if reserved_mb is None else reserved_mb)
            type_mb = self._type_mb_json(type_memory_mb, unreserved_types)
            states: dict[str, budget.KeyState] = {}
            self.limit_room_s = None
            pick = dict(now=now, full_types=full, free_mb=free, type_mb=type_mb,
                        default_mb=default_memory_mb or 0)
            guarded = not self._groups_seen
            if guarded:
                # No limit group had queued tasks at the last claim: the claim that succeeds
                # only if that is still so (no statement more than a file without limits).
                task = cq.claim_task(db, owner=owner, lease_s=lease_s, **pick)
                if task is not None:
                    return self._with_context(db, task)
            best = self._best_candidate(db, pick, states, limits or _NO_LIMITS, now,
                                        looked=guarded)
            if best is None:
                return None
            task = cq.claim_task_id(db, best[1], owner=owner, now=now, lease_s=lease_s,
                                   type_mb=type_mb, default_mb=default_memory_mb or 0)
            if task is not None and task.limit_keys and limits:
                flow.charge_claim(db, task.limit_keys, task.estimated_tokens, states,
                                  limits, now)
            return self._with_context(db, task)

    def _best_candidate(self, db, pick: dict, states: dict, limits: budget.Limits, now: float,
                        looked: bool) -> tuple[int, str] | None:
        """(priority, id) of the best task to claim: the best of the tasks of no group and
        of the due tasks of each group whose keys all have room. Groups are walked in head
        order (the best queued task of each, due or not) and the walk stops at the first
        head the best found so far ranks ahead of: no task behind it can win. Taking the
        first group with room instead let a group whose head waits for its run_after (a
        retry's backoff) hand the slot to a lower-priority task of no group or of that
        group, past a better due task of the next group. `looked`: the guarded claim
        already found no task of no group, if no group has queued tasks either."""
        best = None
        self._groups_seen = False
        cursor = flow.select_open_groups(db)
        try:
            for row in cursor:
                if not self._groups_seen:
                    self._groups_seen = True
                    best = cq.select_best_task(db, **pick)
                if best is not None and row[1] is not None and _ahead(best, (row[1], row[2])):
                    break
                keys = self._keys_of(row[0])
                if keys[0] not in states:
                    states[keys[0]] = (budget.KeyState(keys[0]) if row[3] is None
                                       else budget.KeyState(keys[0], *row[3:]))
                if not self._has_room(db, keys, states, limits, now):
                    continue
                found = cq.select_best_task(db, group=row[0], **pick)
                if found is not None and (best is None or _ahead(found, best)):
                    best = found
        finally:
            cursor.close()  # before the claim writes: the triggers update limit_groups
        if not self._groups_seen and not looked:
            best = cq.select_best_task(db, **pick)
        return best

    @staticmethod
    def _with_context(db, task: Task | None) -> Task | None:
        """What a claimed task's process reads besides its row (results of its
        dependencies, its event, its checkpoint), only for a task that has any."""
        if task is not None and task.claim_reads:
            task.__dict__["context"] = claim_context(db, task)  # a fresh row object
        return task

    def _keys_of(self, group: str) -> tuple[str, ...]:
        keys = self._group_keys.get(group)
        if keys is None:
            keys = budget.group_keys(group)
            if len(self._group_keys) < 10_000:
                self._group_keys[group] = keys
        return keys

    def _has_room(self, db, keys: tuple[str, ...], states: dict, limits: budget.Limits,
                  now: float) -> bool:
        """Every key has room (key states read once per claim, into `states`)."""
        for key in keys:
            state = states.get(key)
            if state is None:
                state = states[key] = flow.select_key_state(db, key)
            spec = limits.spec(key)
            if budget.blocked_by(spec, state, now) is not None:
                wait = budget.wait_s(spec, state, now)
                if wait != float("inf") and (self.limit_room_s is None or wait < self.limit_room_s):
                    self.limit_room_s = wait  # the loop wakes then, not a poll later
                return False
        return True

    def _type_mb_json(self, type_memory_mb: dict[str, int] | None,
                      unreserved: tuple[str, ...] = ()) -> str:
        """{type: MB} of the types that declare memory (and the unreserved ones, as
        cq.UNRESERVED_MB), as JSON; cached on its content (a supervisor passes the same
        config on every claim)."""
        if not type_memory_mb and not unreserved:
            return "{}"
        key = (tuple((type_memory_mb or {}).items()), tuple(unreserved))
        cached = self._type_mb_cache
        if cached is None or cached[0] != key:
            mb = {k: v for k, v in key[0] if v}
            mb.update((t, cq.UNRESERVED_MB) for t in unreserved)
            cached = self._type_mb_cache = (key, json.dumps(mb))
        return cached[1]

    def reserved_mb(self) -> float:
        """Memory reserved by running tasks, across every supervisor on the file."""
        with self.conn.read() as db:
            return cq.sum_reserved_mb(db)

    def next_run_after(self, now: float) -> float | None:
        """Epoch time at which the next delayed queued task becomes due, or None."""
        with self.conn.read() as db:
            return q.select_next_run_after(db, now)

    def set_pid(self, lease: Lease, pid: int, pid_started_at: float) -> bool:
        with self.conn.write() as db:
            return q.update_task_pid(db, lease, pid, pid_started_at)

    def set_progress(self, updates: Iterable[tuple[Lease, float | None, str | None]]) -> int:
        """Write several progress updates in one transaction; returns how many matched."""
        with self.conn.write() as db:
            return sum(q.update_task_progress(db, lease, p, m) for lease, p, m in updates)

    def extend(self, owner: str, now: float, lease_s: float) -> dict[str, tuple[int, bool]]:
        """Extend every lease of `owner`; returns {id: (attempts, cancel_requested)} held."""
        with self.conn.write() as db:
            return {i: (a, c) for i, a, c in q.extend_leases(db, owner, now + lease_s)}

    def cancel_requests(self, owner: str) -> list[str]:
        with self.conn.read() as db:
            return q.select_cancel_requested(db, owner)

    def complete(self, lease: Lease, end: AttemptEnd, now: float) -> bool:
        """Record success; queue dependents now free to run; store the tasks the attempt
        spawned (`end.spawn`, checked by `check_spawns` first), unless its workflow was
        cancelled meanwhile. False: the lease was lost, and nothing was written."""
        with self.conn.write() as db:
            row = q.complete_task(db, lease, now, end.result)
            if row is None:
                return False
            q.insert_attempt(db, lease, started_at=row[0], now=now, end=end, pid=row[1])
            if row[2]:
                q.unblock_dependents(db, lease.id)
            if end.spawn and not row[3]:  # children join the parent's workflow
                self._insert_many(db, end.spawn, [t.id for t in end.spawn], now,
                                  spawned_by=(lease.id, row[4] or lease.id))
        return True

    def fail(self, lease: Lease, end: AttemptEnd, now: float, backoff: policy.Backoff, *,
             expired_before: float | None = None,
             max_reschedules: int | None = None) -> Status | None:
        """Record an attempt that did not succeed and apply the retry policy.

        Returns the task's new status (queued, failed or cancelled), or None when the
        lease was lost and nothing was written. With `expired_before` (a rescue), nothing
        is written either unless the lease still expires before that time: read inside
        this transaction, so a renewal that committed after the rescuer's first look wins.
        A rescheduled attempt is counted; past `max_reschedules` (the type's setting;
        None: no limit) the task fails for good instead. So is a hosted attempt its relay
        took down (`end.relay_lost`: the row's relay_losses, which the claim returns).
        """
        with self.conn.write() as db:
            row = q.select_task(db, lease.id)
            if row is None:
                return None
            task = Task.from_row(row)
            if (task.status, task.attempts, task.lease_owner) != (Status.RUNNING, lease.attempt, lease.owner):
                return None
            if expired_before is not None and (task.lease_expires_at or 0.0) >= expired_before:
                return None
            rescheduled = end.outcome is Outcome.RESCHEDULED
            decision = policy.after_failure(
                end.outcome, attempt=task.attempts, max_attempts=task.max_attempts,
                retryable=end.retryable, cancel_requested=task.cancel_requested, now=now,
                backoff=backoff, delay_s=end.delay_s,
                reschedules=q.select_reschedules(db, lease.id) if rescheduled else 0,
                max_reschedules=max_reschedules)
            reason = decision.reason or end.reason or str(end.outcome)
            if decision.reason:
                end = replace(end, reason=reason)
            q.insert_attempt(db, lease, started_at=task.started_at, now=now, end=end, pid=task.pid)
            if end.relay_lost:
                q.count_relay_loss(db, lease)
            if decision.action == "requeue":
                if rescheduled:
                    q.count_reschedule(db, lease)
                q.requeue_task(db, lease, run_after=decision.run_after, refund=decision.refund,
                               outcome=str(end.outcome), error=reason)
                return Status.QUEUED
            status = Status.CANCELLED if decision.action == "cancel" else Status.FAILED
            if status is Status.CANCELLED and end.outcome is not Outcome.CANCELLED:
                reason = f"cancelled while running ({reason})"
            q.fail_task(db, lease, now=now, status=str(status), outcome=str(end.outcome), error=reason)
            _fail_dependents(db, lease.id, now, status)
            return status

    def expire(self, now: float, backoff, *, owners: Sequence[str] = (),
               before_requeue: Callable[[Task], None] | None = None,
               expired_before: float | None = None) -> list[Task]:
        """Rescue running tasks whose lease expired (or whose owner is in `owners`, known
        dead): each attempt ends `lost`, then requeue or fail by the retry policy.

        `backoff` is a policy.Backoff or a function type -> Backoff. `before_requeue(task)`
        runs first for each (the supervisor kills a leftover process there, so an attempt
        never overlaps the next). Returns the rescued rows as they were before.
        """
        cutoff = now if expired_before is None else expired_before
        with self.conn.read() as db:
            stale = q.select_expired_leases(db, cutoff)
            if owners:
                seen = {t.id for t in stale}
                stale += [t for t in q.select_running_of_owners(db, list(owners)) if t.id not in seen]
        rescued = []
        for task in stale:
            if before_requeue is not None:
                before_requeue(task)
            why = ("its supervisor is gone" if task.lease_owner in owners
                   else "the lease expired: its supervisor stopped renewing it")
            end = AttemptEnd(Outcome.LOST, reason=f"lost: {why}", pid=task.pid)
            policy_for = backoff(task.type) if callable(backoff) else backoff
            dead_owner = task.lease_owner in owners
            if self.fail(task.lease, end, now, policy_for,
                         expired_before=None if dead_owner else cutoff) is not None:
                rescued.append(task)
        return rescued

    # -- cancel, retry, prune ------------------------------------------------------------

    def cancel(self, task_id: str, now: float) -> Status:
        """Cancel a waiting task at once, or ask the supervisor to kill a running one.

        Returns the status after the call (cancelled, or running with cancel requested).
        A finished task is left as it is. Raises NotFound."""
        with self.conn.write() as db:
            task_id, row = _task_row(db, task_id)
            if row is None:
                raise NotFound(f"no task with id {task_id}", field="id")
            status = Status(row[4])
            if q.cancel_waiting_task(db, task_id, now):
                _fail_dependents(db, task_id, now, Status.CANCELLED)
                return Status.CANCELLED
            if status is Status.RUNNING:
                q.request_cancel(db, task_id)
            return status

    def retry(self, task_id: str, now: float) -> Status:
        """Put a failed or cancelled task back in the queue with its attempts reset, and
        re-block the dependents that failed because of it. Raises NotFound, or InputError
        when the task is not failed or cancelled."""
        from supervisor.errors import InputError
        with self.conn.write() as db:
            task_id, row = _task_row(db, task_id)
            if row is None:
                raise NotFound(f"no task with id {task_id}", field="id")
            if Status(row[4]) not in (Status.FAILED, Status.CANCELLED):
                raise InputError(f"task {task_id} is {row[4]}; only failed or cancelled tasks can be retried", field="id")
            key = row[25]
            holder = key and q.select_unfinished_by_dedupe_key(db, key)
            if holder:
                raise InputError(f"task {task_id} cannot be retried: its dedupe key {key!r} is "
                                 f"held by unfinished task {holder}", field="dedupe_key")
            broken = q.select_broken_deps(db, task_id)
            if broken:
                raise InputError(f"task {task_id} cannot be retried: it depends on task "
                                 f"{broken[0][0]}, which {broken[0][1]}; retry that one first",
                                 field="id")
            waits = q.count_unsucceeded_deps(db, task_id) or (
                row[28] and not wq.event_sent(db, row[28]))
            status = Status.BLOCKED if waits else Status.QUEUED
            q.retry_task(db, task_id, now, str(status))
            pending = [task_id]
            while pending:
                for dep in q.select_dependency_failed_dependents(db, pending.pop()):
                    # Still waiting on another failed/cancelled task, or its key was taken
                    # meanwhile: it stays failed rather than blocked forever (or a clash).
                    dep_key = q.select_task(db, dep)[25]
                    if q.select_broken_deps(db, dep) or (
                            dep_key and q.select_unfinished_by_dedupe_key(db, dep_key)):
                        continue
                    q.reblock_task(db, dep)
                    pending.append(dep)
            return status

    def prune(self, before: float) -> int:
        """Delete finished tasks (and their attempts) completed before `before`, and
        events sent before then."""
        with self.conn.write() as db:
            n = q.prune_finished(db, before)
            q.delete_empty_counts(db)
            wq.prune_events_batch(db, before, -1)  # LIMIT -1: all of them
            return n

    # -- reading -------------------------------------------------------------------------

    def get(self, task_id: str, *, history: bool = True) -> Task:
        """The task (with its attempts unless `history` is False); an alias (see
        `enqueue_many`) gives the task it names. Raises NotFound."""
        with self.conn.read() as db:
            task_id, row = _task_row(db, task_id)
            if row is None:
                raise NotFound(f"no task with id {task_id}", field="id")
            deps = q.select_deps(db, [task_id]).get(task_id, ())
            attempts = tuple(q.select_attempts(db, task_id)) if history else ()
        task = Task.from_row(row, deps, attempts)
        if history and task.status is Status.RUNNING and not any(
                a.attempt == task.attempts and a.ended_at is None for a in attempts):
            # Where it runs shows once its pid is written (a hosted attempt never has one).
            running = Attempt(0, task.id, task.attempts, task.lease_owner or "", task.started_at,
                              None, None, "running", None, None, None, task.pid, None, None, None,
                              "process" if task.pid is not None else None)
            task = replace(task, history=attempts + (running,))
        return task

    def list(self, *, status: str | None = None, type: str | None = None,
             before: str | None = None, limit: int = 100,
             workflow_id: str | None = None) -> list[Task]:
        """Newest first, at most `limit`; `before` is the id where the previous page ended;
        `workflow_id` (any task of the workflow names it) keeps that workflow's tasks."""
        with self.conn.read() as db:
            if workflow_id:
                workflow_id = workflow_of(db, workflow_id) or workflow_id
            rows = q.select_tasks(db, status=status, type=type, before=before, limit=limit,
                                  workflow_id=workflow_id)
            deps = q.select_deps(db, [r[0] for r in rows]) if rows else {}
        return [Task.from_row(r, deps.get(r[0], ())) for r in rows]

    def ids_matching(self, text: str, limit: int = 2) -> list[str]:
        """[text] when it is a task id, else up to `limit` ids ending with `text`."""
        with self.conn.read() as db:
            return q.select_ids_matching(db, text, limit)

    def recent_attempts(self, since: float) -> list[tuple[float, str, str]]:
        """(ended_at, outcome, type) of every attempt that ended at or after `since`."""
        with self.conn.read() as db:
            return q.select_recent_attempts(db, since)

    def queued_in_order(self, limit: int = 50) -> list[Task]:
        with self.conn.read() as db:
            return [Task.from_row(r) for r in q.select_queued_in_order(db, limit)]

    def stats(self, now: float) -> Stats:
        with self.conn.read() as db:
            counts: dict[str, dict[str, int]] = {}
            for status, type_, n in q.count_by_status_type(db):
                counts.setdefault(status, {})[type_] = n
            oldest = {}
            for type_, n, oldest_at in q.select_queued_by_type(db, now):
                counts.setdefault(str(Status.QUEUED), {})[type_] = n
                if oldest_at is not None:
                    oldest[type_] = oldest_at
            reserved = cq.sum_reserved_mb(db)
        return Stats(counts, min(oldest.values()) if oldest else None, oldest, int(reserved))

    def data_version(self) -> int:
        """Changes when another connection commits; cheap enough to poll."""
        return self.conn.db.execute("PRAGMA data_version").fetchall()[0][0]

    # -- supervisors ---------------------------------------------------------------------

    def register_supervisor(self, **fields) -> None:
        with self.conn.write() as db:
            q.upsert_supervisor(db, **fields)

    def unregister_supervisor(self, owner: str) -> None:
        with self.conn.write() as db:
            q.delete_supervisor(db, owner)

    def supervisors(self) -> list[tuple]:
        with self.conn.read() as db:
            return q.select_supervisors(db)

    def wake_ports(self, host: str) -> list[int]:
        with self.conn.read() as db:
            return q.select_wake_ports(db, host)


_NO_LIMITS = budget.Limits({})


def _ahead(a: tuple[int, str], b: tuple[int, str]) -> bool:
    """Task (priority, id) `a` is claimed before `b`: higher priority, then older id."""
    return a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


_fail_dependents = fail_dependents


def check_dependencies_without_database(tasks: Sequence[NewTask], now: float) -> None:
    """The checks of `enqueue_many` for a database file that does not exist yet, where
    every dependency outside the batch is unknown: raises DependencyError as it would,
    so a caller can refuse before it creates an empty file."""
    _check_dependencies(None, {t.id or new_id(now): t for t in tasks})


def _task_row(db, task_id: str) -> tuple[str, tuple | None]:
    """(id, row) of the task `task_id` names: itself, or the task it is another name of."""
    row = q.select_task(db, task_id)
    if row is None and (named := q.resolve_aliases(db, [task_id])):
        task_id = named[task_id]
        row = q.select_task(db, task_id)
    return task_id, row


def _check_dependencies(db, batch: dict[str, NewTask]) -> None:
    """Every dependency exists (in the file, if `db`, or the batch) and the batch has no
    cycle."""
    wanted = {d for t in batch.values() for d in t.depends_on if d not in batch}
    if wanted:
        found = q.select_statuses(db, sorted(wanted)) if db is not None else {}
        missing = sorted(wanted - set(found))
        if missing and db is not None:  # another name of a task names that task
            missing = sorted(set(missing) - set(q.resolve_aliases(db, missing)))
        if missing:
            raise DependencyError(f"depends_on names unknown task {missing[0]}", field="depends_on")
    for task_id, task in batch.items():
        if task_id in task.depends_on:
            raise DependencyError(f"task {task_id} depends on itself", field="depends_on")
    _dependency_order(batch)  # raises on a cycle


def _dependency_order(batch: dict[str, NewTask]) -> list[str]:
    """Ids of the batch, each after the batch tasks it depends on; DependencyError on a cycle."""
    order, state = [], {}
    for root in batch:
        if state.get(root):
            continue
        stack = [(root, iter(batch[root].depends_on))]
        state[root] = 1
        while stack:
            node, deps = stack[-1]
            nxt = next((d for d in deps if d in batch), None)
            if nxt is None:
                stack.pop()
                state[node] = 2
                order.append(node)
            elif state.get(nxt) == 1:
                raise DependencyError(f"depends_on makes a cycle through task {nxt}", field="depends_on")
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(batch[nxt].depends_on)))
    return order
