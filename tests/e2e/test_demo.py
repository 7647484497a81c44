"""`taskvisor demo` as a real subprocess in tmp_path: it finishes in under 30 s, prints the
summary, leaves every planned outcome in its database, runs the agent run (plan spawns
research steps, one killed and resumed from its checkpoint, a summary reading their
results, a publish step released by the approval event) and tasks in priority order,
and leaves no supervisor behind (also with --keep-running, stopped by Ctrl-C)."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest

from supervisor.client import Queue
from tests.support import kill_tree
from tests.support.openai_server import FakeOpenAI, Stream

ROOT = Path(__file__).resolve().parents[2]
CODE = "import sys; from supervisor.demo import run; sys.exit(run(sys.argv[1:]))"


def env() -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith("TASKVISOR_")}
    out["PYTHONPATH"] = str(ROOT)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supervisors_of(db: Path) -> list[psutil.Process]:
    """Live processes whose command line names the demo's config beside `db`'s run."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            argv = p.info["cmdline"] or []
            cmd = " ".join(argv)
            if "taskvisor-demo-" in cmd and "--config" in argv and p.status() != psutil.STATUS_ZOMBIE:
                config = tomllib.loads(Path(argv[argv.index("--config") + 1]).read_text())
                if config["supervisor"]["database"] == str(db):
                    found.append(p)
        except (psutil.Error, OSError, tomllib.TOMLDecodeError, KeyError):
            pass
    return found


@pytest.mark.timeout(120)
def test_demo_runs_every_outcome_and_stops(tmp_path):
    db = tmp_path / "demo.db"
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", CODE, "--db", str(db), "--listen", f"127.0.0.1:{port}"],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:  # on a timeout, its supervisor (a session of its own) must not outlive the test
        out, err = proc.communicate(timeout=110)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    took = time.monotonic() - started
    assert proc.returncode == 0, out[-4000:] + err[-4000:]
    assert took < 30, took
    assert f"http://127.0.0.1:{port}/" in out
    assert "offline stand-in" in out and "Summary" in out and "supervisor stopped (exit code 0)" in out
    summary = out[out.index("Summary"):]
    for name, outcomes in [("research: failure modes", "rescheduled > succeeded"),
                           ("research: benchmarks", "crashed > succeeded"),
                           ("publish (needs approval)", "approved by taskvisor demo"),
                           ("research: summary", "read 4 results from ctx.inputs"),
                           ("fails once, then retried", "error > succeeded"),
                           ("runs past its time limit", "timeout"),
                           ("over its memory limit", "memory_limit"),
                           ("crashes (SIGSEGV)", "crashed"),
                           ("cancelled on request", "cancelled")]:
        line = next(l for l in summary.splitlines() if l.startswith(name))
        assert outcomes in line, line
    assert not supervisors_of(db), "the demo left its supervisor running"
    # The last lines point at what still exists, and the commands they give work.
    last = out.strip().splitlines()[-4:]
    assert last[0] == f"The tasks stay in {db}; look at them with", last
    assert last[1].strip() == f"taskvisor list --db {db}", last
    assert "--keep-running" in last[3] and "dashboard" in last[3], last
    listed = subprocess.run([sys.executable, "-m", "supervisor", "list", "--db", str(db)],
                            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and "demo.sleep" in listed.stdout, listed.stderr
    some_id = listed.stdout.splitlines()[1].split()[0]
    shown = subprocess.run([sys.executable, "-m", "supervisor", "show", "--db", str(db),
                            some_id[-8:]], cwd=tmp_path, env=env(), capture_output=True,
                           text=True, timeout=30)
    assert shown.returncode == 0 and some_id in shown.stdout, shown.stderr

    with Queue(db, create=False) as queue:
        tasks = {t.payload["demo"]: queue.get(t.id) for t in queue.list(limit=100)}
    assert len(tasks) == 18
    expected = {"runs past its time limit": ("failed", "timeout"),
                "over its memory limit": ("failed", "memory_limit"),
                "crashes (SIGSEGV)": ("failed", "crashed"),
                "cancelled on request": ("cancelled", "cancelled")}
    for name, task in tasks.items():
        assert (task.status, task.outcome) == expected.get(name, ("succeeded", "succeeded")), name
    assert tasks["fails once, then retried"].attempts == 2
    hog = tasks["over its memory limit"].history[-1]
    assert hog.peak_rss_bytes and hog.peak_rss_bytes > 100 * 2**20
    # the agent run: plan spawned the steps, the summary read them, publish was approved
    plan, summary_task = tasks["research: plan"], tasks["research: summary"]
    publish = tasks["publish (needs approval)"]
    steps = [t for n, t in tasks.items() if n.startswith("research: ") and t not in (plan, summary_task)]
    assert len(steps) == 4 and sorted(plan.result["topics"]) == sorted(s.payload["topic"] for s in steps)
    for task in (*steps, summary_task, publish):
        assert task.parent_id == plan.id and task.workflow_id == plan.id
    assert all(s.history[0].started_at >= plan.completed_at for s in steps)
    assert summary_task.started_at >= max(s.completed_at for s in steps)
    assert summary_task.result["model"] == "offline-stand-in" and summary_task.result["text"]
    assert summary_task.result["sources"] == plan.result["topics"]
    killed = tasks["research: benchmarks"]
    assert [a.outcome for a in killed.history] == ["crashed", "succeeded"]
    assert killed.result["resumed_from"] == 2 and killed.result["steps"] == ["search done", "read done"]
    assert publish.await_event == "approve-publish"
    assert publish.result["approval"]["by"] == "taskvisor demo"
    assert publish.started_at >= summary_task.completed_at + 1.5  # approved after a wait
    with Queue(db, create=False) as queue:
        workflow = queue.workflow(plan.id)
    assert len(workflow.tasks) == 7 and workflow.finished
    # priorities: the high batch was claimed before the low one
    high = max(tasks[f"batch high priority #{n}"].started_at for n in (1, 2))
    low = min(tasks[f"batch low priority #{n}"].started_at for n in (1, 2))
    assert high <= low


@pytest.mark.timeout(120)
def test_keep_running_until_ctrl_c(tmp_path):
    db = tmp_path / "kept.db"
    proc = subprocess.Popen([sys.executable, "-c", CODE, "--db", str(db), "--listen", "",
                             "--keep-running"], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        assert lines and "press Ctrl-C" in lines[-1], "".join(lines)[-3000:]
        assert supervisors_of(db), "the supervisor should still be running"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)  # the demo and the supervisor it started
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "supervisor stopped" in rest
    assert f"taskvisor list --db {db}" in rest and "--keep-running" not in rest
    assert not supervisors_of(db)


@pytest.mark.timeout(120)
def test_demo_uses_a_model_server_when_one_is_configured(tmp_path):
    db = tmp_path / "llm.db"
    with FakeOpenAI(Stream(text="notes from a real server " * 5, delay_s=0.02)) as srv:
        res = subprocess.run([sys.executable, "-c", CODE, "--db", str(db), "--listen", ""],
                             cwd=tmp_path, env={**env(), "TASKVISOR_LLM__BASE_URL": srv.base_url},
                             capture_output=True, text=True, timeout=110)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        assert f"llm.chat at {srv.base_url}" in res.stdout
        assert len(srv.requests) == 6  # plan, four steps, summary
        assert all(r["body"]["stream"] is True for r in srv.requests)
    with Queue(db, create=False) as queue:
        research = [t for t in queue.list(limit=100)
                    if t.type in ("demo.plan", "demo.research", "demo.summary")]
    assert len(research) == 6 and all(t.status == "succeeded" for t in research)
    assert all(t.result["model"] != "offline-stand-in" for t in research)


@pytest.mark.timeout(30)
def test_refuses_an_existing_database(tmp_path):
    db = tmp_path / "precious.db"
    db.write_bytes(b"not yours")
    res = subprocess.run([sys.executable, "-c", CODE, "--db", str(db)], cwd=tmp_path, env=env(),
                         capture_output=True, text=True, timeout=25)
    assert res.returncode == 1
    assert "already exists" in res.stderr and db.read_bytes() == b"not yours"


@pytest.mark.timeout(120)
def test_a_db_path_with_quotes_and_backslashes_is_written_as_toml(tmp_path):
    """The config said `database = "{path}"` unescaped: with a " in the path `run` refused
    the file, and a \\b in it was read as a backspace (another path); a tab must be
    escaped in TOML too."""
    folder = tmp_path / 'say "hi"\\back\tslash'
    folder.mkdir()
    db = folder / "demo.db"
    res = subprocess.run([sys.executable, "-c", CODE, "--db", str(db), "--listen", ""],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=110)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert f"The tasks stay in {db};" in res.stdout
    with Queue(db, create=False) as queue:
        assert queue.list(limit=1)
    assert not supervisors_of(db)


@pytest.mark.timeout(30)
def test_a_db_path_that_is_not_utf8_is_refused(tmp_path):
    db = os.fsencode(tmp_path) + b"/not-\xff-utf8.db"
    res = subprocess.run([sys.executable, "-c", CODE, "--db", db, "--listen", ""],
                         cwd=tmp_path, env=env(), capture_output=True, timeout=25)
    assert res.returncode == 1, res.stderr
    [line] = res.stderr.decode("utf-8", "backslashreplace").splitlines()
    assert line.startswith("taskvisor: error: ") and "the path is not UTF-8" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(120)
def test_approve_manually_prints_the_command_and_waits_for_it(tmp_path):
    # In a folder with a space: the printed command used to carry the path unquoted
    # ("unrecognized arguments" when pasted).
    (tmp_path / "my demo").mkdir()
    db = tmp_path / "my demo" / "manual.db"
    proc = subprocess.Popen([sys.executable, "-c", CODE, "--db", str(db), "--listen", "",
                             "--approve-manually"], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "taskvisor send-event approve-publish" in line:
                break
        command = lines[-1].strip()
        assert command.startswith("taskvisor send-event approve-publish"), "".join(lines)[-3000:]
        with Queue(db, create=False) as queue:
            (waiting,) = queue.awaiting()
            assert waiting.payload["demo"] == "publish (needs approval)"
        argv = shlex.split(command.replace('"you"', '"a person"'))  # as a shell reads it
        assert argv[0] == "taskvisor" and argv[argv.index("--db") + 1] == str(db)
        res = subprocess.run([sys.executable, "-m", "supervisor", *argv[1:]], cwd=tmp_path,
                             env=env(), capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and waiting.id in res.stdout, res.stderr
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "approved by a person" in rest
