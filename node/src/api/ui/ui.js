// The df status page: reads the node's JSON API once a second and draws its peers, its tasks and,
// for the selected task (#task=ID in the address), a map of its pieces and who sent them.
// No framework, no build step: this file is served as it is.
"use strict";

const REFRESH_MS = 1000;
const MARKS = { ".": "m", f: "f", o: "o", s: "s", p: "p", h: "h" };
const NAMES = { m: "missing", f: "in flight", o: "from origin", s: "from a seed", p: "from a peer", h: "held before" };

const $ = (id) => document.getElementById(id);
const state = { selected: null, last: new Map(), roles: new Map() };

function bytes(n) {
  if (n == null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function short(id) {
  return id && id.length > 16 ? id.slice(0, 6) + "…" + id.slice(-6) : id;
}

// Query strings and fragments may carry tokens: never shown.
function withoutQuery(url) {
  if (!url) return "";
  const i = url.search(/[?#]/);
  return i < 0 ? url : url.slice(0, i);
}

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const c of children) e.append(c);
  return e;
}

async function getJson(path) {
  const r = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function selectedFromHash() {
  const m = location.hash.match(/task=([A-Za-z0-9]+)/);
  return m ? m[1] : null;
}

function drawStatus(s) {
  $("role").textContent = s.role;
  $("peer-id").textContent = s.peer_id;
  $("summary").textContent =
    `${s.connected_peers} peers connected, ${s.known_seeds} seeds known, ${s.active_tasks} tasks active · ` +
    `uploaded ${bytes(s.bytes.uploaded)}, received ${bytes(s.bytes.from_peers)} from the swarm and ` +
    `${bytes(s.bytes.from_origin)} from origins`;
}

function drawPeers(peers) {
  const body = $("peers").tBodies[0];
  body.replaceChildren(...peers.map((p) => {
    state.roles.set(p.peer_id, p.role || "node");
    return el("tr", {}, el("td", {}, el("code", { textContent: p.peer_id })),
      el("td", { textContent: p.role || "?" }), el("td", { textContent: p.ip || "" }));
  }));
}

function drawTasks(tasks, now) {
  const body = $("tasks").tBodies[0];
  const rows = tasks.map((t) => {
    // The rate is measured between two refreshes of this page.
    const prev = state.last.get(t.id);
    let rate = "";
    if (prev && now > prev.at && t.state === "running") {
      rate = bytes(Math.max(0, (t.bytes_done - prev.done) * 1000 / (now - prev.at))) + "/s";
    }
    state.last.set(t.id, { at: now, done: t.bytes_done });
    const pct = t.pieces_total ? (100 * t.pieces_done / t.pieces_total) : 0;
    const bar = el("span", { className: "bar" }, el("span"));
    bar.firstChild.style.width = pct.toFixed(1) + "%";
    const tr = el("tr", { className: "task" + (t.id === state.selected ? " selected" : "") },
      el("td", {}, el("code", { textContent: short(t.id), title: t.id })),
      el("td", { className: "url", textContent: withoutQuery(t.source_url), title: withoutQuery(t.source_url) }),
      el("td", { textContent: t.state + (t.error ? ": " + t.error.message : "") }),
      el("td", {}, bar, " " + pct.toFixed(0) + " %"),
      el("td", { textContent: bytes(t.content_length) }),
      el("td", { textContent: rate }),
      el("td", { textContent: bytes(t.from_peers) }),
      el("td", { textContent: bytes(t.from_origin) }));
    tr.dataset.task = t.id;
    tr.addEventListener("click", () => { location.hash = "task=" + t.id; });
    return tr;
  });
  body.replaceChildren(...rows);
}

function drawPieces(id, map, info) {
  $("detail").hidden = false;
  $("detail-id").textContent = id;
  $("detail-url").textContent = info ? withoutQuery(info.source_url) : "";
  const grid = $("grid");
  // Cells are kept and recoloured: a large task does not rebuild thousands of nodes a second.
  if (grid.childElementCount !== map.length || grid.dataset.task !== id) {
    const cells = [];
    for (let i = 0; i < map.length; i++) cells.push(el("span", { className: "cell" }));
    grid.replaceChildren(...cells);
    grid.dataset.task = id;
  }
  const counts = { m: 0, f: 0, o: 0, s: 0, p: 0, h: 0 };
  for (let i = 0; i < map.length; i++) {
    const k = MARKS[map[i]] || "m";
    counts[k]++;
    const c = grid.children[i];
    const cls = "cell " + k;
    if (c.className !== cls) {
      c.className = cls;
      c.title = `piece ${i}: ${NAMES[k]}`;
    }
  }
  const verified = counts.o + counts.s + counts.p + counts.h;
  const sum = $("piece-summary");
  sum.dataset.total = map.length;
  sum.dataset.verified = verified;
  sum.dataset.missing = counts.m;
  sum.dataset.inflight = counts.f;
  sum.textContent = `${verified} of ${map.length} pieces verified (origin ${counts.o}, seeds ${counts.s}, ` +
    `peers ${counts.p}, held ${counts.h}); ${counts.f} in flight, ${counts.m} missing`;
  drawSenders(info);
}

function drawSenders(info) {
  const rows = [];
  if (info) {
    for (const r of info.received_from || []) {
      rows.push({ who: short(r.peer) + " (" + (state.roles.get(r.peer) || "peer") + ")", title: r.peer,
        bytes: r.bytes, kind: state.roles.get(r.peer) === "seed" ? "s" : "p" });
    }
    if (info.from_origin) rows.push({ who: "origin (fetched by this node)", title: "", bytes: info.from_origin, kind: "o" });
  }
  const max = Math.max(1, ...rows.map((r) => r.bytes));
  $("senders").replaceChildren(...rows.map((r) => {
    const fill = el("span", { className: "fill cell " + r.kind });
    fill.style.width = (20 * r.bytes / max).toFixed(2) + "em";
    return el("div", { className: "row" }, el("span", { className: "who", textContent: r.who, title: r.title }),
      el("span", { className: "amount", textContent: bytes(r.bytes) }), fill);
  }));
  if (!rows.length) $("senders").textContent = "nothing received yet";
}

async function refresh() {
  try {
    const now = Date.now();
    const [status, peers, tasks] = await Promise.all([getJson("v1/status"), getJson("v1/peers"), getJson("v1/tasks")]);
    drawStatus(status);
    drawPeers(peers);
    state.selected = selectedFromHash() || (tasks.length === 1 ? tasks[0].id : null);
    drawTasks(tasks, now);
    if (state.selected) {
      const [map, info] = await Promise.all([
        getJson(`v1/tasks/${state.selected}/pieces`),
        getJson(`v1/tasks/${state.selected}`),
      ]);
      drawPieces(state.selected, map.pieces, info);
    } else {
      $("detail").hidden = true;
    }
    $("error").hidden = true;
  } catch (e) {
    $("error").hidden = false;
    $("error").textContent = "cannot read the node's API: " + e.message;
  } finally {
    schedule(REFRESH_MS);
  }
}

// One refresh loop: selecting a task redraws now instead of starting a second loop.
let timer = null;
function schedule(ms) {
  clearTimeout(timer);
  timer = setTimeout(refresh, ms);
}

window.addEventListener("hashchange", () => schedule(0));
schedule(0);
