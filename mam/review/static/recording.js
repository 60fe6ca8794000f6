// mam review, recording page: the player synchronised with the per-clip P(FMs) timeline, the
// skeleton overlay, and the reviewer's judgement saved as they work.
//
// Saving: every change goes to a queue kept in sessionStorage until the server has it, so a
// reload (or a dropped connection) resends it instead of losing it; the queue is emptied as the
// server answers. Each field change names the revision it was made on; when someone else had
// changed the field since, the server still takes it (last write wins) and says whose value it
// replaced, which is shown here. The page polls for others' changes every few seconds.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("rec-data").textContent);
  const ROOT = document.querySelector('meta[name="app-root"]').content;
  const CSRF = document.querySelector('meta[name="csrf-token"]').content;
  const API = ROOT + "/api/r/" + D.rid;
  const QKEY = "mam-review-pending-" + D.rid;
  const $ = (id) => document.getElementById(id);
  const video = $("video");
  const svg = $("timeline");
  const W = 1000;
  let laneH = 24;  // the FMs lane's height in the timeline's units (layoutLane)
  const clips = D.clips.slice().sort((a, b) => a.start - b.start);
  const byIndex = {};
  clips.forEach((c) => { byIndex[c.i] = c; });

  // -- small helpers ---------------------------------------------------------------------------
  function mmss(t, tenths) {
    t = Math.max(0, t);
    const m = Math.floor(t / 60), s = t - 60 * m;
    const ss = tenths ? s.toFixed(1).padStart(4, "0") : String(Math.floor(s)).padStart(2, "0");
    return String(m).padStart(2, "0") + ":" + ss;
  }
  function clock(at) { return new Date(at * 1000).toLocaleTimeString(); }
  function newId() {
    const b = new Uint8Array(12);
    crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }
  function svgEl(name, attrs) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", name);
    for (const k in attrs) el.setAttribute(k, attrs[k]);
    return el;
  }
  function xOf(t) { return (t / D.duration) * W; }
  function tOf(evt) {
    const pt = svg.createSVGPoint();
    pt.x = evt.clientX; pt.y = evt.clientY;
    const p = pt.matrixTransform(svg.getScreenCTM().inverse());
    return Math.min(D.duration, Math.max(0, (p.x / W) * D.duration));
  }
  function notice(html, actions, ttl) {
    const div = document.createElement("div");
    div.className = "notice";
    div.textContent = html;
    for (const [label, fn] of actions || []) {
      const b = document.createElement("button");
      b.type = "button"; b.textContent = label;
      b.addEventListener("click", () => { fn(); div.remove(); });
      div.appendChild(b);
    }
    const x = document.createElement("button");
    x.type = "button"; x.textContent = "dismiss"; x.addEventListener("click", () => div.remove());
    div.appendChild(x);
    $("notices").appendChild(div);
    if (ttl) setTimeout(() => div.remove(), ttl);
    return div;
  }
  function show(v) { return v === null || v === undefined || v === "" ? "(empty)" : String(v).slice(0, 80); }

  // -- state -----------------------------------------------------------------------------------
  const S = { fields: {}, intervals: {}, history: [], loaded: false, selected: null };

  function fieldValue(name) {
    const f = S.fields[name];
    return f ? f.value : null;
  }
  function reviewState() {
    if (fieldValue("state") === "done") return "done";
    const touched = Object.values(S.fields).some((f) => f.rev > 0) || Object.keys(S.intervals).length;
    return touched ? "in_progress" : "not_reviewed";
  }

  // -- the save queue --------------------------------------------------------------------------
  let queue = [];
  try { queue = JSON.parse(sessionStorage.getItem(QKEY) || "[]"); } catch (e) { queue = []; }
  let busy = false, failures = 0;
  function persist() {
    if (queue.length) sessionStorage.setItem(QKEY, JSON.stringify(queue));
    else sessionStorage.removeItem(QKEY);
    status();
  }
  function status(text, err) {
    const el = $("save-status");
    el.classList.toggle("err", !!err);
    el.textContent = text || (queue.length ? "saving\u2026" : S.loaded ? "all changes saved" : "loading\u2026");
  }
  function enqueue(op) {
    if (op.kind === "fields") {  // one pending field change per field: the newest value wins
      const prev = queue.find((o) => o.kind === "fields" && !o.sent);
      if (prev) { for (const k in op.changes) prev.changes[k] = prev.changes[k] ? { value: op.changes[k].value, base_rev: prev.changes[k].base_rev } : op.changes[k]; persist(); return pump(); }
    }
    queue.push(op);
    persist();
    pump();
  }
  async function api(method, url, body) {
    const opts = { method, headers: { "X-CSRF-Token": CSRF, Accept: "application/json" }, credentials: "same-origin" };
    if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
    const r = await fetch(url, opts);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    return { status: r.status, data };
  }
  async function send(op) {
    if (op.kind === "fields") return api("PUT", API + "/fields", { changes: op.changes });
    if (op.kind === "add") return api("POST", API + "/intervals", op.iv);
    if (op.kind === "edit") return api("PATCH", API + "/intervals/" + op.id, { start_s: op.start_s, end_s: op.end_s, base_rev: op.base_rev });
    return api("DELETE", API + "/intervals/" + op.id + (op.base_rev ? "?base_rev=" + op.base_rev : ""));
  }
  async function pump() {
    if (busy || !queue.length) return;
    busy = true;
    try {
      while (queue.length) {
        const op = queue[0];
        op.sent = true;
        let res;
        try { res = await send(op); } catch (e) { res = null; }
        if (!res || res.status >= 500 || res.status === 0) {  // offline or server trouble: retry
          op.sent = false;
          failures++;
          status("not saved yet: retrying\u2026", true);
          setTimeout(() => { busy = false; pump(); }, Math.min(30000, 1000 * 2 ** Math.min(failures, 5)));
          return;
        }
        failures = 0;
        if (res.status === 401) {
          status("your session has ended: log in again (your changes are kept in this tab)", true);
          notice("Your session has ended. Log in again in another tab, then come back: unsaved changes are kept here.", [["retry now", () => pump()]]);
          op.sent = false;
          return;
        }
        queue.shift();
        persist();
        applyResult(op, res);
      }
    } finally {
      if (!queue.length || !queue[0].sent) busy = false;
    }
    status();
    render();
  }
  function applyResult(op, res) {
    const d = res.data || {};
    if (res.status === 409 && d.error && d.error.code === "deleted") {
      const iv = S.intervals[op.id];
      delete S.intervals[op.id];
      notice(`${d.error.by} deleted this FMs interval at ${clock(d.error.at)}; your edit (${op.start_s}-${op.end_s} s) was not saved.`,
        [["re-add it", () => addInterval(op.start_s ?? (iv && iv.start_s), op.end_s ?? (iv && iv.end_s))]]);
      return;
    }
    if (res.status >= 400) {
      notice("Not saved: " + ((d.error && d.error.message) || "the server refused the change") + ".");
      refresh();
      return;
    }
    if (op.kind === "fields") {
      Object.assign(S.fields, d.fields || {});
      // Blind review: the model's result is on the page once this assessor's verdict is saved.
      if (D.blind && d.fields && d.fields.state && d.fields.state.value === "done" && !queue.length) {
        location.reload();
        return;
      }
      for (const [name, o] of Object.entries(d.overwrote || {})) {
        notice(`Your ${label(name)} replaced ${o.by}'s, saved at ${clock(o.at)}: it was ${show(o.value)}. (Both are in the history.)`);
      }
    } else if (op.kind === "add" || op.kind === "edit") {
      if (d.interval) S.intervals[d.interval.id] = d.interval;
      if (d.overwrote) notice(`Your edit replaced ${d.overwrote.by}'s change of this interval (${d.overwrote.value.join("-")} s, at ${clock(d.overwrote.at)}).`);
    } else if (op.kind === "del") {
      delete S.intervals[op.id];
      if (d.overwrote) notice(`You deleted an interval ${d.overwrote.by} had just changed (${d.overwrote.value.join("-")} s, at ${clock(d.overwrote.at)}).`);
    }
  }
  function label(name) { return name.startsWith("clip:") ? "view of clip " + name.slice(5) : name; }
  window.addEventListener("beforeunload", (e) => { if (queue.length) { e.preventDefault(); e.returnValue = ""; } });

  // -- loading and polling ---------------------------------------------------------------------
  async function refresh(first) {
    let res;
    try { res = await api("GET", API); } catch (e) { return; }
    if (res.status !== 200 || !res.data) return;
    const d = res.data;
    if (!first) {
      for (const [name, f] of Object.entries(d.fields)) {
        const mine = S.fields[name];
        if ((!mine || mine.rev < f.rev) && f.by !== D.reviewer) {
          const editing = name === "note" && document.activeElement === $("note");
          notice(`${f.by} changed the ${label(name)} to ${show(f.value)} at ${clock(f.at)}` + (editing ? "; saving your note will replace it." : "."));
        }
      }
    }
    S.fields = d.fields;
    // Intervals: the server's, plus any of ours still on their way.
    S.intervals = {};
    for (const iv of d.intervals) S.intervals[iv.id] = iv;
    for (const op of queue) {
      if (op.kind === "add") S.intervals[op.iv.id] = { id: op.iv.id, start_s: op.iv.start_s, end_s: op.iv.end_s, rev: 0 };
      if (op.kind === "edit" && S.intervals[op.id]) Object.assign(S.intervals[op.id], { start_s: op.start_s, end_s: op.end_s });
      if (op.kind === "del") delete S.intervals[op.id];
      if (op.kind === "fields") for (const k in op.changes) S.fields[k] = Object.assign({}, S.fields[k] || { rev: 0 }, { value: op.changes[k].value });
    }
    S.history = d.history || [];
    S.loaded = true;
    render(first);
    status();
  }
  setInterval(() => { if (!queue.length && document.visibilityState === "visible") refresh(false); }, 5000);

  // -- changes ---------------------------------------------------------------------------------
  function setFields(values) {
    const changes = {};
    for (const [name, value] of Object.entries(values)) {
      const f = S.fields[name];
      changes[name] = { value, base_rev: f ? f.rev || 0 : 0 };
      S.fields[name] = Object.assign({}, f || { rev: 0 }, { value });
    }
    enqueue({ kind: "fields", changes });
    render();
  }
  function addInterval(a, b) {
    a = Number(a); b = Number(b);
    if (!(isFinite(a) && isFinite(b))) { notice("An FMs interval needs a start and an end in seconds."); return; }
    if (b < a) [a, b] = [b, a];
    a = Math.max(0, Math.round(a * 1000) / 1000); b = Math.min(D.duration, Math.round(b * 1000) / 1000);
    if (b - a < 0.2) { notice("That interval is too short (under 0.2 s)."); return; }
    const iv = { id: newId(), start_s: a, end_s: b };
    S.intervals[iv.id] = Object.assign({ rev: 0 }, iv);
    enqueue({ kind: "add", iv });
    render();
  }
  function editInterval(id, a, b) {
    const iv = S.intervals[id];
    if (!iv) return;
    a = Number(a); b = Number(b);
    if (!(isFinite(a) && isFinite(b)) || !(0 <= a && a < b && b <= D.duration + 0.05)) {
      notice("An FMs interval needs 0 \u2264 start < end \u2264 the recording's length."); render(); return;
    }
    const pendingAdd = queue.find((o) => o.kind === "add" && o.iv.id === id && !o.sent);
    if (pendingAdd) { pendingAdd.iv.start_s = a; pendingAdd.iv.end_s = b; persist(); }
    else enqueue({ kind: "edit", id, start_s: a, end_s: b, base_rev: iv.rev });
    Object.assign(iv, { start_s: a, end_s: b });
    render();
  }
  function deleteInterval(id) {
    const iv = S.intervals[id];
    if (!iv) return;
    delete S.intervals[id];
    if (S.selected === id) S.selected = null;
    enqueue({ kind: "del", id, base_rev: iv.rev });
    render();
  }

  // -- rendering -------------------------------------------------------------------------------
  function render() {
    // state badge and done button
    const st = reviewState();
    const badge = $("state");
    badge.className = "state " + st;
    badge.textContent = { not_reviewed: "not reviewed", in_progress: "in progress", done: "done" }[st];
    $("done").textContent = st === "done" ? "Reopen review" : "Mark review done";
    // category and group
    for (const name of ["category", "group"]) {
      const v = fieldValue(name);
      for (const input of document.querySelectorAll(`#${name} input[name="${name}"]`)) {
        input.checked = input.value === v;
        input.parentElement.classList.toggle("checked", input.checked);
      }
    }
    // note (never while the reviewer is typing in it)
    const note = $("note");
    if (document.activeElement !== note) note.value = fieldValue("note") || "";
    // verdicts
    for (const span of document.querySelectorAll(".verdict")) {
      const v = fieldValue("clip:" + span.dataset.clip);
      for (const b of span.querySelectorAll("button")) {
        b.classList.toggle("on", b.dataset.v === v);
        b.setAttribute("aria-pressed", String(b.dataset.v === v));
      }
    }
    const vg = $("verdicts");
    vg.replaceChildren();
    for (const c of clips) {
      const v = fieldValue("clip:" + c.i);
      if (!v) continue;
      const t = svgEl("text", { class: "verdict " + v, x: (xOf(c.start) + xOf(c.end)) / 2, y: 123 });
      t.textContent = v === "agree" ? "\u2713" : "\u2717";
      vg.appendChild(t);
    }
    // intervals: lane and list
    const ivs = Object.values(S.intervals).sort((a, b) => a.start_s - b.start_s);
    const g = $("intervals");
    g.replaceChildren();
    const rows = $("iv-rows");
    rows.replaceChildren();
    for (const iv of ivs) {
      const r = svgEl("rect", { class: "iv" + (S.selected === iv.id ? " sel" : ""), x: xOf(iv.start_s), y: 128,
        width: Math.max(1, xOf(iv.end_s) - xOf(iv.start_s)), height: laneH - 4, "data-id": iv.id });
      const title = svgEl("title", {});
      title.textContent = `FMs ${mmss(iv.start_s, true)}-${mmss(iv.end_s, true)}` + (iv.by ? ` (${iv.by})` : "");
      r.appendChild(title);
      r.addEventListener("click", (e) => { e.stopPropagation(); S.selected = iv.id; seek(iv.start_s); render(); });
      g.appendChild(r);
      const tr = document.createElement("tr");
      tr.className = "iv-row";
      tr.dataset.id = iv.id;
      if (S.selected === iv.id) tr.classList.add("sel");
      for (const key of ["start_s", "end_s"]) {
        const td = document.createElement("td");
        const input = document.createElement("input");
        input.value = iv[key].toFixed(2);
        input.inputMode = "decimal";
        input.className = key;
        input.setAttribute("aria-label", key === "start_s" ? "start, seconds" : "end, seconds");
        input.addEventListener("change", () => {
          const a = tr.querySelector(".start_s").value, b = tr.querySelector(".end_s").value;
          editInterval(iv.id, a, b);
        });
        td.appendChild(input);
        tr.appendChild(td);
      }
      const td = document.createElement("td");
      const go = document.createElement("button");
      go.type = "button"; go.textContent = "\u25B6"; go.title = "seek to it";
      go.addEventListener("click", () => { S.selected = iv.id; seek(iv.start_s); render(); });
      const del = document.createElement("button");
      del.type = "button"; del.textContent = "delete"; del.className = "iv-del";
      del.addEventListener("click", () => deleteInterval(iv.id));
      td.append(go, " ", del);
      tr.appendChild(td);
      rows.appendChild(tr);
    }
    if (!ivs.length) {
      const tr = document.createElement("tr");
      tr.innerHTML = '<td colspan="3" class="muted">none marked yet</td>';
      rows.appendChild(tr);
    }
    // history
    const h = $("history");
    h.replaceChildren();
    for (const e of S.history) {
      const div = document.createElement("div");
      // final:... and outcome:... are the senior's final verdict and the follow-up outcome.
      const [scope, act] = e.action.includes(":") ? e.action.split(":") : ["", e.action];
      const pre = scope === "final" ? "final verdict: " : scope === "outcome" ? "outcome: " : "";
      const what = act === "sign_off" ? `signed off: ${show(e.new.category)} (${show(e.new.group)})`
        : act === "amend" ? `amended: ${show(e.new.category)} (${show(e.new.group)}); reason: ${e.new.reason}`
        : pre + (act === "set" ? `${label(e.target)}: ${show(e.old)} \u2192 ${show(e.new)}`
        : act === "add_interval" ? `added FMs ${e.new.join("-")} s`
        : act === "edit_interval" ? `moved FMs ${e.old.join("-")} \u2192 ${e.new.join("-")} s`
        : `deleted FMs ${e.old.join("-")} s`);
      div.className = "h-" + act;
      div.textContent = `${new Date(e.at * 1000).toLocaleString()} \u00B7 ${e.reviewer} \u00B7 ${what}`;
      h.appendChild(div);
    }
    if (!S.history.length) h.textContent = "No changes yet.";
  }

  // -- the player ------------------------------------------------------------------------------
  let current = null, stopAt = null;
  function clipAt(t) {
    let best = null;
    for (const c of clips) { if (c.start <= t + 1e-6) best = c; else break; }
    return best;
  }
  function seek(t) {
    t = Math.min(D.duration, Math.max(0, t));
    if (video) video.currentTime = t;
    else tick(t);
  }
  function tick(tt) {
    const t = video ? video.currentTime : tt || 0;
    $("time").textContent = mmss(t, true) + " / " + mmss(D.duration, true);
    const x = xOf(t);
    $("playhead").setAttribute("x1", x);
    $("playhead").setAttribute("x2", x);
    const c = clipAt(t);
    if (c !== current) {
      if (current) $("clip-" + current.i).classList.remove("current");
      if (c) $("clip-" + c.i).classList.add("current");
      current = c;
    }
    if (video && stopAt !== null && t >= stopAt) { video.pause(); stopAt = null; }
    drawSkeleton();
  }
  if (video) {
    video.addEventListener("timeupdate", () => tick());
    video.addEventListener("seeked", () => tick());
    video.addEventListener("play", () => { $("play").textContent = "\u23F8 Pause"; loop(); });
    video.addEventListener("pause", () => { $("play").textContent = "\u25B6 Play"; });
    video.addEventListener("loadedmetadata", () => { sizeCanvas(); tick(); });
    video.addEventListener("error", () => notice("This browser cannot play the recording's format; convert it to H.264 MP4 to review it here."));
    window.addEventListener("resize", sizeCanvas);
    $("play").addEventListener("click", () => (video.paused ? video.play() : video.pause()));
    $("speed").addEventListener("change", () => { video.playbackRate = Number($("speed").value); });
  }
  function loop() {
    if (!video || video.paused) return;
    tick();
    requestAnimationFrame(loop);
  }
  function playClip(c) {
    seek(c.start);
    stopAt = c.end;
    if (video) video.play();
  }
  function stepClip(dir) {
    const t = video ? video.currentTime : 0;
    const k = current ? clips.indexOf(current) : -1;
    const c = dir > 0 ? clips[Math.min(clips.length - 1, k + 1)] : clips[Math.max(0, (current && t > current.start + 0.3) ? k : k - 1)];
    if (c) seek(c.start);
  }
  for (const g of document.querySelectorAll("#clips .clip")) {
    g.addEventListener("click", () => { seek(Number(g.dataset.start)); });
  }
  for (const b of document.querySelectorAll("button.seek")) {
    b.addEventListener("click", () => playClip(byIndex[b.dataset.i]));
  }
  $("prev-clip").addEventListener("click", () => stepClip(-1));
  $("next-clip").addEventListener("click", () => stepClip(1));

  // -- skeleton overlay ------------------------------------------------------------------------
  const canvas = $("overlay");
  const SK = { on: false, data: null, polling: false };
  const COLOURS = { left: "#00ffff", right: "#ff00ff", axial: "#ffff00" };
  function sizeCanvas() {
    if (!canvas || !video) return;
    canvas.width = video.clientWidth;
    canvas.height = video.clientHeight;
    canvas.style.width = video.clientWidth + "px";
    canvas.style.height = video.clientHeight + "px";
    drawSkeleton();
  }
  function drawSkeleton() {
    if (!canvas) return;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!SK.on || !SK.data || !video.videoWidth) return;
    const d = SK.data;
    const f = Math.min(d.frames - 1, Math.max(0, Math.floor(video.currentTime * d.fps + 1e-6)));
    // The picture inside the element (object-fit: contain letterboxes it).
    const s = Math.min(canvas.width / video.videoWidth, canvas.height / video.videoHeight);
    const w = video.videoWidth * s, h = video.videoHeight * s;
    const ox = (canvas.width - w) / 2, oy = (canvas.height - h) / 2;
    const pts = [];
    for (let j = 0; j < d.joints; j++) {
      const k = (f * d.joints + j) * 2;
      const x = d.q[k], y = d.q[k + 1];
      pts.push(x === 65535 || y === 65535 ? null : [ox + (x / 65534) * w, oy + (y / 65534) * h]);
    }
    ctx.lineCap = "round";
    const lw = Math.max(2, Math.round(Math.max(w, h) / 300));
    for (const pass of [0, 1]) {
      for (const [a, b] of d.bones) {
        if (!pts[a] || !pts[b]) continue;
        ctx.strokeStyle = pass ? COLOURS[d.side[b]] : "#000";
        ctx.lineWidth = pass ? lw : lw + 2;
        ctx.beginPath(); ctx.moveTo(pts[a][0], pts[a][1]); ctx.lineTo(pts[b][0], pts[b][1]); ctx.stroke();
      }
    }
    ctx.fillStyle = "#fff";
    for (const p of pts) if (p) { ctx.beginPath(); ctx.arc(p[0], p[1], lw + 1, 0, 2 * Math.PI); ctx.fill(); }
  }
  async function loadSkeleton(start) {
    const sk = $("skeleton-status");
    let res;
    try { res = await api(start ? "POST" : "GET", ROOT + "/r/" + D.rid + "/pose"); } catch (e) { sk.textContent = "skeleton: offline"; return; }
    const d = res.data || {};
    if (d.state === "done") {
      const bin = atob(d.overlay.data);
      const buf = new ArrayBuffer(bin.length);
      const u8 = new Uint8Array(buf);
      for (let i = 0; i < bin.length; i++) u8[i] = bin.charCodeAt(i);
      SK.data = Object.assign({}, d.overlay, { q: new Uint16Array(buf) });
      sk.textContent = "skeleton: " + d.backend + " (the pose the model saw)";
      sizeCanvas();
      return;
    }
    if (d.state === "none" && !start) return loadSkeleton(true);
    if (d.state === "running") {
      sk.textContent = "skeleton: estimating the pose" + (d.total ? ` (${Math.round((100 * d.done) / d.total)}%)` : "") + "\u2026";
      setTimeout(() => { if (SK.on) loadSkeleton(false); }, 1500);
      return;
    }
    sk.textContent = "skeleton unavailable: " + ((d.error && d.error.message) || d.message || d.code || "unknown");
  }
  function toggleSkeleton() {
    if (!video) return;
    SK.on = !SK.on;
    $("skeleton").classList.toggle("on", SK.on);
    $("skeleton").setAttribute("aria-pressed", String(SK.on));
    if (SK.on && !SK.data) loadSkeleton(false);
    if (!SK.on) $("skeleton-status").textContent = "";
    drawSkeleton();
  }
  if (video) $("skeleton").addEventListener("click", toggleSkeleton);

  // -- marking intervals -----------------------------------------------------------------------
  let markStart = null, draft = null, markNotice = null;
  function showDraft(a, b) {
    if (!draft) { draft = svgEl("rect", { class: "draft", y: 128, height: laneH - 4 }); $("intervals").after(draft); }
    const x0 = xOf(Math.min(a, b)), x1 = xOf(Math.max(a, b));
    draft.setAttribute("x", x0); draft.setAttribute("width", Math.max(1, x1 - x0));
  }
  function clearDraft() { if (draft) draft.remove(); draft = null; }
  function now() { return video ? video.currentTime : 0; }
  function markIn() {
    markStart = now();
    showDraft(markStart, markStart);
    if (markNotice) markNotice.remove();
    markNotice = notice(`FMs start marked at ${mmss(markStart, true)}: press ] (or "FMs end") where they stop.`);
  }
  function markOut() {
    if (markStart === null) { notice("Mark the start first ([ or \"FMs start\")."); return; }
    addInterval(markStart, now());
    markStart = null;
    clearDraft();
    if (markNotice) markNotice.remove();
    markNotice = null;
  }
  $("mark-start").addEventListener("click", markIn);
  $("mark-end").addEventListener("click", markOut);
  const lane = $("lane");
  // The FMs lane is at least LANE_PX screen pixels tall however narrow the page (a finger on a
  // tablet): the drawing below it moves down as the lane grows.
  const LANE_PX = 34;
  function layoutLane() {
    const w = svg.getBoundingClientRect().width;
    if (!w) return;
    const h = Math.max(24, Math.ceil(LANE_PX / (w / 1040)));
    if (h === laneH) return;
    laneH = h;
    const dy = h - 24;
    lane.setAttribute("height", h);
    $("lane-label").setAttribute("y", 142 + dy / 2);
    $("ticks").setAttribute("transform", `translate(0 ${dy})`);
    $("playhead").setAttribute("y2", 168 + dy);
    svg.setAttribute("viewBox", `-30 0 1040 ${200 + dy}`);
    render();
  }
  window.addEventListener("resize", layoutLane);
  let drag = null;
  lane.addEventListener("pointerdown", (e) => { drag = tOf(e); lane.setPointerCapture(e.pointerId); showDraft(drag, drag); });
  lane.addEventListener("pointermove", (e) => { if (drag !== null) showDraft(drag, tOf(e)); });
  lane.addEventListener("pointerup", (e) => {
    if (drag === null) return;
    const a = drag, b = tOf(e);
    drag = null;
    clearDraft();
    if (Math.abs(b - a) >= 0.2) addInterval(a, b);
    else seek(a);
  });
  $("iv-add").addEventListener("submit", (e) => {
    e.preventDefault();
    addInterval($("iv-start").value, $("iv-end").value);
    $("iv-start").value = ""; $("iv-end").value = "";
  });

  // -- the judgement ---------------------------------------------------------------------------
  for (const input of document.querySelectorAll('#category input[name="category"]')) {
    input.addEventListener("change", () => {
      const values = { category: input.value };
      if (D.group_of[input.value]) values.group = D.group_of[input.value];
      setFields(values);
    });
  }
  for (const input of document.querySelectorAll('#group input[name="group"]')) {
    input.addEventListener("change", () => setFields({ group: input.value }));
  }
  let noteTimer = null;
  function saveNote() {
    clearTimeout(noteTimer);
    noteTimer = null;
    const v = $("note").value;
    if (v !== (fieldValue("note") || "")) setFields({ note: v });
  }
  $("note").addEventListener("input", () => { clearTimeout(noteTimer); noteTimer = setTimeout(saveNote, 700); status("typing\u2026"); });
  $("note").addEventListener("blur", saveNote);
  for (const span of document.querySelectorAll(".verdict")) {
    for (const b of span.querySelectorAll("button")) {
      b.addEventListener("click", () => {
        const name = "clip:" + span.dataset.clip;
        setFields({ [name]: fieldValue(name) === b.dataset.v ? null : b.dataset.v });
      });
    }
  }
  $("done").addEventListener("click", () => {
    const done = fieldValue("state") === "done";
    const cat = fieldValue("category");
    if (!done && (!cat || (!fieldValue("group") && !(D.no_group || []).includes(cat)))) {
      notice("Choose the final category and group before marking the review done (the export needs them).");
      return;
    }
    setFields({ state: done ? "in_progress" : "done" });
  });

  // -- keyboard --------------------------------------------------------------------------------
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    const tag = (t.tagName || "").toLowerCase();
    // A category or verdict choice keeps the shortcuts (clicking one focuses it); only fields
    // that take text or a selection keep their keys.
    const choice = tag === "input" && (t.type === "radio" || t.type === "checkbox");
    if ((["input", "textarea", "select"].includes(tag) && !choice) || e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key;
    // Space and Enter belong to the focused control (press the button, open the details, tick
    // the choice), and the arrows move within a group of choices.
    if ((k === " " || k === "Enter") && (choice || ["button", "a", "summary"].includes(tag))) return;
    if (choice && k.startsWith("Arrow")) return;
    const speeds = Array.from($("speed").options, (o) => Number(o.value));
    let handled = true;
    if (k === " " && video) video.paused ? video.play() : video.pause();
    else if (k === "ArrowLeft") seek(now() - (e.shiftKey ? 5 : 1));
    else if (k === "ArrowRight") seek(now() + (e.shiftKey ? 5 : 1));
    else if (k === ",") seek(now() - 1 / 25);
    else if (k === ".") seek(now() + 1 / 25);
    else if (k === "n") stepClip(1);
    else if (k === "p") stepClip(-1);
    else if ((k === "+" || k === "=" || k === "-") && video) {
      const i = speeds.indexOf(video.playbackRate);
      const j = Math.min(speeds.length - 1, Math.max(0, (i < 0 ? speeds.indexOf(1) : i) + (k === "-" ? -1 : 1)));
      video.playbackRate = speeds[j]; $("speed").value = String(speeds[j]);
    } else if (k === "s") toggleSkeleton();
    else if (k === "[") markIn();
    else if (k === "]") markOut();
    else if ((k === "a" || k === "d") && current) {
      const name = "clip:" + current.i, v = k === "a" ? "agree" : "disagree";
      setFields({ [name]: fieldValue(name) === v ? null : v });
    } else if (["1", "2", "3", "4", "5", "6"].includes(k)) {
      const input = document.querySelectorAll('#category input[name="category"]')[Number(k) - 1];
      input.checked = true; input.dispatchEvent(new Event("change"));
    } else if ((k === "Delete" || k === "Backspace") && S.selected) deleteInterval(S.selected);
    else if (k === "Escape") {
      markStart = null; clearDraft(); S.selected = null;
      if (markNotice) markNotice.remove();
      markNotice = null;
      render();
    }
    else handled = false;
    if (handled) e.preventDefault();
  });

  // For tests and the curious: the page's state, read-only by intent.
  window.mamReview = { state: S, queue: () => queue.slice(), seek };
  refresh(true).then(() => pump());
  layoutLane();
  tick(0);
})();
