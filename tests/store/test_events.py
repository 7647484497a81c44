"""The live tables on a real file: the event log written by triggers only while it is on,
in commit order, from any connection; pruning that never lets ids restart; output and
logs fenced by the lease and bounded."""

from __future__ import annotations

import json

import pytest

from supervisor import policy
from supervisor.output import OUTPUT_FLUSH_S, LiveOutput
from supervisor.store import Lease, Status, Store
from supervisor.store import events
from tests.store.factory import LEASE_S, T0, error, new, ok

BACKOFF = policy.Backoff(1.0, 10.0)


def task_events(store: Store, after: int = 0) -> list[tuple[int, str, dict]]:
    return [(e.id, e.kind, json.loads(e.data)) for e in events.read(store.conn, after)]


def test_nothing_is_logged_until_someone_subscribes(store):
    store.enqueue(new(), T0)
    assert task_events(store) == []
    state = events.subscribe(store.conn, T0)
    assert state.enabled and state.since_id == 0
    tid = store.enqueue(new("a"), T0 + 1)
    (eid, kind, data), = task_events(store)
    assert kind == "task" and data["id"] == tid and data["status"] == "queued"
    assert data["type"] == "a" and data["attempt"] == 0


def test_every_change_of_a_task_is_one_event_in_commit_order(store, db_path):
    events.subscribe(store.conn, T0)
    tid = store.enqueue(new(), T0)
    with store.transaction(all_or_nothing=True):
        task = store.claim("me", T0 + 1, lease_s=LEASE_S)
    store.set_progress([(task.lease, 0.5, "half")])
    store.set_pid(task.lease, 123, T0)              # not a change anyone watches
    store.extend("me", T0 + 2, LEASE_S)             # neither is a lease extension
    assert store.fail(task.lease, error(), T0 + 3, BACKOFF) is Status.QUEUED
    task2 = store.claim("me", T0 + 10, lease_s=LEASE_S)
    assert store.complete(task2.lease, ok({"x": 1}), T0 + 11)
    got = task_events(store)
    ids = [e[0] for e in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    seen = [(d["status"], d["attempt"], d["progress"], d["outcome"]) for _, _, d in got]
    assert seen == [("queued", 0, None, None), ("running", 1, None, None),
                    ("running", 1, 0.5, None), ("queued", 1, 0.5, "error"),
                    ("running", 2, None, "error"), ("succeeded", 2, 1.0, "succeeded")]
    assert all(d["id"] == tid for _, _, d in got)
    # Another process's connection (a client) writes events into the same log.
    other = Store(db_path)
    try:
        other.cancel(other.enqueue(new("b"), T0 + 20), T0 + 21)
    finally:
        other.close()
    tail = task_events(store, ids[-1])
    assert [(d["type"], d["status"]) for _, _, d in tail] == [("b", "queued"), ("b", "cancelled")]


def test_prune_keeps_the_newest_event_so_ids_never_restart(store):
    events.subscribe(store.conn, T0)
    for i in range(5):
        store.enqueue(new(), T0 + i)
    newest = events.newest_id(store.conn)
    assert events.prune(store.conn, newest + 100) == 4
    assert [e.id for e in events.read(store.conn, 0)] == [newest]
    store.enqueue(new(), T0 + 9)
    assert events.newest_id(store.conn) == newest + 1


def test_switching_off_needs_retention_without_subscribers(store):
    events.subscribe(store.conn, T0)
    assert not events.disable_if_idle(store.conn, T0 + 599, 600)
    events.subscribe(store.conn, T0 + 500)          # another supervisor's refresh
    assert not events.disable_if_idle(store.conn, T0 + 1000, 600)
    assert events.disable_if_idle(store.conn, T0 + 1101, 600)
    store.enqueue(new(), T0 + 1102)
    assert task_events(store) == []
    # Switched on again: events after the newest id are complete from there.
    store.conn.db.execute("INSERT INTO tasks (id, type, payload, status, created_at, run_after) "
                          "VALUES ('x', 't', '{}', 'queued', 0, 0)")  # not logged: off
    state = events.subscribe(store.conn, T0 + 1200)
    assert state.since_id == events.newest_id(store.conn)


def test_a_client_that_saw_the_newest_event_before_the_log_went_off_is_told_of_the_gap(
        store, db_path):
    """Its id was the newest when the log was switched on again: with since_id at that id
    it resumed with no gap event and never heard of the changes made while it was off."""
    from supervisor.broadcast import Broadcast, Filter
    fan = Broadcast(lambda: Store(db_path, migrate=False, create=False), str(db_path), 600,
                    clock=lambda: T0)
    try:
        assert fan.subscribe(None, Filter()).gap is None
        store.enqueue(new(), T0)
        seen = events.newest_id(store.conn)            # the client's Last-Event-ID
        assert events.disable_if_idle(store.conn, T0 + 1000, 600)
        missed = store.enqueue(new(), T0 + 1001)       # not logged: the log is off
        fan.clock = lambda: T0 + 1002
        sub = fan.subscribe(seen, Filter())
        assert sub.gap is not None and sub.gap["after"] == seen, sub
        assert missed not in {json.loads(e.data)["id"] for e in events.read(store.conn, 0)}
        # The row that marks the switch is never read (never sent to a client).
        assert [e.kind for e in events.read(store.conn, 0)] == ["task"]
        after = fan.subscribe(sub.gap["resumed_at"], Filter())   # complete from there
        assert after.gap is None
    finally:
        fan.stop()


def claimed(store: Store, now: float = T0) -> Lease:
    store.enqueue(new(), now)
    return store.claim("me", now, lease_s=LEASE_S).lease


def test_output_is_fenced_by_the_lease_and_one_attempt_is_kept(store):
    events.subscribe(store.conn, T0)
    lease = claimed(store)
    assert events.append_output(store.conn, lease, 0, 0, "hello ")
    assert events.append_output(store.conn, lease, 1, 6, "world")
    stale = Lease(lease.id, lease.attempt, "someone else")
    assert not events.append_output(store.conn, stale, 2, 11, "!")
    out = events.read_output(store.conn, lease.id)
    assert (out.attempt, out.text, out.truncated) == (1, "hello world", False)
    outputs = [d for _, k, d in task_events(store) if k == "output"]
    assert [(d["pos"], d["text"]) for d in outputs] == [(0, "hello "), (6, "world")]
    # A second attempt that streams replaces the first one's output.
    store.fail(lease, error(), T0 + 1, policy.Backoff(0, 0))
    lease2 = store.claim("me", T0 + 2, lease_s=LEASE_S).lease
    assert events.append_output(store.conn, lease2, 0, 0, "again")
    assert events.read_output(store.conn, lease.id).text == "again"
    assert events.read_output(store.conn, lease.id, attempt=1).text == ""


def test_log_keeps_its_tail(store):
    lease = claimed(store)
    events.append_log(store.conn, lease, 0, 0, b"a" * 100)
    events.append_log(store.conn, lease, 1, 100, b"b" * 100, keep_from_pos=150)
    events.append_log(store.conn, lease, 2, 200, b"c" * 100, keep_from_pos=250)
    chunks = events.read_log(store.conn, lease.id, lease.attempt)
    assert [c.seq for c in chunks] == [2]
    assert events.log_attempts(store.conn, lease.id) == [1]
    assert events.read_log(store.conn, lease.id, lease.attempt, after_seq=2) == []


def test_live_output_cuts_at_max_output_bytes_and_keeps_the_log_tail(store):
    live = LiveOutput(max_output_bytes=10, max_log_bytes=1000)
    lease = claimed(store)
    key = f"{lease.id}:{lease.attempt}"
    live.on_stream(key, lease, "héllo ", 0.0)       # 7 bytes
    live.on_stream(key, lease, "wörld!", 0.0)       # would make 14
    live.on_stream(key, lease, 42, 0.0)             # not text: ignored
    for _ in range(100_000):                         # 100 MB printed
        live.on_log(key, lease, b"x" * 999 + b"\n", 0.0)
    assert live.due(OUTPUT_FLUSH_S) and not live.due(0.0)
    with store.transaction(all_or_nothing=True):
        live.flush(store, 1.5)
    live.committed()
    out = events.read_output(store.conn, lease.id)
    assert out.text == "héllo wö" and out.truncated
    live.on_stream(key, lease, "more", 2.0)         # after the cut: dropped
    live.end(key)
    with store.transaction(all_or_nothing=True):
        live.flush(store, 2.0)
    live.committed()
    assert events.read_output(store.conn, lease.id).text == "héllo wö"
    chunks = events.read_log(store.conn, lease.id, lease.attempt)
    data = b"".join(c.data for c in chunks)
    assert len(data) == 1000 and chunks[0].pos == 100_000_000 - 1000
    assert live.next_due() is None                   # the ended attempt is forgotten


def test_live_output_rolled_back_is_written_again(store):
    live = LiveOutput(max_output_bytes=1000, max_log_bytes=1000)
    lease = claimed(store)
    key = f"{lease.id}:{lease.attempt}"
    live.on_stream(key, lease, "abc", 0.0)
    with pytest.raises(RuntimeError):
        with store.transaction(all_or_nothing=True):
            live.flush(store, 1.0)
            raise RuntimeError("the pass failed after the flush")
    assert events.read_output(store.conn, lease.id).text == ""
    with store.transaction(all_or_nothing=True):
        live.flush(store, 1.1)
    live.committed()
    assert events.read_output(store.conn, lease.id).text == "abc"


def test_events_carry_the_workflow_of_their_task(store):
    events.subscribe(store.conn, T0)
    root = store.enqueue(new("a"), T0)
    joined = store.enqueue(new("b", workflow_id=root), T0 + 1)
    other = store.enqueue(new("c"), T0 + 2)
    got = {e.task_id: e.workflow for e in events.read(store.conn, 0)}
    assert got == {root: root, joined: root, other: other}


def test_live_output_knows_when_it_is_due_without_a_look_at_every_attempt(store):
    """next_due, asked in every pass, costs per event, not per attempt streaming: with
    1,000 attempts waiting it looks at the earliest only; flushed and ended attempts move
    the answer as they should."""
    live = LiveOutput(max_output_bytes=1 << 20, max_log_bytes=1000)
    leases = [claimed(store) for _ in range(3)]
    keys = [f"{lease.id}:{lease.attempt}" for lease in leases]
    live.on_stream(keys[0], leases[0], "a", 5.0)
    live.on_log(keys[1], leases[1], b"log\n", 1.5)  # a log waits LOG_FLUSH_S (1 s)
    live.on_stream(keys[2], leases[2], "c", 2.0)
    assert live.next_due() == 2.0 + OUTPUT_FLUSH_S  # output waits less than a log
    with store.transaction(all_or_nothing=True):
        live.flush(store, 2.0 + OUTPUT_FLUSH_S)
    live.committed()
    assert live.next_due() == 2.5                    # keys[2] flushed; the log next
    with store.transaction(all_or_nothing=True):
        live.flush(store, 2.5)
    live.committed()
    assert live.next_due() == 5.0 + OUTPUT_FLUSH_S  # then keys[0]
    live.on_stream(keys[2], leases[2], "again", 6.0)  # waits anew, after keys[0]
    assert live.next_due() == 5.0 + OUTPUT_FLUSH_S
    live.end(keys[1])
    assert live.next_due() == 0.0                    # an ended attempt: at once
    with store.transaction(all_or_nothing=True):
        live.flush(store, 5.0)
    live.committed()
    assert live.next_due() == 5.0 + OUTPUT_FLUSH_S  # forgotten once flushed

    # (chunks_per_s: no longer waits with more attempts streaming, tested apart)
    many = LiveOutput(max_output_bytes=1 << 20, max_log_bytes=1000, chunks_per_s=float("inf"))
    many._attempts = Counting()
    for i in range(1000):
        many.on_stream(f"t{i}:1", leases[0], "x", 10.0 + i / 1000)
    Counting.gets = 0
    for _ in range(100):
        assert many.next_due() == 10.0 + OUTPUT_FLUSH_S
    assert Counting.gets == 100, "one look per call, at the earliest attempt"


def test_with_many_attempts_streaming_output_waits_longer_and_is_stored_in_fewer_chunks(store):
    """Output is stored OUTPUT_FLUSH_S after its first piece while few attempts write;
    with more, each waits so that about OUTPUT_CHUNKS_PER_S chunks are stored a second in
    all (up to OUTPUT_MAX_WAIT_S): what came meanwhile is one chunk, in order, and the
    text is whole. An attempt that ends is stored at once, however many write."""
    from supervisor.output import OUTPUT_CHUNKS_PER_S, OUTPUT_MAX_WAIT_S
    lease = claimed(store)
    live = LiveOutput(max_output_bytes=1 << 20, max_log_bytes=1000)
    live.on_stream("few:1", lease, "a", 1.0)
    assert live.next_due() == 1.0 + OUTPUT_FLUSH_S

    class Recording:
        def __init__(self):
            self.outputs = []

        def append_output(self, lease, seq, pos, text, truncated):
            self.outputs.append((seq, pos, text))
            return True

    busy = LiveOutput(max_output_bytes=1 << 20, max_log_bytes=1000)
    streaming = OUTPUT_CHUNKS_PER_S // 2  # half a second's worth of chunks
    for i in range(streaming):
        busy.on_stream(f"t{i}:1", lease, "x", 2.0)
    busy.on_stream("late:1", lease, "one ", 2.0)
    wait = busy.output_wait()
    assert wait > OUTPUT_FLUSH_S and abs(wait - (streaming + 1) / OUTPUT_CHUNKS_PER_S) < 1e-9
    for j, piece in enumerate(("two ", "three")):  # pieces 0.2 s apart: one chunk
        busy.on_stream("late:1", lease, piece, 2.0 + 0.2 * (j + 1))
    rec = Recording()
    busy.flush(rec, 2.0 + OUTPUT_FLUSH_S)
    busy.committed()
    assert all(text == "x" for _seq, _pos, text in rec.outputs), "the late one waits"
    assert len(rec.outputs) < streaming  # those that came first, with fewer writing
    busy.flush(rec, 2.0 + wait)
    busy.committed()
    assert ((0, 0, "one two three") in rec.outputs) and len(rec.outputs) == streaming + 1
    crowd = LiveOutput(max_output_bytes=1 << 20, max_log_bytes=1000)
    for i in range(OUTPUT_CHUNKS_PER_S * 5):
        crowd.on_stream(f"t{i}:1", lease, "x", 3.0)
    assert crowd.output_wait() == OUTPUT_MAX_WAIT_S
    crowd.on_stream("done:1", lease, "tail", 3.0)
    crowd.end("done:1")
    assert crowd.next_due() == 0.0  # an ended attempt: at once


class Counting(dict):
    """LiveOutput's table of attempts that counts lookups and refuses a walk of all."""
    gets = 0

    def get(self, key, default=None):
        Counting.gets += 1
        return super().get(key, default)

    def items(self):
        raise AssertionError("LiveOutput looked at every attempt")

    values = items


def test_live_output_flush_looks_only_at_attempts_due(store):
    """flush, like next_due, costs per attempt due: with 1,000 attempts streaming and 10
    of them due it stores those 10 and looks up no more than them (and the ended one)."""
    lease = claimed(store)

    class Recording:
        """Stands in for the store's two writes: flush's walk is what is measured."""
        def __init__(self):
            self.outputs = []

        def append_output(self, lease, seq, pos, text, truncated):
            self.outputs.append(text)
            return True

        def append_log(self, *args, **kwargs):
            raise AssertionError("no log was written")

    live = LiveOutput(max_output_bytes=1 << 20, max_log_bytes=1000, chunks_per_s=float("inf"))
    live._attempts = Counting()
    for i in range(1000):
        live.on_stream(f"t{i}:1", lease, f"x{i}", 10.0 + i / 1000)
    live.on_stream("ended:1", lease, "last", 20.0)
    live.end("ended:1")
    recording = Recording()
    Counting.gets = 0
    live.flush(recording, 10.0 + OUTPUT_FLUSH_S + 0.0095)  # t0 .. t9 are due
    live.committed()
    assert recording.outputs == [f"x{i}" for i in range(10)] + ["last"]
    assert Counting.gets <= 11, f"looked up {Counting.gets} attempts for 11 due"
    assert live.next_due() == 10.010 + OUTPUT_FLUSH_S  # t10 is next
    # rolled back: the same ones are found again
    again = Recording()
    live.on_stream("t0:1", lease, "y", 10.1)
    at = 10.1 + OUTPUT_FLUSH_S
    live.flush(again, at)
    due = [f"x{i}" for i in range(10, 1000) if 10.0 + i / 1000 + OUTPUT_FLUSH_S <= at]
    assert sorted(again.outputs) == sorted(due + ["y"])  # earliest first: y is last
    live._staged = []  # the transaction rolled back: nothing applied
    third = Recording()
    live.flush(third, at)
    assert third.outputs == again.outputs


def _received(sock) -> list[tuple[int | None, str, dict | None]]:
    """The SSE frames waiting on our end of a client socket the fan-out wrote to."""
    from supervisor.apiclient import _parse
    sock.setblocking(False)
    data = b""
    while True:
        try:
            piece = sock.recv(1 << 16)
        except BlockingIOError:
            break
        if not piece:
            break
        data += piece
    return list(_parse(iter(data.decode("utf-8").split("\n"))))


@pytest.fixture
def wire(db_path):
    """The event stream's two sides in-process on one file: `fan`, the HTTP thread's
    Broadcast; `fan_out()`, the fan-out process's FanOut; `client` and `handed`, the two
    ends of a client's connection. Everything is closed at the end."""
    import socket
    import types

    from supervisor.broadcast import Broadcast, FanOut, Filter
    fan = Broadcast(lambda: Store(db_path, migrate=False, create=False), str(db_path), 600,
                    clock=lambda: T0)
    ctrl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client, handed = socket.socketpair()
    outs = []

    def fan_out():
        outs.append(FanOut(str(db_path), 600, theirs, clock=lambda: T0))
        return outs[-1]
    try:
        yield types.SimpleNamespace(fan=fan, fan_out=fan_out, client=client, handed=handed,
                                    Filter=Filter)
    finally:
        for out in outs:
            out.store.close()
        for s in (client, handed, ctrl, theirs):
            s.close()
        fan.stop()


def test_a_prune_between_subscribe_and_catch_up_gives_a_gap_not_a_silent_skip(store, wire):
    """The HTTP thread checks the resume id against the oldest event kept (no gap), then
    the fan-out process prunes, then it reads the rows after the id for that client: the
    events in between were skipped with no `gap` event. Driven in that order in-process,
    against one file, with a fan-out that has nothing in memory (it just started, as after
    a restart of the supervisor): the client gets every event after its id or a gap."""
    wire.fan.subscribe(None, wire.Filter())  # switches the log on
    for i in range(5):
        store.enqueue(new(), T0 + i)
    ids = [e.id for e in events.read(store.conn, 0)]
    seen = ids[0]  # the client's Last-Event-ID
    out = wire.fan_out()
    out.housekeep(T0, 0.0)  # its watermark: the newest id now
    wire.fan.clock = lambda: T0 + 601
    sub = wire.fan.subscribe(seen, wire.Filter())  # 1. the HTTP thread: nothing pruned yet
    assert sub.gap is None and sub.cursor == seen
    out.housekeep(T0 + 601, 1.0)  # 2. retention prunes all but the newest
    assert [e.id for e in events.read(store.conn, 0)] == ids[-1:]
    wire.handed.sendall(sub.first())  # (what the HTTP thread writes)
    out.attach(wire.handed, sub.flt, sub.cursor)  # 3. the hand-over: catch-up from `seen`
    got = _received(wire.client)
    sent = [ev_id for ev_id, kind, data in got if data is not None and kind != "gap"]
    gaps = [data for _id, kind, data in got if kind == "gap"]
    if sent != ids[1:]:
        assert gaps == [{"after": seen, "resumed_at": ids[-1] - 1}], got
        assert sent == ids[-1:], got


def test_rows_pruned_before_the_fan_out_read_them_are_a_gap_for_its_live_clients(store, wire):
    """Another supervisor on the file prunes rows this fan-out has not read yet (it was
    behind by more than the retention): its live clients got the rows after the hole as
    if nothing was missing. They get a `gap`, then the rows that are left, each once."""
    wire.fan.subscribe(None, wire.Filter())  # switches the log on
    store.enqueue(new(), T0)
    out = wire.fan_out()
    sub = wire.fan.subscribe(None, wire.Filter())  # a live client, at the newest id
    wire.handed.sendall(sub.first())
    out.attach(wire.handed, sub.flt, sub.cursor)
    store.enqueue(new(), T0 + 1)  # read live: the ring holds it
    out.read_new()
    cursor = out.last_id
    assert [ev_id for ev_id, _kind, data in _received(wire.client) if data] == [cursor]
    for i in range(4):  # written by the other supervisor...
        store.enqueue(new(), T0 + 2 + i)
    ids = [e.id for e in events.read(store.conn, cursor)]
    events.prune(store.conn, ids[2])  # ...which prunes two of them unread
    out.read_new()
    got = _received(wire.client)
    gaps = [data for _id, kind, data in got if kind == "gap"]
    sent = [ev_id for ev_id, kind, data in got if data is not None and kind != "gap"]
    assert gaps == [{"after": cursor, "resumed_at": ids[2] - 1}], got
    assert sent == ids[2:], got
    store.enqueue(new(), T0 + 9)  # and on from there, with no gap
    out.read_new()
    got = _received(wire.client)
    assert [kind for _id, kind, data in got if data is not None] == ["task"], got
