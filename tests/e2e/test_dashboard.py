"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright's
Python package through `executable_path`; no browser download): it loads, shows the right
counts, keeps markup from task data inert, cancels through its button after asking for the
token once, and leaves a screenshot in tests/artifacts/dashboard.png."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.http_support import supervisor, wait_for  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = os.environ.get("TASKVISOR_TEST_CHROMIUM") or shutil.which("chromium") or ""
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS_TYPE = "<img src=x onerror=window.__xss=1>"
XSS_PAYLOAD = {"html": "<script>window.__xss=1</script>", "img": "<img src=x onerror=window.__xss=2>"}

pytestmark = [
    pytest.mark.skipif(not CHROMIUM or not os.access(CHROMIUM, os.X_OK),
                       reason="no chromium binary (apt-get install chromium, or set "
                              "TASKVISOR_TEST_CHROMIUM)"),
    pytest.mark.timeout(120),
]


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1360, "height": 1000})
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        page.on("console", lambda msg: msg.type == "error" and page.errors.append(msg.text))
        try:
            yield page
        finally:
            browser.close()


def seed(sup) -> dict:
    """A few tasks in every section: succeeded, failed, running, queued, hostile."""
    ids = {}
    ids["ok"] = sup.enqueue(type="ok", payload={"n": 1})["id"]
    ids["failed"] = sup.enqueue(type="fail", payload={"why": "the input file is missing"})["id"]
    sup.wait_status(ids["ok"], "succeeded")
    sup.wait_status(ids["failed"], "failed")
    ids["running"] = sup.enqueue(type="sleep", payload={"steps": 400, "step_s": 0.1})["id"]
    ids["queued"] = [sup.enqueue(type="embed.files", delay=3600, priority=p,
                                 payload={"file": f"doc-{p}.pdf"})["id"] for p in (1, 5)]
    ids["xss"] = sup.enqueue(type=XSS_TYPE, payload=XSS_PAYLOAD, delay=3600)["id"]
    sup.wait_status(ids["running"], "running")
    wait_for(lambda: (sup.get("/api/running").json["tasks"] or [{}])[0].get("progress"))
    return ids


def test_dashboard_shows_the_queue_keeps_data_inert_and_cancels(supervisor, page):
    ids = seed(supervisor)
    page.goto(supervisor.url + "/")
    page.wait_for_selector("body[data-loaded=true]")
    assert page.title() == "taskvisor"

    # Counts match the API.
    totals = supervisor.get("/api/stats").json["totals"]
    for status in ("queued", "running", "succeeded", "failed"):
        assert page.inner_text(f"#count-{status}") == str(totals[status]), status
    assert totals["queued"] == 3 and totals["running"] == 1
    assert page.locator("#health").inner_text() == "healthy"

    # Running: type, progress bar, message; queued in claim order; failure with reason.
    running = page.locator("#running tbody tr")
    wait_for(lambda: "step " in running.first.inner_text())
    assert running.count() == 1 and "sleep" in running.first.inner_text()
    assert page.locator("#running progress").first.get_attribute("value") is not None
    queued_types = page.locator("#queued tbody tr td.type").all_inner_texts()
    assert queued_types == ["embed.files", "embed.files", XSS_TYPE]  # priority 5, 1, then 0
    assert "the input file is missing" in page.inner_text("#failures")
    wait_for(lambda: page.locator("#chart rect.bar").count() >= 2)
    schedule = page.locator("#schedules tbody tr").first  # the harness's yearly schedule
    assert "yearly" in schedule.inner_text() and "0 3 1 1 *" in schedule.inner_text()

    # Markup in a type or payload is shown as text and never runs.
    assert page.locator("#queued").get_by_text(XSS_TYPE, exact=True).count() == 1
    page.locator(f"#queued tr[data-id='{ids['xss']}']").click()
    page.wait_for_selector("#detail[open]")
    wait_for(lambda: XSS_PAYLOAD["html"] in page.inner_text("#detail-payload"))
    assert XSS_TYPE in page.inner_text("#detail-title")
    assert page.locator("#detail img, #queued img, #tasks img").count() == 0
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None
    page.click("#close-detail")

    # Cancel through the button: the token is asked for once, then kept for the tab.
    target = ids["queued"][1]
    page.locator(f"#queued tr[data-id='{target}']").click()
    page.wait_for_selector("#detail[open]")
    page.click("#cancel-task")
    page.wait_for_selector("#token-dialog[open]")
    page.fill("#token-input", supervisor.token)
    page.click("#token-save")
    wait_for(lambda: supervisor.task(target)["status"] == "cancelled")
    wait_for(lambda: "cancelled" in page.inner_text("#detail-title"))
    assert page.locator("#retry-task").is_visible()
    page.click("#retry-task")  # no second prompt: the token is kept
    wait_for(lambda: supervisor.task(target)["status"] != "cancelled")  # due now: it runs
    assert not page.locator("#token-dialog").evaluate("d => d.open")
    page.click("#close-detail")
    wait_for(lambda: page.inner_text("#count-cancelled") == "0")

    # A wrong token is refused and asked for again; nothing changes.
    other = ids["queued"][0]
    page.evaluate("sessionStorage.setItem('taskvisor.token', 'wrong')")
    page.locator(f"#queued tr[data-id='{other}']").click()
    page.wait_for_selector("#detail[open]")
    page.click("#cancel-task")
    page.wait_for_selector("#token-dialog[open]")
    page.click("#token-cancel")
    wait_for(lambda: "failed: no valid token" in page.inner_text("#detail-message"))
    assert supervisor.task(other)["status"] == "queued"
    page.click("#close-detail")
    page.evaluate(f"sessionStorage.setItem('taskvisor.token', {supervisor.token!r})")
    wait_for(lambda: [page.inner_text(f"#count-{s}") for s in ("queued", "failed")] == [
        str(supervisor.get("/api/stats").json["totals"][s]) for s in ("queued", "failed")])

    page.wait_for_timeout(300)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    page.locator(f"#tasks tr[data-id='{ids['failed']}']").click()
    page.wait_for_selector("#detail[open]")
    wait_for(lambda: "ValueError" in page.inner_text("#attempts"))
    page.screenshot(path=str(ARTIFACTS / "dashboard-detail.png"))
    assert page.evaluate("window.__xss") is None
    errors = [e for e in page.errors if "status of 401" not in e]  # the wrong token, above
    assert errors == [], errors
