// The dashboard's workflow panels: tasks waiting for an event (with a button that sends
// it) and a workflow drawn as a graph (tasks as nodes coloured by status, solid edges for
// dependencies, dashed ones for spawns), refreshed on the task events app.js passes on
// from the event stream (polling only while the stream is down). Plain JS and SVG, nothing
// from outside; task data goes in with textContent / SVG text nodes, never as HTML.
"use strict";

(() => {
  const REFRESH_MS = 2000;        // polling, while the event stream is down
  const LIVE_REFRESH_MS = 60000;  // with the event stream (a safety net only)
  const EVENT_DEBOUNCE_MS = 300;  // a burst of task events makes one refresh
  const TOKEN_KEY = "taskvisor.token";
  const NODE_W = 150, NODE_H = 40, GAP_X = 60, GAP_Y = 14, PAD = 12;
  const $ = (id) => document.getElementById(id);
  const state = { chosen: null, timer: null, known: [], live: false, pending: null };

  const { el, svg } = window.taskvisorDom;  // dom.js

  async function getJSON(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" } });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  function open(id) {
    if (window.taskvisorOpenTask) window.taskvisorOpenTask(id);
  }

  // -- waiting for an event ----------------------------------------------------------------

  async function sendEvent(name, message) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) {
      message.textContent = "enter the API token (Token, top right), then send again";
      $("token-button").click();
      return;
    }
    message.textContent = "sending…";
    const response = await fetch("/api/events/" + encodeURIComponent(name), {
      method: "POST",
      headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
      body: JSON.stringify({ data: { by: "dashboard", at: new Date().toISOString() } }),
    });
    const body = await response.json();
    if (response.status === 401) sessionStorage.removeItem(TOKEN_KEY);
    message.textContent = response.ok
      ? (body.sent ? "sent: " + body.released.length + " task(s) released" : "already sent before")
      : "failed: " + (body.error || response.statusText);
    refresh();
  }

  function renderAwaiting(data) {
    $("awaiting-count").textContent = data.tasks.length || "";
    const head = el("thead", null, el("tr", null, ...["type", "id", "waits for event", "since", ""].map((h) => el("th", null, h))));
    const body = el("tbody");
    if (!data.tasks.length) body.append(el("tr", null, el("td", { colspan: 5, class: "empty" }, "no task waits for an event")));
    for (const t of data.tasks) {
      const message = el("span", { class: "muted event-message" });
      const button = el("button", { type: "button", class: "send-event", "data-event": t.await_event }, "Send event");
      button.addEventListener("click", (e) => { e.stopPropagation(); sendEvent(t.await_event, message); });
      const row = el("tr", { class: "clickable", "data-id": t.id },
        el("td", { class: "type" }, t.type), el("td", null, el("code", { title: t.id }, t.id.slice(-8))),
        el("td", null, el("code", null, t.await_event)), el("td", null, t.created_at),
        el("td", null, button, " ", message));
      row.addEventListener("click", () => open(t.id));
      body.append(row);
    }
    $("awaiting").replaceChildren(head, body);
  }

  // -- the graph ---------------------------------------------------------------------------

  function layout(tasks, edges) {
    // Column = longest path from a root over both kinds of edge; rows in id order.
    const ids = new Set(tasks.map((t) => t.id));
    const incoming = new Map(tasks.map((t) => [t.id, []]));
    for (const e of edges) if (ids.has(e.from) && ids.has(e.to)) incoming.get(e.to).push(e.from);
    const depth = new Map();
    const visit = (id, seen) => {
      if (depth.has(id)) return depth.get(id);
      if (seen.has(id)) return 0;  // a cycle cannot be stored; stay safe anyway
      seen.add(id);
      const d = Math.max(-1, ...incoming.get(id).map((p) => visit(p, seen))) + 1;
      depth.set(id, d);
      return d;
    };
    const columns = [];
    for (const t of tasks) {
      const d = visit(t.id, new Set());
      (columns[d] = columns[d] || []).push(t);
    }
    const pos = new Map();
    columns.forEach((col, c) => col.forEach((t, r) => pos.set(t.id, {
      x: PAD + c * (NODE_W + GAP_X), y: PAD + r * (NODE_H + GAP_Y) })));
    const rows = Math.max(1, ...columns.map((col) => (col || []).length));
    return { pos, width: PAD * 2 + columns.length * (NODE_W + GAP_X) - GAP_X,
             height: PAD * 2 + rows * (NODE_H + GAP_Y) - GAP_Y };
  }

  function renderGraph(wf) {
    const { pos, width, height } = layout(wf.tasks, wf.edges);
    const chart = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
      class: "graph", "aria-label": "workflow " + wf.id + ": " + wf.tasks.length + " tasks" });
    chart.append(svg("defs", null, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrow" }))));
    for (const e of wf.edges) {
      const a = pos.get(e.from), b = pos.get(e.to);
      if (!a || !b) continue;
      const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x, y2 = b.y + NODE_H / 2;
      const mid = (x1 + x2) / 2;
      chart.append(svg("path", { d: `M ${x1} ${y1} C ${mid} ${y1}, ${mid} ${y2}, ${x2} ${y2}`,
        class: "edge " + e.kind, "marker-end": "url(#arrow)", "data-from": e.from, "data-to": e.to },
        svg("title", null, e.kind === "spawned" ? "spawned" : "depends on")));
    }
    for (const t of wf.tasks) {
      const p = pos.get(t.id);
      const label = (t.payload && typeof t.payload.demo === "string") ? t.payload.demo : t.type;
      const node = svg("g", { class: "node " + t.status, transform: `translate(${p.x},${p.y})`,
        "data-id": t.id, "data-status": t.status, tabindex: 0 },
        svg("rect", { width: NODE_W, height: NODE_H, rx: 6 }),
        svg("text", { x: 8, y: 16, class: "label" }, label.length > 22 ? label.slice(0, 21) + "…" : label),
        svg("text", { x: 8, y: 31, class: "sub" }, t.status + (t.await_event && t.status === "blocked" ? " · event " + t.await_event : "")),
        svg("title", null, t.type + " " + t.id + "\n" + t.status + (t.error ? "\n" + t.error : "")));
      node.addEventListener("click", () => open(t.id));
      chart.append(node);
    }
    const counts = Object.entries(wf.counts).map(([s, n]) => n + " " + s).join(" · ");
    const drawn = wf.truncated ? " (the oldest " + wf.tasks.length + " drawn)" : "";
    $("workflow-summary").textContent = wf.total + " tasks" + drawn + ": " + counts + (wf.finished ? " (finished)" : "");
    $("workflow-graph").replaceChildren(chart);
  }

  async function chooseWorkflows() {
    // Recent workflows with more than one task, newest first.
    const recent = await getJSON("/api/tasks?limit=200");
    const sizes = new Map();
    for (const t of recent.tasks) sizes.set(t.workflow_id, (sizes.get(t.workflow_id) || 0) + 1);
    const list = [...sizes.entries()].filter(([, n]) => n > 1).map(([id]) => id);
    const select = $("workflow-select");
    if (list.join() !== state.known.join()) {
      state.known = list;
      select.replaceChildren(...list.map((id) => el("option", { value: id }, id)));
    }
    if (!state.chosen) state.chosen = list[0] || null;
    if (state.chosen) select.value = state.chosen;
  }

  async function refresh() {
    clearTimeout(state.timer);
    try {
      renderAwaiting(await getJSON("/api/awaiting"));
      await chooseWorkflows();
      if (state.chosen) renderGraph(await getJSON("/api/workflows/" + encodeURIComponent(state.chosen)));
      else {
        $("workflow-summary").textContent = "no workflow with more than one task yet";
        $("workflow-graph").replaceChildren();
      }
      document.body.dataset.workflowLoaded = "true";
    } catch (err) {
      $("workflow-summary").textContent = "could not load: " + (err.message || err);
    }
    state.timer = setTimeout(refresh, state.live ? LIVE_REFRESH_MS : REFRESH_MS);
  }

  function setLive(live) {
    state.live = live;
    document.body.dataset.workflowLive = String(live);
  }

  document.addEventListener("taskvisor:stream", (e) => setLive(e.detail.live));
  document.addEventListener("taskvisor:task", () => {
    setLive(true);
    if (state.pending) return;
    state.pending = setTimeout(() => { state.pending = null; refresh(); }, EVENT_DEBOUNCE_MS);
  });

  document.addEventListener("DOMContentLoaded", () => {
    $("workflow-select").addEventListener("change", (e) => { state.chosen = e.target.value; refresh(); });
    refresh();
  });
})();
