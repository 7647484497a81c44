"""The workflow calls of the Python client (`Queue` inherits them): cancel or read a
workflow, wait for many tasks, send an event, list the tasks waiting for one.

Owns their input checks (ids, event names, event data as JSON within the payload size
limit) and the polling of `wait_all`. Like `Queue`, it never writes SQL, never runs a
task and never imports user code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from supervisor import names
from supervisor.errors import InputError
from supervisor.store import FINAL, Status, Task

_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.1
_REREAD_S = 1.0


@dataclass(frozen=True)
class Workflow:
    """A workflow's tasks (oldest first, at most 10,000: `truncated` says when some are
    left out; Queue.list(workflow_id=...) pages through all of them), the edges of those
    ({"from", "to", "kind"}: kind "depends_on", to waits for from, or "spawned", from
    spawned to), and `counts`, {status: how many} of every task of the workflow."""
    id: str
    tasks: tuple[Task, ...]
    edges: tuple[dict, ...]
    counts: dict[str, int]

    @property
    def total(self) -> int:
        """How many tasks the workflow has, those left out of `tasks` too."""
        return sum(self.counts.values())

    @property
    def truncated(self) -> bool:
        return len(self.tasks) < self.total

    @property
    def finished(self) -> bool:
        """Every task of the workflow is finished, those left out of `tasks` too."""
        return all(Status(s) in FINAL for s in self.counts)

    def to_dict(self) -> dict:
        return {"id": self.id, "finished": self.finished, "counts": dict(self.counts),
                "total": self.total, "truncated": self.truncated,
                "tasks": [t.to_dict(with_history=False) for t in self.tasks],
                "edges": list(self.edges)}


class WaitTimeout(TimeoutError):
    """wait_all ran out of time; `finished` holds the tasks that had finished."""

    def __init__(self, message: str, finished: list[Task]):
        super().__init__(message)
        self.finished = finished


class WorkflowCalls:
    """Mixed into `Queue`, which provides `_call`, `_resolve_end`, `config` and `get`."""

    def resolve_workflow_id(self, text: str) -> str:
        """The id of the workflow `text` names: a workflow id or the id of any of its
        tasks, else a unique end of a task id, as `resolve_id` takes one (the dashboard
        shows the last 8 characters; they used to be refused here). Raises NotFound, or
        InputError naming the candidates when the end is shared by several tasks."""
        text = _check_id(text, "workflow_id")
        found = self._call(lambda s: s.workflow_named(text))
        if found is None:
            end = text.strip()
            task_id = self._resolve_end(end, "workflow_id", f"no workflow with id {end} "
                                                            "(nor a task whose id ends with it)")
            found = self._call(lambda s: s.workflow_named(task_id)) or task_id
        return found

    def cancel_workflow(self, workflow_id: str) -> dict[str, int]:
        """Cancel every unfinished task of the workflow (any of its tasks, or a unique end
        of one's id, names it) in one transaction: blocked and queued ones at once,
        running ones stopped by their supervisor within a second. Returns {"id": the
        workflow's id (its root task's, also when a member named it), "cancelled": n,
        "stopping": m}. Raises NotFound, or InputError for an ambiguous end."""
        workflow_id = self.resolve_workflow_id(workflow_id)
        return self._call(lambda s: s.cancel_workflow(workflow_id, time.time()), notify=True)

    def workflow(self, workflow_id: str) -> Workflow:
        """The workflow's tasks (the oldest 10,000; `truncated` says when there are more,
        `counts` and `total` count them all) and their edges (dependencies and spawns);
        any task of the workflow, or a unique end of one's id, names it. Raises NotFound,
        or InputError for an ambiguous end."""
        workflow_id = self.resolve_workflow_id(workflow_id)
        tasks, edges, counts = self._call(lambda s: s.workflow(workflow_id))
        return Workflow(tasks[0].workflow, tuple(tasks), tuple(edges), counts)

    def send_event(self, name: str, data: Any = None) -> dict[str, Any]:
        """Send event `name` with JSON `data`: every task waiting for it (`await_event`)
        is released, and so is any task enqueued later with that name. A name is sent
        once: sending it again changes nothing. Returns {"name", "sent": False when it
        had been sent before, "released": [task ids]}."""
        check_event_name(name, "name")
        text = None if data is None else _json_text(data, self.config.supervisor.max_payload_bytes)
        sent, released = self._call(lambda s: s.send_event(name, text, time.time()), notify=True)
        return {"name": name, "sent": sent, "released": released}

    def awaiting(self, limit: int = 100) -> list[Task]:
        """Blocked tasks that wait for an event, oldest first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10000:
            raise InputError(f"limit must be an integer from 1 to 10000, got {limit!r}",
                             field="limit")
        return self._call(lambda s: s.awaiting(limit))

    def wait_all(self, ids: Iterable[str], timeout: float | None = None) -> list[Task]:
        """Block until every task in `ids` is succeeded, failed or cancelled; returns them
        in the order given. Polls `PRAGMA data_version` like `wait`. Raises NotFound for
        an unknown id, or WaitTimeout (a TimeoutError, with `.finished`) after `timeout`
        seconds."""
        if isinstance(ids, str):
            ids = [ids]
        wanted = list(dict.fromkeys(_check_id(i, "ids") for i in ids))
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
                    0 <= timeout < float("inf")):
                raise InputError(f"timeout must be a finite number >= 0, got {timeout!r}",
                                 field="timeout")
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        done: dict[str, Task] = {}
        version, read_mono, sleep_s = None, 0.0, _POLL_FIRST_S
        while True:
            latest = self._call(lambda s: s.data_version())
            if latest != version or time.monotonic() - read_mono >= _REREAD_S:
                version, read_mono = latest, time.monotonic()
                left = [i for i in wanted if i not in done]
                rows = self._call(lambda s: s.tasks_by_ids(left))
                missing = [i for i in left if i not in rows]
                if missing:
                    from supervisor.errors import NotFound
                    raise NotFound(f"no task with id {missing[0]}", field="ids")
                done.update((i, t) for i, t in rows.items() if t.status in FINAL)
                if len(done) == len(wanted):
                    return [done[i] for i in wanted]
            now_mono = time.monotonic()
            if deadline is not None and now_mono >= deadline:
                raise WaitTimeout(f"{len(wanted) - len(done)} of {len(wanted)} task(s) still "
                                  f"unfinished after {timeout:g}s",
                                  [done[i] for i in wanted if i in done])
            time.sleep(sleep_s if deadline is None else min(sleep_s, deadline - now_mono))
            sleep_s = min(sleep_s * 2, _POLL_MAX_S)


MAX_EVENT_NAME = names.MAX_NAME


def check_event_name(name: Any, field: str) -> str:
    """`name` if it is an event name; InputError saying what is wrong (names.problem)."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{field} must be a non-empty event name, got {name!r}", field=field)
    why = names.problem(name, MAX_EVENT_NAME)
    if why:
        raise InputError(f"{field} {why}", field=field)
    return name


def _check_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(f"{field} must be a non-empty task id string, got {value!r}",
                         field=field)
    return value


def _json_text(data: Any, limit: int) -> str:
    try:
        text = json.dumps(data, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise InputError(f"event data is not JSON-serialisable: {exc}", field="data") from None
    except RecursionError:
        raise InputError("event data is not JSON-serialisable: nested too deeply",
                         field="data") from None
    if size > limit:
        raise InputError(f"event data is {size} bytes, over the limit of {limit} bytes "
                         "(supervisor.max_payload_bytes)", field="data")
    return text
