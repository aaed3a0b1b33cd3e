// hyperlaw dashboard: reads the service's JSON API (/v1/...) and draws it with charts.js.
// Views by URL hash: #/calculator, #/experiments, #/trial/ID, #/group?family=&n=&d=,
// #/laws?family=, #/fits. Views of data that grows (experiments, a running trial, a group,
// fits) poll every POLL_MS without reloading the page. When a read answers 401 the page asks
// for a read token and keeps it for this browser tab (sessionStorage).
"use strict";

const {Chart, fmt, finite, PALETTE} = window.hyperlawCharts;
const POLL_MS = 3000;
const PAGE = 50;  // trials per page
const state = {family: null, defaultFamily: null, families: [], view: 0, timer: null};

// --- the API ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail
      : (detail || []).map((d) => d.message || JSON.stringify(d)).join("; "));
    this.status = status;
  }
}

// JSON with "NaN"/"Infinity" strings for non-finite floats (the service's encoding).
function revive(_key, value) {
  if (value === "NaN") return NaN;
  if (value === "Infinity") return Infinity;
  if (value === "-Infinity") return -Infinity;
  return value;
}

async function api(path, params) {
  const url = new URL(path, window.location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (v === null || v === undefined || v === "") continue;
    for (const item of Array.isArray(v) ? v : [v]) url.searchParams.append(k, String(item));
  }
  const headers = {};
  const token = sessionStorage.getItem("hyperlaw-token");
  if (token) headers.Authorization = `Bearer ${token}`;
  const resp = await fetch(url, {headers});
  const text = await resp.text();
  const body = text ? JSON.parse(text, revive) : null;
  if (resp.status === 401 || resp.status === 403) {
    askToken(body && body.detail);
    throw new ApiError(resp.status, body && body.detail);
  }
  if (!resp.ok) throw new ApiError(resp.status, body && body.detail);
  return body;
}

function askToken(why) {
  const box = document.getElementById("token-box");
  box.hidden = false;
  document.getElementById("token-why").textContent =
    `This service needs a read token to show its data (${why || "401"}). ` +
    "Create one with: hyperlaw token create --name NAME --scope read";
}

// --- small DOM helpers ------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick" || k === "onchange" || k === "onsubmit") node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return node;
}

function table(headers, rows, attrs) {
  return h("table", attrs || {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.map((r) => h("tr", r.attrs || {}, r.cells.map((c) => h("td", {}, c))))));
}

function interval(iv) {
  return iv && finite(iv.low) ? `[${fmt(iv.low)}, ${fmt(iv.high)}]` : "";
}

function statusCounts(counts) {
  return Object.entries(counts || {}).map(([s, n]) => h("span", {class: `status ${s}`}, `${s} ${n}`));
}

// Replace a node's children; null and undefined children are left out, arrays flattened.
function fill(node, ...children) {
  node.replaceChildren();
  for (const c of children.flat(Infinity)) {
    if (c !== null && c !== undefined) node.append(c);
  }
}

function main() {
  return document.getElementById("main");
}

function show(...nodes) {
  const m = main();
  fill(m, ...nodes);
}

function errorBox(err) {
  return h("p", {class: "error"}, String(err.message || err));
}

function familySelect(onchange) {
  const sel = h("select", {id: "family", onchange: () => { state.family = sel.value; onchange(); }},
    state.families.map((f) => h("option", {value: f.name}, `${f.name} (${f.n_trials} trials)`)));
  sel.value = state.family;
  return h("label", {}, "family ", sel);
}

function groupLink(family, n, d, text) {
  return h("a", {href: `#/group?family=${encodeURIComponent(family)}&n=${n}&d=${d}`}, text);
}

// --- views --------------------------------------------------------------------------------

async function calculatorView() {
  const form = h("form", {id: "calc", onsubmit: (e) => { e.preventDefault(); answer(); }},
    h("label", {}, "N (parameters) ", h("input", {id: "calc-n", name: "n_params", value: "1e9", size: 10})),
    h("label", {}, "D (tokens) ", h("input", {id: "calc-d", name: "n_tokens", value: "1e11", size: 10})),
    h("label", {}, "seq_len ", h("input", {id: "calc-seq", name: "seq_len", value: "2048", size: 6})),
    h("label", {}, "impose B (tokens) ", h("input", {id: "calc-b", name: "batch_size_tokens", placeholder: "optional", size: 10})),
    familySelect(() => { answer(); }),
    h("button", {id: "calc-submit", type: "submit"}, "Recommend"));
  const result = h("div", {id: "calc-result"});
  const scatter = h("div", {id: "calc-scatter"});
  show(h("h2", {}, "Calculator"),
    h("p", {class: "hint"}, "The peak learning rate η*, the batch size B* and the critical batch size for a model of N non-embedding parameters trained on D tokens, from the family's fit, with 90 % prediction intervals."),
    form, result, scatter);
  let groups = [];
  async function answer() {
    const q = {
      n_params: document.getElementById("calc-n").value.trim(),
      n_tokens: document.getElementById("calc-d").value.trim(),
      seq_len: document.getElementById("calc-seq").value.trim(),
      batch_size_tokens: document.getElementById("calc-b").value.trim(),
      family: state.family,
    };
    try {
      const r = await api("/v1/recommendations", q);
      fill(result, recommendationTable(r));
      drawScatter(r);
    } catch (err) {
      fill(result, errorBox(err));
      drawScatter(null);
    }
  }
  function drawScatter(r) {
    const c = new Chart({title: "where (N, D) sits against the fitted groups", xlabel: "D (tokens)",
      ylabel: "N (parameters)", xlog: true, ylog: true, width: 640, height: 360});
    c.points(groups.map((g) => g.n_tokens), groups.map((g) => g.n_params), {label: "groups with runs",
      color: PALETTE[0], titles: groups.map((g) => `N=${fmt(g.n_params)} D=${fmt(g.n_tokens)}: ${g.n_runs} runs`),
      onclick: (i) => { location.hash = `#/group?family=${encodeURIComponent(state.family)}&n=${groups[i].n_params}&d=${groups[i].n_tokens}`; }});
    if (r) c.points([r.n_tokens], [r.n_params], {marker: "star", color: "#d62728", label: "your query", cls: "query"});
    fill(scatter, c.figure(`calculator-${state.family}`));
  }
  try {
    groups = (await api("/v1/dashboard/groups", {family: state.family})).groups;
  } catch (err) {
    fill(scatter, errorBox(err));
  }
  await answer();
}

function recommendationTable(r) {
  const rows = [
    {cells: ["peak learning rate η*", h("b", {id: "answer-lr", "data-value": r.learning_rate}, fmt(r.learning_rate)),
      interval(r.learning_rate_interval), r.sources.learning_rate || ""]},
    {cells: ["batch size B* (tokens)", h("b", {id: "answer-batch", "data-value": r.batch_size_tokens}, fmt(r.batch_size_tokens)),
      interval(r.batch_size_tokens_interval), r.sources.batch_size_tokens || ""]},
    {cells: ["batch size B* (sequences)", fmt(r.batch_size_sequences), interval(r.batch_size_sequences_interval), `seq_len ${r.seq_len}`]},
    {cells: ["critical batch size (tokens)", h("b", {id: "answer-cbs"}, fmt(r.critical_batch_size_tokens)),
      interval(r.critical_batch_size_tokens_interval), r.sources.critical_batch_size_tokens || ""]},
  ];
  if (r.imposed_batch_size_tokens !== null && r.imposed_batch_size_tokens !== undefined) {
    rows.push({cells: [`η for B = ${fmt(r.imposed_batch_size_tokens)} tokens`, fmt(r.learning_rate_for_batch),
      interval(r.learning_rate_for_batch_interval), r.sources.learning_rate_for_batch || ""]});
    const pct = (v) => (finite(v) ? `+${(100 * v).toFixed(1)} %` : "–");
    rows.push({cells: ["overhead against the critical batch size", `${pct(r.step_overhead)} steps, ${pct(r.token_overhead)} tokens`, "",
      "extra steps are paid below the CBS, extra tokens above it"]});
  }
  return h("div", {},
    table(["", "value", "90 % interval", "source"], rows, {class: "answer"}),
    h("p", {class: "hint"}, `fit ${r.fit_ids.join(", ")} of ${r.scope} (${r.n_trials} trials, ${r.fitted_at})`),
    r.warnings.length ? h("ul", {class: "warnings"}, r.warnings.map((w) => h("li", {}, w))) : null);
}

async function experimentsView(params) {
  const status = params.get("status") || "";
  let offset = 0;
  const filters = h("form", {id: "trial-filters", onsubmit: (e) => { e.preventDefault(); offset = 0; draw(); }},
    familySelect(() => { offset = 0; draw(); }),
    h("label", {}, "status ", h("select", {id: "f-status"}, ["", "queued", "running", "completed", "failed", "pruned"].map((s) => h("option", {value: s}, s || "any")))),
    h("label", {}, "N ", h("input", {id: "f-n", size: 9, placeholder: "any"})),
    h("label", {}, "D ", h("input", {id: "f-d", size: 9, placeholder: "any"})),
    h("button", {type: "submit"}, "Filter"));
  const body = h("div", {});
  show(h("h2", {}, "Experiments and trials"), body, h("h3", {}, "Trials"), filters, h("div", {id: "trials"}));
  document.getElementById("f-status").value = status;
  async function draw() {
    const o = await api("/v1/dashboard/overview");
    fill(body,
      table(["family", "experiments", "trials", "status"], o.families.map((f) => ({cells: [f.name, f.n_experiments, f.n_trials, statusCounts(f.status_counts)]})), {id: "families"}),
      table(["id", "experiment", "family", "trials", "status", "running"], o.experiments.map((e) => ({cells: [
        e.id, e.name, e.family, e.n_trials, statusCounts(e.status_counts),
        e.running.map((r) => h("div", {class: "progress"}, h("a", {href: `#/trial/${r.trial_id}`}, `trial ${r.trial_id}`),
          h("progress", {max: 1, value: r.fraction || 0}), ` step ${r.step ?? "–"} / ${r.steps_planned}`))]})), {id: "experiments"}));
    const n = Number(document.getElementById("f-n").value);
    const d = Number(document.getElementById("f-d").value);
    const q = {family: state.family, status: document.getElementById("f-status").value, limit: PAGE, offset};
    if (n > 0) { q.n_params_min = Math.round(n); q.n_params_max = Math.round(n); }
    if (d > 0) { q.n_tokens_min = Math.round(d); q.n_tokens_max = Math.round(d); }
    const t = await api("/v1/trials", q);
    const page = (delta) => () => { offset = Math.max(0, offset + delta); draw(); };
    fill(document.getElementById("trials"),
      h("p", {class: "hint"}, `${t.count} trials match; ${t.data.length ? `${offset + 1}–${offset + t.data.length}` : "none"} shown `,
        offset > 0 ? h("button", {type: "button", onclick: page(-PAGE)}, "◀ previous") : null,
        offset + PAGE < t.count ? h("button", {type: "button", id: "next-page", onclick: page(PAGE)}, "next ▶") : null),
      table(["trial", "N", "D", "η", "B (tokens)", "status", "final loss", "stop"], t.data.map((x) => ({
        attrs: {class: `trial-row ${x.status}`},
        cells: [h("a", {href: `#/trial/${x.id}`}, String(x.id)), fmt(x.n_params), fmt(x.n_tokens), fmt(x.learning_rate),
          fmt(x.batch_size_tokens), x.status, fmt(x.final_loss), x.stop_reason || ""]})), {id: "trial-table"}));
  }
  await draw();
  poll(draw);
}

async function trialView(id) {
  let points = [];
  const head = h("div", {});
  const plots = h("div", {class: "plots"});
  show(h("h2", {}, `Trial ${id}`), head, plots);
  let family = null;
  async function draw() {
    const t = await api(`/v1/trials/${id}`);
    if (family === null) family = (await api(`/v1/experiments/${t.experiment_id}`)).family;
    const last = points.length ? points[points.length - 1].step : null;
    const p = await api(`/v1/trials/${id}/points`, last === null ? {} : {step_min: last + 1});
    points = points.concat(p.data);
    fill(head, table(["N", "D", "η", "B (tokens)", "schedule", "status", "final loss", "steps", "points"], [{cells: [
      fmt(t.n_params), fmt(t.n_tokens), fmt(t.learning_rate), fmt(t.batch_size_tokens), t.schedule || "",
      h("span", {id: "trial-status"}, t.status), fmt(t.final_loss), t.steps_done ?? "", h("span", {id: "n-points"}, String(points.length))]}]),
    t.status_reason ? h("p", {class: "hint"}, t.status_reason) : null,
    h("p", {}, `experiment ${t.experiment_id}, family ${family}: `, groupLink(family, t.n_params, t.n_tokens, "its (N, D) group")));
    const col = (k) => points.map((q) => q[k]);
    const steps = col("step").map((s) => s + 1);
    const tokens = col("tokens");
    const loss = (x, xlabel, name) => new Chart({title: "loss", xlabel, ylabel: "loss", xlog: true, ylog: true})
      .line(x, col("train_loss"), {label: "train"}).line(x, col("eval_loss"), {label: "eval"})
      .line(x, col("ewa_eval_loss"), {label: "EWA eval"}).figure(`trial-${id}-${name}`);
    fill(plots, loss(steps, "step", "loss-step"), loss(tokens, "tokens", "loss-tokens"),
      new Chart({title: "learning rate", xlabel: "step", ylabel: "lr", xlog: true}).line(steps, col("lr")).figure(`trial-${id}-lr`),
      new Chart({title: "gradient norm", xlabel: "step", ylabel: "‖g‖", xlog: true, ylog: true}).line(steps, col("grad_norm")).figure(`trial-${id}-grad-norm`),
      new Chart({title: "gradient noise scale b_simple", xlabel: "step", ylabel: "b_simple", xlog: true, ylog: true, empty: "not measured (ZeRO-0 with a micro batch below the batch)"})
        .line(steps, col("b_simple")).figure(`trial-${id}-b-simple`));
    return t.status === "running" || t.status === "queued";
  }
  if (await draw()) poll(draw);
}

// cell edges at the geometric midpoints between sorted distinct values
function edges(values) {
  const v = [...new Set(values)].sort((a, b) => a - b);
  const out = new Map();
  v.forEach((x, i) => {
    const lo = i > 0 ? Math.sqrt(v[i - 1] * x) : x / Math.sqrt(v[1] / x || 2);
    const hi = i < v.length - 1 ? Math.sqrt(x * v[i + 1]) : x * Math.sqrt(x / v[i - 1] || 2);
    out.set(x, [lo, hi]);
  });
  return out;
}

async function groupView(params) {
  const family = params.get("family") || state.family;
  const n = Number(params.get("n"));
  const d = Number(params.get("d"));
  const picker = h("div", {id: "group-picker"});
  const out = h("div", {class: "plots"});
  show(h("h2", {}, `Group N = ${fmt(n)}, D = ${fmt(d)} (${family})`), picker, out);
  const gs = (await api("/v1/dashboard/groups", {family})).groups;
  fill(picker, h("p", {class: "hint"}, "groups: ", gs.map((g) => [groupLink(family, g.n_params, g.n_tokens, `N=${fmt(g.n_params)} D=${fmt(g.n_tokens)}`), " "])));
  if (!(n > 0 && d > 0)) {
    if (gs.length) location.replace(`#/group?family=${encodeURIComponent(family)}&n=${gs[0].n_params}&d=${gs[0].n_tokens}`);
    return;
  }
  async function draw() {
    const g = await api("/v1/dashboard/group", {family, n_params: n, n_tokens: d});
    const runs = g.runs.filter((r) => r.status === "completed");
    const best = g.best ? g.best.final_loss : NaN;
    const xe = edges(runs.map((r) => r.learning_rate));
    const ye = edges(runs.map((r) => r.batch_size_tokens));
    const span = 0.02;  // colour scale: 0 to 2 % above the group's best loss
    const heat = new Chart({title: "final loss over (η, B): yellow = the best, dark = 2 % or more above", xlabel: "learning rate η", ylabel: "batch size B (tokens)", xlog: true, ylog: true, width: 600, height: 360});
    heat.cells(runs.map((r) => {
      const ex = r.final_loss === null ? null : (r.final_loss / best - 1);
      return {x0: xe.get(r.learning_rate)[0], x1: xe.get(r.learning_rate)[1], y0: ye.get(r.batch_size_tokens)[0], y1: ye.get(r.batch_size_tokens)[1],
        value: ex === null ? null : 1 - Math.min(1, ex / span),
        label: `trial ${r.trial_id}: η=${fmt(r.learning_rate)} B=${fmt(r.batch_size_tokens)} loss=${fmt(r.final_loss)}${ex === null ? " (diverged)" : ` (+${(100 * ex).toFixed(2)} %)`}`};
    }));
    if (g.best) heat.points([g.best.learning_rate], [g.best.batch_size_tokens], {color: "black", open: true, size: 5, label: "best run", cls: "best"});
    const rec = g.recommendation;
    if (rec) heat.points([rec.learning_rate], [rec.batch_size_tokens], {marker: "star", color: "#d62728", label: "recommendation", cls: "recommendation"});
    // loss against η per B, with the bell fit's η* per B
    const byB = new Map();
    for (const r of runs) { if (!byB.has(r.batch_size_tokens)) byB.set(r.batch_size_tokens, []); byB.get(r.batch_size_tokens).push(r); }
    const perB = new Chart({title: "loss against η per batch size (◆: the fit's η*)", xlabel: "learning rate η", ylabel: "final loss", xlog: true,
      width: 600, height: 360, ylim: finite(best) ? [best * 0.995, best * 1.06] : null});
    [...byB.keys()].sort((a, b) => a - b).forEach((b, i) => {
      const rs = byB.get(b).sort((p, q) => p.learning_rate - q.learning_rate);
      const colour = PALETTE[i % PALETTE.length];
      perB.line(rs.map((r) => r.learning_rate), rs.map((r) => r.final_loss), {color: colour, label: i < 10 ? `B=${fmt(b)}` : null});
      perB.points(rs.map((r) => r.learning_rate), rs.map((r) => r.final_loss), {color: colour, size: 2, cls: "run"});
    });
    const bell = g.bell;
    if (bell) {
      for (let i = 0; i < bell.batch_sizes.length; i++) {
        const b = bell.batch_sizes[i];
        const rs = (byB.get(b) || []).filter((r) => r.final_loss !== null);
        const lo = rs.length ? Math.min(...rs.map((r) => r.final_loss)) : NaN;
        if (finite(lo)) perB.points([bell.optimal_learning_rates[i]], [lo], {marker: "diamond", color: "black", size: 3});
      }
    }
    const etaB = new Chart({title: "η* against B: the bell curve", xlabel: "batch size B (tokens)", ylabel: "η*", xlog: true, ylog: true, width: 600, height: 360,
      empty: "no bell fit for this group yet"});
    if (bell) {
      etaB.points(bell.batch_sizes, bell.optimal_learning_rates, {label: "η* per B (fit to its runs)"});
      const bc = bell.bell || {};
      if (finite(bc.eta_peak) && finite(bc.b_crit)) {
        const lo = Math.min(...bell.batch_sizes) / 2;
        const hi = Math.max(...bell.batch_sizes) * 2;
        const xs = Array.from({length: 60}, (_, k) => lo * (hi / lo) ** (k / 59));
        etaB.line(xs, xs.map((b) => (2 * bc.eta_peak) / (Math.sqrt(bc.b_crit / b) + Math.sqrt(b / bc.b_crit))), {label: "bell curve", color: "#d62728"});
        etaB.vline(bc.b_crit, {color: "#d62728"});
      }
    }
    const figs = [heat.figure(`group-${n}-${d}-heatmap`), perB.figure(`group-${n}-${d}-loss-eta`), etaB.figure(`group-${n}-${d}-bell`)];
    const cbs = g.cbs;
    const st = new Chart({title: "steps to target against B", xlabel: "batch size B (tokens)", ylabel: "steps to target S", xlog: true, ylog: true, width: 600, height: 360,
      empty: "no steps-to-target data for this group"});
    if (cbs) {
      const ok = cbs.steps_to_target.map((s) => finite(s));
      st.points(cbs.batch_sizes.filter((_, i) => ok[i]), cbs.steps_to_target.filter((_, i) => ok[i]), {label: "reached the target"});
      const cens = cbs.censored_at_steps || [];
      st.points(cbs.batch_sizes.filter((_, i) => !ok[i]), cens.filter((_, i) => !ok[i]), {marker: "triangle", open: true, label: "censored (never reached)"});
      const f = cbs.fit || {};
      if (finite(f.a) && finite(f.b) && finite(f.alpha)) {
        const lo = Math.min(...cbs.batch_sizes);
        const hi = Math.max(...cbs.batch_sizes);
        const xs = Array.from({length: 60}, (_, k) => lo * (hi / lo) ** (k / 59));
        st.line(xs, xs.map((b) => f.a + f.b / b ** f.alpha), {label: "S = a + b/B^α", color: "#d62728"});
        st.vline(f.critical_batch_size, {color: "#2ca02c"});
      }
    }
    figs.push(st.figure(`group-${n}-${d}-steps-to-target`));
    fill(out,
      h("p", {class: "hint", id: "group-summary"}, `${g.runs.length} runs; best: ${g.best ? `trial ${g.best.trial_id}, η=${fmt(g.best.learning_rate)}, B=${fmt(g.best.batch_size_tokens)}, loss ${fmt(g.best.final_loss)}` : "none completed"}; ` +
        (rec ? `recommended η=${fmt(rec.learning_rate)}, B=${fmt(rec.batch_size_tokens)}` : `no recommendation: ${g.recommendation_error || "no fit"}`)),
      ...figs);
    return runs.length < g.runs.length;  // some still running or queued
  }
  if (await draw()) poll(draw);
}

async function lawsView(params) {
  if (params.get("family")) state.family = params.get("family");
  const out = h("div", {class: "plots"});
  show(h("h2", {}, "Laws"), familySelect(() => lawsView(new URLSearchParams())), h("p", {class: "hint"},
    "Lines: the served fit at each model size, shaded: its 90 % prediction interval; dots: each group's own optimum; dashed: the published Step Law formula (Li et al. 2025, η = 1.79·N^−0.713·D^0.307, B = 0.58·D^0.571)."), out);
  const L = await api("/v1/dashboard/laws", {family: state.family});
  const plots = [
    ["learning_rate", "η*", "best_learning_rate", "learning_rate"],
    ["batch_size_tokens", "B* (tokens)", "best_batch_size_tokens", "batch_size_tokens"],
    ["critical_batch_size_tokens", "CBS (tokens)", "measured_cbs", null],
  ];
  const figs = plots.map(([key, label, own, published]) => {
    const c = new Chart({title: `${label} against D`, xlabel: "D (tokens)", ylabel: label, xlog: true, ylog: true, width: 600, height: 360});
    L.lines.forEach((line, i) => {
      const colour = PALETTE[i % PALETTE.length];
      c.band(line.n_tokens, line[`${key}_low`], line[`${key}_high`], {color: colour});
      c.line(line.n_tokens, line[key], {color: colour, label: `N=${fmt(line.n_params)}`, cls: "law"});
      const mine = L.groups.filter((g) => nearest(L.lines, g.n_params) === i);
      c.points(mine.map((g) => g.n_tokens), mine.map((g) => g[own]), {color: colour, cls: "optimum",
        label: i === 0 ? (own === "measured_cbs" ? "groups' measured CBS" : "groups' best runs") : null,
        titles: mine.map((g) => `group N=${fmt(g.n_params)} D=${fmt(g.n_tokens)}`)});
      if (published) {
        const s = L.step_law[i];
        c.line(s.n_tokens, s[published], {color: colour, dash: "5 4", width: 1, label: i === 0 ? "Step Law formula" : null});
      }
    });
    if (key === "batch_size_tokens") {
      const pts = L.groups.filter((g) => finite(g.bell_batch_size_opt));
      c.points(pts.map((g) => g.n_tokens), pts.map((g) => g.bell_batch_size_opt), {marker: "diamond", open: true, color: "#555", label: "bell fit's B_opt"});
    }
    return c.figure(`laws-${state.family}-${key}`);
  });
  fill(out, ...figs);
  if (L.error) out.appendChild(h("p", {class: "hint"}, `some points could not be answered: ${L.error}`));
}

function nearest(lines, n) {
  let best = 0;
  lines.forEach((l, i) => { if (Math.abs(Math.log(l.n_params / n)) < Math.abs(Math.log(lines[best].n_params / n))) best = i; });
  return best;
}

async function fitsView() {
  const body = h("div", {});
  const kind = h("select", {id: "fit-kind", onchange: () => draw()}, h("option", {value: ""}, "any"));
  const scope = h("select", {id: "fit-scope", onchange: () => draw()}, h("option", {value: ""}, "any"));
  show(h("h2", {}, "Fits"), h("p", {class: "hint"}, "Every refit of the fitting worker, newest first: a fit whose status is not ok keeps its reason and never replaces the last ok fit of its kind and scope."),
    h("form", {}, h("label", {}, "kind ", kind), h("label", {}, "scope ", scope)), body);
  function options(select, values) {
    const known = new Set([...select.options].map((o) => o.value));
    for (const v of [...new Set(values)].sort()) if (!known.has(v)) select.appendChild(h("option", {value: v}, v));
  }
  async function draw() {
    const o = await api("/v1/dashboard/overview");
    options(kind, o.fits.map((f) => f.kind));
    options(scope, o.fits.map((f) => f.scope));
    const shown = o.fits.filter((f) => (!kind.value || f.kind === kind.value) && (!scope.value || f.scope === scope.value));
    fill(body, h("p", {class: "hint"}, `${o.n_fits} fits; of the newest ${o.fits.length}, ${shown.length} match`),
      table(["id", "kind", "scope", "status", "reason", "trials", "seconds", "watermark", "at"], shown.map((f) => ({
        attrs: {class: `fit ${f.status}`},
        cells: [h("a", {href: `/v1/fits/${f.id}`}, String(f.id)), f.kind, f.scope, f.status, f.message || "", f.n_trials, fmt(f.seconds), h("code", {}, f.data_watermark), f.created_at.replace("T", " ").slice(0, 19)]})), {id: "fits"}));
  }
  await draw();
  poll(draw);
}

// --- routing --------------------------------------------------------------------------------

function poll(draw) {
  const view = state.view;
  clearInterval(state.timer);
  state.timer = setInterval(async () => {
    if (view !== state.view) return;
    try {
      const more = await draw();
      if (more === false) clearInterval(state.timer);
    } catch (err) {
      console.warn("refresh failed", err);
    }
  }, POLL_MS);
}

async function route() {
  state.view += 1;
  clearInterval(state.timer);
  const [path, query] = (location.hash.slice(1) || "/calculator").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.getAttribute("href") === `#/${parts[0]}`);
  try {
    if (!state.families.length) await loadFamilies();
    if (parts[0] === "experiments") await experimentsView(params);
    else if (parts[0] === "trial") await trialView(Number(parts[1]));
    else if (parts[0] === "group") await groupView(params);
    else if (parts[0] === "laws") await lawsView(params);
    else if (parts[0] === "fits") await fitsView();
    else await calculatorView();
  } catch (err) {
    main().appendChild(errorBox(err));
  }
}

async function loadFamilies() {
  const o = await api("/v1/dashboard/overview");
  state.defaultFamily = o.default_family;
  state.families = o.families.length ? o.families : [{name: o.default_family, n_trials: 0}];
  if (!state.family) state.family = state.families.some((f) => f.name === o.default_family) ? o.default_family : state.families[0].name;
}

document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("hyperlaw-token", document.getElementById("token").value.trim());
  document.getElementById("token-box").hidden = true;
  state.families = [];
  route();
});
window.addEventListener("hashchange", route);
route();
