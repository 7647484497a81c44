"""Logging set-up for the supervisor: text or JSON lines on stderr.

Owns the formatters and the one handler on stderr (set up at start, changed in place
by a reload's [log]). A log line about a task carries its id (pass
`extra={"task_id": ..., "task_type": ...}`); both formats print it. JSON lines use the
same field names as task processes' lines (workers/tasklog.py): ts, level, logger, msg,
task_id, task_type, then attempt, outcome, pid, exc when known. Never log from a signal
handler.
"""

from __future__ import annotations

import json
import logging
import sys

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__(TEXT)

    def format(self, record: logging.LogRecord) -> str:
        # One record, one line: a task type or error text holding a newline must not be
        # able to forge a second log line.
        record.msg = str(record.msg).replace("\n", "\\n")
        if record.args:
            record.args = tuple(a.replace("\n", "\\n") if isinstance(a, str) else a
                                for a in (record.args if isinstance(record.args, tuple) else (record.args,)))
        line = super().format(record)
        task_id = getattr(record, "task_id", None)
        if task_id:
            line = line.replace(": ", f": task={task_id} ", 1) if ": " in line else f"{line} task={task_id}"
        return line


class JsonFormatter(logging.Formatter):
    FIELDS = ("task_id", "task_type", "attempt", "outcome", "pid")

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        for key in self.FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


HANDLER = "taskvisor"  # the name of the handler `setup` puts on the root logger


def setup(level: str = "INFO", fmt: str = "text") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level.upper())
    handler.set_name(HANDLER)


def reconfigure(level: str, fmt: str) -> bool:
    """Apply a reloaded [log] to the handler `setup` installed (a reload used to leave the
    supervisor's own lines in the old level and format while task processes took the new
    ones). False, changing nothing, when `setup` did not run in this process or its
    handler was since removed: then the embedding program owns logging."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == HANDLER), None)
    if handler is None:
        return False
    handler.acquire()  # a line being written by another thread keeps one format
    try:
        handler.setFormatter(_formatter(fmt))
    finally:
        handler.release()
    root.setLevel(level.upper())
    return True


def _formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()
