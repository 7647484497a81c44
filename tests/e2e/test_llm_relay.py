"""The model-call relay (workers.relay, supervisor.relay) under attack: the relay killed
mid-stream (the attempt fails retryably, the retry goes through the restarted relay), a
task killed mid-stream (the model server sees the connection closed at once), a task that
never reads (the relay's memory stays bounded: backpressure reaches the server), 200 calls
at once (all succeed; keep-alive: far fewer connections than calls), the relay switched
off by config, and a relay that cannot be reached (the call is made directly)."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import stat
import time

import psutil
import pytest

from supervisor.relay import Relay
from supervisor.store import Store
from tests.support import wait_until
from tests.support.launcher import SupervisorProcess, supervisor_config
from tests.support.openai_server import FakeOpenAI, Flood, Stream
from workers import relaycall
from workers.handlers import llm
from workers.relay import RELAY_ENV


def relay_pids(sup: SupervisorProcess) -> list[int]:
    out = []
    for child in psutil.Process(sup.pid).children():
        try:
            if "workers.relay" in child.cmdline():
                out.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def streaming_relays(sup: SupervisorProcess, port: int) -> tuple[list[int], list[int]]:
    """(the supervisor's relays now, those of them holding a connection to `port`)."""
    pids = relay_pids(sup)
    busy = []
    for pid in pids:
        try:
            if any(c.raddr and c.raddr.port == port
                   for c in psutil.Process(pid).net_connections("tcp")):
                busy.append(pid)
        except psutil.NoSuchProcess:
            pass
    return pids, busy


def llm_config(base_url: str, extra: str = "", pool_size: int = 2) -> str:
    return supervisor_config(["workers.handlers.llm", "workers.handlers.shell"], pool_size=pool_size,
                             extra=f'[llm]\nbase_url = "{base_url}"\n' + extra)


@pytest.fixture
def relay():
    """A relay process of this test's own (what a supervisor starts), named in the
    environment for llm calls made in this process."""
    handle = Relay()
    handle.start(wait=True)
    old = os.environ.get(RELAY_ENV)
    os.environ[RELAY_ENV] = handle.path
    try:
        yield handle
    finally:
        if old is None:
            os.environ.pop(RELAY_ENV, None)
        else:
            os.environ[RELAY_ENV] = old
        handle.stop()


@pytest.mark.timeout(90)
def test_relay_killed_mid_stream_the_attempt_fails_retryably_and_the_retry_uses_the_new_relay(tmp_path):
    """In a task process that calls through the relay (tests/e2e/test_llm_hosted.py: an
    attempt the relay runs itself)."""
    with FakeOpenAI(Stream(text="after the restart", keep_alive=True)) as srv:
        srv.script(Stream(text=" ".join(["word"] * 400), delay_s=0.05))
        # The retry waits 3 s: the relay is restarted 0.5 s after it died.
        toml = llm_config(srv.base_url, 'run_in_relay = false\n[types."llm.chat"]\n'
                          'backoff_initial_s = 3\nbackoff_max_s = 3\n')
        with SupervisorProcess(tmp_path, toml) as sup:
            (first,) = wait_until(lambda: relay_pids(sup), timeout=10)
            task_id = sup.queue.enqueue("llm.chat", {"prompt": "a long answer"}, max_attempts=3)
            wait_until(lambda: "tokens" in (sup.queue.get(task_id).progress_message or ""), timeout=20)
            os.kill(first, signal.SIGKILL)
            task = sup.wait(task_id, timeout=40)
            assert task.status == "succeeded", (task.error, sup.log()[-3000:])
            assert [a.outcome for a in task.history] == ["error", "succeeded"]
            assert "LlmUnavailable" in task.history[0].reason and "relay" in task.history[0].reason
            assert task.result["text"] == "after the restart"
            (second,) = wait_until(lambda: relay_pids(sup), timeout=10)
            assert second != first
            assert f"model-call relay {first} killed by SIGKILL; restarting in" in sup.log()
            # The retry's request came from the new relay: its kept-alive connection is the
            # one the server saw.
            peer_port = srv.requests[-1]["peer"][1]
            ports = {c.laddr.port for c in psutil.Process(second).net_connections("tcp")}
            assert peer_port in ports, (peer_port, ports)
            store = Store(str(tmp_path / "taskvisor.db"))
            try:
                assert "cannot be reached" not in store.read_output(task_id, 2).text
            finally:
                store.close()


@pytest.mark.timeout(90)
def test_a_task_killed_mid_stream_closes_its_upstream_connection_at_once(tmp_path):
    with FakeOpenAI(Stream(text=" ".join(["word"] * 400), delay_s=0.05)) as srv:
        with SupervisorProcess(tmp_path, llm_config(srv.base_url, "run_in_relay = false\n")) as sup:
            (relay_pid,) = wait_until(lambda: relay_pids(sup), timeout=10)
            task_id = sup.queue.enqueue("llm.chat", {"prompt": "a long answer"}, max_attempts=1)
            task = wait_until(lambda: (t := sup.queue.get(task_id)).pid and "tokens" in (
                t.progress_message or "") and t, timeout=20)
            killed = time.monotonic()
            os.kill(task.pid, signal.SIGKILL)
            gone = wait_until(lambda: srv.disconnects, timeout=5,
                              message="the model server still streams to a dead task")
            assert gone[0] - killed < 2.0
            assert sup.wait(task_id).status == "failed"
            assert relay_pids(sup) == [relay_pid], "the relay outlives the task"
            assert len(srv.requests) == 1


@pytest.mark.timeout(60)
def test_a_caller_that_never_reads_holds_the_relay_to_a_bounded_memory(relay):
    with FakeOpenAI(Flood(event_bytes=1 << 16, total_bytes=1 << 30)) as srv:
        srv.script(Stream(text="warm"))  # one call first: the relay's imports are done
        assert llm.chat_sync({"prompt": "hi", "base_url": srv.base_url, "request_timeout_s": 10,
                              "stall_timeout_s": 5})["text"] == "warm"
        proc = psutil.Process(relay.pid)
        rss_before = proc.memory_info().rss
        sock = relaycall.connect()
        assert sock is not None
        sock.sendall(relaycall.request_line(srv.base_url + "/chat/completions", {}, {"messages": []},
                                            30.0, 60.0))
        # The flood stops growing once every buffer between the server and this socket is
        # full: the relay stopped reading upstream.
        seen = []

        def settled():
            seen.append(srv.flooded)
            return len(seen) > 20 and seen[-1] == seen[-20] and seen[-1] > 0
        wait_until(settled, timeout=30, interval=0.05, message=f"the flood never stopped: {seen[-3:]}")
        assert srv.flooded < 32 << 20, srv.flooded
        assert proc.memory_info().rss - rss_before < 16 << 20
        sock.close()  # the caller goes away: the relay closes the upstream request
        wait_until(lambda: srv.disconnects, timeout=5, message="upstream still open")


@pytest.mark.timeout(120)
def test_200_concurrent_calls_all_succeed_on_kept_alive_connections(relay):
    with FakeOpenAI(Stream(text="one two three four five six", delay_s=0.1, keep_alive=True)) as srv:
        srv.httpd.socket.listen(1024)  # 200 connect at once
        payload = {"prompt": "hi", "base_url": srv.base_url, "request_timeout_s": 60,
                   "stall_timeout_s": 30}
        with concurrent.futures.ThreadPoolExecutor(200) as pool:
            results = list(pool.map(lambda _: llm.chat_sync(payload), range(600)))
    assert all(r["text"] == "one two three four five six" for r in results)
    assert len(srv.requests) == 600 and srv.max_active >= 50, srv.max_active
    # Three waves of 200: the later waves reuse the connections of the first (about 200
    # on a quiet machine; the bound leaves room for a loaded one).
    assert srv.connections <= 300, srv.connections
    assert relaycall.fallbacks == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("on", [True, False])
def test_relay_on_by_default_and_off_by_config(tmp_path, on):
    with FakeOpenAI(Stream(text="hello")) as srv:
        toml = llm_config(srv.base_url, "" if on else "relay = false\n")
        with SupervisorProcess(tmp_path, toml) as sup:
            echo = sup.wait(sup.queue.enqueue("shell", {"cmd": f'echo "[${RELAY_ENV}]"', "shell": True}))
            path = echo.result["stdout_tail"].strip()[1:-1]
            task = sup.wait(sup.queue.enqueue("llm.chat", {"prompt": "hi"}))
            assert task.status == "succeeded" and task.result["text"] == "hello"
            pids = relay_pids(sup)
            if not on:
                assert path == "" and pids == []
                assert "model-call relay off" in sup.log()
                return
            assert len(pids) == 1 and stat.S_ISSOCK(os.stat(path).st_mode)
            assert "warm-up" not in sup.log()  # llm's warm-up of the relay path ran cleanly
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
            assert sup.stop() == 0
            assert not os.path.exists(os.path.dirname(path)), "the socket's folder is removed"
            assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
            assert f"model-call relay {pids[0]} stopped" in sup.log()


@pytest.mark.timeout(30)
def test_a_relay_that_cannot_be_reached_means_a_direct_call_logged_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(RELAY_ENV, str(tmp_path / "no-relay.sock"))
    before = relaycall.fallbacks
    with FakeOpenAI(Stream(text="direct")) as srv:
        payload = {"prompt": "hi", "base_url": srv.base_url, "request_timeout_s": 10,
                   "stall_timeout_s": 5}
        with caplog.at_level(logging.WARNING, logger="taskvisor.llm"):
            assert llm.chat_sync(payload)["text"] == "direct"
            assert llm.chat_sync(payload)["text"] == "direct"
    assert relaycall.fallbacks == before + 2
    said = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(said) == (1 if before == 0 else 0), said


@pytest.mark.timeout(60)
def test_the_relay_dies_with_its_supervisor(tmp_path):
    with FakeOpenAI(Stream(text="hello")) as srv:
        with SupervisorProcess(tmp_path, llm_config(srv.base_url)) as sup:
            (pid,) = wait_until(lambda: relay_pids(sup), timeout=10)
            relay = psutil.Process(pid)
            argv = relay.cmdline()
            folder = os.path.dirname(argv[argv.index("--socket") + 1])
            sup.kill9()
            wait_until(lambda: not relay.is_running() or relay.status() == psutil.STATUS_ZOMBIE,
                       timeout=10, message="the relay outlived its supervisor")
            assert os.path.isdir(folder)  # nobody stopped it: its socket folder is left
            sup.start()  # the next supervisor removes the folder of a dead one
            assert not os.path.exists(folder)
            assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_a_removed_socket_folder_is_made_again_and_calls_use_the_relay(tmp_path):
    """Something that cleans the temporary folder removed the relay's socket: the relay
    went on running, unreachable, and was never restarted, so every task from then on
    called directly (httpx in each task process) and logged that it could not reach it."""
    import shutil
    with FakeOpenAI(Stream(text="through the relay")) as srv:
        with SupervisorProcess(tmp_path, llm_config(srv.base_url)) as sup:
            (pid,) = wait_until(lambda: relay_pids(sup), timeout=10)
            argv = psutil.Process(pid).cmdline()
            path = argv[argv.index("--socket") + 1]
            wait_until(lambda: os.path.exists(path), timeout=10)
            shutil.rmtree(os.path.dirname(path))
            wait_until(lambda: os.path.exists(path), timeout=10,
                       message="the relay's socket was not made again")
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
            task_id = sup.queue.enqueue("llm.chat", {"prompt": "hi"})
            task = sup.wait(task_id, timeout=30)
            assert task.status == "succeeded", task.error
            assert task.result["text"] == "through the relay"
            assert relay_pids(sup) == [pid], "the relay kept running, calls in flight with it"
            store = Store(str(tmp_path / "taskvisor.db"))
            try:
                assert "cannot be reached" not in store.read_output(task_id).text
            finally:
                store.close()
            assert "cannot be reached" not in sup.log()
            assert sup.stop() == 0
            assert not os.path.exists(os.path.dirname(path))


def test_the_relays_socket_check_knows_its_own_file(tmp_path):
    """A socket in place is left alone. The check compared the file with fstat of the
    listener (the socket's own inode, never the file's), so it found the socket removed
    at every check and bound it again, resetting connections waiting in the backlog."""
    from workers.relay import bind, file_id, gone
    path = str(tmp_path / "r.sock")
    first_sock = bind(path)
    try:
        first = file_id(path)
        assert first is not None and file_id(path) == first
        assert not gone(path, first)
        os.unlink(path)
        assert file_id(path) is None and gone(path, first)
        with bind(path):
            assert file_id(path) not in (None, first) and gone(path, first)
    finally:
        first_sock.close()


# -- the relay reads the answer for a task's context ("parse": workers.handlers.llmreports)

def task_context(reporter_fd: int):
    """The context a task process hands llm.chat, reporting on `reporter_fd`."""
    from workers.child import Reporter
    from workers.context import TaskContext
    return TaskContext(id="t1", type="llm.chat", attempt=1, max_attempts=3, deadline_at=None,
                       reporter=Reporter(reporter_fd), config={"llm": {}},
                       log_settings=(False, "INFO"))


def report_lines(sock) -> list[dict]:
    from workers import wire
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    return [wire.parse_report(line) for line in data.splitlines()]


@pytest.mark.timeout(30)
def test_the_relay_writes_a_task_contexts_stream_progress_and_spend_in_order(relay):
    import socket
    ours, theirs = socket.socketpair()
    fallbacks = relaycall.fallbacks
    with FakeOpenAI(Stream(text="alpha beta gamma delta", delay_s=0.3)) as srv:
        ctx = task_context(ours.fileno())
        ctx.stream("before the call; ")  # buffered by the handler: goes out first
        out = llm.chat_sync({"prompt": "hi", "base_url": srv.base_url, "model": "m1",
                             "request_timeout_s": 20, "stall_timeout_s": 10}, ctx)
        ctx.close_output()
        ours.close()
        lines = report_lines(theirs)
    theirs.close()
    assert out == {"text": "alpha beta gamma delta", "finish_reason": "stop", "model": "m1",
                   "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}}
    kinds = [m["kind"] for m in lines]
    assert kinds[0] == "stream" and lines[0]["text"] == "before the call; "
    progress = [m for m in lines if m["kind"] == "progress"]
    assert progress[0]["fraction"] == 0.0
    assert progress[0]["message"].startswith("asking m1 at 127.0.0.1:"), progress[0]
    assert any("tok/s" in (m["message"] or "") for m in progress[1:-1]), progress
    assert progress[-1]["fraction"] == 1.0 and progress[-1]["message"].startswith("done: 4 tokens")
    streamed = "".join(m["text"] for m in lines[1:] if m["kind"] == "stream")
    assert streamed == out["text"]
    assert kinds.count("stream") >= 3, "one stream line per upstream read, not one at the end"
    assert lines[-1] == {"kind": "spend", "tokens": 16}
    assert relaycall.fallbacks == fallbacks, "the call went direct"


@pytest.mark.timeout(30)
def test_a_fast_stream_goes_out_in_steps_of_stream_every_s_the_first_piece_at_once(relay):
    """A model streaming 500 tokens a second would cost the supervisor a report line per
    token: the relay sends the first piece at once, then what came in each STREAM_EVERY_S
    as one line, the last with the end; the text is whole and in order."""
    import socket

    from workers.relay import STREAM_EVERY_S
    words = [f"w{i} " for i in range(300)]
    ours, theirs = socket.socketpair()
    with FakeOpenAI(Stream(text="".join(words).strip(), delay_s=0.002)) as srv:
        ctx = task_context(ours.fileno())
        started = time.monotonic()
        out = llm.chat_sync({"prompt": "hi", "base_url": srv.base_url, "model": "m1",
                             "request_timeout_s": 20, "stall_timeout_s": 10}, ctx)
        took = time.monotonic() - started
        ctx.close_output()
        ours.close()
        lines = report_lines(theirs)
    theirs.close()
    streams = [m["text"] for m in lines if m["kind"] == "stream"]
    assert "".join(streams) == out["text"] == "".join(words).strip()
    assert len(streams[0].split()) <= 3, streams[0]  # not held for the first step
    assert 2 <= len(streams) <= took / STREAM_EVERY_S + 3, (len(streams), took)


@pytest.mark.timeout(30)
def test_what_the_relay_reads_raises_the_same_exceptions_in_the_task(relay):
    import socket

    from tests.support.openai_server import Malformed, Stall
    with FakeOpenAI() as srv:
        payload = {"prompt": "hi", "base_url": srv.base_url, "request_timeout_s": 20,
                   "stall_timeout_s": 0.5}
        srv.script(Malformed())
        with pytest.raises(llm.MalformedReply, match="not JSON"):
            llm.chat_sync(payload)
        srv.script(Stall(tokens=2, hold_s=5))
        ours, theirs = socket.socketpair()
        ctx = task_context(ours.fileno())
        with pytest.raises(llm.LlmStalled, match=r"after 2 token\(s\)") as stalled:
            llm.chat_sync(payload, ctx)
        assert stalled.value.outcome == "timeout" and stalled.value.retryable
        ours.close()
        lines = report_lines(theirs)
        theirs.close()
        # what came before the stall was streamed; a failed call spends nothing
        assert "".join(m["text"] for m in lines if m["kind"] == "stream")
        assert not [m for m in lines if m["kind"] == "spend"]


@pytest.mark.timeout(30)
def test_the_relays_exit_status_is_logged_when_the_loops_reap_took_it_first(caplog):
    """The loop's wait4(-1) (Children.reap) may take the relay's exit between two of
    its `tend`s: the status is handed over, not lost."""
    import selectors

    from supervisor.children import Children
    from supervisor.config import load
    from supervisor.loop import SystemClock
    handle = Relay()
    handle.start(wait=True)
    try:
        pid = handle.pid
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, timeout=10,
                   message="the relay did not die")
        with selectors.DefaultSelector() as sel:
            children = Children(sel, load(None, env={}), clock=SystemClock,
                                emit=lambda *a, **k: None)
            children.reap([handle], time.monotonic())  # the zombie taken here
        assert not psutil.pid_exists(pid) or psutil.Process(pid).ppid() != os.getpid()
        handle.events()  # the end of its control socket
        with caplog.at_level(logging.INFO, logger="taskvisor"):
            handle.tend(time.monotonic())
        assert f"model-call relay {pid} killed by SIGKILL" in caplog.text, caplog.text
        assert handle.restart_at is not None
    finally:
        handle.stop()


def test_the_relay_keeps_what_its_imports_made_out_of_the_cyclic_collector():
    """Once the serving side is loaded, the imports' objects are frozen and young
    collections wait for GC_THRESHOLDS[0] allocations: calls in flight keep their objects
    alive for seconds, and at the default threshold they were scanned again and again
    (13% of the relay's CPU at 1,000 calls in flight). Run here, then put back."""
    import gc

    from workers.relay import GC_THRESHOLDS, RelayServer
    before = gc.get_threshold()
    try:
        RelayServer()._load()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 10_000  # httpx and the rest of the serving side
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_relay_starts_without_the_http_stack_which_its_first_call_loads():
    """What a relay imports up to its first call (workers.relay, and workers.hosting for
    hosted attempts) leaves httpx out: loading it took ~0.25 s of CPU at every
    supervisor's start, beside the first tasks, model calls or not. Run in a fresh
    interpreter, as the relay starts (no relay named in its environment)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != RELAY_ENV}
    code = ("import sys, workers.relay, workers.hosting\n"
            "print(sorted(m for m in ('httpx', 'httpcore', 'anyio', 'workers.handlers.llm')"
            " if m in sys.modules))\n"
            "workers.relay.RelayServer()._load()\n"
            "print('httpx' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split("\n")
    assert out[0] == "[]", out
    assert out[1] == "True", out


@pytest.mark.timeout(90)
def test_the_relay_loads_its_http_stack_once_the_supervisor_is_idle_not_beside_its_tasks(tmp_path):
    """httpx and the rest of a call's stack (~0.3 s of CPU) load in the relay once the
    supervisor has had no attempt for a second (relay.WARM_IDLE_S), so that the first model
    call does not wait for them: not while tasks run (two `sleep 2` tasks queued before the
    start keep the pool busy from the first pass), and once a start."""
    with FakeOpenAI(Stream(text="warm")) as srv:
        sup = SupervisorProcess(tmp_path, llm_config(srv.base_url))
        try:
            ids = [sup.queue.enqueue("shell", {"cmd": "sleep 2", "shell": True}) for _ in range(2)]
            sup.start()
            assert [sup.wait(i).status for i in ids] == ["succeeded"] * 2
            warmed = "loaded its HTTP stack while the supervisor was idle"
            sup.wait_log(warmed, timeout=20)
            log = sup.log()
            assert log.index(warmed) > log.rindex("shell attempt 1 ended succeeded"), log[-3000:]
            task = sup.wait(sup.queue.enqueue("llm.chat", {"prompt": "hi"}))
            assert task.status == "succeeded" and task.result["text"] == "warm"
            assert task.history[0].ran_in == "relay"
            assert sup.log().count(warmed) == 1
        finally:
            sup.close()
