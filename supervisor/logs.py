"""Logging set-up for the supervisor: text or JSON lines on stderr.

Owns the formatters. A log line about a task carries its id (pass
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


def setup(level: str = "INFO", fmt: str = "text") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
