// The run inspector: lists runs, draws a run's workflow as a state machine coloured by
// status, shows a step's recorded input, output and attempts, and plays the run's history
// event by event. Plain JavaScript against the admin API; no build step.
"use strict";

const token = new URLSearchParams(location.hash.slice(1)).get("token");
const state = { workflows: {}, runId: null, run: null, selected: null, cursor: null, timer: null, traceUrl: "" };

async function api(path) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const r = await fetch(path, { headers });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status + " " + (await r.text()));
  return r.json();
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

const fmtTime = ms => new Date(ms).toLocaleString();
// A duration for people: 850 ms, 12.3 s, 4 min 05 s, 2 h 10 min.
function fmtDuration(ms) {
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  const s = Math.round(ms / 1000);
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}
const pretty = v => JSON.stringify(v, null, 2);

// ---- runs list ----------------------------------------------------------------------

async function loadRuns() {
  const wf = document.getElementById("filter-workflow").value;
  const st = document.getElementById("filter-status").value;
  const err = document.getElementById("runs-error");
  try {
    const runs = await api(`/api/runs?limit=200&workflow=${encodeURIComponent(wf)}&status=${encodeURIComponent(st)}`);
    err.hidden = true;
    const body = document.querySelector("#runs tbody");
    body.replaceChildren(...runs.map(r => {
      const steps = (state.workflows[r.workflow] || {}).steps || [];
      const tr = el("tr", { "data-run-id": r.id, "data-testid": "run-row", onclick: () => openRun(r.id) },
        el("td", {}, r.id),
        el("td", {}, el("span", { class: "badge " + r.status }, r.status)),
        el("td", {}, `${Math.min(r.step_index, steps.length)}/${steps.length}`),
        el("td", {}, fmtTime(r.created_at_ms)),
        el("td", { "data-testid": "run-duration" }, fmtDuration((r.finished_at_ms || Date.now()) - r.created_at_ms)),
        el("td", { "data-testid": "run-failure-reason", class: "reason", title: r.failure ? r.failure.error : "" },
          r.failure ? `${r.failure.step}: ${r.failure.error}` : ""));
      if (r.id === state.runId) tr.classList.add("selected");
      return tr;
    }));
  } catch (e) {
    err.textContent = e.message;
    err.hidden = false;
  }
}

// ---- families -----------------------------------------------------------------------

async function loadFamilies() {
  const err = document.getElementById("runs-error");
  try {
    const images = await api("/api/images");
    const u = images.usage;
    document.getElementById("usage").textContent = u
      ? `${u.what} ${(100 * u.used_bytes / Math.max(u.total_bytes, 1)).toFixed(1)}% used · refuse at ${images.watermarks.refuse_percent}%`
      : `storage not measured: ${images.usage_error}`;
    const rows = [];
    for (const f of images.families) {
      const versions = (f.current ? [["current", f.current]] : []).concat(f.others.map(v => ["kept", v]));
      if (versions.length === 0) rows.push(el("tr", { "data-testid": "family-row", "data-family": f.family }, el("td", {}, f.family), el("td", {}, "none"), el("td"), el("td", {}, 0), el("td")));
      for (const [kind, v] of versions) {
        rows.push(el("tr", { "data-testid": "family-row", "data-family": f.family, "data-kind": kind },
          el("td", {}, f.family),
          el("td", { title: v.digest }, `${kind} ${v.digest.replace(/^sha256:/, "").slice(0, 12)}`),
          el("td", {}, `${v.base} (${v.state})`),
          el("td", {}, v.live_snapshots),
          el("td", {}, v.last_activated_at ? fmtTime(Date.parse(v.last_activated_at)) : "never")));
      }
    }
    document.querySelector("#families tbody").replaceChildren(...rows);
  } catch (e) {
    err.textContent = e.message;
    err.hidden = false;
  }
}

// ---- one run ------------------------------------------------------------------------

// Opens run `id`; the page's URL names it (`?run=<id>`) so it can be shared. A run that
// cannot be shown says why, and the message stays until another run opens.
async function openRun(id) {
  stop();
  const runError = document.getElementById("run-error");
  let run;
  try {
    run = await api("/api/runs/" + encodeURIComponent(id));
  } catch (e) {
    runError.textContent = `run ${id} cannot be shown: ${e.message}`;
    runError.hidden = false;
    document.getElementById("run-pane").hidden = true;
    return;
  }
  runError.hidden = true;
  const url = new URL(location.href);
  url.searchParams.set("run", id);
  history.replaceState(null, "", url);
  state.runId = id;
  state.run = run;
  state.selected = null;
  state.cursor = null; // null: show the final state
  document.getElementById("run-pane").hidden = false;
  document.querySelectorAll("#runs tbody tr").forEach(tr => tr.classList.toggle("selected", tr.dataset.runId === id));
  const r = state.run;
  document.getElementById("run-title").textContent = `${r.id} (${r.workflow} v${r.version})`;
  const badge = document.getElementById("run-status");
  badge.textContent = r.status;
  badge.className = "badge " + r.status;
  const trace = document.getElementById("run-trace");
  trace.replaceChildren();
  if (r.trace_id) {
    const label = "trace " + r.trace_id;
    trace.append(state.traceUrl
      ? el("a", { href: state.traceUrl.replace("{trace_id}", r.trace_id), target: "_blank", "data-testid": "trace-link" }, label)
      : el("code", { "data-testid": "trace-link" }, label));
  }
  const failure = document.getElementById("run-failure");
  failure.hidden = !r.failure;
  failure.textContent = r.failure ? `failed at ${r.failure.step} (${r.failure.kind}): ${r.failure.error}` : "";
  render();
}

// Replays the first `n` events (all when n is null): each step's status and attempts.
function replay(n) {
  const r = state.run;
  const steps = (state.workflows[r.workflow] || {}).steps || [];
  const events = n === null ? r.events : r.events.slice(0, n);
  const info = steps.map(name => ({ name, status: "unreached", attempts: [] }));
  const byName = name => info.find(s => s.name === name);
  let current = events.length ? 0 : -1, finished = null, lit = null;
  for (const e of events) {
    const k = e;
    lit = null;
    if (k.event === "started") { current = 0; lit = "start"; }
    else if (k.event === "resumed") { current = steps.indexOf(k.step); }
    else if (k.event === "attempt_failed") {
      const s = byName(k.step);
      if (s) { s.attempts.push({ attempt: k.attempt, ok: false, error: k.error, kind: k.kind, ms: k.duration_ms, at: e.at_ms }); s.status = "retrying"; }
      lit = "retry:" + k.step;
    } else if (k.event === "step_completed") {
      const s = byName(k.step);
      if (s) { s.attempts.push({ attempt: k.attempt, ok: true, ms: k.duration_ms, at: e.at_ms }); s.status = "done"; }
      current = steps.indexOf(k.step) + 1;
      lit = "edge:" + k.step;
    } else if (k.event === "finished") {
      finished = k.status;
      if (k.failure) { const s = byName(k.failure.step); if (s) s.status = "failed"; }
      lit = "end";
    }
  }
  if (finished === null && current >= 0 && current < info.length && info[current].status === "unreached") {
    info[current].status = "running";
  }
  return { info, finished, lit };
}

// END_W: the end node says "completed" or "failed", longer than "start".
const NODE_W = 130, NODE_H = 36, GAP = 40, TERM_W = 60, END_W = 90;

function render() {
  const r = state.run;
  const { info, finished, lit } = replay(state.cursor);
  const svg = document.getElementById("machine");
  const ns = "http://www.w3.org/2000/svg";
  const s = (tag, attrs) => { const e = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };
  svg.replaceChildren();
  const defs = s("defs", {});
  const marker = s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto" });
  marker.append(s("path", { d: "M0,0 L10,5 L0,10 z", fill: "#78909c" }));
  defs.append(marker);
  svg.append(defs);
  const y = 70;
  const xs = [10];
  info.forEach((_, i) => xs.push(10 + TERM_W + GAP + i * (NODE_W + GAP)));
  const endX = 10 + TERM_W + GAP + info.length * (NODE_W + GAP);
  svg.setAttribute("viewBox", `0 0 ${endX + END_W + 10} 150`);
  const edge = (x1, x2, name) => {
    const e = s("path", { d: `M${x1},${y} L${x2 - 2},${y}`, class: "edge", "data-edge": name });
    if (lit === "edge:" + name || (lit === "start" && name === "start")) e.classList.add("lit");
    svg.append(e);
  };
  edge(10 + TERM_W, xs[1] || endX, "start");
  info.forEach((st, i) => edge(xs[i + 1] + NODE_W, i + 1 < info.length ? xs[i + 2] : endX, st.name));
  const node = (x, w, label, cls, attrs) => {
    const g = s("g", Object.assign({ class: "node " + cls, transform: `translate(${x},${y - NODE_H / 2})` }, attrs));
    g.append(s("rect", { width: w, height: NODE_H }));
    const t = s("text", { x: w / 2, y: NODE_H / 2 + 4, "text-anchor": "middle" });
    t.textContent = label;
    g.append(t);
    svg.append(g);
    return g;
  };
  node(10, TERM_W, "start", "terminal", {});
  info.forEach((st, i) => {
    const g = node(xs[i + 1], NODE_W, st.name, st.status, { "data-step": st.name, "data-status": st.status, "data-testid": "step-node" });
    if (state.selected === st.name) g.classList.add("selected");
    if (lit === "retry:" + st.name) g.classList.add("lit");
    const retries = st.attempts.filter(a => !a.ok).length;
    if (retries) {
      // A self-loop: attempts of this step that failed (retried, or the last one aborted).
      const loop = s("path", { d: `M${xs[i + 1] + 30},${y - NODE_H / 2} C${xs[i + 1] + 30},${y - 65} ${xs[i + 1] + 100},${y - 65} ${xs[i + 1] + 100},${y - NODE_H / 2}`, class: "edge" + (lit === "retry:" + st.name ? " lit" : "") });
      svg.append(loop);
      const t = s("text", { x: xs[i + 1] + 65, y: y - 52, "text-anchor": "middle", "font-size": 11 });
      t.textContent = `${retries} failed attempt${retries === 1 ? "" : "s"}`;
      svg.append(t);
    }
    g.addEventListener("click", () => { state.selected = st.name; render(); });
  });
  const end = node(endX, END_W, finished || "end", "terminal", { "data-testid": "end-node" });
  if (finished === "completed") end.classList.replace("terminal", "done");
  if (finished === "failed") end.classList.replace("terminal", "failed");

  // History, with the play cursor.
  const list = document.getElementById("events");
  list.replaceChildren(...r.events.map((e, i) => {
    const li = el("li", { "data-seq": e.seq, "data-testid": "event" }, `${new Date(e.at_ms).toLocaleTimeString()} ${describe(e)}`);
    if (state.cursor !== null) {
      if (i === state.cursor - 1) li.classList.add("current");
      if (i >= state.cursor) li.classList.add("future");
    }
    return li;
  }));
  document.getElementById("position").textContent =
    state.cursor === null ? `${r.events.length} events` : `event ${state.cursor} of ${r.events.length}`;
  document.getElementById("position").dataset.cursor = state.cursor === null ? "end" : String(state.cursor);
  document.getElementById("play").innerHTML = state.timer ? "&#10074;&#10074; pause" : "&#9654; play";
  renderStep(info);
}

function describe(k) {
  switch (k.event) {
    case "started": return "started";
    case "resumed": return `resumed at ${k.step} (after ${k.attempts} failed attempts)`;
    case "attempt_failed": return `${k.step} attempt ${k.attempt} failed (${k.kind}, ${k.duration_ms} ms): ${k.error}`;
    case "step_completed": return `${k.step} completed on attempt ${k.attempt} (${k.duration_ms} ms)`;
    case "finished": return `finished: ${k.status}` + (k.failure ? ` at ${k.failure.step}` : "");
    default: return JSON.stringify(k);
  }
}

function renderStep(info) {
  const box = document.getElementById("step-detail");
  const r = state.run;
  const i = info.findIndex(s => s.name === state.selected);
  if (i < 0) { box.replaceChildren(el("p", { class: "hint" }, "Click a step to see its input, output and attempts.")); return; }
  const st = info[i];
  const response = idx => (r.responses.find(x => x.index === idx) || {}).response;
  // While the history is replayed, a step shows only what the replay has reached: its input
  // once the step has begun, its output once it completed.
  const input = st.status === "unreached" ? undefined : response(i);
  const output = st.status === "done" ? response(i + 1) : undefined;
  box.replaceChildren(
    el("h3", { "data-testid": "step-name" }, `${st.name} `, el("span", { class: "badge " + st.status }, st.status)),
    el("h4", {}, "input (the previous step's response)"),
    el("pre", { "data-testid": "step-input" }, input === undefined ? "(not reached)" : pretty(input)),
    el("h4", {}, "output"),
    el("pre", { "data-testid": "step-output" }, output === undefined ? "(not reached)" : pretty(output)),
    el("h4", {}, "attempts"),
    el("table", { "data-testid": "step-attempts" },
      el("thead", {}, el("tr", {}, el("th", {}, "#"), el("th", {}, "outcome"), el("th", {}, "ms"), el("th", {}, "error"))),
      el("tbody", {}, ...st.attempts.map(a => el("tr", { "data-testid": "attempt" },
        el("td", {}, a.attempt), el("td", {}, a.ok ? "ok" : a.kind), el("td", {}, a.ms), el("td", {}, a.error || ""))))),
    el("h4", {}, "run input"),
    el("pre", {}, pretty(r.input)));
}

// ---- player -------------------------------------------------------------------------

function stop() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
}

function move(delta) {
  stop();
  const n = state.run.events.length;
  const at = state.cursor === null ? n : state.cursor;
  state.cursor = Math.max(0, Math.min(n, at + delta));
  render();
}

function play() {
  if (state.timer) { stop(); render(); return; }
  const n = state.run.events.length;
  if (state.cursor === null || state.cursor >= n) state.cursor = 0;
  const tick = () => {
    if (state.cursor >= n) { stop(); render(); return; }
    state.cursor += 1;
    render();
  };
  state.timer = setInterval(tick, 800 / Number(document.getElementById("speed").value));
  render();
}

// ---- start --------------------------------------------------------------------------

async function start() {
  const info = await api("/api/info");
  state.traceUrl = info.trace_url || "";
  document.getElementById("host-info").textContent = `worker ${info.version} · ${info.state_dir}`;
  for (const w of await api("/api/workflows")) {
    state.workflows[w.name] = w;
    document.getElementById("filter-workflow").append(el("option", { value: w.name }, w.name));
  }
  document.getElementById("filter-workflow").addEventListener("change", loadRuns);
  document.getElementById("filter-status").addEventListener("change", loadRuns);
  document.getElementById("play").addEventListener("click", play);
  document.getElementById("back").addEventListener("click", () => move(-1));
  document.getElementById("fwd").addEventListener("click", () => move(1));
  await loadRuns();
  await loadFamilies();
  setInterval(() => { if (document.getElementById("live").checked) { loadRuns(); loadFamilies(); } }, 2000);
  const wanted = new URLSearchParams(location.search).get("run");
  if (wanted) await openRun(wanted);
}

start().catch(e => { const err = document.getElementById("runs-error"); err.textContent = e.message; err.hidden = false; });
