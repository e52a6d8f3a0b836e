// The nerve dashboard: topology with live rates, function charts, live event stream,
// dead-letter browser and flow search. Talks to /api/* of `nerve run` (nerve/observe/web.py).
// Everything received is rendered as text (textContent), never as HTML.
import cytoscape from "cytoscape";
import uPlot from "uplot";

const POLL_MS = 1000;
const WINDOW = 120; // points kept per chart (2 minutes at 1 s)
const MAX_ROWS = 500; // rows kept in the live event table

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
};

// -- API ------------------------------------------------------------------------------

function headers() {
  const key = localStorage.getItem("nerve-key");
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 401) {
    askKey("This server needs an API key.");
    throw new Error("unauthenticated");
  }
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new Error(body?.detail || body?.title || `HTTP ${response.status}`);
  return body;
}

function askKey(reason) {
  const key = prompt(`${reason}\nPaste an API key (nrv_...). It is kept in this browser only.`);
  if (key) { localStorage.setItem("nerve-key", key.trim()); location.reload(); }
}
$("key-button").addEventListener("click", () => askKey("API key for this dashboard."));

function setStatus(text, ok) {
  const node = $("status");
  node.textContent = text;
  node.className = `status ${ok ? "ok" : "bad"}`;
}

const fmt = (n) => (n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2));
const ms = (s) => (s == null ? "–" : s < 1 ? `${(s * 1000).toFixed(1)} ms` : `${s.toFixed(2)} s`);
const clock = (t) => (t ? new Date(t * 1000).toLocaleTimeString(undefined, { hour12: false }) + "." + String(Math.floor((t % 1) * 1000)).padStart(3, "0") : "–");

// -- tabs -----------------------------------------------------------------------------

function show(tab) {
  for (const b of document.querySelectorAll("button.tab")) b.classList.toggle("active", b.dataset.tab === tab);
  for (const p of document.querySelectorAll(".panel")) p.classList.toggle("active", p.id === tab);
  if (tab === "overview" && graph) graph.resize();
  if (tab === "dlq") loadDlq();
  if (tab === "events") startStream();
}
for (const b of document.querySelectorAll("button.tab")) b.addEventListener("click", () => show(b.dataset.tab));

// -- overview: topology and charts ------------------------------------------------------

let overview = null;
let graph = null;
const charts = {}; // function -> {throughput, latency, load, data}
let previous = null; // the previous /api/stats sample

function buildGraph(topology) {
  const targets = new Set(topology.edges.map((e) => e.target));
  const roots = topology.nodes.filter((n) => !targets.has(n.id)).map((n) => n.id);
  graph = cytoscape({
    container: $("graph"),
    elements: [
      ...topology.nodes.map((n) => ({ data: { id: n.id, label: n.label, kind: n.kind } })),
      ...topology.edges.map((e) => ({ data: { id: e.id, source: e.source, target: e.target, kind: e.kind, rate: 0, label: "" } })),
    ],
    layout: { name: "breadthfirst", directed: true, roots, spacingFactor: 1.1, padding: 20 },
    style: [
      { selector: "node", style: { label: "data(label)", color: "#d8dee6", "font-size": 11, "text-valign": "center", "text-halign": "center", "text-wrap": "wrap", "text-max-width": 110 } },
      { selector: "node[kind = 'event']", style: { shape: "round-rectangle", "background-color": "#1d3b52", "border-color": "#4fb3ff", "border-width": 1, width: 120, height: 28 } },
      { selector: "node[kind = 'function']", style: { shape: "ellipse", "background-color": "#2d2756", "border-color": "#8b7cff", "border-width": 2, width: 96, height: 40, "font-weight": "bold" } },
      { selector: "node[kind = 'producer']", style: { shape: "diamond", "background-color": "#2a3a2a", "border-color": "#3ecf8e", "border-width": 1, width: 90, height: 40 } },
      { selector: "edge", style: { width: "mapData(rate, 0, 50, 1, 8)", "line-color": "#3a4654", "target-arrow-color": "#3a4654", "target-arrow-shape": "triangle", "curve-style": "bezier", label: "data(label)", "font-size": 10, color: "#3ecf8e", "text-background-color": "#171d24", "text-background-opacity": 1 } },
      { selector: "edge[rate > 0]", style: { "line-color": "#3ecf8e", "target-arrow-color": "#3ecf8e" } },
      { selector: "node.failing", style: { "border-color": "#ff5d5d", "border-width": 3 } },
    ],
  });
  // breadthfirst lays out top-down: turn it left-to-right, which fits a wide screen
  graph.nodes().positions((n) => ({ x: n.position("y") * 1.8, y: n.position("x") * 0.7 }));
  graph.fit(undefined, 20);
  window.nerve = { graph };
  graph.on("tap", "node[kind = 'function']", (evt) => {
    const name = evt.target.data("label");
    $("filter-function").value = name; $("filter-type").value = ""; show("events");
  });
  graph.on("tap", "node[kind = 'event']", (evt) => {
    $("filter-type").value = evt.target.data("label"); $("filter-function").value = ""; show("events");
  });
}

function chart(container, title, series) {
  const opts = {
    title, width: 400, height: 130, cursor: { show: false }, legend: { show: true },
    scales: { x: { time: true } },
    axes: [{ stroke: "#7d8a99", grid: { stroke: "#26303b" } }, { stroke: "#7d8a99", grid: { stroke: "#26303b" }, size: 50 }],
    series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 1.5 }))],
  };
  const data = [[], ...series.map(() => [])];
  return { plot: new uPlot(opts, data, container), data };
}

function push(c, t, values) {
  c.data[0].push(t);
  values.forEach((v, i) => c.data[i + 1].push(v));
  if (c.data[0].length > WINDOW) for (const a of c.data) a.shift();
  c.plot.setData(c.data);
}

function buildFunctions(functions) {
  const box = $("functions");
  box.replaceChildren();
  for (const name of Object.keys(functions)) {
    const nums = el("div", { class: "nums", "data-testid": `fn-nums-${name}` });
    const card = el("div", { class: "fn", "data-testid": `fn-${name}` }, el("h3", { text: name }), nums);
    const a = el("div"), b = el("div"), c = el("div");
    card.append(a, b, c);
    box.append(card);
    charts[name] = {
      nums,
      throughput: chart(a, "throughput / errors (per s)", [["processed/s", "#3ecf8e"], ["failed/s", "#ff5d5d"]]),
      latency: chart(b, "handler time / end-to-end latency (ms)", [["p50", "#4fb3ff"], ["p99", "#f5b841"], ["e2e p99", "#e38cff"]]),
      load: chart(c, "backlog / concurrency", [["backlog", "#f5b841"], ["running", "#8b7cff"], ["in flight", "#4fb3ff"]]),
    };
  }
}

function quantile(bounds, counts, q) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (!total) return null;
  const rank = q * total;
  let seen = 0, lower = 0;
  for (let i = 0; i < bounds.length; i++) {
    const n = counts[i];
    if (n && seen + n >= rank) return lower + (bounds[i] - lower) * ((rank - seen) / n);
    seen += n; lower = bounds[i];
  }
  return bounds[bounds.length - 1];
}

function windowed(now, before, key, q) {
  const h = now[key];
  if (!h) return null;
  const counts = h.counts.map((n, i) => n - (before?.[key]?.counts[i] || 0));
  const v = quantile(h.bounds, counts, q);
  return v == null ? null : v * 1000;
}

function sum(obj) { return Object.values(obj || {}).reduce((a, b) => a + b, 0); }

async function poll() {
  let stats;
  try {
    stats = await api("/api/stats");
    setStatus("live", true);
  } catch (err) {
    setStatus(`disconnected: ${err.message}`, false);
    return;
  }
  const dt = previous ? Math.max(0.001, stats.time - previous.time) : null;
  let processed = 0, failed = 0, backlog = 0, dlq = 0, rate = 0;
  for (const [name, f] of Object.entries(stats.functions)) {
    const was = previous?.functions[name];
    processed += f.processed; failed += f.failed; backlog += f.backlog; dlq += f.dlq;
    const perSec = was && dt ? (f.processed - was.processed) / dt : 0;
    const failPerSec = was && dt ? (f.failed - was.failed) / dt : 0;
    rate += perSec;
    const c = charts[name];
    if (!c) continue;
    c.nums.replaceChildren(
      ...[["processed", f.processed], ["failed", f.failed], ["retried", f.retried], ["dead", f.dead_lettered],
        ["backlog", f.backlog], ["in flight", f.in_flight], ["running", `${f.active}/${f.limit}`], ["DLQ", f.dlq]]
        .map(([k, v]) => el("span", { class: (k === "DLQ" || k === "dead") && v ? "bad" : "" }, `${k} `, el("b", { text: String(v) }))),
    );
    const t = stats.time;
    push(c.throughput, t, [perSec, failPerSec]);
    push(c.latency, t, [windowed(f, was, "duration_hist", 0.5), windowed(f, was, "duration_hist", 0.99), windowed(f, was, "latency_hist", 0.99)]);
    push(c.load, t, [f.backlog, f.active, f.in_flight]);
    graph?.$id(`fn:${name}`).toggleClass("failing", f.dlq > 0 || failPerSec > 0);
    // edge rates: events of each type this function processed, and emitted
    if (graph && was && dt && f.by_type) {
      for (const [type, n] of Object.entries(f.by_type.processed)) setRate(`${type}->${name}`, (n - (was.by_type?.processed[type] || 0)) / dt);
      for (const [type, n] of Object.entries(f.by_type.published)) setRate(`${name}->${type}`, (n - (was.by_type?.published[type] || 0)) / dt);
    }
  }
  if (graph && previous && dt) {
    for (const [type, n] of Object.entries(stats.client_published || {})) setRate(`clients->${type}`, (n - (previous.client_published?.[type] || 0)) / dt);
  }
  $("total-processed").textContent = String(processed);
  $("total-rate").textContent = previous ? fmt(rate) : "0";
  $("total-failed").textContent = String(failed);
  $("total-backlog").textContent = String(backlog);
  $("total-dlq").textContent = String(dlq);
  $("dlq-count").textContent = String(dlq);
  previous = stats;
}

function setRate(edgeId, rate) {
  const edge = graph.$id(edgeId);
  if (!edge.nonempty()) return;
  edge.data("rate", rate);
  edge.data("label", rate > 0 ? `${fmt(rate)}/s` : "");
}

// -- events: a page, then the live stream ----------------------------------------------

let stream = null; // AbortController of the running stream
let oldest = null;

function eventRow(e, fresh) {
  const row = el("tr", { class: fresh ? "new" : "", "data-id": e.id },
    el("td", { text: clock(e.time) }),
    el("td", { class: "type", text: e.type }),
    el("td", { class: "subject", text: e.subject || (e.key ? `key=${e.key}` : "") }),
    el("td", { text: e.id }),
    el("td", { text: typeof e.data === "string" ? e.data : JSON.stringify(e.data) }));
  row.addEventListener("click", () => findFlow("id", e.id));
  return row;
}

function filterQuery(extra = {}) {
  const params = new URLSearchParams();
  const type = $("filter-type").value, fn = $("filter-function").value, subject = $("filter-subject").value.trim();
  if (type) params.set("type", type);
  if (fn) params.set("function", fn);
  if (subject) params.set("subject", subject);
  for (const [k, v] of Object.entries(extra)) params.set(k, v);
  return params.toString();
}

async function loadPage(more) {
  const extra = { limit: "50" };
  if (more && oldest != null) extra.before = String(oldest);
  const { events } = await api(`/api/events?${filterQuery(extra)}`);
  const rows = $("event-rows");
  if (!more) rows.replaceChildren();
  for (const e of events) rows.append(eventRow(e, false));
  if (events.length) oldest = events[events.length - 1].position;
}

async function startStream() {
  if (stream) stream.abort();
  const controller = new AbortController();
  stream = controller;
  oldest = null;
  try { await loadPage(false); } catch (err) { $("stream-note").textContent = err.message; return; }
  $("stream-note").textContent = "live";
  try {
    const response = await fetch(`/api/stream?${filterQuery()}`, { headers: headers(), signal: controller.signal });
    if (!response.ok) { $("stream-note").textContent = `stream: HTTP ${response.status}`; return; }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        onFrame(frame);
      }
    }
  } catch (err) {
    if (controller.signal.aborted) return;
  }
  if (stream === controller) { $("stream-note").textContent = "stream ended; reconnecting…"; setTimeout(() => stream === controller && startStream(), 2000); }
}

function onFrame(frame) {
  let kind = "message", data = "";
  for (const line of frame.split("\n")) {
    if (line.startsWith("event: ")) kind = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  if (kind === "skipped") { $("stream-note").textContent = `live (skipped ${data} events: too fast to show)`; return; }
  if (kind !== "event" || $("stream-pause").checked) return;
  const rows = $("event-rows");
  rows.prepend(eventRow(JSON.parse(data), true));
  while (rows.children.length > MAX_ROWS) rows.lastChild.remove();
}

$("event-filters").addEventListener("submit", (e) => { e.preventDefault(); startStream(); });
$("older").addEventListener("click", () => loadPage(true));

// -- dead letters ----------------------------------------------------------------------

async function loadDlq() {
  const fn = $("dlq-function").value;
  let entries;
  try {
    ({ entries } = await api(`/api/dlq?limit=500${fn ? `&function=${encodeURIComponent(fn)}` : ""}`));
  } catch (err) { $("dlq-note").textContent = err.message; return; }
  const rows = $("dlq-rows");
  rows.replaceChildren();
  for (const entry of entries) {
    const f = entry.failure;
    const box = el("input", { type: "checkbox", "data-entry": entry.id, onclick: (e) => e.stopPropagation() });
    const row = el("tr", { "data-testid": `dlq-row-${entry.id}` },
      el("td", {}, box), el("td", { text: entry.id }), el("td", { text: entry.function }),
      el("td", { class: "type", text: entry.event?.type || "(undecodable)" }), el("td", { text: f.reason }),
      el("td", { text: String(f.attempts) }), el("td", { text: clock(f.failed_at) }),
      el("td", { class: "err", text: `${f.error_type}: ${f.message}` }));
    row.addEventListener("click", () => inspect(entry.id));
    rows.append(row);
  }
  $("dlq-note").textContent = `${entries.length} dead letter${entries.length === 1 ? "" : "s"}`;
}

async function inspect(id) {
  const entry = await api(`/api/dlq/${encodeURIComponent(id)}`);
  $("dlq-detail").textContent = JSON.stringify(entry, null, 2);
}

function selected() { return [...document.querySelectorAll("#dlq-rows input:checked")].map((b) => b.dataset.entry); }

async function dlqAction(action, ids) {
  if (!ids.length) { $("dlq-note").textContent = "select dead letters first"; return; }
  if (action === "purge" && !confirm(`Delete ${ids.length} dead letter(s) for good?`)) return;
  try {
    const result = await api(`/admin/dlq/${action}`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ ids }) });
    await loadDlq();
    $("dlq-note").textContent = action === "replay" ? `replayed ${result.replayed}` : `purged ${result.purged}`;
    $("dlq-detail").textContent = "";
  } catch (err) { $("dlq-note").textContent = `${action} failed: ${err.message}`; }
}

$("dlq-refresh").addEventListener("click", loadDlq);
$("dlq-function").addEventListener("change", loadDlq);
$("dlq-replay").addEventListener("click", () => dlqAction("replay", selected()));
$("dlq-replay-all").addEventListener("click", () => dlqAction("replay", [...document.querySelectorAll("#dlq-rows input")].map((b) => b.dataset.entry)));
$("dlq-purge").addEventListener("click", () => dlqAction("purge", selected()));
$("dlq-all").addEventListener("change", (e) => { for (const b of document.querySelectorAll("#dlq-rows input")) b.checked = e.target.checked; });

// -- flow search: the causal chain as a timeline ---------------------------------------

async function findFlow(kind, text) {
  $("search-kind").value = kind; $("search-text").value = text;
  show("flow");
  const box = $("flow-result");
  box.replaceChildren(el("p", { class: "muted", text: "searching…" }));
  let flows;
  try { ({ flows } = await api(`/api/flow?${kind}=${encodeURIComponent(text)}`)); }
  catch (err) { box.replaceChildren(el("p", { class: "err", text: err.message })); return; }
  if (!flows.length) { box.replaceChildren(el("p", { class: "muted", text: `nothing found for ${kind} ${text}` })); return; }
  box.replaceChildren(...flows.map((f) => renderFlow(f, kind === "id" ? text : null)));
}

function flatten(node, depth, out) {
  out.push([node, depth]);
  for (const child of [...node.children].sort((a, b) => a.position - b.position)) flatten(child, depth + 1, out);
  return out;
}

function renderFlow(root, highlight) {
  const steps = flatten(root, 0, []);
  const start = root.time;
  let end = start;
  for (const [n] of steps) for (const o of n.outcomes) if (o.at && o.state !== "retrying") end = Math.max(end, o.at);
  for (const [n] of steps) end = Math.max(end, n.time || start);
  const span = Math.max(end - start, 0.001);
  const x = (t) => `${(100 * (t - start)) / span}%`;
  const dead = steps.reduce((a, [n]) => a + n.outcomes.filter((o) => o.state === "dead-lettered").length, 0);
  const box = el("div", { class: "flow", "data-testid": "flow" },
    el("h3", { text: `flow ${root.correlation} · ${steps.length} events · ${ms(span)}${dead ? ` · ${dead} dead-lettered` : ""}` }));
  for (const [n, depth] of steps) {
    const lane = el("div", { class: "lane" }, el("span", { class: "dot", style: `left:calc(${x(n.time)} - 5px)` }));
    for (const o of n.outcomes) {
      if (o.at && o.state !== "retrying") {
        lane.append(el("span", { class: "bar", style: `left:${x(n.time)};width:${(100 * Math.max(o.at - n.time, 0)) / span}%`, title: `${o.function} ${o.state}` }));
      }
    }
    const what = el("div", { class: "what", style: `padding-left:${depth * 16}px` },
      el("span", { class: "muted", text: `+${ms(n.time - start)} ` }),
      el("b", { class: "type", text: n.type }),
      el("span", { class: "subject", text: n.subject ? `  ${n.subject}` : "" }),
      el("span", { class: "muted", text: `  ${n.id}`, style: n.id === highlight ? "color:#fff" : "" }));
    box.append(el("div", { class: "step", "data-testid": "flow-step" }, what, lane));
    const chips = n.outcomes.map((o) => el("span", {
      class: `chip ${o.state}`,
      text: `${o.state === "processed" ? "✓" : o.state === "dead-lettered" ? "✗" : "…"} ${o.function} ${o.state}` +
        (o.at && o.state !== "retrying" ? ` +${ms(o.at - n.time)}` : "") + (o.attempts ? ` (${o.attempts} attempts)` : "") + (o.error ? ` ${o.error}` : ""),
    }));
    box.append(el("div", { class: "outcomes", style: `padding-left:${depth * 16 + 16}px` }, ...chips));
  }
  return box;
}

$("search").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("search-text").value.trim();
  if (text) findFlow($("search-kind").value, text);
});

// -- start ------------------------------------------------------------------------------

async function start() {
  try {
    overview = await api("/api/overview");
  } catch (err) {
    setStatus(`cannot load: ${err.message}`, false);
    return;
  }
  $("app-name").textContent = overview.app;
  document.title = `nerve · ${overview.app}`;
  for (const type of overview.events) $("filter-type").append(el("option", { value: type, text: type }));
  for (const fn of Object.keys(overview.functions)) {
    $("filter-function").append(el("option", { value: fn, text: fn }));
    $("dlq-function").append(el("option", { value: fn, text: fn }));
  }
  buildGraph(overview.topology);
  buildFunctions(overview.functions);
  await poll();
  setInterval(poll, POLL_MS);
}

start();
