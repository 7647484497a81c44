"""taskvisor's built-in handlers: `llm.chat`, `shell`, `embed`, and the demo's stand-ins.

Each lives in its own module, registered by its `@task` decorator when the module is
imported; list the ones you want in `[supervisor] preload` (e.g. "workers.handlers.llm").
This package itself imports nothing heavy: it only re-exports `Fail`, the exception a
handler raises to end an attempt with a chosen outcome and retry decision. It runs in the fork
server and task processes, never in the supervisor.
"""

from __future__ import annotations

from workers.context import Fail  # re-exported: handlers import it from here too

__all__ = ["Fail"]
