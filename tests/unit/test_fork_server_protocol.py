"""The fork server's per-task wire format, both ends: the spec parser of the fork server
(json's C scanner alone) and the supervisor's reading of the short text messages."""

from __future__ import annotations

import json

import pytest

from supervisor.forkserver import parse_event
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
