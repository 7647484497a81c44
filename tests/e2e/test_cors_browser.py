"""CORS in a real headless Chromium: a page served from another origin listed in
`[http] allow_origins` enqueues a task (a preflighted POST with the token) and follows it
on the event stream; a page from an origin not listed is refused by the browser."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.e2e.live_support import start_live, stop
from tests.e2e.test_dashboard import ARGS, CHROMIUM, pytestmark  # noqa: F401  (skips)
from tests.support import wait_until

PAGE = """<!doctype html><meta charset="utf-8"><title>app</title><script>
window.__result = null;
(async () => {
  const [api, token] = decodeURIComponent(location.hash.slice(1)).split("|");
  try {
    // Listen first, then enqueue: the stream sees the task from its first event.
    const es = new EventSource(api + "/api/events?type=stream");
    const opened = await new Promise((resolve) => {
      es.onopen = () => resolve(true); es.onerror = () => resolve(false); });
    if (!opened) {  // refused: the enqueue must be refused too (its preflight fails)
      es.close();
      const r = await fetch(api + "/api/tasks", {method: "POST",
        headers: {"Content-Type": "application/json", "Authorization": "Bearer " + token},
        body: JSON.stringify({type: "stream", payload: {n: 1}})});
      window.__result = {unexpected: r.status};
      return;
    }
    const seen = [];
    let taskId = null;
    const early = [];
    es.addEventListener("output", (e) => {
      const d = JSON.parse(e.data);
      if (taskId === null) early.push(d); else if (d.id === taskId) seen.push(d.text);
    });
    let status = null;
    es.addEventListener("task", (e) => {
      const d = JSON.parse(e.data);
      if (d.id === taskId && d.status === "succeeded") {
        es.close();
        window.__result = {status, output: seen.join("")};
      }
    });
    const res = await fetch(api + "/api/tasks", {method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer " + token},
      body: JSON.stringify({type: "stream", payload: {n: 3, gap_s: 0.05}})});
    status = res.status;
    const task = await res.json();
    taskId = task.id;
    for (const d of early) if (d.id === taskId) seen.push(d.text);
  } catch (e) {
    window.__result = {error: String(e)};
  }
})();
</script>"""


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = PAGE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def origins():
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Page) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


def test_allowed_origin_calls_the_api_and_a_disallowed_one_is_refused(tmp_path, origins):
    from playwright.sync_api import sync_playwright
    allowed, other = origins
    sup = start_live(tmp_path, extra=f"allow_origins = [{json.dumps(allowed)}]\n")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                results = {}
                for name, origin in (("allowed", allowed), ("other", other)):
                    page = browser.new_page()
                    page.goto(f"{origin}/#{sup.url}|{sup.token}")
                    results[name] = wait_until(lambda: page.evaluate("window.__result"),
                                               timeout=20)
                    page.close()
            finally:
                browser.close()
        assert results["allowed"] == {"status": 201, "output": "tok0 tok1 tok2 "}
        assert "error" in results["other"], results["other"]
        # Refused before anything was written: the preflight failed, the POST never came.
        tasks = sup.get("/api/tasks").json["tasks"]
        assert len(tasks) == 1
    finally:
        stop(sup)
