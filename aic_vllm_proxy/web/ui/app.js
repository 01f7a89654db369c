// The status page of aic-vllm-proxy (docs/ui.md). Plain JavaScript, no build step, no library.
// Everything shown comes from the daemon's API, asked with the key the user typed in (kept in
// sessionStorage only). Data goes into the DOM as text (textContent / text nodes), never as HTML.
"use strict";

const KEY_ITEM = "aic-vllm-proxy-key";
// Events after which GET /status is read again (anything that changes what it shows).
const REFRESH_ON = new Set([
  "hello", "dropped", "state", "switch", "load", "unload", "eviction", "ttl", "restart", "drain", "failure",
  "node", "rank",
]);
const MAX_EVENTS = 30; // events listed
const MAX_LOG_CHARS = 200000; // the live log keeps its newest part
const PRIMARY = "Requests that name no model go here (the last switched to or loaded).";

const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem(KEY_ITEM) || "";
let admin = false;
let clockOffset = 0; // the daemon's clock minus ours (ms), from the Date header of /status
let eventsAbort = null;
let logAbort = null;
let refreshTimer = null;
let refreshes = 0; // reads of /status started: only the newest one's answer is shown

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// One call to the daemon's API (a path relative to the page: the daemon may sit under a prefix).
async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (key) headers.Authorization = "Bearer " + key;
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error.message || message;
    } catch (_) { /* not the proxy's JSON error */ }
    throw new ApiError(response.status, message);
  }
  return response;
}

async function post(path, body) {
  const response = await api(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  return response.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children) node.append(child ?? "");
  return node;
}

// The message line; `source` "status": what GET /status answered, cleared when it answers again.
function showMessage(text, kind = "error", source = "") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.dataset.source = source;
  box.hidden = !text;
}

// What a refused call means for the user.
function explain(error) {
  if (!(error instanceof ApiError)) return "The daemon cannot be reached: " + error.message;
  if (error.status === 401 && !key) return "This daemon needs a key: enter an API key above. " + error.message;
  if (error.status === 401) return "The key was refused: " + error.message;
  if (error.status === 403) return "This key may not do that: " + error.message;
  return error.message;
}

function duration(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  const two = (n) => String(n).padStart(2, "0");
  if (h) return `${h}h ${two(m)}m ${two(s)}s`;
  if (m) return `${m}m ${two(s)}s`;
  return `${s}s`;
}

// The uptime and TTL cells count each second from the times /status gave.
function tick() {
  const now = Date.now() + clockOffset;
  for (const cell of document.querySelectorAll("[data-since]")) {
    cell.textContent = duration((now - Date.parse(cell.dataset.since)) / 1000);
  }
  for (const cell of document.querySelectorAll("[data-until]")) {
    const left = (Date.parse(cell.dataset.until) - now) / 1000;
    cell.textContent = left > 0 ? duration(left) : "expiring";
  }
}

// ------------------------------------------------------------------------------------ status

async function refresh() {
  clearTimeout(refreshTimer);
  refreshTimer = null;
  const read = ++refreshes;
  let response, status;
  try {
    response = await api("status");
    status = await response.json();
  } catch (error) {
    if (read !== refreshes) return;
    showMessage(explain(error), "error", "status");
    renderStatus(null);
    return;
  }
  if (read !== refreshes) return; // a later read is under way: its answer is newer
  const date = Date.parse(response.headers.get("Date"));
  if (!Number.isNaN(date)) clockOffset = date + 500 - Date.now(); // Date has whole seconds
  const updated = $("updated");
  updated.textContent = "updated " + new Date(Date.now() + clockOffset).toISOString().slice(11, 19) + " UTC";
  if ($("message").dataset.source === "status") showMessage("");
  renderStatus(status);
  await Promise.all([showSwitchTail(status), showNodes(read)]);
}

// Events come in bursts (a load is several): one refresh for a burst.
function refreshSoon() {
  if (refreshTimer === null) refreshTimer = setTimeout(refresh, 150);
}

function renderStatus(status) {
  const instances = status ? status.instances : [];
  $("version").textContent = status ? status.version : "";
  $("sw-state").textContent = status ? status.state + (status.switching ? " (switching)" : "") : "-";
  $("sw-state").className = "state " + (status ? status.state : "");
  $("sw-model").textContent = (status && status.model_spec) || "-";
  $("sw-target").textContent = (status && status.pending_model_specs.join(", ")) || "-";
  $("sw-error").textContent = (status && (status.last_switch_error || status.error)) || "-";
  const rows = instances.map(instanceRow);
  $("instances").tBodies[0].replaceChildren(...rows);
  $("no-instances").hidden = !status || rows.length > 0;
  if (!status) $("sw-tail").hidden = true;
  tick();
}

function instanceRow(item) {
  const state = el("td", { class: "state " + item.state }, item.state + (item.switching ? " …" : ""));
  if (item.error) state.append(el("div", { class: "error" }, item.error));
  for (const rank of item.ranks || []) {
    state.append(el("div", { class: "rank" }, `rank ${rank.rank} on ${rank.node}: ${rank.state}`));
  }
  const uptime = item.state === "ready" && item.ready_at ? el("td", { "data-since": item.ready_at }) : el("td", {}, "-");
  const ttl = item.expires_at ? el("td", { "data-until": item.expires_at }) : el("td", {}, item.pinned ? "pinned" : "-");
  const actions = el("td", { class: "admin-only" });
  if (admin) {
    actions.append(
      button("Log", () => followLog(item.name)),
      button("Unload", () => act(`unload ${item.name}`, () => post("unload", { model: item.name }))),
    );
  }
  return el("tr", { "data-name": item.name },
    el("td", { class: "name" }, item.name, item.primary ? el("span", { class: "badge", title: PRIMARY }, "primary") : ""),
    state,
    el("td", { class: "spec" }, item.model_spec || "-"),
    el("td", {}, item.gpus.length ? item.gpus.join(",") : "all"),
    el("td", {}, Math.round(item.gpu_memory_utilization * 100) + "%"),
    el("td", {}, String(item.in_flight)),
    el("td", {}, String(item.waiting)),
    uptime,
    ttl,
    el("td", {}, item.sleep_level ? "level " + item.sleep_level : "off"),
    actions,
  );
}

function button(label, onClick) {
  const node = el("button", { type: "button" }, label);
  node.addEventListener("click", onClick);
  return node;
}

// The failed or running switch's log tail (GET /logs/tail: admin keys only).
async function showSwitchTail(status) {
  const box = $("sw-tail");
  if (!admin || !(status.switching || status.last_switch_error || status.error)) {
    box.hidden = true;
    return;
  }
  try {
    box.textContent = await (await api("logs/tail?lines=40&cause=1")).text();
    box.hidden = false;
  } catch (_) {
    box.hidden = true; // no log yet
  }
}

// The agents of models across nodes (GET /nodes: admin keys only); the section shows once
// there is one. `read` is the /status read this belongs to: a newer one wins.
async function showNodes(read) {
  const section = $("nodes");
  let nodes = [];
  if (admin) {
    try {
      nodes = (await (await api("nodes")).json()).nodes;
    } catch (_) { /* an older daemon, or the key changed meanwhile */ }
  }
  if (read !== refreshes) return;
  section.querySelector("tbody").replaceChildren(...nodes.map(nodeRow));
  section.hidden = nodes.length === 0;
}

function nodeRow(node) {
  const ranks = el("td", { class: "ranks" });
  for (const rank of node.ranks) {
    ranks.append(el("div", { class: "rank" },
      `${rank.instance} #${rank.rank} `, el("span", { class: "state " + rank.state }, rank.state),
      rank.pid ? ` pid ${rank.pid} ` : " ",
      button("Log", () => followLog(rank.instance, rank.rank))));
  }
  if (!node.ranks.length) ranks.append("-");
  const heard = node.state === "connected" ? el("td", {}, "-") : el("td", { "data-since": node.last_seen });
  const gpus = node.gpus.length ? `${node.gpus_in_use.join(",") || "none"} of ${node.gpus.join(",")}` : "-";
  return el("tr", { "data-node": node.name },
    el("td", { class: "name" }, node.name),
    el("td", { class: "state " + node.state }, node.state),
    el("td", {}, node.host),
    el("td", {}, gpus),
    ranks,
    heard,
  );
}

// --------------------------------------------------------------------------- key and role

// Which role the key has: admin keys may read the catalogue, nothing else may.
async function findRole() {
  admin = false;
  $("catalog").replaceChildren();
  let role = key ? "read-only key" : "read-only";
  if (key) {
    try {
      const catalog = await (await api("models/catalog")).json();
      admin = true;
      role = "admin";
      $("catalog").replaceChildren(...Object.keys(catalog.models).map((name) => el("option", { value: name })));
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) role = "key refused";
    }
  }
  document.body.classList.toggle("admin", admin);
  $("role").textContent = role;
}

// (Again) with the current key: nothing read with another key stays on the page.
async function start() {
  stopLog();
  if (eventsAbort) eventsAbort.abort();
  $("events").replaceChildren();
  $("sw-tail").hidden = true;
  await findRole();
  await refresh();
  followEvents();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("key").value.trim();
  $("key").value = "";
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
  showMessage("");
  start();
});

$("forget").addEventListener("click", () => {
  key = "";
  sessionStorage.removeItem(KEY_ITEM);
  showMessage("");
  start();
});

// ------------------------------------------------------------------------------- controls

async function act(what, call) {
  showMessage(what + " …", "info");
  try {
    const answer = await call();
    const launched = answer.accepted_model_spec ? ` (launching ${answer.accepted_model_spec})` : "";
    showMessage(answer.message || `${what}: accepted${launched}`, "info");
  } catch (error) {
    showMessage(`${what}: ${explain(error)}`);
  }
  refreshSoon();
}

for (const node of document.querySelectorAll("#control-form [data-action]")) {
  node.addEventListener("click", () => {
    const spec = $("spec").value.trim();
    const action = node.dataset.action;
    if (action === "stop") return act("stop", () => post("stop", {}));
    if (!spec) return showMessage("Enter a model spec or a catalogue name first.");
    if (action === "switch") return act(`switch to ${spec}`, () => post("switch", { model_spec: spec, wait: false }));
    return act(`load ${spec}`, () => post("load", { model: spec, wait: false }));
  });
}

// ------------------------------------------------------------------------------- live log

function stopLog() {
  if (logAbort) logAbort.abort();
  logAbort = null;
  $("log-view").hidden = true;
}

// GET /logs/stream read with fetch (EventSource could not send the key); `rank`: of a model
// across nodes, that rank's log (the daemon's copy).
async function followLog(name, rank = null) {
  stopLog();
  const abort = (logAbort = new AbortController());
  const pre = $("log");
  pre.textContent = "";
  $("log-name").textContent = rank === null ? name : `${name}, rank ${rank}`;
  $("log-view").hidden = false;
  const which = "model=" + encodeURIComponent(name) + (rank === null ? "" : "&rank=" + rank);
  try {
    const response = await api("logs/stream?lines=100&" + which, { signal: abort.signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(decoder.decode(value, { stream: true }));
      if (pre.textContent.length > MAX_LOG_CHARS) pre.textContent = pre.textContent.slice(-MAX_LOG_CHARS / 2);
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    }
    pre.append("\n--- the log ended (the process stopped) ---\n");
  } catch (error) {
    if (!abort.signal.aborted) pre.append("\n--- " + explain(error) + " ---\n");
  }
}

$("log-close").addEventListener("click", stopLog);

// --------------------------------------------------------------------------------- events

// A Server-Sent Events reader (the subset GET /events sends: id, data, comments; lines end in
// "\n" or "\r\n"). Calls onMessage(id, data) for each message.
async function readEvents(body, onMessage) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", data = [], id = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (line === "") {
        if (data.length) onMessage(id, data.join("\n"));
        data = [];
        continue;
      }
      if (line.startsWith(":")) continue; // a keep-alive comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "data") data.push(text);
      else if (field === "id") id = text;
    }
  }
}

function setLive(on, text) {
  $("live").textContent = text;
  $("live").className = "badge " + (on ? "on" : "off");
}

// Follows GET /events for as long as the page is open, reconnecting after a drop with the id of
// the last event seen (Last-Event-ID), so nothing in between is missed.
async function followEvents() {
  const abort = (eventsAbort = new AbortController());
  let lastId = null;
  let wait = 1000;
  while (!abort.signal.aborted) {
    try {
      const headers = lastId === null ? {} : { "Last-Event-ID": lastId };
      const response = await api("events", { headers, signal: abort.signal });
      setLive(true, "live");
      wait = 1000;
      await readEvents(response.body, (id, data) => {
        if (id !== null) lastId = id;
        onEvent(JSON.parse(data));
      });
    } catch (error) {
      if (abort.signal.aborted) return;
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
        setLive(false, "no events: key needed");
        return; // a new key starts again
      }
    }
    if (abort.signal.aborted) return;
    setLive(false, "reconnecting");
    await new Promise((resolve) => setTimeout(resolve, wait));
    wait = Math.min(wait * 2, 10000);
    refreshSoon();
  }
}

function onEvent(event) {
  if (event.type !== "hello") listEvent(event);
  if (REFRESH_ON.has(event.type)) refreshSoon();
}

function listEvent(event) {
  const time = (event.time || "").slice(11, 19);
  // The spec and the log lines are long: they are in the item's tooltip.
  const skip = new Set(["id", "type", "time", "model", "request_id", "model_spec", "log_tail"]);
  const details = Object.entries(event)
    .filter(([name, value]) => !skip.has(name) && value !== null && value !== "")
    .map(([name, value]) => `${name}=${typeof value === "object" ? JSON.stringify(value) : value}`)
    .join(" ");
  const item = el("li", { class: "event-" + event.type, title: JSON.stringify(event, null, 1) },
    el("span", { class: "time" }, time), " ",
    el("b", {}, event.type), " ",
    el("span", { class: "model" }, event.model || ""), " ",
    details);
  const list = $("events");
  list.prepend(item);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

setInterval(tick, 1000);
start();
