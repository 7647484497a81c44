"""The `taskvisor` command line as a real subprocess (`python -m supervisor`) on real files:
output formats, exit codes, every bad input (one error line, exit 2, nothing written),
migrations and config discovery. A test plays the supervisor through the Store API."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest

from supervisor import policy
from tests.support import wait_until
from supervisor.store import AttemptEnd, Outcome, Status, Store, latest_version

ROOT = Path(__file__).resolve().parents[2]
ID = re.compile(r"[0-9A-Z]{26}")
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
TASK_FIELDS = {"id", "type", "payload", "priority", "status", "attempts", "max_attempts",
               "created_at", "started_at", "completed_at", "run_after", "result", "error",
               "outcome", "depends_on", "progress"}


def env_for(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKVISOR_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def tv(cwd: Path, *args: str, input: str | None = None, env: dict | None = None,
       timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=cwd, input=input,
                          capture_output=True, text=True, env=env or env_for(), timeout=timeout)


def enqueue(cwd: Path, *args: str) -> str:
    res = tv(cwd, "enqueue", *args)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def count(db: Path) -> int:
    store = Store(db, migrate=False, create=False)
    try:
        return sum(store.stats(time.time()).totals().values())
    finally:
        store.close()


def finish(db: Path, *, ok: bool, now: float | None = None) -> None:
    """Play the supervisor: claim the next task, then succeed or fail it for good."""
    store = Store(db)
    try:
        task = store.claim("test-owner", time.time(), lease_s=30)
        assert task is not None
        now = time.time() if now is None else now
        if ok:
            end = AttemptEnd(Outcome.SUCCEEDED, result='{"answer":42}', exit_code=0,
                             peak_rss_bytes=50 * 1048576, cpu_s=0.25, wall_s=1.5)
            assert store.complete(task.lease, end, now)
        else:
            end = AttemptEnd(Outcome.ERROR, reason="ValueError: boom", exit_code=1,
                             retryable=False)
            assert store.fail(task.lease, end, now, policy.Backoff()) is Status.FAILED
    finally:
        store.close()


def assert_one_error(res: subprocess.CompletedProcess, pattern: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("taskvisor: error: ")
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """./taskvisor.db in the cwd (the default database), holding one queued task."""
    enqueue(tmp_path, "seed")
    return tmp_path / "taskvisor.db"


# -- output --------------------------------------------------------------------------------

def test_enqueue_prints_the_id_alone(tmp_path):
    res = tv(tmp_path, "enqueue", "echo", '{"text": "hi"}', "--priority", "5", "--delay",
             "5m", "--timeout", "30s", "--memory-mb", "64", "--max-attempts", "2", "--key", "k")
    assert res.returncode == 0 and res.stderr == ""
    assert ID.fullmatch(res.stdout.rstrip("\n")) and res.stdout.count("\n") == 1
    task_id = res.stdout.strip()
    task = Store(tmp_path / "taskvisor.db").get(task_id)
    assert (task.payload, task.priority, task.timeout_s, task.memory_mb, task.max_attempts,
            task.dedupe_key) == ({"text": "hi"}, 5, 30, 64, 2, "k")
    assert task.run_after - task.created_at == pytest.approx(300, abs=0.01)
    assert enqueue(tmp_path, "echo", "{}", "--key", "k") == task_id  # deduped


def test_enqueue_reads_the_payload_from_stdin_and_takes_dependencies(tmp_path):
    first = enqueue(tmp_path, "fetch")
    res = tv(tmp_path, "enqueue", "embed", "-", "--depends-on", first, input='{"n": [1, 2]}')
    assert res.returncode == 0, res.stderr
    task = Store(tmp_path / "taskvisor.db").get(res.stdout.strip())
    assert task.payload == {"n": [1, 2]} and task.depends_on == (first,)
    assert task.status is Status.BLOCKED


def test_list_table_and_json(db, tmp_path):
    other = enqueue(tmp_path, "other", '{"a": 1}')
    res = tv(tmp_path, "list")
    assert res.returncode == 0
    header, *rows = res.stdout.splitlines()
    assert header.split()[:6] == ["ID", "TYPE", "STATUS", "PRI", "ATTEMPTS", "AGE"]
    assert rows[0].split()[:5] == [other, "other", "queued", "0", "0/3"] and len(rows) == 2
    tasks = json.loads(tv(tmp_path, "list", "--json", "--type", "other").stdout)
    assert [t["id"] for t in tasks] == [other]
    task = tasks[0]
    assert TASK_FIELDS <= set(task) and "history" not in task
    assert ISO.fullmatch(task["created_at"]) and ISO.fullmatch(task["run_after"])
    assert (task["started_at"], task["completed_at"], task["result"]) == (None, None, None)
    assert (task["payload"], task["status"], task["depends_on"]) == ({"a": 1}, "queued", [])
    assert json.loads(tv(tmp_path, "list", "--json", "--status", "running").stdout) == []
    assert len(json.loads(tv(tmp_path, "list", "--json", "--limit", "1").stdout)) == 1


def test_show_with_history(db, tmp_path):
    task_id = Store(db).list()[0].id
    finish(db, ok=True)
    res = tv(tmp_path, "show", task_id)
    assert res.returncode == 0
    assert "succeeded" in res.stdout and "50.0 MiB" in res.stdout and "wall 1.5s" in res.stdout
    shown = json.loads(tv(tmp_path, "show", task_id, "--json").stdout)
    assert TASK_FIELDS <= set(shown) and shown["result"] == {"answer": 42}
    assert ISO.fullmatch(shown["started_at"]) and ISO.fullmatch(shown["completed_at"])
    [attempt] = shown["history"]
    assert (attempt["attempt"], attempt["outcome"], attempt["peak_rss_bytes"]) == (
        1, "succeeded", 50 * 1048576)


def test_status_counts(db, tmp_path):
    enqueue(tmp_path, "other")
    res = tv(tmp_path, "status")
    assert res.returncode == 0 and "queued 2" in res.stdout and "oldest queued" in res.stdout
    out = json.loads(tv(tmp_path, "status", "--json").stdout)
    assert out["totals"]["queued"] == 2 and out["by_type"]["queued"] == {"seed": 1, "other": 1}
    assert ISO.fullmatch(out["oldest_queued_at"]) and out["oldest_queued_age_s"] >= 0
    assert out["supervisors"] == [] and out["database"] == str(db)


# -- wait, cancel, retry, prune ----------------------------------------------------------

def test_wait_exits_0_when_the_task_succeeds_meanwhile(db, tmp_path):
    task_id = Store(db).list()[0].id
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "wait", task_id, "--timeout",
                             "20"], cwd=tmp_path, env=env_for(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # Finish the task only once `wait` has the database open (it is then waiting).
        wait_until(lambda: any(f.path == os.path.realpath(db)
                               for f in psutil.Process(proc.pid).open_files()),
                   timeout=15)
        finish(db, ok=True)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, out, err) == (0, "succeeded\n", "")


def test_wait_exits_1_when_failed_or_cancelled_and_124_on_timeout(tmp_path):
    failed = enqueue(tmp_path, "t", "--max-attempts", "1")
    finish(tmp_path / "taskvisor.db", ok=False)
    res = tv(tmp_path, "wait", failed)
    assert (res.returncode, res.stdout) == (1, "failed\n") and "ValueError: boom" in res.stderr
    cancelled = enqueue(tmp_path, "t")
    assert tv(tmp_path, "cancel", cancelled).stdout == "cancelled\n"
    assert tv(tmp_path, "wait", cancelled).returncode == 1
    queued = enqueue(tmp_path, "t")
    start = time.monotonic()
    res = tv(tmp_path, "wait", queued, "--timeout", "0.5")
    assert res.returncode == 124 and res.stdout == "" and "still queued" in res.stderr
    assert time.monotonic() - start >= 0.5


def test_cancel_a_running_task_requests_it(db, tmp_path):
    task_id = Store(db).list()[0].id
    Store(db).claim("test-owner", time.time(), lease_s=30)
    res = tv(tmp_path, "cancel", task_id)
    assert (res.returncode, res.stdout) == (0, "running\n") and "cancel requested" in res.stderr
    assert Store(db).get(task_id).cancel_requested


def test_retry_a_failed_task(tmp_path):
    task_id = enqueue(tmp_path, "t", "--max-attempts", "1")
    finish(tmp_path / "taskvisor.db", ok=False)
    res = tv(tmp_path, "retry", task_id)
    assert (res.returncode, res.stdout) == (0, "queued\n")
    task = Store(tmp_path / "taskvisor.db").get(task_id)
    assert (task.status, task.attempts) == (Status.QUEUED, 0)


def test_prune_deletes_old_finished_tasks_only(tmp_path):
    old = enqueue(tmp_path, "t")
    finish(tmp_path / "taskvisor.db", ok=True, now=time.time() - 8 * 86400)
    recent = enqueue(tmp_path, "t")
    finish(tmp_path / "taskvisor.db", ok=True)
    queued = enqueue(tmp_path, "t")
    res = tv(tmp_path, "prune", "--older-than", "7d")
    assert (res.returncode, res.stdout) == (0, "1 task deleted\n")
    left = {t["id"] for t in json.loads(tv(tmp_path, "list", "--json").stdout)}
    assert left == {recent, queued} and old not in left


# -- migrate -------------------------------------------------------------------------------

def test_migrate_a_fresh_file(tmp_path):
    res = tv(tmp_path, "migrate", "--db", "new.db")
    assert (res.returncode, res.stdout) == (0, f"schema version 0 -> {latest_version()}\n")
    assert (tmp_path / "new.db").stat().st_mode & 0o777 == 0o600
    again = tv(tmp_path, "--db", "new.db", "migrate")
    assert again.stdout == f"schema version {latest_version()} -> {latest_version()}\n"


def newer_wal_file(path: Path) -> bytes:
    store = Store(path)
    store.conn.db.execute(f"PRAGMA user_version={latest_version() + 1}")
    store.close()
    return path.read_bytes()


@pytest.mark.parametrize("args", [["migrate"], ["list"], ["enqueue", "t"], ["status"]])
def test_a_newer_schema_is_refused_and_untouched(tmp_path, args):
    before = newer_wal_file(tmp_path / "future.db")
    assert_one_error(tv(tmp_path, "--db", "future.db", *args), r"schema version \d+, newer")
    assert (tmp_path / "future.db").read_bytes() == before


def test_a_newer_rollback_journal_file_is_untouched(tmp_path):
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE x (a)")
        conn.execute(f"PRAGMA user_version={latest_version() + 1}")
    conn.close()
    before = path.read_bytes()
    assert_one_error(tv(tmp_path, "--db", "future.db", "migrate"), "newer")
    assert path.read_bytes() == before


# -- bad input: one line on stderr, exit 2, nothing written --------------------------------

@pytest.mark.parametrize("args, stdin, pattern", [
    (["enqueue", "t", "[1, 2]"], None, "payload must be a JSON object, got an array"),
    (["enqueue", "t", '"text"'], None, "payload must be a JSON object, got a string"),
    (["enqueue", "t", "5"], None, "payload must be a JSON object"),
    (["enqueue", "t", "{bad"], None, "payload is not valid JSON"),
    (["enqueue", "t", "-"], "{not json", "payload is not valid JSON"),
    (["enqueue", "t", '{"x": NaN}'], None, "not JSON-serialisable"),
    (["enqueue", "t", "-"], "[" * 100_000, "payload is not valid JSON: nested too deeply"),
    (["send-event", "e", "-"], "[" * 100_000, "event data is not valid JSON: nested too deeply"),
    (["send-event", "e", "{bad"], None, "event data is not valid JSON"),
    (["send-event", "ap\tprove"], None,
     r"name must be at most 200 printable characters: '\\t' at index 2 is not printable$"),
    (["enqueue", "t", "--await-event", "x\x1b"], None,
     r"await_event must .*: '\\x1b' at index 1 is not printable$"),
    (["enqueue", "re\tport"], None,
     r"type must be at most 200 printable characters: '\\t' at index 2 is not printable$"),
    (["enqueue", "x" * 201], None, r"type must be at most 200 printable characters, got 201"),
    (["enqueue", "t", "-"], '{"s": "' + "x" * 1048576 + '"}',
     r"over the limit of 1048576 bytes"),
    (["enqueue", "t", "--depends-on", "01NOSUCHTASK0000000000000X"], None,
     "unknown task 01NOSUCHTASK0000000000000X"),
    (["enqueue", "t", "--priority", "high"], None, "argument --priority: invalid int"),
    (["enqueue", "t", "--delay", "-5"], None, "invalid duration"),
    (["enqueue", "t", "--timeout", "soon"], None, "invalid duration"),
    (["enqueue", "t", "--memory-mb", "0"], None, "memory_mb must be >= 1"),
    (["enqueue", "t", "--max-attempts", "0"], None, "max_attempts must be >= 1"),
    (["enqueue", ""], None, "type must be a non-empty string"),
    (["enqueue"], None, "required: TYPE"),
    (["list", "--status", "bogus"], None, "unknown status 'bogus'"),
    (["list", "--limit", "0"], None, "limit must be"),
    (["show", "nope"], None, "no task with id nope"),
    (["cancel", "nope"], None, "no task with id nope"),
    (["retry", "nope"], None, "no task with id nope"),
    (["wait", "nope"], None, "no task with id nope"),
    (["prune", "--older-than", "soon"], None, "invalid duration"),
    (["prune"], None, "required: --older-than"),
    (["bogus-command"], None, "invalid choice: 'bogus-command'"),
    ([], None, "required: COMMAND"),
    (["list", "--no-such-option"], None, "unrecognized arguments"),
])
def test_bad_input(db, tmp_path, args, stdin, pattern):
    assert_one_error(tv(tmp_path, *args, input=stdin), pattern)
    assert count(db) == 1


@pytest.mark.parametrize("attempt", ["0", "99999999999999999999", "1000000001"])
def test_logs_with_an_attempt_out_of_range_is_bad_input(db, tmp_path, attempt):
    """Past 64 bits it was an OverflowError traceback from SQLite's binding."""
    task_id = Store(db).list()[0].id
    assert_one_error(tv(tmp_path, "logs", task_id, "--attempt", attempt),
                     r"--attempt must be from 1 to 1000000000")


def test_retrying_a_queued_task_is_bad_input(db, tmp_path):
    task_id = Store(db).list()[0].id
    assert_one_error(tv(tmp_path, "retry", task_id), "only failed or cancelled")
    assert Store(db).get(task_id).status is Status.QUEUED


def test_payload_limit_from_the_config(db, tmp_path):
    (tmp_path / "taskvisor.toml").write_text("[supervisor]\nmax_payload_bytes = 20\n")
    assert_one_error(tv(tmp_path, "enqueue", "t", '{"s": "' + "x" * 20 + '"}'),
                     "over the limit of 20 bytes")
    assert count(db) == 1


@pytest.mark.parametrize("command", [["list"], ["show", "X"], ["status"], ["wait", "X"],
                                     ["cancel", "X"], ["prune", "--older-than", "1d"]])
def test_reading_a_missing_database_is_an_error(tmp_path, command):
    assert_one_error(tv(tmp_path, *command, "--db", "missing.db"), "no such database")
    assert_one_error(tv(tmp_path, *command), "no such database")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, what", [("--db", "database"), ("--config", "config")])
def test_an_empty_path_is_an_error_for_every_command(tmp_path, option, what):
    """`--db ""` or `--config ""` (say, an unset shell variable) used to mean no option:
    the command went on with the default database (./taskvisor.db) or config, and wrote
    to it."""
    from supervisor import cli
    for name in cli.COMMANDS:
        for argv in ([option, "", name], [name, option, ""], [name, f"{option}="]):
            with pytest.raises(cli.UsageError, match=rf"^argument {option}: expected a {what} "
                                                     r"file path, got an empty string$"):
                cli.build_parser().parse_args(argv)
    for args in (["enqueue", "t"], ["list"], ["migrate"]):
        assert_one_error(tv(tmp_path, *args, option, ""), rf"argument {option}: .*empty string")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_database(tmp_path):
    (tmp_path / "notes.db").write_text("this is not sqlite\n" * 100)
    before = (tmp_path / "notes.db").read_bytes()
    assert_one_error(tv(tmp_path, "--db", "notes.db", "list"), "not a")
    assert (tmp_path / "notes.db").read_bytes() == before


def test_config_errors(db, tmp_path):
    (tmp_path / "taskvisor.toml").write_text("[supervisor]\npool_sise = 4\nlease_s = -1\n")
    assert_one_error(tv(tmp_path, "enqueue", "t"), r"pool_sise.*\(and 1 more")
    res = tv(tmp_path, "check-config")
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("taskvisor: error: ") for line in lines)
    assert "pool_sise" in lines[0] + lines[1] and "lease_s" in lines[0] + lines[1]
    assert_one_error(tv(tmp_path, "list", "--config", "missing.toml"), "does not exist")
    assert count(db) == 1


# -- config discovery ----------------------------------------------------------------------

def test_defaults_use_taskvisor_db_in_the_cwd(tmp_path):
    enqueue(tmp_path, "t")
    assert (tmp_path / "taskvisor.db").exists()
    res = tv(tmp_path, "check-config")
    assert res.returncode == 0
    effective = tomllib.loads(res.stdout)
    assert effective["supervisor"]["database"] == str(tmp_path / "taskvisor.db")


def test_discovery_order(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "explicit.toml").write_text('[supervisor]\ndatabase = "explicit.db"\n')
    (etc / "env.toml").write_text('[supervisor]\ndatabase = "env.db"\n')
    (tmp_path / "taskvisor.toml").write_text('[supervisor]\ndatabase = "local.db"\n')
    env = env_for(TASKVISOR_CONFIG=str(etc / "env.toml"))

    def database(*args, env=None):
        res = tv(tmp_path, "check-config", *args, env=env)
        assert res.returncode == 0, res.stderr
        return Path(tomllib.loads(res.stdout)["supervisor"]["database"]).name

    assert database() == "local.db"
    assert database(env=env) == "env.db"
    assert database("--config", "etc/explicit.toml", env=env) == "explicit.db"
    assert database("--config", "etc/explicit.toml", "--db", "cli.db", env=env) == "cli.db"
    res = tv(tmp_path, "--config", "etc/explicit.toml", "enqueue", "t")
    assert res.returncode == 0
    assert (etc / "explicit.db").exists()  # relative to the config file
    assert count(etc / "explicit.db") == 1
    assert tv(tmp_path, "list", "--json", "--db", "etc/explicit.db").returncode == 0


def test_limits_and_schedules_on_a_missing_database_say_so_and_create_nothing(tmp_path):
    """`schedules` created ./taskvisor.db where `limits` refused: a typo in --db left a
    new empty database behind."""
    for args, error in ((("limits",), "no such database"), (("schedules",), "no such database"),
                        (("schedules", "--json"), "no such database"),
                        (("schedules", "pause", "nightly"), "no schedule named 'nightly'")):
        assert_one_error(tv(tmp_path, *args), error)
        assert not (tmp_path / "taskvisor.db").exists(), args
