"""The dashboard on the event stream, in a real headless Chromium: it goes live (no
polling needed), a new task shows up from its event, and a running task's output streams
into its detail view as the task writes it."""

from __future__ import annotations

from tests.e2e.live_support import start_live, stop
from tests.e2e.test_dashboard import ARGS, CHROMIUM, pytestmark  # noqa: F401  (skips)
from tests.support import wait_until


def test_dashboard_follows_events_and_streams_output(tmp_path):
    from playwright.sync_api import sync_playwright
    sup = start_live(tmp_path)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = browser.new_page()
                errors = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(sup.url + "/")
                wait_until(lambda: page.evaluate(
                    "document.getElementById('updated').dataset.live === 'true'"), timeout=15)
                task = sup.enqueue(type="stream", payload={"n": 300, "gap_s": 0.02})
                row = f'#running tr[data-id="{task["id"]}"]'
                page.wait_for_selector(row, timeout=10000)  # from the task's events
                page.click(row)
                # Output arrives while the task runs (300 pieces over 6 s).
                first = wait_until(lambda: page.text_content("#detail-output") or "", timeout=10)
                assert first.startswith("tok0 ")
                assert sup.task(task["id"])["status"] == "running"
                wait_until(lambda: "tok299 " in (page.text_content("#detail-output") or ""),
                           timeout=20)
                assert page.text_content("#detail-output") == "".join(
                    f"tok{i} " for i in range(300))
                assert errors == []
            finally:
                browser.close()
    finally:
        stop(sup)
