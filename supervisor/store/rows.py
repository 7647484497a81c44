"""Typed rows the store hands out: frozen dataclasses and the status/outcome enums.

Owns the mapping from SQL rows to Python values and the JSON shape of a task that the
CLI and the HTTP API print. It must never run SQL.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    BLOCKED = "blocked"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
UNFINISHED = frozenset({Status.BLOCKED, Status.QUEUED, Status.RUNNING})


class Outcome(StrEnum):
    """How one attempt ended (plus how a task that never ran ended)."""
    SUCCEEDED = "succeeded"
    ERROR = "error"                # the handler raised
    TIMEOUT = "timeout"            # wall-clock limit
    MEMORY_LIMIT = "memory_limit"  # RSS watchdog or RLIMIT_DATA
    CRASHED = "crashed"            # died by a signal or a non-zero exit without a report
    LOST = "lost"                  # the lease expired: its supervisor died or hung
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"    # supervisor shutdown; requeued, no attempt spent
    RESCHEDULED = "rescheduled"    # the handler raised Retry; no attempt spent
    DEPENDENCY_FAILED = "dependency_failed"  # never ran: a task it depends on failed


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> ISO 8601 UTC with milliseconds, e.g. 2026-11-22T08:34:01.123Z."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(text: str | None) -> Any:
    if text is None:
        return None
    return {} if text == "{}" else json.loads(text)  # the common empty payload: skip the parser


@dataclass(frozen=True)
class Lease:
    """What fences every write of one attempt."""
    id: str
    attempt: int
    owner: str


@dataclass(frozen=True)
class Attempt:
    id: int
    task_id: str
    attempt: int
    owner: str
    started_at: float
    ended_at: float | None
    outcome: str | None
    reason: str | None
    error: dict | None
    exit_code: int | None
    signal: str | None
    pid: int | None
    peak_rss_bytes: int | None
    cpu_s: float | None
    wall_s: float | None
    ran_in: str | None = None  # "process", "relay" (hosted: no memory_mb, cpu_s) or None: not known

    COLUMNS = ("id, task_id, attempt, owner, started_at, ended_at, outcome, reason, error, "
               "exit_code, signal, pid, peak_rss_bytes, cpu_s, wall_s, ran_in")

    @classmethod
    def from_row(cls, row: tuple) -> "Attempt":
        values = list(row)
        values[8] = _json(values[8])
        return cls(*values)

    def to_dict(self) -> dict:
        return {
            "attempt": self.attempt, "owner": self.owner,
            "started_at": iso(self.started_at), "ended_at": iso(self.ended_at),
            "outcome": self.outcome, "reason": self.reason, "error": self.error,
            "exit_code": self.exit_code, "signal": self.signal, "pid": self.pid,
            "peak_rss_bytes": self.peak_rss_bytes, "cpu_s": self.cpu_s, "wall_s": self.wall_s,
            "ran_in": self.ran_in,
        }


@dataclass(frozen=True)
class Task:
    id: str
    type: str
    payload: dict
    priority: int
    status: Status
    created_at: float
    started_at: float | None
    completed_at: float | None
    run_after: float
    attempts: int
    max_attempts: int
    timeout_s: float | None
    memory_mb: int | None
    cpu_s: float | None
    lease_owner: str | None
    lease_expires_at: float | None
    reserved_mb: int
    pid: int | None
    pid_started_at: float | None
    cancel_requested: bool
    progress: float | None
    progress_message: str | None
    result: Any
    error: str | None
    outcome: str | None
    dedupe_key: str | None
    parent_id: str | None
    workflow_id: str | None              # None in the row: its own id (see `workflow`)
    await_event: str | None
    run_on_failure: bool
    claim_reads: int                     # what a claim reads besides the row (migration 0008)
    limit_keys: tuple[str, ...] = ()      # the limits it draws from (type's and its own)
    estimated_tokens: int | None = None   # what a claim charges token budgets
    schedule: str | None = None           # the schedule that enqueued it
    scheduled_for: float | None = None    # the fire time it stands for
    relay_losses: int = 0                 # started attempts lost with their relay (0012)
    depends_on: tuple[str, ...] = ()
    history: tuple[Attempt, ...] = field(default=(), compare=False)
    # What the attempt's process gets besides the row, read at claim when claim_reads is
    # set: {"inputs": {...}, "input_errors": [...], "event": ..., "checkpoint_state": ...}.
    context: dict | None = field(default=None, compare=False)

    COLUMNS = ("id, type, payload, priority, status, created_at, started_at, completed_at, "
               "run_after, attempts, max_attempts, timeout_s, memory_mb, cpu_s, lease_owner, "
               "lease_expires_at, reserved_mb, pid, pid_started_at, cancel_requested, progress, "
               "progress_message, result, error, outcome, dedupe_key, parent_id, workflow_id, "
               "await_event, run_on_failure, claim_reads, limit_keys, estimated_tokens, "
               "schedule, scheduled_for, relay_losses")

    @classmethod
    def from_row(cls, row: tuple, depends_on: tuple[str, ...] = (),
                 history: tuple[Attempt, ...] = ()) -> "Task":
        v = list(row)
        v[4] = _STATUS[v[4]]
        v[19] = bool(v[19])
        v[22] = _json(v[22])
        v[29] = bool(v[29])
        keys = v[31]
        if keys:
            parsed = _KEYS.get(keys)
            if parsed is None:
                parsed = tuple(json.loads(keys))
                if len(_KEYS) < 10_000:  # a few distinct limit groups, parsed once each
                    _KEYS[keys] = parsed
            v[31] = parsed
        else:
            v[31] = ()
        # The generated __init__ of a frozen dataclass sets 28 fields one by one through
        # object.__setattr__: a third of a claim's Python time. Same object, filled at once.
        task = _new(cls)
        d = task.__dict__
        d.update(zip(_TASK_FIELDS, v))
        # The payload stays JSON text until something reads it: the supervisor passes the
        # text through to the task process and never decodes it (see __getattr__).
        d["payload_json"] = d.pop("payload")
        d["depends_on"] = depends_on
        d["history"] = history
        d["context"] = None
        return task

    def __getattr__(self, name: str):
        # Only reached for attributes missing from __dict__: the payload of a row read
        # from the store, decoded once on first use.
        if name == "payload":
            value = self.__dict__["payload"] = _json(self.__dict__["payload_json"])
            return value
        raise AttributeError(name)

    @property
    def payload_text(self) -> str:
        """The payload as JSON text, as stored."""
        text = self.__dict__.get("payload_json")
        return json.dumps(self.payload) if text is None else text

    @property
    def lease(self) -> Lease:
        return Lease(self.id, self.attempts, self.lease_owner or "")

    @property
    def workflow(self) -> str:
        """The workflow it belongs to: its own id unless it joined or was spawned into one."""
        return self.workflow_id or self.id

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    def to_dict(self, *, with_history: bool = True) -> dict:
        """The public JSON shape (CLI --json, HTTP API): times as ISO 8601 UTC."""
        out = {
            "id": self.id, "type": self.type, "payload": self.payload,
            "priority": self.priority, "status": str(self.status),
            "attempts": self.attempts, "max_attempts": self.max_attempts,
            "created_at": iso(self.created_at), "started_at": iso(self.started_at),
            "completed_at": iso(self.completed_at), "run_after": iso(self.run_after),
            "result": self.result, "error": self.error, "outcome": self.outcome,
            "depends_on": list(self.depends_on),
            "progress": self.progress, "progress_message": self.progress_message,
            "timeout_s": self.timeout_s, "memory_mb": self.memory_mb, "cpu_s": self.cpu_s,
            "dedupe_key": self.dedupe_key, "cancel_requested": self.cancel_requested,
            "lease_owner": self.lease_owner, "lease_expires_at": iso(self.lease_expires_at),
            "pid": self.pid, "workflow_id": self.workflow, "parent_id": self.parent_id,
            "await_event": self.await_event, "run_on_failure": self.run_on_failure,
            "limit_keys": list(self.limit_keys),
            "estimated_tokens": self.estimated_tokens, "schedule": self.schedule,
            "scheduled_for": iso(self.scheduled_for),
        }
        if with_history:
            out["history"] = [a.to_dict() for a in self.history]
        return out


_TASK_FIELDS = tuple(Task.COLUMNS.split(", "))
_STATUS = {str(s): s for s in Status}
_KEYS: dict[str, tuple[str, ...]] = {}
_new = object.__new__
assert _TASK_FIELDS == tuple(f.name for f in fields(Task))[:len(_TASK_FIELDS)]


@dataclass(frozen=True)
class NewTask:
    """A task to insert; `payload` is already-validated JSON text."""
    type: str
    payload: str
    priority: int = 0
    run_after: float | None = None      # None = now
    timeout_s: float | None = None
    memory_mb: int | None = None
    cpu_s: float | None = None
    max_attempts: int = 3
    depends_on: tuple[str, ...] = ()
    dedupe_key: str | None = None
    id: str | None = None               # None = a fresh time-ordered id
    workflow_id: str | None = None      # None = its own workflow
    parent_id: str | None = None        # set for a task spawned by an attempt
    await_event: str | None = None      # blocked until an event of this name is sent
    run_on_failure: bool = False        # runs even when a dependency failed
    aliases: tuple[tuple[str, str], ...] = ()  # (dependency id, its name in the batch)
    limit_keys: tuple[str, ...] = ()    # every limit it draws from (its type's included)
    estimated_tokens: int | None = None
    schedule: str | None = None
    scheduled_for: float | None = None


@dataclass(frozen=True)
class AttemptEnd:
    """How an attempt ended, as the supervisor records it (never a control-flow error)."""
    outcome: Outcome
    reason: str | None = None
    result: str | None = None            # JSON text, for succeeded
    error: dict | None = None            # {type, message, traceback} when the handler raised
    exit_code: int | None = None
    signal: str | None = None
    pid: int | None = None
    peak_rss_bytes: int | None = None
    cpu_s: float | None = None
    wall_s: float | None = None
    retryable: bool = True               # False: fail for good even with attempts left
    delay_s: float | None = None         # for RESCHEDULED: run again after this long
    spawn: tuple = ()                    # NewTasks to store with the success (ctx.spawn)
    pause_limits: tuple[str, ...] = ()   # limit keys to pause for delay_s (Retry pause_limit)
    spent_tokens: int | None = None      # tokens the handler reported with ctx.spend
    # It began (a process forked, or the relay took it): False for one given back before,
    # whose claim's request and token estimate its limits get back.
    started: bool = True
    relay_lost: bool = False             # a hosted attempt its relay took down (0012)
    ran_in: str | None = None            # "process" or "relay" (0013); None: not known (a rescue)


@dataclass(frozen=True)
class Stats:
    counts: dict[str, dict[str, int]]         # status -> type -> count
    oldest_queued_at: float | None            # created_at of the oldest due queued task
    oldest_queued_by_type: dict[str, float]
    running_reserved_mb: int

    def totals(self) -> dict[str, int]:
        return {str(s): sum(self.counts.get(str(s), {}).values()) for s in Status}

    def to_dict(self) -> dict:
        return {
            "totals": self.totals(), "by_type": self.counts,
            "oldest_queued_at": iso(self.oldest_queued_at),
            "oldest_queued_by_type": {k: iso(v) for k, v in self.oldest_queued_by_type.items()},
            "running_reserved_mb": self.running_reserved_mb,
        }
