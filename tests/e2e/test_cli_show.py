"""`taskvisor show` (human form): the limits a task runs with and where each comes from
(the task, its type's section, [defaults]), the whole traceback of a failed attempt, and
which attempts the model-call relay hosted."""

from __future__ import annotations

import time

from supervisor import policy
from supervisor.store import AttemptEnd, Outcome, Status, Store
from tests.e2e.test_cli import enqueue, tv

CONFIG = """
[defaults]
memory_mb = 512
[types."x"]
timeout_s = 90
open_files = 64
"""
TRACE = ('Traceback (most recent call last):\n  File "handlers.py", line 12, in run\n'
         '    step()\n  File "handlers.py", line 7, in step\n'
         '    raise ValueError("boom")\nValueError: boom\n')


def test_show_prints_effective_limits_with_their_origin(tmp_path):
    (tmp_path / "taskvisor.toml").write_text(CONFIG)
    own = enqueue(tmp_path, "x", "--memory-mb", "64")
    plain = enqueue(tmp_path, "y")
    out = tv(tmp_path, "show", own).stdout
    [limits] = [line for line in out.splitlines() if line.startswith("limits")]
    assert limits.split(None, 1)[1] == ('timeout 90s ([types."x"]), memory 64 MiB (task), '
                                        'cpu none ([defaults]), open files 64 ([types."x"])')
    out = tv(tmp_path, "show", plain).stdout
    [limits] = [line for line in out.splitlines() if line.startswith("limits")]
    assert limits.split(None, 1)[1] == ("timeout 3600s ([defaults]), memory 512 MiB "
                                        "([defaults]), cpu none ([defaults]), open files "
                                        "1024 ([defaults])")


def test_show_prints_the_whole_traceback_of_a_failed_attempt(tmp_path):
    task_id = enqueue(tmp_path, "x")
    store = Store(tmp_path / "taskvisor.db")
    try:
        task = store.claim("owner", time.time(), lease_s=30)
        end = AttemptEnd(Outcome.ERROR, reason="ValueError: boom", exit_code=1,
                         retryable=False, error={"type": "ValueError", "message": "boom",
                                                 "traceback": TRACE})
        assert store.fail(task.lease, end, time.time(), policy.Backoff()) is Status.FAILED
    finally:
        store.close()
    res = tv(tmp_path, "show", task_id)
    assert res.returncode == 0, res.stderr
    shown = [line[len("       | "):] for line in res.stdout.splitlines()
             if line.startswith("       | ")]
    assert shown == TRACE.rstrip("\n").splitlines()


def test_show_says_which_attempts_the_model_call_relay_hosted(tmp_path):
    task_id = enqueue(tmp_path, "x", "--max-attempts", "3")
    store = Store(tmp_path / "taskvisor.db")
    try:
        for ran_in, exit_code in (("relay", None), ("process", 1)):
            task = store.claim("owner", time.time(), lease_s=30)
            end = AttemptEnd(Outcome.ERROR, reason="RuntimeError: again", exit_code=exit_code,
                             ran_in=ran_in, error={"type": "RuntimeError", "message": "again",
                                                   "traceback": ""})
            store.fail(task.lease, end, time.time(), policy.Backoff(initial_s=0.0, max_s=0.0))
        assert [a.ran_in for a in store.get(task_id).history] == ["relay", "process"]
    finally:
        store.close()
    out = tv(tmp_path, "show", task_id).stdout
    first, second = [line for line in out.splitlines() if line.startswith("  #")]
    assert first.endswith("in the model-call relay") and "#1" in first
    assert second.endswith("exit 1") and "#2" in second
