"""`llm.chat`'s answer read in the model-call relay, for a task process that asked it to
("parse" in the request line, workers.relay): the same Reply that a task would run, fed in
the relay, and what the task's context would have sent for it (stream text, progress,
spend) turned into ready report lines (workers.wire) that the task writes to its report
channel unread.

Why: in a task process forked from the fork server every object the parse touches has
its page copied (Python 3.11 writes a reference count at every touch, and the interpreter
specialises code in place), ~0.4 MiB for a streamed answer; in the relay it is touched
in a process that is already warm. Owns that translation only: the outcome's meaning
(Reply, the exceptions) stays `workers.handlers.llm`'s; the protocol, `workers.relay`'s.
Runs in the relay, never in a task process; never sees a header or an API key.
"""

from __future__ import annotations

import json

from workers import wire
from workers.handlers import llm
from workers.stream import MAX_MESSAGE_CHARS


class Reports:
    """What a TaskContext would send for the Reply's calls to `stream` and `progress`,
    as report lines, in order; `take` hands over what gathered (one frame per upstream
    read). Mirrors TaskContext.progress (clamped fraction, message cut at 500) and
    workers.stream (text split at MAX_MESSAGE_CHARS, sent before the next message)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.lines: list[bytes] = []

    def stream(self, text: str) -> None:
        self.parts.append(text)

    def progress(self, fraction: float | None = None, message: str | None = None) -> None:
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction)))
        self._text()
        self.lines.append(wire.encode_report(wire.PROGRESS, {
            "fraction": fraction, "message": None if message is None else str(message)[:500]}))

    def spend(self, tokens: int) -> None:
        self._text()
        self.lines.append(wire.encode_report(wire.SPEND, {"tokens": tokens}))

    def take(self) -> bytes:
        self._text()
        data, self.lines = b"".join(self.lines), []
        return data

    def _text(self) -> None:
        if self.parts:
            text, self.parts = "".join(self.parts), []
            for i in range(0, len(text), MAX_MESSAGE_CHARS):
                self.lines.append(wire.encode_report(wire.STREAM,
                                                     {"text": text[i:i + MAX_MESSAGE_CHARS]}))


class Parse:
    """One answer's parse, as the task asked: `opts` is the request line's "parse"
    object {"reports": bool, "model", "max_tokens"}. Its methods raise llm's exceptions
    (the relay sends them as an `E` frame of kind "raised")."""

    def __init__(self, opts: dict, url: str, stall_timeout_s: float):
        self.reports = Reports() if opts.get("reports") else None
        self.model = opts.get("model")
        self.url = url
        self.reply = llm.Reply(self.reports, stall_timeout_s, opts.get("max_tokens"))

    def start(self) -> bytes:
        """The report lines a call sends before its request: the "asking" progress."""
        if self.reports is None:
            return b""
        self.reports.progress(0.0, llm.asking(self.model, self.url))
        return self.reports.take()

    def lines(self, lines: list[str]) -> bytes:
        """Body lines of one upstream read; the report lines they made."""
        reply = self.reply
        for line in lines:
            reply.feed(line)
        return self.reports.take() if self.reports is not None else b""

    def whole(self, body: bytes) -> None:
        """A server that ignored stream: true and answered with one JSON object."""
        llm._finish_json(self.reply, body)

    def end(self) -> tuple[bytes, bytes]:
        """The body ended: (the last report lines, the result as JSON)."""
        reply = self.reply
        if not reply.done:
            reply.close()
        result = reply.result(self.model)
        if self.reports is not None:
            total = result["usage"]["total_tokens"]
            if isinstance(total, int) and total >= 0:
                self.reports.spend(total)
        last = self.reports.take() if self.reports is not None else b""
        return last, json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode()

    def stalled(self) -> BaseException:
        return self.reply.stalled()


def raised(exc: BaseException) -> dict | None:
    """The `E` frame's object for an exception of the parse (one of llm.RAISED: the task
    raises the same class again), or None for any other."""
    name = type(exc).__name__
    if llm.RAISED.get(name) is not type(exc):
        return None
    return {"kind": "raised", "error": name, "message": str(exc)[:4000]}
