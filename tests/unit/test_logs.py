"""One vocabulary for JSON log lines: the supervisor's formatter (supervisor/logs.py) and
the task processes' (workers/tasklog.py) name a task's fields the same way."""

from __future__ import annotations

import json
import logging

from supervisor.logs import JsonFormatter
from workers import tasklog


def record(**extra) -> logging.LogRecord:
    rec = logging.LogRecord("taskvisor.x", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_supervisor_and_task_json_lines_share_field_names():
    sup = json.loads(JsonFormatter().format(record(task_id="01ABC", task_type="llm.chat")))
    fmt = tasklog._TaskFormatter(fmt_json=True)
    fmt.task = {"id": "01ABC", "type": "llm.chat"}
    task = json.loads(fmt.format(record()))
    for line in (sup, task):
        assert line["task_id"] == "01ABC" and line["task_type"] == "llm.chat", line
        assert line["msg"] == "hello there" and line["level"] == "INFO"
        assert line["logger"] == "taskvisor.x" and isinstance(line["ts"], float)
        assert "type" not in line
    assert set(task) <= set(sup) | {"exc"}, "a task line uses no name the supervisor lacks"
