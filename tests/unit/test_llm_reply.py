"""llm.Reply read in-process (no fork, no disk, no server): the tool calls of a streamed
chat completion (`delta.tool_calls`) and of a whole one (`message.tool_calls`), assembled
in OpenAI's message shape; what it refuses, by the field at fault. The same Reply runs in
the task process and in the model-call relay (tests/e2e/test_llm.py runs both paths)."""

from __future__ import annotations

import json

import pytest

from workers.handlers import llm


class Ctx:
    def __init__(self):
        self.events: list[tuple] = []

    def progress(self, fraction=None, message=None):
        self.events.append((fraction, message))


def reply_of(*chunks, ctx=None) -> llm.Reply:
    """A Reply fed `chunks` as server-sent events, then data: [DONE]."""
    reply = llm.Reply(ctx, stall_timeout_s=30, max_tokens=None)
    for chunk in chunks:
        reply.feed("data: " + json.dumps(chunk))
        reply.feed("")
    reply.feed("data: [DONE]")
    reply.feed("")
    return reply


def delta(choice_index: int = 0, finish_reason=None, **fields) -> dict:
    return {"object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": choice_index, "delta": fields, "finish_reason": finish_reason}]}


def piece(index: int, arguments: str | None = None, **first) -> dict:
    """One tool_calls item: `first` holds id, type, name for a call's first piece."""
    item: dict = {"index": index}
    if "id" in first:
        item["id"] = first["id"]
    if "type" in first:
        item["type"] = first["type"]
    function = {}
    if "name" in first:
        function["name"] = first["name"]
    if arguments is not None:
        function["arguments"] = arguments
    if function:
        item["function"] = function
    return item


def call(ident: str, name: str, arguments: str) -> dict:
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_streamed_calls_interleaved_by_index_are_assembled_in_index_order():
    reply = reply_of(
        delta(role="assistant", content=None),
        delta(tool_calls=[piece(0, "", id="call_a", type="function", name="get_weather")]),
        delta(tool_calls=[piece(0, '{"city": ')]),
        delta(tool_calls=[piece(1, "", id="call_b", type="function", name="get_time")]),
        delta(tool_calls=[piece(1, '{"tz": "Europe/')]),
        delta(tool_calls=[piece(0, '"Lisbon"}')]),
        delta(tool_calls=[piece(1, 'Lisbon"}')]),
        delta(finish_reason="tool_calls"))
    out = reply.result("m")
    assert out["tool_calls"] == [call("call_a", "get_weather", '{"city": "Lisbon"}'),
                                 call("call_b", "get_time", '{"tz": "Europe/Lisbon"}')]
    assert out["text"] == "" and out["finish_reason"] == "tool_calls"
    # arguments stay the model's string, never parsed; each piece counts as a token
    assert out["usage"] == {"prompt_tokens": None, "completion_tokens": 4, "total_tokens": None,
                            "estimated": True}


def test_content_and_tool_calls_mixed_in_one_answer():
    ctx = Ctx()
    reply = reply_of(
        delta(role="assistant", content="Let me "),
        delta(content="check."),
        delta(content="", tool_calls=[piece(0, '{"q":', id="c1", type="function", name="search")]),
        delta(tool_calls=[piece(0, ' "x"}')]),
        delta(finish_reason="tool_calls"),
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}},
        ctx=ctx)
    out = reply.result("m")
    assert out == {"text": "Let me check.", "finish_reason": "tool_calls",
                   "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
                   "model": "m", "tool_calls": [call("c1", "search", '{"q": "x"}')]}
    assert reply.chunks == 4  # two content pieces, two argument pieces
    assert ctx.events[-1][0] == 1.0 and ctx.events[-1][1].startswith("done: 4 tokens")


def test_an_answer_without_tool_calls_is_unchanged():
    out = reply_of(delta(content="hi", tool_calls=[]), delta(finish_reason="stop")).result("m")
    assert out == {"text": "hi", "finish_reason": "stop", "model": "m",
                   "usage": {"prompt_tokens": None, "completion_tokens": 1, "total_tokens": None,
                             "estimated": True}}
    out = reply_of(delta(content="hi", tool_calls=None), delta(finish_reason="stop")).result("m")
    assert "tool_calls" not in out


def test_whole_message_tool_calls_are_taken_as_they_are():
    reply = llm.Reply(None, stall_timeout_s=30, max_tokens=None)
    llm._finish_json(reply, json.dumps({
        "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None,
            "tool_calls": [call("c1", "a", "{}"), call("c2", "b", '{"n": 1}')]}}]}).encode())
    out = reply.result("m")
    assert out["tool_calls"] == [call("c1", "a", "{}"), call("c2", "b", '{"n": 1}')]
    assert out["text"] == "" and out["finish_reason"] == "tool_calls"


def test_a_repeated_id_or_name_is_not_glued_on_and_a_reused_index_with_a_new_id_is_a_new_call():
    # some servers send id, type and name again with every piece (or in the finish chunk)
    out = reply_of(
        delta(tool_calls=[piece(0, '{"a":', id="c1", type="function", name="f")]),
        delta(tool_calls=[piece(0, " 1}", id="c1", type="function", name="f")]),
        # Ollama: every call is index 0, each whole with its own id
        delta(tool_calls=[piece(0, '{"b": 2}', id="c2", type="function", name="g")]),
        delta(finish_reason="tool_calls")).result("m")
    assert out["tool_calls"] == [call("c1", "f", '{"a": 1}'), call("c2", "g", '{"b": 2}')]


def test_id_and_name_may_come_in_separate_pieces():
    out = reply_of(delta(tool_calls=[piece(0, id="c1", type="function")]),
                   delta(tool_calls=[piece(0, "", name="f")]),
                   delta(tool_calls=[piece(0, "{}")]),
                   delta(finish_reason="tool_calls")).result("m")
    assert out["tool_calls"] == [call("c1", "f", "{}")]


def test_only_the_first_choices_calls_are_kept():
    out = reply_of(
        {"choices": [{"index": 0, "delta": {"content": "a", "tool_calls": [piece(0, "{}", id="c0", name="f")]}},
                     {"index": 1, "delta": {"content": "b", "tool_calls": [piece(0, "[]", id="c9", name="g")]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"},
                     {"index": 1, "delta": {}, "finish_reason": "tool_calls"}]}).result("m")
    assert out["tool_calls"] == [call("c0", "f", "{}")]
    assert out["text"] == "ab"  # content: every choice's, in arrival order, as before


def test_pieces_without_an_index_start_a_call_with_an_id_and_continue_it_without():
    """Ollama before 0.4.7 and some proxies leave `index` out: refusing them turned every
    tool-call answer of theirs into a malformed reply, retried until it failed."""
    def bare(arguments=None, **first):
        item = piece(0, arguments, **first)
        del item["index"]
        return item
    out = reply_of(
        delta(tool_calls=[bare('{"city"', id="a", name="get_weather")]),
        delta(tool_calls=[bare(': "Lis')]),
        delta(tool_calls=[bare('bon"}', id="a")]),  # the same id again: the same call
        delta(tool_calls=[bare("{}", id="b", name="get_time")]),
        delta(finish_reason="tool_calls")).result("m")
    assert out["tool_calls"] == [call("a", "get_weather", '{"city": "Lisbon"}'),
                                 call("b", "get_time", "{}")]


def test_custom_tool_calls_keep_their_shape_streamed_or_whole():
    """OpenAI's custom tools (type "custom"): free-form `custom.input`, not
    `function.arguments`; they came out as a function call with no name and no text."""
    out = reply_of(
        delta(tool_calls=[{"index": 0, "id": "c1", "type": "custom",
                           "custom": {"name": "run_sql", "input": "SELECT "}}]),
        delta(tool_calls=[{"index": 1, "id": "f1", "type": "function",
                           "function": {"name": "get_time", "arguments": "{}"}}]),
        delta(tool_calls=[{"index": 0, "custom": {"input": "1;"}}]),
        delta(finish_reason="tool_calls")).result("m")
    assert out["tool_calls"] == [
        {"id": "c1", "type": "custom", "custom": {"name": "run_sql", "input": "SELECT 1;"}},
        call("f1", "get_time", "{}")]
    whole = llm.Reply(None, stall_timeout_s=30, max_tokens=None)
    whole.add({"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": "c2", "type": "custom", "custom": {"name": "grammar", "input": "x := 1"}}]}}]})
    assert whole.result("m")["tool_calls"] == [
        {"id": "c2", "type": "custom", "custom": {"name": "grammar", "input": "x := 1"}}]
    with pytest.raises(llm.MalformedReply, match=r"'tool_calls\[\].custom.input' is not a string"):
        reply_of(delta(tool_calls=[{"index": 0, "type": "custom", "custom": {"input": 5}}]))


@pytest.mark.parametrize("tool_calls, field", [
    ({"index": 0}, "'tool_calls' is not a list"),
    ("nope", "'tool_calls' is not a list"),
    (["nope"], "'tool_calls' item is not an object"),
    ([{"index": "0", "function": {"arguments": "{}"}}], r"'tool_calls\[\].index'"),
    ([{"index": True, "function": {"arguments": "{}"}}], r"'tool_calls\[\].index'"),
    ([{"index": -1, "function": {"arguments": "{}"}}], r"'tool_calls\[\].index'"),
    ([{"index": 0, "function": {"arguments": {"city": "Lisbon"}}}], r"'tool_calls\[\].function.arguments' is not a string"),
    ([{"index": 0, "function": "f"}], r"'tool_calls\[\].function' is not an object"),
    ([{"index": 0, "id": 7}], r"'tool_calls\[\].id' is not a string"),
    ([{"index": 0, "function": {"name": ["f"]}}], r"'tool_calls\[\].function.name' is not a string"),
])
def test_malformed_tool_call_deltas_name_the_field(tool_calls, field):
    reply = llm.Reply(None, stall_timeout_s=30, max_tokens=None)
    with pytest.raises(llm.MalformedReply, match=field):
        reply.add(delta(tool_calls=tool_calls))


def test_malformed_whole_message_tool_calls():
    reply = llm.Reply(None, stall_timeout_s=30, max_tokens=None)
    with pytest.raises(llm.MalformedReply, match=r"'tool_calls\[\].function.arguments' is not a string"):
        reply.add({"choices": [{"index": 0, "message": {"tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}]}}]})
