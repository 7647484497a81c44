"""What a request names besides its body: the query string and the path segments, read
into plain text before an endpoint of `supervisor.api` sees them.

Owns their decoding and the refusals that come with it (a name given twice, too many
parameters, a path segment that is not UTF-8 once percent-decoded), each a 400 naming
the parameter. It checks no value's meaning (that is the endpoint's), never reads the
body and never touches the store.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote

from supervisor.api import ErrorAnswer


def path_param(name: str, text: str) -> str:
    """A percent-decoded path segment; 400 when it is not UTF-8 (decoded with replacement
    characters it named another event or task, e.g. an event nobody awaits)."""
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ErrorAnswer(400, f"the {name} in the path is not UTF-8 text once percent-decoded: "
                          f"{text!r}; percent-encode its UTF-8 bytes", field=name) from None


def parse_query(text: str) -> dict[str, str]:
    """The query string as {name: value}; 400 for more than 50 parameters or a name
    given more than once."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=50)
    except ValueError:
        raise ErrorAnswer(400, "too many query parameters", field="query") from None
    out: dict[str, str] = {}
    for key, value in pairs:
        if key in out:
            raise ErrorAnswer(400, f"{key} is given more than once", field=key)
        out[key] = value
    return out
