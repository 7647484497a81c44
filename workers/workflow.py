"""The task side of workflows: what `ctx.spawn` records and checks, and how the results of
dependencies, the event and the checkpoint state a spec carries become `ctx.inputs`,
`ctx.input`, `ctx.event` and `ctx.checkpoint_state`.

Owns the spawn request format (one dict per spawned task, sent with the result: the
supervisor checks each again and stores them with the success) and the checks that can be
made here: a known type, known options, a JSON payload, dependencies that are strings.
It must never write task state and never import supervisor; standard library only (it
is loaded in the fork server).
"""

from __future__ import annotations

import json
import time

from workers.context import Fail
from workers.wire import MAX_SPAWNS
OPTIONS = frozenset({"priority", "delay", "run_at", "timeout_s", "memory_mb", "max_attempts",
                     "depends_on", "dedupe_key", "await_event", "run_on_failure",
                     "limit_keys", "estimated_tokens"})


class SpawnError(Fail):
    """ctx.spawn was called with something the task could never be stored with. Not
    retryable: the attempt fails for good (a retry would spawn the same)."""


class DependencyFailure(dict):
    """The value `ctx.inputs` holds for a dependency that failed or was cancelled (only a
    task enqueued with run_on_failure=True runs then): {"id", "status", "outcome",
    "error"}. A dict, so it is JSON; `isinstance(value, DependencyFailure)` tells it from
    a result."""


def spawn_request(type_: str, payload, options: dict, earlier: list[dict], known) -> dict:
    """One spawn request: {"id", "type", "payload", **options}. `earlier`: this attempt's
    requests so far; `known(type) -> bool`. Raises SpawnError naming what is wrong."""
    if len(earlier) >= MAX_SPAWNS:
        raise SpawnError(f"an attempt may spawn at most {MAX_SPAWNS} tasks")
    if not isinstance(type_, str) or not type_.strip():
        raise SpawnError(f"spawn type must be a non-empty string, got {type_!r}")
    if not known(type_):
        raise SpawnError(f"spawn: no handler for task type {type_!r}: register one with "
                         f"@task({type_!r}) in a preloaded module, or set [types.\"{type_}\"] "
                         "handler in the config")
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise SpawnError(f"spawn: unknown option {unknown[0]!r} (options: "
                         f"{', '.join(sorted(OPTIONS))})")
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise SpawnError(f"spawn payload must be a dict, got {type(payload).__name__}")
    req = {"type": type_, "payload": payload}
    for key, value in options.items():
        if value is None:
            continue
        if key == "delay" and hasattr(value, "total_seconds"):
            value = value.total_seconds()
        elif key == "run_at" and hasattr(value, "timestamp"):
            if value.tzinfo is None:
                raise SpawnError("spawn run_at must be a timezone-aware datetime (or epoch seconds)")
            value = value.timestamp()
        elif key == "depends_on":
            value = [value] if isinstance(value, str) else list(value)
            if not all(isinstance(d, str) and d for d in value):
                raise SpawnError("spawn depends_on must be a list of task ids (strings)")
        elif key == "limit_keys" and isinstance(value, (tuple, set, frozenset)):
            value = list(value)  # checked by the supervisor, as Queue.enqueue checks it
        req[key] = value
    try:
        json.dumps(req, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SpawnError(f"spawn payload or options are not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise SpawnError("spawn payload or options are not JSON-serialisable: nested too "
                         "deeply") from None
    from workers.ids import new_id  # here: the fork server does not need it
    req["id"] = new_id(time.time())
    return req


def parse_inputs(context: dict) -> tuple[dict, list[str]]:
    """(inputs keyed by dependency id and by local name, dependency ids) from a spec's
    "context", whose values are JSON text."""
    raw = context.get("inputs") or {}
    errors = set(context.get("input_errors") or ())
    inputs = {}
    for dep, text in raw.items():
        value = json.loads(text)
        inputs[dep] = DependencyFailure(value) if dep in errors else value
    for alias, dep in (context.get("input_aliases") or {}).items():
        if dep in inputs:
            inputs[alias] = inputs[dep]
    return inputs, list(raw)


def parse_value(context: dict, key: str):
    """A JSON-text value of a spec's "context" ("event", "checkpoint_state"), or None."""
    text = context.get(key)
    return None if text is None else json.loads(text)
