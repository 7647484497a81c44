"""Task logs against a real supervisor: a task's stdout and stderr (and ctx.logger lines)
go to that task's log, not to the supervisor's; a task that prints 100 MB leaves the
supervisor's log small and its own log with the last max_log_bytes; the CLI prints and
follows it, and `watch --api` its streamed output, every character whole."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import psutil
import pytest

from tests.e2e.live_support import start_live, stop
from tests.e2e.http_support import ROOT
from tests.support import kill_tree, wait_until

MIB = 1024 * 1024


def cli(sup, *args, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("TASKVISOR_")}
    return subprocess.run([sys.executable, "-m", "supervisor", "--config",
                           str(sup.root / "taskvisor.toml"), *args], env=env,
                          capture_output=True, timeout=timeout, cwd=sup.root)


@pytest.mark.timeout(120)
def test_a_task_that_prints_100_mb_keeps_its_tail_and_the_supervisor_log_small(tmp_path):
    sup = start_live(tmp_path, extra="", pool_size=2)
    try:
        proc = psutil.Process(sup.proc.pid)
        cpu0 = sum(proc.cpu_times()[:2])
        task = sup.enqueue(type="print", payload={"mb": 100})
        done = sup.wait_status(task["id"], "succeeded", "failed", timeout=90)
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        assert done["status"] == "succeeded", done
        assert os.path.getsize(sup.log_path) < 64 * 1024, "task output reached the supervisor's log"
        body = sup.get(f"/api/tasks/{task['id']}/logs").json
        assert body["attempt"] == 1 and body["attempts"] == [1]
        size = len(body["text"].encode())
        assert 256 * 1024 - 1024 <= size <= 256 * 1024
        assert body["end"] > 100 * MIB and body["end"] - body["start"] == size
        assert "the last line\n" in body["text"]
        assert "a logger line" in body["text"] and f"task={task['id']}" in body["text"]
        assert body["text"].count("x" * 1023 + "\n") >= 200
        # Reading 100 MB through a pipe and keeping its tail: well under a core-second
        # per 10 MB on this machine (the task process itself is not counted).
        assert cpu < 10.0, f"the supervisor used {cpu:.1f} s of CPU for 100 MB of output"
        res = cli(sup, "logs", task["id"])
        assert res.returncode == 0, res.stderr
        assert res.stdout.endswith(body["text"].encode()[-2000:])
        assert cli(sup, "logs", task["id"], "--attempt", "2").stdout == b""
    finally:
        stop(sup)


@pytest.mark.timeout(60)
def test_logs_follow_prints_a_running_task_until_it_ends(tmp_path):
    sup = start_live(tmp_path)
    try:
        task = sup.enqueue(type="stream", payload={"n": 1})  # warm: the table exists
        sup.wait_status(task["id"], "succeeded")
        task = sup.enqueue(type="print", payload={"mb": 1})
        res = cli(sup, "logs", task["id"], "--follow")
        assert res.returncode == 0, res.stderr
        assert res.stdout.endswith(b"a logger line\n") or b"a logger line" in res.stdout
        assert b"the last line\n" in res.stdout
        assert res.stdout.count(b"x" * 1023 + b"\n") >= 200  # the 256 KiB tail of 1 MiB
        watched = cli(sup, "watch", task["id"])
        assert watched.returncode == 0 and b"[succeeded]" in watched.stderr
    finally:
        stop(sup)


@pytest.mark.timeout(60)
def test_logs_follow_follows_the_retry_until_the_task_finishes(tmp_path):
    """It followed the first attempt it saw, waited through the retry's backoff and
    left when attempt 2 started, without a line of it."""
    sup = start_live(tmp_path)
    try:
        task = sup.enqueue(type="flaky", payload={"s": 1.5}, max_attempts=2)
        res = cli(sup, "logs", task["id"], "--follow")
        assert res.returncode == 0, res.stderr
        assert res.stdout == b"attempt 1\nattempt 2\n", (res.stdout, res.stderr)
        assert b"[attempt 2]" in res.stderr
        assert sup.get(f"/api/tasks/{task['id']}").json["status"] == "succeeded"
        only = cli(sup, "logs", task["id"], "--attempt", "1", "--follow")
        assert only.returncode == 0 and only.stdout == b"attempt 1\n", only
    finally:
        stop(sup)


# "<é|€/😀>" in pieces that cut each character, each ending after an ASCII marker: the
# test lets the next piece go once the CLI printed the marker, so every cut falls
# between two answers the CLI read.
CUT_PIECES = [b"<\xc3", b"\xa9|\xe2", b"\x82\xac/\xf0\x9f", b"\x98\x80>\n"]
CUT_MARKERS = [b"<", b"|", b"/"]


@pytest.mark.timeout(60)
def test_logs_follow_api_prints_characters_cut_between_pieces_whole(tmp_path):
    """`logs --follow --api` asked for the chunks after the last it had and each answer
    was decoded on its own: a character cut between two chunks came out as U+FFFD."""
    sup = start_live(tmp_path)
    go = tmp_path / "go"
    go.mkdir()
    proc = None
    try:
        task = sup.enqueue(type="pieces", payload={
            "pieces": [p.decode("latin-1") for p in CUT_PIECES], "go": str(go)})
        proc, out, reader = cli_running(sup, "logs", task["id"], "--follow", "--api", sup.url)
        for i, marker in enumerate(CUT_MARKERS, start=1):
            wait_until(lambda: marker in out, timeout=20,
                       message=f"the CLI never printed {marker!r}: {bytes(out)!r}")
            (go / str(i)).touch()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        reader.join(timeout=10)
        assert bytes(out).decode("utf-8") == "<é|€/😀>\n"
        assert sup.get(f"/api/tasks/{task['id']}").json["status"] == "succeeded"
    finally:
        if proc is not None and proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=10)
        stop(sup)


@pytest.mark.timeout(60)
def test_watch_api_prints_streamed_text_with_unicode_line_separators(tmp_path):
    """The SSE client split the stream with httpx's iter_lines, which also breaks lines
    at U+2028, U+2029 and U+0085 (SQLite's JSON leaves them raw in the data line): an
    output event holding one was two halves of JSON and `watch --api` died."""
    sup = start_live(tmp_path)
    go = tmp_path / "go"
    go.mkdir()
    proc = None
    text = "é\u2028€\x85😀\u2029\r\n>"
    try:
        task = sup.enqueue(type="pieces", payload={"pieces": ["<", text], "go": str(go),
                                                   "stream": True})
        proc, out, reader = cli_running(sup, "watch", task["id"], "--api", sup.url)
        wait_until(lambda: b"<" in out, timeout=20, message=f"no '<' printed: {bytes(out)!r}")
        (go / "1").touch()  # the stream is open (before the output was read): it brings this
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        reader.join(timeout=10)
        assert bytes(out).decode("utf-8") == "<" + text
    finally:
        if proc is not None and proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=10)
        stop(sup)


def cli_running(sup, *args):
    """The CLI as a running process, its stdout read into a bytearray by a thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKVISOR_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "--config", str(sup.root / "taskvisor.toml"), *args],
        env={**env, "PYTHONPATH": str(ROOT)}, cwd=sup.root,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    out = bytearray()
    reader = threading.Thread(target=read_into, args=(proc.stdout, out), daemon=True)
    reader.start()
    return proc, out, reader


def read_into(pipe, out: bytearray) -> None:
    """Append what `pipe` gives to `out` as it comes (a test reads it while it runs)."""
    while piece := os.read(pipe.fileno(), 65536):
        out += piece
