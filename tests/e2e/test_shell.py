"""`shell`: the handler called directly, then through a real supervisor: argv and shell
forms, cwd, env additions, output tails, a non-zero exit as an error with the tail, and a
timeout or cancel that takes the command's whole process group with the task."""

from __future__ import annotations

import sys
import uuid

import psutil
import pytest

from tests.support import wait_until
from tests.support.launcher import SupervisorProcess, supervisor_config
from workers.handlers import Fail
from workers.handlers.shell import TAIL_BYTES, CommandFailed, shell

class FakeCtx:
    config: dict = {}

    def __init__(self):
        self.events = []

    def progress(self, fraction=None, message=None):
        self.events.append(message)


def sleeps(seconds: str) -> list[psutil.Process]:
    """Live `sleep <seconds>` processes (a unique duration marks a test's own)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.info["cmdline"] == ["sleep", seconds] and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


# -- direct calls ----------------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_argv_cwd_env_and_tails(tmp_path):
    out = shell({"argv": [sys.executable, "-c",
                          "import os,sys; print(os.getcwd()); print(os.environ['GREETING']);"
                          "print('oops', file=sys.stderr)"],
                 "cwd": str(tmp_path), "env": {"GREETING": "hello", "HOME": None}}, FakeCtx())
    assert out["exit_code"] == 0
    assert out["stdout_tail"] == f"{tmp_path}\nhello\n"
    assert out["stderr_tail"] == "oops\n"
    assert out["duration_s"] >= 0


@pytest.mark.timeout(20)
def test_shell_only_when_asked():
    out = shell({"cmd": "echo $((1+2)) | tr 3 x", "shell": True})
    assert out["stdout_tail"] == "x\n"
    out = shell({"cmd": "echo '$((1+2))' | tr"})  # split, never run by a shell
    assert out["stdout_tail"] == "$((1+2)) | tr\n"


@pytest.mark.timeout(20)
def test_long_output_keeps_only_the_tail_and_reports_progress():
    ctx = FakeCtx()
    code = ("import sys,time\nfor i in range(40000): print('line', i)\n"
            "sys.stdout.flush(); time.sleep(1.3); print('bye')\n")
    out = shell({"argv": [sys.executable, "-c", code], "input": "ignored"}, ctx)
    assert len(out["stdout_tail"].encode()) <= TAIL_BYTES
    assert out["stdout_tail"].endswith("line 39999\nbye\n")
    assert any(m and "line 39999" in m for m in ctx.events), ctx.events


@pytest.mark.timeout(20)
def test_input_and_undecodable_output():
    code = "import sys; d=sys.stdin.read(); sys.stdout.buffer.write(d.upper().encode()+b'\\xff')"
    out = shell({"argv": [sys.executable, "-c", code], "input": "abc"})
    assert out["stdout_tail"] == "ABC\ufffd"


@pytest.mark.timeout(20)
def test_non_zero_exit_raises_with_the_tail():
    with pytest.raises(CommandFailed, match=r"exited with code 3; output ends with:\nsomething broke"):
        shell({"cmd": "echo partial; echo something broke >&2; exit 3", "shell": True})
    with pytest.raises(CommandFailed, match="killed by SIGKILL"):
        shell({"cmd": "kill -9 $$", "shell": True})


@pytest.mark.timeout(20)
def test_bad_payloads_and_missing_commands_fail_for_good(tmp_path):
    for payload in ({}, {"argv": "ls"}, {"argv": ["ls"], "cmd": "ls"}, {"argv": []},
                    {"argv": ["ls"], "shell": True}, {"cmd": "ls", "env": ["X"]},
                    {"argv": ["does-not-exist-xyz"]}, {"argv": ["ls"], "cwd": str(tmp_path / "nope")}):
        with pytest.raises(Fail) as info:
            shell(payload)
        assert info.value.retryable is False, payload


# -- through a supervisor --------------------------------------------------------------------

@pytest.fixture(scope="module")
def sup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shell-e2e")
    with SupervisorProcess(tmp, supervisor_config(["workers.handlers.shell"])) as proc:
        proc.wait_ready()
        yield proc


@pytest.mark.timeout(60)
def test_e2e_success_and_error_with_tail(sup, tmp_path):
    ok = sup.queue.enqueue("shell", {"cmd": "pwd; echo $WHO", "shell": True, "cwd": str(tmp_path),
                                     "env": {"WHO": "taskvisor"}})
    bad = sup.queue.enqueue("shell", {"cmd": "echo 'disk full' >&2; exit 7", "shell": True},
                            max_attempts=2)
    task = sup.wait(ok)
    assert task.status == "succeeded"
    assert task.result["stdout_tail"] == f"{tmp_path}\ntaskvisor\n"
    task = sup.wait(bad)
    assert task.status == "failed" and task.outcome == "error" and task.attempts == 2
    assert "exited with code 7" in task.error and "disk full" in task.error


@pytest.mark.timeout(60)
def test_e2e_missing_command_is_not_retried(sup):
    task = sup.wait(sup.queue.enqueue("shell", {"argv": ["no-such-program-here"]}, max_attempts=3))
    assert task.status == "failed" and task.attempts == 1
    assert "not found" in task.error


@pytest.mark.timeout(60)
def test_e2e_timeout_kills_the_whole_process_group(sup):
    marker = f"{uuid.uuid4().int % 10**6 + 1000}.5"
    task_id = sup.queue.enqueue("shell", {"cmd": f"sleep {marker} & sleep {marker}; wait",
                                          "shell": True}, timeout_s=1.5, max_attempts=1)
    wait_until(lambda: len(sleeps(marker)) == 2, timeout=20)
    task = sup.wait(task_id)
    assert task.status == "failed" and task.outcome == "timeout"
    wait_until(lambda: not sleeps(marker), timeout=10,
               message="the command outlived its task")


@pytest.mark.timeout(60)
def test_e2e_cancel_kills_the_command(sup):
    marker = f"{uuid.uuid4().int % 10**6 + 1000}.25"
    task_id = sup.queue.enqueue("shell", {"argv": ["sleep", marker]})
    wait_until(lambda: sleeps(marker), timeout=20)
    sup.queue.cancel(task_id)
    task = sup.wait(task_id)
    assert task.status == "cancelled"
    wait_until(lambda: not sleeps(marker), timeout=10,
               message="the command outlived its cancelled task")
