"""`llm.chat`'s HTTP exchange made in the calling process with httpx: the path of a handler
run outside a supervisor, of `[llm] relay = false`, and of a task that found no relay.

Owns httpx's side of a call: the client, its timeouts, reading the response into the
caller's Reply, and turning httpx's exceptions into llm's (the same kinds the relay
reports: workers.relay.error_kind). What the answer means (the outcome, progress, the
exceptions) is `workers.handlers.llm`'s. Imported by llm at its import unless a relay is
named in the environment (then only by a call that found no relay).
"""

from __future__ import annotations

import asyncio
import encodings.idna  # noqa: F401 - see _TLS (httpx's sync client encodes host names)
import sys
import time

# httpx imports its command-line client (click, rich and pygments, 5.4 MiB of objects) when
# those happen to be installed; no task uses it, and every page the fork server holds is
# copied into the page tables of each fork. A None entry makes that one import fail, and
# httpx then goes without its CLI. Only if httpx is not imported yet (a preload module may
# have imported it, CLI and all).
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", None)

import anyio._backends._asyncio  # noqa: F401,E402 - see _TLS
import h11  # noqa: F401,E402
import httpcore._async  # noqa: F401,E402
import httpcore._backends.anyio  # noqa: F401,E402
import httpcore._backends.auto  # noqa: F401,E402
import httpx  # noqa: E402

from workers import relay, relaycall, sse  # noqa: E402
from workers.handlers import llm  # noqa: E402

# Built at import, so once in the fork server (preload), and shared copy-on-write by every
# task process, like the transport modules imported above, which httpx would otherwise import
# at a task's first request. Without them every task process would build its own TLS
# context (even for http://) and import the transports: several times the CPU of the call
# itself (figures: benchmarks/README.md, "Figures behind code comments").
_TLS = httpx.create_ssl_context()


def timeout(req: llm.Request) -> httpx.Timeout:
    # The read timeout is the stall detector: it bounds every wait for bytes, the response
    # headers (time to first token) included.
    return httpx.Timeout(req.stall_timeout_s, connect=min(relay.CONNECT_TIMEOUT_S, req.stall_timeout_s))


def transport_error(exc: httpx.HTTPError, req: llm.Request, reply: llm.Reply | None) -> BaseException:
    return llm._error_of(relay.error_kind(exc), type(exc).__name__, str(exc), req, reply)


async def chat(req: llm.Request, reply: llm.Reply, ctx) -> None:
    """The exchange for `llm.chat`, fed into `reply`; raises llm's exceptions."""
    try:
        async with asyncio.timeout(req.request_timeout_s):
            async with httpx.AsyncClient(timeout=timeout(req), verify=_TLS) as client:
                async with client.stream("POST", req.url, json=req.body, headers=req.headers) as resp:
                    if resp.status_code >= 400:
                        error = _head(resp, await relay._body(resp, relay.MAX_ERROR_BODY_BYTES))
                        raise llm.status_error(error, req.url, llm._pause_keys(ctx, spent=0))
                    if relay.is_json(resp):
                        llm._finish_json(reply, await relay._body(resp))
                    else:
                        await _feed_async(resp, reply)
    except httpx.HTTPError as exc:
        raise transport_error(exc, req, reply) from exc
    except TimeoutError:
        raise llm._overran(req) from None
    except relay.Oversized as exc:
        raise llm._error_of("oversized", "", str(exc), req, reply) from None


def chat_sync(req: llm.Request, reply: llm.Reply, ctx) -> None:
    """The same, blocking (`llm.chat_sync`). A blocking client has no deadline of its own:
    each read waits at most what is left of request_timeout_s (else a server silent
    before its headers, or after them, held the call for stall_timeout_s past it)."""
    deadline = time.monotonic() + req.request_timeout_s
    limit = httpx.Timeout(min(req.stall_timeout_s, req.request_timeout_s), connect=min(
        relay.CONNECT_TIMEOUT_S, req.stall_timeout_s, req.request_timeout_s))
    try:
        with httpx.Client(timeout=limit, verify=_TLS) as client:
            with client.stream("POST", req.url, json=req.body, headers=req.headers) as resp:
                # httpcore reads this dict when the body's first read starts: the reads of
                # the body wait at most what is left then
                resp.request.extensions["timeout"]["read"] = max(0.01, min(
                    req.stall_timeout_s, deadline - time.monotonic()))
                if resp.status_code >= 400:
                    error = _head(resp, _body(resp, relay.MAX_ERROR_BODY_BYTES))
                    raise llm.status_error(error, req.url, llm._pause_keys(ctx, spent=0))
                if relay.is_json(resp):
                    llm._finish_json(reply, _body(resp))
                else:
                    _feed(resp, reply, deadline, req)
    except relay.Oversized as exc:
        raise llm._error_of("oversized", "", str(exc), req, reply) from None
    except httpx.TimeoutException as exc:
        if time.monotonic() >= deadline - 0.05:
            raise llm._overran(req) from None
        raise transport_error(exc, req, reply) from exc
    except httpx.HTTPError as exc:
        raise transport_error(exc, req, reply) from exc


# The body's lines split where SSE splits them (workers.sse): httpx's iter_lines also cuts
# at U+2028 and the like, which a model's text in a data line's JSON may hold raw.

async def _feed_async(resp: httpx.Response, reply: llm.Reply) -> None:
    body = _Body(reply)
    async for text in resp.aiter_text():
        if body.take(text):
            return
    body.end()


def _feed(resp: httpx.Response, reply: llm.Reply, deadline: float, req: llm.Request) -> None:
    body = _Body(reply)
    for text in resp.iter_text():
        if body.take(text):
            return
        if time.monotonic() > deadline:
            raise llm._overran(req)
    body.end()


class _Body:
    """A streamed body fed into a Reply, piece by piece, up to relay.MAX_ANSWER_BYTES."""

    def __init__(self, reply: llm.Reply):
        self.reply, self.split, self.size = reply, sse.Lines(), 0

    def take(self, text: str) -> bool:
        """Feed one piece; True once the answer is whole ([DONE] came). Raises Oversized."""
        self.size = relay.grown(self.size, len(text))
        for line in self.split.decode(text):
            self.reply.feed(line)
            if self.reply.done:
                return True
        return False

    def end(self) -> None:
        for line in self.split.flush():
            self.reply.feed(line)
        self.reply.close()


def _body(resp: httpx.Response, cap: int | None = None) -> bytes:
    """relay._body, blocking: the whole body, decoded (Oversized past MAX_ANSWER_BYTES), or
    with `cap` its first `cap` bytes."""
    parts, size = [], 0
    for piece in resp.iter_bytes():
        parts.append(piece)
        if cap is not None and size + len(piece) >= cap:
            return b"".join(parts)[:cap]
        size = relay.grown(size, len(piece))
    return b"".join(parts)


def _head(resp: httpx.Response, body: bytes) -> relaycall.Answer:
    """An error answer as the relay forwards it (what llm.status_error reads), with the
    start of its body: a body without end is never read whole."""
    answer = relaycall.Answer({"status": resp.status_code, "reason": resp.reason_phrase,
                               "headers": list(resp.headers.items())})
    answer.content = body
    return answer
