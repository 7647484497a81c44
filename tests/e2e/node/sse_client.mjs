// A taskvisor client as an Electron main process would run it: Node 20's fetch (or
// http.request over a Unix socket) and a small Server-Sent Events reader, no packages.
//
//   node sse_client.mjs <http://127.0.0.1:PORT | unix:/path/api.sock> <token or ""> <base_url>
//
// Opens /api/events, enqueues one llm.chat task, drops the stream after the first output
// event, waits, reconnects with Last-Event-ID (filtered to the task) and reads until the
// task is finished. Prints one JSON line per received event, then {"done": ...}.
import http from "node:http";

const [target, token, baseUrl] = process.argv.slice(2);
const unix = target.startsWith("unix:") ? target.slice(5) : null;

function request(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const data = body === undefined ? undefined : JSON.stringify(body);
  if (data !== undefined) headers["Content-Length"] = Buffer.byteLength(data);  // not chunked
  if (!unix) {
    return fetch(target + path, { method, headers, body: data })
      .then(async (r) => ({ status: r.status, json: await r.json() }));
  }
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath: unix, path, method, headers }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (c) => (text += c));
      res.on("end", () => resolve({ status: res.statusCode, json: JSON.parse(text) }));
    });
    req.on("error", reject);
    if (data !== undefined) req.write(data);
    req.end();
  });
}

// An async iterator of {id, event, data} from GET path; close() drops the connection.
function events(path, lastEventId) {
  const headers = { Accept: "text/event-stream" };
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  const queue = [];
  let wake = null, ended = false, failure = null, close;
  const push = (item) => { queue.push(item); if (wake) { wake(); wake = null; } };
  let buffer = "";
  const feed = (text) => {
    buffer += text;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const ev = { id: null, event: "message", data: [] };
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "id") ev.id = value;
        else if (field === "event") ev.event = value;
        else if (field === "data") ev.data.push(value);
      }
      if (ev.data.length) push({ id: ev.id, event: ev.event, data: JSON.parse(ev.data.join("\n")) });
    }
  };
  const opened = new Promise((resolve, reject) => {
    if (!unix) {
      const ctl = new AbortController();
      close = () => ctl.abort();
      fetch(target + path, { headers, signal: ctl.signal }).then(async (res) => {
        if (res.status !== 200) return reject(new Error(`events: HTTP ${res.status}`));
        resolve();
        const decoder = new TextDecoder();
        try {
          for await (const chunk of res.body) feed(decoder.decode(chunk, { stream: true }));
        } catch (e) { if (e.name !== "AbortError") failure = e; }
        ended = true; push(null);
      }, reject);
    } else {
      const req = http.request({ socketPath: unix, path, headers }, (res) => {
        if (res.statusCode !== 200) return reject(new Error(`events: HTTP ${res.statusCode}`));
        resolve();
        res.setEncoding("utf8");
        res.on("data", feed);
        res.on("close", () => { ended = true; push(null); });
      });
      close = () => req.destroy();
      req.on("error", (e) => { if (!ended) { failure = e; ended = true; push(null); } });
      req.end();
    }
  });
  return {
    opened,
    close: () => close(),
    async next() {
      while (!queue.length) await new Promise((r) => (wake = r));
      const item = queue.shift();
      if (item === null && failure) throw failure;
      return item;
    },
  };
}

const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const first = events("/api/events?type=llm.chat");
await first.opened;
const enq = await request("POST", "/api/tasks", {
  type: "llm.chat",
  payload: { messages: [{ role: "user", content: "count" }], base_url: baseUrl },
});
if (enq.status !== 201) throw new Error(`enqueue: ${enq.status} ${JSON.stringify(enq.json)}`);
const taskId = enq.json.id;
out({ enqueued: taskId });

let last = null, finished = false, reconnects = 0;
let stream = first;
while (!finished) {
  const ev = await stream.next();
  if (ev === null) throw new Error("the event stream ended");
  if (ev.data.id !== taskId) continue;
  last = ev.id;
  out(ev);
  if (ev.event === "task" && FINAL.has(ev.data.status)) finished = true;
  else if (ev.event === "output" && reconnects === 0) {
    // Drop the connection mid-stream, miss some events, come back where we left off.
    stream.close();
    reconnects++;
    await new Promise((r) => setTimeout(r, 300));
    stream = events(`/api/events?task=${taskId}`, last);
    await stream.opened;
  }
}
stream.close();
const output = await request("GET", `/api/tasks/${taskId}/output`);
out({ done: taskId, reconnects, output: output.json });
process.exit(0);
