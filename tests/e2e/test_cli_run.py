"""`taskvisor run` through the real console entry point: pidfile, a task run end to end,
SIGTERM to exit 0, and a preload that fails to import (exit 3 with its traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.launcher import ROOT, SupervisorProcess


def supervisor(tmp_path: Path, preload: str, *args: str) -> SupervisorProcess:
    config = (f'[supervisor]\ndatabase = "t.db"\npreload = ["{preload}"]\npoll_interval_s = 0.2\n'
              '[http]\nlisten = ""\n')
    return SupervisorProcess(tmp_path, config, pythonpath=[tmp_path], args=args)


@pytest.mark.timeout(60)
def test_run_writes_its_pidfile_runs_a_task_and_exits_0_on_sigterm(tmp_path):
    (tmp_path / "cli_handlers.py").write_text(
        "from workers import task\n@task('hello')\ndef hello(payload, ctx):\n"
        "    return {'hi': payload['name']}\n")
    with supervisor(tmp_path, "cli_handlers", "--pidfile", "run.pid") as sup:
        pidfile = tmp_path / "run.pid"
        assert int(pidfile.read_text()) == sup.pid  # written before the ready file
        task = sup.wait(sup.queue.enqueue("hello", {"name": "ada"}), timeout=20)
        assert (task.status, task.result) == ("succeeded", {"hi": "ada"})
        assert sup.stop() == 0
        assert not pidfile.exists()


@pytest.mark.timeout(60)
def test_run_stops_at_start_when_a_preload_module_fails_to_import(tmp_path):
    (tmp_path / "broken_handlers.py").write_text("import not_a_module_anywhere\n")
    with supervisor(tmp_path, "broken_handlers").start(wait_ready=False) as sup:
        assert sup.wait_exit(30) == 3
        text = sup.log()
    assert "taskvisor: error: a preload module or configured handler failed to import" in text
    assert "ModuleNotFoundError: No module named 'not_a_module_anywhere'" in text
    assert "broken_handlers.py" in text


@pytest.mark.timeout(60)
def test_a_pool_size_the_descriptors_cannot_serve_is_refused_with_what_to_raise(tmp_path):
    """`run` raises its own open-files soft limit to the hard limit first; a pool_size
    that still does not fit is refused before anything starts, naming both numbers."""
    (tmp_path / "taskvisor.toml").write_text(
        '[supervisor]\ndatabase = "t.db"\npool_size = 100000\n[http]\nlisten = ""\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKVISOR_")}
    env["PYTHONPATH"] = str(ROOT)
    script = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
              "(1024, 4096)); sys.argv = ['taskvisor', 'run']; "
              "runpy.run_module('supervisor', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2, res.stderr
    assert "pool_size = 100000 needs about 200384 open files" in res.stderr
    assert "its limit is 4096 (hard limit 4096)" in res.stderr  # raised from 1024 first
    assert "LimitNOFILE=" in res.stderr
    assert not (tmp_path / "t.db").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hard, pool, advice", [
    (256, 1, "raise the limit to at least 260 ("),   # no pool_size fits: none is suggested
    (256, 4, "raise the limit to at least 272 ("),
    (300, 40, "lower pool_size to at most 11, or raise the limit to at least 416 ("),
])
def test_the_open_files_advice_names_a_pool_size_that_fits_or_none(tmp_path, hard, pool,
                                                                    advice):
    """Under `ulimit -n 256` the advice was "lower pool_size to at most 1", also for
    pool_size = 1, which was then refused with the same advice."""
    (tmp_path / "taskvisor.toml").write_text(
        f'[supervisor]\ndatabase = "t.db"\npool_size = {pool}\n[http]\nlisten = ""\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKVISOR_")}
    env["PYTHONPATH"] = str(ROOT)
    script = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
              f"({hard}, {hard})); sys.argv = ['taskvisor', 'run']; "
              "runpy.run_module('supervisor', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2, res.stderr
    (line,) = [l for l in res.stderr.splitlines() if "open files" in l]
    assert f"pool_size = {pool} needs about" in line and advice in line, line
    assert not (tmp_path / "t.db").exists()


@pytest.mark.timeout(60)
def test_run_on_a_database_it_cannot_open_prints_one_error_and_no_traceback(tmp_path):
    """The relay, started before the database is opened, found its control socket closed
    and printed a BrokenPipeError traceback under the supervisor's one-line error."""
    config = '[supervisor]\ndatabase = "no-such-folder/t.db"\n[http]\nlisten = ""\n'
    with SupervisorProcess(tmp_path, config).start(wait_ready=False) as sup:
        assert sup.wait_exit(30) == 2
        text = sup.log()
    assert "taskvisor: error: " in text and "no-such-folder does not exist" in text
    assert "Traceback" not in text, text
    assert not (tmp_path / "no-such-folder").exists()


@pytest.mark.timeout(30)
def test_the_relay_whose_supervisor_left_before_it_was_ready_exits_quietly(tmp_path):
    import socket
    mine, theirs = socket.socketpair()
    mine.close()  # the supervisor is gone before "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "workers.relay", "--socket", str(tmp_path / "r.sock"),
         "--parent", str(os.getpid()), "--ctrl-fd", str(theirs.fileno())],
        pass_fds=[theirs.fileno()], env=env, capture_output=True, text=True, timeout=20)
    theirs.close()
    from workers.relay import EXIT_PARENT_GONE
    assert (res.returncode, res.stderr) == (EXIT_PARENT_GONE, "")
