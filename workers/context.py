"""TaskContext: what a handler gets besides its payload, and the Retry signal it may raise.

Owns the handler-facing API inside a task process: id, type, attempt, deadline,
progress(), heartbeat(), stream(), cancelled, a logger whose lines carry the task id,
and the workflow calls (inputs, input, event, checkpoint_state, spawn(), checkpoint();
their rules are in `workers.workflow`). It only writes messages to the report channel; it
never touches the database.
"""

from __future__ import annotations

import json
import time

_UNSET = object()


def _wf():
    from workers import workflow  # it imports this module (Fail)
    return workflow


class Retry(Exception):
    """Raise from a handler to run the task again after `delay_s` without spending an
    attempt (an HTTP 429 with Retry-After, a resource that is busy).

    `pause_limit="openai"` (or a list of keys) also pauses those named limits for
    `delay_s`: no task that draws from them is claimed meanwhile, on any supervisor."""

    def __init__(self, delay_s: float = 0.0, reason: str | None = None, *,
                 pause_limit: str | list[str] | tuple[str, ...] | None = None):
        if delay_s < 0:
            raise ValueError("Retry delay_s must be >= 0")
        if isinstance(pause_limit, str):
            pause_limit = [pause_limit]
        elif pause_limit is not None:
            pause_limit = list(pause_limit)
            if not all(isinstance(k, str) and k for k in pause_limit):
                raise ValueError("Retry pause_limit must be a limit key or a list of them")
        self.delay_s = float(delay_s)
        self.pause_limit = pause_limit or None
        self.reason = reason or f"handler asked to retry in {delay_s:g}s"
        super().__init__(self.reason)


class Fail(Exception):
    """Raise from a handler to end the attempt with a chosen outcome and retry decision.

    `Fail("HTTP 400: no such model")` fails the task for good, even with attempts left
    (retrying would not help); `Fail("stream stalled", retryable=True, outcome="timeout")`
    records a timeout that the retry policy may run again."""

    OUTCOMES = ("error", "timeout")

    def __init__(self, message: str, *, retryable: bool = False, outcome: str = "error"):
        if outcome not in self.OUTCOMES:
            raise ValueError(f"Fail outcome must be one of {self.OUTCOMES}, got {outcome!r}")
        super().__init__(message)
        self.retryable = bool(retryable)
        self.outcome = outcome


class TaskCancelled(BaseException):
    """Raised in the task process when the supervisor asks it to stop (SIGTERM).

    A BaseException so a broad `except Exception` in user code does not swallow it."""


class TaskContext:
    """Handed to every handler. Cheap to call: progress() is one small pipe write."""

    def __init__(self, *, id: str, type: str, attempt: int, max_attempts: int,
                 deadline_at: float | None, reporter, logger=None, config: dict | None = None,
                 log_settings: tuple[bool, str] | None = None, context: dict | None = None,
                 max_state_bytes: int = 1 << 20, known_type=None, limit_keys=(),
                 type_limits=()):
        self.id = id
        self.type = type
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.deadline = deadline_at          # epoch seconds, or None without a time limit
        self.cancelled = False                # set once the supervisor asked to stop
        self.config = config or {}            # config sections for handlers: {"llm": {...}}
        self.limit_keys = tuple(limit_keys)   # every named limit this task draws from
        self.type_limits = tuple(type_limits) # those its type names (the provider's, say)
        self._reporter = reporter
        self._logger_base = logger
        self._log_settings = log_settings     # (JSON lines?, level) for a lazy set-up
        self._logger = None
        self._context = context or {}         # the spec's "context": JSON texts, parsed on use
        self._inputs = None
        self._input_ids: list[str] = []
        self._event = self._state = _UNSET
        self._max_state_bytes = max_state_bytes
        self._known_type = known_type         # type name -> bool (the registry)
        self.spawned: list[dict] = []         # this attempt's spawn requests, sent with the result
        self._spawned_bytes = 0
        self._output = None                   # workers.stream.OutputStream, once used

    # -- workflows -------------------------------------------------------------------------

    @property
    def inputs(self) -> dict:
        """Each dependency's result by its id (and by its local id when enqueue_many named
        it so); a failed dependency of a run_on_failure task holds a DependencyFailure."""
        if self._inputs is None:
            self._inputs, self._input_ids = _wf().parse_inputs(self._context)
        return self._inputs

    @property
    def input(self):
        """The result of the single dependency; ValueError unless there is exactly one."""
        inputs = self.inputs
        if len(self._input_ids) != 1:
            raise ValueError(f"ctx.input needs exactly one dependency; this task has "
                             f"{len(self._input_ids)} (use ctx.inputs)")
        return inputs[self._input_ids[0]]

    @property
    def event(self):
        """The data of the event this task awaited (await_event), else None."""
        if self._event is _UNSET:
            self._event = _wf().parse_value(self._context, "event")
        return self._event

    @property
    def checkpoint_state(self):
        """The last state stored with checkpoint() (by an earlier attempt when this one
        starts), else None."""
        if self._state is _UNSET:
            self._state = _wf().parse_value(self._context, "checkpoint_state")
        return self._state

    def spawn(self, type: str, payload: dict | None = None, **options) -> str:
        """Add a task to the workflow; returns its id at once, so later spawns may list it
        in depends_on. Options are those of Queue.enqueue (not workflow_id). The tasks are
        stored with this attempt's success, and only then: an attempt that fails, crashes
        or is retried spawns nothing. Raises workflow.SpawnError for an unknown type or
        option, or a payload that is not JSON."""
        known = self._known_type or (lambda name: True)
        req = _wf().spawn_request(type, payload, options, self.spawned, known)
        size = len(json.dumps(req, ensure_ascii=False).encode())
        if self._spawned_bytes + size > self._max_state_bytes:  # they ride on one report line
            raise _wf().SpawnError(
                f"the spawned tasks add up to more than {self._max_state_bytes} bytes "
                "([supervisor] max_result_bytes); spawn fewer, or pass file paths, not data")
        self._spawned_bytes += size
        self.spawned.append(req)
        return req["id"]

    def checkpoint(self, state) -> None:
        """Store `state` (any JSON value, at most max_result_bytes) durably for this task:
        returns once the supervisor wrote it under this attempt's lease. A later attempt
        (after a crash, timeout, kill or memory limit) starts with it in checkpoint_state.
        Raises ValueError for a state that is not JSON or too large, RuntimeError when the
        supervisor refused it (the attempt lost its lease)."""
        try:
            text = json.dumps(state, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint state is not JSON-serialisable: {exc}") from None
        except RecursionError:
            raise ValueError("checkpoint state is not JSON-serialisable: nested too deeply") from None
        size = len(text.encode())
        if size > self._max_state_bytes:
            raise ValueError(f"checkpoint state is {size} bytes, over the "
                             f"{self._max_state_bytes}-byte limit ([supervisor] max_result_bytes)")
        # Through the output stream once it exists: what was streamed goes first, and its
        # flusher thread never writes in the middle of this request.
        (self._output or self._reporter).request("checkpoint", state=text)
        self._state = json.loads(text)

    @property
    def logger(self):
        """A logging.LoggerAdapter on `taskvisor.task.<type>` whose lines carry the task id.
        Made on first use: `logging` is imported then if no preload module imported it."""
        if self._logger is None:
            from workers import tasklog
            if self._log_settings is not None:
                tasklog.for_task(*self._log_settings, self.id, self.type)
            self._logger = tasklog.adapter(self.type, self.id, self._logger_base)
        return self._logger

    @property
    def remaining_s(self) -> float | None:
        """Seconds left before the wall-clock limit, or None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - time.time())

    def progress(self, fraction: float | None = None, message: str | None = None) -> None:
        """Report progress (0.0-1.0) and/or a short message; also counts as a heartbeat."""
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction)))
        (self._output or self._reporter).send(
            "progress", fraction=fraction, message=None if message is None else str(message)[:500])

    def spend(self, tokens: int) -> None:
        """Report model tokens this attempt used; its limits' token budgets are corrected
        by the difference from the estimate the claim charged. May be called repeatedly
        (the amounts add up)."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"spend(tokens=...) takes an integer >= 0, got {tokens!r}")
        self._reporter.send("spend", tokens=tokens)

    def heartbeat(self) -> None:
        """Say the task is alive (long calls that have no progress to report)."""
        (self._output or self._reporter).send("heartbeat")

    def stream(self, text: str, *, flush: bool = False) -> None:
        """Append `text` to this attempt's output: stored by the supervisor (up to
        [supervisor] max_output_bytes a task), sent live as `output` events, readable
        at GET /api/tasks/{id}/output. Cheap per call: small pieces (model tokens) are
        batched, sent at most 20 ms after they were written (by a thread of the task
        process). `flush=True` sends it at once and starts no thread: for a caller that
        batches its pieces itself."""
        if not isinstance(text, str):
            raise TypeError(f"ctx.stream() takes a str, got {type(text).__name__}")
        if self._output is None:
            from workers.stream import OutputStream
            self._output = OutputStream(self._reporter)
        self._output.write(text, flush)

    def _write_lines(self, data: bytes) -> None:
        """Report lines made for this attempt by the model-call relay (llm.chat's stream,
        progress and spend: workers.handlers.llmreports), written as they are, after what
        ctx.stream() still buffers."""
        if self._output is not None:
            self._output.write_lines(data)
        else:
            self._reporter.write(data)

    def close_output(self) -> None:
        """Send what ctx.stream() still buffers; the task process calls this once the
        handler returned or raised, before the outcome."""
        if self._output is not None:
            self._output.close()

    def check_cancelled(self) -> None:
        """Raise TaskCancelled if a cancel was asked (for loops that catch BaseException)."""
        if self.cancelled:
            raise TaskCancelled()
