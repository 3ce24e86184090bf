// fdseg web app: paint support masks, fit a session, segment queries through the REST API.
// Plain JavaScript, no libraries, nothing loaded from other hosts.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  supports: [],      // {id, name, blob, width, height, maskCanvas, card, typeInput}
  queries: [],       // {id, name, blob, status: new|running|done|error, result, error, card, session, legend}
  normals: [],       // defect-free ("OK") image files sent with the fit (field 'normal')
  session: null,     // live session id on the server
  info: null,        // that session's info (GET /v1/sessions/{id})
  inspector: null,   // the session's info when it came from an inspector file (no supports needed)
  inspectors: [],    // inspector sessions offered: loaded at start (fdseg serve --inspector) or opened here
  dirty: true,       // supports or settings changed since the session was fitted
  running: false,
  options: null,
  nextId: 1,
};
const SETTING_IDS = ["preset", "method", "backbone", "refine", "threshold", "size", "resize"];

function setStatus(msg, isError = false) {
  const el = $("status");
  el.textContent = msg;
  el.classList.toggle("error", isError);
}

// ---------------------------------------------------------------- access token
// A server on the network needs its access token on every /v1 call (header Authorization: Bearer).
// The page takes it from the address (#token=..., then removed from the address bar) or asks for it
// once a call is refused (401), and keeps it in this tab's sessionStorage; never in the query string.
const TOKEN_KEY = "fdseg-token";
let token = "";
let tokenAsk = null;

function loadToken() {
  try { token = sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { token = ""; }
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    setToken(decodeURIComponent(m[1]));
    const rest = location.hash.slice(1).split("&").filter((p) => !p.startsWith("token=")).join("&");
    history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  }
}

function setToken(t) {
  token = t.trim();
  try { sessionStorage.setItem(TOKEN_KEY, token); } catch (e) { /* private mode: keep it in memory */ }
}

// show the token form (once for all calls waiting on it); resolves when a token is entered
function askToken(refused) {
  if (!tokenAsk) {
    tokenAsk = new Promise((resolve) => {
      $("token-section").hidden = false;
      $("token-msg").textContent = refused ? "that token was not accepted: check it and try again" : "";
      setStatus("this server needs its access token", true);
      const input = $("token-input");
      input.focus();
      $("token-form").onsubmit = (ev) => {
        ev.preventDefault();
        if (!input.value.trim()) return;
        setToken(input.value);
        input.value = "";
        $("token-section").hidden = true;
        $("token-form").onsubmit = null;
        tokenAsk = null;
        setStatus("token accepted for this tab");
        resolve();
      };
    });
  }
  return tokenAsk;
}

async function api(path, opts = {}) {
  for (;;) {
    const sent = token;
    const headers = new Headers(opts.headers || {});
    if (sent) headers.set("Authorization", "Bearer " + sent);
    let resp;
    try {
      resp = await fetch(path, { ...opts, headers });
    } catch (e) {
      throw new Error("cannot reach the fdseg server (" + e.message + ")");
    }
    if (resp.status === 401) {
      if (token === sent) await askToken(Boolean(sent));   // else: a new token came in meanwhile
      continue;
    }
    const type = resp.headers.get("content-type") || "";
    const body = type.includes("json") ? await resp.json() : await resp.blob();
    if (!resp.ok) {
      throw new Error(body && body.error ? body.error : "HTTP " + resp.status);
    }
    return body;
  }
}

// ---------------------------------------------------------------- settings
// only what this server can run is offered (and the current value, should it be a default that cannot run)
function fillSelect(sel, items, value) {
  sel.innerHTML = "";
  for (const it of items) {
    if (it.available === false && it.name !== value) continue;
    const o = document.createElement("option");
    o.value = it.name;
    o.textContent = it.label || it.name;
    o.title = (it.summary || "") + (it.note ? " — " + it.note : "");
    o.disabled = it.available === false;
    sel.appendChild(o);
  }
  sel.value = value;
}

// what the choices this server cannot run need, said once per kind of need (collapsed)
const NEED_HOW = {
  weights: () => "start fdseg serve with --weights NAME=PATH",
  checkpoint: () => "use fdseg segment --method-option checkpoint=PATH (not in the app)",
  extra: (x) => "pip install 'fdseg[" + x.extra + "]' and restart fdseg serve",
};
const NEED_WHAT = { weights: "a weights file", checkpoint: "a trained checkpoint" };

function renderOptionNote(o) {
  const el = $("option-note");
  el.innerHTML = "";
  const groups = new Map();
  for (const [kind, items] of [["method", o.methods], ["backbone", o.backbones], ["refinement", o.refine]]) {
    for (const x of items) {
      if (x.available !== false) continue;
      const need = x.needs || "other";
      const key = kind + "|" + need + "|" + (need === "extra" ? x.extra : "");
      if (!groups.has(key)) groups.set(key, { kind, need, first: x, names: [] });
      groups.get(key).names.push(x.name);
    }
  }
  if (!groups.size) return;
  const n = [...groups.values()].reduce((a, g) => a + g.names.length, 0);
  const det = document.createElement("details");
  const sum = document.createElement("summary");
  sum.textContent = n + " more choice" + (n > 1 ? "s" : "") + " this server cannot run as started (what they need)";
  const ul = document.createElement("ul");
  for (const g of groups.values()) {
    const li = document.createElement("li");
    const many = g.names.length > 1;
    const what = g.need === "extra" ? "fdseg[" + g.first.extra + "]" : NEED_WHAT[g.need] || "more setup";
    const how = NEED_HOW[g.need] ? NEED_HOW[g.need](g.first) : (g.first.note || "");
    li.textContent = g.names.length + " " + g.kind + (many ? "s" : "") + " need" + (many ? "" : "s") + " " + what +
      " (" + g.names.join(", ") + "): " + how;
    ul.appendChild(li);
  }
  det.append(sum, ul);
  el.appendChild(det);
}

async function loadOptions() {
  const o = await api("/v1/options");
  state.options = o;
  fillSelect($("method"), o.methods, o.defaults.method);
  fillSelect($("backbone"), o.backbones, o.defaults.backbone);
  fillSelect($("refine"), o.refine, o.defaults.refine);
  fillSelect($("preset"), o.presets.map((n) => ({ name: n })), o.defaults.preset);
  fillSelect($("resize"), [{ name: "", label: "(the preset's)" }, ...o.resize.map((n) => ({ name: n }))], o.defaults.resize);
  $("threshold").value = o.defaults.threshold;
  $("size").value = o.defaults.size;
  renderOptionNote(o);
  $("save-btn").title = o.saving ? "" : "start the server with --sessions-dir to save sessions";
}

function settingsForm(fd) {
  for (const id of SETTING_IDS) fd.append(id, $(id).value);
}

function markDirty() {
  state.dirty = true;
  updateButtons();
}

// ---------------------------------------------------------------- images
async function toBitmap(blob) {
  try {
    return await createImageBitmap(blob, { premultiplyAlpha: "none", colorSpaceConversion: "none" });
  } catch (e) {
    // formats the browser cannot decode (TIFF, 16-bit ...): let the server convert to PNG
    const fd = new FormData();
    fd.append("image", blob, blob.name || "image");
    const png = await api("/v1/convert", { method: "POST", body: fd });
    return await createImageBitmap(png);
  }
}

function canvasOf(w, h) {
  const c = document.createElement("canvas");
  c.width = w;
  c.height = h;
  return c;
}

// mask file pixels -> defect (same rules as the server: alpha for painted RGBA masks,
// otherwise the brightest channel; > 16 grey levels = soft mask thresholded at 128)
function maskFromBitmap(bmp, maskCanvas) {
  const tmp = canvasOf(bmp.width, bmp.height);
  const t = tmp.getContext("2d");
  t.drawImage(bmp, 0, 0);
  const d = t.getImageData(0, 0, bmp.width, bmp.height).data;
  const n = bmp.width * bmp.height;
  let alphaUsed = false, rgbUniform = true;
  const first = Math.max(d[0], d[1], d[2]);
  for (let i = 0; i < n; i++) {
    if (d[4 * i + 3] < 255) alphaUsed = true;
    if (Math.max(d[4 * i], d[4 * i + 1], d[4 * i + 2]) !== first) rgbUniform = false;
  }
  const useAlpha = alphaUsed && rgbUniform;
  const vals = new Uint8Array(n);
  const levels = new Set();
  for (let i = 0; i < n; i++) {
    const v = useAlpha ? d[4 * i + 3] : Math.max(d[4 * i], d[4 * i + 1], d[4 * i + 2]);
    vals[i] = v;
    if (levels.size <= 16) levels.add(v);
  }
  const cut = levels.size > 16 ? 128 : 1;
  const m = maskCanvas.getContext("2d");
  const out = m.createImageData(bmp.width, bmp.height);
  for (let i = 0; i < n; i++) {
    if (vals[i] >= cut) {
      out.data[4 * i] = 255;
      out.data[4 * i + 3] = 255;
    }
  }
  m.putImageData(out, 0, 0);
}

function maskFraction(maskCanvas) {
  const d = maskCanvas.getContext("2d").getImageData(0, 0, maskCanvas.width, maskCanvas.height).data;
  let on = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] >= 128) on++;
  return on / (maskCanvas.width * maskCanvas.height);
}

// the painted (red, semi-transparent edged) mask -> white-on-black PNG; the server thresholds
// anti-aliased edges at 128, the same cut maskFraction uses
function maskBlob(maskCanvas) {
  const w = maskCanvas.width, h = maskCanvas.height;
  const white = canvasOf(w, h);
  const wc = white.getContext("2d");
  wc.drawImage(maskCanvas, 0, 0);
  wc.globalCompositeOperation = "source-in";
  wc.fillStyle = "#fff";
  wc.fillRect(0, 0, w, h);
  const c = canvasOf(w, h);
  const ctx = c.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, w, h);
  ctx.drawImage(white, 0, 0);
  return new Promise((res) => c.toBlob(res, "image/png"));
}

// ---------------------------------------------------------------- supports
async function addSupport(blob, name, maskBlobIn = null, type = "") {
  if (state.supports.length >= (state.options ? state.options.limits.max_supports : 5)) {
    setStatus("at most " + state.options.limits.max_supports + " supports", true);
    return;
  }
  let bmp;
  try {
    bmp = await toBitmap(blob);
  } catch (e) {
    setStatus(name + ": " + e.message, true);
    return;
  }
  const s = { id: state.nextId++, name, blob, width: bmp.width, height: bmp.height };
  const card = document.createElement("div");
  card.className = "card support";
  card.dataset.supportId = s.id;
  const paint = document.createElement("div");
  paint.className = "paint";
  const img = canvasOf(bmp.width, bmp.height);
  img.className = "img";
  img.getContext("2d").drawImage(bmp, 0, 0);
  const mask = canvasOf(bmp.width, bmp.height);
  mask.className = "mask";
  mask.getContext("2d", { willReadFrequently: true });
  mask.setAttribute("aria-label", "paint the defect on " + name);
  paint.append(img, mask);
  const meta = document.createElement("div");
  meta.className = "meta";
  const info = document.createElement("span");
  const err = document.createElement("div");
  err.className = "error";
  meta.append(document.createTextNode(name + " (" + bmp.width + "×" + bmp.height + ") · mask "), info);
  const buttons = document.createElement("div");
  buttons.className = "buttons";
  const up = document.createElement("label");
  up.className = "button";
  up.textContent = "upload mask";
  const upInput = document.createElement("input");
  upInput.type = "file";
  upInput.accept = "image/*,.tif,.tiff";
  upInput.hidden = true;
  upInput.className = "mask-input";
  up.appendChild(upInput);
  const clear = document.createElement("button");
  clear.textContent = "clear";
  const remove = document.createElement("button");
  remove.textContent = "remove";
  buttons.append(up, clear, remove);
  const typeRow = document.createElement("div");
  typeRow.className = "type-row";
  const typeLabel = document.createElement("label");
  typeLabel.title = "optional: name each support's defect type (e.g. crack, blowhole) to tell several types apart; " +
    "leave every one empty for one type";
  const typeInput = document.createElement("input");
  typeInput.type = "text";
  typeInput.className = "type-input";
  typeInput.maxLength = 60;
  typeInput.placeholder = "optional, e.g. crack";
  typeInput.spellcheck = false;
  typeInput.value = type;
  typeInput.addEventListener("input", markDirty);
  typeLabel.append("defect type ", typeInput);
  typeRow.appendChild(typeLabel);
  card.append(paint, meta, typeRow, err, buttons);
  $("support-list").appendChild(card);
  Object.assign(s, { card, maskCanvas: mask, info, err, typeInput });
  state.supports.push(s);

  const refresh = () => {
    info.textContent = (100 * maskFraction(mask)).toFixed(2) + "%";
    markDirty();
  };
  setupPainting(mask, paint, refresh);
  upInput.addEventListener("change", async () => {
    const f = upInput.files[0];
    upInput.value = "";
    if (f) await loadMaskInto(s, f, f.name);
    refresh();
  });
  clear.addEventListener("click", () => {
    mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
    refresh();
  });
  remove.addEventListener("click", () => {
    state.supports = state.supports.filter((x) => x !== s);
    card.remove();
    markDirty();
  });
  if (maskBlobIn) await loadMaskInto(s, maskBlobIn, name + " mask");
  refresh();
}

async function loadMaskInto(s, blob, label) {
  s.err.textContent = "";
  try {
    const bmp = await toBitmap(blob);
    if (bmp.width !== s.width || bmp.height !== s.height) {
      s.err.textContent = label + ": mask is " + bmp.width + "×" + bmp.height + " but the image is " +
        s.width + "×" + s.height;
      return;
    }
    maskFromBitmap(bmp, s.maskCanvas);
  } catch (e) {
    s.err.textContent = label + ": " + e.message;
  }
}

function brushTool() {
  return $("tool-eraser").checked ? "eraser" : "brush";
}

function setupPainting(canvas, wrapper, done) {
  const ctx = canvas.getContext("2d");
  let last = null;
  const pos = (ev) => {
    const r = canvas.getBoundingClientRect();
    return [(ev.clientX - r.left) * canvas.width / r.width, (ev.clientY - r.top) * canvas.height / r.height,
      canvas.width / r.width];
  };
  const style = (scale) => {
    const erase = brushTool() === "eraser";
    ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = "#ff0000";
    ctx.lineWidth = Number($("brush-size").value) * scale;
    ctx.lineCap = ctx.lineJoin = "round";
  };
  canvas.addEventListener("pointerdown", (ev) => {
    ev.preventDefault();
    canvas.setPointerCapture(ev.pointerId);
    const [x, y, scale] = pos(ev);
    style(scale);
    ctx.beginPath();
    ctx.arc(x, y, ctx.lineWidth / 2, 0, 2 * Math.PI);
    ctx.fill();
    last = [x, y];
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (!last) return;
    const [x, y, scale] = pos(ev);
    style(scale);
    ctx.beginPath();
    ctx.moveTo(last[0], last[1]);
    ctx.lineTo(x, y);
    ctx.stroke();
    last = [x, y];
  });
  const end = () => {
    if (last) {
      last = null;
      ctx.globalCompositeOperation = "source-over";
      done();
    }
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  const syncTool = () => wrapper.classList.toggle("eraser", brushTool() === "eraser");
  document.querySelectorAll("input[name=tool]").forEach((r) => r.addEventListener("change", syncTool));
}

// ---------------------------------------------------------------- session
async function fitSession() {
  if (!state.supports.length) throw new Error("add at least one support image and paint its defect");
  const fd = new FormData();
  settingsForm(fd);
  const types = supportTypes();
  for (const [i, s] of state.supports.entries()) {
    if (maskFraction(s.maskCanvas) === 0) throw new Error("support " + (i + 1) + " (" + s.name + "): paint the defect first");
    fd.append("support", s.blob, s.name);
    fd.append("mask", await maskBlob(s.maskCanvas), "mask_" + (i + 1) + ".png");
  }
  for (const t of types) fd.append("type", t);
  for (const f of state.normals) fd.append("normal", f, f.name);
  setStatus("fitting " + state.supports.length + " support(s)" +
    (state.normals.length ? " and " + state.normals.length + " OK image(s)" : "") + "…");
  const info = await api("/v1/sessions", { method: "POST", body: fd });
  state.session = info.id;
  state.dirty = false;
  showSession(info, info.normals ? " · " + info.normals + " OK image(s) as background" : "");
  return info;
}

// the supports' defect types (field 'type', in support order): [] when none is named (one type); a name
// on some supports only is refused here, with the support to fix
function supportTypes() {
  const types = state.supports.map((s) => s.typeInput.value.trim());
  if (!types.some((t) => t)) return [];
  const i = types.findIndex((t) => !t);
  if (i >= 0) {
    throw new Error("support " + (i + 1) + " (" + state.supports[i].name + "): name its defect type too, or " +
      "leave every support's type empty (one type)");
  }
  return types;
}

function showSession(info, extra = "") {
  state.info = info;
  $("session-info").textContent = "session " + info.id + extra;
  $("session-info").title = (info.plan || []).map((d) => d.step + " = " + d.value + ": " + d.reason).join("\n");
  $("plan-info").textContent = (info.plan || []).map((d) => d.step + "=" + d.value).join(" · ");
  const lg = $("type-legend");
  lg.innerHTML = "";
  lg.hidden = !(info.legend && info.legend.length);
  if (!lg.hidden) lg.append("defect types: ", legendList(info.legend));
}

// a typed session's legend (from the server: label value, type, colour): a swatch and the name of each type;
// fractions (type -> share of the image) adds each type's area, current names the query's type
function legendList(legend, fractions = null, current = null) {
  const ul = document.createElement("ul");
  ul.className = "legend";
  for (const e of legend) {
    const li = document.createElement("li");
    li.dataset.type = e.type;
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.backgroundColor = e.colour;
    sw.title = e.colour + " (label value " + e.value + ")";
    const name = document.createElement(e.type === current ? "b" : "span");
    name.className = "type-name";
    name.textContent = e.type;
    li.append(sw, name);
    if (fractions && fractions[e.type]) li.append(" " + (100 * fractions[e.type]).toFixed(3) + "%");
    ul.appendChild(li);
  }
  return ul;
}

async function segmentQuery(q) {
  q.status = "running";
  renderQuery(q);
  const fd = new FormData();
  fd.append("query", q.blob, q.name);
  fd.append("mask_format", "none");
  fd.append("overlay", "true");
  try {
    const r = await api("/v1/sessions/" + state.session + "/segment", { method: "POST", body: fd });
    q.result = r.results[0];
    q.legend = r.legend || null;        // a typed session's: type names and colours
    q.status = "done";
    q.session = state.session;
  } catch (e) {
    q.status = "error";
    q.error = e.message;
  }
  renderQuery(q);
}

async function runAll() {
  if (state.running) return;
  state.running = true;
  updateButtons();
  try {
    if (!state.inspector && (state.dirty || !state.session)) await fitSession();
    let todo = state.queries.filter((q) => q.session !== state.session || q.status === "new");
    let n = 0;
    while (todo.length) {
      for (const q of todo) {
        $("progress").textContent = "segmenting " + (++n) + " …";
        await segmentQuery(q);
        sortResults();
      }
      todo = state.queries.filter((q) => q.status === "new");   // dropped while running
    }
    const done = state.queries.filter((q) => q.status === "done");
    const defective = done.filter((q) => q.result.verdict === "defective").length;
    $("progress").textContent = done.length + " segmented, " + defective + " judged defective" +
      (state.queries.length - done.length ? ", " + (state.queries.length - done.length) + " failed" : "");
    setStatus("ready");
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    state.running = false;
    updateButtons();
  }
}

// ---------------------------------------------------------------- queries
function addQueries(files) {
  for (const f of files) {
    const q = { id: state.nextId++, name: f.name, blob: f, status: "new", session: null };
    state.queries.push(q);
    renderQuery(q);
  }
  sortResults();
  updateButtons();
  if (state.session && !state.dirty) runAll();
}

function renderQuery(q) {
  if (!q.card) {
    q.card = document.createElement("div");
    q.card.dataset.queryId = q.id;
    $("results").appendChild(q.card);
  }
  const c = q.card;
  c.innerHTML = "";
  c.className = "card result " + q.status;
  const title = document.createElement("div");
  title.className = "meta name";
  title.textContent = q.name;
  if (q.status === "done") {
    const r = q.result;
    c.classList.add(r.verdict === "defective" ? "defective" : "clean");
    c.dataset.defectFraction = r.defect_fraction;
    c.dataset.verdict = r.verdict;
    c.dataset.regions = r.regions ?? r.components;
    const img = document.createElement("img");
    img.className = "overlay";
    img.alt = "mask overlay of " + q.name;
    img.src = "data:image/jpeg;base64," + r.overlay_jpeg;
    c.append(img, title, resultMeta(r));
    if (r.types && q.legend) c.append(typeMeta(r, q.legend));
  } else if (q.status === "error") {
    const e = document.createElement("div");
    e.className = "error";
    e.textContent = q.error;
    c.append(title, e);
  } else {
    const w = document.createElement("div");
    w.className = "muted";
    w.textContent = q.status === "running" ? "segmenting…" : "waiting (press segment)";
    c.append(title, w);
  }
}

const plural = (n, word) => n + " " + word + (n === 1 ? "" : "s");

// a typed session's result: the query's type (that of its strongest defect) and the legend of the overlay's colours
function typeMeta(r, legend) {
  const div = document.createElement("div");
  div.className = "types";
  const t = document.createElement("span");
  t.className = "query-type";
  t.textContent = r.type || "none";
  t.title = "the type of the strongest defect";
  div.append("type ", t, legendList(legend, r.fractions || {}, r.type));
  return div;
}

// one result's line; what it says agrees with the verdict and with the picture: only regions of at least
// the smallest defect size (min_region_cells grid cells) make a part defective and are filled red; smaller
// specks stay in the mask, ringed amber, and are named as such
function resultMeta(r) {
  const regions = r.regions ?? r.components;        // an older server sends only components
  const specks = r.specks ?? 0;
  const minCells = r.min_region_cells ?? 1;
  const smallest = minCells === 1 ? "one grid cell" : minCells + " grid cells";
  const defective = r.verdict === "defective";
  const meta = document.createElement("div");
  meta.className = "meta";
  const span = (cls, text) => {
    const e = document.createElement("span");
    e.className = cls;
    e.textContent = text;
    return e;
  };
  const v = span("verdict " + (defective ? "defective" : "ok"), defective ? "defective" : "OK");
  v.title = "defect score " + r.defect_score.toFixed(3) + " (largest margin above the threshold); defective = " +
    "a marked region of at least " + smallest;
  const what = document.createElement("span");
  what.className = "what";
  what.append(span("components", String(regions)), " defect region" + (regions === 1 ? "" : "s"));
  const parts = [v, what];
  if (specks) {
    const sp = span("specks", (regions ? "+ " : "") + plural(specks, "speck") + " below the smallest defect size (" +
      smallest + "), ringed amber" + (defective ? "" : ": not a defect"));
    sp.title = "marks smaller than one cell of the grid the matching sees: kept in the mask, not counted";
    parts.push(sp);
  }
  const area = document.createElement("span");
  area.append(span("area", (100 * r.defect_fraction).toFixed(3) + "%"), " of the image marked");
  parts.push(area);
  const score = document.createElement("span");
  score.append("score ", span("score", r.max_score.toFixed(3)));
  parts.push(score);
  parts.forEach((p, i) => { if (i) meta.append(" · "); meta.append(p); });
  return meta;
}

function sortResults() {
  const rank = (q) => q.status === "done" ? [q.result.verdict === "defective" ? 0 : 0.5, -q.result.defect_fraction] :
    q.status === "error" ? [2, 0] : [1, 0];
  const sorted = [...state.queries].sort((a, b) => {
    const ra = rank(a), rb = rank(b);
    return ra[0] - rb[0] || ra[1] - rb[1] || a.name.localeCompare(b.name);
  });
  for (const q of sorted) $("results").appendChild(q.card);
}

function updateButtons() {
  const haveDone = state.session && state.queries.some((q) => q.status === "done" && q.session === state.session);
  const ready = state.inspector ? Boolean(state.session) : state.supports.length > 0;
  $("run-btn").disabled = state.running || !ready || !state.queries.length;
  $("inspector-save-btn").disabled = state.running || !ready;
  $("save-btn").disabled = state.running || !state.supports.length || !(state.options && state.options.saving);
  const zip = $("zip-link");
  zip.classList.toggle("disabled", !haveDone);
  zip.href = haveDone ? "/v1/sessions/" + state.session + "/results.zip" : "#";
  zip.dataset.session = haveDone ? state.session : "";
  if (!state.inspector && state.dirty && state.queries.some((q) => q.status === "done")) {
    $("progress").textContent = "supports or settings changed: press segment to update the results";
  }
}

// ---------------------------------------------------------------- OK images
function setNormals(files) {
  state.normals = files;
  $("normal-count").textContent = files.length ? files.length + " OK image(s)" : "no OK images";
  $("normal-clear").hidden = !files.length;
  markDirty();
}

// ---------------------------------------------------------------- saved sessions
async function loadSaved() {
  let r;
  try {
    r = await api("/v1/saved");
  } catch (e) {
    return;
  }
  const sel = $("saved-list");
  sel.innerHTML = "<option value=''>—</option>";
  for (const s of r.saved) {
    const o = document.createElement("option");
    o.value = s.id;
    o.textContent = (s.title || s.id) + " · " + new Date(s.saved_at * 1000).toLocaleString() + " · " +
      s.supports + " support(s), " + s.settings.method;
    sel.appendChild(o);
  }
  $("open-btn").disabled = !r.saved.length;
}

async function saveSession() {
  try {
    if (state.dirty || !state.session) await fitSession();
    const fd = new FormData();
    fd.append("title", state.supports.map((s) => s.name).join(", "));
    const r = await api("/v1/sessions/" + state.session + "/save", { method: "POST", body: fd });
    setStatus("session saved as " + r.id);
    await loadSaved();
    $("saved-list").value = r.id;
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function openSaved() {
  const id = $("saved-list").value;
  if (!id) return;
  try {
    setStatus("opening session " + id + "…");
    const info = await api("/v1/saved/" + id + "/open", { method: "POST" });
    setInspector(null);
    for (const k of SETTING_IDS) if (k in info.settings) $(k).value = info.settings[k];
    for (const s of state.supports) s.card.remove();
    state.supports = [];
    for (const s of info.supports) {
      const base = "/v1/sessions/" + info.id + "/supports/" + s.index;
      const [img, mask] = await Promise.all([api(base + "/image"), api(base + "/mask")]);
      await addSupport(img, s.name, mask, s.type || "");
    }
    state.session = info.id;
    state.dirty = state.normals.length > 0;   // saved sessions keep no OK images: refit with these on segment
    showSession(info, " (opened from " + id + ")");
    setStatus("session " + id + " opened");
    updateButtons();
  } catch (e) {
    setStatus(e.message, true);
  }
}

// the ZIP is fetched with the token (a plain link cannot send it), then saved from a blob URL
async function downloadZip(ev) {
  ev.preventDefault();
  const sid = $("zip-link").dataset.session;
  if (!sid) return;
  try {
    setStatus("preparing the ZIP…");
    saveBlob(await api("/v1/sessions/" + sid + "/results.zip"), "fdseg-" + sid + ".zip");
    setStatus("ready");
  } catch (e) {
    setStatus(e.message, true);
  }
}

function saveBlob(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 60000);
}

// ---------------------------------------------------------------- inspector files
// An inspector file (.fdseg) is a fitted session in one file: the page segments with it at once, no supports.
const inspectorLine = (i) => "inspector " + i.file + " (" + i.preset + " preset, " + plural(i.supports, "support") +
  ", fitted on " + i.precision + ")";

// info: an inspector session's info (the page segments with it), or null (back to supports)
function setInspector(info) {
  state.inspector = info;
  const on = Boolean(info);
  $("inspector-bar").hidden = !on;
  $("support-tools").hidden = on;
  $("support-list").hidden = on;
  $("normal-section").hidden = on;
  $("support-title").textContent = on ? "Inspector" : "Supports";
  $("support-hint").textContent = on ? "(a fitted inspector file: no supports needed; drop query images below)" :
    "(1–5 images of the defect; paint the defect on each, or upload its mask; name its defect type to tell several " +
    "apart; or open an inspector file)";
  for (const id of SETTING_IDS) $(id).disabled = on;        // the file fixes them
  const note = $("precision-note");
  note.hidden = !(on && info.precision_note);
  note.textContent = on && info.precision_note ? "numeric path: " + info.precision_note : "";
  if (!on) return;
  $("inspector-info").textContent = inspectorLine(info.inspector);
  $("inspector-info").title = "made by fdseg " + info.inspector.fdseg_version + " (" + info.inspector.created + ")" +
    (info.inspector.supports_included ? "; holds its support images" : "");
  for (const k of SETTING_IDS) if (k in info.settings) $(k).value = info.settings[k];
  const sel = $("inspector-list");
  if (state.inspectors.some((x) => x.id === info.id)) sel.value = info.id;
}

function fillInspectors() {
  const sel = $("inspector-list");
  sel.innerHTML = "";
  for (const i of state.inspectors) {
    const o = document.createElement("option");
    o.value = i.id;
    o.textContent = i.inspector.file + (i.pinned ? "" : " (opened here)");
    sel.appendChild(o);
  }
  $("inspector-pick").hidden = state.inspectors.length < 2;
}

function useInspector(info) {
  setInspector(info);
  state.session = info.id;
  state.dirty = false;
  showSession(info);
  setStatus("ready: " + inspectorLine(info.inspector) + "; drop query images");
  updateButtons();
}

async function loadInspectors() {
  const r = await api("/v1/inspectors");
  state.inspectors = r.inspectors;
  fillInspectors();
  if (r.inspectors.length) useInspector(r.inspectors[0]);
}

async function openInspector(file) {
  try {
    setStatus("opening inspector " + file.name + "…");
    const fd = new FormData();
    fd.append("inspector", file, file.name);
    const info = await api("/v1/inspectors", { method: "POST", body: fd });
    state.inspectors.push(info);
    fillInspectors();
    useInspector(info);
  } catch (e) {
    setStatus(e.message, true);
  }
}

// the inspector file is fetched with the token (as the ZIP), then saved from a blob URL
async function saveInspector() {
  try {
    if (!state.inspector && (state.dirty || !state.session)) await fitSession();
    setStatus("writing the inspector file…");
    const name = state.info.inspector_filename || state.session + ".fdseg";
    saveBlob(await api("/v1/sessions/" + state.session + "/inspector"), name);
    setStatus("inspector file saved as " + name);
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    updateButtons();
  }
}

// ---------------------------------------------------------------- wiring
function init() {
  loadToken();
  $("support-input").addEventListener("change", async (ev) => {
    for (const f of [...ev.target.files]) await addSupport(f, f.name);
    ev.target.value = "";
    updateButtons();
  });
  $("query-input").addEventListener("change", (ev) => {
    addQueries([...ev.target.files]);
    ev.target.value = "";
  });
  const dz = $("dropzone");
  dz.addEventListener("dragover", (ev) => { ev.preventDefault(); dz.classList.add("over"); });
  dz.addEventListener("dragleave", () => dz.classList.remove("over"));
  dz.addEventListener("drop", (ev) => {
    ev.preventDefault();
    dz.classList.remove("over");
    addQueries([...ev.dataTransfer.files].filter((f) => f.type.startsWith("image/") || /\.tiff?$/i.test(f.name)));
  });
  const isImage = (f) => f.type.startsWith("image/") || /\.tiff?$/i.test(f.name);
  $("normal-input").addEventListener("change", (ev) => {
    setNormals([...state.normals, ...ev.target.files]);
    ev.target.value = "";
  });
  $("normal-clear").addEventListener("click", () => setNormals([]));
  const nz = $("normal-dropzone");
  nz.addEventListener("dragover", (ev) => { ev.preventDefault(); nz.classList.add("over"); });
  nz.addEventListener("dragleave", () => nz.classList.remove("over"));
  nz.addEventListener("drop", (ev) => {
    ev.preventDefault();
    nz.classList.remove("over");
    setNormals([...state.normals, ...[...ev.dataTransfer.files].filter(isImage)]);
  });
  $("brush-size").addEventListener("input", () => { $("brush-size-value").textContent = $("brush-size").value; });
  for (const id of SETTING_IDS) $(id).addEventListener("change", markDirty);
  $("run-btn").addEventListener("click", runAll);
  $("save-btn").addEventListener("click", saveSession);
  $("open-btn").addEventListener("click", openSaved);
  $("zip-link").addEventListener("click", downloadZip);
  $("inspector-save-btn").addEventListener("click", saveInspector);
  $("inspector-input").addEventListener("change", (ev) => {
    if (ev.target.files.length) openInspector(ev.target.files[0]);
    ev.target.value = "";
  });
  $("inspector-list").addEventListener("change", () => {
    const info = state.inspectors.find((i) => i.id === $("inspector-list").value);
    if (info) useInspector(info);
  });
  $("inspector-close").addEventListener("click", () => {
    setInspector(null);
    state.session = null;
    state.dirty = true;
    $("session-info").textContent = $("plan-info").textContent = "";
    $("type-legend").hidden = true;
    setStatus("ready: add support images");
    updateButtons();
  });
  loadOptions()
    .then(() => { setStatus("ready: add support images"); updateButtons(); return loadInspectors(); })
    .then(() => loadSaved())
    .catch((e) => setStatus(e.message, true));
}

init();
