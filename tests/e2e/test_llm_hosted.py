"""`llm.chat` attempts hosted by the model-call relay ([llm] run_in_relay, the default;
workers.hosting): no task process, the same outcomes, and the promise kept under attack:
the relay killed mid-stream (the attempt is given back and runs again), a time limit and
a cancel (the upstream connection closes at once, the relay lives on), the supervisor
stopped past its lease (the relay ends the call at the fence, before another supervisor
runs it: never two at once), the supervisor killed (the call dies with it), and a
shutdown with calls in flight."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from supervisor.store import Store
from tests.support import wait_until
from tests.support.launcher import SupervisorProcess
from tests.support.openai_server import FakeOpenAI, Stream

from tests.e2e.test_llm_relay import llm_config, relay_pids, streaming_relays

LONG = " ".join(["word"] * 400)


def running(sup: SupervisorProcess, task_id: str):
    """The task once its call streams (its progress counts tokens)."""
    return wait_until(lambda: (t := sup.queue.get(task_id)).status == "running" and "tokens" in (
        t.progress_message or "") and t, timeout=20, message="the call never streamed")


def task_processes(sup: SupervisorProcess) -> list[psutil.Process]:
    """The supervisor's descendants other than its helpers (fork server, spares, relay)."""
    out = []
    for proc in psutil.Process(sup.pid).children(recursive=True):
        try:
            line = " ".join(proc.cmdline())
            if not any(h in line for h in ("workers.zygote", "workers.relay")) and \
                    proc.name() != "taskvisor-spare":
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.timeout(60)
def test_a_hosted_attempt_has_no_process_and_the_same_result_output_and_progress(tmp_path):
    with FakeOpenAI(Stream(text=" ".join(f"w{i}" for i in range(40)), delay_s=0.05)) as srv:
        with SupervisorProcess(tmp_path, llm_config(srv.base_url)) as sup:
            task_id = sup.queue.enqueue("llm.chat", {"prompt": "count", "max_tokens": 64})
            live = running(sup, task_id)
            assert live.pid is None  # no process of its own
            assert task_processes(sup) == []
            task = sup.wait(task_id)
            assert task.status == "succeeded", task.error
            assert task.result["text"].startswith("w0 w1") and task.result["usage"]["total_tokens"] == 52
            assert [a.outcome for a in task.history] == ["succeeded"]
            assert task.history[0].pid is None and task.history[0].ran_in == "relay"
            assert task.to_dict()["history"][0]["ran_in"] == "relay"  # the API's field
            store = Store(str(tmp_path / "taskvisor.db"))
            try:
                assert store.read_output(task_id).text == task.result["text"]
            finally:
                store.close()
    # with run_in_relay = false the same call runs in a task process
    (tmp_path / "forked").mkdir()
    with FakeOpenAI(Stream(text=LONG, delay_s=0.01)) as srv:
        with SupervisorProcess(tmp_path / "forked", llm_config(srv.base_url, "run_in_relay = false\n")) as sup:
            task_id = sup.queue.enqueue("llm.chat", {"prompt": "count"})
            assert running(sup, task_id).pid is not None
            task = sup.wait(task_id)
            assert task.status == "succeeded"
            assert task.history[0].pid is not None and task.history[0].ran_in == "process"


@pytest.mark.timeout(90)
def test_relay_killed_mid_stream_the_hosted_attempt_is_given_back_and_runs_again(tmp_path):
    with FakeOpenAI(Stream(text="after the restart")) as srv:
        srv.script(Stream(text=LONG, delay_s=0.05))
        with SupervisorProcess(tmp_path, llm_config(srv.base_url)) as sup:
            (first,) = wait_until(lambda: relay_pids(sup), timeout=10)
            task_id = sup.queue.enqueue("llm.chat", {"prompt": "a long answer"}, max_attempts=1)
            running(sup, task_id)
            os.kill(first, signal.SIGKILL)
            task = sup.wait(task_id, timeout=40)
            assert task.status == "succeeded", (task.error, sup.log()[-3000:])
            # (A second attempt claimed in the instant the relay's end was seen on its
            # report socket and not yet on its channel is given back too, unstarted.)
            outcomes = [a.outcome for a in task.history]
            assert outcomes[-1] == "succeeded" and set(outcomes[:-1]) == {"interrupted"}, (
                [(a.outcome, a.reason) for a in task.history], sup.log()[-3000:])
            assert len(outcomes) <= 3
            assert "model-call relay ended without an outcome" in task.history[0].reason
            assert task.attempts == 1, "a relay's death spends no attempt"
            assert task.result["text"] == "after the restart"
            (second,) = wait_until(lambda: relay_pids(sup), timeout=10)
            assert second != first


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["time limit", "cancel"])
def test_a_time_limit_or_a_cancel_ends_the_hosted_call_and_its_connection_at_once(tmp_path, how):
    with FakeOpenAI(Stream(text=LONG, delay_s=0.05)) as srv:
        with SupervisorProcess(tmp_path, llm_config(srv.base_url)) as sup:
            (relay_pid,) = wait_until(lambda: relay_pids(sup), timeout=10)
            options = {"timeout_s": 2} if how == "time limit" else {}
            task_id = sup.queue.enqueue("llm.chat", {"prompt": "long"}, max_attempts=1, **options)
            running(sup, task_id)
            asked = time.monotonic()
            if how == "cancel":
                sup.queue.cancel(task_id)
            gone = wait_until(lambda: srv.disconnects, timeout=10,
                              message="the model server still streams to a stopped attempt")
            task = sup.wait(task_id)
            if how == "cancel":
                assert task.status == "cancelled" and gone[0] - asked < 3.0
            else:
                assert task.status == "failed" and task.outcome == "timeout", task.error
                assert "time limit" in task.history[0].reason
            assert relay_pids(sup) == [relay_pid], "the relay outlives the attempt"
            assert len(srv.requests) == 1
            # the relay takes the next call as before
            srv.default = Stream(text="next")
            assert sup.wait(sup.queue.enqueue("llm.chat", {"prompt": "hi"})).result["text"] == "next"


def _shared_config(base_url: str, db: str, folder) -> str:
    folder.mkdir(exist_ok=True)
    toml = llm_config(base_url, '[types."llm.chat"]\nmax_attempts = 5\n', pool_size=1)
    assert 'database = "taskvisor.db"' in toml
    return toml.replace('database = "taskvisor.db"', f'database = "{db}"').replace(
        "lease_s = 10", "lease_s = 2")


@pytest.mark.timeout(120)
def test_a_stopped_supervisors_hosted_call_ends_at_the_fence_before_another_runs_it(tmp_path):
    """A is frozen (SIGSTOP) mid-call: its relay ends the call at the fence (before the
    lease expires); B rescues the task after the expiry and runs it. The model server
    never answers two requests of it at once; when A resumes it records nothing."""
    db = str(tmp_path / "shared.db")
    with FakeOpenAI(Stream(text="rescued", delay_s=0.01)) as srv:
        srv.script(Stream(text=LONG, delay_s=0.1))  # 40 s: far past the lease
        with SupervisorProcess(tmp_path / "a", _shared_config(srv.base_url, db, tmp_path / "a")) as a:
            task_id = a.queue.enqueue("llm.chat", {"prompt": "long"})
            running(a, task_id)
            a.signal(signal.SIGSTOP)
            try:
                stopped = time.monotonic()
                gone = wait_until(lambda: srv.disconnects, timeout=10,
                                  message="A's relay did not fence the call of a stopped supervisor")
                assert gone[0] - stopped < 4.0  # the fence is before the 2 s lease's expiry
                with SupervisorProcess(tmp_path / "b", _shared_config(srv.base_url, db, tmp_path / "b")) as b:
                    task = b.wait(task_id, timeout=30)
                    assert task.status == "succeeded" and task.result["text"] == "rescued"
                    a.signal(signal.SIGCONT)
                    first, second = task.history
                    assert first.outcome == "lost" and second.outcome == "succeeded"
                    assert srv.max_active == 1, "two requests of one task at once"
                    assert len(srv.requests) == 2
                    # A resumes and records nothing over B's outcome
                    wait_until(lambda: "fenced" in a.log() or "lease was lost" in a.log()
                               or "not recorded" in a.log(), timeout=15)
                    assert b.queue.get(task_id).status == "succeeded"
                    assert a.stop() == 0
            finally:
                a.signal(signal.SIGCONT)


@pytest.mark.timeout(60)
def test_hosted_calls_die_with_a_killed_supervisor_and_stop_with_a_stopped_one(tmp_path):
    with FakeOpenAI(Stream(text=LONG, delay_s=0.05)) as srv:
        with SupervisorProcess(tmp_path, llm_config(srv.base_url)) as sup:
            task_id = sup.queue.enqueue("llm.chat", {"prompt": "long"})
            running(sup, task_id)
            sup.kill9()
            wait_until(lambda: srv.disconnects, timeout=10,
                       message="a hosted call outlived its supervisor")
            srv.disconnects.clear()
            sup.start()
            # the restarted supervisor finds the lease of the dead one, and runs it again
            running(sup, task_id)
            assert sup.stop() == 0  # shutdown with a hosted call in flight: given back
            wait_until(lambda: srv.disconnects, timeout=5, message="the call went on after the shutdown")
            store = Store(str(tmp_path / "taskvisor.db"))
            try:
                task = store.get(task_id)
                assert task.status == "queued"
                assert task.history[-1].outcome == "interrupted", task.history
            finally:
                store.close()


@pytest.mark.timeout(120)
def test_hosted_calls_spread_over_another_relay_as_they_grow(tmp_path):
    """Past HOST_SPLIT calls on one relay another starts ([llm] relays = 2: no more),
    and the calls after take it: one asyncio loop is one core."""
    from supervisor.relay import HOST_SPLIT
    n = HOST_SPLIT * 2 + 50
    with FakeOpenAI(Stream(text=" ".join(["w"] * 40), delay_s=0.05)) as srv:
        toml = llm_config(srv.base_url, "relays = 2\n", pool_size=n)
        with SupervisorProcess(tmp_path, toml) as sup:
            ids = sup.queue.enqueue_many([{"type": "llm.chat", "payload": {"prompt": f"p{i}"}}
                                          for i in range(n)])

            def both_call():
                pids, busy = streaming_relays(sup, srv.port)
                return len(busy) == 2 and pids
            pids = wait_until(both_call, timeout=30, message="the calls stayed on one relay")
            assert len(pids) == 2
            tasks = [sup.wait(i, timeout=60) for i in ids]
            assert all(t.status == "succeeded" for t in tasks), [t.error for t in tasks if t.error][:3]
            assert all(t.pid is None for t in tasks)
            assert "started beside 1 other(s)" in sup.log()
            assert len(relay_pids(sup)) == 2, "no third relay past relays = 2"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.mark.timeout(90)
def test_a_hosted_call_over_tls_and_a_certificate_the_relay_does_not_trust(tmp_path, tls_files):
    cert, _key = tls_files
    with FakeOpenAI(Stream(text="over tls", delay_s=0.01), tls=tls_files) as srv:
        assert srv.base_url.startswith("https://")
        with SupervisorProcess(tmp_path, llm_config(srv.base_url),
                               env={"SSL_CERT_FILE": str(cert)}) as sup:
            ids = [sup.queue.enqueue("llm.chat", {"prompt": "hi"}) for _ in range(3)]
            tasks = [sup.wait(i) for i in ids]
            assert [t.status for t in tasks] == ["succeeded"] * 3, [t.error for t in tasks]
            assert {t.result["text"] for t in tasks} == {"over tls"}
            assert all(t.history[0].pid is None for t in tasks)  # hosted by the relay
        (tmp_path / "untrusted").mkdir()
        with SupervisorProcess(tmp_path / "untrusted", llm_config(srv.base_url)) as sup:
            task = sup.wait(sup.queue.enqueue("llm.chat", {"prompt": "hi"}, max_attempts=1))
            assert task.status == "failed", task.result
            assert "CERTIFICATE_VERIFY_FAILED" in task.error, task.error


def _read_report(fd: int, timeout: float = 10.0) -> bytes:
    """What the relay writes on a hosted attempt's report socket, until it closes it."""
    import select
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([fd], [], [], 0.2)
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            continue
        if not data:
            os.close(fd)
            return out
        out += data
    raise AssertionError(f"the relay never closed the report socket: {out[-300:]!r}")


@pytest.mark.timeout(60)
def test_the_relay_refuses_what_it_must_not_run_and_takes_a_spec_of_any_size():
    """Another type, a spawn past its claim's fence, a spec that is not JSON: refused,
    said on the channel before the report socket closes; a spec too big for a packet
    (a long conversation, sent in a memfd) runs."""
    from supervisor.relay import Relay
    relay = Relay()
    relay.start(wait=True)
    try:
        with FakeOpenAI(Stream(text="long one")) as srv:
            def spec(task_type="llm.chat", content="hi"):
                return {"task": {"id": "T", "type": task_type, "attempt": 1, "max_attempts": 1,
                                 "payload": {"base_url": srv.base_url,
                                             "messages": [{"role": "user", "content": content}]}},
                        "config": {"llm": {"request_timeout_s": 30, "stall_timeout_s": 10}}}
            now = time.monotonic()
            cases = [("T:1", spec("shell"), now + 30, "hosts llm.chat attempts only"),
                     ("T:2", spec(), now - 1, "fenced"),
                     ("T:3", b"{not json", now + 30, "bad spec")]
            for key, body, start_by, _ in cases:
                fd, _out = relay.spawn(key, body, start_by)
                assert _read_report(fd) == b""
            said: list = []
            wait_until(lambda: said.extend(relay.events()) or len(said) >= 3, timeout=5,
                       message="the relay did not say why it refused")
            assert [(e["op"], e["key"]) for e in said] == [("spawn_failed", k) for k, *_ in cases]
            for event, (_, _, _, why) in zip(said, cases):
                assert why in event["error"], event
            big = "x" * 200_000
            fd, _out = relay.spawn("T:4", spec(content=big), time.monotonic() + 30)
            lines = _read_report(fd).splitlines()
            assert lines[0].startswith(b'{"kind":"ready"') and b'"kind":"result"' in lines[-1]
            assert b"long one" in lines[-1]
            assert srv.requests[-1]["body"]["messages"][0]["content"] == big
    finally:
        relay.stop()


@pytest.mark.timeout(90)
def test_a_frozen_relay_cannot_hold_an_attempt_past_its_time_limit(tmp_path):
    """The relay is stopped (SIGSTOP) mid-call: it cannot act on the cancel, so once
    kill_grace_s has passed the supervisor kills it; the attempt ends as the time limit
    says, and the restarted relay serves the next call."""
    with FakeOpenAI(Stream(text=LONG, delay_s=0.05)) as srv:
        with SupervisorProcess(tmp_path, llm_config(srv.base_url)) as sup:
            (frozen,) = wait_until(lambda: relay_pids(sup), timeout=10)
            task_id = sup.queue.enqueue("llm.chat", {"prompt": "long"}, max_attempts=1,
                                        timeout_s=3)
            running(sup, task_id)
            os.kill(frozen, signal.SIGSTOP)
            task = sup.wait(task_id, timeout=30)
            assert task.status == "failed" and task.outcome == "timeout", task.error
            assert "did not end attempt" in sup.log() and "killing the relay" in sup.log()
            wait_until(lambda: not psutil.pid_exists(frozen)
                       or psutil.Process(frozen).status() == psutil.STATUS_ZOMBIE, timeout=10)
            (fresh,) = wait_until(lambda: relay_pids(sup), timeout=10)
            assert fresh != frozen
            srv.default = Stream(text="after")
            after = sup.wait(sup.queue.enqueue("llm.chat", {"prompt": "hi"}), timeout=30)
            assert after.status == "succeeded" and after.result["text"] == "after"


@pytest.mark.timeout(120)
def test_a_call_that_kills_its_relay_twice_runs_apart_in_a_task_process_of_its_own(tmp_path):
    """A payload that takes the relay down (here: the test kills whichever relay holds
    its connection) would take every call hosted there down with it, and hop to the next
    relay each time. After two such losses (no attempt spent) its next attempt runs in a
    task process that calls the model itself, though a third relay is up, and the relays
    are left alone."""
    from supervisor.children import ISOLATE_AFTER
    from supervisor.relay import HOST_SPLIT
    n = 2 * HOST_SPLIT + 10
    with FakeOpenAI(Stream(text=" ".join(["w"] * 20), delay_s=0.1)) as srv:
        toml = llm_config(srv.base_url, "relays = 3\n", pool_size=n)
        with SupervisorProcess(tmp_path, toml) as sup:
            # enough calls at once to start three relays; they stay up afterwards
            ids = sup.queue.enqueue_many([{"type": "llm.chat", "payload": {"prompt": f"p{i}"}}
                                          for i in range(n)])
            assert all(sup.wait(i, timeout=60).status == "succeeded" for i in ids)
            relays = wait_until(lambda: len(p := relay_pids(sup)) == 3 and p, timeout=10)
            srv.default = Stream(text=LONG, delay_s=0.02)
            poison = sup.queue.enqueue("llm.chat", {"prompt": "poison"}, max_attempts=1)
            killed, direct = [], []

            def holders() -> None:
                """Kill each relay that streams the call; note a task process that does."""
                for proc in psutil.Process(sup.pid).children(recursive=True):
                    try:
                        if any(c.raddr and c.raddr.port == srv.port
                               for c in proc.net_connections("tcp")):
                            if "workers.relay" in " ".join(proc.cmdline()):
                                proc.kill()
                                killed.append(proc.pid)
                            elif proc.pid not in direct:
                                direct.append(proc.pid)
                    except psutil.NoSuchProcess:
                        pass
            wait_until(lambda: holders() or sup.queue.get(poison).status in ("succeeded", "failed"),
                       timeout=60, interval=0.02, message="the call never ended")
            task = sup.wait(poison, timeout=30)
            assert task.status == "succeeded", (task.error, sup.log()[-3000:])
            assert len(killed) == ISOLATE_AFTER and len(set(killed)) == ISOLATE_AFTER, (killed, relays)
            started = [a for a in task.history if "before the attempt started" not in (a.reason or "")]
            assert [a.outcome for a in started] == ["interrupted"] * ISOLATE_AFTER + ["succeeded"], (
                [(a.outcome, a.reason) for a in task.history])
            assert "run in a task process of their own" in started[ISOLATE_AFTER - 1].reason
            assert started[-1].pid is not None and started[-1].pid in direct
            assert task.attempts == 1, "losses with the relay spend no attempt"
            assert task.result["text"] == LONG
            assert "ended 2 times while hosting its attempts" in sup.log()
            # the relays come back and host the calls after it
            wait_until(lambda: sup.log().count(" ready on ") >= 3 + ISOLATE_AFTER, timeout=20,
                       message="the killed relays did not start again")
            srv.default = Stream(text="fine")
            after = sup.queue.enqueue("llm.chat", {"prompt": "after"})
            done = sup.wait(after, timeout=30)
            assert done.status == "succeeded" and done.history[-1].pid is None


@pytest.mark.timeout(90)
def test_hosted_calls_reserve_no_memory_while_calls_in_task_processes_do(tmp_path):
    """A memory budget of 4 GiB and 2 GiB declared per task: two task processes at once,
    but a hosted call has no process for memory_mb to limit (it costs the relay ~0.07
    MiB), so its claim reserves nothing and six stream at once."""
    def config(base_url: str, extra: str = "") -> str:
        return (llm_config(base_url, extra, pool_size=6)
                .replace("[supervisor]\n", "[supervisor]\nmemory_budget_mb = 4096\n", 1)
                .replace("[defaults]\n", "[defaults]\nmemory_mb = 2048\n", 1))
    for folder, extra, at_once in (("hosted", "", 6), ("forked", "run_in_relay = false\n", 2)):
        (tmp_path / folder).mkdir()
        with FakeOpenAI(Stream(text=" ".join(["w"] * 30), delay_s=0.05)) as srv:
            with SupervisorProcess(tmp_path / folder, config(srv.base_url, extra)) as sup:
                ids = sup.queue.enqueue_many([{"type": "llm.chat", "payload": {"prompt": f"p{i}"}}
                                              for i in range(6)])
                tasks = [sup.wait(i, timeout=60) for i in ids]
                assert all(t.status == "succeeded" for t in tasks), [t.error for t in tasks]
                assert srv.max_active == at_once, (folder, srv.max_active)
