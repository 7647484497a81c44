"""Splitting a server-sent event stream into lines, as the SSE format says: at CRLF, LF or
CR, and nowhere else.

Used where an event stream is read in pieces: a model server's answer (workers.relay and
workers.handlers.llmhttp) and the supervisor's own /api/events (supervisor.apiclient).
httpx's iter_lines and str.splitlines also break at U+2028, U+2029, U+0085 and other
separators, which a data line's JSON may hold raw (a model's text copied from a web page):
an event cut there is no longer JSON. Owns the line ends only: it never decodes bytes
and never reads a field.
"""

from __future__ import annotations


class Lines:
    """Text in, whole lines out: `decode` returns the lines that a piece completes (a
    line cut between pieces comes out once whole); `flush` what is left at the end. A
    long line costs one join, not one per piece (the pieces of an open line are kept
    apart until a line end comes)."""

    __slots__ = ("parts", "cr")

    def __init__(self) -> None:
        self.parts: list[str] = []  # the open line, in pieces
        self.cr = False             # the open line ends with a CR that may be half a CRLF

    def decode(self, text: str) -> list[str]:
        if not self.cr and "\n" not in text and "\r" not in text:
            if text:
                self.parts.append(text)
            return []
        self.parts.append(text)
        text, self.parts = "".join(self.parts), []
        held = ""
        if text.endswith("\r"):  # maybe the first half of a CRLF: wait for the next piece
            text, held = text[:-1], "\r"
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        last = lines.pop() + held
        if last:
            self.parts.append(last)
        self.cr = bool(held)
        return lines

    def flush(self, open_line: bool = True) -> list[str]:
        """The last line: one ended by a lone CR, or one left open by the end of the
        stream (kept when `open_line`, as a reader that dispatches a last event without
        its blank line wants; an SSE client drops it)."""
        rest, self.parts, self.cr = "".join(self.parts), [], False
        if rest.endswith("\r"):
            return [rest[:-1]]
        return [rest] if rest and open_line else []
