"""`llm.chat`'s HTTP exchange handed to the supervisor's model-call relay (workers.relay),
seen from the task process: the relay's frames (workers.relaycall) fed to the same Reply,
status_error and exceptions as a call made here (workers.handlers.llmhttp).

Owns that mapping, and the task's side of the timeouts (the relay reports a stall or an
overrun itself; a relay silent past them by RELAY_GRACE_S is stuck: the attempt times
out; a connection that breaks is LlmUnavailable, retried like a broken connection to the
model server). It touches no httpx object and imports nothing the fork server would not
already hold with workers.handlers.llm.
"""

from __future__ import annotations

import _socket
import json
import time

from workers import relaycall
from workers.context import TaskContext
from workers.handlers import llm

WARM_UP_ROUNDS = 8  # a few: the interpreter specialises code that has run several times


def chat_sync(sock, req: llm.Request, reply: llm.Reply, ctx) -> None:
    """The exchange for `llm.chat_sync`, over `sock` (connected to the relay), fed into
    `reply`; raises llm's exceptions."""
    call = Relayed(req, reply, ctx)
    call.run_sync(lambda: relaycall.exchange(sock, call.line(), call.on_frame, call.timeout_s))


async def chat(sock, req: llm.Request, reply: llm.Reply, ctx) -> None:
    """The same for `await llm.chat`."""
    call = Relayed(req, reply, ctx)
    await call.run(relaycall.exchange_async(sock, call.line(), call.on_frame, call.timeout_s))


def parses(ctx: object) -> bool:
    """Whether the relay reads the answer too (request line "parse"): for a TaskContext,
    whose stream, progress and spend the relay then writes as report lines, or for no
    context. Any other object given as ctx gets its own calls, made here from `L` frames."""
    return ctx is None or type(ctx) is TaskContext


def chat_parsed_sync(sock, req: llm.Request, ctx: TaskContext | None) -> dict:
    """The call for `llm.chat_sync` when the relay reads the answer: its report lines go
    to the task's report channel unread; the result, or llm's exception."""
    call = Parsed(req, ctx)
    call.run_sync(lambda: relaycall.exchange(sock, call.line(), call.on_frame, call.timeout_s))
    return call.result


async def chat_parsed(sock, req: llm.Request, ctx: TaskContext | None) -> dict:
    """The same for `await llm.chat`."""
    call = Parsed(req, ctx)
    await call.run(relaycall.exchange_async(sock, call.line(), call.on_frame, call.timeout_s))
    return call.result


class _Call:
    """What both kinds of call through the relay share: the request line, the deadline,
    the task's side of the timeouts, an HTTP error status (`H`, `B`) and an `E` frame
    turned into llm's exceptions."""

    parse: dict | None = None  # the request line's "parse", for a call the relay reads
    reply: llm.Reply | None = None

    def __init__(self, req: llm.Request, ctx: object):
        self.req, self.ctx = req, ctx
        self.deadline = time.monotonic() + req.request_timeout_s
        self.answer: relaycall.Answer | None = None

    def line(self) -> bytes:
        r = self.req
        return relaycall.request_line(r.url, r.headers, r.body, r.stall_timeout_s,
                                      r.request_timeout_s, self.parse)

    def timeout_s(self) -> float:
        """How long one read from the relay may wait: the relay reports a stall or an
        overrun itself; past this margin the relay itself is stuck."""
        left = self.deadline - time.monotonic()
        return max(0.05, min(self.req.stall_timeout_s, left) + llm.RELAY_GRACE_S)

    def status_error(self, body: bytes) -> BaseException:
        self.answer.content = body
        return llm.status_error(self.answer, self.req.url, llm._pause_keys(self.ctx, spent=0))

    def error(self, data: bytes) -> BaseException:
        err = json.loads(data)
        return llm._error_of(str(err.get("kind")), str(err.get("error")),
                             str(err.get("message")), self.req, self.reply)

    def broken(self, exc: relaycall.RelayBroken) -> llm.LlmUnavailable:
        return llm.LlmUnavailable(f"the model-call relay's connection broke during the call to "
                                  f"{self.req.url}: {exc}")

    def silent(self) -> BaseException:
        if time.monotonic() >= self.deadline:
            return llm._overran(self.req)
        if self.reply is not None:
            return self.reply.stalled()
        return llm.LlmStalled(f"the model stream stalled: no word from the model-call relay "
                              f"within stall_timeout_s={self.req.stall_timeout_s:g}s and a "
                              f"grace of {llm.RELAY_GRACE_S:g}s")

    def run_sync(self, exchange) -> None:
        try:
            exchange()
        except relaycall.RelayBroken as exc:
            raise self.broken(exc) from None
        except relaycall.RelaySilent:
            raise self.silent() from None

    async def run(self, exchange) -> None:
        try:
            await exchange
        except relaycall.RelayBroken as exc:
            raise self.broken(exc) from None
        except relaycall.RelaySilent:
            raise self.silent() from None


class Relayed(_Call):
    """One call through the relay, seen from the task: the frames of its answer fed to the
    same Reply, status_error and exceptions as a call made here (no httpx object touched)."""

    def __init__(self, req: llm.Request, reply: llm.Reply, ctx: object):
        super().__init__(req, ctx)
        self.reply = reply
        self.whole = False  # one JSON object, not a stream
        reply.batch_stream()  # streamed text goes out once per frame (one upstream read)

    def on_frame(self, kind: bytes, data: bytes) -> bool:
        """One frame; True at the end. Raises the call's exception."""
        if kind == b"L":
            reply = self.reply
            try:
                for line in data.decode().split("\n"):
                    reply.feed(line)
                    if time.monotonic() > self.deadline:
                        raise llm._overran(self.req)
            finally:
                reply.flush_stream()
        elif kind == b"H":
            self.answer = relaycall.Answer(json.loads(data))
        elif kind == b"B":
            if self.answer.status_code >= 400:
                raise self.status_error(data)
            try:
                llm._finish_json(self.reply, data)
            finally:
                self.reply.flush_stream()
            self.whole = True
        elif kind == b"Z":
            if not self.whole:
                self.reply.close()
            return True
        elif kind == b"E":
            raise self.error(data)
        return False


class Parsed(_Call):
    """One call whose answer the relay reads (workers.handlers.llmreports): this process
    writes the `R` frames' report lines, decodes the `J` result, and raises what `E` or
    an HTTP error status (`H`, `B`) says. It touches no Reply: the fewer objects a task
    process touches, the fewer pages it copies from the fork server."""

    def __init__(self, req: llm.Request, ctx: TaskContext | None):
        super().__init__(req, ctx)
        self.parse = {"reports": ctx is not None, "model": req.body.get("model"),
                      "max_tokens": llm._cap(req.body)}
        self.result: dict | None = None

    def on_frame(self, kind: bytes, data: bytes) -> bool:
        if kind == b"R":
            if self.ctx is not None:
                self.ctx._write_lines(data)
        elif kind == b"J":
            self.result = json.loads(data)
            return True
        elif kind == b"H":
            self.answer = relaycall.Answer(json.loads(data))
        elif kind == b"B":
            raise self.status_error(data)
        elif kind == b"E":
            raise self.error(data)
        elif kind == b"Z":
            raise llm.MalformedReply(f"the model-call relay ended the call to {self.req.url} "
                                     f"without a result")
        return False


def warm_up(rounds: int = WARM_UP_ROUNDS) -> dict:
    """The relay path of `llm.chat_sync` (the relay reads the answer: Parsed), `rounds`
    times, in this process, against a canned answer waiting on a socket pair: no relay,
    no network, nothing reported anywhere (the context's reports go into another socket
    pair, thrown away). llm registers it as a @warm_up when a relay is named, so the fork
    server runs it once after its preload: what a first call writes (the interpreter's
    caches, code it specialises, the first objects of each size) is then in the memory
    every task process starts from, not copied into each (benchmarks/README.md). Returns
    the last call's result."""
    from workers.child import Reporter  # the fork server holds it; a task would too
    payload = {"base_url": "http://127.0.0.1:9/v1", "model": "warm-up", "max_tokens": 8,
               "messages": [{"role": "user", "content": "warm up"}],
               "request_timeout_s": 5.0, "stall_timeout_s": 5.0}
    answer = _canned_answer()
    result: dict = {}
    reports, sink = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sink.setblocking(False)
        for _ in range(rounds):
            ctx = TaskContext(id="warm-up", type="llm.chat", attempt=1, max_attempts=1,
                              deadline_at=None, reporter=Reporter(reports.fileno()),
                              config={"llm": {}}, log_settings=(False, "INFO"))
            req = llm.build_request(payload, ctx)
            theirs, ours = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
            try:
                theirs.sendall(answer)
                result = chat_parsed_sync(ours, req, ctx)  # closes ours
            finally:
                theirs.close()
            ctx.close_output()
            _drain(sink)
    finally:
        reports.close()
        sink.close()
    return result


def _canned_answer() -> bytes:
    """The frames the relay sends for a short streamed answer that it read itself
    (workers.relay, workers.handlers.llmreports)."""
    from workers import wire
    lines = [wire.encode_report(wire.PROGRESS, {"fraction": 0.0, "message": "asking warm-up"}),
             wire.encode_report(wire.STREAM, {"text": "warm up"}),
             wire.encode_report(wire.PROGRESS, {"fraction": 1.0, "message": "done: 2 tokens"}),
             wire.encode_report(wire.SPEND, {"tokens": 4})]
    result = {"text": "warm up", "finish_reason": "stop", "model": "warm-up",
              "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}
    return b"".join((relaycall.frame(b"R", lines[0]), relaycall.frame(b"R", lines[1]),
                     relaycall.frame(b"R", b"".join(lines[2:])),
                     relaycall.frame(b"J", json.dumps(result).encode())))


def _drain(sock) -> None:
    while True:
        try:
            if not sock.recv(1 << 16):
                return
        except (BlockingIOError, InterruptedError):
            return
