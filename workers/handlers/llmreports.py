"""`llm.chat`'s answer read in the model-call relay, for a task process that asked it to
("parse" in the request line, workers.relay): the same Reply that a task would run, fed in
the relay with a TaskContext whose reports are kept as lines (stream text, progress,
spend: exactly what the task's context would have sent) for the task to write to its
report channel unread.

Why: in a task process forked from the fork server every object the parse touches has
its page copied (Python 3.11 writes a reference count at every touch, and the interpreter
specialises code in place), ~0.4 MiB for a streamed answer; in the relay it is touched
in a process that is already warm. Owns that translation only: the outcome's meaning
(Reply, the exceptions) stays `workers.handlers.llm`'s; the protocol, `workers.relay`'s.
Runs in the relay, never in a task process; never sees a header or an API key.
"""

from __future__ import annotations

import json

from workers.child import Reporter
from workers.context import TaskContext
from workers.handlers import llm


class _Lines(Reporter):
    """A Reporter that keeps the report lines it is given, for `take`."""

    def __init__(self) -> None:
        super().__init__(-1)
        self.lines: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.lines.append(data)

    def take(self) -> bytes:
        data, self.lines = b"".join(self.lines), []
        return data


class Parse:
    """One answer's parse, as the task asked: `opts` is the request line's "parse"
    object {"reports": bool, "model", "max_tokens"}. Each method returns the report lines
    it made (b"" when the task asked for none) and raises llm's exceptions (the relay
    sends them as an `E` frame of kind "raised")."""

    def __init__(self, opts: dict, url: str, stall_timeout_s: float):
        self.model = opts.get("model")
        self.url = url
        self.out = _Lines()
        self.ctx = TaskContext(id="", type="llm.chat", attempt=1, max_attempts=1,
                               deadline_at=None, reporter=self.out) if opts.get("reports") else None
        self.reply = llm.Reply(self.ctx, stall_timeout_s, opts.get("max_tokens"))
        self.reply.batch_stream()  # one stream line per upstream read, or per `flush`
        self.flushed = False  # whether the last `lines` or `flush` sent stream text

    def start(self) -> bytes:
        """Before the request: the "asking" progress."""
        if self.ctx is not None:
            self.ctx.progress(0.0, llm.asking(self.model, self.url))
        return self.out.take()

    def lines(self, lines: list[str], flush: bool = True) -> bytes:
        """Body lines of one upstream read (none after [DONE]: see `done`). With `flush`
        False the streamed text stays held (`held`) for a later `flush`, unless the answer
        is whole."""
        reply = self.reply
        try:
            for line in lines:
                reply.feed(line)
                if reply.done:
                    break
        finally:
            if flush or reply.done:
                self.flushed = bool(reply.pending)
                reply.flush_stream()
            else:
                self.flushed = False
        return self.out.take()

    @property
    def held(self) -> int:
        """Pieces of streamed text held since the last flush."""
        return len(self.reply.pending or ())

    def flush(self) -> bytes:
        """The held text, as report lines (b\"\" when none is held)."""
        self.flushed = bool(self.reply.pending)
        self.reply.flush_stream()
        return self.out.take()

    def whole(self, body: bytes) -> bytes:
        """A server that ignored stream: true and answered with one JSON object."""
        try:
            llm._finish_json(self.reply, body)
        finally:
            self.reply.flush_stream()
        return self.out.take()

    @property
    def done(self) -> bool:
        """[DONE] came: the answer is whole, read no further (a server may hold the
        connection open after it)."""
        return self.reply.done

    def end(self) -> tuple[bytes, bytes]:
        """The body ended: (the last report lines, the result as JSON)."""
        reply = self.reply
        if not reply.done:
            reply.close()
            reply.flush_stream()
        result = llm._spend(self.ctx, reply.result(self.model))
        return self.out.take(), json.dumps(result, separators=(",", ":"),
                                           ensure_ascii=False).encode()

    def stalled(self) -> BaseException:
        return self.reply.stalled()


def raised(exc: BaseException) -> dict | None:
    """The `E` frame's object for an exception of the parse (one of llm.RAISED: the task
    raises the same class again), or None for any other."""
    name = type(exc).__name__
    if llm.RAISED.get(name) is not type(exc):
        return None
    return {"kind": "raised", "error": name, "message": str(exc)[:4000]}
