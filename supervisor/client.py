"""The Python client: `Queue`, how applications, the CLI and the HTTP API put tasks in and
look at them.

Owns input validation (type, payload as a JSON object within the size limit, delays,
limits), filling per-type defaults from the config, the wake-up hint after a commit, and
`wait`, which sleeps between cheap `PRAGMA data_version` polls. It never writes SQL (that
is `supervisor.store`), never runs a task and never imports user code.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from supervisor import config as _config
from supervisor.dbfile import refuse_if_served
from supervisor import flowconfig, names
from supervisor.errors import InputError, NotFound
from supervisor.store import FINAL, NewTask, Stats, Status, Store, Task, new_id
from supervisor.store.tasks import check_dependencies_without_database
from supervisor.store.ids import is_task_id
from supervisor.wake import WakeSender
from supervisor.workflow_client import WorkflowCalls, check_event_name

_STATUSES = ", ".join(str(s) for s in Status)
_ITEM_KEYS = frozenset({"id", "type", "payload", "priority", "delay", "run_at", "timeout_s",
                        "memory_mb", "max_attempts", "depends_on", "dedupe_key",
                        "workflow_id", "await_event", "run_on_failure",
                        "limit_keys", "estimated_tokens"})
_POLL_FIRST_S = 0.005   # first sleep of wait(); doubles up to _POLL_MAX_S
_POLL_MAX_S = 0.1
_REREAD_S = 1.0         # re-read the row at least this often, whatever data_version says


class Queue(WorkflowCalls):
    """A handle on one taskvisor database: enqueue, get, list, cancel, retry, wait, stats.

    `path_or_config` is a `Config`, a path to a database file (with built-in defaults plus
    the TASKVISOR_* environment), a path ending in `.toml` (a config file), or None (config
    discovery: $TASKVISOR_CONFIG, else ./taskvisor.toml, else defaults with ./taskvisor.db).
    Raises ConfigError at construction when the config is invalid.

    Any process may use it, before or after fork: the database is opened lazily, once per
    process (a Queue inherited by a forked child opens its own connection on first use and
    never touches the parent's). Any thread may use it: calls are serialised by a lock;
    for parallel reads give each thread its own Queue. `create=False` refuses to create a
    missing database file (StoreUnavailable) instead of creating an empty one; so does
    `create=True` while a live supervisor's registration names the missing file (it was
    deleted under that supervisor: a new file would be a second database nobody serves).
    Errors: InputError (NotFound, DependencyError) for bad input, with nothing written;
    StoreError subclasses when the database fails. Times are epoch seconds.
    """

    def __init__(self, path_or_config: _config.Config | str | os.PathLike | None = None, *,
                 create: bool = True):
        if isinstance(path_or_config, _config.Config):
            cfg = path_or_config
        elif path_or_config is None:
            cfg = _config.load(_config.find(None))
        elif Path(path_or_config).suffix == ".toml":
            cfg = _config.load(_config.find(path_or_config))
        else:
            cfg = _config.load(None).with_database(path_or_config)
        self.config = cfg
        self.path = cfg.supervisor.database
        self._create = create
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._store: Store | None = None
        self._waker: WakeSender | None = None

    # -- the connection, once per process --------------------------------------------------

    def _open(self) -> Store:
        """The store of this process; call with the lock held."""
        if self._store is None:
            if self._create and not os.path.exists(self.path):
                refuse_if_served(self.path)  # deleted under a running supervisor?
            sup = self.config.supervisor
            self._store = Store(self.path, synchronous=sup.synchronous,
                                busy_timeout_s=sup.busy_timeout_s, create=self._create)
            self._waker = WakeSender(self._store, socket.gethostname())
        return self._store

    def _call(self, fn, *, notify: bool = False):
        if self._pid != os.getpid():
            # Forked: the lock may have been held by a parent thread, and the parent's
            # connection must never be used or closed here (store.connection keeps it alive).
            self._lock = threading.Lock()
            self._pid = os.getpid()
            self._store = self._waker = None
        with self._lock:
            result = fn(self._open())
            if notify and self._waker is not None:
                self._waker.notify()
            return result

    def close(self) -> None:
        """Close this process's connection (one inherited across fork is only dropped)."""
        if self._pid != os.getpid():
            self._store = self._waker = None  # never take a lock inherited across fork
            return
        with self._lock:
            if self._waker is not None:
                self._waker.close()
            if self._store is not None:
                self._store.close()
            self._store = self._waker = None

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------

    def enqueue(self, type: str, payload: Mapping[str, Any] | None = None, *,
                priority: int | None = None, delay: float | dt.timedelta | None = None,
                run_at: float | dt.datetime | None = None, timeout_s: float | None = None,
                memory_mb: int | None = None, max_attempts: int | None = None,
                depends_on: Iterable[str] = (), dedupe_key: str | None = None,
                workflow_id: str | None = None, await_event: str | None = None,
                run_on_failure: bool = False, limit_keys: Iterable[str] = (),
                estimated_tokens: int | None = None) -> str:
        """Store one task durably and return its id (or, with `dedupe_key` held by an
        unfinished task, that task's id). `delay` is seconds from now; `run_at` an epoch
        time or an aware datetime. Priority and max_attempts default to the type's config.
        `workflow_id` joins an existing workflow (default: the task starts its own);
        `await_event` keeps it blocked until `send_event(name)`; `run_on_failure` runs it
        even when a dependency failed (ctx.inputs then holds that dependency's error).
        `limit_keys` adds named limits (e.g. "tenant:42") to the type's `limits`; the
        claim charges them `estimated_tokens` (else the type's, else the payload's
        max_tokens, else each limit's own estimate)."""
        now = time.time()
        task = self._new_task(dict(type=type, payload=payload, priority=priority, delay=delay,
                                   run_at=run_at, timeout_s=timeout_s, memory_mb=memory_mb,
                                   max_attempts=max_attempts, depends_on=depends_on,
                                   dedupe_key=dedupe_key, workflow_id=workflow_id,
                                   await_event=await_event, run_on_failure=run_on_failure,
                                   limit_keys=limit_keys, estimated_tokens=estimated_tokens), now)
        self._check_new_file([task], now)
        return self._call(lambda s: s.enqueue(task, now), notify=True)

    def prepare(self, type: str, payload: Mapping[str, Any] | None = None,
                priority: int | None = None) -> NewTask:
        """Check a task and fill its defaults as `enqueue` does, without storing it (for
        the schedule step, which stores it in the transaction that claims its fire)."""
        return self._new_task({"type": type, "payload": payload, "priority": priority},
                              time.time())

    def enqueue_many(self, items: Iterable[Mapping[str, Any]]) -> list[str]:
        """Store every item in one transaction, all or nothing; returns their ids in order.

        Each item is a dict with "type" and the keyword names of `enqueue`, plus an
        optional "id": a name, unique in the batch, that other items may list in their
        "depends_on". Each task still gets a fresh time-ordered id, returned here."""
        now = time.time()
        items = list(items)
        ids = [new_id(now) for _ in items]
        names: dict[str, str] = {}
        for n, (item, task_id) in enumerate(zip(items, ids)):
            if not isinstance(item, Mapping):
                raise InputError(f"item {n}: expected a dict, got {_kind(item)}", field="items")
            unknown = sorted(set(item) - _ITEM_KEYS)
            if unknown:
                raise InputError(f"item {n}: unknown key {unknown[0]!r}", field=unknown[0])
            if "id" in item:
                name = item["id"]
                if not isinstance(name, str) or not name:
                    raise InputError(f"item {n}: id must be a non-empty string", field="id")
                if name in names:
                    raise InputError(f"item {n}: id {name!r} is used twice in the batch", field="id")
                names[name] = task_id
        tasks = []
        for n, (item, task_id) in enumerate(zip(items, ids)):
            fields = {"type": None, **{k: v for k, v in item.items() if k != "id"}}
            try:
                task = self._new_task(fields, now, task_id=task_id)
            except InputError as exc:
                raise InputError(f"item {n}: {exc}", field=exc.field) from None
            deps = tuple(names.get(d, d) for d in task.depends_on)
            aliases = tuple((names[d], d) for d in task.depends_on if d in names)
            wid = task.workflow_id
            tasks.append(dataclasses.replace(task, depends_on=deps, aliases=aliases,
                                             workflow_id=names.get(wid, wid)))
        if not tasks:
            return []
        self._check_new_file(tasks, now)
        return self._call(lambda s: s.enqueue_many(tasks, now), notify=True)

    def _check_new_file(self, tasks: list[NewTask], now: float) -> None:
        """Before an enqueue creates the database file: refuse input the store would
        refuse (a dependency cannot exist in a file that does not), so a failed enqueue
        leaves no empty file behind."""
        if self._store is None and any(t.depends_on or t.workflow_id for t in tasks) \
                and not os.path.exists(self.path):
            check_dependencies_without_database(tasks, now)
            ids = {t.id for t in tasks}
            for t in tasks:  # no workflow to join either
                if t.workflow_id and t.workflow_id not in ids:
                    from supervisor.errors import DependencyError
                    raise DependencyError(f"workflow_id names unknown workflow {t.workflow_id}",
                                          field="workflow_id")

    def cancel(self, task_id: str) -> Status:
        """Cancel a blocked or queued task at once (its dependents fail); for a running one,
        ask its supervisor to stop it (returns running). A finished task is left as is.
        Returns the status after the call. Raises NotFound."""
        task_id = _check_id(task_id)
        return self._call(lambda s: s.cancel(task_id, time.time()), notify=True)

    def retry(self, task_id: str) -> Status:
        """Queue a failed or cancelled task again with its attempts reset; returns queued
        (or blocked, waiting on dependencies). Raises NotFound, or InputError for a task
        in any other status."""
        task_id = _check_id(task_id)
        return self._call(lambda s: s.retry(task_id, time.time()), notify=True)

    def prune(self, older_than_s: float) -> int:
        """Delete finished tasks completed more than `older_than_s` seconds ago; returns
        how many."""
        older = _seconds(older_than_s, "older_than_s", minimum=0.0)
        return self._call(lambda s: s.prune(time.time() - older))

    def set_schedule_paused(self, name: str, paused: bool) -> None:
        """Pause or resume the schedule `name` for every supervisor on the database (a
        resumed schedule does not run the fires that passed while it was paused).
        Raises InputError when the config has no such schedule."""
        if name not in self.config.schedules:
            raise InputError(f"no schedule named {name!r} in the config (known: "
                             f"{', '.join(self.config.schedules) or 'none'})", field="name")
        self._call(lambda s: s.set_schedule_paused(name, paused, time.time()))

    def limits(self) -> list[dict]:
        """Each named limit key: its budget, use, pause and waiting tasks (epoch times)."""
        return self._call(lambda s: s.limit_report(self.config.limit_table(), time.time()))

    def schedules(self) -> list[dict]:
        """Each configured schedule with its last and next fire (epoch times)."""
        from supervisor.schedule import describe
        states, fires = self._call(lambda s: s.schedule_states())
        return describe(self.config.schedules, states, fires, time.time())

    # -- reading ---------------------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        """The task with its attempt history. Raises NotFound."""
        task_id = _check_id(task_id)
        return self._call(lambda s: s.get(task_id))

    def resolve_id(self, text: str) -> str:
        """The full id of a task given its id or a unique end of it, like git's short
        hashes: the dashboard shows the last 8 characters. Case does not matter for
        generated ids. Raises NotFound, or InputError naming the candidates when the end
        is shared by several tasks (give more characters)."""
        text = _check_id(text).strip()
        return self._resolve_end(text, "id", f"no task with id {text} (nor one whose id "
                                             "ends with it)")

    def _resolve_end(self, text: str, field: str, unknown: str) -> str:
        """The task id equal to `text`, else the one id ending with it; NotFound saying
        `unknown`, or InputError naming two candidates, both for `field`."""
        found = self._call(lambda s: s.ids_matching(text, limit=3))
        if not found and text != text.upper():
            found = self._call(lambda s: s.ids_matching(text.upper(), limit=3))
        if len(found) == 1:
            return found[0]
        if not found:
            raise NotFound(unknown, field=field)
        more = ", …" if len(found) > 2 else ""
        raise InputError(f"{text!r} is the end of more than one task id ({', '.join(found[:2])}"
                         f"{more}): give more characters", field=field)

    def list(self, status: str | Status | None = None, type: str | None = None,
             limit: int = 100, before: str | None = None,
             workflow_id: str | None = None) -> list[Task]:
        """Newest first, at most `limit` (1..10000); `before` is the last id of the
        previous page (a whole task id); `workflow_id` keeps the tasks of that workflow
        (named as `resolve_workflow_id` takes it). Raises InputError for an unknown
        status or a `before` that is not a task id, NotFound for an unknown workflow."""
        if status is not None:
            try:
                status = Status(status)
            except ValueError:
                raise InputError(f"unknown status {status!r}: expected one of {_STATUSES}",
                                 field="status") from None
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10000:
            raise InputError(f"limit must be an integer from 1 to 10000, got {limit!r}",
                             field="limit")
        if type is not None and not isinstance(type, str):
            raise InputError(f"type must be a string, got {_kind(type)}", field="type")
        if before is not None and not is_task_id(before):
            raise InputError(f"before must be a task id (26 characters: the last id of the "
                             f"previous page), got {before!r}", field="before")
        if workflow_id is not None:
            workflow_id = self.resolve_workflow_id(workflow_id)
        return self._call(lambda s: s.list(status=status and str(status), type=type,
                                           before=before, limit=limit, workflow_id=workflow_id))

    def stats(self) -> Stats:
        """Counts by status and type, and the oldest due queued task."""
        return self._call(lambda s: s.stats(time.time()))

    def supervisors(self) -> list[dict[str, Any]]:
        """Every supervisor registered on this database (a crashed one stays until its
        successor removes it; compare `heartbeat_at` with the lease length)."""
        keys = ("owner", "host", "pid", "pid_started_at", "started_at", "heartbeat_at",
                "wake_port", "pool_size", "version")
        return [dict(zip(keys, row)) for row in self._call(lambda s: s.supervisors())]

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """Block until the task is succeeded, failed or cancelled and return it.

        Sleeps between polls of `PRAGMA data_version` (5 ms growing to 100 ms) and reads
        the row only when the file changed (and at least once a second), so a waiting
        process costs well under 1% of a core. Raises NotFound, or TimeoutError after
        `timeout` seconds (None waits for ever)."""
        task_id = _check_id(task_id)
        if timeout is not None:
            timeout = _seconds(timeout, "timeout", minimum=0.0)
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        task = self.get(task_id)
        version = self._call(lambda s: s.data_version())
        read_mono, sleep_s = start, _POLL_FIRST_S
        while task.status not in FINAL:
            now_mono = time.monotonic()
            if deadline is not None and now_mono >= deadline:
                raise TimeoutError(f"task {task_id} is still {task.status} after {timeout:g}s")
            time.sleep(sleep_s if deadline is None else min(sleep_s, deadline - now_mono))
            sleep_s = min(sleep_s * 2, _POLL_MAX_S)
            latest = self._call(lambda s: s.data_version())
            if latest != version or time.monotonic() - read_mono >= _REREAD_S:
                version, read_mono = latest, time.monotonic()
                task = self.get(task_id)
        return task

    # -- validation ------------------------------------------------------------------------

    def _new_task(self, f: dict[str, Any], now: float, task_id: str | None = None) -> NewTask:
        """Check one task's fields and fill defaults; raises InputError naming the field."""
        type_ = f["type"]
        if not isinstance(type_, str) or not type_.strip():
            raise InputError(f"type must be a non-empty string, got {type_!r}", field="type")
        if why := names.problem(type_):
            raise InputError(f"type {why}", field="type")
        payload = self._payload(f.get("payload"))
        priority = f.get("priority")
        priority = self.config.setting(type_, "priority") if priority is None else priority
        _integer(priority, "priority")
        max_attempts = f.get("max_attempts")
        if max_attempts is None:
            max_attempts = self.config.setting(type_, "max_attempts")
        _integer(max_attempts, "max_attempts", minimum=1)
        memory_mb = f.get("memory_mb")
        if memory_mb is not None:
            _integer(memory_mb, "memory_mb", minimum=1)
            budget = self.config.supervisor.memory_budget_mb
            if budget is not None and memory_mb > budget:
                raise InputError(f"memory_mb {memory_mb} is over [supervisor] memory_budget_mb "
                                 f"{budget}: such a task could never start", field="memory_mb")
        timeout_s = f.get("timeout_s")
        if timeout_s is not None:
            timeout_s = _seconds(timeout_s, "timeout_s", minimum=0.0, above=True)
        key = f.get("dedupe_key")
        if key is not None and (not isinstance(key, str) or not key):
            raise InputError(f"dedupe_key must be a non-empty string, got {key!r}",
                             field="dedupe_key")
        workflow_id = f.get("workflow_id")
        if workflow_id is not None:
            _check_id(workflow_id, "workflow_id")
        await_event = f.get("await_event")
        if await_event is not None:
            check_event_name(await_event, "await_event")
        run_on_failure = f.get("run_on_failure", False)
        if not isinstance(run_on_failure, bool):
            raise InputError(f"run_on_failure must be true or false, got {_kind(run_on_failure)}",
                             field="run_on_failure")
        keys = self._limit_keys(type_, f.get("limit_keys"))
        estimated = f.get("estimated_tokens")
        source = "estimated_tokens"
        if estimated is not None:
            _integer(estimated, "estimated_tokens", minimum=0)
        elif keys:
            type_config = self.config.types.get(type_)
            estimated = flowconfig.task_estimate(type_config, f.get("payload"))
            source = (f"[types.{_config.toml_string(type_)}] estimated_tokens"
                      if type_config is not None and type_config.estimated_tokens is not None
                      else "the payload's output cap (max_tokens, max_completion_tokens)")
        if keys:
            self._check_estimate(keys, estimated, source)
        return NewTask(type=type_, payload=payload, priority=priority,
                       run_after=_run_after(f.get("delay"), f.get("run_at"), now),
                       timeout_s=timeout_s, memory_mb=memory_mb, max_attempts=max_attempts,
                       depends_on=_deps(f.get("depends_on", ())), dedupe_key=key, id=task_id,
                       workflow_id=workflow_id, await_event=await_event,
                       run_on_failure=run_on_failure,
                       limit_keys=keys, estimated_tokens=estimated if keys else None)

    def _limit_keys(self, type_: str, extra: Any) -> tuple[str, ...]:
        """The type's limits plus the task's own keys, checked; InputError names the key."""
        extra = _one_or_many(extra, "limit_keys", "a list of strings")
        table = self.config.limit_table()
        for key in extra:
            if not isinstance(key, str) or not flowconfig.KEY_RE.fullmatch(key):
                raise InputError(f"limit_keys: {key!r} is not a limit key (1-200 printable "
                                 "ASCII characters, no spaces, no *)", field="limit_keys")
            if table and table.spec(key) is None:
                raise InputError(f"limit_keys: {key!r} matches no [limits] entry of the config "
                                 f"(names: {', '.join(sorted(table.specs))})", field="limit_keys")
        keys = tuple(dict.fromkeys((*self.config.type_limits(type_), *extra)))
        if len(keys) > flowconfig.MAX_KEYS:
            raise InputError(f"limit_keys: at most {flowconfig.MAX_KEYS} keys per task",
                             field="limit_keys")
        return keys

    def _check_estimate(self, keys: tuple[str, ...], estimated: int | None, source: str) -> None:
        """Refuse a task that would charge one of its limits more tokens than that limit
        allows in a minute (flowconfig.over_budget); InputError names the key."""
        over = flowconfig.over_budget(keys, estimated, self.config.limit_table())
        if over is not None:
            key, spec, tokens = over
            if estimated is None:
                source = f"[limits.{_config.toml_string(spec.name)}] estimated_tokens"
            raise InputError(f"estimated_tokens: {source} is {tokens}, more than limit {key!r} "
                             f"allows in a minute (tokens_per_minute = "
                             f"{spec.tokens_per_minute:g}): it could never run within it",
                             field="estimated_tokens")

    def _payload(self, payload: Any) -> str:
        if payload is None:
            payload = {}
        if not isinstance(payload, Mapping):
            raise InputError(f"payload must be a JSON object, got {_kind(payload)}",
                             field="payload")
        try:
            text = json.dumps(dict(payload), allow_nan=False, ensure_ascii=False,
                              separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise InputError(f"payload is not JSON-serialisable: {exc}", field="payload") from None
        except RecursionError:
            raise InputError("payload is not JSON-serialisable: nested too deeply",
                             field="payload") from None
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise InputError("payload holds a lone surrogate (\\ud800-\\udfff), which is not "
                             "valid UTF-8; send proper Unicode text", field="payload") from None
        limit = self.config.supervisor.max_payload_bytes
        if size > limit:
            raise InputError(f"payload is {size} bytes, over the limit of {limit} bytes "
                             "(supervisor.max_payload_bytes)", field="payload")
        return text


def _run_after(delay: Any, run_at: Any, now: float) -> float | None:
    if delay is not None and run_at is not None:
        raise InputError("give delay or run_at, not both", field="delay")
    if delay is not None:
        if isinstance(delay, dt.timedelta):
            delay = delay.total_seconds()
        return _seconds(now + _seconds(delay, "delay", minimum=0.0), "delay", minimum=0.0)
    if run_at is None:
        return None
    if isinstance(run_at, dt.datetime):
        if run_at.tzinfo is None or run_at.utcoffset() is None:
            raise InputError("run_at must be a timezone-aware datetime (or epoch seconds)",
                             field="run_at")
        return _seconds(run_at.timestamp(), "run_at", minimum=0.0)
    return _seconds(run_at, "run_at", minimum=0.0)


def _one_or_many(value: Any, field: str, expected: str) -> tuple:
    """None -> (), one string -> (it,) (not its characters), any other iterable -> a
    tuple; InputError naming `field` otherwise."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise InputError(f"{field} must be {expected}, got {_kind(value)}", field=field) from None


def _deps(depends_on: Any) -> tuple[str, ...]:
    deps = _one_or_many(depends_on, "depends_on", "a list of task ids")
    for dep in deps:
        _check_id(dep, "depends_on")
    return deps


def _check_id(task_id: Any, field: str = "id") -> str:
    if not isinstance(task_id, str) or not task_id:
        raise InputError(f"{field} must be a non-empty task id string, got {task_id!r}",
                         field=field)
    return task_id


INT64 = 2 ** 63 - 1
LATEST_S = 253402300799.0  # 9999-12-31T23:59:59Z: the last time ISO 8601 output can show


def _integer(value: Any, field: str, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{field} must be an integer, got {_kind(value)}", field=field)
    if minimum is not None and value < minimum:
        raise InputError(f"{field} must be >= {minimum}, got {value}", field=field)
    if not -INT64 - 1 <= value <= INT64:
        raise InputError(f"{field} must fit in 64 bits, got {value}", field=field)


def _seconds(value: Any, field: str, minimum: float, above: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{field} must be a number of seconds, got {_kind(value)}", field=field)
    value = float(value)
    if not math.isfinite(value) or value < minimum or (above and value == minimum):
        sign = ">" if above else ">="
        raise InputError(f"{field} must be a finite number {sign} {minimum:g}, got {value:g}",
                         field=field)
    if value > LATEST_S:
        raise InputError(f"{field} must be before the year 10000, got {value:g}", field=field)
    return value


def _kind(value: Any) -> str:
    names = {list: "an array", tuple: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
