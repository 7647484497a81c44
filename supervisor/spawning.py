"""The supervisor side of ctx.spawn: turn the spawn requests a successful attempt sent
with its result into tasks to store with that success, or into the attempt's failure.

Owns the checks of each request as input from a task process (a dict with an id in the
task id format, a type the fork server knows, the options and limits of Queue.enqueue,
dependencies that exist or were spawned earlier, no cycle), and the error a person reads
when one fails. It runs inside the supervisor's pass transaction; it never writes SQL
itself (`Store.check_spawns` reads) and never imports user code.
"""

from __future__ import annotations

from dataclasses import replace

from supervisor.errors import InputError
from supervisor.store import AttemptEnd, NewTask, Outcome
from supervisor.store.ids import is_task_id
from workers.wire import MAX_SPAWNS

_FIELDS = frozenset({"id", "type", "payload", "priority", "delay", "run_at", "timeout_s",
                     "memory_mb", "max_attempts", "depends_on", "dedupe_key", "await_event",
                     "run_on_failure", "limit_keys", "estimated_tokens"})

_checkers: list = [None, None]  # [config, a Queue used only for its enqueue checks]


def prepared(end: AttemptEnd, config, store, known_types, now: float) -> AttemptEnd:
    """`end` (a success carrying raw spawn requests) with its spawns checked and built,
    or an `error` end, not retryable, saying why they cannot be stored. A retry would
    send the same requests, so it would fail the same way."""
    if not end.spawn:
        return end
    try:
        tasks = build(end.spawn, config, known_types, now)
        problem = store.check_spawns(tasks)
    except InputError as exc:
        problem = str(exc)
    if problem is None:
        return replace(end, spawn=tuple(tasks))
    message = f"the attempt's spawned tasks cannot be stored: {problem}"
    return replace(end, outcome=Outcome.ERROR, reason=f"SpawnError: {message}", result=None,
                   spawn=(), retryable=False,
                   error={"type": "SpawnError", "message": message, "traceback": ""})


def build(requests, config, known_types, now: float) -> list[NewTask]:
    """NewTasks from raw requests, each checked as Queue.enqueue checks its arguments.
    Raises InputError naming the request and field."""
    if not isinstance(requests, (list, tuple)) or len(requests) > MAX_SPAWNS:
        raise InputError(f"spawn must be a list of at most {MAX_SPAWNS} requests", field="spawn")
    checker = _checker(config)
    known = set(known_types or ())
    out = []
    for n, req in enumerate(requests):
        if not isinstance(req, dict):
            raise InputError(f"spawn {n}: expected an object", field="spawn")
        unknown = sorted(set(req) - _FIELDS)
        if unknown:
            raise InputError(f"spawn {n}: unknown option {unknown[0]!r}", field=unknown[0])
        task_id = req.get("id")
        if not is_task_id(task_id):
            raise InputError(f"spawn {n}: id must be a task id made by ctx.spawn", field="id")
        type_ = req.get("type")
        if known and type_ not in known:
            raise InputError(f"spawn {n}: no handler for task type {type_!r}", field="type")
        fields = {k: v for k, v in req.items() if k != "id"}
        fields.setdefault("type", None)
        try:
            new = checker._new_task(fields, now, task_id=task_id)
        except InputError as exc:
            raise InputError(f"spawn {n} ({type_}): {exc}", field=exc.field) from None
        out.append(new)  # its parent and workflow: set by Store.complete, which stores it
    return out


def _checker(config):
    if _checkers[0] is not config:
        from supervisor.client import Queue  # opens no database until used
        _checkers[:] = [config, Queue(config)]
    return _checkers[1]
