"""The wire format (workers.wire), both ends: the spec parser of the fork server (json's C
scanner alone), the supervisor's reading of the fork server's short text messages, and
the check of every report line a task process sends: anything not declared is a
ProtocolError, never an exception of another kind and never accepted."""

from __future__ import annotations

import json

import pytest

from workers import wire
from workers.wire import ProtocolError, parse_report
from workers.wire import parse_server_event as parse_event
from workers.zygote import _parse_spec


@pytest.mark.parametrize("spec", [
    {"task": {"id": "01J", "payload": {"text": "héllo ✓ 日本", "n": [1, 2.5, None, True]}}},
    {"task": {"id": "x", "payload": {}}, "deadline_at": None, "limits": {"memory_mb": 512}},
    {},
])
def test_a_spec_reads_back_as_json_loads_reads_it(spec):
    text = json.dumps(spec, separators=(",", ":"), ensure_ascii=False).encode()
    assert _parse_spec(text) == json.loads(text) == spec


@pytest.mark.parametrize("bad", [b'{"a":1} trailing', b"[1, 2]", b'{"a":', b"", b"\xff{}",
                                 b' {"a":1}'])
def test_a_spec_that_is_not_one_json_object_is_a_value_error(bad):
    with pytest.raises(ValueError):
        _parse_spec(bad)


def test_the_per_task_messages_read_back_into_their_fields():
    assert parse_event(b"spawned 01JABC:2 4242") == {"op": "spawned", "key": "01JABC:2", "pid": 4242}
    assert parse_event(b"exited 4242 9 0.012 0.0031 18432") == {
        "op": "exited", "pid": 4242, "status": 9, "utime": 0.012, "stime": 0.0031,
        "maxrss_kb": 18432}
    assert parse_event(b"spawn_failed 01JABC:2 fork failed: [Errno 11] EAGAIN") == {
        "op": "spawn_failed", "key": "01JABC:2", "error": "fork failed: [Errno 11] EAGAIN"}
    assert parse_event(b'{"op":"ready","pid":7,"types":["a"]}')["types"] == ["a"]

    assert parse_event(b"fenced 3") == {"op": "fenced", "count": 3}
    assert parse_event(b'{"op":"warmed","seconds":0.31}') == {"op": "warmed", "seconds": 0.31}


@pytest.mark.parametrize("bad", [b"exited x 9 0 0 0", b"exited -4 9 0.1 0.1 1", b"spawned k",
                                 b"spawned k 0", b"fenced", b"hello", b'{"op":"spawn"}', b"\xff"])
def test_a_bad_fork_server_message_is_a_protocol_error(bad):
    with pytest.raises(ProtocolError):
        parse_event(bad)


@pytest.mark.parametrize("line", [
    b'{"kind":"ready","pid":12}',
    b'{"kind":"progress","fraction":0.5,"message":"half"}',
    b'{"kind":"progress","fraction":null}',
    b'{"kind":"progress","message":"only text"}',
    b'{"kind":"heartbeat"}',
    b'{"kind":"result","result":"{\\"a\\":1}"}',
    b'{"kind":"error","type":"ValueError","message":"m","traceback":"","retryable":true,"outcome":"error"}',
    b'{"kind":"error","type":"MemoryError","message":"m","traceback":"t","retryable":true,"outcome":"memory_limit"}',
    b'{"kind":"retry","delay_s":2.5,"reason":"429"}',
    b'{"kind":"retry","delay_s":0}',
    b'{"kind":"cancelled"}',
    b'{"kind":"result","result":"null","spawn":[{"id":"X","type":"t","payload":{}}]}',
    b'{"kind":"checkpoint","state":"{\\"step\\":2}","seq":3}',
])
def test_every_declared_report_reads_back(line):
    assert parse_report(line) == json.loads(line)


@pytest.mark.parametrize("line, why", [
    (b'{"kind":"error","outcome":"nope"}', "not one of"),
    (b'{"kind":"error","type":"E","message":"m","traceback":"","retryable":true,"outcome":"nope"}', "not one of"),
    (b'{"kind":"error","type":"E","message":"m","traceback":"","retryable":true,"outcome":"succeeded"}', "not one of"),
    (b'{"kind":"error","type":"E","message":"m","traceback":"","retryable":1,"outcome":"error"}', "expected bool"),
    (b'{"kind":"progress","fraction":1.5}', "outside"),
    (b'{"kind":"progress","fraction":true}', "expected"),
    (b'{"kind":"progress","message":"x","extra":1}', "unknown field"),
    (b'{"kind":"ready","pid":"12"}', "expected int"),
    (b'{"kind":"ready","pid":-1}', "outside"),
    (b'{"kind":"retry","delay_s":-1}', "outside"),
    (b'{"kind":"result","result":{"a":1}}', "expected str"),
    (b'{"kind":"launch_missiles"}', "unknown message kind"),
    (b'{"kind":"result","result":"null","spawn":{"id":"X"}}', "expected list"),
    (b'{"kind":"result","result":"null","spawn":[' + b'{},' * 10000 + b'{}]}', "over 10000"),
    (b'{"kind":"checkpoint","state":"{}"}', "needs an integer seq"),
    (b'{"kind":"checkpoint","state":{"step":1},"seq":1}', "expected str"),
    (b'{"kind":7}', "unknown message kind"),
    (b'["kind","ready"]', "not a JSON object"),
    (b'{"kind":"ready"', "not a JSON line"),
    (b"\xff\xfe", "not a JSON line"),
    (b"[" * 100000, "not a JSON line"),
])
def test_an_undeclared_report_is_a_protocol_error_that_says_why(line, why):
    with pytest.raises(ProtocolError, match=why):
        parse_report(line)


def test_a_request_needs_its_seq_and_gets_an_ack_back(monkeypatch):
    monkeypatch.setitem(wire.REPORT, "ping", {"n": wire.Field(int)})
    monkeypatch.setattr(wire, "REQUESTS", {"ping"})
    assert parse_report(b'{"kind":"ping","n":1,"seq":4}')["seq"] == 4
    with pytest.raises(ProtocolError, match="seq"):
        parse_report(b'{"kind":"ping","n":1}')
    with pytest.raises(ProtocolError, match="unknown field"):
        parse_report(b'{"kind":"heartbeat","seq":1}')  # not a request kind
    assert wire.parse_ack(wire.encode_ack(4)) == (4, None)
    assert wire.parse_ack(wire.encode_ack(5, "too big")) == (5, "too big")


def test_the_task_side_encoder_writes_what_the_supervisor_accepts():
    line = wire.encode_report(wire.PROGRESS, {"fraction": 0.25, "message": "héllo"})
    assert line.endswith(b"\n") and parse_report(line[:-1])["message"] == "héllo"


def test_the_fence_is_shared_memory_a_second_mapping_sees_at_once():
    import os
    fence, fd = wire.Fence.create()
    try:
        reader = wire.Fence(fd)
        assert reader.get() is None  # none yet
        fence.set(1234.5)
        assert reader.get() == 1234.5
        fence.set(2000.25)
        assert reader.get() == 2000.25
        reader.close()
    finally:
        os.close(fd)
        fence.close()
