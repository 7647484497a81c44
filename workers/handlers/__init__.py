"""taskvisor's built-in handlers: `llm.chat`, `shell`, `embed`, and the demo's stand-ins.

Each lives in its own module, registered by its `@task` decorator when the module is
imported; list the ones you want in `[supervisor] preload` (e.g. "workers.handlers.llm").
This package itself imports nothing heavy: it only holds `Fail`, the exception a handler
raises to end an attempt with a chosen outcome and retry decision. It runs in the fork
server and task processes, never in the supervisor.
"""

from __future__ import annotations

try:  # the handler API's own class, once workers.context provides it
    from workers.context import Fail
except ImportError:  # pragma: no cover - until workers/context.py gains Fail
    class Fail(Exception):
        """End the attempt as `outcome` ("error" or "timeout"); with retryable=False the
        task fails for good even with attempts left (a 400 from a model server)."""

        OUTCOMES = ("error", "timeout")

        def __init__(self, message: str, *, retryable: bool = False, outcome: str = "error"):
            if outcome not in self.OUTCOMES:
                raise ValueError(f"Fail outcome must be one of {self.OUTCOMES}, got {outcome!r}")
            super().__init__(message)
            self.retryable = bool(retryable)
            self.outcome = outcome

__all__ = ["Fail"]
