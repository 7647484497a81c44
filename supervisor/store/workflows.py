"""The store's workflow operations: events, checkpoints, cancelling and reading a workflow,
checking spawned tasks, and what a claimed attempt gets besides its row.

Mixed into `Store` (each method is one transaction, `now` is the caller's). Owns the
rules: an event name is sent once and releases every task awaiting it (now or later); a
checkpoint is written only under its attempt's lease; cancelling a workflow is one
transaction that cancels its waiting tasks, asks for its running ones to stop and fails
(or, with run_on_failure, releases) dependents outside it. It never forks or signals.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

from supervisor.errors import DependencyError, NotFound
from supervisor.store import queries as q
from supervisor.store import workflow_queries as wq
from supervisor.store.rows import Lease, NewTask, Status, Task

WORKFLOW_TASKS_MAX = 10_000  # tasks a read of a workflow returns; the rest are counted


class WorkflowStore:
    """Methods of `Store` (which provides `self.conn`)."""

    def send_event(self, name: str, data: str | None, now: float) -> tuple[bool, list[str]]:
        """Record event `name` with `data` (JSON text or None) and queue the tasks waiting
        for it. Returns (newly sent, ids released); a name already sent changes nothing."""
        with self.conn.write() as db:
            if not wq.insert_event(db, name, data, now):
                return False, []
            return True, wq.release_awaiting(db, name)

    def workflow_named(self, workflow_id: str) -> str | None:
        """The workflow `workflow_id` names (itself, or the workflow of the task with
        that id), or None for neither."""
        with self.conn.read() as db:
            return workflow_of(db, workflow_id)

    def checkpoint(self, lease: Lease, state: str, now: float) -> bool:
        """Store `state` (JSON text) as the task's checkpoint, fenced by the attempt's
        lease; False (and nothing written) when the attempt no longer holds it."""
        with self.conn.write() as db:
            if not wq.mark_checkpointed(db, lease):
                return False
            wq.upsert_checkpoint(db, lease, state, now)
            return True

    def checkpoint_of(self, task_id: str) -> tuple[int, str, float] | None:
        """(attempt that wrote it, state JSON text, saved_at) of a task's checkpoint."""
        with self.conn.read() as db:
            return wq.select_checkpoint(db, task_id)

    def cancel_workflow(self, workflow_id: str, now: float) -> dict[str, int]:
        """Cancel every unfinished task of the workflow in one transaction: blocked and
        queued ones at once, running ones by a cancel request their supervisor acts on.
        Any task of the workflow names it. Returns {"id": the workflow's id, "cancelled": n,
        "stopping": m}. Raises NotFound for an unknown workflow."""
        with self.conn.write() as db:
            named, workflow_id = workflow_id, workflow_of(db, workflow_id)
            if workflow_id is None:
                raise NotFound(f"no workflow with id {named}", field="workflow_id")
            cancelled = wq.cancel_workflow_waiting(db, workflow_id, now)
            stopping = wq.request_cancel_workflow(db, workflow_id)
            with_dependents = [i for i, has in cancelled if has]
            if with_dependents:  # dependents outside the workflow
                for task_id in wq.select_with_waiting_dependents(db, with_dependents):
                    fail_dependents(db, task_id, now, Status.CANCELLED)
            return {"id": workflow_id, "cancelled": len(cancelled), "stopping": stopping}

    def workflow(self, workflow_id: str, limit: int = WORKFLOW_TASKS_MAX
                 ) -> tuple[list[Task], list[dict], dict[str, int]]:
        """The workflow's tasks (oldest first, at most `limit`), the edges of those:
        {"from", "to", "kind"}, kind "depends_on" (to waits for from) or "spawned" (from
        spawned to), and {status: how many} of all its tasks, past `limit` too, from the
        same read; any task of the workflow names it. Raises NotFound."""
        with self.conn.read() as db:
            found = workflow_of(db, workflow_id) or workflow_id
            rows = wq.select_workflow_tasks(db, found, limit)
            if not rows:
                raise NotFound(f"no workflow with id {workflow_id}", field="workflow_id")
            deps = wq.select_workflow_deps(db, [r[0] for r in rows])
            counts = wq.select_workflow_counts(db, found)
        by_task: dict[str, list[str]] = {}
        for task_id, dep in deps:
            by_task.setdefault(task_id, []).append(dep)
        tasks = [Task.from_row(r, tuple(by_task.get(r[0], ()))) for r in rows]
        edges = [{"from": dep, "to": task_id, "kind": "depends_on"} for task_id, dep in deps]
        edges += [{"from": t.parent_id, "to": t.id, "kind": "spawned"}
                  for t in tasks if t.parent_id]
        return tasks, edges, counts

    def awaiting(self, limit: int = 100) -> list[Task]:
        """Blocked tasks waiting for an event, oldest first."""
        with self.conn.read() as db:
            return [Task.from_row(r) for r in wq.select_awaiting(db, limit)]

    def tasks_by_ids(self, task_ids: Sequence[str]) -> dict[str, Task]:
        """{id: task} for those of these ids that name a task (no history, no
        dependencies); an alias (see `enqueue_many`) maps to the task it names."""
        wanted = list(task_ids)
        with self.conn.read() as db:
            rows = {r[0]: Task.from_row(r) for r in wq.select_tasks_by_ids(db, wanted)}
            named = q.resolve_aliases(db, [i for i in wanted if i not in rows])
            if named:
                rows.update((r[0], Task.from_row(r))
                            for r in wq.select_tasks_by_ids(db, sorted(set(named.values()))))
        out = {i: rows[i] for i in wanted if i in rows}
        out.update((a, rows[t]) for a, t in named.items() if t in rows)
        return out

    def check_spawns(self, spawn: Sequence[NewTask]) -> str | None:
        """Why these spawned tasks cannot be stored (a dependency that does not exist, a
        cycle, a workflow that does not exist), or None. Read-only; call it in the same
        transaction as the `complete` that stores them."""
        from supervisor.store.tasks import _check_dependencies
        batch = {t.id: t for t in spawn}
        if len(batch) != len(spawn):
            return "two spawned tasks have the same id"
        try:
            with self.conn.read() as db:
                taken = q.select_statuses(db, list(batch)) or q.resolve_aliases(db, list(batch))
                if taken:
                    return f"spawned task id {min(taken)} is already taken"
                _check_dependencies(db, batch)
        except DependencyError as exc:
            return str(exc)
        return None


def check_workflows(db, batch: dict[str, NewTask]) -> None:
    """A task may join only a workflow that exists (in the file or in the batch); joining
    through any task of a workflow joins that task's workflow."""
    for task_id, task in list(batch.items()):
        wid = task.workflow_id
        if not wid or wid in batch or task.parent_id:  # spawned: the parent's, checked
            continue
        found = workflow_of(db, wid)
        if found is None:
            raise DependencyError(f"workflow_id names unknown workflow {wid}", field="workflow_id")
        if found != wid:
            batch[task_id] = replace(task, workflow_id=found)


def workflow_of(db, workflow_id: str) -> str | None:
    """The workflow `workflow_id` names: itself, or the workflow of the task with that id
    (any task of a workflow names it, as in enqueue's workflow_id), or None for neither."""
    found = wq.select_workflow_of(db, workflow_id)
    if found is None and wq.workflow_exists(db, workflow_id):  # its first task was pruned
        found = workflow_id
    return found


def fail_dependents(db, task_id: str, now: float, why: Status) -> None:
    """Fail every waiting task downstream of `task_id`, each naming the task it waited on;
    release the dependents that run on failure once all their dependencies ended."""
    pending = [task_id]
    while pending:
        dep = pending.pop()
        reason = f"dependency {dep} {why if dep == task_id else Status.FAILED}"
        pending.extend(q.fail_dependents(db, dep, now, reason))
        q.unblock_dependents(db, dep)


def claim_context(db, task: Task) -> dict:
    """What the attempt of a just-claimed task reads besides its row (JSON values stay
    text: the task process parses them, not the supervisor's loop)."""
    ctx: dict = {}
    reads = task.claim_reads
    if reads & wq.READS_INPUTS:
        inputs, aliases, errors = {}, {}, []
        for dep, alias, status, result, error, outcome in wq.select_inputs(db, task.id):
            if status == Status.SUCCEEDED:
                inputs[dep] = "null" if result is None else result
            else:  # a run_on_failure task: the failed dependency's error object
                inputs[dep] = json.dumps({"id": dep, "status": status, "outcome": outcome,
                                          "error": error})
                errors.append(dep)
            if alias:
                aliases[alias] = dep
        ctx.update(inputs=inputs, input_aliases=aliases, input_errors=errors)
    if reads & wq.READS_EVENT and task.await_event:
        row = wq.select_event_data(db, task.await_event)
        ctx["event"] = row[0] if row and row[0] is not None else "null"
    if reads & wq.READS_CHECKPOINT:
        row = wq.select_checkpoint(db, task.id)
        ctx["checkpoint_state"] = row[1] if row else "null"
    return ctx
