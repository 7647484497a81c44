"""The OpenAPI 3.1 document of the HTTP API, served at /api/openapi.json.

Owns the description of every endpoint, its parameters, request body, responses and
their schemas. It must match what `supervisor.api` and `supervisor.http` really send: a
schemathesis test checks every response against it. Every limit the server checks on a
new task is stated (a test generates bodies from the document: none may get 400), those
that follow the config from the supervisor's config. Pure data; no I/O.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from supervisor import __version__
from supervisor.store.workflows import WORKFLOW_TASKS_MAX

INT64 = {"minimum": -(1 << 63), "maximum": (1 << 63) - 1}
STATUSES = ["blocked", "queued", "running", "succeeded", "failed", "cancelled"]
LATEST_S = 253402300799   # 9999-12-31T23:59:59Z: the last time the API can print
TYPE_MAX = 200            # Queue.enqueue: at most 200 printable characters


def _char_class(keep) -> str:
    """A regex character class of the BMP characters for which keep(char) is true."""
    ranges, start = [], None
    for code in range(0x10001):
        if code < 0x10000 and keep(chr(code)):
            start = code if start is None else start
        elif start is not None:
            ranges.append((start, code - 1))
            start = None
    return "[" + "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}"
                         for a, b in ranges) + "]"


def _printable_pattern() -> str:
    """A regex for str.isprintable() text with a non-space character, as the Queue
    checks it, from this Python's Unicode tables. It lists the Basic Multilingual Plane
    (ECMA 262 patterns without the u flag cannot range over astral characters); the
    server also takes printable astral characters, so the document errs on the safe side."""
    printable = _char_class(str.isprintable)
    solid = _char_class(lambda c: c.isprintable() and c != " ")
    return f"^{printable}*{solid}{printable}*$"


def _null(schema: dict) -> dict:
    """The schema, or null."""
    kind = schema.get("type")
    if kind is None:
        return {"anyOf": [schema, {"type": "null"}]}
    return {**schema, "type": [kind, "null"]}


TIME = {"type": "string", "format": "date-time"}
STR, INT, NUM, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
REF = "#/components/schemas/"


def _obj(props: dict, required: list[str] | None = None, extra: bool = False) -> dict:
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": extra}


ATTEMPT = _obj({
    "attempt": INT, "owner": STR, "started_at": TIME, "ended_at": _null(TIME),
    "outcome": _null(STR), "reason": _null(STR),
    "error": _null({"type": "object", "description": "{type, message, traceback} when the "
                    "handler raised"}),
    "exit_code": _null(INT), "signal": _null(STR), "pid": _null(INT),
    "peak_rss_bytes": _null(INT), "cpu_s": _null(NUM), "wall_s": _null(NUM),
    "ran_in": _null({"type": "string", "enum": ["process", "relay", None],
                     "description": "a task process of its own, or hosted by the model-call "
                     "relay (llm.chat; memory_mb and cpu_s do not apply); null: not known"})})

TASK_FIELDS = {
    "id": {"type": "string", "description": "26-character time-ordered id"},
    "type": STR, "payload": {"type": "object"}, "priority": INT,
    "status": {"type": "string", "enum": STATUSES},
    "attempts": INT, "max_attempts": INT, "created_at": TIME, "started_at": _null(TIME),
    "completed_at": _null(TIME), "run_after": TIME,
    "result": {"description": "what the handler returned (any JSON value), once succeeded"},
    "error": _null({"type": "string", "description": "why the latest attempt failed"}),
    "outcome": _null(STR), "depends_on": {"type": "array", "items": STR},
    "progress": _null(NUM), "progress_message": _null(STR), "timeout_s": _null(NUM),
    "memory_mb": _null(INT), "cpu_s": _null(NUM), "dedupe_key": _null(STR),
    "cancel_requested": BOOL, "lease_owner": _null(STR), "lease_expires_at": _null(TIME),
    "pid": _null(INT),
    "workflow_id": {"type": "string", "description": "its own id, or the workflow it "
                    "joined or was spawned into"},
    "parent_id": _null({"type": "string", "description": "the task that spawned it"}),
    "await_event": _null({"type": "string", "description": "blocked until this event is sent"}),
    "run_on_failure": BOOL,
    "limit_keys": {"type": "array", "items": STR},
    "estimated_tokens": _null(INT), "schedule": _null(STR), "scheduled_for": _null(TIME),
}
TASK_REQUIRED = [k for k in TASK_FIELDS if k != "result"]

SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": {"type": "string", "description": "what is wrong, for a person"},
                   "field": _null({"type": "string", "description": "the field at fault"})}),
    "Attempt": ATTEMPT,
    "TaskSummary": _obj(TASK_FIELDS, TASK_REQUIRED),
    "Task": _obj({**TASK_FIELDS, "history": {"type": "array", "items": {"$ref": REF + "Attempt"}}},
                 [*TASK_REQUIRED, "history"]),
    "TaskList": _obj({"tasks": {"type": "array", "items": {"$ref": REF + "TaskSummary"}},
                      "next_before": _null({"type": "string", "description": "pass as "
                                            "`before` for the next page; null on the last"})}),
    "NewTask": {
        "type": "object", "required": ["type"], "additionalProperties": False,
        "not": {"required": ["delay", "run_at"], "description": "delay or run_at, not both",
                "properties": {"delay": {"type": "number"},
                               "run_at": {"type": ["number", "string"]}}},
        "properties": {
            "type": {"type": "string", "minLength": 1, "maxLength": TYPE_MAX,
                     "pattern": _printable_pattern(),
                     "description": f"task type: picks the handler; 1 to {TYPE_MAX} "
                                    "printable characters, not only spaces"},
            "payload": _null({"type": "object", "description": "JSON object handed to the "
                              "handler; at most supervisor.max_payload_bytes"}),
            "priority": _null({"type": "integer", **INT64, "description": "higher runs "
                               "first; default from the type's config"}),
            "delay": _null({"type": "number", "minimum": 0, "maximum": 1e10,
                            "description": "seconds from now before it may run"}),
            "run_at": {"anyOf": [{"type": "number", "minimum": 0, "maximum": LATEST_S},
                                 {"type": "string", "format": "date-time"}, {"type": "null"}],
                       "description": "epoch seconds or ISO 8601 time with a zone (not with "
                                      "delay); a time before 1970 means now"},
            "timeout_s": _null({"type": "number", "exclusiveMinimum": 0,
                                "maximum": LATEST_S}),
            "memory_mb": _null({"type": "integer", "minimum": 1, "maximum": INT64["maximum"]}),
            "max_attempts": _null({"type": "integer", "minimum": 1,
                                   "maximum": INT64["maximum"]}),
            "depends_on": _null({"type": "array", "items": {"type": "string", "minLength": 1},
                                 "description": "ids of tasks that must succeed first"}),
            "dedupe_key": _null({"type": "string", "minLength": 1, "description": "while a "
                                 "task with this key is unfinished, enqueue returns it"}),
            "workflow_id": _null({"type": "string", "minLength": 1,
                                  "description": "join this existing workflow"}),
            "await_event": _null({"type": "string", "minLength": 1, "maxLength": 200,
                                  "pattern": _printable_pattern(),
                                  "description": "stay blocked until an event of this name "
                                  "is sent (POST /api/events/{name}); 1 to 200 printable "
                                  "characters, not only spaces"}),
            "run_on_failure": _null({"type": "boolean", "description": "run even when a "
                                     "dependency failed"}),
            "limit_keys": _null({"type": "array", "maxItems": 16, "items": {
                "type": "string", "pattern": r"^[!-)+-~]{1,200}$"},
                "description": "named limits the task draws from, besides its type's; each "
                               "must match a [limits] entry by name or prefix:*"}),
            "estimated_tokens": _null({"type": "integer", "minimum": 0,
                                       "maximum": INT64["maximum"],
                                       "description": "what the claim charges token budgets"}),
        },
    },
    "Workflow": _obj({
        "id": {"type": "string", "description": "the workflow's id (its root task's), also "
               "when the path named another task of it"},
        "finished": {"type": "boolean", "description": "every task of the workflow is "
                     "finished (those left out of `tasks` too)"},
        "counts": {"type": "object", "additionalProperties": INT,
                   "description": "every task of the workflow by status"},
        "total": {"type": "integer", "minimum": 1,
                  "description": "how many tasks the workflow has"},
        "truncated": {"type": "boolean", "description": "true when `tasks` holds only the "
                      f"oldest {WORKFLOW_TASKS_MAX:,} of `total`: page through all of them "
                      "with GET /api/tasks?workflow_id="},
        "tasks": {"type": "array", "maxItems": WORKFLOW_TASKS_MAX,
                  "items": {"$ref": REF + "TaskSummary"},
                  "description": f"oldest first, at most {WORKFLOW_TASKS_MAX:,}"},
        "edges": {"type": "array", "description": "dependencies and spawns of the tasks "
                  "in `tasks`", "items": _obj({
            "from": STR, "to": STR,
            "kind": {"type": "string", "enum": ["depends_on", "spawned"],
                     "description": "depends_on: to waits for from; spawned: from spawned to"}})}}),
    "WorkflowCancelled": _obj({
        "id": {"type": "string", "description": "the workflow's id (its root task's), also "
               "when the path named another task of it, as GET /api/workflows/{id} answers"},
        "cancelled": {"type": "integer", "description": "blocked or queued tasks "
                                 "cancelled at once"},
        "stopping": {"type": "integer", "description": "running tasks asked to stop"}}),
    "EventSent": _obj({
        "name": STR, "sent": {"type": "boolean", "description": "false: it had been sent "
                              "before, and nothing changed"},
        "released": {"type": "array", "items": STR}}),
    "Awaiting": _obj({"tasks": {"type": "array", "items": {"$ref": REF + "TaskSummary"}}}),
    "Limits": _obj({"now": TIME, "limits": {"type": "array", "items": _obj({
        "key": STR, "limit": _null(STR), "requests_per_minute": _null(NUM),
        "tokens_per_minute": _null(NUM), "concurrency": _null(INT), "burst": _null(NUM),
        "running": INT,
        "available": _obj({"requests": _null(NUM), "tokens": _null(NUM),
                           "concurrency": _null(INT)}),
        "blocked_by": _null({"type": "string", "enum": ["paused", "concurrency", "requests",
                                                        "tokens"]}),
        "paused_until": _null(TIME), "pause_reason": _null(STR), "waiting": INT,
        "oldest_waiting_at": _null(TIME),
        "room_in_s": _null({"type": "number", "description": "seconds until time alone "
                            "frees room; null: only a running task ending can"})})}}),
    "Schedule": _obj({
        "name": STR, "type": STR, "cron": _null(STR), "every_s": _null(NUM), "timezone": STR,
        "catch_up": {"type": "string", "enum": ["skip", "one"]}, "paused": BOOL,
        "payload": {"type": "object"}, "last_fire_at": _null(TIME),
        "last_task_id": _null(STR), "next_fire_at": _null(TIME)}),
    "Schedules": _obj({"now": TIME, "schedules": {"type": "array",
                                                  "items": {"$ref": REF + "Schedule"}}}),
    "Stats": _obj({
        "totals": {"type": "object", "additionalProperties": INT,
                   "description": "tasks by status"},
        "by_type": {"type": "object", "additionalProperties": {
            "type": "object", "additionalProperties": INT}, "description": "status -> type -> n"},
        "oldest_queued_at": _null(TIME),
        "oldest_queued_by_type": {"type": "object", "additionalProperties": TIME},
        "running_reserved_mb": INT,
        "supervisor": _obj({
            "owner": STR, "version": STR, "host": STR, "pool_size": INT, "workers_busy": INT,
            "memory_budget_mb": NUM, "last_loop_at": _null(TIME), "stopping": BOOL,
            "now": TIME}),
    }),
    "Running": _obj({"tasks": {"type": "array", "items": _obj({
        "id": STR, "type": STR, "attempt": INT, "max_attempts": INT, "started_at": _null(TIME),
        "elapsed_s": NUM, "progress": _null(NUM), "progress_message": _null(STR),
        "pid": _null(INT), "rss_bytes": _null(INT), "peak_rss_bytes": _null(INT),
        "cpu_s": _null(NUM), "cpu_percent": _null(NUM), "memory_mb": _null(INT),
        "timeout_s": _null(NUM), "cancel_requested": BOOL, "lease_owner": _null(STR),
        "local": {"type": "boolean", "description": "run by the supervisor answering"}})}}),
    "Queued": _obj({"tasks": {"type": "array", "items": _obj(
        {**TASK_FIELDS, "due": {"type": "boolean", "description": "run_after has passed"}},
        [*TASK_REQUIRED, "due"])}}),
    "Throughput": _obj({
        "bucket_s": INT, "since": TIME, "until": TIME,
        "buckets": {"type": "array", "items": _obj({
            "at": TIME, "succeeded": INT, "failed": INT,
            "other": {"type": "integer", "description": "cancelled, interrupted, rescheduled"}})}}),
    "Output": _obj({
        "id": STR, "status": {"type": "string", "enum": STATUSES},
        "attempt": _null(INT), "text": STR,
        "truncated": {"type": "boolean", "description": "cut at max_output_bytes"}}),
    "Logs": _obj({
        "id": STR, "status": {"type": "string", "enum": STATUSES},
        "attempt": _null(INT), "attempts": {"type": "array", "items": INT},
        "text": {"type": "string", "description": "stdout and stderr, decoded as UTF-8; while "
                 "the attempt runs, a character its last bytes only begin is left for the "
                 "answer after this one (`after_seq`), which starts with it whole"},
        "start": _null(INT), "end": _null(INT), "seq": _null(INT)}),
    "Health": _obj({
        "status": {"type": "string", "enum": ["ok", "unhealthy"]},
        "reasons": {"type": "array", "items": STR}, "owner": STR, "version": STR,
        "loop_age_s": _null(NUM), "workers_busy": INT, "pool_size": INT, "stopping": BOOL}),
}


def _json(ref: str, description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": REF + ref}}}}


def _errors(*codes: int) -> dict:
    text = {400: "bad input; `field` names it", 401: "missing or wrong token",
            404: "no such task (or schedule)", 408: "the body did not arrive in time",
            409: "the task is not failed or cancelled",
            413: "the body is too large", 415: "the body is not JSON",
            503: "the database does not answer"}
    return {str(c): _json("Error", text[c]) for c in codes}


TASK_ID = {"type": "string", "pattern": "^[0-9A-HJKMNP-TV-Z]{26}$",
           "description": "a task id: 26 Crockford base32 digits, upper case"}
ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": STR}
NAME_PARAM = {"name": "name", "in": "path", "required": True, "schema": STR}
LIMIT = {"name": "limit", "in": "query", "required": False,
         "description": "page size, 1 to 1000; empty means the default (50)",
         "schema": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 1000},
                              {"type": "string", "maxLength": 0}]}}
WRITE = [{"bearer": []}]
ATTEMPT = {"name": "attempt", "in": "query", "required": False,
           "description": "attempt number (default: the latest with data)",
           "schema": {"type": "integer", "minimum": 1, "maximum": 1000000000}}


def _op(summary: str, responses: dict, **extra) -> dict:
    return {"summary": summary, "responses": responses, **extra}


PATHS = {
    "/api/tasks": {
        "get": _op("Tasks, newest first, one page at a time", {
            "200": _json("TaskList", "a page of tasks"), **_errors(400, 503)},
            operationId="listTasks", parameters=[
                {"name": "status", "in": "query", "required": False,
                 "description": "empty means any status",
                 "schema": {"type": "string", "enum": [*STATUSES, ""]}},
                {"name": "type", "in": "query", "required": False, "schema": STR},
                LIMIT,
                {"name": "before", "in": "query", "required": False,
                 "description": "next_before of the previous page: a task id (26 "
                                "characters); empty means from the newest",
                 "schema": {"anyOf": [TASK_ID, {"type": "string", "maxLength": 0}]}},
                {"name": "workflow_id", "in": "query", "required": False, "schema": STR,
                 "description": "only the tasks of this workflow"}]),
        "post": _op("Enqueue a task (the fields of Queue.enqueue)", {
            "201": _json("Task", "stored"),
            "200": _json("Task", "an unfinished task already holds this dedupe_key"),
            **_errors(400, 401, 408, 413, 415, 503)},
            operationId="enqueueTask", security=WRITE,
            requestBody={"required": True, "content": {
                "application/json": {"schema": {"$ref": REF + "NewTask"}}}}),
    },
    "/api/tasks/{id}": {
        "get": _op("One task with its attempts", {
            "200": _json("Task", "the task"), **_errors(404, 503)},
            operationId="getTask", parameters=[ID_PARAM]),
    },
    "/api/tasks/{id}/output": {
        "get": _op("The task's streamed output (ctx.stream), whole", {
            "200": _json("Output", "the output of one attempt"), **_errors(400, 404, 503)},
            operationId="taskOutput", parameters=[ID_PARAM, ATTEMPT]),
    },
    "/api/tasks/{id}/logs": {
        "get": _op("The tail of one attempt's stdout and stderr", {
            "200": _json("Logs", "the log of one attempt"), **_errors(400, 404, 503)},
            operationId="taskLogs", parameters=[ID_PARAM, ATTEMPT, {
                "name": "after_seq", "in": "query", "required": False,
                "description": "only chunks after this one (seq of the previous answer)",
                "schema": {"type": "integer", "minimum": -1, "maximum": 1000000000}}]),
    },
    "/api/events": {
        "get": _op("Server-Sent Events: `task` (id, type, status, outcome, progress, message, "
                   "attempt, error) and `output` (id, attempt, pos, text, truncated) events, "
                   "each with an id; send Last-Event-ID to resume", {
            "200": {"description": "an event stream that stays open",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **_errors(400, 503)},
            operationId="events", parameters=[
                {"name": n, "in": "query", "required": False, "schema": STR,
                 "description": d} for n, d in (
                    ("task", "only events of this task"), ("type", "only this task type"),
                    ("workflow", "only this workflow"),
                    ("last_event_id", "resume after this id (as the Last-Event-ID header)"))]),
    },
    "/api/tasks/{id}/cancel": {
        "post": _op("Cancel a waiting task, or ask its supervisor to stop a running one", {
            "200": _json("Task", "the task after the request (a finished one is left as is)"),
            **_errors(401, 404, 503)}, operationId="cancelTask", parameters=[ID_PARAM],
            security=WRITE),
    },
    "/api/tasks/{id}/retry": {
        "post": _op("Queue a failed or cancelled task again, attempts reset", {
            "200": _json("Task", "the task, queued (or blocked on dependencies)"),
            **_errors(401, 404, 409, 503)}, operationId="retryTask", parameters=[ID_PARAM],
            security=WRITE),
    },
    "/api/workflows/{id}": {
        "get": _op(f"A workflow: its tasks (the oldest {WORKFLOW_TASKS_MAX:,}; `truncated` says "
                   "when there are more) and their edges (dependencies and spawns), counts of "
                   "all", {
            "200": _json("Workflow", "the workflow"), **_errors(404, 503)},
            operationId="getWorkflow", parameters=[ID_PARAM]),
    },
    "/api/workflows/{id}/cancel": {
        "post": _op("Cancel every unfinished task of a workflow (running ones are stopped)", {
            "200": _json("WorkflowCancelled", "what was cancelled"),
            **_errors(401, 404, 503)}, operationId="cancelWorkflow", parameters=[ID_PARAM],
            security=WRITE),
    },
    "/api/awaiting": {"get": _op("Tasks blocked until an event is sent, oldest first", {
        "200": _json("Awaiting", "waiting tasks"), **_errors(503)}, operationId="awaiting")},
    "/api/events/{name}": {
        "post": _op("Send an event: release the tasks that await it (a name is sent once)", {
            "200": _json("EventSent", "sent, or already sent before"),
            **_errors(400, 401, 413, 503)}, operationId="sendEvent", security=WRITE,
            parameters=[{"name": "name", "in": "path", "required": True, "schema": STR}],
            requestBody={"required": False, "content": {"application/json": {"schema": _obj(
                {"data": {"description": "any JSON value: the task's ctx.event"}}, [])}}}),
    },
    "/api/stats": {"get": _op("Counts by status and type; this supervisor", {
        "200": _json("Stats", "counts"), **_errors(503)}, operationId="stats")},
    "/api/running": {"get": _op("Running tasks with elapsed time, progress, RSS and CPU", {
        "200": _json("Running", "running tasks, oldest first"), **_errors(503)},
        operationId="running")},
    "/api/queued": {"get": _op("Queued tasks in the order they will be claimed", {
        "200": _json("Queued", "queued tasks"), **_errors(400, 503)},
        operationId="queued", parameters=[LIMIT])},
    "/api/throughput": {"get": _op("Attempts ended per minute over the last hour", {
        "200": _json("Throughput", "60 one-minute buckets, oldest first"), **_errors(503)},
        operationId="throughput")},
    "/api/limits": {"get": _op("Named limits: budget, use, pause and waiting tasks per key", {
        "200": _json("Limits", "every configured limit and every key in use"),
        **_errors(503)}, operationId="limits")},
    "/api/schedules": {"get": _op("Schedules with their last and next fire", {
        "200": _json("Schedules", "every configured schedule"), **_errors(503)},
        operationId="schedules")},
    "/api/schedules/{name}/pause": {"post": _op("Pause a schedule on every supervisor", {
        "200": _json("Schedule", "the schedule, paused"), **_errors(401, 404, 503)},
        operationId="pauseSchedule", parameters=[NAME_PARAM], security=WRITE)},
    "/api/schedules/{name}/resume": {"post": _op(
        "Resume a schedule (fires that passed while paused are not run)", {
            "200": _json("Schedule", "the schedule, running"), **_errors(401, 404, 503)},
        operationId="resumeSchedule", parameters=[NAME_PARAM], security=WRITE)},
    "/api/openapi.json": {"get": _op("This document", {
        "200": {"description": "OpenAPI 3.1", "content": {"application/json": {
            "schema": {"type": "object"}}}}}, operationId="openapi")},
    "/healthz": {"get": _op("Health: the loop ran recently and the database answers", {
        "200": _json("Health", "healthy"), "503": _json("Health", "unhealthy; see reasons")},
        operationId="health")},
    "/metrics": {"get": _op("Prometheus metrics", {"200": {
        "description": "Prometheus text exposition format 0.0.4",
        "content": {"text/plain": {"schema": {"type": "string"}}}}}, operationId="metrics")},
    "/": {"get": _op("The dashboard", {"200": {
        "description": "an HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}},
        operationId="dashboard")},
}


def document(config=None) -> dict:
    """The document; with the supervisor's `config`, the limits that follow it (memory_mb
    at most [supervisor] memory_budget_mb, the payload size) are stated too, and the
    configured schedules' names."""
    schemas = SCHEMAS
    if config is not None:
        schemas = copy.deepcopy(SCHEMAS)
        props = schemas["NewTask"]["properties"]
        budget = config.supervisor.memory_budget_mb
        if budget is not None:
            props["memory_mb"]["maximum"] = budget
            props["memory_mb"]["description"] = ("at most [supervisor] memory_budget_mb "
                                                 f"({budget}): more could never start")
        if config.limits:  # a key must match a configured entry, by name or prefix
            names = sorted(config.limits)
            # Escape what is special in a regular expression (the same in JSON Schema's
            # and Python's): the other characters of a key stand for themselves.
            esc = lambda t: re.sub(r"([\\^$.|?*+()\[\]{}/])", r"\\\1", t)  # noqa: E731
            alts = [esc(n[:-1]) + r"[!-)+-~]*" if n.endswith("*") else esc(n) for n in names]
            props["limit_keys"]["items"]["pattern"] = "^(?:" + "|".join(alts) + ")$"
            props["limit_keys"]["description"] += f" (here: {', '.join(names)})"
        props["payload"]["description"] = (
            f"JSON object handed to the handler; at most {config.supervisor.max_payload_bytes}"
            " bytes as compact UTF-8 JSON (supervisor.max_payload_bytes)")
    paths = PATHS
    names = sorted(getattr(config, "schedules", None) or ())
    if names:  # the pause and resume paths' `name`: one of the configured schedules
        named = {**NAME_PARAM, "schema": {"type": "string", "enum": names}}
        paths = dict(PATHS)
        for action in ("pause", "resume"):
            key = f"/api/schedules/{{name}}/{action}"
            paths[key] = {"post": {**PATHS[key]["post"], "parameters": [named]}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "taskvisor", "version": __version__,
                 "description": "The JSON API of a taskvisor supervisor. Reads are open on "
                 "loopback; writes need `Authorization: Bearer <token>` (the token file "
                 "beside the database, or [http] token_file). Errors are JSON "
                 "{error, field}. A query parameter an operation does not list is refused "
                 "with 400 naming it. Times are ISO 8601 UTC."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"}}},
    }
