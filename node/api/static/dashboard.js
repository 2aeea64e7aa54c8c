// The iollm dashboard: a single page over the node's JSON API (/v1/...), polled every
// POLL_MS. Charts by uPlot, the version DAG by Cytoscape.js (both vendored, see
// vendor/README.txt). The session cookie is HttpOnly; requests that change state carry
// the CSRF token from its companion cookie in X-CSRF-Token.
"use strict";

const POLL_MS = 2000;
const page = () => document.getElementById("page");

// -- helpers ----------------------------------------------------------------------------

const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) =>
  ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const short = (hex, n = 12) => (hex ? esc(String(hex).slice(0, n)) : "—");
const shortPeer = (p) => (!p ? "—" : p.length <= 20 ? esc(p) : esc(p.slice(0, 10) + "…" + p.slice(-6)));
const peerCell = (p) => `<span class="mono" title="${esc(p)}">${shortPeer(p)}</span>`;
const idCell = (h) => `<span class="mono" title="${esc(h)}">${short(h)}</span>`;
function bytes(n) {
  if (n == null) return "—";
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}
function ago(ms) {
  if (!ms) return "—";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 90) return `${s.toFixed(0)} s ago`;
  if (s < 5400) return `${(s / 60).toFixed(0)} min ago`;
  if (s < 129600) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}
// Measured matmul throughput: a CPU's is a few GFLOP/s, which "0.000 TFLOP/s" would hide.
const flops = (tf) => (tf == null ? "—" : tf >= 0.1 ? `${tf.toFixed(1)} TFLOP/s`
  : `${(tf * 1000).toFixed(1)} GFLOP/s`);
const num = (x, d = 3) => (x == null || Number.isNaN(x) ? "—" : Number(x).toFixed(d));
const pill = (text, cls = "") => `<span class="pill ${cls}">${esc(text)}</span>`;
const verdictPill = (v) => pill(v, v === "accepted" || v === "done" || v === "complete" ? "ok"
  : v === "rejected" || v === "failed" ? "bad" : "warn");

function csrfToken() {
  const name = document.querySelector("meta[name=iollm-csrf-cookie]").content;
  for (const part of document.cookie.split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === name) return v.join("=");
  }
  return "";
}

class ApiFailure extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, body) {
  const init = { credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.headers["X-CSRF-Token"] = csrfToken();
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const data = await r.json().catch(() => null);
  if (!r.ok) throw new ApiFailure(r.status, (data && data.error) || r.statusText);
  return data;
}

// A read that may fail on its own (no chain: 409) without failing the whole page.
async function maybe(path) {
  try { return await api(path); } catch (e) {
    if (e.status === 401) throw e;
    return { error: e.message };
  }
}

function table(headers, rows, attrs = () => "") {
  if (!rows.length) return `<p class="muted">none</p>`;
  return `<table><thead><tr>${headers.map((h) => `<th>${esc(h)}</th>`).join("")}</tr></thead>
    <tbody>${rows.map((r, i) => `<tr ${attrs(i)}>${r.map((c) => `<td>${c}</td>`).join("")}</tr>`).join("")}
    </tbody></table>`;
}
const dl = (pairs) => `<dl>${pairs.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${v}</dd>`).join("")}</dl>`;
function set(id, html) { const el = document.getElementById(id); if (el) el.innerHTML = html; }

function gpuText(env) {
  if (!env || !env.gpus || !env.gpus.length) return `<span class="muted">CPU only</span>`;
  const counts = {};
  for (const g of env.gpus) counts[g.name] = (counts[g.name] || 0) + 1;
  return Object.entries(counts).map(([n, c]) => esc(c > 1 ? `${c}× ${n}` : n)).join("<br>");
}
const maxVram = (env) => (env && env.gpus && env.gpus.length
  ? Math.max(...env.gpus.map((g) => g.total_memory_bytes)) : 0);

// -- pages ------------------------------------------------------------------------------

let me = null; // this node's status, fetched on every poll of the Node page and at start

const pages = {};

pages.node = {
  skeleton: () => `<div class="grid">
    <section class="card"><h2>Identity</h2><div id="identity"></div></section>
    <section class="card"><h2>Resources</h2><div id="resources"></div></section>
    <section class="card"><h2>Capability record</h2><div id="capability"></div></section>
    <section class="card"><h2>Work</h2><div id="work"></div></section>
    <section class="card wide"><h2>Balance and recent receipts</h2><div id="wallet"></div></section>
  </div>`,
  async update() {
    const [status, res, bal, receipts, jobs] = await Promise.all([
      api("/v1/status"), api("/v1/dashboard/node"), maybe("/v1/ledger/balance"),
      api("/v1/receipts"), api("/v1/jobs")]);
    me = status;
    set("identity", dl([
      ["peer id", `<span class="mono">${esc(status.peer_id)}</span>`],
      ["software", esc(status.software)],
      ["uptime", `${(status.uptime_s / 60).toFixed(1)} min`],
      ["addresses", status.addrs.map((a) => `<div class="mono">${esc(a)}</div>`).join("")],
      ["connections", `<span id="connections">${status.connected_peers}</span> peer${status.connected_peers === 1 ? "" : "s"} · routing table ${status.routing_table_size}`],
      ["record published", status.published ? pill("yes", "ok") : pill("not yet", "warn")],
    ]));
    const p = res.process, s = res.system;
    set("resources", dl([
      ["daemon CPU", `${num(p.cpu_percent, 1)} %`],
      ["daemon memory", bytes(p.rss_bytes)],
      ["threads · open files", `${p.threads} · ${p.open_files}`],
      ["machine CPU · memory", `${num(s.cpu_percent, 1)} % · ${num(s.memory_percent, 1)} %`],
      ["load average", s.load.map((x) => num(x, 2)).join(" ")],
      ["disk free (home)", `${bytes(res.disk.free_bytes)} of ${bytes(res.disk.total_bytes)}`],
    ]));
    const rec = status.record;
    const env = rec && rec.env;
    set("capability", !rec ? `<p class="muted">not built yet</p>` : dl([
      ["GPUs", gpuText(env)],
      ["throughput", `${flops(env.tflops)} (${esc(env.tflops_dtype)} on ${esc(env.tflops_device)})`],
      ["CPU · RAM", `${env.cpu_cores} cores · ${bytes(env.ram_bytes)}`],
      ["torch · CUDA", `${esc(env.torch) || "—"} · ${esc(env.cuda) || "—"}`],
      ["signed · expires", `${ago(rec.created_ms)} · ${new Date(rec.expires_ms).toLocaleString()}`],
    ]));
    const w = res.worker;
    const running = jobs.filter((j) => j.status === "running");
    set("work", (w ? dl([
      ["tasks running now", `<b>${w.busy}</b>`],
      ["tasks taken · refused", `${w.accepted} · ${w.refused}`],
      ["finished · failed", `${w.finished} · ${w.failed}`],
      ["training time", `${w.train_s} s`],
    ]) : `<p class="muted">this node does not train</p>`) +
      `<h3>Jobs coordinated here, running</h3>` +
      table(["job", "name", "round"], running.map((j) => [
        `<a href="#/jobs/${esc(j.job)}">${short(j.job)}</a>`, esc(j.name), `${j.round} of ${j.rounds}`])));
    set("wallet", (bal.error ? `<p class="muted">${esc(bal.error)}</p>`
      : `<p>Balance <b id="balance">${bal.balance}</b> units at height ${bal.height}</p>`) +
      table(["issued", "job", "round", "worker", "tokens", "held-out gain"],
        receipts.slice(-10).reverse().map((r) => [
          ago(r.issued_ms), `<a href="#/jobs/${esc(r.job)}">${short(r.job)}</a>`, r.round + 1,
          peerCell(r.worker), r.tokens, num(r.metrics.heldout_gain, 4)])));
  },
};

pages.network = {
  skeleton: () => `<section class="card">
    <h2>Every known node</h2>
    <div class="filters">
      <label>min GPU memory (GiB)<input id="f-vram" type="number" min="0" step="1"></label>
      <label>min TFLOP/s<input id="f-tflops" type="number" min="0" step="0.1"></label>
      <span class="muted" id="node-count"></span>
    </div>
    <div id="nodes"></div></section>`,
  mounted() {
    for (const id of ["f-vram", "f-tflops"]) {
      document.getElementById(id).addEventListener("change", () => refresh());
    }
  },
  async update() {
    const q = new URLSearchParams();
    const vram = document.getElementById("f-vram").value;
    const tflops = document.getElementById("f-tflops").value;
    if (vram) q.set("min_vram", vram);
    if (tflops) q.set("min_tflops", tflops);
    const [records, peers] = await Promise.all([api(`/v1/gpus?${q}`), api("/v1/peers")]);
    if (!me) me = await api("/v1/status");
    const connected = new Set(peers.map((p) => p.peer_id));
    set("node-count", `${records.length} node(s)`);
    set("nodes", table(
      ["peer", "", "GPUs", "GPU memory", "throughput", "CPU · RAM", "software", "record signed"],
      records.map((r) => [
        peerCell(r.peer_id),
        r.peer_id === me.peer_id ? pill("this node", "ok")
          : connected.has(r.peer_id) ? pill("connected") : "",
        gpuText(r.env), maxVram(r.env) ? bytes(maxVram(r.env)) : "—",
        `${flops(r.env.tflops)} <span class="muted">${esc(r.env.tflops_device)}</span>`,
        `${r.env.cpu_cores} · ${bytes(r.env.ram_bytes)}`, esc(r.software), ago(r.created_ms)]),
      (i) => `data-peer="${esc(records[i].peer_id)}"`));
  },
};

// Models and datasets: the table, and the lineage (parents) as a DAG.
const modelState = { cy: null, keys: "", selected: null, byId: {} };

pages.models = {
  skeleton: () => `<div class="grid">
    <section class="card wide"><h2>Lineage</h2>
      <div id="lineage"></div>
      <div id="lineage-path" class="muted"></div></section>
    <section class="card wide"><h2>Transfers</h2><div id="transfers"></div></section>
    <section class="card wide"><h2>Versions</h2>
      <div class="filters"><label>kind<select id="f-kind">
        <option value="">all</option><option>model</option><option>dataset</option></select></label>
        <label class="check"><input type="checkbox" id="f-internal"> show jobs' deltas and updates</label>
      </div><div id="versions"></div></section></div>`,
  mounted() {
    modelState.cy = null; modelState.keys = "";
    for (const id of ["f-kind", "f-internal"]) {
      document.getElementById(id).addEventListener("change", () => refresh());
    }
  },
  async update(arg) {
    if (arg) modelState.selected = arg;
    const [all, ops] = await Promise.all([api("/v1/models"), api("/v1/dashboard/ops")]);
    set("transfers", table(["operation", "state", "phase", "progress", "detail", "started"],
      ops.map((o) => [esc(o.kind), verdictPill(o.state === "done" ? "done" : o.state === "failed" ? "failed" : o.state),
        esc(o.phase), o.total_bytes
          ? `<div class="bar" title="${bytes(o.done_bytes)} of ${bytes(o.total_bytes)}"><span style="width:${(100 * o.done_bytes / o.total_bytes).toFixed(1)}%"></span></div> ${bytes(o.done_bytes)} of ${bytes(o.total_bytes)}`
          : bytes(o.done_bytes),
        `<span class="reason">${esc(o.error || o.detail)}</span>`, ago(o.started_ms)])));
    const internals = document.getElementById("f-internal").checked;
    const versions = all.filter((v) => internals || !isJobInternal(v) || v.version === arg);
    modelState.byId = Object.fromEntries(versions.map((v) => [v.version, v]));
    const kind = document.getElementById("f-kind").value;
    const shown = versions.filter((v) => !kind || v.kind === kind)
      .sort((a, b) => b.created_ms - a.created_ms);
    set("versions", table(
      ["kind", "name", "version", "size", "state", "providers", "publisher", "parents", "created"],
      shown.map((v) => [esc(v.kind), esc(v.name), idCell(v.version), bytes(v.size),
        verdictPill(v.state), v.providers, peerCell(v.publisher), v.parents.length, ago(v.created_ms)]),
      (i) => `class="clickable${shown[i].version === modelState.selected ? " selected" : ""}" data-version="${esc(shown[i].version)}"`));
    for (const tr of document.querySelectorAll("#versions tr[data-version]")) {
      tr.addEventListener("click", () => { location.hash = `#/models/${tr.dataset.version}`; });
    }
    drawLineage(versions);
  },
};

// A job's per-task deltas and per-round outer updates are versions like any other, but
// what a user follows is the models; they are told apart by the names the coordinator
// and the workers give them (node/jobs).
const isJobInternal = (v) => /^delta [0-9a-f]{12} r\d+-t\d+$/.test(v.name) || / update r\d+$/.test(v.name);

function lineageOf(id) {
  const out = [];
  const seen = new Set();
  let frontier = [id];
  while (frontier.length) {
    const next = [];
    for (const v of frontier) {
      if (seen.has(v)) continue;
      seen.add(v);
      out.push(v);
      const info = modelState.byId[v];
      if (info) next.push(...info.parents);
    }
    frontier = next;
  }
  return out;
}

function drawLineage(versions) {
  const ids = new Set(versions.map((v) => v.version));
  const keys = versions.map((v) => v.version + v.parents.join()).sort().join("|");
  if (!modelState.cy || keys !== modelState.keys) {
    modelState.keys = keys;
    const elements = [];
    for (const v of versions) {
      elements.push({ data: { id: v.version, label: `${v.name}\n${v.version.slice(0, 8)}`, kind: v.kind } });
      for (const p of v.parents) {
        if (ids.has(p)) elements.push({ data: { id: `${p}>${v.version}`, source: p, target: v.version } });
      }
    }
    if (modelState.cy) modelState.cy.destroy();
    modelState.cy = cytoscape({
      container: document.getElementById("lineage"),
      elements,
      minZoom: 0.2, maxZoom: 1.4, wheelSensitivity: 0.3,
      style: [
        { selector: "node", style: { label: "data(label)", "text-wrap": "wrap", "font-size": 10,
          "text-valign": "bottom", "text-margin-y": 4, "background-color": "#9aa8c2",
          width: 18, height: 18, color: "#1d2330" } },
        { selector: 'node[kind = "dataset"]', style: { shape: "round-rectangle", "background-color": "#c8b27a" } },
        { selector: "edge", style: { width: 1.5, "line-color": "#b8c0cf", "target-arrow-color": "#b8c0cf",
          "target-arrow-shape": "triangle", "curve-style": "bezier" } },
        { selector: ".lineage", style: { "background-color": "#2f6fdf", "line-color": "#2f6fdf",
          "target-arrow-color": "#2f6fdf" } },
        { selector: ".chosen", style: { "border-width": 3, "border-color": "#1d2330" } },
      ],
      layout: { name: "breadthfirst", directed: true, spacingFactor: 1.1, padding: 20,
                roots: versions.filter((v) => !v.parents.some((p) => ids.has(p))).map((v) => v.version) },
    });
    modelState.cy.on("tap", "node", (evt) => { location.hash = `#/models/${evt.target.id()}`; });
  }
  const cy = modelState.cy;
  cy.elements().removeClass("lineage chosen");
  const sel = modelState.selected;
  const path = document.getElementById("lineage-path");
  if (!sel || !ids.has(sel)) { path.innerHTML = "Click a version to follow its lineage."; return; }
  const line = lineageOf(sel);
  const inLine = new Set(line);
  for (const v of line) cy.getElementById(v).addClass("lineage");
  cy.edges().filter((e) => inLine.has(e.source().id()) && inLine.has(e.target().id())).addClass("lineage");
  cy.getElementById(sel).addClass("chosen");
  path.innerHTML = `Lineage of <b>${esc(modelState.byId[sel].name)}</b>: ` + line.map((v) => {
    const info = modelState.byId[v];
    return `<a href="#/models/${esc(v)}" class="lineage-step" data-version="${esc(v)}">${esc(info ? info.name : "?")} ${short(v, 8)}</a>`;
  }).join(" ← ");
}

// Jobs: the list, one job's live chart and tasks, and the submit form.
const jobState = { plot: null, job: null };
const SPEC_TEMPLATE = `name = "my-job"
base_model = ""   # a model version id (iollm model list)
dataset = ""      # a dataset version id
[train]
rounds = 3
workers_per_round = 2
inner_steps = 20
batch_size = 8
seq_len = 64
`;

pages.jobs = {
  skeleton: () => `<div class="grid">
    <section class="card wide" id="job-detail-card" hidden><h2 id="job-title"></h2>
      <div class="grid"><div id="job-summary"></div>
        <div><h3>Held-out loss per round</h3><div id="loss-chart" data-points="0"></div></div></div>
      <h3>Tasks</h3><div id="job-tasks"></div>
      <h3>Published versions</h3><div id="job-versions"></div></section>
    <section class="card"><h2>Jobs</h2><div id="jobs"></div></section>
    <section class="card"><h2>Submit a job</h2>
      <form id="submit-form"><textarea id="spec" spellcheck="false" aria-label="job spec (TOML)"></textarea>
      <p><button type="submit">Submit</button> <span id="submit-status" class="muted"></span></p>
      <ul id="submit-errors" class="field-errors"></ul></form></section></div>`,
  mounted() {
    if (jobState.plot) { jobState.plot.destroy(); jobState.plot = null; }
    const spec = document.getElementById("spec");
    spec.value = localStorage.getItem("iollm-spec") || SPEC_TEMPLATE;
    document.getElementById("submit-form").addEventListener("submit", submitJob);
  },
  async update(arg) {
    const jobs = await api("/v1/jobs");
    set("jobs", table(["job", "name", "status", "round", "submitted"],
      jobs.map((j) => [`<a href="#/jobs/${esc(j.job)}">${short(j.job)}</a>`, esc(j.name),
        verdictPill(j.status), j.round == null ? "—" : `${j.round} of ${j.rounds}`, ago(j.submitted_ms)]),
      (i) => `data-job="${esc(jobs[i].job)}"`));
    const card = document.getElementById("job-detail-card");
    if (!arg) { card.hidden = true; return; }
    const [job, versions] = await Promise.all([api(`/v1/jobs/status?id=${encodeURIComponent(arg)}`), api("/v1/models")]);
    card.hidden = false;
    renderJob(job, Object.fromEntries(versions.map((v) => [v.version, v])));
  },
};

function renderJob(job, byId) {
  const rounds = job.rounds || [];
  set("job-title", `Job ${esc(job.name)} <span class="mono muted">${esc(job.job.slice(0, 16))}</span>`);
  const size = (v) => (byId[v] ? byId[v].size : 0);
  const moved = rounds.reduce((sum, r) => sum + r.tasks.reduce((s, t) => s + size(t.delta), 0)
    + size(r.version) + size(r.update), 0);
  const sp = job.spec;
  set("job-summary", dl([
    ["status", verdictPill(job.status || "elsewhere") + (job.error ? ` <span class="bad">${esc(job.error)}</span>` : "")],
    ["round", `${job.round ?? "—"} of ${sp.rounds}`],
    ["coordinator", peerCell(job.coordinator)],
    ["base model · dataset", `${idCell(sp.base_model)} · ${idCell(sp.dataset)}`],
    ["per round", `${sp.workers_per_round} workers × ${sp.inner_steps} inner steps, batch ${sp.batch_size} × ${sp.seq_len}`],
    ["best held-out loss", num(job.best_loss, 4)],
    ["bytes moved (deltas, updates, versions)", bytes(moved)],
    ["submitted", ago(job.submitted_ms)],
  ]));
  // Point 0 is the base before round 1; point r the held-out loss after round r.
  const xs = [], heldout = [], train = [];
  if (rounds.length && rounds[0].heldout_before != null) {
    xs.push(0); heldout.push(rounds[0].heldout_before); train.push(null);
  }
  for (const r of rounds) {
    xs.push(r.round + 1);
    heldout.push(r.heldout_after ?? null);
    const done = r.tasks.filter((t) => t.last_loss != null);
    train.push(done.length ? done.reduce((s, t) => s + t.last_loss, 0) / done.length : null);
  }
  const el = document.getElementById("loss-chart");
  el.dataset.points = String(heldout.filter((y) => y != null).length);
  const data = [xs, heldout, train];
  if (!jobState.plot || jobState.job !== job.job) {
    if (jobState.plot) jobState.plot.destroy();
    el.innerHTML = "";
    jobState.job = job.job;
    jobState.plot = new uPlot({
      width: Math.max(320, el.clientWidth || 480), height: 240,
      scales: { x: { time: false } },
      axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100] }, { label: "loss" }],
      series: [{ label: "round" },
        { label: "held-out", stroke: "#2f6fdf", width: 2, points: { size: 7 } },
        { label: "train (last step, mean)", stroke: "#c8b27a", dash: [4, 4], points: { size: 5 } }],
    }, data, el);
  } else {
    jobState.plot.setData(data);
  }
  const rows = [];
  for (const r of rounds.slice().reverse()) {
    for (const t of r.tasks) {
      rows.push([r.round + 1, short(t.task, 8), peerCell(t.worker), verdictPill(t.verdict),
        `<span class="reason">${esc(t.reason) || (t.verdict === "accepted" ? "passed the checks" : "")}</span>`,
        `${num(t.first_loss)} → ${num(t.last_loss)}`, t.tokens ?? "—",
        t.wall_ms != null ? `${(t.wall_ms / 1000).toFixed(1)} s` : "—", bytes(size(t.delta))]);
    }
  }
  set("job-tasks", rows.length ? table(["round", "task", "worker", "verdict", "reason", "loss", "tokens", "time", "delta"], rows)
    : `<p class="muted">${job.coordinated_here === false ? "coordinated elsewhere" : "round 1 is running"}</p>`);
  set("job-versions", table(["round", "version", "held-out before → after", "accepted"],
    rounds.filter((r) => r.version).map((r) => [r.round + 1,
      `<a href="#/models/${esc(r.version)}">${short(r.version)}</a>`,
      `${num(r.heldout_before, 4)} → ${num(r.heldout_after, 4)}`, `${r.accepted} of ${r.tasks.length}`])));
}

async function submitJob(evt) {
  evt.preventDefault();
  const spec = document.getElementById("spec").value;
  localStorage.setItem("iollm-spec", spec);
  const errors = document.getElementById("submit-errors");
  errors.innerHTML = "";
  set("submit-status", "submitting…");
  try {
    const answer = await api("/v1/jobs/submit", { spec });
    set("submit-status", "submitted");
    location.hash = `#/jobs/${answer.job}`;
  } catch (e) {
    set("submit-status", "");
    // The node names the field first ("train.rounds: missing"); several are joined by "; ".
    for (const part of e.message.split("; ")) {
      const m = /^([A-Za-z_][\w.]*): (.*)$/s.exec(part);
      errors.insertAdjacentHTML("beforeend", m
        ? `<li data-field="${esc(m[1])}"><b>${esc(m[1])}</b>: ${esc(m[2])}</li>`
        : `<li>${esc(part)}</li>`);
    }
  }
}

pages.chain = {
  skeleton: () => `<div class="grid">
    <section class="card"><h2>Chain</h2><div id="chain-info"></div></section>
    <section class="card"><h2>Validators</h2><div id="validators"></div></section>
    <section class="card"><h2>Balances</h2><div id="balances"></div></section>
    <section class="card"><h2>Reward split of a revenue record</h2>
      <form id="split-form" class="filters">
        <label>model version<input id="split-model" size="20" placeholder="version id or prefix"></label>
        <label>amount<input id="split-amount" type="number" min="1" value="1000"></label>
        <button type="submit">Show split</button></form>
      <div id="split"></div></section>
    <section class="card wide"><h2>Latest blocks</h2><div id="blocks"></div></section></div>`,
  mounted() {
    document.getElementById("split-form").addEventListener("submit", async (evt) => {
      evt.preventDefault();
      const q = new URLSearchParams({ model: document.getElementById("split-model").value,
                                      amount: document.getElementById("split-amount").value });
      try {
        const s = await api(`/v1/dashboard/split?${q}`);
        set("split", `<p class="muted">designer share ${s.designer_share_bps / 100} % of ${s.amount}; ` +
          `the rest by the weight of the receipts along the lineage (${s.lineage} version${s.lineage === 1 ? "" : "s"})</p>` +
          `<div class="split">${table(["peer", "role", "units"], s.pay.map((p) => [peerCell(p.peer), esc(p.role), p.units]))}</div>`);
      } catch (e) { set("split", `<p class="bad">${esc(e.message)}</p>`); }
    });
  },
  async update() {
    const info = await maybe("/v1/ledger");
    if (info.error) { set("chain-info", `<p class="muted">${esc(info.error)}</p>`); return; }
    const [blocks, balances] = await Promise.all([api("/v1/ledger/blocks?limit=12"), api("/v1/ledger/balances")]);
    const t = info.totals;
    set("chain-info", dl([
      ["chain id", esc(info.chain_id)], ["height", `<b id="height">${info.height}</b>`],
      ["last block", idCell(info.block)], ["state root", idCell(info.state_root)],
      ["this node validates", info.validator ? "yes" : "no"], ["mempool", `${info.mempool} txs`],
      ["supply", `${t.supply} (allocated ${t.allocated}, emitted ${t.emitted}, revenue ${t.revenue})`],
      ["receipts counted", t.receipts],
    ]));
    set("validators", table(["peer", "power"], info.validators.map((v) => [peerCell(v.peer), v.power])));
    const total = balances.reduce((s, b) => s + b.balance, 0) || 1;
    set("balances", table(["peer", "balance", ""], balances.map((b) => [peerCell(b.peer), b.balance,
      `<div class="bar"><span style="width:${(100 * b.balance / total).toFixed(1)}%"></span></div>`])));
    set("blocks", table(["height", "id", "time", "proposer", "txs", "kinds", "bytes", "signatures"],
      blocks.map((b) => [b.height, idCell(b.id), new Date(b.time_ms).toLocaleTimeString(),
        peerCell(b.proposer), b.txs, esc(Object.entries(b.kinds).map(([k, n]) => `${k} ${n}`).join(", ")),
        b.bytes, b.signatures])));
  },
};

// -- router and polling -----------------------------------------------------------------

let mountedKey = null;
let busy = false;
let again = false; // a navigation while an update ran: update once more after it

function where() {
  const [, name, arg] = (location.hash || "#/node").split("/");
  return { name: pages[name] ? name : "node", arg: arg ? decodeURIComponent(arg) : null };
}

async function refresh() {
  if (busy) { again = true; return; }
  busy = true;
  const { name, arg } = where();
  const pg = pages[name];
  try {
    if (mountedKey !== name) {
      page().innerHTML = pg.skeleton();
      mountedKey = name;
      if (pg.mounted) pg.mounted();
      for (const a of document.querySelectorAll("header nav a")) {
        a.classList.toggle("active", a.dataset.page === name);
      }
    }
    await pg.update(arg);
    if (me) set("whoami", shortPeer(me.peer_id));
    document.getElementById("live").classList.remove("stale");
    const err = document.getElementById("error");
    err.hidden = true;
  } catch (e) {
    document.getElementById("live").classList.add("stale");
    const err = document.getElementById("error");
    err.hidden = false;
    err.textContent = e.status === 401
      ? "Your session has ended: run `iollm dashboard` for a new login link."
      : `Could not update: ${e.message}`;
  } finally {
    busy = false;
    document.body.dataset.updated = String(Date.now());
  }
  if (again) { again = false; refresh(); }
}

window.addEventListener("hashchange", refresh);
document.addEventListener("DOMContentLoaded", async () => {
  try { me = await api("/v1/status"); } catch (e) { /* shown by refresh */ }
  refresh();
  setInterval(refresh, POLL_MS);
});
