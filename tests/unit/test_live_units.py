"""Pure parts of issue 14: ctx.stream's batching in the task process, the config keys
(listen on a Unix socket, allow_origins, events_retention, output and log limits), and
the SSE framing and filters of the fan-out."""

from __future__ import annotations

import json
import threading

import pytest

from supervisor.broadcast import Filter, Frame, Subscription, frame
from supervisor.config import load
from supervisor.errors import ConfigError
from supervisor.store.events import Event
from tests.support import wait_until
from workers import stream
from workers.context import TaskContext


class Reporter:
    def __init__(self):
        self.sent: list[tuple[str, dict]] = []
        self.lock = threading.Lock()

    def send(self, kind, **fields):
        with self.lock:
            self.sent.append((kind, fields))


def ctx(reporter) -> TaskContext:
    return TaskContext(id="t", type="x", attempt=1, max_attempts=1, deadline_at=None,
                       reporter=reporter)


def test_stream_batches_small_pieces_and_keeps_order_with_progress():
    rep = Reporter()
    c = ctx(rep)
    for i in range(50_000):
        c.stream("tok ")
    c.progress(0.5, "half")
    c.stream("after")
    c.close_output()
    kinds = [k for k, _ in rep.sent]
    texts = "".join(f["text"] for k, f in rep.sent if k == "stream")
    assert texts == "tok " * 50_000 + "after"
    assert kinds.count("stream") <= 50_000 * 4 // stream.FLUSH_BYTES + 5  # batched
    assert all(len(f["text"]) <= stream.MAX_MESSAGE_CHARS for k, f in rep.sent if k == "stream")
    # The progress message comes after every piece written before it.
    i = kinds.index("progress")
    assert "".join(f["text"] for k, f in rep.sent[:i] if k == "stream") == "tok " * 50_000
    with pytest.raises(ValueError):
        c.stream("too late")
    with pytest.raises(TypeError):
        ctx(Reporter()).stream(b"bytes")


def test_a_pause_does_not_hold_text_back():
    rep = Reporter()
    c = ctx(rep)
    c.stream("one piece")
    wait_until(lambda: rep.sent, timeout=2, interval=0.005)  # sent within ~20 ms
    assert rep.sent == [("stream", {"text": "one piece"})]
    c.close_output()


def test_config_keys_of_issue_14(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[supervisor]\nmax_output_bytes = 10\nmax_log_bytes = 20\n'
                    '[http]\nlisten = "unix:run/api.sock"\nevents_retention = "2m"\n'
                    'allow_origins = ["http://localhost:5173", "app://Desk"]\n')
    cfg = load(path)
    assert cfg.http.listen == f"unix:{tmp_path / 'run' / 'api.sock'}"
    assert cfg.http.events_retention == 120.0
    assert cfg.http.allow_origins == ("http://localhost:5173", "app://desk")
    assert (cfg.supervisor.max_output_bytes, cfg.supervisor.max_log_bytes) == (10, 20)
    default = load(None)
    assert default.http.allow_origins == () and default.http.events_retention == 600.0
    assert default.supervisor.max_output_bytes == 1 << 20
    assert default.supervisor.max_log_bytes == 256 * 1024


@pytest.mark.parametrize("text, message", [
    ('allow_origins = ["*"]', '"*" is not allowed'),
    ('allow_origins = ["http://x/path"]', "is not an origin"),
    ('allow_origins = "nope"', "is not an origin"),
    ('allow_origins = [1]', "a list of origins"),
    ('listen = "unix:"', "socket path"),
    ('events_retention = 0', "must be more than 0"),
])
def test_bad_issue_14_keys_name_the_key(tmp_path, text, message):
    path = tmp_path / "t.toml"
    path.write_text(f"[http]\n{text}\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert message in str(err.value) and "[http]" in str(err.value)


def test_frames_and_filters():
    ev = Event(7, "output", "T1", "llm.chat", "T1", json.dumps({"text": "hi"}))
    f = frame(ev)
    assert f.data == b'id: 7\nevent: output\ndata: {"text": "hi"}\n\n'
    assert Filter()(f) and Filter(task="T1")(f) and Filter(type="llm.chat", workflow="T1")(f)
    assert not Filter(task="T2")(f) and not Filter(type="other")(f)
    sub = Subscription(3, Filter(), {"after": 3, "resumed_at": 9})
    assert sub.first() == (b'retry: 1000\nid: 3\n\n'
                           b'event: gap\ndata: {"after": 3, "resumed_at": 9}\n\n')
    assert isinstance(f, Frame)


class _EndedMeanwhile:
    """An API whose task ends between `watch`'s first read and the opening of its event
    stream: the stream (from "now") never carries the end."""

    def __init__(self):
        self.reads = 0
        self.closed = threading.Event()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed.set()  # the stream's thread ends with the client, as a real one's
        return None

    def get(self, task_id):
        self.reads += 1
        status = "running" if self.reads == 1 else "succeeded"
        return {"id": task_id, "status": status, "attempts": 1, "progress": None,
                "progress_message": None, "error": None}

    def output(self, task_id, attempt=None):
        return {"id": task_id, "attempt": 1, "text": "all of it", "truncated": False}

    def events(self, task=None, on_open=None, **_kw):
        on_open()
        self.closed.wait()  # nothing more comes before the client is closed
        yield from ()


def test_watch_api_sees_an_end_that_came_before_its_stream_opened(monkeypatch, capsys):
    from argparse import Namespace
    from supervisor import watch
    monkeypatch.setattr(watch, "_client", lambda args, cfg: _EndedMeanwhile())
    result = []
    t = threading.Thread(target=lambda: result.append(
        watch._watch_api(Namespace(id="T1", api="unix:/nowhere"), None)), daemon=True)
    t.start()
    t.join(10)
    assert result == [watch.EXIT_OK], "watch --api waited for an end it had missed"
    out = capsys.readouterr()
    assert out.out == "all of it" and "[succeeded]" in out.err


class _Scripted(_EndedMeanwhile):
    """A running task's API whose stream carries `events` and then the task's end."""

    def __init__(self, output: dict, events: list):
        super().__init__()
        self._output, self._events = output, events

    def get(self, task_id):
        return {"id": task_id, "status": "running", "attempts": 2, "progress": None,
                "progress_message": None, "error": None}

    def output(self, task_id, attempt=None):
        return self._output

    def events(self, task=None, on_open=None, **_kw):
        on_open()
        yield from self._events
        yield (99, "task", {"status": "succeeded", "attempt": 2, "progress": None,
                            "message": None, "error": None})


def _watch_api_with(monkeypatch, api):
    from argparse import Namespace
    from supervisor import watch
    monkeypatch.setattr(watch, "_client", lambda args, cfg: api)
    assert watch._watch_api(Namespace(id="T1", api="unix:/nowhere"), None) == watch.EXIT_OK


def test_watch_api_skips_a_late_chunk_of_an_earlier_attempt_and_says_when_output_is_cut(
        monkeypatch, capsys):
    """A chunk of attempt 1 arriving after attempt 2's text made it start over (attempt
    2's text printed twice); a cut chunk was printed without saying it was cut."""
    def chunk(attempt, pos, text, truncated=False):
        return (1, "output", {"attempt": attempt, "pos": pos, "text": text,
                              "truncated": truncated})
    _watch_api_with(monkeypatch, _Scripted(
        {"id": "T1", "attempt": 2, "text": "two ", "truncated": False},
        [chunk(1, 0, "one, late "), chunk(2, 4, "more"), chunk(2, 8, " and the cut", True)]))
    out = capsys.readouterr()
    assert out.out == "two more and the cut"
    assert out.err.count("[output cut at max_output_bytes]") == 1
    # Already cut when watch starts: said at once.
    _watch_api_with(monkeypatch, _Scripted(
        {"id": "T1", "attempt": 2, "text": "all there is", "truncated": True}, []))
    out = capsys.readouterr()
    assert out.out == "all there is" and "[output cut at max_output_bytes]" in out.err


def test_log_answers_join_at_character_boundaries_wherever_the_chunks_cut():
    """What `GET /api/tasks/{id}/logs?after_seq=` answers, answer after answer (log_text
    over the chunks stored so far): the texts joined are the log decoded whole, wherever
    the chunks cut its characters, while the attempt runs and once it ended."""
    from supervisor.output import log_text
    from supervisor.store.events import LogChunk
    data = "<é|€/😀>".encode()
    for cuts in ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [2, 5, 9], [10], [11, 12]):
        bounds = [0, *cuts, len(data)]
        chunks = [LogChunk(1, i, a, data[a:b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        texts, had = [], []
        for n in range(1, len(chunks) + 1):  # a reader that asks after each chunk stored
            text, start, end = log_text(had[-3:], chunks[len(had):n], ended=False)
            assert "\ufffd" not in text, (cuts, n, text)
            if text:
                assert end - start == len(text.encode())
            texts.append(text)
            had = chunks[:n]
        texts.append(log_text(had[-3:], [], ended=True)[0])
        assert "".join(texts) == "<é|€/😀>", cuts
    # The attempt ended with a broken character: said, once, as U+FFFD.
    whole = [LogChunk(1, 0, 0, b"ok \xe2\x82")]
    assert log_text([], whole, ended=False)[0] == "ok "
    assert log_text(whole, [], ended=False) == ("", None, None)
    assert log_text(whole, [], ended=True) == ("\ufffd", 3, 5)
    # Bytes dropped between two chunks (the log keeps its tail): no part carried over.
    assert log_text([LogChunk(1, 0, 0, b"a\xc3")], [LogChunk(1, 1, 100, b"b")], ended=True) == (
        "b", 100, 101)
    tail = [LogChunk(1, 2, 51, b"\x98\x80")]
    assert log_text([LogChunk(1, 0, 49, b"\xf0"), LogChunk(1, 1, 50, b"\x9f")], tail,
                    ended=True) == ("😀", 49, 53)
    assert log_text([LogChunk(1, 0, 0, b"\xf0"), LogChunk(1, 1, 50, b"\x9f")], tail,
                    ended=True) == ("\ufffd\ufffd", 51, 53)


def test_the_sse_client_splits_lines_at_cr_and_lf_only_wherever_the_reads_cut():
    """The event stream read in pieces cut at every byte (inside a character, between
    the CR and LF of a CRLF) gives the lines of the whole, split where SSE splits them:
    not at U+2028, U+2029 or U+0085, which a data line's JSON may hold raw."""
    from supervisor.apiclient import _lines, _parse
    text = ('id: 7\r\nevent: output\rdata: {"text": "é\u2028€\x85😀\u2029"}\n\n'
            'id: 8\r\ndata: {"n": 1}\r\n\r\n')
    data = text.encode()
    expected = ["id: 7", "event: output", 'data: {"text": "é\u2028€\x85😀\u2029"}', "",
                "id: 8", 'data: {"n": 1}', ""]
    for size in range(1, 8):
        pieces = [data[i:i + size] for i in range(0, len(data), size)]
        assert list(_lines(iter(pieces))) == expected, size
    for cut in range(len(data) + 1):
        assert list(_lines(iter([data[:cut], data[cut:]]))) == expected, cut
    assert list(_parse(_lines(iter([data])))) == [
        (7, "output", {"text": "é\u2028€\x85😀\u2029"}), (8, "message", {"n": 1})]
    assert list(_lines(iter([b"a\r"]))) == ["a"] and list(_lines(iter([b"open"]))) == []


def test_logs_api_prints_a_held_back_character_once_when_asked_twice():
    """An attempt whose log ends in half a character: once it has ended, the answer after
    the last chunk is that half as U+FFFD, and `logs --follow --api` (whose view of the
    status lags) may ask for it twice: it was printed twice."""
    from supervisor.output import log_text
    from supervisor.store.events import LogChunk
    from supervisor.watch import _api_log
    chunks = [LogChunk(attempt=1, seq=0, pos=0, data="ok ".encode() + "€".encode()[:2])]

    class Api:
        ended = False

        def logs(self, task_id, attempt=None, after_seq=None):
            before = [c for c in chunks if c.seq <= after_seq]
            after = [c for c in chunks if c.seq > after_seq]
            text, start, end = log_text(before, after, self.ended)
            return {"attempt": 1, "text": text, "start": start, "end": end,
                    "seq": after[-1].seq if after else after_seq}
    api, printed = Api(), {}
    assert _api_log(api, "t", 1, -1, printed) == (1, [(0, b"ok ")])  # running: held back
    api.ended = True
    assert _api_log(api, "t", 1, 0, printed) == (1, [(0, "\ufffd".encode())])
    assert _api_log(api, "t", 1, 0, printed) == (1, [])  # asked again: nothing new
