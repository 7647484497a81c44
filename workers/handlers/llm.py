"""`llm.chat`: one chat completion from an OpenAI-compatible server, streamed.

Owns the wire format of `POST {base_url}/chat/completions` with `stream: true` (llama.cpp's
server, Ollama, vLLM, hosted APIs), turning what the server does into a task outcome:
a result {text, finish_reason, usage, model, and tool_calls when the model called tools};
`Retry` for 429/503 with Retry-After (no attempt spent); a retryable error for other 5xx,
a lost connection or a malformed body; `Fail` (no retry) for any other 4xx, with the
server's message; `Fail(outcome="timeout")` when the stream stalls longer than
`stall_timeout_s`. Settings come from the payload, else the task's `[llm]` section
(`ctx.config["llm"]`); `tools`, `tool_choice`, `parallel_tool_calls`, `max_tokens` and
`max_completion_tokens` at the payload's top level (or in its `options`) go into the
request as given. Which of the config file, the
TASKVISOR_LLM__* variables and the defaults fills that section is decided by
`supervisor.config` alone: this module applies no environment or default of its own.
The API key is read from the environment variable *named* by api_key_env, at call time,
and is never put in a result, an error message or a log line.
Under a supervisor ([llm] relay = true, the default) the HTTP exchange itself is handed to
the supervisor's model-call relay (workers.handlers.llmrelay, over workers.relaycall to
workers.relay): the task keeps the attempt, the outcome and the exceptions, which are the
same on both paths, and touches no httpx object (a few hundred KiB per call instead of
~4.5 MiB). For the task's own context (or none) the relay also reads the answer with the
same Reply and makes the stream, progress and spend lines the context would have sent
(workers.handlers.llmreports); the task writes them to its report channel unread.
Without a relay (a handler run outside a supervisor, relay = false, or a relay that cannot
be reached at connect time) the call is made here.
Runs in task processes; preload it: its import (and, when no relay is named, that of
workers.handlers.llmhttp: httpx, its transport stack and one TLS context, ~0.1 s) is then
paid once by the fork server instead of by every task.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

import workers.stream  # noqa: F401 - what ctx.stream imports at its first call: once, here
from workers import Retry, relaycall, task, warm_up
from workers.context import TaskContext
from workers.handlers import Fail
from workers.handlers.llmtools import ToolCalls

# Progress ("N tokens, R tok/s", also a heartbeat) at most this often, as the shell task's:
# the streamed text is the live signal; each progress line is parsed and stored by the
# supervisor (at 0.5 s it was 6 of a 3 s call's ~21 report lines).
PROGRESS_EVERY_S = 1.0
RELAY_GRACE_S = 5.0           # past stall_timeout_s with no frame, the relay itself is stuck
_RESERVED = frozenset({"messages", "stream", "stream_options"})
# From the payload's top level, as given (or from its options, not both): function calling,
# and the output caps the client's token estimate reads at either place.
_PASSED = ("tools", "tool_choice", "parallel_tool_calls", "max_tokens", "max_completion_tokens")


class LlmError(Exception):
    """A retryable failure (spends an attempt, retried with backoff)."""


class LlmUnavailable(LlmError):
    """The server could not be reached, or the connection broke."""


class LlmServerError(LlmError):
    """A 5xx (or a 429/503 without Retry-After)."""


class MalformedReply(LlmError):
    """The body is not the OpenAI wire format."""


class LlmRejected(Fail):
    """A 4xx other than 429 (or a payload we cannot send): retrying would not help."""

    def __init__(self, message: str):
        super().__init__(message, retryable=False, outcome="error")


class LlmStalled(Fail):
    """No data for longer than stall_timeout_s, or past request_timeout_s: a timeout."""

    def __init__(self, message: str):
        super().__init__(message, retryable=True, outcome="timeout")


class Request:
    """One call's HTTP request (a plain class: dataclasses would import inspect and ast
    into the fork server, and every module it holds costs each task process pages)."""
    __slots__ = ("url", "body", "headers", "request_timeout_s", "stall_timeout_s")

    def __init__(self, url: str, body: dict, headers: dict, request_timeout_s: float,
                 stall_timeout_s: float):
        self.url, self.body, self.headers = url, body, headers
        self.request_timeout_s, self.stall_timeout_s = request_timeout_s, stall_timeout_s


def build_request(payload: Mapping, ctx: object = None,
                  env: Mapping[str, str] | None = None) -> Request:
    """The HTTP request for one payload. Raises LlmRejected for a payload or config that
    no retry can fix (no base_url, no messages, a bad option)."""
    env = os.environ if env is None else env
    if not _is_map(payload):
        raise LlmRejected("llm.chat payload must be a JSON object")
    section = ((getattr(ctx, "config", None) or {}).get("llm") or {})

    def setting(key: str, from_payload: bool = True):
        if from_payload and payload.get(key) is not None:
            return payload[key]
        return section.get(key)

    base_url = setting("base_url")
    configured = setting("base_url", from_payload=False)
    if not base_url:
        raise LlmRejected("no model server: set [llm] base_url in the config (or "
                          "TASKVISOR_LLM__BASE_URL in the supervisor's environment), "
                          "or give base_url in the payload, e.g. http://127.0.0.1:8080/v1")
    scheme, netloc = _split(str(base_url))
    if scheme not in ("http", "https"):
        raise LlmRejected(f"base_url must be an http:// or https:// URL, got {base_url!r}")
    if not _host_port_ok(netloc):
        raise LlmRejected(f"base_url {base_url!r} names no usable host and port "
                          f"(a port is 1-65535)")
    messages = _messages(payload)
    options = payload.get("options") or {}
    if not _is_map(options):
        raise LlmRejected("llm.chat payload 'options' must be an object "
                          "(e.g. {\"temperature\": 0.2, \"max_tokens\": 256})")
    clash = sorted(_RESERVED & set(options))
    if clash:
        raise LlmRejected(f"llm.chat 'options' must not set {', '.join(clash)}")
    body: dict = {**options, "messages": messages, "stream": True,
                            "stream_options": {"include_usage": True}}
    for key in _PASSED:  # at the top, like messages, or in options
        if payload.get(key) is not None:
            if key in options:
                raise LlmRejected(f"llm.chat payload gives '{key}' twice: at its top level "
                                  f"and in 'options'; give it once")
            body[key] = payload[key]
    model = setting("model")
    if model:
        body["model"] = str(model)
    headers = {"Accept": "text/event-stream"}
    key_env = setting("api_key_env", from_payload=False)
    key = env.get(str(key_env)) if key_env else None
    # A payload may point at another server; the configured key goes only to the
    # configured server, so whoever can enqueue cannot have it sent elsewhere.
    if key and (not configured or _origin(base_url) == _origin(configured)):
        headers["Authorization"] = f"Bearer {key}"
    if setting("request_timeout_s") is None or setting("stall_timeout_s") is None:
        raise LlmRejected("request_timeout_s and stall_timeout_s are not set: the [llm] section "
                          "of the config gives them (ctx.config['llm']); outside a supervisor, "
                          "give them in the payload")
    try:
        request_s = float(setting("request_timeout_s"))
        stall_s = float(setting("stall_timeout_s"))
    except (TypeError, ValueError):
        raise LlmRejected("request_timeout_s and stall_timeout_s must be numbers of seconds") from None
    if not (request_s > 0 and stall_s > 0 and math.isfinite(request_s) and math.isfinite(stall_s)):
        raise LlmRejected("request_timeout_s and stall_timeout_s must be > 0")
    return Request(str(base_url).rstrip("/") + "/chat/completions", body, headers, request_s, stall_s)


def _is_map(value: object) -> bool:
    """isinstance(value, Mapping), without the ABC's machinery for the dicts JSON gives
    (its caches are written at each check: pages copied in every task process)."""
    return type(value) is dict or isinstance(value, Mapping)


def _messages(payload: Mapping) -> list:
    messages = payload.get("messages")
    if messages is None and isinstance(payload.get("prompt"), str):
        messages = [{"role": "user", "content": payload["prompt"]}]
        if isinstance(payload.get("system"), str):
            messages.insert(0, {"role": "system", "content": payload["system"]})
    if not isinstance(messages, list) or not messages or not all(
            _is_map(m) and "role" in m for m in messages):
        raise LlmRejected("llm.chat payload needs 'messages': a non-empty list of "
                          "{\"role\": ..., \"content\": ...} (or a 'prompt' string)")
    return messages


def _origin(url: str) -> tuple:
    """(scheme, host[:port]) in lower case: the configured key goes only where this is
    the configured server's, written the same way (stricter than urlsplit's host and port:
    "h:80" is not "h"; a key is never sent by mistake)."""
    scheme, netloc = _split(str(url))
    return scheme, netloc.rpartition("@")[2].lower()


def _host_port_ok(netloc: str) -> bool:
    """Whether a URL's netloc names a host and, if any, a port 1-65535, with no white
    space: a URL that fails this reached httpx, which raised a bare exception group (an
    async call) or a connection error (retried), though no retry can fix the URL."""
    hostport = netloc.rpartition("@")[2]
    if hostport.startswith("["):
        host, bracket, port = hostport[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return False
        port = port[1:]
    else:
        host, _, port = hostport.partition(":")
    if not host or any(c.isspace() or not c.isprintable() for c in hostport):
        return False
    return not port or (port.isascii() and port.isdigit() and 0 < int(port) < 65536)


def _split(url: str) -> tuple[str, str]:
    """(scheme, netloc) of a URL, as urllib.parse.urlsplit gives them (scheme in lower
    case), without importing urllib into every task process."""
    scheme, colon, rest = url.partition(":")
    if not colon or not scheme[:1].isalpha() or not all(
            c.isascii() and (c.isalnum() or c in "+-.") for c in scheme):
        return "", ""
    if not rest.startswith("//"):
        return scheme.lower(), ""
    rest = rest[2:]
    ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
    return scheme.lower(), rest[:min(ends)] if ends else rest


def retry_after_s(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date; None if
    absent or unreadable. `now` is epoch seconds."""
    if not value:
        return None
    import email.utils  # here: only a refusal reads it (every module the fork server holds
    # makes each task process dirty more pages: asyncio alone cost each one ~0.45 MiB)
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - now
    return max(0.0, seconds) if math.isfinite(seconds) else None


def status_error(response: object, url: str, pause: tuple[str, ...] = ()) -> BaseException:
    """The exception for an HTTP error status (the body must have been read; `response`:
    an httpx.Response, or the relay's relaycall.Answer, which reads the same). A 429 or
    503 with Retry-After also pauses the limits in `pause` (the task type's: the
    provider's budget) for that long, so no other task of theirs hits the same wall."""
    code = response.status_code
    message = server_message(response)
    where = f"HTTP {code} from {url}: {message}"
    if code in (429, 503):
        delay = retry_after_s(response.headers.get("retry-after"), time.time())
        if delay is not None:
            return Retry(delay, f"{where} (Retry-After: run again in {delay:.3g}s)",
                         pause_limit=list(pause) or None)
    if code >= 500 or code in (408, 429):
        return LlmServerError(where)
    return LlmRejected(where)


def server_message(response: object) -> str:
    """The server's own words: OpenAI's {"error": {"message"}}, {"error": "..."},
    FastAPI's {"detail"}, else the start of the body."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if _is_map(data):
        err = data.get("error")
        if _is_map(err) and err.get("message"):
            return str(err["message"])[:2000]
        for key in ("error", "detail", "message"):
            if isinstance(data.get(key), str):
                return data[key][:2000]
    text = response.text.strip()
    return text[:2000] if text else response.reason_phrase or "(empty body)"


class Reply:
    """Accumulates a streamed reply from SSE lines; reports progress on `ctx`.

    Server-sent events: `data:` lines are joined until a blank line ends the event;
    comments (`: keep-alive`) count as bytes but not as progress, so a server that only
    pings still stalls.

    Tool calls (function calling) are the first choice's, assembled by
    workers.handlers.llmtools; each argument piece counts as a token, like a content piece
    (progress, the stall message, usage estimated without the server's); only content goes
    to ctx.stream. With n > 1 choices the text joins every choice's content in arrival
    order (as it always has), but the tool calls are the first choice's only: one
    answer's calls to run, never calls of alternative answers mixed."""

    def __init__(self, ctx: object, stall_timeout_s: float, max_tokens: int | None):
        self.ctx = ctx
        self.stream = getattr(ctx, "stream", None)  # ctx.stream, batched in the task process
        self.pending: list[str] | None = None  # batch_stream(): held until flush_stream()
        self.stall_timeout_s = stall_timeout_s
        self.max_tokens = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None
        self.parts: list[str] = []
        self.chunks = 0                     # content and tool-call argument deltas, ~a token each
        self.calls: ToolCalls | None = None  # the first choice's tool calls, once any came
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.model: str | None = None
        self.done = False
        self.started_mono = self.last_data_mono = time.monotonic()
        self.progress_mono = 0.0
        self._data: list[str] = []

    def feed(self, line: str) -> None:
        """One line of the body (without its newline). Raises MalformedReply, LlmStalled.
        Once `done` ([DONE] came) the answer is whole: the caller stops reading, since a
        server or proxy may hold the connection open after it (waiting for its end turned
        a complete answer into a stall, retried)."""
        now = time.monotonic()
        if now - self.last_data_mono > self.stall_timeout_s:
            raise self.stalled(now)
        if line == "":
            self._dispatch()
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            if field == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)

    def close(self) -> None:
        """The body ended; an event without its blank line still counts."""
        self._dispatch()

    def stalled(self, now: float | None = None) -> LlmStalled:
        gap = (now or time.monotonic()) - self.last_data_mono
        return LlmStalled(f"the model stream stalled: no data for {gap:.1f}s (stall_timeout_s="
                          f"{self.stall_timeout_s:g}) after {self.chunks} token(s)")

    def _dispatch(self) -> None:
        if not self._data:
            return
        data, self._data = "\n".join(self._data), []
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise MalformedReply(f"the server sent a stream event that is not JSON: {data[:200]!r}") from None
        self.add(chunk)

    def add(self, chunk: object) -> None:
        """One chat.completion.chunk object."""
        if not _is_map(chunk):
            raise MalformedReply(f"expected a chat.completion.chunk object, got {str(chunk)[:200]!r}")
        if chunk.get("error"):
            err = chunk["error"]
            text = err.get("message") if _is_map(err) else err
            raise LlmServerError(f"the server reported an error mid-stream: {str(text)[:2000]}")
        choices = chunk.get("choices") or []
        if not isinstance(choices, list) or not all(_is_map(c) for c in choices):
            raise MalformedReply(f"'choices' is not a list of objects: {str(choices)[:200]!r}")
        self.model = chunk.get("model") or self.model
        for choice in choices:
            delta = choice.get("delta") or choice.get("message") or {}
            if not _is_map(delta):
                delta = {}
            content = delta.get("content")
            if delta.get("tool_calls") is not None and _first(choice):
                if self.calls is None:
                    self.calls = ToolCalls()
                try:
                    self.chunks += self.calls.add(delta["tool_calls"], whole="delta" not in choice)
                except ValueError as exc:
                    raise MalformedReply(str(exc)) from None
            if isinstance(content, str) and content:
                self.parts.append(content)
                self.chunks += 1
                if self.pending is not None:
                    self.pending.append(content)
                elif self.stream is not None:
                    self.stream(content)  # live to clients: output events, /output
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if _is_map(chunk.get("usage")):
            self.usage = dict(chunk["usage"])
        self.last_data_mono = time.monotonic()
        self._progress(self.last_data_mono)

    def batch_stream(self) -> None:
        """Hold streamed text until flush_stream(), which sends it at once: one piece per
        read from the network instead of ctx.stream's 20 ms flusher thread (~1 MiB of a
        task process). Only for a TaskContext (its stream takes flush=)."""
        if isinstance(self.ctx, TaskContext):
            self.pending = []

    def flush_stream(self) -> None:
        if self.pending:
            text, self.pending = "".join(self.pending), []
            self.stream(text, flush=True)

    def _progress(self, now: float) -> None:
        if self.ctx is None or now - self.progress_mono < PROGRESS_EVERY_S:
            return
        self.progress_mono = now
        rate = self.chunks / max(now - self.started_mono, 1e-3)
        fraction = min(0.99, self.chunks / self.max_tokens) if self.max_tokens else None
        self.ctx.progress(fraction, f"{self.chunks} tokens, {rate:.1f} tok/s")

    def result(self, requested_model: str | None) -> dict:
        if not self.done and self.finish_reason is None:
            raise MalformedReply(f"the response ended before the model finished (no [DONE] and "
                                 f"no finish_reason after {self.chunks} token(s))")
        usage = self.usage or {}
        prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        estimated = completion is None
        completion = self.chunks if completion is None else completion
        total = _count(usage.get("total_tokens"))
        if total is None and prompt is not None:
            total = prompt + completion
        out_usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
        if estimated:
            out_usage["estimated"] = True  # the server sent no usage: content (and argument) chunks counted
        elapsed = time.monotonic() - self.started_mono
        if self.ctx is not None:
            self.ctx.progress(1.0, f"done: {completion} tokens in {elapsed:.1f}s")
        out = {"text": "".join(self.parts), "finish_reason": self.finish_reason,
               "usage": out_usage, "model": self.model or requested_model}
        if self.calls:
            out["tool_calls"] = self.calls.result()  # only when the model made any
        return out


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _cap(body: Mapping) -> object:
    """The request's output cap in tokens, the larger of max_tokens and the newer
    max_completion_tokens (as the token estimate takes it): the progress fraction's
    denominator."""
    caps = [cap for cap in (body.get("max_tokens"), body.get("max_completion_tokens"))
            if type(cap) is int and cap > 0]
    return max(caps) if caps else None


def _first(choice: Mapping) -> bool:
    """Whether a choice is the first (index 0, or no index: a server of one choice)."""
    index = choice.get("index")
    return index is None or (type(index) is int and index == 0)


def _error_of(kind: str, name: str, message: str, req: Request, reply: Reply | None) -> BaseException:
    """The exception for a failed exchange, by the relay protocol's kind (workers.relay):
    the same whether the call was made here or by the relay ("raised": one of RAISED, by
    name, that the relay's parse of the answer raised)."""
    if kind == "raised" and name in RAISED:
        return RAISED[name](message)
    if kind == "stalled":
        return reply.stalled() if reply is not None else LlmStalled(
            f"no response from {req.url} within stall_timeout_s={req.stall_timeout_s:g}s")
    if kind == "overran":
        return _overran(req)
    if kind == "oversized":
        return MalformedReply(f"the answer of {req.url} is {message}")
    if kind == "unsupported":
        return LlmRejected(f"cannot use {req.url}: {message}")
    if kind == "decoding":
        return MalformedReply(f"cannot decode the response of {req.url}: {message}")
    what = "connect to" if kind == "connect" else "talk to"
    return LlmUnavailable(f"cannot {what} {req.url}: {name}: {message or 'no detail'}")


def _overran(req: Request) -> LlmStalled:
    return LlmStalled(f"the request ran past request_timeout_s={req.request_timeout_s:g}s")


def asking(model: str | None, url: str) -> str:
    """The progress message a call starts with."""
    return f"asking {model or 'the default model'} at {_split(url)[1]}"


def _start(req: Request, ctx: object) -> Reply:
    if ctx is not None:
        ctx.progress(0.0, asking(req.body.get("model"), req.url))
    return Reply(ctx, req.stall_timeout_s, _cap(req.body))


# The exceptions the model-call relay may raise for a task when it reads the answer
# itself (workers.handlers.llmreports), by class name.
RAISED = {cls.__name__: cls for cls in (MalformedReply, LlmServerError, LlmStalled,
                                        LlmRejected, LlmUnavailable)}


def _finish_json(reply: Reply, data: bytes) -> None:
    """A server that ignored stream: true and answered with one JSON object: a
    chat.completion, with its choices (a 200 without them, a proxy's {"detail": ...} say,
    is no answer: it was a success with empty text)."""
    try:
        whole = json.loads(data)
    except ValueError:
        raise MalformedReply(f"the response is not JSON: {data[:200]!r}") from None
    reply.add(whole)  # raises the server's own {"error": ...} first
    if not whole.get("choices"):
        raise MalformedReply(f"the response is JSON but not a chat completion (no choices): "
                             f"{data[:200]!r}")
    reply.done = True


async def chat(payload: Mapping, ctx: object = None) -> dict:
    """One call, for async handlers (`await llm.chat(payload, ctx)`). See the module
    docstring for outcomes."""
    req = build_request(payload, ctx)
    sock = relaycall.connect()
    if sock is not None and llmrelay.parses(ctx):  # the relay reads the answer too
        return await llmrelay.chat_parsed(sock, req, ctx)
    reply = _start(req, ctx)
    if sock is not None:  # the relay makes the HTTP exchange (workers.relay)
        await llmrelay.chat(sock, req, reply, ctx)
    else:
        await _direct().chat(req, reply, ctx)
    return _spend(ctx, reply.result(req.body.get("model")))


def chat_sync(payload: Mapping, ctx: object = None) -> dict:
    """The same call, blocking: for plain (non-async) handlers that ask a model, and the
    `llm.chat` task type itself."""
    req = build_request(payload, ctx)
    sock = relaycall.connect()
    if sock is not None and llmrelay.parses(ctx):  # the relay reads the answer too
        return llmrelay.chat_parsed_sync(sock, req, ctx)
    reply = _start(req, ctx)
    if sock is not None:  # the relay makes the HTTP exchange (workers.relay)
        llmrelay.chat_sync(sock, req, reply, ctx)
    else:
        _direct().chat_sync(req, reply, ctx)
    return _spend(ctx, reply.result(req.body.get("model")))


def _pause_keys(ctx: object, spent: int | None = None) -> tuple[str, ...]:
    """The limits a refusal pauses (the task type's); a refused call also reports that it
    used no tokens, so the estimate its claim was charged is given back."""
    if spent is not None and ctx is not None and hasattr(ctx, "spend"):
        ctx.spend(spent)
    return tuple(getattr(ctx, "type_limits", ()) or ())


def _spend(ctx: object, result: dict) -> dict:
    """Report the tokens the call used (the response's usage) to the task's limits."""
    total = (result.get("usage") or {}).get("total_tokens")
    if ctx is not None and hasattr(ctx, "spend") and isinstance(total, int) and total >= 0:
        ctx.spend(total)
    return result


@task("llm.chat")
def chat_task(payload: Mapping, ctx: object = None) -> dict:
    """The `llm.chat` task type: one blocking call. A task process makes one request, so
    an event loop buys it nothing and costs it CPU and memory (benchmarks/README.md)."""
    return chat_sync(payload, ctx)


def _direct():
    """The call made in this process (workers.handlers.llmhttp: httpx, its transports and a
    TLS context). Imported with this module, in the fork server, unless a relay is named:
    then task processes never touch httpx, and the fork server does not hold it (each task
    process forked from a fork server that held it cost ~0.6 MiB more, call or no call);
    a task that finds no relay then imports it at its first call."""
    from workers.handlers import llmhttp
    return llmhttp


from workers.handlers import llmrelay  # noqa: E402 - it uses this module's names

if not os.environ.get(relaycall.RELAY_ENV):
    _direct()
else:  # the fork server runs it once after the preload (never a task process)
    warm_up(llmrelay.warm_up)
