"""The tool calls of one chat answer (function calling), assembled from what the server
sends: OpenAI's streamed `delta.tool_calls` pieces, or a whole `message.tool_calls`.

Owns how pieces make calls: each piece names its call by `index`; `id`, `type` and
`function.name` come with the call's first piece (a later copy of them, which some
servers send, is ignored), and the `function.arguments` pieces are joined in order, never
parsed. An index that comes again with another id starts another call (Ollama sends every
call as index 0); a piece without an index (older Ollama, some proxies) starts a call when
it has another id than the last call's, and continues the last call when not. A custom
tool's call (type "custom") keeps its shape: `custom.name` and `custom.input` (free-form
text, in pieces the same way). It never reads anything but the parsed JSON it is given
(workers.handlers.llm's Reply owns the answer and its errors).
"""

from __future__ import annotations


class ToolCalls:
    """Calls as [index, id, type, name, [argument pieces]], in arrival order."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls: list[list] = []

    def __len__(self) -> int:
        return len(self.calls)

    def add(self, items: object, whole: bool) -> int:
        """A delta's `tool_calls` pieces, or a message's whole calls (`whole`: numbered by
        position). Returns how many argument pieces came (each counts as a token).
        Raises ValueError naming the field that is not the wire format."""
        if type(items) is not list:
            raise ValueError(f"'tool_calls' is not a list: {str(items)[:200]!r}")
        pieces = 0
        for position, item in enumerate(items):
            if type(item) is not dict:
                raise ValueError(f"a 'tool_calls' item is not an object: {str(item)[:200]!r}")
            index = position if whole else item.get("index")
            if index is None:  # the last call's, unless the piece names another id
                last = self.calls[-1] if self.calls else None
                ident = item.get("id")
                index = (0 if last is None else
                         last[0] + 1 if ident and ident != last[1] else last[0])
            if type(index) is not int or index < 0:
                raise ValueError(f"'tool_calls[].index' is not an integer >= 0: {str(item)[:200]!r}")
            ident, kind = item.get("id"), item.get("type")
            # A custom tool's call (OpenAI's type "custom") names its free-form text
            # `custom.input`; a function's, its JSON text `function.arguments`.
            part, text = ("custom", "input") if "custom" in item else ("function", "arguments")
            function = item.get(part)
            if function is not None and type(function) is not dict:
                raise ValueError(f"'tool_calls[].{part}' is not an object: {str(item)[:200]!r}")
            function = function or {}
            name, arguments = function.get("name"), function.get(text)
            if part == "custom" and not kind:
                kind = "custom"
            for field, value in (("id", ident), ("type", kind), (f"{part}.name", name),
                                 (f"{part}.{text}", arguments)):
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"'tool_calls[].{field}' is not a string: {str(item)[:200]!r}")
            call = next((c for c in reversed(self.calls) if c[0] == index), None)
            if call is None or (ident and call[1] and ident != call[1]):
                call = [index, ident or "", kind or "", name or "", []]
                self.calls.append(call)
            else:  # a later piece: the first id, type and name stand
                call[1], call[2], call[3] = call[1] or ident or "", call[2] or kind or "", call[3] or name or ""
            if arguments:
                call[4].append(arguments)
                pieces += 1
        return pieces

    def result(self) -> list[dict]:
        """The calls in index order (stable: a reused index keeps arrival order), in
        OpenAI's message shape; `arguments` as the model wrote them."""
        return [{"id": c[1], "type": "custom", "custom": {"name": c[3], "input": "".join(c[4])}}
                if c[2] == "custom" else
                {"id": c[1], "type": c[2] or "function",
                 "function": {"name": c[3], "arguments": "".join(c[4])}}
                for c in sorted(self.calls, key=lambda c: c[0])]
