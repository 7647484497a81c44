"""What a request names besides its body: the query string and the path segments, read
into plain text before an endpoint of `supervisor.api` sees them.

Owns their decoding, the query parameters each endpoint takes (`PARAMS`; the OpenAPI
document names the same), and the refusals that come with it (a parameter the endpoint
does not take, a name given twice, too many, a path segment that is not UTF-8 once
percent-decoded), each a 400 naming the parameter. It checks no value's meaning (that
is the endpoint's), never reads the body and never touches the store.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote

from supervisor.api import ErrorAnswer

PARAMS = {  # Api method -> the query parameters it takes; every other endpoint takes none
    "list_tasks": ("status", "type", "limit", "before", "workflow_id"),
    "output": ("attempt",),
    "logs": ("attempt", "after_seq"),
    "events": ("task", "type", "workflow", "last_event_id"),
    "queued": ("limit",),
}


def path_param(name: str, text: str) -> str:
    """A percent-decoded path segment; 400 when it is not UTF-8 (decoded with replacement
    characters it named another event or task, e.g. an event nobody awaits)."""
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ErrorAnswer(400, f"the {name} in the path is not UTF-8 text once percent-decoded: "
                          f"{text!r}; percent-encode its UTF-8 bytes", field=name) from None


def parse_query(text: str, endpoint: str, path: str) -> dict[str, str]:
    """The query string of a request to `path`, answered by the Api method `endpoint`, as
    {name: value}; 400 for a name the endpoint does not take (a typo such as `?befor=`
    was ignored, and the answer looked right), for more than 50 parameters or a name
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
    takes = PARAMS.get(endpoint, ())
    unknown = sorted(set(out) - set(takes))
    if unknown:
        names = (", ".join(takes[:-1]) + " and " + takes[-1]) if len(takes) > 1 else "".join(takes)
        raise ErrorAnswer(400, f"unknown parameter {unknown[0]!r}; {path} takes "
                          f"{names or 'no query parameters'}", field=unknown[0])
    return out
