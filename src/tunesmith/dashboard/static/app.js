// tunesmith dashboard: plain JavaScript, no libraries. The page is routed by its #hash; each view
// polls the JSON routes of app.py and draws its charts as SVG (lineChart below). Text from runs
// (prompts, answers, names) only ever goes in as textContent, never as HTML.
"use strict";

const POLL_MS = 1500;
const COLORS = ["#2458b8", "#d1495b", "#2e933c", "#8e44ad", "#e08a00", "#00798c", "#6c4a2e", "#c2185b"];
const view = document.getElementById("view");
let timers = [];
let config = {};

// ------------------------------------------------------------------------------------------------
// small helpers

function el(tag, attrs, ...children) {
  const node = tag === "svg" || attrs?.svg ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "svg" || v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}
const svg = (tag, attrs, ...children) => el(tag, { ...attrs, svg: true }, ...children);

async function api(path, options) {
  const r = await fetch(path, options);
  const body = (r.headers.get("content-type") || "").includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

function fmt(v) {
  if (v === null || v === undefined || v === "") return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString("en-US");
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2).replace(/\.?0+e/, "e");
  return v.toPrecision(4).replace(/\.?0+$/, "");
}
const pct = (v) => (typeof v === "number" ? `${(100 * v).toFixed(1)}%` : "–");
// A file path (a model folder, a data file) by its last part; the whole path shows on hover.
const short = (v) => (typeof v === "string" && /^[./~]/.test(v) && v.includes("/") ? v.replace(/\/+$/, "").split("/").pop() : v);
const cell = (v, attrs) => el("td", { ...attrs, title: v && short(v) !== v ? v : null, text: short(v) ?? "–" });
const runHref = (id) => `#/run/${encodeURIComponent(id)}`;

function ago(t) {
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(t * 1000).toISOString().slice(0, 10);
}

// Run `fn` now and every `ms` until the view changes; a failed poll is reported on the console and
// the next one tries again (a server restarting for a moment should not break the page).
function every(ms, fn) {
  const tick = () => Promise.resolve().then(fn).catch((e) => console.error(`poll failed: ${e.message || e}`));
  tick();
  timers.push(setInterval(tick, ms));
}

function showError(where, e) {
  where.replaceChildren(el("p", { class: "error", text: String(e.message || e) }));
}

// ------------------------------------------------------------------------------------------------
// the chart: series of [x, y] points on shared axes, drawn as SVG paths

// Round tick values covering [lo, hi] about n times; `whole`: only whole numbers (steps).
function niceTicks(lo, hi, n, whole = false) {
  if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
  const raw = Math.max((hi - lo) / n, whole ? 1 : 0);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw && (!whole || Number.isInteger(s)));
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return { lo, hi, ticks };
}

function lineChart(title, series, { xLabel = "step" } = {}) {
  const W = 640, H = 260, L = 58, R = 14, T = 26, B = 34;
  const pts = series.flatMap((s) => s.points);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  root.append(svg("text", { x: L, y: 16, class: "title", text: title }));
  const box = el("div", { class: "chart card", "data-chart": title }, root);
  if (!pts.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", text: "no rows yet" }));
    return box;
  }
  const xs = niceTicks(Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0])), 6,
    pts.every((p) => Number.isInteger(p[0])));
  const ys = niceTicks(Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1])), 5);
  const X = (x) => L + ((x - xs.lo) / (xs.hi - xs.lo)) * (W - L - R);
  const Y = (y) => H - B - ((y - ys.lo) / (ys.hi - ys.lo)) * (H - T - B);
  for (const t of ys.ticks) {
    root.append(svg("line", { x1: L, x2: W - R, y1: Y(t), y2: Y(t), class: "gridline" }));
    root.append(svg("text", { x: L - 6, y: Y(t) + 4, "text-anchor": "end", text: fmt(t) }));
  }
  for (const t of xs.ticks) root.append(svg("text", { x: X(t), y: H - B + 16, "text-anchor": "middle", text: fmt(t) }));
  root.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  root.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  root.append(svg("text", { x: W - R, y: H - 4, "text-anchor": "end", text: xLabel }));
  const legend = el("div", { class: "legend" });
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    root.append(svg("path", { d, class: "series", stroke: color, "stroke-dasharray": s.dashed ? "5 4" : null,
      "data-series": s.name, "data-points": s.points.length }));
    if (s.dots || s.points.length === 1) {
      for (const p of s.points) root.append(svg("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3, fill: color }));
    }
    legend.append(el("span", {}, el("i", { style: `background:${color}` }), `${s.name} (${s.points.length})`));
  });
  box.append(legend);
  return box;
}

const seriesOf = (rows, key) => rows.filter((r) => typeof r[key] === "number" && typeof r.step === "number")
  .map((r) => [r.step, r[key]]);

function numericKeys(rows) {
  const keys = new Set();
  for (const r of rows) for (const [k, v] of Object.entries(r)) if (k !== "step" && typeof v === "number") keys.add(k);
  return [...keys];
}

// A run's rows, kept up to date by polling /metrics?since=N while the view is open.
function follow(id, onChange) {
  const state = { rows: [], next: 0 };
  every(POLL_MS, async () => {
    const m = await api(`/api/runs/${encodeURIComponent(id)}/metrics?since=${state.next}`);
    if (m.reset) state.rows = [];
    if (m.rows.length || m.reset || state.next === 0) {
      state.rows = state.rows.concat(m.rows);
      state.next = m.next;
      onChange(state.rows);
    }
  });
}

// ------------------------------------------------------------------------------------------------
// views

function evalCells(evals) {
  return Object.entries(evals || {}).map(([label, e]) => `${label} ${e.metric} ${pct(e.value)}`).join(" · ") || "–";
}

function runsView() {
  const selected = new Set();
  const compare = el("button", { disabled: true, onclick: () => {
    location.hash = `#/compare/${[...selected].map(encodeURIComponent).join(",")}`;
  } }, "Compare selected");
  const body = el("tbody");
  const table = el("table", { id: "runs" }, el("thead", {}, el("tr", {},
    ["", "run", "status", "method", "model", "data", "steps", "last loss", "best val loss", "evaluations", "updated"]
      .map((h, i) => el("th", { class: i >= 6 && i <= 8 ? "num" : null, text: h })))), body);
  view.replaceChildren(el("h1", { text: "Runs" }), el("div", { class: "toolbar" }, compare,
    el("span", { class: "muted", text: "tick two or more runs to draw them on one chart" })), table);
  every(3000, async () => {
    let runs;
    try { runs = (await api("/api/runs")).runs; } catch (e) { return showError(body, e); }
    body.replaceChildren(...runs.map((r) => el("tr", { "data-run": r.id, "data-status": r.status },
      el("td", {}, el("input", { type: "checkbox", checked: selected.has(r.id), "aria-label": `select ${r.id}`,
        onchange: (ev) => { ev.target.checked ? selected.add(r.id) : selected.delete(r.id);
          compare.disabled = selected.size < 2; } })),
      el("td", { class: "nowrap" }, el("a", { href: runHref(r.id), text: r.id })),
      el("td", {}, el("span", { class: `badge ${r.status}`, text: r.status })),
      cell(r.method), cell(r.model, { class: "nowrap" }), cell(r.data),
      el("td", { class: "num nowrap", text: r.total_steps ? `${fmt(r.steps)} / ${fmt(r.total_steps)}` : fmt(r.steps) }),
      el("td", { class: "num", text: fmt(r.loss) }), el("td", { class: "num", text: fmt(r.best_val_loss) }),
      el("td", { text: evalCells(r.evals) }), el("td", { class: "muted", text: ago(r.updated) }))));
    if (!runs.length) body.append(el("tr", {}, el("td", { colspan: 11, text: "No runs in this folder yet." })));
  });
}

function runCharts(rows) {
  const charts = [lineChart("loss", [{ name: "train loss", points: seriesOf(rows, "loss") },
    { name: "validation loss", points: seriesOf(rows, "val_loss"), dashed: true, dots: true }].filter((s) => s.points.length))];
  for (const [key, title] of [["lr", "learning rate"], ["grad_norm", "gradient norm"], ["tokens_per_s", "tokens/s"]]) {
    if (rows.some((r) => typeof r[key] === "number")) charts.push(lineChart(title, [{ name: key, points: seriesOf(rows, key) }]));
  }
  for (const key of numericKeys(rows).filter((k) => k.startsWith("eval_"))) {
    charts.push(lineChart(key, [{ name: key, points: seriesOf(rows, key), dots: true }]));
  }
  return charts;
}

async function runView(id) {
  const head = el("div"), charts = el("div", { class: "grid", id: "charts" }), evals = el("div", { id: "evals" });
  const extra = el("div");
  view.replaceChildren(el("h1", { text: id }), head, charts, evals, extra);
  let evalCount = -1;
  every(3000, async () => {
    const run = (await api("/api/runs")).runs.find((r) => r.id === id);
    if (!run) return showError(head, new Error(`no run ${id} in this folder`));
    head.replaceChildren(el("div", { class: "facts" },
      ...[["status", el("span", { class: `badge ${run.status}`, id: "status", text: run.status })],
        ["method", run.method], ["model", short(run.model)], ["data", short(run.data)], ["objective", run.objective],
        ["steps", run.total_steps ? `${fmt(run.steps)} / ${fmt(run.total_steps)}` : fmt(run.steps)],
        ["last loss", fmt(run.loss)], ["best val loss", fmt(run.best_val_loss)], ["evaluations", evalCells(run.evals)]]
        .map(([k, v]) => el("div", {}, el("span", { text: k }), v || "–"))));
    const n = Object.keys(run.evals || {}).length;
    if (n !== evalCount) { evalCount = n; if (n) evalSection(id, evals); }
  });
  follow(id, (rows) => charts.replaceChildren(...runCharts(rows)));
  const [recipe, log] = await Promise.all([api(`/api/runs/${encodeURIComponent(id)}/recipe`),
    api(`/api/runs/${encodeURIComponent(id)}/log`)]);
  if (log) extra.append(el("h2", { text: "train.log (end)" }), el("pre", { text: log }));
  if (recipe) extra.append(el("h2", { text: "Resolved recipe" }), el("pre", { text: recipe }));
}

async function evalSection(id, box) {
  let data;
  try { data = await api(`/api/runs/${encodeURIComponent(id)}/evals`); } catch (e) { return showError(box, e); }
  const labels = data.labels;
  const only = el("input", { type: "checkbox", id: "only-changed" });
  const body = el("tbody");
  const draw = () => body.replaceChildren(...data.examples
    .filter((x) => !only.checked || new Set(labels.map((l) => x.answers[l]?.correct)).size > 1)
    .map((x, i) => el("tr", { "data-example": x.id },
      el("td", { class: "num muted", text: i + 1 }),
      el("td", {}, el("div", { class: "answer prompt", text: x.prompt ?? "" })),
      el("td", {}, el("div", { class: "answer", text: x.reference ?? "" })),
      ...labels.map((l) => { const a = x.answers[l];
        return el("td", { class: a ? (a.correct ? "right" : "wrong") : null, "data-label": l },
          el("div", { class: "answer", text: a ? a.prediction ?? "" : "–" })); }))));
  only.addEventListener("change", draw);
  draw();
  box.replaceChildren(el("h2", { text: `Evaluations: ${labels.join(" → ")}` }),
    el("div", { class: "facts" }, ...data.files.map((f) => el("div", {}, el("span", { text: `${f.label} · ${f.task} (${f.split})` }),
      `${f.metric} ${pct(f.summary[f.metric])} of ${fmt(f.summary.examples)}`))),
    el("div", { class: "toolbar" }, el("label", {}, only, " only examples whose verdicts differ")),
    el("table", { id: "eval-table" }, el("thead", {}, el("tr", {}, el("th", { text: "#" }), el("th", { text: "prompt" }),
      el("th", { text: "reference" }), ...labels.map((l) => el("th", { text: `${l} answer` })))), body));
}

async function compareView(ids) {
  if (ids.length < 2) {
    view.replaceChildren(el("h1", { text: "Compare" }), el("p", { text: "Pick two or more runs on the Runs page." }));
    return;
  }
  const data = Object.fromEntries(ids.map((id) => [id, []]));
  const pick = el("select", { id: "metric" });
  const chart = el("div", { id: "compare-chart" });
  const draw = () => {
    const keys = [...new Set(ids.flatMap((id) => numericKeys(data[id])))];
    const want = pick.value || (keys.includes("loss") ? "loss" : keys[0]);
    pick.replaceChildren(...keys.map((k) => el("option", { value: k, selected: k === want, text: k })));
    chart.replaceChildren(lineChart(`${want || "no metric"} by step`,
      ids.map((id) => ({ name: id, points: want ? seriesOf(data[id], want) : [] }))));
  };
  pick.addEventListener("change", draw);
  view.replaceChildren(el("h1", { text: `Compare ${ids.length} runs` }),
    el("div", { class: "toolbar" }, el("label", {}, "metric ", pick),
      ...ids.map((id) => el("a", { href: runHref(id), text: id }))), chart);
  for (const id of ids) follow(id, (rows) => { data[id] = rows; draw(); });
}

async function benchView() {
  let table;
  try { table = await api("/api/bench"); } catch (e) { return showError(view, e); }
  let key = null, dir = 1;
  const body = el("tbody");
  const heads = table.columns.map((c) => el("th", { class: "sortable", "data-column": c, text: c,
    onclick: () => { dir = key === c ? -dir : -1; key = c; draw(); } }));
  const draw = () => {
    const rows = [...table.rows];
    if (key) rows.sort((a, b) => { const x = a[key], y = b[key];
      if (x === undefined || x === null) return 1; if (y === undefined || y === null) return -1;
      return (typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y))) * dir; });
    heads.forEach((h) => { h.textContent = h.dataset.column + (h.dataset.column === key ? (dir > 0 ? " ▲" : " ▼") : ""); });
    body.replaceChildren(...rows.map((r) => el("tr", {}, ...table.columns.map((c) =>
      el("td", { class: typeof r[c] === "number" ? "num" : null, text: fmt(r[c]) })))));
  };
  draw();
  view.replaceChildren(el("h1", { text: `Methods benchmark (${table.name}/${table.file})` }),
    el("p", { class: "muted", text: "Click a column to sort by it; click again to reverse." }),
    el("table", { id: "bench" }, el("thead", {}, el("tr", {}, heads)), body));
}

function trainView() {
  if (!config.allow_train) {
    view.replaceChildren(el("p", { text: "Launching trainings is off: start the dashboard with --allow-train." }));
    return;
  }
  const recipe = el("input", { type: "text", id: "recipe", size: 50, placeholder: "recipes/quickstart.yaml" });
  const name = el("input", { type: "text", id: "name", size: 30, placeholder: "my-run" });
  const overrides = el("textarea", { id: "overrides", rows: 6, placeholder: "train.steps=50\ntrain.lr=5e-4" });
  const out = el("p");
  const form = el("form", { id: "train-form", class: "card", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      const r = await api("/api/train", { method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ recipe: recipe.value, name: name.value, overrides: overrides.value }) });
      location.hash = runHref(r.id);
    } catch (e) { showError(out, e); }
  } },
  el("div", { class: "form-row" }, el("label", { for: "recipe", text: "Recipe file" }), recipe),
  el("div", { class: "form-row" }, el("label", { for: "name", text: "Run name" }), name),
  el("div", { class: "form-row" }, el("label", { for: "overrides", text: "Overrides (key=value, one a line)" }), overrides),
  el("button", { type: "submit" }, "Start training"), out);
  view.replaceChildren(el("h1", { text: "Train a recipe" }),
    el("p", { class: "muted", text: `Runs tunesmith train into ${config.runs}/<name>, from the folder the dashboard was started in; the training keeps going if the dashboard stops.` }), form);
}

// ------------------------------------------------------------------------------------------------
// routing

function route() {
  timers.forEach(clearInterval);
  timers = [];
  const [, page = "", arg = ""] = location.hash.split("/");
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === (page || "runs")));
  const run = (p) => Promise.resolve(p).catch((e) => showError(view, e));
  if (page === "run") return run(runView(decodeURIComponent(location.hash.slice("#/run/".length))));
  if (page === "compare") return run(compareView(arg ? arg.split(",").map(decodeURIComponent) : []));
  if (page === "bench") return run(benchView());
  if (page === "train") return run(trainView());
  return run(runsView());
}

(async () => {
  config = await api("/api/config");
  document.getElementById("folder").textContent = `${config.runs}/`;
  document.getElementById("nav-bench").hidden = !config.bench;
  document.getElementById("nav-train").hidden = !config.allow_train;
  window.addEventListener("hashchange", route);
  route();
})();
