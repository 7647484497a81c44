"""TaskContext: what a handler gets besides its payload, and the Retry signal it may raise.

Owns the handler-facing API inside a task process: id, type, attempt, deadline,
progress(), heartbeat(), cancelled, and a logger whose lines carry the task id. It only
writes messages to the report pipe; it never touches the database.
"""

from __future__ import annotations

import time


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
                 log_settings: tuple[bool, str] | None = None, limit_keys=(), type_limits=()):
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
        self._reporter.send("progress", fraction=fraction,
                            message=None if message is None else str(message)[:500])

    def spend(self, tokens: int) -> None:
        """Report model tokens this attempt used; its limits' token budgets are corrected
        by the difference from the estimate the claim charged. May be called repeatedly
        (the amounts add up)."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"spend(tokens=...) takes an integer >= 0, got {tokens!r}")
        self._reporter.send("spend", tokens=tokens)

    def heartbeat(self) -> None:
        """Say the task is alive (long calls that have no progress to report)."""
        self._reporter.send("heartbeat")

    def check_cancelled(self) -> None:
        """Raise TaskCancelled if a cancel was asked (for loops that catch BaseException)."""
        if self.cancelled:
            raise TaskCancelled()
