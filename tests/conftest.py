"""Shared fixtures: a fresh database path in tmp_path, a guard that fails a test that
leaves a child process behind, and (tests/support/ci_skips.py) no skips under CI=true.
Also the `--soak-minutes` option: tests/soak is left out of a plain `pytest` run and
collected only when named (`pytest tests/soak`, the short run) or when `--soak-minutes N`
asks for the long one (tests/soak/conftest.py)."""

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

pytest_plugins = ["tests.support.ci_skips"]  # CI=true: a skip is a failure


SOAK = Path(__file__).resolve().parent / "soak"


def pytest_addoption(parser):
    parser.addoption("--soak-minutes", type=float, default=None, metavar="N",
                     help="run tests/soak, the long version, in about N minutes "
                          "(without it, `pytest tests/soak` runs the short version)")


def pytest_ignore_collect(collection_path, config):
    """Leave tests/soak out unless it is named on the command line or --soak-minutes is set."""
    if collection_path != SOAK or config.getoption("soak_minutes") is not None:
        return None
    for arg in config.args:
        target = Path(arg.split("::")[0]).resolve()
        if target == SOAK or SOAK in target.parents:
            return None
    return True


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
