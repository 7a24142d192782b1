// The serve dashboard: polls /api/state every 2 s and draws tables and SVG charts.
// No framework, no build step; every value from the server goes in as text, never as HTML.
"use strict";

const POLL_MS = 2000;
const TRACES_EVERY = 5; // polls (span files cost more to read than the state)
let polls = 0;
let logReplica = null;
let liveReplicas = new Set();
let shownTrace = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "onclick") node.addEventListener("click", value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function statusClass(status) {
  if (["RUNNING", "HEALTHY"].includes(status)) return "status ok";
  if (["DEPLOY_FAILED", "UNHEALTHY", "DEAD"].includes(status)) return "status bad";
  return "status warn";
}

function fill(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  if (!rows.length) {
    const columns = document.querySelectorAll(`#${tableId} thead th`).length;
    rows = [el("tr", { class: "empty" }, el("td", { class: "muted", colspan: columns }, "none"))];
  }
  body.replaceChildren(...rows);
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "-";
  if (typeof value !== "number") return String(value);
  return value.toFixed(digits === undefined ? 1 : digits);
}

function age(seconds) {
  if (seconds < 60) return `${Math.round(seconds)}s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)}m`;
  return `${(seconds / 3600).toFixed(1)}h`;
}

function clock(wallSeconds) {
  return new Date(wallSeconds * 1000).toLocaleTimeString();
}

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store", credentials: "same-origin" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status} ${await response.text()}`);
  return response.json();
}

// Charts: one SVG per series over the last window_s seconds; null values break the line.
function chart(name, key, series, now, windowS, lines, decisions) {
  const width = 300, height = 90, top = 12, bottom = 12;
  const svg = svgEl("svg", {
    class: "chart", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none",
    "data-series": name, "data-deployment": key,
  });
  let max = 0, points = 0;
  for (const line of lines) for (const v of series[line]) if (v !== null && v > max) max = v;
  svg.setAttribute("data-max", String(max));
  if (max <= 0) max = 1;
  const x = (t) => ((t - (now - windowS)) / windowS) * width;
  const y = (v) => height - bottom - (v / max) * (height - top - bottom);
  lines.forEach((line, index) => {
    let segment = [];
    const flush = () => {
      if (segment.length === 1) segment.push(segment[0]);
      if (segment.length) svg.append(svgEl("polyline", { class: `s${index}`, points: segment.join(" ") }));
      segment = [];
    };
    series[line].forEach((v, i) => {
      if (v === null) { flush(); return; }
      points += 1;
      segment.push(`${x(series.t[i]).toFixed(1)},${y(v).toFixed(1)}`);
    });
    flush();
  });
  for (const d of decisions || []) {
    const at = x(d.at_s);
    if (at >= 0) svg.append(svgEl("line", { class: "decision", x1: at, x2: at, y1: top, y2: height - bottom }));
  }
  const label = svgEl("text", { x: 2, y: 9 });
  label.textContent = `max ${fmt(max, max < 10 ? 2 : 0)}`;
  const left = svgEl("text", { x: 2, y: height - 2 });
  left.textContent = `-${Math.round(windowS / 60)} min`;
  const right = svgEl("text", { x: width - 20, y: height - 2 });
  right.textContent = "now";
  svg.append(label, left, right);
  svg.setAttribute("data-points", String(points));
  return svg;
}

function chartBox(title, svg, legend) {
  return el("div", { class: "chart-box" }, el("div", { class: "title" }, title, legend || null), svg);
}

function drawCharts(state) {
  const now = state.generated_at_s, windowS = state.window_s;
  const boxes = state.deployments.map((d) => {
    const key = `${d.app}.${d.name}`;
    const s = d.series;
    const decisions = d.autoscaling ? d.autoscaling.decisions : [];
    const last = (values) => (values.length ? values[values.length - 1] : null);
    return el("div", { class: "deployment", "data-deployment": key },
      el("h3", {}, key),
      el("div", { class: "row" },
        chartBox(`requests/s (${fmt(last(s.rps))})`, chart("rps", key, s, now, windowS, ["rps"])),
        chartBox("latency ms ", chart("latency", key, s, now, windowS, ["p50", "p99"]),
          el("span", {}, el("span", { class: "legend-a" }, `p50 ${fmt(last(s.p50))}`), " ",
            el("span", { class: "legend-b" }, `p99 ${fmt(last(s.p99))}`))),
        chartBox(`errors/s (${fmt(last(s.errors), 2)})`, chart("errors", key, s, now, windowS, ["errors"])),
        chartBox(`replicas (${fmt(last(s.replicas), 0)})`,
          chart("replicas", key, s, now, windowS, ["replicas"], decisions))));
  });
  document.getElementById("charts").replaceChildren(...boxes);
}

function draw(state) {
  const c = state.controller;
  const tracing = c.tracing.enabled
    ? `tracing on (sampling ${c.tracing.sampling_ratio})` : "tracing off";
  document.getElementById("controller").textContent =
    `controller ${c.address} - up ${age(c.uptime_s)} - ${tracing} - logs in ${c.log_dir}`;
  document.getElementById("updated").textContent = `updated ${clock(state.generated_at_s)}`;

  fill("applications", state.applications.map((a) => el("tr", { "data-app": a.name },
    el("td", {}, a.name), el("td", { class: statusClass(a.status) }, a.status),
    el("td", {}, a.route_prefix === null ? "-" : a.route_prefix), el("td", {}, a.ingress),
    el("td", {}, a.deployments.join(", ")), el("td", {}, a.message))));

  fill("deployments", state.deployments.map((d) => {
    const states = Object.entries(d.replica_states).map(([k, v]) => `${k}: ${v}`).join(", ");
    let auto = "-";
    if (d.autoscaling) {
      const latest = d.autoscaling.decisions[0];
      auto = `${d.autoscaling.min_replicas}-${d.autoscaling.max_replicas}` +
        (latest ? `; last ${latest.from} -> ${latest.to} at ${clock(latest.at_s)}` : "");
    }
    return el("tr", { "data-deployment": `${d.app}.${d.name}` },
      el("td", {}, `${d.app}.${d.name}`), el("td", { class: statusClass(d.status) }, d.status),
      el("td", {}, states || "-"), el("td", { class: "num" }, d.target_replicas),
      el("td", { class: "num" }, fmt(d.ongoing)), el("td", { class: "num" }, fmt(d.queued)),
      el("td", {}, auto), el("td", {}, d.message));
  }));

  drawCharts(state);

  liveReplicas = new Set(state.replicas.map((r) => r.id));
  fill("replicas", state.replicas.map((r) => el("tr", { "data-replica-id": r.id, "data-pid": r.pid },
    el("td", {}, r.tag), el("td", {}, `${r.app}.${r.deployment}`),
    el("td", { class: `state ${statusClass(r.state)}` }, r.state), el("td", {}, r.node || "-"),
    el("td", { class: "num" }, r.pid || "-"), el("td", {}, r.version.slice(0, 12)),
    el("td", { class: "num" }, `${fmt(r.ongoing)} / ${r.max_ongoing || "-"}`),
    el("td", { class: "num" }, r.rank >= 0 ? r.rank : "-"), el("td", {}, age(r.age_s)),
    el("td", {}, r.pending || ""),
    el("td", {}, el("button", { type: "button", onclick: () => openLog(r.id) }, "logs")))));

  fill("proxies", state.proxies.map((p) => el("tr", {},
    el("td", {}, p.node_id), el("td", { class: statusClass(p.status) }, p.status),
    el("td", { class: "num" }, p.pid || "-"), el("td", {}, p.http_address || "-"),
    el("td", {}, p.grpc_address || "-"), el("td", {}, p.message))));

  const decisions = [];
  for (const d of state.deployments) {
    for (const x of d.autoscaling ? d.autoscaling.decisions : []) decisions.push([d, x]);
  }
  decisions.sort((a, b) => b[1].at_s - a[1].at_s);
  fill("decisions", decisions.map(([d, x]) => el("tr", {},
    el("td", {}, clock(x.at_s)), el("td", {}, `${d.app}.${d.name}`),
    el("td", {}, `${x.from} -> ${x.to}`), el("td", {}, x.policy), el("td", {}, x.reason))));
}

async function openLog(replicaId) {
  logReplica = replicaId;
  document.getElementById("log-panel").hidden = false;
  await refreshLog();
}

async function refreshLog() {
  if (logReplica === null) return;
  document.getElementById("log-replica").textContent = logReplica;
  if (!liveReplicas.has(logReplica)) {
    const file = document.getElementById("log-file").textContent;
    document.getElementById("log-file").textContent =
      `This replica is gone; its log stays in ${file || "the logs directory"}.`;
    logReplica = null;
    return;
  }
  try {
    const log = await getJson(`/api/logs?replica=${encodeURIComponent(logReplica)}&lines=100`);
    document.getElementById("log-file").textContent = log.file;
    const pre = document.getElementById("log-lines");
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = log.lines.join("\n") || "(empty)";
    if (atEnd) pre.scrollTop = pre.scrollHeight; // follow the log unless scrolled up
  } catch (error) {
    document.getElementById("log-lines").textContent = String(error.message);
  }
}

function drawWaterfall(trace) {
  const box = document.getElementById("waterfall");
  if (!trace) { box.replaceChildren(); return; }
  const depth = {};
  const byId = Object.fromEntries(trace.spans.map((s) => [s.span_id, s]));
  const depthOf = (s) => {
    if (depth[s.span_id] !== undefined) return depth[s.span_id];
    const parent = byId[s.parent_id];
    depth[s.span_id] = parent && parent !== s ? depthOf(parent) + 1 : 0;
    return depth[s.span_id];
  };
  const total = Math.max(trace.duration_ms, 0.001);
  const rows = trace.spans.map((s) => {
    const detail = Object.entries(s.attributes).map(([k, v]) => `${k}=${v}`).join(" ");
    const bar = el("div", { class: s.error ? "bar error" : "bar", title: detail });
    bar.style.left = `${(s.start_ms / total) * 100}%`;
    bar.style.width = `${(s.duration_ms / total) * 100}%`;
    const name = el("div", { class: "name", title: detail }, s.name);
    name.style.paddingLeft = `${depthOf(s) * 12}px`;
    return el("div", { class: "span" }, name, el("div", { class: "bar-area" }, bar),
      el("div", { class: "num" }, `${fmt(s.duration_ms, 2)} ms`));
  });
  box.replaceChildren(el("h3", {}, `trace ${trace.trace_id}`), ...rows);
}

async function refreshTraces() {
  const result = await getJson("/api/traces");
  const note = document.getElementById("tracing");
  if (!result.enabled) {
    note.textContent = "Tracing is off: serve.start(tracing_config=TracingConfig(enabled=True)) " +
      "or SERVE_TRACING_EXPORTER_IMPORT_PATH where the controller starts.";
  } else if (!result.file_exporter) {
    note.textContent = `Spans go to ${result.exporter}; look for them there.`;
  } else {
    note.textContent = `Sampling ratio ${result.sampling_ratio}; newest first, from the span files.`;
  }
  fill("traces", result.traces.map((t) => el("tr", {
    class: "selectable", "data-trace-id": t.trace_id,
    onclick: () => { shownTrace = t.trace_id; drawWaterfall(t); },
  }, el("td", {}, clock(t.started_s)), el("td", {}, t.root), el("td", { class: "num" }, t.spans.length),
    el("td", { class: "num" }, `${fmt(t.duration_ms, 2)} ms`), el("td", {}, t.trace_id))));
  drawWaterfall(result.traces.find((t) => t.trace_id === shownTrace) || result.traces[0]);
}

async function poll() {
  try {
    draw(await getJson("/api/state"));
    await refreshLog();
    if (polls++ % TRACES_EVERY === 0) await refreshTraces();
  } catch (error) {
    document.getElementById("updated").textContent = `not updated: ${error.message}`;
  }
  setTimeout(poll, POLL_MS);
}

document.getElementById("log-close").addEventListener("click", () => {
  logReplica = null;
  document.getElementById("log-panel").hidden = true;
});
poll();
