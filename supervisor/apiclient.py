"""A client of a supervisor's HTTP API, over TCP or its Unix socket (`unix:/path`).

Owns the transport choice (httpx, with its Unix-domain-socket transport for
`[http] listen = "unix:…"`), the bearer token on writes (none is needed on the socket),
error answers turned into exceptions, and reading the event stream (`events()`), which
resumes after the last id it saw when the connection drops. For applications that talk
to a running supervisor rather than open the database (`supervisor.Queue` does that).
It never writes SQL and never starts a supervisor.
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx

from supervisor.errors import ApiError, InputError, NotFound, StoreUnavailable
from workers import sse

__all__ = ["ApiClient", "ApiError"]


class ApiClient:
    """`ApiClient("http://127.0.0.1:9464", token=...)` or `ApiClient("unix:/run/taskvisor/api.sock")`."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 30.0):
        if address.startswith("unix:"):
            transport = httpx.HTTPTransport(uds=address[5:])
            self._http = httpx.Client(transport=transport, base_url="http://localhost",
                                      timeout=timeout)
        elif address.startswith(("http://", "https://")):
            self._http = httpx.Client(base_url=address.rstrip("/"), timeout=timeout)
        else:
            raise InputError(f"API address {address!r}: expected http://host:port or "
                             "unix:/path/to/api.sock", field="api")
        self.address = address
        self.token = token

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            res = self._http.request(method, path, json=body, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"cannot reach the supervisor at {self.address}: {exc}") from exc
        if res.status_code >= 400:
            try:
                err = res.json()
            except ValueError:
                err = {"error": res.text[:500], "field": None}
            cls = NotFound if res.status_code == 404 else None
            if cls is not None:
                raise cls(err.get("error", "not found"), field=err.get("field"))
            raise ApiError(res.status_code, err.get("error", ""), err.get("field"))
        return res.json()

    def enqueue(self, type: str, payload: dict | None = None, **fields) -> dict:
        return self._call("POST", "/api/tasks", {"type": type, "payload": payload or {}, **fields})

    def get(self, task_id: str) -> dict:
        return self._call("GET", f"/api/tasks/{task_id}")

    def cancel(self, task_id: str) -> dict:
        return self._call("POST", f"/api/tasks/{task_id}/cancel")

    def output(self, task_id: str, attempt: int | None = None) -> dict:
        return self._call("GET", f"/api/tasks/{task_id}/output",
                          params={"attempt": attempt} if attempt else None)

    def logs(self, task_id: str, attempt: int | None = None, after_seq: int | None = None) -> dict:
        params = {k: v for k, v in (("attempt", attempt), ("after_seq", after_seq)) if v is not None}
        return self._call("GET", f"/api/tasks/{task_id}/logs", params=params or None)

    def events(self, *, task: str | None = None, type: str | None = None,
               workflow: str | None = None, last_id: int | None = None,
               reconnect_s: float = 1.0, on_open=None) -> Iterator[tuple[int | None, str, dict]]:
        """(id, event, data) of every event, for ever; a dropped connection is opened again
        with Last-Event-ID after `reconnect_s`, so nothing is lost or repeated. `on_open()`
        is called once, when the first connection has given the id to resume from (the
        stream's first frame): from then on no event can be missed. (Called when the
        headers came, a connection lost before that frame reconnected from "now".)"""
        params = {k: v for k, v in (("task", task), ("type", type), ("workflow", workflow)) if v}
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = str(last_id)
            try:
                with self._http.stream("GET", "/api/events", params=params, headers=headers,
                                       timeout=httpx.Timeout(60.0, connect=10.0)) as res:
                    if res.status_code != 200:
                        res.read()
                        raise ApiError(res.status_code, res.text[:500])
                    for ev_id, event, data in _parse(_lines(res.iter_bytes())):
                        if ev_id is not None:
                            last_id = ev_id
                        if on_open is not None and last_id is not None:
                            on_open()
                            on_open = None
                        if data is not None:
                            yield ev_id, event, data
            except (httpx.TransportError, httpx.StreamError):
                pass
            time.sleep(reconnect_s)


def _lines(pieces: Iterator[bytes]) -> Iterator[str]:
    """The stream's lines as SSE splits them (at CRLF, LF or CR only: workers.sse), a
    character cut between two reads decoded whole; a line the end leaves open is dropped."""
    split, text = sse.Lines(), codecs.getincrementaldecoder("utf-8")("replace")
    for piece in pieces:
        yield from split.decode(text.decode(piece))
    yield from split.decode(text.decode(b"", True))
    yield from split.flush(open_line=False)


def _parse(lines: Iterator[str]) -> Iterator[tuple[int | None, str, dict | None]]:
    """(id, event, data) of each frame; data None for a frame that only sets the id (the
    stream's first: where a client that has seen no event yet resumes)."""
    ev_id, event, data = None, "message", []
    for line in lines:
        if line == "":
            if data:
                yield ev_id, event, json.loads("\n".join(data))
            elif ev_id is not None:
                yield ev_id, event, None
            ev_id, event, data = None, "message", []
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            elif field == "event":
                event = value
            elif field == "id" and value.isascii() and value.isdigit():
                ev_id = int(value)
