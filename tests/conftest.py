"""Shared fixtures: a fresh database path in tmp_path, and a guard that fails a test that
leaves a child process behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import kill_tree  # noqa: E402


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "taskvisor.db"


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """Kill (and report) any child process a test left running. A new process whose
    parent was already there belongs to that longer-lived process (a module fixture's
    supervisor), not to the test: the spare task process a fork server forks after each
    task, say."""
    me = psutil.Process(os.getpid())
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leaked = []
    for p in me.children(recursive=True):
        try:
            if p.pid not in before and p.ppid() not in before:
                leaked.append(p)
        except psutil.NoSuchProcess:
            pass
    alive = []
    for p in leaked:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            pass
        kill_tree(p.pid)
    for p in leaked:
        try:
            os.waitpid(p.pid, os.WNOHANG)
        except ChildProcessError:
            pass
    if alive:
        pytest.fail(f"test left processes running: {alive}")
