"""The rule for names people type: task types and event names, in the client, the CLI,
the API and the config. A name is 1 to 200 printable characters.

Owns that rule and the sentence that says what breaks it: the length, or the first
character that is not printable, by its repr and index (a tab in a name is invisible in
a message that only says "printable characters"). It never raises and never touches the
store; each caller raises its own error with the field it names.
"""

from __future__ import annotations

MAX_NAME = 200


def problem(name: str, limit: int = MAX_NAME) -> str | None:
    """Why `name` is not a name, as the end of a sentence ("must be ..."), or None."""
    if len(name) > limit:
        return f"must be at most {limit} printable characters, got {len(name)} characters"
    if not name.isprintable():
        index, char = next((i, c) for i, c in enumerate(name) if not c.isprintable())
        return (f"must be at most {limit} printable characters: {char!r} at index {index} "
                "is not printable")
    return None
