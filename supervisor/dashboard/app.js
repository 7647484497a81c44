// The taskvisor dashboard: plain JS, no build step, no library, nothing from outside.
// Every value that comes from a task is put in the page with textContent (el/text
// below), never parsed as HTML, so a payload holding <script> stays text.
"use strict";

(() => {
  const REFRESH_MS = 2000;       // polling, while the event stream is down
  const LIVE_REFRESH_MS = 15000;  // with the event stream: RSS/CPU, health, the chart
  const EVENT_DEBOUNCE_MS = 300;  // a burst of task events makes one refresh
  const CHART_MS = 10000;
  const STATUSES = ["blocked", "queued", "running", "succeeded", "failed", "cancelled"];
  const TOKEN_KEY = "taskvisor.token";
  const $ = (id) => document.getElementById(id);
  const state = { before: null, next: null, detailId: null, chartAt: 0, timer: null,
    live: false, pending: null, output: { id: null, attempt: null, text: "" } };

  // -- building the page safely ----------------------------------------------------------

  const { el, svg } = window.taskvisorDom;  // dom.js

  function table(node, headers, rows, empty) {
    const head = el("thead", null, el("tr", null, ...headers.map((h) => el("th", null, h))));
    const body = el("tbody");
    if (rows.length === 0) body.append(el("tr", null, el("td", { colspan: headers.length, class: "empty" }, empty)));
    for (const row of rows) body.append(row);
    node.replaceChildren(head, body);
  }

  function taskRow(task, cells) {
    const row = el("tr", { class: "clickable", "data-id": task.id, title: "show task " + task.id }, ...cells);
    row.addEventListener("click", () => openDetail(task.id));
    return row;
  }

  const statusPill = (status) => el("span", { class: "pill " + status }, status);
  const shortId = (id) => el("code", { title: id }, id.slice(-8));

  // -- formatting ------------------------------------------------------------------------

  function duration(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 60) return s.toFixed(1) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m " + String(Math.floor(s % 60)).padStart(2, "0") + "s";
    return Math.floor(m / 60) + "h " + String(m % 60).padStart(2, "0") + "m";
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  function ago(iso) {
    if (!iso) return "–";
    const s = (Date.now() - Date.parse(iso)) / 1000;
    if (s < 0) return "in " + duration(-s);
    return duration(s) + " ago";
  }

  const when = (iso) => el("span", { title: iso || "" }, ago(iso));

  function clock(iso) {
    if (!iso) return null;
    const d = new Date(iso);
    const sameDay = d.toDateString() === new Date().toDateString();
    return (sameDay ? d.toLocaleTimeString() : d.toLocaleString()) + " (" + ago(iso) + ")";
  }

  // -- talking to the API ----------------------------------------------------------------

  async function getJSON(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" } });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  function askToken() {
    return new Promise((resolve) => {
      const dialog = $("token-dialog");
      const input = $("token-input");
      input.value = sessionStorage.getItem(TOKEN_KEY) || "";
      const done = (value) => {
        dialog.close();
        $("token-save").onclick = $("token-cancel").onclick = input.onkeydown = null;
        resolve(value);
      };
      $("token-save").onclick = () => {
        const token = input.value.trim();
        if (token) sessionStorage.setItem(TOKEN_KEY, token);
        done(token || null);
      };
      $("token-cancel").onclick = () => done(null);
      input.onkeydown = (e) => { if (e.key === "Enter") $("token-save").click(); };
      dialog.showModal();
      input.focus();
    });
  }

  async function write(path) {
    let token = sessionStorage.getItem(TOKEN_KEY) || (await askToken());
    for (let tries = 0; token && tries < 2; tries++) {
      const response = await fetch(path, { method: "POST", headers: { Authorization: "Bearer " + token } });
      const body = await response.json();
      if (response.status !== 401) {
        if (!response.ok) throw new Error(body.error || response.statusText);
        return body;
      }
      sessionStorage.removeItem(TOKEN_KEY);
      token = await askToken();
    }
    throw new Error("no valid token given");
  }

  // -- the sections ----------------------------------------------------------------------

  function renderStats(stats) {
    const totals = $("totals");
    totals.replaceChildren(...STATUSES.map((s) =>
      el("div", { class: "total " + s },
        el("span", { class: "number", id: "count-" + s }, stats.totals[s] ?? 0),
        el("span", { class: "label" }, s))));
    const sup = stats.supervisor;
    $("supervisor").textContent = sup.workers_busy + "/" + sup.pool_size + " busy · " + sup.owner +
      " · v" + sup.version + (sup.stopping ? " · stopping" : "");
    const types = new Set();
    for (const byType of Object.values(stats.by_type)) for (const t of Object.keys(byType)) types.add(t);
    const rows = [...types].sort().map((type) => el("tr", null, el("td", { class: "type" }, type),
      ...STATUSES.map((s) => el("td", { class: "num" }, (stats.by_type[s] || {})[type] || 0))));
    table($("by-type"), ["type", ...STATUSES], rows, "no tasks yet");
  }

  function renderRunning(data) {
    $("running-count").textContent = data.tasks.length || "";
    const rows = data.tasks.map((t) => {
      const progress = t.progress === null ? el("progress", { max: 1 }) : el("progress", { max: 1, value: t.progress });
      const pct = t.progress === null ? "" : Math.round(t.progress * 100) + "%";
      return taskRow(t, [
        el("td", { class: "type" }, t.type, t.cancel_requested ? el("div", { class: "muted" }, "stopping…") : null),
        el("td", null, shortId(t.id)),
        el("td", { class: "num" }, duration(t.elapsed_s)),
        el("td", { class: "progress-cell" }, progress, el("span", { class: "pct" }, pct),
          el("div", { class: "message" }, t.progress_message || "")),
        el("td", { class: "num" }, bytes(t.rss_bytes)),
        el("td", { class: "num" }, t.cpu_percent === null ? duration(t.cpu_s) : t.cpu_percent + "%"),
        el("td", { class: "num" }, t.attempt + "/" + t.max_attempts),
      ]);
    });
    table($("running"), ["type", "id", "elapsed", "progress", "RSS", "CPU", "attempt"], rows, "nothing running");
  }

  function renderQueued(data, total) {
    $("queued-count").textContent = total || "";
    const rows = data.tasks.map((t) => taskRow(t, [
      el("td", { class: "type" }, t.type),
      el("td", null, shortId(t.id)),
      el("td", { class: "num" }, t.priority),
      el("td", null, t.due ? "due" : el("span", { title: t.run_after }, ago(t.run_after))),
      el("td", null, when(t.created_at)),
    ]));
    table($("queued"), ["type", "id", "priority", "runs", "enqueued"], rows, "the queue is empty");
  }

  function renderFailures(data) {
    const rows = data.tasks.map((t) => taskRow(t, [
      el("td", { class: "type" }, t.type),
      el("td", null, el("span", { class: "pill failed" }, t.outcome || "failed")),
      el("td", { class: "reason" }, t.error || ""),
      el("td", null, when(t.completed_at)),
    ]));
    table($("failures"), ["type", "outcome", "reason", "when"], rows, "no failures");
  }

  function renderTasks(data) {
    const rows = data.tasks.map((t) => taskRow(t, [
      el("td", null, shortId(t.id)),
      el("td", { class: "type" }, t.type),
      el("td", null, statusPill(t.status)),
      el("td", { class: "num" }, t.attempts + "/" + t.max_attempts),
      el("td", null, when(t.created_at)),
      el("td", { class: "reason" }, t.error || ""),
    ]));
    table($("tasks"), ["id", "type", "status", "attempts", "enqueued", "error"], rows, "no tasks");
    state.next = data.next_before;
    $("older").disabled = !data.next_before;
    $("newer").disabled = !state.before;
  }

  function renderChart(data) {
    const box = $("chart");
    const width = Math.max(box.clientWidth, 300);
    const height = 150, left = 34, bottom = 18, top = 8;
    const buckets = data.buckets;
    const max = Math.max(1, ...buckets.map((b) => b.succeeded + b.failed + b.other));
    const nice = max <= 5 ? max : Math.ceil(max / 5) * 5;
    const y = (v) => top + (height - top - bottom) * (1 - v / nice);
    const barW = (width - left) / buckets.length;
    const chart = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
      "aria-label": "finished attempts per minute over the last hour" });
    for (const v of [0, nice / 2, nice]) {
      chart.append(svg("line", { x1: left, x2: width, y1: y(v), y2: y(v), class: "grid" }));
      chart.append(svg("text", { x: left - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" },
        Number.isInteger(v) ? v : v.toFixed(1)));
    }
    buckets.forEach((b, i) => {
      let base = 0;
      const x = left + i * barW + 1;
      for (const kind of ["succeeded", "failed", "other"]) {
        if (!b[kind]) continue;
        const rect = svg("rect", { x, width: Math.max(1, barW - 2), y: y(base + b[kind]),
          height: y(base) - y(base + b[kind]), class: "bar " + kind });
        rect.append(svg("title", null, new Date(b.at).toLocaleTimeString() + ": " + b[kind] + " " + kind));
        chart.append(rect);
        base += b[kind];
      }
    });
    [0, 15, 30, 45, 60].forEach((m) => {
      chart.append(svg("text", { x: left + m * barW, y: height - 4, class: "axis",
        "text-anchor": m === 0 ? "start" : m === 60 ? "end" : "middle" }, m === 60 ? "now" : "-" + (60 - m) + "m"));
    });
    box.replaceChildren(chart);
  }

  // -- the task detail -------------------------------------------------------------------

  async function openDetail(id) {
    state.detailId = id;
    $("detail-message").textContent = "";
    await renderDetail();
    if (!$("detail").open) $("detail").showModal();
  }

  async function renderDetail() {
    const id = state.detailId;
    if (!id) return;
    let t;
    try {
      t = await getJSON("/api/tasks/" + encodeURIComponent(id));
    } catch (err) {
      $("detail-message").textContent = String(err.message || err);
      return;
    }
    $("detail-title").replaceChildren(el("span", { class: "type" }, t.type), " ", statusPill(t.status));
    const fields = [
      ["id", t.id], ["attempts", t.attempts + " of " + t.max_attempts], ["priority", t.priority],
      ["enqueued", clock(t.created_at)], ["runs after", clock(t.run_after)],
      ["started", clock(t.started_at)], ["completed", clock(t.completed_at)],
      ["outcome", t.outcome], ["error", t.error],
      ["progress", t.progress === null ? null : Math.round(t.progress * 100) + "% " + (t.progress_message || "")],
      ["depends on", t.depends_on.join(", ")], ["dedupe key", t.dedupe_key],
      ["timeout", t.timeout_s === null ? null : duration(t.timeout_s)],
      ["memory", t.memory_mb === null ? null : t.memory_mb + " MiB"],
      ["cancel requested", t.cancel_requested ? "yes" : null], ["pid", t.pid],
    ].filter(([, v]) => v !== null && v !== undefined && v !== "");
    $("detail-fields").replaceChildren(...fields.flatMap(([k, v]) => [el("dt", null, k), el("dd", null, v)]));
    $("detail-payload").textContent = JSON.stringify(t.payload, null, 2);
    const hasResult = t.result !== undefined && t.result !== null;
    $("detail-result").textContent = hasResult ? JSON.stringify(t.result, null, 2) : "";
    $("detail-result").hidden = $("detail-result-title").hidden = !hasResult;
    const rows = t.history.map((a) => el("tr", null,
      el("td", { class: "num" }, a.attempt),
      el("td", null, a.outcome ? el("span", { class: "pill " + (a.outcome === "succeeded" ? "succeeded" : "failed") }, a.outcome) : "running"),
      el("td", { class: "reason" }, a.reason || (a.error && a.error.message) || ""),
      el("td", null, when(a.started_at)),
      el("td", { class: "num" }, duration(a.wall_s)),
      el("td", { class: "num" }, bytes(a.peak_rss_bytes)),
      el("td", { class: "num" }, a.cpu_s === null ? "–" : duration(a.cpu_s)),
      el("td", null, a.signal || (a.exit_code !== null ? "exit " + a.exit_code
        : a.ran_in === "relay" ? "in the relay" : ""))));
    table($("attempts"), ["#", "outcome", "reason", "started", "wall", "peak RSS", "CPU", "exit"], rows, "not run yet");
    const last = t.history.length ? t.history[t.history.length - 1] : null;
    const trace = last && last.error && last.error.traceback ? last.error.traceback : "";
    $("detail-traceback").textContent = trace;
    $("detail-traceback").hidden = $("detail-traceback-title").hidden = !trace;
    $("cancel-task").hidden = !["blocked", "queued", "running"].includes(t.status) || t.cancel_requested;
    $("retry-task").hidden = !["failed", "cancelled"].includes(t.status);
    await renderOutput(t);
  }

  // Streamed output (ctx.stream) and the stdout/stderr log of the task shown.
  async function renderOutput(t) {
    try {
      const [out, logs] = await Promise.all([
        getJSON("/api/tasks/" + encodeURIComponent(t.id) + "/output"),
        getJSON("/api/tasks/" + encodeURIComponent(t.id) + "/logs")]);
      if (state.detailId !== t.id) return;
      state.output = { id: t.id, attempt: out.attempt, text: out.text };
      showOutput(out.truncated ? " (cut at max_output_bytes)" : t.status === "running" ? " (live)" : "");
      $("detail-log").textContent = logs.text;
      $("detail-log-attempt").textContent = logs.attempt ? "attempt " + logs.attempt : "";
      $("detail-log").hidden = $("detail-log-title").hidden = !logs.text;
    } catch (err) {
      $("detail-message").textContent = String(err.message || err);
    }
  }

  function showOutput(note) {
    const pre = $("detail-output");
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = state.output.text;
    pre.hidden = $("detail-output-title").hidden = !state.output.text;
    if (note !== undefined) $("detail-output-live").textContent = note;
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }

  function onOutput(d) {
    const out = state.output;
    if (d.id !== state.detailId || out.id !== d.id) return;
    if (d.attempt !== out.attempt) { out.attempt = d.attempt; out.text = ""; }
    if (d.pos === out.text.length) out.text += d.text;       // in order: append
    else if (d.pos + d.text.length > out.text.length) {       // a gap: read it whole
      renderDetail();
      return;
    }
    showOutput(d.truncated ? " (cut at max_output_bytes)" : " (live)");
  }

  // -- the event stream: refresh on task changes instead of polling -----------------------

  function scheduleRefresh() {
    if (state.pending) return;
    state.pending = setTimeout(() => { state.pending = null; refresh(); }, EVENT_DEBOUNCE_MS);
  }

  function connectEvents() {
    if (!window.EventSource) return;
    const es = new EventSource("/api/events");
    // The other panels (workflow.js) follow the stream through these document events.
    const share = (name, detail) => document.dispatchEvent(new CustomEvent(name, { detail }));
    es.addEventListener("open", () => {
      state.live = true;
      $("updated").dataset.live = "true";
      share("taskvisor:stream", { live: true });
      scheduleRefresh();  // whatever changed while it was down
    });
    es.addEventListener("task", (e) => {
      const d = JSON.parse(e.data);
      if (d.id === state.detailId) state.detailDirty = true;
      share("taskvisor:task", d);
      scheduleRefresh();
    });
    es.addEventListener("output", (e) => onOutput(JSON.parse(e.data)));
    es.addEventListener("gap", () => { share("taskvisor:task", null); scheduleRefresh(); });
    es.addEventListener("error", () => {
      // EventSource reconnects by itself (sending Last-Event-ID); poll meanwhile.
      share("taskvisor:stream", { live: false });
      state.live = false;
      delete $("updated").dataset.live;
      clearTimeout(state.timer);
      state.timer = setTimeout(refresh, REFRESH_MS);
    });
  }

  async function act(verb) {
    const id = state.detailId;
    $("detail-message").textContent = verb === "cancel" ? "cancelling…" : "retrying…";
    try {
      const t = await write("/api/tasks/" + encodeURIComponent(id) + "/" + verb);
      $("detail-message").textContent = verb === "cancel"
        ? (t.status === "running" ? "cancel requested: the task is being stopped" : "cancelled")
        : "queued again";
    } catch (err) {
      $("detail-message").textContent = "failed: " + (err.message || err);
    }
    await renderDetail();
    refresh();
  }

  // -- flow control: limits and schedules -------------------------------------------------

  function renderLimits(data) {
    const rows = data.limits.map((l) => {
      const a = l.available;
      const left = [a.requests === null ? null : a.requests.toFixed(1) + " req",
        a.tokens === null ? null : a.tokens + " tok",
        a.concurrency === null ? null : l.running + "/" + l.concurrency + " running"].filter(Boolean);
      const state = l.paused_until ? "paused until " + clock(l.paused_until)
        : l.blocked_by ? "full: " + l.blocked_by : "room";
      return el("tr", null,
        el("td", { class: "type" }, l.key),
        el("td", null, left.join(", ") || "–"),
        el("td", { class: "num" }, l.waiting),
        el("td", null, l.oldest_waiting_at ? ago(l.oldest_waiting_at) : "–"),
        el("td", { class: "reason", title: l.pause_reason || "" },
          el("span", { class: "pill " + (state === "room" ? "succeeded" : "failed") }, state)));
    });
    table($("limits"), ["key", "left", "waiting", "oldest", "state"], rows, "no limits configured");
  }

  function renderSchedules(data) {
    const rows = data.schedules.map((s) => {
      const button = el("button", { type: "button", class: "ghost" }, s.paused ? "Resume" : "Pause");
      button.addEventListener("click", () => pauseSchedule(s.name, !s.paused));
      return el("tr", null,
        el("td", { class: "type" }, s.name),
        el("td", null, (s.cron || "every " + duration(s.every_s)) + (s.timezone === "UTC" ? "" : " " + s.timezone)),
        el("td", null, s.type),
        el("td", null, s.last_fire_at ? when(s.last_fire_at) : "–"),
        el("td", null, s.paused ? el("span", { class: "pill failed" }, "paused") : clock(s.next_fire_at)),
        el("td", null, button));
    });
    table($("schedules"), ["name", "when", "type", "last fire", "next fire", ""], rows, "no schedules configured");
  }

  async function pauseSchedule(name, pause) {
    $("schedules-message").textContent = pause ? "pausing…" : "resuming…";
    try {
      await write("/api/schedules/" + encodeURIComponent(name) + "/" + (pause ? "pause" : "resume"));
      $("schedules-message").textContent = name + (pause ? " paused" : " resumed");
    } catch (err) {
      $("schedules-message").textContent = "failed: " + (err.message || err);
    }
    refreshFlow();
  }

  async function refreshFlow() {
    const [limits, schedules] = await Promise.all([getJSON("/api/limits"), getJSON("/api/schedules")]);
    renderLimits(limits);
    renderSchedules(schedules);
  }

  // -- the refresh loop ------------------------------------------------------------------

  async function refresh() {
    clearTimeout(state.timer);
    const status = $("status-filter").value;
    const query = new URLSearchParams({ limit: 20 });
    if (status) query.set("status", status);
    if (state.before) query.set("before", state.before);
    try {
      const [stats, running, queued, failures, tasks, health] = await Promise.all([
        getJSON("/api/stats"), getJSON("/api/running"), getJSON("/api/queued?limit=20"),
        getJSON("/api/tasks?status=failed&limit=8"), getJSON("/api/tasks?" + query),
        fetch("/healthz").then((r) => r.json())]);
      renderStats(stats);
      renderRunning(running);
      renderQueued(queued, stats.totals.queued);
      renderFailures(failures);
      renderTasks(tasks);
      await refreshFlow();
      const ok = health.status === "ok";
      $("health").className = "pill " + (ok ? "succeeded" : "failed");
      $("health").textContent = ok ? "healthy" : "unhealthy";
      $("health").title = health.reasons.join("; ");
      $("updated").textContent = (state.live ? "live, updated " : "updated ") + new Date().toLocaleTimeString();
      if (Date.now() - state.chartAt > CHART_MS) {
        state.chartAt = Date.now();
        renderChart(await getJSON("/api/throughput"));
      }
      if ($("detail").open && (!state.live || state.detailDirty)) {
        state.detailDirty = false;
        await renderDetail();
      }
    } catch (err) {
      $("health").className = "pill failed";
      $("health").textContent = "offline";
      $("health").title = String(err.message || err);
    }
    document.body.dataset.loaded = "true";
    clearTimeout(state.timer);
    state.timer = setTimeout(refresh, state.live ? LIVE_REFRESH_MS : REFRESH_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    window.taskvisorOpenTask = openDetail;  // for workflow.js: a graph node opens its task
    $("close-detail").addEventListener("click", () => { $("detail").close(); state.detailId = null; });
    $("detail").addEventListener("close", () => { state.detailId = null; });
    $("cancel-task").addEventListener("click", () => act("cancel"));
    $("retry-task").addEventListener("click", () => act("retry"));
    $("token-button").addEventListener("click", () => askToken());
    $("token-forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      $("token-input").value = "";
      $("token-cancel").click();
    });
    $("status-filter").addEventListener("change", () => { state.before = null; refresh(); });
    $("older").addEventListener("click", () => { state.before = state.next; refresh(); });
    $("newer").addEventListener("click", () => { state.before = null; refresh(); });
    window.addEventListener("resize", () => { state.chartAt = 0; });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
    refresh();
    connectEvents();
  });
})();
