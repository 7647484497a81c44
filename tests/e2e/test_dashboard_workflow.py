"""The dashboard's workflow panels in a real headless Chromium: a workflow drawn as a
graph (nodes coloured by status, dependency and spawn edges) that follows the workflow
live, and the tasks waiting for an event with a button that sends it (with the token).
Leaves a screenshot in tests/artifacts/dashboard-workflow.png."""

from __future__ import annotations

import time

from tests.e2e.http_support import supervisor, wait_for  # noqa: F401  (fixture)
from tests.e2e.test_dashboard import ARTIFACTS, page, pytestmark  # noqa: F401


def test_workflow_graph_follows_the_workflow_and_the_event_button_releases(supervisor, page):  # noqa: F811
    root = supervisor.enqueue(type="spawner", payload={"n": 2})["id"]
    root_task = supervisor.wait_status(root, "succeeded")
    kids = root_task["result"]["children"]
    gate = supervisor.enqueue(type="ok", payload={"demo": "publish <b>now</b>"},
                              workflow_id=root, depends_on=kids, await_event="ship-it")["id"]
    for kid in kids:
        supervisor.wait_status(kid, "succeeded")
    page.goto(supervisor.url + "/")
    page.wait_for_selector("body[data-workflow-loaded=true]")
    assert page.locator("#workflow-select").input_value() == root
    nodes = page.locator("#workflow-graph g.node")
    wait_for(lambda: nodes.count() == 4)
    assert page.locator("#workflow-graph path.edge.spawned").count() == 2
    assert page.locator("#workflow-graph path.edge.depends_on").count() == 2
    gate_node = page.locator(f"#workflow-graph g.node[data-id='{gate}']")
    assert gate_node.get_attribute("data-status") == "blocked"
    assert "event ship-it" in gate_node.text_content()
    assert "publish <b>now</b>" in gate_node.text_content()  # text, not markup
    assert page.locator("#workflow-graph b").count() == 0

    row = page.locator(f"#awaiting tr[data-id='{gate}']")
    assert "ship-it" in row.inner_text()
    page.evaluate(f"sessionStorage.setItem('taskvisor.token', {supervisor.token!r})")
    row.locator("button.send-event").click()
    supervisor.wait_status(gate, "succeeded")  # the row leaves the table once released
    wait_for(lambda: page.locator(f"#awaiting tr[data-id='{gate}']").count() == 0)
    assert supervisor.task(gate)["result"]["echo"]["demo"] == "publish <b>now</b>"
    wait_for(lambda: gate_node.get_attribute("data-status") == "succeeded", timeout=10)
    assert "4 succeeded" in page.inner_text("#workflow-summary")
    # Live: a task joining the workflow shows up on its task event, not at the next poll
    # (once per minute while the stream is up).
    page.wait_for_selector("body[data-workflow-live=true]")
    extra = supervisor.enqueue(type="ok", payload={}, workflow_id=root)["id"]
    started = time.monotonic()
    wait_for(lambda: page.locator(f"#workflow-graph g.node[data-id='{extra}']").count() == 1,
             timeout=20)
    assert time.monotonic() - started < 8
    gate_node.click()  # a node opens the task's detail
    page.wait_for_selector("#detail[open]")
    wait_for(lambda: gate in page.inner_text("#detail-fields"))
    page.click("#close-detail")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator("#workflow-graph").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "dashboard-workflow.png"), full_page=True)
    assert page.errors == [], page.errors
