"""The HTTP server of the supervisor: /metrics, /healthz, /api/… and the dashboard at /.

Owns the serving thread, request framing (routing, the size limit, content types,
security headers), the bearer token for writes and its file, and the Host check that
keeps a web page from reaching the API through DNS rebinding, CORS for the configured
origins, no token on the Unix socket (the file's permissions are the authentication),
and the framing of the event stream (`GET /api/events`, fed by `supervisor.broadcast`).
The sockets it listens on are `supervisor.listener`'s, the query string and path
segments are read by `supervisor.request`, and what each endpoint does is
`supervisor.api`. It runs on daemon threads of the supervisor process and never blocks
or calls into the loop: it reads the Supervisor's attributes and the database through
its own connections, and wakes the loop with a datagram after a write.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

from supervisor import __version__
from supervisor.api import Api, ErrorAnswer, is_digits
from supervisor.broadcast import Broadcast, Filter
from supervisor.config import Config
from supervisor.errors import ConfigError, StoreError
from supervisor.listener import UnixListener, bind, is_loopback
from supervisor.metrics import LockedStore, Metrics
from supervisor.request import parse_query, path_param

log = logging.getLogger("taskvisor.http")
DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboard"
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/dashboard/dom.js": ("dom.js", "text/javascript; charset=utf-8"),
          "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/dashboard/workflow.js": ("workflow.js", "text/javascript; charset=utf-8"),
          "/dashboard/style.css": ("style.css", "text/css; charset=utf-8"),
          "/dashboard/favicon.svg": ("favicon.svg", "image/svg+xml")}
BODY_SLACK = 64 * 1024        # a request body may exceed max_payload_bytes by this much
BODY_TIMEOUT_S = 5.0          # the whole body must arrive within this (loopback: far more
                              # than enough); a slow or stalled client gets 408, not a thread
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
DATA_CSP = "default-src 'none'; frame-ancestors 'none'"
_ID = r"(?P<id>[^/]+)"
ROUTES = [  # (method, compiled path, Api method name, needs the token)
    ("GET", "/api/tasks", "list_tasks", False),
    ("POST", "/api/tasks", "enqueue", True),
    ("GET", f"/api/tasks/{_ID}", "get_task", False),
    ("GET", f"/api/tasks/{_ID}/output", "output", False),
    ("GET", f"/api/tasks/{_ID}/logs", "logs", False),
    ("GET", "/api/events", "events", False),
    ("POST", f"/api/tasks/{_ID}/cancel", "cancel", True),
    ("POST", f"/api/tasks/{_ID}/retry", "retry", True),
    ("GET", f"/api/workflows/{_ID}", "get_workflow", False),
    ("POST", f"/api/workflows/{_ID}/cancel", "cancel_workflow", True),
    ("GET", "/api/awaiting", "awaiting", False),
    ("POST", "/api/events/(?P<name>[^/]+)", "send_event", True),
    ("GET", "/api/stats", "stats", False),
    ("GET", "/api/running", "running", False),
    ("GET", "/api/queued", "queued", False),
    ("GET", "/api/throughput", "throughput", False),
    ("GET", "/api/limits", "limits", False),
    ("GET", "/api/schedules", "schedules", False),
    ("POST", "/api/schedules/(?P<name>[^/]+)/pause", "pause_schedule", True),
    ("POST", "/api/schedules/(?P<name>[^/]+)/resume", "resume_schedule", True),
    ("GET", "/api/openapi.json", "openapi", False),
    ("GET", "/healthz", "healthz", False),
]
_ROUTES = [(m, re.compile(p + r"\Z"), name, auth) for m, p, name, auth in ROUTES]


def token_path(config: Config) -> Path:
    """[http] token_file, else taskvisor.token beside the database."""
    if config.http.token_file is not None:
        return Path(config.http.token_file)
    return Path(config.supervisor.database).parent / "taskvisor.token"


def load_token(path: Path) -> str:
    """Read the token, or create the file (mode 0600) with a new one; ConfigError if
    unusable. An existing file that group or others can read is set to 0600: anyone who
    could read it could enqueue and cancel tasks."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"[http] token_file {path}: cannot create it ({exc.strerror}); "
                          "check the folder exists and is writable") from exc
    else:
        token = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        log.info("http: wrote a new API token to %s (mode 0600)", path)
        return token
    try:
        text = path.read_text(encoding="utf-8").strip()
        mode = stat.S_IMODE(path.stat().st_mode)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"[http] token_file {path}: cannot read it ({exc})") from exc
    if not text or any(c.isspace() for c in text):
        raise ConfigError(f"[http] token_file {path}: expected one token on one line; "
                          "delete the file to have a new one generated")
    if mode & 0o077:  # made private, as a loose database file is (store.connection)
        try:
            os.chmod(path, 0o600)
        except OSError:  # not ours to change: say what to do
            log.warning("http: the token file %s is readable by other users (mode %o); "
                        "run chmod 600 on it", path, mode)
        else:
            log.warning("http: the token file %s had mode %o (readable by other users); "
                        "set it to 600", path, mode)
    return text


class HttpServer:
    """The supervisor's HTTP side. `start(sup)` is an on_ready hook, `stop(sup)` an
    on_shutdown hook; both run in the supervisor's main thread."""

    def __init__(self, config: Config, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics
        self.api: Api | None = None
        self.database: LockedStore | None = None
        self.token = ""
        self.loopback = True
        self.unix = False
        self.url = ""
        self.broadcast: Broadcast | None = None
        self.allow_origins = frozenset(config.http.allow_origins)
        self._server = None  # a TcpListener or UnixListener once started
        self._thread: threading.Thread | None = None
        self._static: dict[str, tuple[bytes, str]] = {}

    def start(self, sup) -> None:
        """Bind, load the token, start serving on a daemon thread.

        An address that cannot be used or an unusable token file is logged as an error and
        leaves HTTP off while the supervisor runs its tasks: running tasks matters more
        than watching them, and two supervisors of one database on one machine with the
        default config must not stop each other (the other one serves the same data)."""
        from supervisor.client import Queue
        try:
            self._server = bind(self.config.http.listen, self, _Handler)
            self.token = load_token(token_path(self.config))
        except ConfigError as exc:
            log.error("http: %s. The supervisor runs without HTTP: no metrics, API or "
                      "dashboard", exc)
            self.stop()
            return
        bound = self._server.server_address
        if isinstance(self._server, UnixListener):
            self.unix, self.loopback = True, True
            self.url = f"unix:{bound}"
        else:
            self.loopback = is_loopback(bound[0])
            shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            self.url = f"http://{shown}:{bound[1]}/"
        self._static = _read_static()
        sup_cfg = sup.config.supervisor
        self.database = LockedStore(lambda: _open_reader(sup_cfg))
        self.api = Api(sup, self.database, Queue(sup.config, create=False))
        self.broadcast = Broadcast(lambda: _open_reader(sup_cfg), str(sup_cfg.database),
                                   sup.config.http.events_retention)
        sup.helper_pids.add(self.broadcast.start())
        sup.on_commit.append(self.broadcast.poke)
        if self.metrics is not None:
            self.metrics.bind(sup, self.database)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.2}, name="taskvisor-http", daemon=True)
        self._thread.start()
        log.info("http: listening on %s (dashboard /, metrics /metrics, API "
                 "/api/openapi.json)", self.url)
        if not self.loopback:
            log.warning("http: listening on %s, which is not a loopback address: anyone who "
                        "can reach it can read the queue (writes still need the token)",
                        self.url)

    def stop(self, sup=None) -> None:
        if self.broadcast is not None:  # ends every event stream
            self.broadcast.stop()
        if self._server is not None:
            if self._thread is not None:  # shutdown() waits for serve_forever to return
                self._server.shutdown()
                self._thread = None
            self._server.server_close()
            self._server = None
        if self.api is not None:
            self.api.close()
        if self.database is not None:
            self.database.close()

    def authorized(self, header: str | None) -> bool:
        if self.unix:  # the socket file is mode 0600: whoever can open it is the owner
            return True
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not self.token:
            return False
        return hmac.compare_digest(given.strip().encode("latin-1", "replace"),
                                   self.token.encode())

    def host_allowed(self, host_header: str | None) -> bool:
        """On loopback, only loopback host names: a page on another site whose name
        resolves to 127.0.0.1 (DNS rebinding) must not read or drive the API."""
        if not self.loopback or self.unix:
            return True
        if not host_header:
            return False
        host = host_header.strip()
        if host.startswith("["):
            host = host[1:host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            host = host.split(":")[0]
        return is_loopback(host)

    def max_body(self) -> int:
        return self.api.sup.snapshot.config.supervisor.max_payload_bytes + BODY_SLACK


def _open_reader(sup_cfg):
    from supervisor.store import Store
    return Store(sup_cfg.database, synchronous=sup_cfg.synchronous,
                 busy_timeout_s=sup_cfg.busy_timeout_s, migrate=False, create=False)


def _read_static() -> dict[str, tuple[bytes, str]]:
    out = {}
    for path, (name, ctype) in STATIC.items():
        try:
            out[path] = ((DASHBOARD_DIR / name).read_bytes(), ctype)
        except OSError as exc:
            log.warning("http: dashboard file %s is missing: %s", name, exc)
    return out


class _Handler(BaseHTTPRequestHandler):
    server_version = f"taskvisor/{__version__}"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 15  # an idle or slow client frees its thread after this long
    body_read = False
    cors: str | None = None  # the allowed cross-origin caller of this request

    @property
    def app(self) -> HttpServer:
        return self.server.app

    def __getattr__(self, name: str):
        # http.server looks up do_<METHOD>; every method goes through dispatch, so an
        # unknown one on a known path gets 405 with Allow, and on any other path 404.
        if name.startswith("do_") and name[3:].isalpha() and name[3:].isupper():
            return lambda: self.dispatch(name[3:])
        raise AttributeError(name)

    def dispatch(self, method: str) -> None:
        self.body_read = False
        self.cors = None
        try:
            self.route(method)
        except ErrorAnswer as exc:
            self.send_json(exc.status, exc.body(), exc.headers)
        except StoreError as exc:
            log.warning("http: %s %s: database error: %s", method, self.path, exc)
            self.send_json(503, {"error": str(exc), "field": None}, {"Retry-After": "1"})
        except Exception:
            log.exception("http: %s %s failed", method, self.path)
            self.send_json(500, {"error": "internal error; see the supervisor's log",
                                 "field": None})

    def route(self, method: str) -> None:
        if not self.app.host_allowed(self.headers.get("Host")):
            raise ErrorAnswer(403, "this Host is not allowed: use http://127.0.0.1 or "
                              "http://localhost (protection against DNS rebinding)")
        origin = self.headers.get("Origin")
        if origin is not None and not self.same_origin(origin):
            if origin.lower() not in self.app.allow_origins:
                raise ErrorAnswer(403, f"requests from origin {origin} are not allowed: add it to "
                                  "[http] allow_origins to let that page call the API")
            self.cors = origin
        if method == "OPTIONS" and self.cors is not None:
            return self.send_preflight()
        url = urlsplit(self.path)
        path = url.path
        get = "GET" if method == "HEAD" else method
        if path in STATIC or path == "/metrics":
            if get != "GET":
                raise ErrorAnswer(405, f"{method} is not allowed here",
                                  headers={"Allow": "GET, HEAD"})
            return self.send_page(path)
        allowed = []
        for route_method, pattern, name, auth in _ROUTES:
            match = pattern.match(path)
            if not match:
                continue
            allowed.append(route_method)
            if route_method != get:
                continue
            if auth and not self.app.authorized(self.headers.get("Authorization")):
                raise ErrorAnswer(401, "this needs the API token: send 'Authorization: Bearer "
                                  "<token>' (the token is in the supervisor's token file)",
                                  headers={"WWW-Authenticate": 'Bearer realm="taskvisor"'})
            # Every body is JSON: a send_event with `text/plain` used to be accepted.
            sends = (self.headers.get("Content-Length") or "0").strip() not in ("", "0")
            if (name == "enqueue" or (method == "POST" and sends)) \
                    and self.headers.get_content_type() != "application/json":
                what = "the task" if name == "enqueue" else "the body"
                raise ErrorAnswer(415, f"send {what} as JSON with 'Content-Type: "
                                  "application/json'", field="Content-Type")
            query = parse_query(url.query, name, path)
            if name == "events":
                return self.serve_events(query)
            body = self.read_body() if method == "POST" else None
            params = {k: path_param(k, v) for k, v in match.groupdict().items()}
            status, payload = getattr(self.app.api, name)(query=query, body=body, **params)
            return self.send_json(status, payload)
        if allowed:
            allow = ", ".join(sorted(set(allowed) | ({"HEAD"} if "GET" in allowed else set())))
            raise ErrorAnswer(405, f"{method} is not allowed on {path}", headers={"Allow": allow})
        raise ErrorAnswer(404, f"no such endpoint: {path} (see /api/openapi.json)")

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise ErrorAnswer(411, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None or length.strip() == "":
            return b""
        if not is_digits(length.strip()):
            raise ErrorAnswer(400, f"bad Content-Length {length!r}", field="Content-Length")
        size = int(length)
        limit = self.app.max_body()
        if size > limit:
            raise ErrorAnswer(413, f"the request body is {size} bytes, over the limit of {limit} "
                              "(supervisor.max_payload_bytes plus 64 KiB for the other fields)",
                              field="payload")
        self.body_read = True
        return self._read_exactly(size)

    def _read_exactly(self, size: int) -> bytes:
        """The body, within BODY_TIMEOUT_S for all of it. A client that closes early gets
        400 at once, one that stalls 408; either way the connection closes (its framing
        is lost). Without this a short body waited for the 15 s idle timeout, then 500."""
        deadline = time.monotonic() + BODY_TIMEOUT_S
        chunks, got = [], 0
        try:
            while got < size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.connection.settimeout(left)
                chunk = self.rfile.read1(min(size - got, 1 << 16))
                if not chunk:
                    self.close_connection = True
                    raise ErrorAnswer(400, f"the body ended after {got} of the {size} bytes its "
                                      "Content-Length announced", field="body")
                chunks.append(chunk)
                got += len(chunk)
        except TimeoutError:
            self.close_connection = True
            raise ErrorAnswer(408, f"the body did not arrive within {BODY_TIMEOUT_S:g}s ({got} of "
                              f"the {size} bytes its Content-Length announced)",
                              field="body") from None
        finally:
            self.connection.settimeout(self.timeout)
        return b"".join(chunks)

    def send_page(self, path: str) -> None:
        if path == "/metrics":
            if self.app.metrics is None:
                raise ErrorAnswer(404, "metrics are off")
            body = self.app.metrics.exposition()
            return self.send(200, body, "text/plain; version=0.0.4; charset=utf-8")
        page = self.app._static.get(path)
        if page is None:
            raise ErrorAnswer(404, f"the dashboard file for {path} is missing from the install")
        self.send(200, page[0], page[1], {"Content-Security-Policy": PAGE_CSP})

    def send_json(self, status: int, payload, headers: dict | None = None) -> None:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self.send(status, body, "application/json", headers)

    def send(self, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_cors_headers()
        headers = dict(headers or {})
        headers.setdefault("Content-Security-Policy", DATA_CSP)
        for name, value in headers.items():
            self.send_header(name, value)
        unread = (getattr(self, "headers", None) is not None and not self.body_read
                  and self.headers.get("Content-Length", "").strip() not in ("", "0"))
        if unread:
            self.close_connection = True  # the unread body must not be parsed as a request
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def same_origin(self, origin: str) -> bool:
        """The page was served by this server (the dashboard): Origin names our Host."""
        host = (self.headers.get("Host") or "").strip().lower()
        return bool(host) and origin.lower() in (f"http://{host}", f"https://{host}")

    def send_cors_headers(self) -> None:
        if self.cors is None:
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            return
        self.send_header("Access-Control-Allow-Origin", self.cors)
        self.send_header("Vary", "Origin")
        self.send_header("Cross-Origin-Resource-Policy", "cross-origin")

    def send_preflight(self) -> None:
        """Answer a CORS preflight from an allowed origin (checked by route)."""
        self.send_response(204)
        self.send_cors_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers",
                         "Authorization, Content-Type, Last-Event-ID")
        self.send_header("Access-Control-Max-Age", "600")
        if self.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
            self.send_header("Access-Control-Allow-Private-Network", "true")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def serve_events(self, query: dict) -> None:
        """GET /api/events: Server-Sent Events until the client leaves or the server stops.
        Resumes after `Last-Event-ID` (or ?last_event_id=, for an EventSource's first
        connection); filters ?task=, ?type=, ?workflow= (route() refused any other name)."""
        raw = self.headers.get("Last-Event-ID") or query.get("last_event_id") or ""
        if raw.strip() and not is_digits(raw.strip()):
            raise ErrorAnswer(400, f"Last-Event-ID must be an event id (an integer), got {raw!r}",
                              field="Last-Event-ID")
        last_id = int(raw) if raw.strip() else None
        flt = Filter(task=query.get("task") or None, type=query.get("type") or None,
                     workflow=query.get("workflow") or None)
        sub = self.app.broadcast.subscribe(last_id, flt)
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Content-Security-Policy", DATA_CSP)
        self.send_cors_headers()
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            self.wfile.write(sub.first())
            # The fan-out process writes every event from here; this thread is done.
            self.app.broadcast.hand_over(sub, self.connection)
        except OSError as exc:
            log.debug("http: event stream not handed over: %s", exc)
            return
        self.server.handed_over(self.connection)

    def address_string(self) -> str:
        return self.client_address[0] if self.client_address else "unix"

    def handle_expect_100(self) -> bool:
        # Refuse an oversized body before the client sends it, not after "100 Continue".
        length = (self.headers.get("Content-Length") or "").strip()
        if self.app.api is not None and is_digits(length) and int(length) > self.app.max_body():
            self.send_json(413, {"error": f"the request body is {length} bytes, over the "
                                 f"limit of {self.app.max_body()}", "field": "payload"})
            return False
        return super().handle_expect_100()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found by http.server itself (bad request line, 414, 431, 501), as JSON."""
        self.close_connection = True
        self.send_json(code, {"error": message or explain or "bad request", "field": None})

    def log_message(self, format: str, *args) -> None:
        log.debug("http: %s %s", self.address_string(), format % args)
