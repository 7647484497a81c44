"""An enqueue that fails for a bad dependency leaves no database file behind when there
was none before (it used to create an empty one, a second database nobody serves)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.client import Queue
from supervisor.errors import DependencyError

ROOT = Path(__file__).resolve().parents[2]


def _files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_queue_refuses_unknown_dependency_without_creating_the_file(tmp_path):
    db = tmp_path / "new.db"
    with Queue(db) as queue:
        with pytest.raises(DependencyError, match="unknown task NOPE"):
            queue.enqueue("t", depends_on=["NOPE"])
        with pytest.raises(DependencyError, match="cycle"):
            queue.enqueue_many([{"id": "a", "type": "t", "depends_on": ["b"]},
                                {"id": "b", "type": "t", "depends_on": ["a"]}])
        assert _files(tmp_path) == []
        # A batch whose dependencies are all inside it is fine in a new file.
        ids = queue.enqueue_many([{"id": "a", "type": "t"},
                                  {"type": "t", "depends_on": ["a"]}])
        assert queue.get(ids[1]).depends_on == (ids[0],)
    assert db.exists()


def test_cli_enqueue_with_unknown_dependency_exits_2_and_leaves_no_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKVISOR_")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-m", "supervisor", "enqueue", "t", "--depends-on",
                          "NOPE"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2
    assert res.stderr == "taskvisor: error: depends_on names unknown task NOPE\n"
    assert _files(tmp_path) == []
