"""`llm.chat` against the fake OpenAI-compatible server in tests/support: first the handler
called directly with a fake context, then end to end through a real supervisor process,
checking each outcome the issue names (succeeded with usage, rescheduled on 429, retried
on 500, failed for good on 400, timeout on a stall, error on a malformed body). Each runs
on both paths: the call made in the calling process ("direct") and through the model-call
relay process (workers.relay; the supervisor's default). The relay's own guarantees (kill -9
of it or of a task, backpressure, keep-alive) are in tests/e2e/test_llm_relay.py."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import time
import urllib.request
from pathlib import Path

import pytest

from supervisor.config import load as load_config
from tests.support import wait_until
from tests.support.launcher import SupervisorProcess, supervisor_config
from tests.support.openai_server import FakeOpenAI, Flood, Json, Malformed, Silent, Stall, Status, Stream
from workers import Retry
from workers.handlers import Fail, llm

def llm_section(**over) -> dict:
    """[llm] as supervisor.config resolves it (the one owner of its precedence) with no
    file and no environment, plus `over`: what a supervisor hands the handler."""
    return {**dataclasses.asdict(load_config(None, env={}).llm), **over}


class FakeCtx:
    def __init__(self, config: dict | None = None):
        self.config = {**(config or {}), "llm": llm_section(**(config or {}).get("llm", {}))}
        self.events: list[tuple] = []

    def progress(self, fraction=None, message=None):
        self.events.append((fraction, message))

    def heartbeat(self):
        self.events.append(("heartbeat",))


@pytest.fixture(scope="module", params=["direct", "relay"])
def via(request):
    """The path a call takes: made in this process, or handed to a relay process (what a
    supervisor starts) named by TASKVISOR_LLM_RELAY_SOCKET."""
    from supervisor.relay import Relay
    patch = pytest.MonkeyPatch()
    relay = None
    try:
        if request.param == "relay":
            relay = Relay()
            relay.start(wait=True)
            patch.setenv("TASKVISOR_LLM_RELAY_SOCKET", relay.path)
        else:
            patch.delenv("TASKVISOR_LLM_RELAY_SOCKET", raising=False)
        yield relay
    finally:
        patch.undo()
        if relay is not None:
            relay.stop()


@pytest.fixture
def server(via):
    from workers import relaycall
    before = relaycall.fallbacks
    with FakeOpenAI() as srv:
        yield srv
    assert relaycall.fallbacks == before, "a call found no relay and went direct"
    if via is not None:
        assert via.pid is not None and via.sock is not None, "the relay died"


def run(payload, ctx=None):
    return asyncio.run(llm.chat(payload, ctx if ctx is not None else FakeCtx()))


# -- the handler called directly -----------------------------------------------------------

@pytest.mark.timeout(20)
def test_streams_text_usage_and_progress(server):
    server.default = Stream(text="alpha beta gamma delta epsilon zeta eta theta", delay_s=0.1)
    ctx = FakeCtx({"llm": {"base_url": server.base_url, "model": "m1"}})
    out = run({"messages": [{"role": "user", "content": "hi"}],
               "options": {"temperature": 0.2, "max_tokens": 16}}, ctx)
    assert out == {"text": "alpha beta gamma delta epsilon zeta eta theta", "finish_reason": "stop",
                   "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
                   "model": "m1"}
    body = server.requests[0]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "m1" and body["temperature"] == 0.2 and body["max_tokens"] == 16
    messages = [m for _, m in ctx.events]
    assert any("tokens" in (m or "") and "tok/s" in (m or "") for m in messages), messages
    assert ctx.events[-1][0] == 1.0
    fractions = [f for f, _ in ctx.events[1:-1] if f is not None]
    assert fractions == sorted(fractions) and all(0 <= f < 1 for f in fractions)
    assert len(ctx.events) < 8, "progress is throttled"


@pytest.mark.timeout(20)
def test_sync_variant_and_payload_overrides(server, monkeypatch):
    monkeypatch.setenv("TASKVISOR_LLM__BASE_URL", "http://127.0.0.1:9/v1")  # overridden
    out = llm.chat_sync({"prompt": "hi", "system": "be brief", "base_url": server.base_url,
                         "model": "from-payload"}, FakeCtx())
    assert out["text"] == "Hello from the fake model." and out["model"] == "from-payload"
    assert server.requests[0]["body"]["messages"] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.mark.timeout(20)
def test_api_key_from_the_named_variable_only_to_the_configured_server(server, monkeypatch):
    monkeypatch.setenv("MY_LLM_KEY", "sk-secret-123")
    ctx = FakeCtx({"llm": {"base_url": server.base_url, "api_key_env": "MY_LLM_KEY"}})
    run({"prompt": "hi"}, ctx)
    assert server.requests[-1]["headers"]["Authorization"] == "Bearer sk-secret-123"
    # the payload may not choose which variable is sent, nor send the key elsewhere
    with FakeOpenAI() as other:
        run({"prompt": "hi", "base_url": other.base_url, "api_key_env": "PATH"}, ctx)
        assert "Authorization" not in other.requests[0]["headers"]


@pytest.mark.timeout(20)
def test_the_handler_reads_no_environment_of_its_own(server, monkeypatch):
    """Precedence (file, TASKVISOR_LLM__*, defaults) is supervisor.config's alone: the
    handler sees only the payload and the section it is handed."""
    monkeypatch.setenv("TASKVISOR_LLM__BASE_URL", server.base_url)
    monkeypatch.setenv("TASKVISOR_LLM__MODEL", "from-env")
    with pytest.raises(Fail, match="no model server"):
        run({"prompt": "hi"}, FakeCtx())
    out = run({"prompt": "hi"}, FakeCtx({"llm": {"base_url": server.base_url, "model": "m2"}}))
    assert out["model"] == "m2" and len(server.requests) == 1
    # ...while the config resolves the variables into the section a supervisor hands over
    section = dataclasses.asdict(load_config(None).llm)
    assert section["base_url"] == server.base_url and section["model"] == "from-env"


@pytest.mark.timeout(20)
def test_usage_missing_is_estimated_and_json_answer_accepted(server):
    server.script(Stream(text="a b c", usage=False), Json(text="x y"))
    out = run({"prompt": "hi", "base_url": server.base_url})
    assert out["usage"] == {"prompt_tokens": None, "completion_tokens": 3, "total_tokens": None,
                            "estimated": True}
    out = run({"prompt": "hi", "base_url": server.base_url})
    assert out["text"] == "x y" and out["usage"]["total_tokens"] == 7


@pytest.mark.timeout(20)
def test_error_statuses_become_the_right_exceptions(server):
    payload = {"prompt": "hi", "base_url": server.base_url}
    server.script(Status(429, {"error": {"message": "rate limited"}}, {"Retry-After": "7"}))
    with pytest.raises(Retry) as info:
        run(payload)
    assert info.value.delay_s == 7 and "rate limited" in info.value.reason
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    server.script(Status(503, "overloaded", {"Retry-After": date}))
    with pytest.raises(Retry) as info:
        run(payload)
    assert 25 <= info.value.delay_s <= 31
    server.script(Status(500, {"error": {"message": "boom"}}))
    with pytest.raises(llm.LlmServerError, match="HTTP 500.*boom"):
        run(payload)
    server.script(Status(429, "slow down"))  # no Retry-After: an ordinary retryable error
    with pytest.raises(llm.LlmServerError, match="HTTP 429"):
        run(payload)
    server.script(Status(400, {"error": {"message": "model 'nope' does not exist"}}))
    with pytest.raises(Fail, match="HTTP 400.*model 'nope' does not exist") as info:
        run(payload)
    assert info.value.retryable is False and info.value.outcome == "error"
    server.script(Malformed())
    with pytest.raises(llm.MalformedReply, match="not JSON"):
        run(payload)
    server.script(Malformed(body="<html>502 Bad Gateway</html>", content_type="text/html"))
    with pytest.raises(llm.MalformedReply, match="ended before the model finished"):
        run(payload)


@pytest.mark.timeout(20)
def test_a_json_answer_that_is_not_a_chat_completion_is_malformed(server):
    """A 200 application/json body without choices (a proxy's {"detail": ...}, a status
    object) was a success with empty text: the task succeeded with no answer."""
    payload = {"prompt": "hi", "base_url": server.base_url, "request_timeout_s": 10,
               "stall_timeout_s": 5}
    for body in ({"detail": "Not authenticated"}, {"id": "x", "choices": []}):
        # no context: through a relay, the relay reads the answer (llmreports)
        for call in (run, lambda p: llm.chat_sync(p, FakeCtx()), llm.chat_sync):
            server.script(Status(200, body))
            with pytest.raises(llm.MalformedReply, match="not a chat completion"):
                call(payload)


@pytest.mark.timeout(20)
def test_an_answer_ends_at_done_even_if_the_server_keeps_the_connection_open(server):
    """A server (or a proxy) that sends data: [DONE] and then holds the connection: the
    complete answer became a stall timeout, retried (the call made twice)."""
    body = ('data: {"choices": [{"delta": {"content": "all here"}, "finish_reason": "stop"}]}\n\n'
            'data: [DONE]\n\n')
    for call in (run, lambda p: llm.chat_sync(p, FakeCtx()), llm.chat_sync):
        server.script(Malformed(body=body, hold_s=10))
        started = time.monotonic()
        out = call({"prompt": "hi", "base_url": server.base_url, "stall_timeout_s": 2,
                    "request_timeout_s": 10})
        assert out["text"] == "all here" and out["finish_reason"] == "stop"
        assert time.monotonic() - started < 1.5


@pytest.mark.timeout(20)
def test_stall_is_a_timeout_even_with_keepalive_comments(server):
    for stall in (Stall(tokens=2, hold_s=10), Stall(tokens=2, hold_s=10, ping_every_s=0.1)):
        server.script(stall)
        started = time.monotonic()
        with pytest.raises(Fail, match="stalled") as info:
            run({"prompt": "hi", "base_url": server.base_url, "stall_timeout_s": 0.6})
        assert info.value.outcome == "timeout" and info.value.retryable is True
        assert time.monotonic() - started < 3


@pytest.mark.timeout(30)
def test_request_timeout_shorter_than_the_stall_timeout_is_kept_on_every_path(server):
    """The blocking direct call bounded each read by stall_timeout_s alone: a server that
    never answered (or answered its headers and then nothing) held it for stall_timeout_s
    (8 s here) past request_timeout_s (1 s), where the async call and the relay end at 1 s."""
    payload = {"prompt": "hi", "base_url": server.base_url, "request_timeout_s": 1,
               "stall_timeout_s": 8}
    for behaviour in (Silent(hold_s=10), Stall(tokens=0, hold_s=10)):
        for call in (run, lambda p: llm.chat_sync(p, FakeCtx()), llm.chat_sync):
            server.script(behaviour)
            started = time.monotonic()
            with pytest.raises(llm.LlmStalled, match=r"request_timeout_s=1s") as info:
                call(payload)
            assert time.monotonic() - started < 2.5, behaviour
            assert info.value.outcome == "timeout" and info.value.retryable


@pytest.mark.timeout(20)
def test_connection_refused_is_retryable_and_bad_payloads_are_not(via):
    with pytest.raises(llm.LlmUnavailable, match="cannot connect"):
        run({"prompt": "hi", "base_url": "http://127.0.0.1:9/v1"})
    for payload, pattern in [({"prompt": "hi"}, "no model server"),
                             ({"base_url": "http://127.0.0.1:9/v1"}, "needs 'messages'"),
                             ({"prompt": "hi", "base_url": "ftp://x"}, "http:// or https://"),
                             ({"prompt": "x", "base_url": "http://h/v1", "options": {"stream": False}},
                              "must not set stream")]:
        with pytest.raises(Fail, match=pattern) as info:
            run(payload, FakeCtx())
        assert info.value.retryable is False


@pytest.mark.timeout(20)
@pytest.mark.parametrize("base_url", ["http://127.0.0.1:99999/v1", "http://127.0.0.1:0/v1",
                                      "http://127.0.0.1:80x/v1", "http://:8080/v1",
                                      "http://exa mple/v1"])
def test_a_base_url_that_cannot_be_a_server_fails_for_good_on_both_paths(via, base_url):
    """A port out of range escaped the async direct call as a bare ExceptionGroup (a
    traceback, retried) and came back from the relay as a retryable LlmUnavailable: no
    retry can fix the URL."""
    for call in (run, lambda p: llm.chat_sync(p, FakeCtx())):
        with pytest.raises(llm.LlmRejected, match="base_url") as info:
            call({"prompt": "hi", "base_url": base_url})
        assert info.value.retryable is False


def test_a_call_imports_nothing_the_preloaded_module_could_have(server, via):
    """What a task process would import at its first call (httpx's transport stack, a TLS
    context's certificates) is imported once by the fork server's preload: each task
    process otherwise paid ~110 ms CPU per call for it (benchmarks/README.md, "In flight")."""
    import json
    import subprocess
    import sys
    script = (
        "import asyncio, json, sys\n"
        "from workers.handlers import llm\n"
        "payload = {'base_url': sys.argv[1], 'messages': [{'role': 'user', 'content': 'hi'}],\n"
        "           'request_timeout_s': 30, 'stall_timeout_s': 30}\n"
        "before = set(sys.modules)\n"
        "text = asyncio.run(llm.chat(payload))['text']\n"
        "after_async = set(sys.modules)\n"
        "llm.chat_sync(payload)\n"
        "print(json.dumps({'text': text, 'async': sorted(after_async - before),\n"
        "                  'sync': sorted(set(sys.modules) - after_async)}))\n")
    # It inherits this process's environment: TASKVISOR_LLM_RELAY_SOCKET with `via`.
    out = subprocess.run([sys.executable, "-c", script, server.base_url], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["text"] == "Hello from the fake model."
    assert got["async"] == [] and got["sync"] == [], got


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
CALLS = [{"id": "call_w", "name": "get_weather", "arguments": '{"city": "Lisbon", "unit": "celsius"}'},
         {"id": "call_t", "name": "get_time", "arguments": '{"tz": "Europe/Lisbon"}'}]


def assembled(calls: list[dict]) -> list[dict]:
    """What the result's tool_calls hold for FakeOpenAI's `calls`: OpenAI's message shape."""
    return [{"id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


@pytest.mark.timeout(30)
def test_tool_calls_are_assembled_by_every_reader(server):
    """Streamed tool calls (arguments in 4-character pieces, the two calls interleaved) and
    a whole message's, read in this process (a plain context, through a relay or not) and
    by the relay for no context (llmreports); tools and tool_choice reach the server as
    given, from the payload's top level or from its options."""
    timeouts = {"request_timeout_s": 10, "stall_timeout_s": 5}  # for no context
    payload = {"prompt": "weather and time in Lisbon?", "base_url": server.base_url,
               "tools": TOOLS, "tool_choice": "auto", **timeouts}
    for call in (run, lambda p: llm.chat_sync(p, FakeCtx()), llm.chat_sync):
        server.script(Stream(text="Checking. ", tool_calls=CALLS, argument_chars=4,
                             finish_reason="tool_calls"))
        out = call(payload)
        assert out["tool_calls"] == assembled(CALLS)
        assert out["text"] == "Checking. " and out["finish_reason"] == "tool_calls"
        pieces = sum(-(-len(c["arguments"]) // 4) for c in CALLS)
        assert out["usage"]["completion_tokens"] == 1 + pieces
        body = server.requests[-1]["body"]
        assert body["tools"] == TOOLS and body["tool_choice"] == "auto"
        server.script(Json(text="", tool_calls=CALLS[:1]))
        options = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                   "parallel_tool_calls": False}
        out = call({"prompt": "weather?", "base_url": server.base_url, "options": options,
                    **timeouts})
        assert out["tool_calls"] == assembled(CALLS[:1]) and out["finish_reason"] == "tool_calls"
        body = server.requests[-1]["body"]
        assert {k: body[k] for k in options} == options
    server.script(Stream())
    assert "tool_calls" not in run({"prompt": "hi", "base_url": server.base_url})


@pytest.mark.timeout(30)
def test_text_holding_unicode_line_separators_comes_whole_to_every_reader(server):
    """A model's text with U+2028, U+2029 and U+0085 raw in the data line's JSON (as
    llama.cpp writes it): httpx's iter_lines cut the line there, the event was no longer
    JSON, and the answer failed as malformed on every attempt."""
    text = "one\u2028two\u2029three\x85four\r\nfive é€😀"
    timeouts = {"request_timeout_s": 10, "stall_timeout_s": 5}  # for no context
    payload = {"prompt": "x", "base_url": server.base_url, **timeouts}
    for call in (run, lambda p: llm.chat_sync(p, FakeCtx()), llm.chat_sync):
        server.script(Stream(text=text))
        assert call(payload)["text"] == text


@pytest.mark.timeout(120)
def test_an_answer_past_the_cap_fails_the_call_and_the_relay_goes_on(server):
    """A server gone wrong: a data line that never ends, or a JSON body without end. The
    call stops reading at relay.MAX_ANSWER_BYTES and fails as a malformed answer
    (retried), on both paths; the relay, which every call shares, keeps its memory and
    answers the next call. (It read on until the process ran out of memory.)"""
    from workers import relay as relay_mod
    timeouts = {"request_timeout_s": 60, "stall_timeout_s": 30}
    payload = {"prompt": "x", "base_url": server.base_url, **timeouts}
    over = relay_mod.MAX_ANSWER_BYTES + (8 << 20)
    for flood, call in ((Flood(event_bytes=1 << 20, total_bytes=over, line_ends=False), run),
                        (Flood(event_bytes=1 << 20, total_bytes=over, line_ends=False), llm.chat_sync),
                        (Flood(event_bytes=1 << 20, total_bytes=over, as_json=True),
                         lambda p: llm.chat_sync(p, FakeCtx()))):
        server.script(flood)
        with pytest.raises(llm.MalformedReply, match="over 64 MiB") as info:
            call(payload)
        server.script(Stream(text="still here"))
        assert call(payload)["text"] == "still here"


def test_tools_from_the_payload_or_its_options_go_into_the_body_as_given_once():
    """tools, tool_choice and parallel_tool_calls at the payload's top level (where
    messages are) were dropped: the model was asked without them."""
    choice = {"type": "function", "function": {"name": "get_weather"}}
    req = llm.build_request({"prompt": "x", "base_url": "http://h/v1", "tools": TOOLS,
                             "tool_choice": choice, "parallel_tool_calls": False}, FakeCtx())
    assert req.body["tools"] == TOOLS and req.body["tool_choice"] == choice
    assert req.body["parallel_tool_calls"] is False
    req = llm.build_request({"prompt": "x", "base_url": "http://h/v1", "tools": None,
                             "options": {"tools": TOOLS, "tool_choice": "none"}}, FakeCtx())
    assert req.body["tools"] == TOOLS and req.body["tool_choice"] == "none"
    with pytest.raises(llm.LlmRejected, match="'tools' twice") as info:
        llm.build_request({"prompt": "x", "base_url": "http://h/v1", "tools": TOOLS,
                           "options": {"tools": TOOLS}}, FakeCtx())
    assert info.value.retryable is False


def test_a_top_level_output_cap_is_sent_as_the_estimate_reads_it():
    """The client's token estimate reads max_tokens at the payload's top level too; the
    call dropped it there, so the model could produce more than the limit reserved."""
    req = llm.build_request({"prompt": "x", "base_url": "http://h/v1", "max_tokens": 300}, FakeCtx())
    assert req.body["max_tokens"] == 300
    req = llm.build_request({"prompt": "x", "base_url": "http://h/v1",
                             "max_completion_tokens": 50}, FakeCtx())
    assert req.body["max_completion_tokens"] == 50 and llm._cap(req.body) == 50
    with pytest.raises(llm.LlmRejected, match="'max_tokens' twice"):
        llm.build_request({"prompt": "x", "base_url": "http://h/v1", "max_tokens": 3,
                           "options": {"max_tokens": 3}}, FakeCtx())


def test_retry_after_parsing():
    now = 1_800_000_000.0
    assert llm.retry_after_s("120", now) == 120
    assert llm.retry_after_s(" 1.5 ", now) == 1.5
    assert llm.retry_after_s("-3", now) == 0
    assert llm.retry_after_s(email.utils.formatdate(now + 60, usegmt=True), now) == pytest.approx(60)
    assert llm.retry_after_s(email.utils.formatdate(now - 60, usegmt=True), now) == 0
    for bad in (None, "", "soon", "nan", "inf"):
        assert llm.retry_after_s(bad, now) is None


def test_sse_events_spanning_lines_and_comments():
    reply = llm.Reply(None, stall_timeout_s=5, max_tokens=None)
    for line in [": hello", "event: message", 'data: {"choices": [{"delta":', 'data: {"content": "hi"}}]}',
                 "", 'data: {"choices": [{"delta": {}, "finish_reason": "length"}]}', ""]:
        reply.feed(line)
    reply.close()
    out = reply.result("m")
    assert out["text"] == "hi" and out["finish_reason"] == "length"


# -- end to end through a real supervisor ----------------------------------------------------

@pytest.fixture(scope="module")
def fake_llm():
    with FakeOpenAI() as srv:
        yield srv


@pytest.fixture(scope="module", params=["hosted", "relay", "direct"])
def sup(request, tmp_path_factory, fake_llm):
    """A supervisor whose llm.chat attempts run in its relay (the default: no process
    each), run in task processes that call through the relay (run_in_relay = false), or
    in task processes that make their calls themselves (relay = false)."""
    tmp = tmp_path_factory.mktemp("llm-e2e")
    relay = request.param != "direct"
    env = {"TASKVISOR_LLM__BASE_URL": fake_llm.base_url, "TASKVISOR_LLM__API_KEY_ENV": "E2E_LLM_KEY",
           "E2E_LLM_KEY": "sk-e2e-secret", "TASKVISOR_LLM__RELAY": str(relay).lower(),
           "TASKVISOR_LLM__RUN_IN_RELAY": str(request.param == "hosted").lower()}
    with SupervisorProcess(tmp, supervisor_config(["workers.handlers.llm"]), env=env) as proc:
        proc.wait_ready()
        assert ("model-call relay" in proc.log() and "ready on" in proc.log()) == relay
        proc.llm_path = request.param
        yield proc
    assert ("cannot be reached" in proc.log()) is False, "a task found no relay"


@pytest.fixture
def llm_server(fake_llm):
    fake_llm.reset()
    yield fake_llm
    fake_llm.reset()


def outcomes(task) -> list[str]:
    return [a.outcome for a in task.history]


@pytest.mark.timeout(60)
def test_e2e_succeeds_with_usage_and_live_progress(sup, llm_server):
    llm_server.default = Stream(text=" ".join(f"w{i}" for i in range(30)), delay_s=0.08)
    task_id = sup.queue.enqueue("llm.chat", {"prompt": "count", "options": {"max_tokens": 40}})
    seen = wait_until(lambda: (t := sup.queue.get(task_id)).progress_message
                      and "tokens" in t.progress_message and t.progress_message, timeout=20)
    task = sup.wait(task_id)
    assert task.status == "succeeded", task.error
    assert task.result["usage"] == {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
    assert task.result["text"].startswith("w0 w1") and task.result["finish_reason"] == "stop"
    assert "tok/s" in seen or "done" in seen
    assert llm_server.requests[0]["headers"]["Authorization"] == "Bearer sk-e2e-secret"
    assert "sk-e2e-secret" not in sup.log()
    # ctx.stream: the tokens reached the attempt's output, in order, on both paths
    from supervisor.store import Store
    store = Store(str(sup.dir / "taskvisor.db"))
    try:
        assert store.read_output(task_id).text == task.result["text"]
    finally:
        store.close()


@pytest.mark.timeout(60)
def test_e2e_429_with_retry_after_reschedules_without_spending_an_attempt(sup, llm_server):
    llm_server.script(Status(429, {"error": {"message": "rate limit"}}, {"Retry-After": "1"}))
    started = time.time()
    task = sup.wait(sup.queue.enqueue("llm.chat", {"prompt": "hi"}, max_attempts=1))
    assert task.status == "succeeded", (task.error, outcomes(task))
    assert outcomes(task) == ["rescheduled", "succeeded"]
    assert time.time() - started >= 0.9  # the server's Retry-After was honoured
    assert task.attempts == 1


@pytest.mark.timeout(60)
def test_e2e_500_is_retried_with_backoff(sup, llm_server):
    llm_server.script(Status(500, {"error": {"message": "upstream exploded"}}))
    task = sup.wait(sup.queue.enqueue("llm.chat", {"prompt": "hi"}))
    assert task.status == "succeeded"
    assert outcomes(task) == ["error", "succeeded"]
    assert "upstream exploded" in task.history[0].reason


@pytest.mark.timeout(60)
def test_e2e_400_fails_for_good_with_the_servers_message(sup, llm_server):
    llm_server.script(Status(400, {"error": {"message": "model 'nope' not found",
                                             "type": "invalid_request_error"}}))
    task = sup.wait(sup.queue.enqueue("llm.chat", {"prompt": "hi", "model": "nope"}, max_attempts=3))
    assert task.status == "failed" and task.outcome == "error"
    assert task.attempts == 1, "a 400 is not retried"
    assert "model 'nope' not found" in task.error


@pytest.mark.timeout(60)
def test_e2e_stalled_stream_is_a_timeout(sup, llm_server):
    llm_server.script(Stall(tokens=3, hold_s=20))
    task = sup.wait(sup.queue.enqueue("llm.chat", {"prompt": "hi", "stall_timeout_s": 1},
                                      max_attempts=1))
    assert task.status == "failed" and task.outcome == "timeout", task.error
    assert "stalled" in task.error


@pytest.mark.timeout(60)
def test_e2e_malformed_body_is_an_error(sup, llm_server):
    llm_server.script(Malformed())
    task = sup.wait(sup.queue.enqueue("llm.chat", {"prompt": "hi"}, max_attempts=1))
    assert task.status == "failed" and task.outcome == "error"
    assert "MalformedReply" in task.error and "not JSON" in task.error


@pytest.mark.timeout(60)
def test_e2e_tool_calls_reach_the_result(sup, llm_server):
    """A model answering with tool calls (streamed: the arguments in pieces, two calls
    interleaved by index) through a real supervisor, on both paths: the result holds them
    whole, in OpenAI's message shape; the attempt's output holds only the text."""
    llm_server.script(Stream(text="Let me check. ", tool_calls=CALLS, argument_chars=5,
                             finish_reason="tool_calls"))
    task_id = sup.queue.enqueue("llm.chat", {
        "messages": [{"role": "user", "content": "weather and time in Lisbon?"}],
        "tools": TOOLS, "tool_choice": "required"})
    task = sup.wait(task_id)
    assert task.status == "succeeded", task.error
    assert task.result["tool_calls"] == assembled(CALLS)
    assert task.result["text"] == "Let me check. " and task.result["finish_reason"] == "tool_calls"
    body = llm_server.requests[0]["body"]
    assert body["tools"] == TOOLS and body["tool_choice"] == "required"
    from supervisor.store import Store
    store = Store(str(sup.dir / "taskvisor.db"))
    try:
        assert store.read_output(task_id).text == "Let me check. "
    finally:
        store.close()
    # a plain answer's result is as it always was: no tool_calls key
    task = sup.wait(sup.queue.enqueue("llm.chat", {"prompt": "hi", "tools": TOOLS}))
    assert task.status == "succeeded" and "tool_calls" not in task.result, task.result


@pytest.mark.timeout(60)
def test_e2e_cancel_mid_stream(sup, llm_server):
    llm_server.default = Stream(text=" ".join(["word"] * 200), delay_s=0.1)
    task_id = sup.queue.enqueue("llm.chat", {"prompt": "a long answer please"})
    wait_until(lambda: "tokens" in (sup.queue.get(task_id).progress_message or ""), timeout=20)
    sup.queue.cancel(task_id)
    task = sup.wait(task_id)
    assert task.status == "cancelled" and task.outcome == "cancelled"


@pytest.mark.timeout(60)
def test_e2e_llm_section_of_the_config_file_reaches_the_handler(tmp_path):
    with FakeOpenAI(Stream(text="configured")) as srv:
        toml = supervisor_config(["workers.handlers.llm"], extra=(
            f'[llm]\nbase_url = "{srv.base_url}"\nmodel = "from-config"\n'))
        with SupervisorProcess(tmp_path, toml) as proc:
            task = proc.wait(proc.queue.enqueue("llm.chat", {"prompt": "hi"}))
        assert task.status == "succeeded", task.error
        assert task.result["text"] == "configured" and task.result["model"] == "from-config"


@pytest.mark.timeout(60)
def test_e2e_token_usage_reaches_the_metrics(tmp_path):
    with FakeOpenAI(Stream(text="one two three")) as srv:
        toml = supervisor_config(["workers.handlers.llm"]).replace(
            'listen = ""', 'listen = "127.0.0.1:0"')
        with SupervisorProcess(tmp_path, toml, env={"TASKVISOR_LLM__BASE_URL": srv.base_url}) as proc:
            for _ in range(2):
                task = proc.wait(proc.queue.enqueue("llm.chat", {"prompt": "hi"}))
                assert task.status == "succeeded", task.error
            text = urllib.request.urlopen(proc.http_url + "metrics", timeout=10).read().decode()
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
             for line in text.splitlines() if line.startswith("taskvisor_llm_tokens_total{")}
    assert lines == {'taskvisor_llm_tokens_total{kind="prompt",type="llm.chat"}': 24.0,
                     'taskvisor_llm_tokens_total{kind="completion",type="llm.chat"}': 6.0}, lines
