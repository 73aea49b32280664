// The daemon's read-only page: polls /api/status and /api/alarms every 2 s.
// Every value from the daemon (camera ids come from the network) is written with textContent
// or as an attribute built here; no HTML is ever parsed from data.
"use strict";

const POLL_MS = 2000;
const EVIDENCE = /^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.jpe?g$/;
let lastAlarms = "";

function el(tag, opts, children) {
  const node = document.createElement(tag);
  const o = opts || {};
  if (o.text !== undefined && o.text !== null) node.textContent = String(o.text);
  if (o.cls) node.className = o.cls;
  if (o.title) node.title = String(o.title);
  for (const [k, v] of Object.entries(o.attrs || {})) node.setAttribute(k, String(v));
  for (const c of children || []) node.appendChild(c);
  return node;
}

function num(v, digits) {
  if (v === null || v === undefined || Number.isNaN(Number(v))) return "–";
  const x = Number(v);
  if (digits === undefined) return x.toLocaleString("en-US");
  if (x !== 0 && Math.abs(x) < 0.001) return x.toExponential(2);
  return x.toFixed(digits);
}

function duration(s) {
  s = Math.max(0, Math.floor(Number(s) || 0));
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24;
  const m = Math.floor(s / 60) % 60, sec = s % 60;
  if (d) return `${d} d ${h} h ${m} min`;
  if (h) return `${h} h ${m} min`;
  if (m) return `${m} min ${sec} s`;
  return `${sec} s`;
}

function clock(epoch) {
  if (typeof epoch !== "number") return "–";
  const t = new Date(epoch * 1000);
  const p = (n) => String(n).padStart(2, "0");
  return `${t.getFullYear()}-${p(t.getMonth() + 1)}-${p(t.getDate())} ` +
    `${p(t.getHours())}:${p(t.getMinutes())}:${p(t.getSeconds())}`;
}

function evidenceUrl(name) {
  return typeof name === "string" && EVIDENCE.test(name)
    ? "/evidence/" + encodeURIComponent(name) : null;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
  const empty = document.getElementById(tbody.parentNode.id + "-empty");
  if (empty) empty.hidden = rows.length > 0;
}

function showStatus(doc) {
  const st = doc.status || {}, health = doc.health || {};
  document.getElementById("device").textContent = st.device || "";
  document.title = `MoLE-Flow Edge · ${st.device || ""}`;
  const badge = document.getElementById("health-badge");
  const state = ["healthy", "degraded", "unhealthy"].includes(health.status)
    ? health.status : "unknown";
  badge.textContent = health.status || "unknown";
  badge.className = "badge " + state;
  const facts = [
    ["Version", st.version], ["Device", st.device], ["Uptime", duration(st.uptime_s)],
    ["Broker", st.mqtt_connected ? "connected" : "not connected"],
    ["Health", health.status || "unknown"],
    ["Backend", [st.backend, st.precision].filter(Boolean).join(" · ")],
    ["Scoring workers", health.workers], ["Queue", health.queue],
    ["Connections", health.connections],
  ];
  document.getElementById("status").replaceChildren(...facts.flatMap(([k, v]) => {
    const dd = el("dd", {text: v === undefined || v === null || v === "" ? "–" : v});
    if (k === "Broker") dd.className = st.mqtt_connected ? "ok" : "bad";
    if (k === "Health") dd.className = state;
    return [el("dt", {text: k}), dd];
  }));
  const reasons = Array.isArray(health.reasons) ? health.reasons : [];
  document.getElementById("reasons").replaceChildren(
    ...reasons.map((r) => el("li", {text: r})));

  fill(document.querySelector("#experts tbody"), (doc.experts || []).map((e) => el("tr", {}, [
    el("td", {text: e.name, cls: "name"}),
    ...(e.calibrated
      ? [el("td", {text: num(e.threshold, 3), cls: "num"}),
         el("td", {text: num(e.map_threshold, 3), cls: "num"}),
         el("td", {text: num(e.false_alarm_rate * 100, 2) + " %", cls: "num"}),
         el("td", {text: e.codec || "–"}),
         el("td", {text: num(e.n_images), cls: "num"})]
      : [el("td", {text: "not calibrated: raises no alarm", cls: "bad",
                   attrs: {colspan: 5}})]),
  ])));

  const counts = ["frames_in", "frames_scored", "alarms", "unknown", "dropped", "errors"];
  const quiet = ["frames_in", "frames_scored"]; // the others stand out when not zero
  fill(document.querySelector("#cameras tbody"), (doc.cameras || []).map((c) => el("tr", {}, [
    el("td", {text: c.camera, cls: "name"}),
    ...counts.map((k) => el("td", {text: num(c[k]),
                                   cls: c[k] && !quiet.includes(k) ? "num hot" : "num"})),
  ])));
  return doc;
}

function thresholds(doc) {
  const t = {};
  for (const e of doc.experts || []) if (e.calibrated) t[e.name] = e.threshold;
  return t;
}

function alarmRow(a, limits) {
  const ev = a.evidence || {};
  const overlay = evidenceUrl(ev.overlay), frame = evidenceUrl(ev.frame) || overlay;
  let thumb;
  if (overlay) {
    const img = el("img", {cls: "thumb", attrs: {src: overlay, alt: `overlay of ${a.frame}`,
                                                   height: 72}});
    img.addEventListener("load", () => { img.dataset.loaded = "yes"; });
    img.addEventListener("error", () => { img.dataset.loaded = "no"; });
    thumb = el("a", {attrs: {href: frame, target: "_blank", rel: "noopener"},
                     title: "open the full frame"}, [img]);
  } else {
    thumb = el("span", {text: "no image", cls: "muted"});
  }
  const limit = limits[a.expert];
  const score = el("td", {cls: "num"}, [
    el("strong", {text: num(a.score_raw, 3)}),
    el("span", {text: limit === undefined ? "" : ` > ${num(limit, 3)}`, cls: "muted"}),
    el("div", {text: a.score === null || a.score === undefined ? "" :
                `score ${num(a.score, 3)}`, cls: "muted small"}),
  ]);
  const regions = Array.isArray(a.regions) ? a.regions.length : 0;
  return el("tr", {}, [
    el("td", {}, [thumb]), el("td", {text: clock(a.scored_at), cls: "time"}),
    el("td", {text: a.camera, cls: "name"}), el("td", {text: a.frame}),
    el("td", {text: a.expert}), score, el("td", {text: num(regions), cls: "num"}),
  ]);
}

function showAlarms(alarms, doc) {
  const key = JSON.stringify([alarms, thresholds(doc)]);
  if (key === lastAlarms) return; // unchanged: keep the thumbnails as they are
  lastAlarms = key;
  const limits = thresholds(doc);
  fill(document.querySelector("#alarms tbody"),
       (Array.isArray(alarms) ? alarms : []).map((a) => alarmRow(a, limits)));
}

async function getJson(url) {
  const r = await fetch(url, {cache: "no-store"});
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

async function poll() {
  const updated = document.getElementById("updated");
  try {
    const [doc, alarms] = await Promise.all([getJson("/api/status"), getJson("/api/alarms")]);
    showAlarms(alarms, showStatus(doc));
    updated.textContent = "updated " + clock(Date.now() / 1000);
    updated.className = "muted";
  } catch (err) {
    updated.textContent = "daemon not reachable (" + err.message + "); retrying";
    updated.className = "bad";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
