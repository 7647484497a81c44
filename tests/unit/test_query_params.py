"""The query parameters each endpoint takes (supervisor.request.PARAMS, which refuses any
other name with 400) are the ones the OpenAPI document lists for it, route by route:
a parameter the document offers must not be refused, and one the server takes must be
documented. No fork, no disk."""

from __future__ import annotations

import re

from supervisor import openapi
from supervisor.http import ROUTES
from supervisor.request import PARAMS


def test_every_route_takes_the_query_parameters_its_operation_lists():
    for method, path, name, _ in ROUTES:
        template = re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", path)
        op = openapi.PATHS[template][method.lower()]
        listed = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
        assert set(PARAMS.get(name, ())) == listed, (method, template)
    assert set(PARAMS) <= {name for _, _, name, _ in ROUTES}
