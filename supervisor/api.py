"""What each JSON endpoint does: reads through the HTTP side's own store connection,
writes through a `Queue` (the same validation as the Python client), health, and live
figures of running tasks from /proc (supervisor.proctree).

Owns the request checks the Queue does not make (JSON shape, query parameters, ranges
that keep a value storable and printable), the response shapes the OpenAPI document
describes, and the status codes. It runs on the HTTP threads: it never writes SQL, never
signals a process, and only reads plain attributes of the Supervisor.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from typing import Any

from supervisor import __version__, openapi, proctree
from supervisor.errors import InputError, NotFound
from supervisor.output import log_text
from supervisor.store import Status
from supervisor.store.ids import is_task_id
from supervisor.workflow_api import WorkflowEndpoints

MIB = 1024 * 1024
ENQUEUE_FIELDS = ("type", "payload", "priority", "delay", "run_at", "timeout_s", "memory_mb",
                  "max_attempts", "depends_on", "dedupe_key", "workflow_id", "await_event",
                  "run_on_failure", "limit_keys", "estimated_tokens")
FAILED_OUTCOMES = {"error", "timeout", "memory_limit", "crashed", "lost", "dependency_failed"}
THROUGHPUT_CACHE_S = 5.0
MAX_INDEX = 1_000_000_000  # attempt numbers and chunk sequence numbers in a query


class ErrorAnswer(Exception):
    """The error answer this server sends: status, a sentence, the field at fault. Raised
    in an endpoint, turned into the JSON body by http.py; a program calling the API over
    HTTP gets `supervisor.apiclient.ApiError` instead."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: dict | None = None):
        self.status = status
        self.field = field
        self.headers = headers or {}
        super().__init__(message)

    def body(self) -> dict:
        return {"error": str(self), "field": self.field}


class Api(WorkflowEndpoints):
    """The endpoints. `database` is a LockedStore for reads, `queue` a Queue for writes."""

    def __init__(self, sup, database, queue, clock=time.time):
        self.sup = sup
        self.database = database
        self.queue = queue
        self.clock = clock
        self._cpu: dict[int, tuple[float, float]] = {}   # pid -> (monotonic, cpu_s)
        self._throughput: tuple[float, dict] | None = None

    def close(self) -> None:
        self.queue.close()

    # -- tasks ---------------------------------------------------------------------------

    def list_tasks(self, query: dict, body=None) -> tuple[int, dict]:
        status = _opt(query, "status")
        if status is not None and status not in {str(s) for s in Status}:
            raise ErrorAnswer(400, f"unknown status {status!r}: expected one of "
                              f"{', '.join(str(s) for s in Status)}", field="status")
        limit = _limit(query, default=50)
        before = _opt(query, "before")
        if before is not None and not is_task_id(before):
            raise ErrorAnswer(400, f"before must be a task id (26 characters, as next_before "
                              f"gives), got {before!r}", field="before")
        with self.database as store:
            tasks = store.list(status=status, type=_opt(query, "type"),
                               before=before, limit=limit,
                               workflow_id=_opt(query, "workflow_id"))
        return 200, {"tasks": [t.to_dict(with_history=False) for t in tasks],
                     "next_before": tasks[-1].id if len(tasks) == limit else None}

    def get_task(self, query: dict, body=None, *, id: str) -> tuple[int, dict]:
        return 200, self._task(id)

    def enqueue(self, query: dict, body: bytes | None) -> tuple[int, dict]:
        fields = _enqueue_fields(_json_object(body))
        started = self.clock()
        self.queue.config = self.sup.snapshot.config  # per-type defaults as of the last reload
        try:
            task_id = self.queue.enqueue(**fields)
        except InputError as exc:
            raise ErrorAnswer(400, str(exc), field=exc.field) from None
        task = self._task(task_id)
        created = task["created_at"] >= _iso_floor(started)
        return (201 if created else 200), task

    def cancel(self, query: dict, body=None, *, id: str) -> tuple[int, dict]:
        try:
            self.queue.cancel(id)
        except NotFound as exc:
            raise ErrorAnswer(404, str(exc), field="id") from None
        return 200, self._task(id)

    def retry(self, query: dict, body=None, *, id: str) -> tuple[int, dict]:
        try:
            self.queue.retry(id)
        except NotFound as exc:
            raise ErrorAnswer(404, str(exc), field="id") from None
        except InputError as exc:
            raise ErrorAnswer(409, str(exc), field=exc.field) from None
        return 200, self._task(id)

    def output(self, query: dict, body=None, *, id: str) -> tuple[int, dict]:
        """The task's streamed output (ctx.stream), whole: of ?attempt=N, else of the
        attempt that has output."""
        attempt = _attempt(query)
        with self.database as store:
            task = self._exists(store, id)
            out = store.read_output(id, attempt)
        return 200, {"id": id, "status": str(task.status), "attempt": out.attempt,
                     "text": out.text, "truncated": out.truncated}

    def logs(self, query: dict, body=None, *, id: str) -> tuple[int, dict]:
        """The tail of stdout and stderr of one attempt (?attempt=N, default the latest
        that has a log), as text; `after_seq` returns only newer chunks (for --follow)."""
        attempt = _attempt(query)
        after = _opt(query, "after_seq")
        if after is not None and not (is_digits(after.removeprefix("-"))
                                      and -1 <= int(after) <= MAX_INDEX):
            raise ErrorAnswer(400, f"after_seq must be an integer from -1 to {MAX_INDEX}, got "
                              f"{after!r}", field="after_seq")
        after_seq = int(after) if after is not None else -1
        with self.database as store:
            # The task before the chunks: when it says the attempt ended, they are all in.
            task = self._exists(store, id)
            attempts = store.log_attempts(id)
            if attempt is None:
                attempt = attempts[-1] if attempts else None
            # With the reader's last three chunks: a character they cut starts this answer.
            got = [] if attempt is None else store.read_log(id, attempt, max(-1, after_seq - 3))
        before = [c for c in got if c.seq <= after_seq]
        chunks = got[len(before):]
        if before and before[-1].seq != after_seq:
            before = []  # the reader's last chunk is gone (the log keeps its tail)
        ended = not (task.status is Status.RUNNING and task.attempts == attempt)
        text, start, end = log_text(before, chunks, ended)
        return 200, {"id": id, "status": str(task.status), "attempt": attempt,
                     "attempts": attempts, "text": text, "start": start, "end": end,
                     "seq": chunks[-1].seq if chunks else (int(after) if after else None)}

    @staticmethod
    def _exists(store, task_id: str):
        try:
            return store.get(task_id, history=False)
        except NotFound as exc:
            raise ErrorAnswer(404, str(exc), field="id") from None

    def _task(self, task_id: str) -> dict:
        try:
            with self.database as store:
                return store.get(task_id).to_dict()
        except NotFound as exc:
            raise ErrorAnswer(404, str(exc), field="id") from None

    # -- the queue at a glance -----------------------------------------------------------

    def stats(self, query: dict, body=None) -> tuple[int, dict]:
        now = self.clock()
        with self.database as store:
            stats = store.stats(now)
        return 200, {**stats.to_dict(), "supervisor": self._supervisor(now)}

    def queued(self, query: dict, body=None) -> tuple[int, dict]:
        limit = _limit(query, default=50)
        now = self.clock()
        with self.database as store:
            tasks = store.queued_in_order(limit)
        return 200, {"tasks": [{**t.to_dict(with_history=False), "due": t.run_after <= now}
                               for t in tasks]}

    def running(self, query: dict, body=None) -> tuple[int, dict]:
        now = self.clock()
        with self.database as store:
            tasks = store.list(status=str(Status.RUNNING), limit=1000)
        local = self.sup.snapshot.running  # {task id: (peak RSS, timeout_s)}
        out = []
        for task in sorted(tasks, key=lambda t: t.started_at or 0):
            child = local.get(task.id)
            rss, cpu_s, cpu_pct = self._sample(task)
            peak = max(child[0] if child else 0, rss or 0) or None
            out.append({
                "id": task.id, "type": task.type, "attempt": task.attempts,
                "max_attempts": task.max_attempts, "started_at": _iso(task.started_at),
                "elapsed_s": round(max(0.0, now - (task.started_at or now)), 3),
                "progress": task.progress, "progress_message": task.progress_message,
                "pid": task.pid, "rss_bytes": rss, "peak_rss_bytes": peak,
                "cpu_s": cpu_s, "cpu_percent": cpu_pct, "memory_mb": task.memory_mb,
                "timeout_s": child[1] if child else task.timeout_s,
                "cancel_requested": task.cancel_requested, "lease_owner": task.lease_owner,
                "local": child is not None})
        live = {t.pid for t in tasks}
        for pid in [p for p in self._cpu if p not in live]:
            del self._cpu[pid]
        return 200, {"tasks": out}

    def _sample(self, task) -> tuple[int | None, float | None, float | None]:
        """RSS and CPU of the task's process tree, when it runs on this host."""
        host = self.sup.snapshot.host
        if not task.pid or not (task.lease_owner or "").startswith(f"{host}:"):
            return None, None, None
        if task.pid_started_at and not proctree.is_same_process(task.pid, task.pid_started_at):
            return None, None, None  # the pid was reused
        members = proctree.tree(task.pid)
        rss = proctree.rss_bytes(members)
        if rss is None:
            return None, None, None
        cpu = proctree.cpu_seconds(members)
        mono = time.monotonic()
        prev = self._cpu.get(task.pid)
        self._cpu[task.pid] = (mono, cpu)
        pct = None
        if prev is not None and mono - prev[0] > 0.05:
            pct = round(max(0.0, (cpu - prev[1]) / (mono - prev[0]) * 100), 1)
        return rss, round(cpu, 3), pct

    def throughput(self, query: dict, body=None) -> tuple[int, dict]:
        """Attempts that ended per minute over the last hour, by kind of outcome."""
        now = self.clock()
        cached = self._throughput
        if cached is not None and 0 <= now - cached[0] < THROUGHPUT_CACHE_S:
            return 200, cached[1]
        end = math.floor(now / 60) * 60 + 60
        start = end - 60 * 60
        with self.database as store:
            rows = store.recent_attempts(start)
        buckets = [{"at": _iso(start + 60 * i), "succeeded": 0, "failed": 0, "other": 0}
                   for i in range(60)]
        for ended_at, outcome, _type in rows:
            i = int((ended_at - start) // 60)
            if 0 <= i < 60:
                kind = ("succeeded" if outcome == "succeeded"
                        else "failed" if outcome in FAILED_OUTCOMES else "other")
                buckets[i][kind] += 1
        result = {"bucket_s": 60, "since": _iso(start), "until": _iso(end), "buckets": buckets}
        self._throughput = (now, result)
        return 200, result

    # -- flow control ----------------------------------------------------------------------

    def limits(self, query: dict, body=None) -> tuple[int, dict]:
        now = self.clock()
        with self.database as store:
            rows = store.limit_report(self.sup.snapshot.config.limit_table(), now)
        return 200, {"limits": [limit_json(r) for r in rows], "now": _iso(now)}

    def schedules(self, query: dict, body=None) -> tuple[int, dict]:
        from supervisor.schedule import describe
        now = self.clock()
        with self.database as store:
            states, fires = store.schedule_states()
        rows = describe(self.sup.snapshot.config.schedules, states, fires, now)
        return 200, {"schedules": [schedule_json(r) for r in rows], "now": _iso(now)}

    def pause_schedule(self, query: dict, body=None, *, name: str) -> tuple[int, dict]:
        return self._set_paused(name, True)

    def resume_schedule(self, query: dict, body=None, *, name: str) -> tuple[int, dict]:
        return self._set_paused(name, False)

    def _set_paused(self, name: str, paused: bool) -> tuple[int, dict]:
        if name not in self.sup.snapshot.config.schedules:
            raise ErrorAnswer(404, f"no schedule named {name!r} in the config "
                              f"(known: {', '.join(self.sup.snapshot.config.schedules) or 'none'})",
                              field="name")
        self.queue.config = self.sup.snapshot.config
        self.queue.set_schedule_paused(name, paused)
        status, body = self.schedules({})
        return status, next(s for s in body["schedules"] if s["name"] == name)

    # -- health and the document ---------------------------------------------------------

    def healthz(self, query: dict, body=None) -> tuple[int, dict]:
        return health(self.sup, self.database, self.clock())

    def openapi(self, query: dict, body=None) -> tuple[int, dict]:
        return 200, openapi.document(self.sup.snapshot.config)

    def _supervisor(self, now: float) -> dict:
        snap = self.sup.snapshot
        return {"owner": snap.owner, "version": __version__, "host": snap.host,
                "pool_size": snap.pool_size, "workers_busy": snap.busy,
                "memory_budget_mb": round(snap.memory_budget_mb, 1),
                "last_loop_at": _iso(snap.last_loop_at) if snap.last_loop_at else None,
                "stopping": snap.stopping, "now": _iso(now)}


def limit_json(row: dict) -> dict:
    """A row of Store.limit_report with times as ISO 8601 (the /api/limits shape)."""
    return {**row, "paused_until": _iso(row["paused_until"]),
            "oldest_waiting_at": _iso(row["oldest_waiting_at"])}


def schedule_json(row: dict) -> dict:
    return {**row, "last_fire_at": _iso(row["last_fire_at"]),
            "next_fire_at": _iso(row["next_fire_at"])}


def health(sup, database, now: float) -> tuple[int, dict]:
    """200 when the loop ran within the last few poll intervals and the database answers
    a read; 503 with the reasons otherwise. `database` is a LockedStore."""
    from supervisor.errors import StoreError
    snap = sup.snapshot
    limit = max(3 * snap.config.supervisor.poll_interval_s, 5.0)
    reasons = []
    age = now - snap.last_loop_at if snap.last_loop_at else None
    if age is None:
        reasons.append("the supervisor loop has not started")
    elif age > limit:
        reasons.append(f"the supervisor loop last ran {age:.1f}s ago (limit {limit:g}s): "
                       "it is stuck")
    try:
        with database as store:
            store.supervisors()
    except StoreError as exc:
        reasons.append(f"the database does not answer: {exc}")
    # The file's identity is fixed once the loop is ready; one stat here, so /healthz
    # is right even before the loop's own check (every second) noticed.
    dbfile = getattr(sup, "dbfile", None)
    problem = dbfile.problem() if dbfile is not None else None
    if problem:
        reasons.append(f"{problem}; the supervisor is stopping")
    if not snap.store_ok:
        reasons.append("the supervisor's last database write failed; finished attempts "
                       "wait in memory")
    body = {"status": "unhealthy" if reasons else "ok", "reasons": reasons,
            "owner": snap.owner, "version": __version__,
            "loop_age_s": None if age is None else round(max(0.0, age), 3),
            "workers_busy": snap.busy, "pool_size": snap.pool_size,
            "stopping": snap.stopping}
    return (503 if reasons else 200), body


# -- input checks --------------------------------------------------------------------------

def is_digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() is also true of "²" and other digits int() refuses
    (a 500 and a traceback in the log for `?limit=%C2%B2`)."""
    return text.isascii() and text.isdigit()


def _opt(query: dict, key: str) -> str | None:
    value = query.get(key)
    return value if value else None


def _limit(query: dict, default: int) -> int:
    raw = _opt(query, "limit")
    if raw is None:
        return default
    if not is_digits(raw) or not 1 <= int(raw) <= 1000:
        raise ErrorAnswer(400, f"limit must be an integer from 1 to 1000, got {raw!r}",
                          field="limit")
    return int(raw)


def _attempt(query: dict) -> int | None:
    raw = _opt(query, "attempt")
    if raw is None:
        return None
    if not is_digits(raw) or not 1 <= int(raw) <= MAX_INDEX:
        raise ErrorAnswer(400, f"attempt must be an integer from 1 to {MAX_INDEX}, got {raw!r}",
                          field="attempt")
    return int(raw)


def _json_object(body: bytes | None) -> dict:
    if not body:
        raise ErrorAnswer(400, "send a JSON object with at least \"type\"", field="body")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates fail here
    except UnicodeError:
        raise ErrorAnswer(400, "the body is not valid UTF-8 (or holds a lone surrogate "
                          "escape)", field="body") from None
    except (ValueError, RecursionError) as exc:
        raise ErrorAnswer(400, f"the body is not valid JSON: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise ErrorAnswer(400, "the body must be a JSON object", field="body")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _enqueue_fields(data: dict) -> dict[str, Any]:
    unknown = sorted(set(data) - set(ENQUEUE_FIELDS))
    if unknown:
        raise ErrorAnswer(400, f"unknown field {unknown[0]!r}; expected some of "
                          f"{', '.join(ENQUEUE_FIELDS)}", field=unknown[0])
    if "type" not in data:
        raise ErrorAnswer(400, "type is required", field="type")
    for key in ("type", "dedupe_key", "workflow_id", "await_event"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ErrorAnswer(400, f"{key} must be a string", field=key)
    if data.get("payload") is not None and not isinstance(data["payload"], dict):
        raise ErrorAnswer(400, "payload must be a JSON object", field="payload")
    keys = data.get("limit_keys")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise ErrorAnswer(400, "limit_keys must be an array of strings", field="limit_keys")
    for key in ("priority", "memory_mb", "max_attempts", "estimated_tokens"):  # ranges: Queue.enqueue checks
        value = data.get(key)
        if isinstance(value, float) and value.is_integer():
            data[key] = int(value)  # JSON Schema counts 3.0 as an integer
    if data.get("run_on_failure") is not None and not isinstance(data["run_on_failure"], bool):
        raise ErrorAnswer(400, "run_on_failure must be true or false", field="run_on_failure")
    deps = data.get("depends_on")
    if deps is not None and (not isinstance(deps, list)
                             or not all(isinstance(d, str) and d for d in deps)):
        raise ErrorAnswer(400, "depends_on must be an array of task ids", field="depends_on")
    if isinstance(data.get("run_at"), str):
        data["run_at"] = _datetime(data["run_at"])
    return {k: v for k, v in data.items() if v is not None or k == "type"}


def _datetime(text: str) -> float:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ErrorAnswer(400, f"run_at must be epoch seconds or an ISO 8601 time with a "
                          f"time zone, got {text!r}", field="run_at") from None
    if value.tzinfo is None:
        raise ErrorAnswer(400, "run_at needs a time zone (e.g. 2030-01-01T09:00:00Z)",
                          field="run_at")
    # A time before 1970 is valid ISO 8601 and simply past: the task is due now.
    return max(0.0, value.timestamp())


def _iso(ts: float | None) -> str | None:
    from supervisor.store import iso
    return iso(ts)


def _iso_floor(ts: float) -> str:
    """The ISO text of `ts` rounded down to the millisecond (to_dict's precision)."""
    return _iso(math.floor(ts * 1000) / 1000)
