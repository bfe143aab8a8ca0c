// Crier's operator dashboard: what the broker serving this page is doing, live.
//
// The figures and charts come from the broker's own topic `_crier.stats` (published once a
// second while someone subscribes; subscribed with `rewind` so that the charts start with what
// history holds), the tables from the HTTP API (`GET /api/topics` and `GET /api/connections`,
// polled). Everything goes through the JavaScript client served at `/crier.js`, which reconnects
// and renews the subscriptions after a broker restart. With authentication configured, the page
// asks for an API key or a token, keeps it in sessionStorage, and sends it both ways.
//
// Every value that comes from clients (topics, users, message data) is shown with textContent.

import { Crier, CrierError } from "../crier.js";
import uPlot from "./vendor/uPlot.esm.js";

/** The charts' window, in seconds. */
const WINDOW = 300;
const TOPICS_EVERY = 2000;
const CONNECTIONS_EVERY = 1500;
const CONSOLE_LIMIT = 200;
const TOKEN_KEY = "crier.dashboard.token";
const STATS_TOPIC = "_crier.stats";
/** Reconnection attempts that fail before the badge says `offline` rather than `reconnecting`. */
const OFFLINE_AFTER = 2;

const $ = (id) => document.getElementById(id);

const state = {
  token: readToken(),
  crier: null,
  /** Waiting for the operator to give a credential. */
  needToken: false,
  /** The last `_crier.stats` data, and the one before (for the drop rates). */
  stats: null,
  previous: null,
  /** From the stats, or the welcome until the first stats arrive. */
  maxBuffered: null,
  /** topic name -> {epoch, seq, at} from the previous poll, for the rates. */
  topicSeqs: new Map(),
  /** Console subscriptions: topic or pattern -> {rewind, sub}. */
  consoleSubs: new Map(),
  consoleCount: 0,
  timers: { topics: null, connections: null },
};

// --- the charts' data: one column per series, sharing the time column (Unix seconds) ---

const columns = {
  time: [],
  json: [],
  msgpack: [],
  total: [],
  published: [],
  delivered: [],
  dropped: [],
  buffered: [],
  bufferedMax: [],
};

function pushStats(s) {
  const t = s.time / 1000;
  const last = columns.time.at(-1);
  if (last !== undefined && t <= last) return false;
  if (last !== undefined && t - last > 2.5) {
    // The stats stopped (nobody subscribed, or the broker was down): break the lines.
    for (const [name, column] of Object.entries(columns)) column.push(name === "time" ? last + 1 : null);
  }
  columns.time.push(t);
  columns.json.push(s.connections.json);
  columns.msgpack.push(s.connections.msgpack);
  columns.total.push(s.connections.total);
  columns.published.push(s.rates.published);
  columns.delivered.push(s.rates.delivered);
  columns.dropped.push(s.rates.dropped);
  columns.buffered.push(s.buffered_bytes);
  columns.bufferedMax.push(s.buffered_bytes_max);
  let old = 0;
  while (old < columns.time.length && columns.time[old] < t - WINDOW) old++;
  if (old > 0) for (const column of Object.values(columns)) column.splice(0, old);
  return true;
}

// --- formatting ---

const integer = new Intl.NumberFormat("en");

function fmtInt(n) {
  return n === null || n === undefined ? "–" : integer.format(n);
}

function fmtRate(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return "–";
  if (n === 0) return "0";
  if (n < 10) return n.toFixed(1);
  return integer.format(Math.round(n));
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

function fmtAge(since) {
  const s = Math.max(0, Math.round((Date.now() - Date.parse(since)) / 1000));
  if (!Number.isFinite(s)) return "–";
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

function setText(id, text) {
  const el = $(id);
  if (el.textContent !== text) el.textContent = text;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

// --- charts ---

const css = getComputedStyle(document.documentElement);
const color = (name) => css.getPropertyValue(name).trim();

const minutes = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", hour12: false });
const seconds = new Intl.DateTimeFormat(undefined, {
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
  hour12: false,
});

function axis(extra) {
  return {
    stroke: color("--muted"),
    grid: { stroke: color("--grid"), width: 1 },
    ticks: { stroke: color("--grid"), width: 1 },
    font: "11px system-ui, sans-serif",
    ...extra,
  };
}

function makeChart(id, series, format, integers = false) {
  const el = $(id);
  const data = [columns.time, ...series.map((s) => columns[s.column])];
  const chart = new uPlot(
    {
      width: Math.max(200, el.clientWidth),
      height: 170,
      cursor: { drag: { x: false, y: false } },
      legend: { live: false },
      scales: {
        x: {
          time: true,
          // The last 5 minutes, or as much as there is (at least a minute) on a fresh page.
          range: (u, min, max) => {
            const end = max ?? Date.now() / 1000;
            return [Math.max(end - WINDOW, Math.min(min ?? end, end - 60)), end];
          },
        },
        y: { range: (u, min, max) => [0, Math.max(max ?? 0, 1) * 1.15] },
      },
      axes: [
        axis({
          values: (u, splits, axis, space, incr) =>
            splits.map((t) => (incr < 60 ? seconds : minutes).format(t * 1000)),
          space: 70,
        }),
        axis({
          values: (u, splits) => splits.map(format),
          size: 64,
          ...(integers ? { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5] } : {}),
        }),
      ],
      series: [
        {},
        ...series.map((s) => ({
          label: s.label,
          stroke: color(s.color),
          fill: s.fill ? color(s.color) + "22" : undefined,
          width: 1.5,
          points: { show: false },
          value: (u, v) => (v === null || v === undefined ? "–" : format(v)),
        })),
      ],
    },
    data,
    el,
  );
  new ResizeObserver(() => {
    const width = Math.max(200, el.clientWidth);
    if (width !== chart.width) chart.setSize({ width, height: 170 });
  }).observe(el);
  return { el, chart, data, series };
}

let charts = [];
let renderQueued = false;

function renderCharts() {
  renderQueued = false;
  for (const { el, chart, data, series } of charts) {
    chart.setData(data);
    const points = columns.time.length;
    el.dataset.points = String(points);
    el.dataset.lastTime = String(columns.time.at(-1) ?? "");
    for (const s of series) el.dataset[`last${s.column[0].toUpperCase()}${s.column.slice(1)}`] = String(columns[s.column].at(-1) ?? "");
  }
}

function queueRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(renderCharts);
}

// --- `_crier.stats` ---

function onStats({ data: s }) {
  if (!s || typeof s.time !== "number" || !s.connections || !s.rates || !s.totals) return;
  if (!pushStats(s)) return;
  state.previous = state.stats;
  state.stats = s;
  state.maxBuffered = s.max_buffered_bytes;
  queueRender();
  renderFigures(s);
  renderDrops();
}

function renderFigures(s) {
  setText("server", s.server ?? "");
  const updated = $("updated");
  updated.textContent = `updated ${seconds.format(s.time)}`;
  updated.dataset.time = String(s.time);
  setText("conn-total", fmtInt(s.connections.total));
  setText("conn-json", fmtInt(s.connections.json));
  setText("conn-msgpack", fmtInt(s.connections.msgpack));
  setText("conn-accepted", fmtRate(s.rates.connections_accepted));
  setText("conn-closed", fmtRate(s.rates.connections_closed));
  // The change in open connections over the last minute the charts hold.
  const t = s.time / 1000;
  let i = 0;
  while (i < columns.time.length - 1 && (columns.time[i] < t - 60 || columns.total[i] === null)) i++;
  const change = s.connections.total - (columns.total[i] ?? s.connections.total);
  setText("conn-change", change > 0 ? `+${change}` : String(change));
  setText("rate-published", fmtRate(s.rates.published));
  setText("total-published", fmtInt(s.totals.published));
  setText("rate-delivered", fmtRate(s.rates.delivered));
  setText("total-delivered", fmtInt(s.totals.delivered));
  setText("buffered-total", fmtBytes(s.buffered_bytes));
  setText("buffered-max", fmtBytes(s.buffered_bytes_max));
  setText("max-buffered", fmtBytes(s.max_buffered_bytes));
  setText("slow-connections", fmtInt(s.slow_connections));
  $("tile-buffered")?.classList.toggle("warn", s.slow_connections > 0);
  setText("subscriptions", fmtInt(s.subscriptions));
  setText("topics-count", fmtInt(s.topics));
  setText("patterns-count", fmtInt(s.patterns));
  setText("history-messages", fmtInt(s.history_messages));
  setText("history-bytes", fmtBytes(s.history_bytes));
  setText("refused", fmtInt(s.totals.refused));
  setText("errors", fmtInt(s.totals.errors));
}

function renderDrops() {
  const { stats: s, previous: p } = state;
  const tbody = $("drops").tBodies[0];
  const rows = [];
  const dt = p ? (s.time - p.time) / 1000 : 0;
  let total = 0;
  let totalRate = 0;
  for (const reason of Object.keys(s.totals.dropped).sort()) {
    const n = s.totals.dropped[reason];
    const before = p?.totals.dropped[reason];
    const rate = dt > 0 && before !== undefined && n >= before ? (n - before) / dt : null;
    total += n;
    totalRate += rate ?? 0;
    const tr = document.createElement("tr");
    tr.dataset.reason = reason;
    tr.dataset.count = String(n);
    if (rate) tr.className = "hot";
    tr.append(cell(reason), cell(fmtRate(rate), "num"), cell(fmtInt(n), "num"));
    rows.push(tr);
  }
  const tr = document.createElement("tr");
  tr.className = "total";
  tr.dataset.reason = "all";
  tr.dataset.count = String(total);
  tr.append(cell("all"), cell(fmtRate(dt > 0 ? totalRate : null), "num"), cell(fmtInt(total), "num"));
  rows.push(tr);
  tbody.replaceChildren(...rows);
}

// --- the HTTP API ---

/** GET an API path; {ok, body} or {status, error} or {offline}. A 401 asks for a credential. */
async function api(path) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  let response;
  try {
    response = await fetch(new URL(path, document.baseURI), { headers, cache: "no-store" });
  } catch {
    return { offline: true };
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: keep the status
  }
  if (response.ok) return { ok: true, body };
  if (response.status === 401) {
    askForToken(
      body?.error?.code === "invalid_token" ? `Refused: ${body.error.message}` : null,
    );
  }
  return { status: response.status, error: body?.error ?? null };
}

/** Shows why a table cannot be filled (or hides the note). */
function tableNote(table, text) {
  const note = $(`${table}-note`);
  note.hidden = !text;
  note.textContent = text ?? "";
  $(table).closest(".card").classList.toggle("stale", Boolean(text));
}

function explain(result) {
  if (result.offline) return "The broker is unreachable: these are the last figures it gave.";
  if (result.status === 403) return "Listing this needs an API key (a token may only see the stats).";
  if (result.status === 401) return "Waiting for a credential.";
  return `The broker answered ${result.status}${result.error ? `: ${result.error.message}` : ""}.`;
}

async function pollTopics() {
  clearTimeout(state.timers.topics);
  if (!state.needToken) {
    const result = await api("api/topics?limit=1000");
    if (result.ok) {
      renderTopics(result.body.topics ?? []);
      tableNote("topics", null);
    } else {
      tableNote("topics", explain(result));
    }
  }
  state.timers.topics = setTimeout(pollTopics, TOPICS_EVERY);
}

function renderTopics(topics) {
  const now = performance.now();
  const seen = new Map();
  const rows = topics.map((t) => {
    const prev = state.topicSeqs.get(t.name);
    const rate =
      prev && prev.epoch === t.epoch && t.seq >= prev.seq
        ? ((t.seq - prev.seq) * 1000) / (now - prev.at)
        : null;
    seen.set(t.name, { epoch: t.epoch, seq: t.seq, at: now });
    return { ...t, rate };
  });
  state.topicSeqs = seen;
  rows.sort(
    (a, b) => (b.rate ?? -1) - (a.rate ?? -1) || b.subscribers - a.subscribers || (a.name < b.name ? -1 : 1),
  );
  const tbody = $("topics").tBodies[0];
  tbody.replaceChildren(
    ...rows.map((t) => {
      const tr = document.createElement("tr");
      tr.dataset.topic = t.name;
      tr.dataset.subscribers = String(t.subscribers);
      tr.dataset.rate = t.rate === null ? "" : t.rate.toFixed(3);
      if (t.name.startsWith("_crier.")) tr.className = "system";
      const name = cell(t.name, "name");
      name.title = `epoch ${t.epoch}`;
      tr.append(
        name,
        cell(fmtInt(t.subscribers), "num"),
        cell(fmtRate(t.rate), "num"),
        cell(fmtInt(t.seq), "num"),
        cell(fmtInt(t.history), "num"),
      );
      return tr;
    }),
  );
  setText("topics-total", String(rows.length));
}

async function pollConnections() {
  clearTimeout(state.timers.connections);
  if (!state.needToken) {
    const result = await api("api/connections?limit=500");
    if (result.ok) {
      renderConnections(result.body.connections ?? []);
      tableNote("connections", null);
    } else {
      tableNote("connections", explain(result));
    }
  }
  state.timers.connections = setTimeout(pollConnections, CONNECTIONS_EVERY);
}

function renderConnections(connections) {
  const max = state.maxBuffered ?? state.crier?.welcome?.limits?.max_buffered_bytes ?? null;
  const self = state.crier?.welcome?.connection;
  // The API sends the most backed-up first; keep that order whatever it does.
  connections.sort((a, b) => b.buffered_bytes - a.buffered_bytes || (a.id < b.id ? -1 : 1));
  const tbody = $("connections").tBodies[0];
  tbody.replaceChildren(
    ...connections.map((c) => {
      const tr = document.createElement("tr");
      tr.dataset.id = c.id;
      tr.dataset.buffered = String(c.buffered_bytes);
      const slow = max !== null && c.buffered_bytes > max / 2;
      tr.classList.toggle("slow", slow);
      tr.classList.toggle("self", c.id === self);
      const id = cell(c.id, "id");
      if (c.id === self) {
        const tag = document.createElement("span");
        tag.className = "tag";
        tag.textContent = "this page";
        id.append(" ", tag);
      }
      const buffered = document.createElement("td");
      buffered.className = "buffered";
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = `${max ? Math.min(100, (100 * c.buffered_bytes) / max) : 0}%`;
      bar.append(fill);
      const amount = document.createElement("span");
      amount.className = "amount";
      amount.textContent = fmtBytes(c.buffered_bytes);
      const meter = document.createElement("div");
      meter.className = "meter";
      meter.append(bar, amount);
      buffered.append(meter);
      const user = cell(c.user ?? "–", "user");
      user.title = c.authenticated ? "authenticated" : "not authenticated";
      tr.append(
        id,
        user,
        cell(c.peer ?? "–", "peer"),
        cell(c.encoding),
        cell(fmtInt(c.subscriptions), "num"),
        buffered,
        cell(fmtBytes(c.buffered_high_water), "num"),
        cell(fmtInt(c.dropped), c.dropped ? "num hot" : "num"),
        cell(fmtInt(c.conflated), "num"),
        cell(fmtAge(c.connected_since), "age"),
      );
      return tr;
    }),
  );
  setText("connections-total", String(connections.length));
}

function refreshTables() {
  pollTopics();
  pollConnections();
}

// --- the connection ---

function setStatus(kind, detail = "") {
  const badge = $("status");
  badge.textContent = kind;
  badge.className = `badge ${kind}`;
  badge.title = detail || "the dashboard's own connection";
}

function notice(text) {
  const el = $("notice");
  el.hidden = !text;
  el.textContent = text ?? "";
}

function connect() {
  state.crier?.close();
  const options = { reconnect: { minDelay: 250, maxDelay: 5000 } };
  if (state.token) options.token = state.token;
  const crier = new Crier(new URL("ws", document.baseURI), options);
  state.crier = crier;
  setStatus("offline", "connecting");
  crier.on("open", (event) => {
    if (crier !== state.crier) return;
    setStatus("connected", `connection ${event.welcome.connection}`);
    state.maxBuffered ??= event.welcome.limits?.max_buffered_bytes ?? null;
    // After a reconnect (a broker restart, say) the tables may be stale: fetch them now.
    if (event.reconnected) refreshTables();
  });
  crier.on("close", (event) => {
    if (crier !== state.crier) return;
    if (event.willReconnect) {
      setStatus("reconnecting", `closed with ${event.code}${event.reason ? ` (${event.reason})` : ""}`);
      return;
    }
    setStatus("offline", `closed with ${event.code}${event.reason ? ` (${event.reason})` : ""}`);
    if (event.code === 4002) askForToken("The token expired: give a fresh one.");
    if (event.code === 4003) askForToken("The broker requires a credential.");
  });
  crier.on("reconnecting", (event) => {
    if (crier !== state.crier) return;
    const detail = `attempt ${event.attempt}, in ${event.delay} ms`;
    setStatus(event.attempt > OFFLINE_AFTER ? "offline" : "reconnecting", detail);
  });
  crier.on("error", (event) => {
    if (crier !== state.crier) return;
    const code = event.error instanceof CrierError ? event.error.code : null;
    if (code === "unauthorized" || code === "invalid_token") {
      askForToken(`The broker refused the credential: ${event.error.message}`);
    } else if (event.error?.topic && state.consoleSubs.has(event.error.topic)) {
      consoleLine(`${event.error.topic}: ${code}: ${event.error.message}`, "error");
    }
  });
  crier.on("gap", (event) => {
    if (crier !== state.crier || event.topic === STATS_TOPIC) return;
    consoleLine(`gap on ${event.pattern ?? event.topic}: ${event.reason}${event.missed ? `, ${event.missed} missed` : ""}`, "gap");
  });

  const stats = crier.subscribe(STATS_TOPIC, onStats, { rewind: WINDOW });
  stats.ready.then(
    () => notice(null),
    (error) => {
      if (crier !== state.crier || error?.code === "closed") return;
      notice(
        error?.code === "forbidden"
          ? "This credential is not granted _crier.stats (a token needs `_crier.>`): the figures and charts stay empty."
          : `Cannot subscribe to ${STATS_TOPIC}: ${error?.message ?? error}`,
      );
    },
  );
  for (const [topic, entry] of state.consoleSubs) entry.sub = subscribeConsole(topic, entry.rewind);
}

// --- credentials ---

function readToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

function saveToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // storage disabled: the credential lasts as long as the page
  }
}

function askForToken(message) {
  if (state.needToken && !message) return;
  state.needToken = true;
  $("auth").hidden = false;
  $("auth-message").textContent = message ?? "";
  $("auth-token").focus();
}

async function submitToken(event) {
  event.preventDefault();
  const token = $("auth-token").value.trim();
  if (!token) return;
  state.token = token;
  state.needToken = false;
  const probe = await api("api/topics?limit=1");
  if (probe.status === 401) return; // api() asked again, with the reason
  saveToken(token);
  $("auth").hidden = true;
  $("auth-token").value = "";
  $("auth-change").hidden = false;
  connect();
  refreshTables();
}

// --- the console ---

function subscribeConsole(topic, rewind) {
  const crier = state.crier;
  const sub = crier.subscribe(topic, onConsoleMessage, rewind > 0 ? { rewind } : {});
  sub.ready.then(
    () => renderChips(),
    (error) => {
      if (crier !== state.crier || error?.code === "closed") return;
      consoleLine(`cannot subscribe to ${topic}: ${error.code}: ${error.message}`, "error");
      state.consoleSubs.delete(topic);
      renderChips();
    },
  );
  return sub;
}

function onConsoleMessage({ topic, seq, data }) {
  const li = document.createElement("li");
  li.className = "console-message";
  li.dataset.topic = topic;
  li.dataset.seq = String(seq);
  const time = document.createElement("time");
  time.textContent = seconds.format(Date.now());
  const name = document.createElement("span");
  name.className = "topic";
  name.textContent = topic;
  const number = document.createElement("span");
  number.className = "seq";
  number.textContent = `#${seq}`;
  const body = document.createElement("code");
  body.className = "data";
  let text = JSON.stringify(data);
  if (text.length > 2000) text = `${text.slice(0, 2000)}… (${text.length} characters)`;
  body.textContent = text;
  li.append(time, name, number, body);
  appendLog(li);
  state.consoleCount++;
  setText("console-count", fmtInt(state.consoleCount));
}

function consoleLine(text, kind) {
  const li = document.createElement("li");
  li.className = `console-line ${kind}`;
  li.textContent = text;
  appendLog(li);
}

function appendLog(li) {
  const log = $("console-log");
  log.prepend(li);
  while (log.childElementCount > CONSOLE_LIMIT) log.lastElementChild.remove();
}

function renderChips() {
  const list = $("console-subscriptions");
  list.replaceChildren(
    ...[...state.consoleSubs].map(([topic, entry]) => {
      const li = document.createElement("li");
      li.className = "chip";
      li.dataset.topic = topic;
      li.classList.toggle("pending", !entry.sub?.active);
      const name = document.createElement("span");
      name.textContent = entry.rewind ? `${topic} (rewind ${entry.rewind})` : topic;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "unsubscribe";
      remove.title = `unsubscribe from ${topic}`;
      remove.textContent = "×";
      remove.addEventListener("click", () => {
        state.consoleSubs.delete(topic);
        entry.sub?.unsubscribe().catch(() => {});
        renderChips();
      });
      li.append(name, remove);
      return li;
    }),
  );
}

function bindConsole() {
  $("console-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const topic = $("console-topic").value.trim();
    const rewind = Math.max(0, Math.min(1000, Number($("console-rewind").value) || 0));
    if (!topic || state.consoleSubs.has(topic) || !state.crier) return;
    const entry = { rewind, sub: null };
    state.consoleSubs.set(topic, entry);
    entry.sub = subscribeConsole(topic, rewind);
    renderChips();
    $("console-topic").value = "";
  });
  $("console-clear").addEventListener("click", () => {
    $("console-log").replaceChildren();
    state.consoleCount = 0;
    setText("console-count", "0");
  });
  $("publish-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = $("publish-result");
    const topic = $("publish-topic").value.trim();
    let data;
    try {
      data = JSON.parse($("publish-data").value);
    } catch (error) {
      result.className = "error";
      result.textContent = `not JSON: ${error.message}`;
      return;
    }
    if (!state.crier) return;
    result.className = "muted";
    result.textContent = "publishing…";
    try {
      const { seq } = await state.crier.publish(topic, data);
      result.className = "ok";
      result.textContent = `published to ${topic}, seq ${seq}`;
      result.dataset.seq = String(seq);
    } catch (error) {
      result.className = "error";
      result.textContent = error instanceof CrierError ? `${error.code}: ${error.message}` : String(error);
      delete result.dataset.seq;
    }
  });
}

// --- start ---

function start() {
  charts = [
    makeChart(
      "chart-connections",
      [
        { label: "json", column: "json", color: "--blue" },
        { label: "msgpack", column: "msgpack", color: "--violet" },
        { label: "total", column: "total", color: "--fg" },
      ],
      (v) => fmtInt(Math.round(v)),
      true,
    ),
    makeChart(
      "chart-rates",
      [
        { label: "published", column: "published", color: "--green", fill: true },
        { label: "delivered", column: "delivered", color: "--blue" },
        { label: "dropped", column: "dropped", color: "--red" },
      ],
      fmtRate,
    ),
    makeChart(
      "chart-buffered",
      [
        { label: "all connections", column: "buffered", color: "--amber", fill: true },
        { label: "largest", column: "bufferedMax", color: "--red" },
      ],
      fmtBytes,
    ),
  ];
  bindConsole();
  $("auth-form").addEventListener("submit", submitToken);
  $("auth-forget").addEventListener("click", () => {
    saveToken(null);
    state.token = null;
    $("auth-token").value = "";
    $("auth-message").textContent = "Forgotten.";
  });
  $("auth-change").addEventListener("click", () => askForToken(null));
  $("auth-change").hidden = !state.token;
  // Find out whether the API wants a credential before opening the WebSocket with none.
  api("api/topics?limit=1").then((probe) => {
    if (probe.status === 401) return; // the form's submit connects
    connect();
    refreshTables();
  });
}

start();
