// The llm-worker dashboard: reads /status and /dashboard/data every few seconds and renders them.
// Every string on the page came from a job, a model name or a host, so the DOM is built with
// createElement and text nodes only, never innerHTML; the Content-Security-Policy would refuse an
// injected script anyway. Actions call the /admin routes with the token the operator typed, kept in
// sessionStorage (gone with the tab, never in a URL, where logs and history would keep it).
// Every path is relative to the page's (/dashboard): behind a proxy that serves the host under a prefix
// (/gpu-7/dashboard), "status" is /gpu-7/status.
"use strict";

const REFRESH_MS = 3000;
const TOKEN_KEY = "llm-worker-admin-token";
const state = { timer: null, running: false, updated: 0, adminEnabled: false, previous: null, rates: {}, tokenNote: "" };

const $ = (id) => document.getElementById(id);
const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child)); // a string becomes a text node
  }
  return node;
}

// ---- formatting --------------------------------------------------------------------------

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  s = Math.max(0, s);
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + " min " + Math.floor(s % 60) + " s";
  return Math.floor(m / 60) + " h " + (m % 60) + " min";
}

const ago = (iso) => (iso ? seconds((Date.now() - Date.parse(iso)) / 1000) + " ago" : "–");
const percent = (r) => (r === null || r === undefined ? "–" : Math.round(r * 100) + "%");
const rate = (r) => (r === null || r === undefined ? "–" : r.toFixed(r < 10 ? 2 : 1) + "/s");
const cls = (text) => String(text || "").toLowerCase().replace(/[^a-z0-9-]/g, "-");
const badge = (text, kind) => el("span", { class: "badge b-" + cls(kind || text) }, text);
const meter = (ratio) => el("meter", { min: 0, max: 1, low: 0.75, high: 0.9, optimum: 0, value: ratio || 0 });
const muted = (text) => el("p", { class: "muted" }, text);
const label = (model) => String(model).replace(/:latest$/, "");

function table(headers, rows, empty) {
  if (!rows.length) return muted(empty);
  // data-label lets the phone layout show each cell under its column's name (see dashboard.css).
  return el("div", { class: "scroll" }, el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows.map((row) => el("tr", {}, row.map((cell, i) => el("td", { "data-label": headers[i] }, cell)))))));
}

// ---- actions -----------------------------------------------------------------------------

function action(text, path, confirmText) {
  if (!state.adminEnabled) return null; // no ADMIN_TOKEN: the routes do not exist, the header says why
  const ready = Boolean(token());
  return el("button", {
    type: "button", class: "act", disabled: !ready,
    title: ready ? "POST " + path : "enter the admin token first",
    onclick: () => act(text, path, confirmText),
  }, text);
}

async function act(text, path, confirmText) {
  if (confirmText && !window.confirm(confirmText)) return;
  try {
    const response = await fetch(path, { method: "POST", headers: { Authorization: "Bearer " + token() } });
    const body = await response.json().catch(() => ({}));
    notice(text + ": " + response.status + " " + JSON.stringify(body), response.ok);
    if (response.status === 401) { // changed on the host since: ask again
      sessionStorage.removeItem(TOKEN_KEY);
      state.tokenNote = "The token was refused.";
    }
  } catch (error) {
    notice(text + ": " + error.message, false);
  }
  refresh();
}

function notice(text, ok) {
  const node = $("notice");
  node.textContent = text;
  node.className = "banner " + (ok ? "notice" : "refused");
  node.hidden = false;
}

async function useToken(event) {
  event.preventDefault();
  const value = $("token").value.trim();
  $("token").value = "";
  if (!value) return;
  // Asked once with a harmless read, so that a mistyped token is said at once, not at the first action.
  const response = await fetch("admin/breakers", { headers: { Authorization: "Bearer " + value } }).catch(() => null);
  if (response && response.ok) sessionStorage.setItem(TOKEN_KEY, value);
  state.tokenNote = response && response.ok ? "Token accepted: actions are on."
    : "The token was refused" + (response ? " (" + response.status + ")." : ": no answer.");
  refresh();
}

function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.tokenNote = "Token forgotten.";
  refresh();
}

function renderAdmin(data) {
  state.adminEnabled = Boolean(data && data.admin.enabled);
  $("token-form").hidden = !state.adminEnabled || Boolean(token());
  $("token-forget").hidden = !state.adminEnabled || !token();
  let note = state.tokenNote;
  if (data && !state.adminEnabled) note = "Actions are off: this host has no ADMIN_TOKEN set.";
  else if (state.adminEnabled && !token()) {
    note = (note ? note + " " : "") + "Enter the admin token to requeue, purge, open or close breakers and unload models.";
  }
  $("token-state").textContent = note;
}

// ---- the sections ------------------------------------------------------------------------

function section(id, ...children) {
  $(id).querySelector(".body").replaceChildren(...children.flat().filter(Boolean));
}

function renderSummary(s) {
  $("host").textContent = s.workerId;
  document.title = "llm-worker " + s.workerId;
  $("summary").replaceChildren(
    badge(s.phase), " ", s.ready ? badge("ready") : badge("not ready: " + s.notReadyBecause, "down"), " ",
    badge("Redis " + (s.redis.up ? "up" : "down"), s.redis.up ? "up" : "down"), " ",
    badge(s.provider.name + " " + (s.provider.up ? "up" : "down"), s.provider.up ? "up" : "down"),
    " v" + s.version + ", up " + seconds(s.uptime) + ", provider calls " + s.providerCalls.inFlight + "/" + s.providerCalls.limit);
}

function renderWorkers(s, data) {
  const pools = Object.entries(s.pools).map(([name, p]) =>
    el("li", {}, el("b", {}, name), " " + p.workers + "/" + p.wanted, p.paused ? [" ", badge("paused", "down"), " " + (p.pausedBecause || "")] : null));
  const rows = s.workers.map((w) => [
    String(w.pid), w.pool || "–",
    [badge(w.state), w.paused ? [" ", badge(w.paused, "down")] : null],
    w.jobId ? el("code", { class: "id" }, w.jobId) : "–", w.jobId ? seconds(w.jobSeconds) : "–", bytes(w.rssBytes), String(w.jobsDone)]);
  const out = [el("ul", { class: "chips" }, pools),
    table(["PID", "Pool", "State", "Job", "For", "Memory", "Done"], rows, "No worker is up.")];
  const others = Object.entries((data && data.hosts) || {}).filter(([host]) => host !== s.workerId);
  if (others.length) {
    out.push(el("h3", {}, "Other hosts (from Redis)"), table(["Host", "Workers", "Queues", "Holding", "Alive"],
      others.map(([host, ws]) => [host, ws.map((w) => w.pid).join(", "), [...new Set(ws.map((w) => w.queue))].join(", "),
        String(ws.reduce((n, w) => n + w.holding, 0)), ws.filter((w) => w.alive).length + "/" + ws.length]), ""));
  }
  section("workers", out);
}

function updateRates(data) {
  // Jobs finished per second, from the all-hosts counters of two successive reads.
  const now = performance.now(), counts = {};
  for (const [name, q] of Object.entries(data.queues)) if (q && typeof q === "object") counts[name] = q;
  const before = state.previous;
  state.previous = { at: now, counts };
  if (!before || now - before.at < 500) return;
  const dt = (now - before.at) / 1000;
  state.rates = {};
  for (const [name, q] of Object.entries(counts)) {
    const old = before.counts[name];
    if (!old || q.completed < old.completed || q.failed < old.failed) continue; // new or reset: no rate yet
    state.rates[name] = { completed: (q.completed - old.completed) / dt, failed: (q.failed - old.failed) / dt };
  }
}

function renderQueues(s, data) {
  const depths = s.queues, stats = (data && data.queues) || {};
  const isQueue = (v) => Boolean(v) && typeof v === "object"; // the other keys are totals
  const names = [...new Set([...Object.keys(depths), ...Object.keys(stats)])].filter((n) => isQueue(depths[n]) || isQueue(stats[n]));
  const rows = names.map((name) => {
    const d = depths[name] || {}, q = stats[name] || {}, r = state.rates[name] || {};
    return [el("b", {}, name), String(d.waiting ?? q.waiting ?? "–"), String(d.processing ?? q.active ?? "–"),
      String(d.parked ?? q.parked ?? "–"), rate(r.completed), rate(r.failed), String(q.completed ?? "–"), String(q.failed ?? "–"),
      action("Purge", "admin/queue/purge?queue=" + encodeURIComponent(name), "Delete every job waiting in " + name + "?")];
  });
  section("queues",
    table(["Queue", "Waiting", "Processing", "Parked", "Done/s", "Failed/s", "Done", "Failed", ""], rows, "No queue."),
    muted("Delayed (retries waiting): " + depths.delayed + ". Dead letters: " + depths.deadLetter +
      ". Depths sampled " + seconds(depths.sampledSecondsAgo) + " ago; rates from the all-hosts counters."));
}

function renderDead(data) {
  if (!data) return section("dead", muted("Not available: /dashboard/data did not answer."));
  const d = data.deadLetters;
  const items = d.newest.map((x) => el("li", { class: "dead" },
    el("div", { class: "line" }, badge(x.errorType || "unknown", "down"), " ", el("b", {}, x.queue || "?"), " ",
      el("span", { class: "muted" }, ago(x.failedAt)), " ", x.jobId ? action("Requeue", "admin/queue/requeue?id=" + encodeURIComponent(x.jobId)) : null),
    el("p", { class: "reason" }, x.error || ""),
    el("p", { class: "muted" }, [x.jobId ? "job " + x.jobId : "no job id", x.type, x.model, x.attempts ? "attempts: " + x.attempts : null].filter(Boolean).join(" · ")),
    x.preview ? el("pre", {}, x.preview) : null));
  section("dead",
    el("div", { class: "line" }, el("b", {}, String(d.total)), d.total > d.newest.length ? " dead letters, the newest " + d.newest.length + " shown" : " dead letters", " ",
      d.total ? action("Requeue all", "admin/queue/requeue?all=1", "Put every dead letter back on its queue?") : null, " ",
      d.total ? action("Delete all", "admin/queue/purge?queue=" + encodeURIComponent(d.queue), "Delete all " + d.total + " dead letters? They cannot be requeued afterwards.") : null),
    el("ol", { class: "plain" }, items),
    muted(data.promptsShown ? "Payload text shown: LOG_PROMPTS is on and the admin token was given."
      : "Payload text hidden (each text replaced by its length): shown only with LOG_PROMPTS on and the admin token."));
}

function renderBreakers(s) {
  const rows = s.breakers.map((b) => {
    const key = encodeURIComponent(b.key);
    return [el("code", {}, b.key), [badge(b.state), b.forced ? " forced" : ""], String(b.consecutiveFailures),
      b.windowFailures + "/" + b.windowCalls, b.halfOpenInSeconds === null ? "–" : seconds(b.halfOpenInSeconds), String(b.openedTotal),
      el("span", { class: "nowrap" }, action("Open", "admin/breakers/force-open?key=" + key),
        action("Close", "admin/breakers/force-close?key=" + key), action("Reset", "admin/breakers/reset?key=" + key))];
  });
  const limits = (s.rateLimits || []).map((r) => [r.provider,
    r.callsLastMinute + (r.rpm ? "/" + r.rpm : ""), r.tokensLastMinute + (r.tpm ? "/" + r.tpm : ""),
    Object.entries(r.heldSeconds).map(([m, t]) => m + " " + seconds(t)).join(", ") || "–", String(r.rateLimited)]);
  section("breakers",
    table(["Key", "State", "In a row", "Failed/calls", "Half-open in", "Opened", ""], rows, "No breaker has been used yet."),
    limits.length ? [el("h3", {}, "Rate limits"), table(["Provider", "Calls/min", "Tokens/min", "Held", "Limited"], limits, "")] : null);
}

function renderModels(s, data) {
  const used = (data && data.modelsLastUsedSecondsAgo) || {};
  const groups = new Map(); // by endpoint when /status names one per model (several inference endpoints per host)
  for (const m of s.models.loaded) {
    const key = m.endpoint || "";
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(m);
  }
  const out = [];
  if (Array.isArray(s.endpoints) && s.endpoints.length) {
    out.push(table(["Endpoint", "Provider", "URL", "Up", "Calls", "Models"], s.endpoints.map((e) => [el("b", {}, e.endpoint), e.provider, e.url || "–",
      e.up === null || e.up === undefined ? "–" : badge(e.up && e.reachable !== false ? "up" : "down"), String(e.callsInFlight ?? "–"), (e.modelsLoaded || []).join(", ") || "–"]), ""));
  } else {
    out.push(el("p", {}, badge(s.provider.up ? "up" : "down"), " " + s.provider.name + " at " + s.provider.url + (s.provider.version ? " (v" + s.provider.version + ")" : "") + (s.provider.error ? ": " + s.provider.error : "")));
  }
  const down = (s.reachability || []).filter((r) => !r.up);
  if (down.length) out.push(muted("Unreachable: " + down.map((r) => r.provider + " (" + (r.error || "") + ")").join("; ")));
  if (!groups.size) out.push(muted("No model is loaded."));
  for (const [endpoint, models] of groups) {
    if (endpoint) out.push(el("h3", {}, endpoint));
    out.push(table(["Model", "Memory", "Last used", ""], models.map((m) => [el("b", {}, m.name), bytes(m.vramBytes),
      Object.hasOwn(used, label(m.name)) && used[label(m.name)] !== null ? seconds(used[label(m.name)]) + " ago" : "–",
      action("Unload", "admin/models/unload?model=" + encodeURIComponent(m.name) + (m.endpoint ? "&endpoint=" + encodeURIComponent(m.endpoint) : ""), "Unload " + m.name + " now?")]), ""));
  }
  if (s.models.loading.length) {
    out.push(el("h3", {}, "Loading"), table(["Model", "For", "Why"], s.models.loading.map((m) =>
      [m.model + (m.endpoint ? " @ " + m.endpoint : ""), seconds(m.seconds), m.why]), ""));
  }
  section("models", out);
}

function renderGpus(s) {
  const g = s.gpu, h = s.host;
  const cards = g.gpus.map((x) => el("div", { class: "card" }, el("b", {}, "#" + x.index + " " + x.name),
    el("div", { class: "kv" }, "Utilisation", meter(x.utilizationRatio), percent(x.utilizationRatio)),
    el("div", { class: "kv" }, "Memory", meter(x.memoryTotalBytes ? x.memoryUsedBytes / x.memoryTotalBytes : 0), bytes(x.memoryUsedBytes) + " of " + bytes(x.memoryTotalBytes)),
    el("p", { class: "muted" }, (x.temperatureCelsius ?? "–") + " °C · " + (x.powerWatts === null ? "–" : Math.round(x.powerWatts)) + " W · Ollama " + bytes(x.ollamaMemoryBytes))));
  section("gpus",
    cards.length ? el("div", { class: "cards" }, cards) : muted(g.collectorUp ? "No GPU on this host." : "No GPU readings" + (g.error ? ": " + g.error : ".")),
    el("div", { class: "kv" }, "Host CPU", meter(h.cpuRatio), percent(h.cpuRatio) + ", load " + (h.load1 === null ? "–" : h.load1.toFixed(2))),
    el("div", { class: "kv" }, "Host memory", meter(h.memoryTotalBytes ? h.memoryUsedBytes / h.memoryTotalBytes : 0), bytes(h.memoryUsedBytes) + " of " + bytes(h.memoryTotalBytes)));
}

function renderFleet(s) {
  const a = s.affinity;
  if (!a) return section("fleet", muted("No fleet in /status."));
  const hosts = Object.entries(a.hosts || {}).map(([host, held]) => [el("b", {}, host),
    Object.entries(held.models || {}).map(([m, x]) => m + " (" + x.state + ", " + x.busy + "/" + x.slots + " busy)").join(", ") || "–",
    String(held.cacheSize ?? "–"), ago(held.at)]);
  const parked = Object.entries(a.parked || {}).flatMap(([queue, models]) => Object.entries(models).map(([m, n]) => [queue, m, String(n)]));
  section("fleet",
    muted("Model affinity " + (a.enabled ? "on" : "off") + "; a parked job waits at most " + seconds(a.maxWaitMs / 1000) + "."),
    table(["Host", "Models held", "Keeps", "Published"], hosts, "No host publishes its models."),
    el("h3", {}, "Parked jobs"), table(["Queue", "Model", "Jobs"], parked, "None."));
}

function renderEvents(data) {
  if (!data) return section("events", muted("Not available: /dashboard/data did not answer."));
  const skip = new Set(["timestamp", "workerId", "hostname"]);
  const rows = data.events.map((e) => [e.at.slice(11, 19), el("code", { class: "nowrap" }, e.type),
    Object.entries(e.data).filter(([k, v]) => !skip.has(k) && v !== null && typeof v !== "object").slice(0, 6).map(([k, v]) => k + "=" + v).join(" ")]);
  section("events", table(["Time (UTC)", "Event", "Details"], rows, "No event yet."));
}

// ---- the loop ----------------------------------------------------------------------------

async function getJSON(path) {
  // The data route shows prompt text only to the token's holder (and only with LOG_PROMPTS on).
  const headers = path.startsWith("dashboard/") && token() ? { Authorization: "Bearer " + token() } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  if (!response.ok) throw new Error(path + " answered " + response.status);
  return response.json();
}

async function refresh() {
  if (state.running) return;
  state.running = true;
  clearTimeout(state.timer);
  try {
    const [status, data] = await Promise.allSettled([getJSON("status"), getJSON("dashboard/data")]);
    const errors = [status, data].filter((r) => r.status === "rejected").map((r) => r.reason.message);
    $("error").textContent = errors.join("; ");
    $("error").hidden = !errors.length;
    const d = data.status === "fulfilled" ? data.value : null;
    if (d) updateRates(d);
    renderAdmin(d);
    if (status.status === "fulfilled") {
      const s = status.value;
      renderSummary(s); renderWorkers(s, d); renderQueues(s, d); renderBreakers(s); renderModels(s, d); renderGpus(s); renderFleet(s);
      state.updated = Date.now();
      document.body.dataset.rendered = String(state.updated); // for tests and scripts: a full render happened
    }
    renderDead(d); renderEvents(d);
  } finally {
    state.running = false;
    tick();
    if (!document.hidden) state.timer = setTimeout(refresh, REFRESH_MS);
  }
}

function tick() {
  const node = $("updated");
  if (document.hidden) node.textContent = "paused while this tab is hidden";
  else if (state.updated) node.textContent = "updated " + Math.round((Date.now() - state.updated) / 1000) + " s ago";
  node.classList.toggle("stale", Boolean(state.updated) && Date.now() - state.updated > 3 * REFRESH_MS);
}

document.addEventListener("visibilitychange", () => {
  // A hidden tab reads nothing: an operator's forgotten tab must not poll the host all night.
  if (document.hidden) { clearTimeout(state.timer); state.timer = null; tick(); } else refresh();
});
$("token-form").addEventListener("submit", useToken);
$("token-forget").addEventListener("click", forgetToken);
setInterval(tick, 1000);
refresh();
