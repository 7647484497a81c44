"""The supervisor loop one pass at a time: a real SQLite file, a fake clock, a fake fork
server (real sockets and pipes stand in for the task processes, so a test writes their
report lines itself), and `Supervisor.step()` called by hand, the way huey's tests call
`Worker.loop(now)`. No process is forked.
"""

from __future__ import annotations

import collections
import json
import os
import selectors
import socket
import time

import pytest

from supervisor import policy
from supervisor.client import Queue
from supervisor.config import load
from supervisor.loop import Supervisor
from supervisor.store import NewTask, Store
from tests.support import FakeClock

NO_SUCH_PID = 4_194_304  # above the largest pid_max: signals to it find nobody


class FakeForkServer:
    """What the loop asks of a fork server, recorded; the test plays the task processes."""

    def __init__(self):
        self.pid = NO_SUCH_PID + 999
        self.sock, self._peer = socket.socketpair()
        self.outbox: collections.deque = collections.deque()
        self.exited = False
        self.broken = None
        self.hosts_attempts = False
        self.generation = 1
        self.types: list[str] = []
        self.calls: list[tuple] = []   # ("fence", t) and ("spawn", key), in order
        self.tasks: dict[str, dict] = {}  # key -> {"report": socket, "output": fd, "spec": dict}
        self.queued: list[dict] = []
        self.next_pid = NO_SUCH_PID + 1

    def fileno(self) -> int:
        return self.sock.fileno()

    def spawn(self, key: str, spec: bytes, start_by: float | None = None) -> tuple[int, int]:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.tasks[key] = {"report": theirs, "output": out_w, "spec": json.loads(spec),
                           "raw": spec, "start_by": start_by}
        self.calls.append(("spawn", key))
        return ours.detach(), out_r

    def fence(self, deadline_mono: float) -> None:
        self.calls.append(("fence", deadline_mono))

    def flush(self) -> None:
        pass

    def events(self) -> list[dict]:
        out, self.queued = self.queued, []
        return out

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass

    def kill(self) -> None:
        pass

    # -- playing the task processes ------------------------------------------------------

    def forked(self, key: str) -> int:
        pid = self.next_pid
        self.next_pid += 1
        self.tasks[key]["pid"] = pid
        return pid

    def report(self, key: str, *lines: bytes) -> None:
        for line in lines:
            self.tasks[key]["report"].sendall(line + b"\n")

    def exit(self, key: str, status: int = 0) -> dict:
        task = self.tasks[key]
        task["report"].close()
        os.close(task["output"])
        return {"op": "exited", "pid": task["pid"], "status": status, "utime": 0.01,
                "stime": 0.0, "maxrss_kb": 1024}


@pytest.fixture
def loop(tmp_path):
    (tmp_path / "t.toml").write_text(
        '[supervisor]\ndatabase = "t.db"\npool_size = 2\nlease_s = 8\n'
        '[defaults]\ntimeout_s = 5\nmax_attempts = 2\n')
    config = load(tmp_path / "t.toml")
    clock = FakeClock(start=time.time() + 1)  # the client's enqueue reads the real clock
    server = FakeForkServer()
    seen: list[tuple[str, dict]] = []
    sup = Supervisor(config, server, clock=clock, events=lambda n, f: seen.append((n, f)))
    sup.selector.register(server, selectors.EVENT_READ, ("server", server))
    sup.open_store()
    queue = Queue(config)
    yield sup, server, clock, queue, seen
    queue.close()
    sup.store.close()
    sup.wake.close()


def start_all(sup, server, clock) -> list[str]:
    """One pass claims and spawns; the fake fork server answers "spawned" for each."""
    assert sup.step()
    keys = [k for op, k in server.calls if op == "spawn"]
    for key in keys:
        if "pid" not in server.tasks[key]:
            server.queued.append({"op": "spawned", "key": key, "pid": server.forked(key)})
    sup.dispatch("server", server, selectors.EVENT_READ, clock.monotonic())
    return keys


def test_a_pass_claims_up_to_the_pool_fences_first_then_records_results(loop):
    sup, server, clock, queue, seen = loop
    ids = [queue.enqueue("t", {"n": i}) for i in range(3)]
    keys = start_all(sup, server, clock)
    assert len(keys) == 2 and len(sup.children) == 2
    # The fence reaches the leases just written, minus the margin, and goes out first.
    assert server.calls[0][0] == "fence"
    assert server.calls[0][1] == pytest.approx(clock.monotonic() + 8 - policy.fence_margin_s(8))
    # Each spawn must start before its claim's fence, whatever later renewals say.
    assert server.tasks[keys[0]]["start_by"] == server.calls[0][1]
    spec = server.tasks[keys[0]]["spec"]
    assert spec["task"]["payload"] == {"n": 0} and spec["task"]["attempt"] == 1
    for key in keys:
        server.report(key, b'{"kind":"ready","pid":1}', b'{"kind":"result","result":"42"}')
    sup.wait(0.5)
    for key in keys:
        sup.children.on_server_event(server, server.exit(key), clock.monotonic())
    clock.advance(0.01)
    assert sup.step()  # records both and claims the third in the same transaction
    done = [queue.get(i) for i in ids[:2]]
    assert [t.status for t in done] == ["succeeded", "succeeded"] and done[0].result == 42
    assert queue.get(ids[2]).status == "running"
    assert [n for n, _ in seen].count("recorded") == 2


def test_a_reported_outcome_frees_its_slot_and_is_written_at_the_exit(loop):
    """The next task starts while a process that reported its outcome exits; the outcome
    is written once the process is reaped, with its exit status and CPU time."""
    sup, server, clock, queue, seen = loop
    ids = [queue.enqueue("t", {"n": i}) for i in range(3)]
    keys = start_all(sup, server, clock)
    server.report(keys[0], b'{"kind":"ready","pid":1}', b'{"kind":"result","result":"7"}')
    sup.wait(0.5)
    assert sup.children.busy() == 1 and len(sup.children) == 2
    assert sup.can_claim(clock.monotonic())
    assert sup.step()
    assert [t.status for t in map(queue.get, ids)] == ["running"] * 3  # the third claimed
    assert len(sup.children) == 3 and sup.children.busy() == 2
    assert sup.status_line() == "2/2 slots busy"
    sup.children.on_server_event(server, server.exit(keys[0]), clock.monotonic())
    assert sup.step()
    done = queue.get(ids[0])
    assert done.status == "succeeded" and done.result == 7
    assert done.history[-1].exit_code == 0 and done.history[-1].cpu_s == 0.01
    assert len(sup.children) == 2 and sup.children.released == 0


def test_after_its_outcome_a_task_is_read_at_its_exit_not_woken_for(loop):
    """Once the outcome is in, its channels leave the selector (their ends of file would
    each wake a pass for nothing): what the process writes after it (the flush of its
    stdout, or a second outcome) is read when it is reaped."""
    sup, server, clock, queue, seen = loop
    task_id, liar_id = queue.enqueue("t"), queue.enqueue("t", max_attempts=1)
    key, liar = start_all(sup, server, clock)
    os.write(server.tasks[key]["output"], b"before\n")
    for k in (key, liar):
        server.report(k, b'{"kind":"ready","pid":1}', b'{"kind":"result","result":"1"}')
    sup.wait(0.5)
    child = sup.children.table[key]
    watched = {k.fileobj for k in sup.selector.get_map().values()}
    assert child.report_fd not in watched and child.output_fd not in watched
    os.write(server.tasks[key]["output"], b"after\n")
    server.report(liar, b'{"kind":"result","result":"2"}')
    for k in (key, liar):
        sup.children.on_server_event(server, server.exit(k), clock.monotonic())
    assert sup.step()
    task = queue.get(task_id)
    assert task.status == "succeeded" and task.history[-1].exit_code == 0
    log = b"".join(c.data for c in sup.store.read_log(task_id, 1))
    assert log == b"before\nafter\n"
    lied = queue.get(liar_id)
    assert lied.status == "failed" and "a second outcome" in lied.history[-1].reason


def test_processes_that_reported_free_at_most_the_pool_and_are_killed_if_they_stay(loop, monkeypatch,
                                                                                  caplog):
    """A task can report an outcome and not exit: at most pool_size such processes count
    as free (so no more than twice the pool run), and each is killed EXIT_AFTER_FINAL_S
    after its report, its outcome standing."""
    from supervisor import children as children_mod
    killed = []
    monkeypatch.setattr(children_mod.proctree, "kill_tree", killed.append)
    sup, server, clock, queue, seen = loop
    ids = [queue.enqueue("t", {"n": i}, timeout_s=60) for i in range(6)]
    first = start_all(sup, server, clock)
    for key in first:
        server.report(key, b'{"kind":"ready","pid":1}', b'{"kind":"result","result":"1"}')
    sup.wait(0.5)
    clock.advance(1.0)
    second = [k for k in start_all(sup, server, clock) if k not in first]
    assert len(second) == 2 and sup.children.busy() == 2
    for key in second:
        server.report(key, b'{"kind":"ready","pid":1}', b'{"kind":"result","result":"2"}')
    sup.wait(0.5)
    assert sup.step()
    assert len(sup.children) == 4 and sup.children.busy() == 2  # two count as free, not four
    assert not sup.can_claim(clock.monotonic())
    assert [queue.get(i).status for i in ids].count("queued") == 2
    clock.advance(children_mod.EXIT_AFTER_FINAL_S - 1.1)
    assert sup.step() and not killed
    clock.advance(0.2)
    assert sup.step()
    assert sorted(killed) == sorted(server.tasks[k]["pid"] for k in first)
    clock.advance(1.05)  # the first two not reaped yet: KILL again, and no second warning
    assert sup.step()
    pids = [server.tasks[k]["pid"] for k in first] * 2 + [server.tasks[k]["pid"] for k in second]
    assert sorted(killed) == sorted(pids)
    assert caplog.text.count("reported its outcome 5s ago and has not exited") == 4
    for key in first:
        sup.children.on_server_event(server, server.exit(key, status=9), clock.monotonic())
    assert sup.step()
    for task_id in ids[:2]:
        task = queue.get(task_id)
        assert task.status == "succeeded" and task.result == 1
        assert task.history[-1].signal == "SIGKILL"
    assert [queue.get(i).status for i in ids].count("running") == 4  # the last two claimed


def test_the_payload_goes_to_the_task_as_stored_text_never_decoded(loop, tmp_path):
    """The payload is opaque to the supervisor: the stored JSON text reaches the task
    process byte for byte (spacing, escapes and number spellings that a decode and
    re-encode would change), and the claimed task's payload is never decoded."""
    sup, server, clock, queue, seen = loop
    text = '{"b":  1.50, "a": "caf\\u00e9", "n": [1e2]}'
    store = Store(tmp_path / "t.db")
    try:
        store.enqueue(NewTask(type="t", payload=text), now=time.time())
    finally:
        store.close()
    (key,) = start_all(sup, server, clock)
    assert b',"payload":' + text.encode() + b"}" in server.tasks[key]["raw"]
    assert server.tasks[key]["spec"]["task"]["payload"] == {"b": 1.5, "a": "caf\u00e9",
                                                            "n": [100.0]}
    (child,) = sup.children.values()
    assert "payload" not in vars(child.task), "the supervisor decoded the payload"


def test_a_time_limit_is_enforced_from_the_timer_heap(loop):
    sup, server, clock, queue, seen = loop
    task_id = queue.enqueue("t", max_attempts=1)
    (key,) = start_all(sup, server, clock)
    server.report(key, b'{"kind":"ready","pid":1}')
    sup.wait(0.2)
    assert sup.next_deadline(clock.monotonic()) <= clock.monotonic() + 5
    clock.advance(5.01)
    assert sup.step()
    (child,) = sup.children.values()
    assert child.stop[0] == "timeout"
    sup.children.on_server_event(server, server.exit(key, status=15), clock.monotonic())
    assert sup.step()
    task = queue.get(task_id)
    assert task.status == "failed" and task.history[-1].outcome == "timeout"


def test_a_lie_on_the_report_channel_ends_that_attempt_only(loop):
    sup, server, clock, queue, seen = loop
    liar, honest = queue.enqueue("t", max_attempts=1), queue.enqueue("t")
    keys = start_all(sup, server, clock)
    server.report(keys[0], b'{"kind": "error", "outcome": "nope"}')
    server.report(keys[1], b'{"kind":"ready","pid":1}', b'{"kind":"result","result":"1"}')
    sup.wait(0.2)
    sup.wait(0.2)
    for key in keys:
        sup.children.on_server_event(server, server.exit(key, status=9), clock.monotonic())
    assert sup.step()
    lied = queue.get(liar)
    assert lied.status == "failed"
    assert "broke the report protocol" in lied.history[-1].reason
    assert "not one of" in lied.history[-1].reason
    assert queue.get(honest).status == "succeeded"


def test_a_step_that_raises_is_counted_and_the_loop_goes_on(loop, monkeypatch):
    sup, server, clock, queue, seen = loop

    def broken(*args):
        raise RuntimeError("a bug in a step")
    monkeypatch.setattr(sup.children, "reap", broken)
    queue.enqueue("t")
    assert sup.step() is True
    failures = [f for n, f in seen if n == "step_failed"]
    assert failures and failures[0]["step"] == "broken"
    assert len(sup.children) == 1  # the other steps of the pass still ran: it claimed
    # and the loop does not spin on a failing step
    assert sup.next_deadline(clock.monotonic()) >= clock.monotonic() + 0.09


def test_claims_past_the_fence_are_given_back_not_started(loop, monkeypatch):
    """The pass is paused between the claim's commit and the spawn for longer than the
    lease: the attempts are recorded interrupted (no attempt spent), never started."""
    sup, server, clock, queue, seen = loop
    task_id = queue.enqueue("t")
    claim = sup.claim

    def claim_then_pause(now, free):
        claimed = claim(now, free)
        clock.advance(8)  # the process was stopped right after this transaction
        return claimed
    monkeypatch.setattr(sup, "claim", claim_then_pause)
    assert sup.step()
    assert not [c for c in server.calls if c[0] == "spawn"]
    monkeypatch.setattr(sup, "claim", claim)
    assert sup.step()
    task = queue.get(task_id)
    (given_back,) = [a for a in task.history if a.outcome]
    assert given_back.outcome == "interrupted" and "paused" in given_back.reason
    # the attempt was not spent: the next claim (this pass) is attempt 1 again
    assert task.status == "running" and task.attempts == 1
    assert [c for c in server.calls if c[0] == "spawn"]


def test_the_output_pipe_keeps_the_tail(loop):
    sup, server, clock, queue, seen = loop
    queue.enqueue("t")
    (key,) = start_all(sup, server, clock)
    sup.children.output.max_log_bytes = 1000
    out = server.tasks[key]["output"]
    for i in range(50):
        os.write(out, b"line %04d " % i + b"x" * 90 + b"\n")
        sup.wait(0.05)
    log = sup.children.output._attempts[key]  # the attempt's log, not yet stored
    assert log.log_written == 50 * 101
    assert bytes(log.log_pending).endswith(b"line 0049 " + b"x" * 90 + b"\n")
    assert len(log.log_pending) <= 2000


def test_an_idle_loop_wakes_for_the_next_delayed_task_not_the_next_poll(loop):
    """With poll_interval_s = 30, a task delayed by 3 s starts 3 s later, not 30."""
    sup, server, clock, queue, seen = loop
    sup.config = sup.children.config = sup.config.__class__(
        **{**sup.config.__dict__, "supervisor": sup.config.supervisor.__class__(
            **{**sup.config.supervisor.__dict__, "poll_interval_s": 30.0})})
    assert sup.step()  # idle: nothing to claim
    task_id = queue.enqueue("t", delay=3)
    sup.claim_needed = True  # what the wake-up datagram of the enqueue does
    assert sup.step()
    task = queue.get(task_id)
    assert task.status == "queued"
    wait_s = task.run_after - clock.now()
    assert 1 < wait_s < 3.5
    assert sup.next_deadline(clock.monotonic()) == pytest.approx(clock.monotonic() + wait_s, abs=0.01)
    clock.advance(wait_s + 0.01)
    assert sup.step()
    assert queue.get(task_id).status == "running"


class FakeRelay(FakeForkServer):
    """A model-call relay as the loop sees it: it hosts attempts (no process, no output
    pipe); the test plays what it reports, and its end (the report socket closed)."""

    def __init__(self):
        super().__init__()
        self.pid = NO_SUCH_PID + 998
        self.hosts_attempts = True
        self.hosting = 0
        self.restart_at = None
        self.types = ["llm.chat"]

    def spawn(self, key: str, spec: bytes, start_by: float | None = None) -> tuple[int, int]:
        report, output = super().spawn(key, spec, start_by)
        os.close(output)
        os.close(self.tasks[key]["output"])
        return report, -1

    def tend(self, mono: float) -> None:
        pass


class FakeRelays:
    def __init__(self, relay: FakeRelay):
        self.all = [relay]

    def pick(self) -> FakeRelay:
        return self.all[0]

    def warm_when_idle(self, idle_since: float, mono: float) -> None:
        pass  # tests/unit/test_relay_warm.py


def test_a_task_whose_relay_died_twice_runs_in_a_task_process_under_any_supervisor(loop):
    """Two hosted attempts lost with their relay are given back unspent and counted on
    the task's row; a new supervisor on the file (a restart, or another one) runs the
    next attempt in a task process without the relay, though its relay is up."""
    from workers.relaycall import RELAY_ENV
    sup, server, clock, queue, seen = loop
    relay = FakeRelay()
    sup.relays = FakeRelays(relay)
    sup.selector.register(relay, selectors.EVENT_READ, ("server", relay))
    task_id = queue.enqueue("llm.chat", {"prompt": "p"}, max_attempts=1)
    for n in (1, 2):
        clock.advance(1.0)  # past the poll interval: the given-back attempt is claimed
        spawns = [c for c in relay.calls if c[0] == "spawn"]
        assert sup.step()
        now_spawned = [c for c in relay.calls if c[0] == "spawn"]
        assert len(now_spawned) == len(spawns) + 1, relay.calls
        key = now_spawned[-1][1]
        assert "unset_env" not in relay.tasks[key]["spec"]
        relay.report(key, b'{"kind":"ready","pid":%d}' % relay.pid)
        sup.wait(0.2)
        relay.tasks[key]["report"].close()  # the relay died with the call in it
        sup.wait(0.2)
        clock.advance(0.01)
        assert sup.step()
        task = queue.get(task_id)
        assert (task.status, task.attempts) == ("queued", 0)
        assert task.history[-1].outcome == "interrupted"
        assert ("run in a task process of their own" in task.history[-1].reason) == (n == 2)
    assert server.calls == [c for c in server.calls if c[0] == "fence"], "nothing forked yet"
    # Another supervisor (fresh memory) on the same file, with a relay of its own that is up.
    server2, relay2 = FakeForkServer(), FakeRelay()
    sup2 = Supervisor(sup.config, server2, clock=clock, events=lambda n, f: None)
    sup2.relays = FakeRelays(relay2)
    for channel in (server2, relay2):
        sup2.selector.register(channel, selectors.EVENT_READ, ("server", channel))
    sup2.open_store()
    try:
        clock.advance(1.0)
        assert sup2.step()
        (key,) = [k for op, k in server2.calls if op == "spawn"]
        assert [k for op, k in relay2.calls if op == "spawn"] == []
        assert server2.tasks[key]["spec"]["unset_env"] == [RELAY_ENV]
    finally:
        sup2.store.close()
        sup2.wake.close()


class WarmRecorder(FakeRelays):
    def __init__(self):
        super().__init__(FakeRelay())
        self.asked: list[tuple[float, float]] = []

    def warm_when_idle(self, idle_since: float, mono: float) -> None:
        self.asked.append((idle_since, mono))


def test_the_relays_are_asked_to_warm_only_while_no_attempt_runs_and_since_the_last_ended(loop):
    """Relays.warm_when_idle is not on the busy loop's path: a pass asks it only while the
    table is empty, with the time the table last emptied (Children.emptied_at)."""
    sup, server, clock, queue, seen = loop
    sup.relays = relays = WarmRecorder()
    started = clock.monotonic()
    assert sup.step()
    assert relays.asked == [(started, started)]  # empty since the supervisor began
    queue.enqueue("t", {})
    clock.advance(3)
    (key,) = start_all(sup, server, clock)
    relays.asked.clear()
    clock.advance(1)
    assert sup.step()
    assert relays.asked == []  # an attempt runs
    server.report(key, b'{"kind":"ready","pid":1}', b'{"kind":"result","result":"1"}')
    sup.wait(0.5)
    ended = clock.advance(1)
    sup.children.on_server_event(server, server.exit(key), ended)
    assert sup.step()
    assert relays.asked and relays.asked[-1][0] == ended
