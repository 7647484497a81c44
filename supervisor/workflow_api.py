"""The JSON endpoints of workflows (the `Api` class inherits them): a workflow's tasks and
edges, cancelling a workflow, sending an event, the tasks waiting for one.

Same rules as `supervisor.api`: reads through the HTTP side's own store connection,
writes through the `Queue` (its validation), answers with the shapes `openapi` describes.
It runs on the HTTP threads: it never writes SQL and never signals a process.
"""

from __future__ import annotations

import json

from supervisor.errors import InputError, NotFound
from supervisor.workflow_client import Workflow


class WorkflowEndpoints:
    """Mixed into `Api`, which provides `database`, `queue`, `sup` and `ErrorAnswer`."""

    def get_workflow(self, query: dict, body=None, *, id: str) -> tuple[int, dict]:
        try:
            with self.database as store:
                tasks, edges, counts = store.workflow(id)
        except NotFound as exc:
            raise _error(404, str(exc), "id") from None
        return 200, Workflow(tasks[0].workflow, tuple(tasks), tuple(edges), counts).to_dict()

    def cancel_workflow(self, query: dict, body=None, *, id: str) -> tuple[int, dict]:
        # Whole ids only, as get_workflow: the Queue would also take a unique end of one
        # (the CLI's short ids), and an ambiguous end ("0") was a 500.
        with self.database as store:
            found = store.workflow_named(id)
        if found is None:
            raise _error(404, f"no workflow with id {id}", "id")
        try:
            done = self.queue.cancel_workflow(found)
        except NotFound as exc:
            raise _error(404, str(exc), "id") from None
        return 200, done  # its "id" is the workflow's, as get_workflow answers

    def send_event(self, query: dict, body: bytes | None, *, name: str) -> tuple[int, dict]:
        data = None
        if body:
            try:
                parsed = json.loads(body.decode("utf-8"))
            except (UnicodeError, ValueError, RecursionError) as exc:
                raise _error(400, f"the body is not valid JSON: {exc}", "body") from None
            if not isinstance(parsed, dict) or set(parsed) - {"data"}:
                raise _error(400, 'send a JSON object {"data": <any JSON value>} (or no body)',
                             "body")
            data = parsed.get("data")
        self.queue.config = self.sup.snapshot.config  # the limits as of the last reload
        try:
            return 200, self.queue.send_event(name, data)
        except InputError as exc:
            raise _error(400, str(exc), exc.field) from None

    def awaiting(self, query: dict, body=None) -> tuple[int, dict]:
        with self.database as store:
            tasks = store.awaiting(200)
        return 200, {"tasks": [t.to_dict(with_history=False) for t in tasks]}


def _error(status: int, message: str, field: str | None):
    from supervisor.api import ErrorAnswer
    return ErrorAnswer(status, message, field=field)
