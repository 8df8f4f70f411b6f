// The status page: polls GET /ui/status every 2 s and draws it; the playground streams /v1/chat/completions.
// Plain JS, no dependencies; the key lives in sessionStorage only.
"use strict";

const KEY = "litestar-llm-key";
const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
let polling = null;
let history = [];

function key() { return sessionStorage.getItem(KEY); }
function headers() {
  const h = { "Content-Type": "application/json" };
  if (key()) h.Authorization = "Bearer " + key();
  return h;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function fixed(value, digits) { return value === null || value === undefined ? "–" : Number(value).toFixed(digits); }
function ms(seconds) { return seconds === null || seconds === undefined ? "–" : (seconds * 1000).toFixed(1) + " ms"; }
function bytes(n) {
  if (!n) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}
function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${Math.floor(s % 60)}s`;
}

// -- the key ---------------------------------------------------------------------------------------------------

function askForKey(message) {
  stopPolling();
  $("main").hidden = true;
  $("key-form").hidden = false;
  $("key-message").textContent = message || "";
  $("key-input").focus();
}

async function errorText(response) {
  try {
    const body = await response.json();
    const error = body.error;
    return (error && (error.message || error)) || body.detail || response.statusText;
  } catch (_) {
    return response.statusText;
  }
}

// -- status ----------------------------------------------------------------------------------------------------

async function poll() {
  let response;
  try {
    response = await fetch("/ui/status", { headers: headers(), cache: "no-store" });
  } catch (exc) {
    setPill("unreachable", "failed");
    return;
  }
  if (response.status === 401) {
    const why = await errorText(response);
    askForKey(key() ? `The server refused this key: ${why}. Enter another.` : "This server needs an API key.");
    return;
  }
  if (!response.ok) {
    setPill(`error ${response.status}`, "failed");
    return;
  }
  $("key-form").hidden = true;
  $("main").hidden = false;
  render(await response.json());
}

function startPolling() {
  stopPolling();
  poll();
  polling = setInterval(poll, POLL_MS);
}
function stopPolling() { if (polling) clearInterval(polling); polling = null; }

function setPill(text, kind) {
  const pill = $("status");
  pill.textContent = text;
  pill.className = "pill " + (kind || "").split(" ")[0];
}

function render(s) {
  setPill(s.status, s.status);
  const generation = s.config_generation === null ? "" : ` · generation ${s.config_generation}`;
  $("meta").textContent = `v${s.version} · up ${duration(s.uptime_s)} · config ${s.config_digest}${generation}`;
  $("link-docs").href = s.links.docs;
  $("link-metrics").hidden = !s.links.metrics;
  if (s.links.metrics) $("link-metrics").href = s.links.metrics;
  renderModels(s.models);
  renderTraffic(s.traffic);
  renderKeys(s.keys, s.admin);
  renderModelChoice(s.models, s.links.chat);
}

function renderModels(models) {
  const rows = models.map((m) => {
    const state = el("td", {}, el("span", { class: "state " + m.state }, m.state));
    if (m.error) state.append(el("span", { class: "reason" }, m.error));
    const bar = el("span", { class: "bar", title: m.batch_occupancy === null ? "" : `${m.running} of ${m.max_batch_size}` },
      el("span"));
    bar.firstChild.style.width = `${Math.round(100 * (m.batch_occupancy || 0))}%`;
    const batch = el("td", {}, bar, " ", m.max_batch_size ? `${m.running ?? 0}/${m.max_batch_size}` : "–");
    return el("tr", { "data-model": m.name }, el("td", {}, m.name), state, el("td", {}, m.backend),
      el("td", { class: "source" }, m.source), el("td", { class: "num" }, m.context_length ?? "–"),
      el("td", { class: "num" }, bytes(m.size_bytes)), el("td", { class: "num running" }, m.running ?? "–"),
      el("td", { class: "num waiting" }, m.waiting ?? "–"), batch);
  });
  $("models").tBodies[0].replaceChildren(...rows);
}

function renderTraffic(t) {
  $("no-telemetry").hidden = !!t;
  if (!t) return;
  $("window").textContent = `last ${duration(t.window_s)}`;
  $("tok-s").textContent = fixed(t.output_tokens_per_s, 1);
  $("req-s").textContent = fixed(t.requests_per_s, 2);
  $("ttft").textContent = `${ms(t.ttft_s.p50)} / ${ms(t.ttft_s.p95)}`;
  $("itl").textContent = `${ms(t.itl_s.p50)} / ${ms(t.itl_s.p95)}`;
  const s = t.series;
  const toMs = (values) => values.map((v) => (v === null ? null : v * 1000));
  chart("chart-tokens", s.t, [s.output_tokens_per_s]);
  chart("chart-requests", s.t, [s.requests_per_s]);
  chart("chart-ttft", s.t, [toMs(s.ttft_p50_s), toMs(s.ttft_p95_s)]);
  chart("chart-itl", s.t, [toMs(s.itl_p50_s), toMs(s.itl_p95_s)]);
  $("requests").tBodies[0].replaceChildren(...t.requests.map((r) =>
    el("tr", { class: r.status >= 400 ? "bad" : "" }, el("td", {}, r.dialect), el("td", {}, r.status),
      el("td", { class: "num" }, r.count), el("td", { class: "num" }, fixed(r.per_s, 2)))));
  const reasons = Object.entries(t.refusals);
  $("refusals").tBodies[0].replaceChildren(...(reasons.length ? reasons.map(([reason, count]) =>
    el("tr", {}, el("td", {}, reason), el("td", { class: "num" }, count))) : [el("tr", {}, el("td", {}, "none"), el("td"))]));
}

const SVG = "http://www.w3.org/2000/svg";
const W = 300, H = 90, PAD = 14;

// A small line chart in SVG: one path per series, gaps where a value is null, x = seconds before now.
function chart(id, t, series) {
  const svg = $(id).querySelector("svg");
  const values = series.flat().filter((v) => v !== null);
  const top = Math.max(1e-9, ...values);
  const first = t.length ? t[0] : -1;
  const x = (s) => PAD + ((s - first) / Math.max(1e-9, -first || 1)) * (W - PAD - 2);
  const y = (v) => H - PAD - (v / top) * (H - 2 * PAD);
  const children = [svgEl("line", { class: "axis", x1: PAD, y1: H - PAD, x2: W, y2: H - PAD })];
  series.forEach((points, i) => {
    let d = "", pen = "M";
    points.forEach((v, j) => {
      if (v === null) { pen = "M"; return; }
      d += `${pen}${x(t[j]).toFixed(1)},${y(v).toFixed(1)} `;
      pen = "L";
    });
    if (d) children.push(svgEl("path", { class: i ? "line p95" : "line", d }));
  });
  children.push(svgEl("text", { x: 0, y: 10 }, values.length ? Number(top.toPrecision(3)).toString() : "no data"));
  if (t.length) children.push(svgEl("text", { x: PAD, y: H - 2 }, `-${duration(-first)}`));
  svg.replaceChildren(...children);
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderKeys(keys, admin) {
  $("keys-scope").textContent = admin ? "(all keys)" : "(this key)";
  $("keys").tBodies[0].replaceChildren(...(keys.length ? keys.map((k) =>
    el("tr", { "data-key": k.name }, el("td", {}, k.name), el("td", { class: "num" }, k.requests),
      el("td", { class: "num" }, k.input_tokens), el("td", { class: "num" }, k.output_tokens)))
    : [el("tr", {}, el("td", {}, "no keys ([auth] keys): the server is open"))]));
}

function renderModelChoice(models, chat) {
  $("playground").hidden = !chat;
  const select = $("pg-model");
  // An unloaded model loads on its first request (load = "on_demand"); loading and failed ones answer 503.
  const names = models.filter((m) => m.state === "ready" || m.state === "unloaded").map((m) => m.name);
  const current = [...select.options].map((o) => o.value);
  if (names.join() !== current.join()) {
    const chosen = select.value;
    select.replaceChildren(...names.map((name) => el("option", { value: name }, name)));
    if (names.includes(chosen)) select.value = chosen;
  }
}

// -- playground ------------------------------------------------------------------------------------------------

function turn(role, text) {
  const node = el("div", { class: "turn " + role }, text);
  $("pg-log").append(node);
  return node;
}

async function send(event) {
  event.preventDefault();
  const prompt = $("pg-prompt").value.trim();
  if (!prompt || !$("pg-model").value) return;
  $("pg-prompt").value = "";
  $("pg-send").disabled = true;
  history.push({ role: "user", content: prompt });
  turn("user", prompt);
  const reply = turn("assistant", "");
  const started = performance.now();
  let first = null, chunks = 0, usage = null, text = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model: $("pg-model").value, messages: history, stream: true,
        max_tokens: Number($("pg-max").value) || 256, temperature: Number($("pg-temp").value),
        stream_options: { include_usage: true } }),
    });
    if (!response.ok) throw new Error(`${response.status}: ${await errorText(response)}`);
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
        for (const line of frame.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (first === null) { first = performance.now(); $("pg-ttft").textContent = ms((first - started) / 1000); }
            text += delta.content;
            chunks++;
            reply.textContent = text;
            showRate(first, chunks);
          }
        }
      }
    }
    const tokens = usage ? usage.completion_tokens : chunks;
    showRate(first, tokens);
    $("pg-tokens").textContent = tokens;
    history.push({ role: "assistant", content: text });
  } catch (exc) {
    reply.className = "turn error";
    reply.textContent = `The request failed: ${exc.message}`;
    history.pop();
  } finally {
    $("pg-send").disabled = false;
  }
}

function showRate(first, tokens) {
  if (first === null) return;
  const seconds = (performance.now() - first) / 1000;
  if (seconds > 0 && tokens > 1) $("pg-tps").textContent = ((tokens - 1) / seconds).toFixed(1);
}

// -- start -----------------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("key-input").value.trim();
    if (value) sessionStorage.setItem(KEY, value); else sessionStorage.removeItem(KEY);
    $("key-input").value = "";
    $("key-message").textContent = "";
    startPolling();
  });
  $("change-key").addEventListener("click", () => askForKey(""));
  $("chat-form").addEventListener("submit", send);
  $("pg-clear").addEventListener("click", () => { history = []; $("pg-log").replaceChildren(); });
  startPolling();
});
