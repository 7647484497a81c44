"""Logging inside task processes: the stderr handler whose lines carry the task's id.

Owns the root handler and formatter of the fork server and its task processes (text or
JSON lines, as `[log] format` says) and `ctx.logger`'s adapter. Imported only where
`logging` is needed: by the fork server when a preload module imported `logging` (so
that a task process only fills in its task's fields), else by a task process the first
time its handler touches `ctx.logger`. Importing `logging` brings `threading`, whose
after-fork hooks cost CPU in every forked process (benchmarks/README.md), so this module
must never be imported by the fork server on its own account.
"""

from __future__ import annotations

import json
import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s task=%(task_id)s type=%(task_type)s %(name)s: %(message)s"


class _TaskFormatter(logging.Formatter):
    def __init__(self, fmt_json: bool):
        super().__init__(_FORMAT)
        self.fmt_json = fmt_json
        self.task: dict = {}

    def format(self, record: logging.LogRecord) -> str:
        for key in ("task_id", "task_type"):
            if not hasattr(record, key):
                setattr(record, key, self.task.get(key.removeprefix("task_")))
        if not self.fmt_json:
            return super().format(record)
        # The same field names as the supervisor's JSON lines (supervisor/logs.py).
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage(), "task_id": record.task_id,
               "task_type": record.task_type}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


_handler: logging.Handler | None = None
_level: str | None = None


def setup(fmt_json: bool, level: str, types: list[str] = ()) -> None:
    """Replace the root logger's handlers with one stderr handler in the task format.
    The loggers of `types` (`ctx.logger`'s) are made here too, once, in the fork server."""
    global _handler, _level
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(_TaskFormatter(fmt_json))
    root.addHandler(_handler)
    root.setLevel(level)
    _level = level
    for name in types:
        logging.getLogger(f"taskvisor.task.{name}")


def for_task(fmt_json: bool, level: str, task_id: str, task_type: str) -> None:
    """Point the handler at this task (set up first if the fork server did not)."""
    global _level
    if _handler is None or _handler.formatter.fmt_json != fmt_json:
        setup(fmt_json, level)
    elif level != _level:  # changed by a reload since the fork server started
        logging.getLogger().setLevel(level)
        _level = level
    _handler.formatter.task = {"id": task_id, "type": task_type}


def adapter(task_type: str, task_id: str, base: logging.Logger | None = None):
    """`ctx.logger`: a LoggerAdapter on `taskvisor.task.<type>` whose records carry the id."""
    base = base or logging.getLogger(f"taskvisor.task.{task_type}")
    return logging.LoggerAdapter(base, {"task_id": task_id, "task_type": task_type})
