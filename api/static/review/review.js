// The review page: a thin client of the JSON API (/v1/queue/claim, /v1/items, /v1/items/{id}/reviews).
// The review key lives in this tab's sessionStorage and is sent as a header, never in a URL; images load
// through the short-lived signed links the API returns. Every value from the server is rendered with
// textContent, never as HTML: sources, notes and reviewer names are untrusted text.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "dfmod.review.key";
  const state = {
    key: null,
    me: null, // the signed-in key's name: reviews by it are the ones Undo may retract
    mode: "queue",
    items: [],
    selected: -1,
    detail: null,
    undo: [], // [{itemId, reviewId}] of this session's decisions, newest last (to find the last one)
    cursor: null,
    heatToken: 0,
    twins: new Map(), // sha256 -> positions in the list of the cards holding those bytes
    busy: false,
  };

  // --- API ---------------------------------------------------------------------------------------
  async function api(method, path, body, headers = {}) {
    const init = { method, headers: { Authorization: `Bearer ${state.key}`, ...headers } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    try { data = await response.json(); } catch (_) { /* an empty or non-JSON body */ }
    if (!response.ok) {
      const error = new Error((data && data.message) || `HTTP ${response.status}`);
      error.status = response.status;
      error.code = data && data.error;
      throw error;
    }
    return data;
  }

  function requestId() {
    // crypto.randomUUID needs a secure context; getRandomValues works everywhere.
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // `about` names the item a message is about: it is cleared when another item opens, so a message such as
  // "making the heatmap…" never reads as if it were about the next item.
  function say(text, isError = false, about = null) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", isError);
    if (about) status.dataset.about = about; else delete status.dataset.about;
  }

  function fail(error) {
    if (error.status === 401) { signOut(false); return; }
    say(error.message, true);
  }

  // --- sign in / out -------------------------------------------------------------------------------
  async function signIn(key) {
    state.key = key;
    try {
      const me = await api("GET", "/v1/whoami");
      if (!me.scopes.includes("review")) throw new Error(`key "${me.name}" has no review scope`);
      sessionStorage.setItem(KEY_STORAGE, key);
      state.me = me.name;
      $("whoami").textContent = `signed in as ${me.name}`;
      $("signin").hidden = true;
      $("app").hidden = false;
      $("signin-error").hidden = true;
      await claim();
    } catch (error) {
      state.key = null;
      sessionStorage.removeItem(KEY_STORAGE);
      $("signin-error").textContent = error.status === 401 ? "That key is not valid." : error.message;
      $("signin-error").hidden = false;
    }
  }

  async function signOut(release = true) {
    if (release && state.mode === "queue") {
      const ids = state.items.filter((item) => !item.decision).map((item) => item.id);
      if (ids.length) { try { await api("POST", "/v1/queue/release", { ids }); } catch (_) { /* leases expire anyway */ } }
    }
    state.key = null;
    sessionStorage.removeItem(KEY_STORAGE);
    Object.assign(state, { me: null, items: [], selected: -1, detail: null, undo: [] });
    $("list").replaceChildren();
    $("detail").hidden = true;
    $("app").hidden = true;
    $("signin").hidden = false;
    $("key-input").value = "";
  }

  // --- the list ------------------------------------------------------------------------------------
  function card(item, index) {
    const li = document.createElement("li");
    li.className = "card";
    li.dataset.id = item.id;
    li.classList.toggle("selected", index === state.selected);
    li.classList.toggle("decided", Boolean(item.decision));
    const img = document.createElement("img");
    img.alt = "";
    img.loading = "lazy";
    if (item.thumbnail_url) img.src = item.thumbnail_url;
    const text = document.createElement("div");
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = item.score == null ? "—" : `${item.score.toFixed(3)} ${item.label || ""}`;
    const source = document.createElement("div");
    source.className = "muted";
    source.textContent = item.source;
    text.append(score, source);
    const twins = state.twins.get(item.sha256) || [];
    if (twins.length > 1) {
      // Identical bytes uploaded more than once: same verdict (reused), so one decision usually fits all.
      const others = twins.filter((position) => position !== index).map((position) => `#${position + 1}`);
      const hint = document.createElement("div");
      hint.className = "twin";
      hint.textContent = `same image as ${others.join(", ")}`;
      hint.title = `identical bytes (sha256 ${item.sha256.slice(0, 12)}…)`;
      text.append(hint);
    }
    if (item.decision) {
      const badge = document.createElement("span");
      badge.className = `badge ${item.decision}`;
      badge.textContent = item.decision;
      text.append(badge);
    }
    li.append(img, text);
    li.addEventListener("click", () => select(index));
    return li;
  }

  function renderList() {
    state.twins = new Map();
    state.items.forEach((item, index) => {
      if (!item.sha256) return;
      if (!state.twins.has(item.sha256)) state.twins.set(item.sha256, []);
      state.twins.get(item.sha256).push(index);
    });
    $("list").replaceChildren(...state.items.map(card));
    const selected = $("list").children[state.selected];
    if (selected) selected.scrollIntoView({ block: "nearest" });
  }

  async function claim() {
    const limit = Number($("claim-count").value) || 10;
    try {
      const result = await api("POST", "/v1/queue/claim", { limit });
      state.items = result.items;
      say(result.items.length ? `${result.items.length} item(s) claimed for ${Math.round(result.lease_s / 60)} min`
                              : "Nothing to review right now.");
      state.selected = -1;
      renderList();
      if (state.items.length) await select(0);
      else $("detail").hidden = true;
    } catch (error) { fail(error); }
  }

  function browseQuery() {
    const params = new URLSearchParams({ order: $("f-order").value, limit: "50" });
    const decision = $("f-decision").value;
    if (decision === "none") params.set("reviewed", "false");
    else if (decision) params.set("decision", decision);
    for (const [id, name] of [["f-label", "label"], ["f-min", "min_score"], ["f-max", "max_score"], ["f-source", "source"]]) {
      const value = $(id).value.trim();
      if (value) params.set(name, value);
    }
    return params;
  }

  async function browse(more = false) {
    const params = browseQuery();
    if (more && state.cursor) params.set("cursor", state.cursor);
    try {
      const page = await api("GET", `/v1/items?${params}`);
      state.items = more ? state.items.concat(page.items) : page.items;
      state.cursor = page.next_cursor;
      $("more").hidden = !page.next_cursor;
      say(`${state.items.length} item(s)`);
      if (!more) state.selected = -1;
      renderList();
      if (!more && state.items.length) await select(0);
      if (!state.items.length) $("detail").hidden = true;
    } catch (error) { fail(error); }
  }

  function setMode(mode) {
    state.mode = mode;
    $("tab-queue").classList.toggle("active", mode === "queue");
    $("tab-browse").classList.toggle("active", mode === "browse");
    $("queue-tools").hidden = mode !== "queue";
    $("browse-tools").hidden = mode !== "browse";
    if (mode === "queue") claim(); else browse();
  }

  // --- detail --------------------------------------------------------------------------------------
  function fact(list, name, value) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value == null ? "—" : String(value);
    list.append(dt, dd);
  }

  function renderDetail(item) {
    state.detail = item;
    state.heatToken += 1;
    $("detail").hidden = false;
    $("heat").hidden = true;
    $("heat").removeAttribute("src");
    const status = $("status");
    if (status.dataset.about && status.dataset.about !== item.id) say("");
    $("faces").replaceChildren();
    $("full").onload = () => drawFaces(item);
    $("full").src = item.image_url;
    const facts = $("facts");
    facts.replaceChildren();
    fact(facts, "item", item.id);
    fact(facts, "source", item.source);
    fact(facts, "score", item.score == null ? null : `${item.score.toFixed(4)} (threshold ${item.threshold == null ? "?" : item.threshold.toFixed(4)})`);
    fact(facts, "decision", item.decision ? `${item.decision} by ${item.decided_by}` : "unreviewed");
    fact(facts, "claimed by", item.claimed_by);
    fact(facts, "created", item.created_at);
    const rows = item.verdicts.map((v) => {
      const tr = document.createElement("tr");
      for (const value of [v.model_version, v.label, v.fake_probability.toFixed(4), v.threshold.toFixed(4), v.created_at]) {
        const td = document.createElement("td");
        td.textContent = value;
        tr.append(td);
      }
      return tr;
    });
    $("verdicts").replaceChildren(...rows);
    const history = item.reviews.map((r) => {
      const li = document.createElement("li");
      li.className = r.retracted ? "retracted" : "";
      const what = r.decision === "retracted" ? `undid review ${r.retracts}` : r.decision;
      li.textContent = `${r.created_at} — ${r.reviewer}: ${what}${r.note ? ` — “${r.note}”` : ""}`;
      return li;
    });
    $("history").replaceChildren(...history);
    $("undo").disabled = !ownDecision(item) && state.undo.length === 0;
  }

  // Face stage: the newest verdict's faces, boxes in pixels of the image as uploaded (orientation applied,
  // as the browser shows it), drawn in percent so they scale with the displayed image.
  function drawFaces(item) {
    if (state.detail !== item) return;
    const image = $("full");
    const verdict = item.verdicts.length ? item.verdicts[item.verdicts.length - 1] : null;
    const faces = verdict && verdict.faces ? verdict.faces : [];
    const width = image.naturalWidth, height = image.naturalHeight;
    if (!width || !height) return;
    const boxes = faces.map((face, index) => {
      const box = document.createElement("div");
      const flagged = face.fake_probability >= verdict.threshold;
      box.className = flagged ? "face flagged" : "face";
      box.dataset.face = String(index);
      box.style.left = `${(100 * face.x0) / width}%`;
      box.style.top = `${(100 * face.y0) / height}%`;
      box.style.width = `${(100 * (face.x1 - face.x0)) / width}%`;
      box.style.height = `${(100 * (face.y1 - face.y0)) / height}%`;
      const tag = document.createElement("span");
      tag.textContent = `face ${index + 1}: ${face.fake_probability.toFixed(3)}`;
      box.title = `P(fake) ${face.fake_probability.toFixed(4)}, face detector ${face.detector_score.toFixed(3)}`;
      box.append(tag);
      return box;
    });
    $("faces").replaceChildren(...boxes);
  }

  // The open item's standing decision, if this reviewer made it: the review Undo retracts.
  function ownDecision(item) {
    if (!item || !item.decision) return null;
    const standing = item.reviews.filter((r) => r.decision !== "retracted" && !r.retracted).pop();
    return standing && standing.reviewer === state.me ? standing : null;
  }

  async function select(index) {
    if (index < 0 || index >= state.items.length) return;
    state.selected = index;
    renderList();
    try {
      const detail = await api("GET", `/v1/items/${encodeURIComponent(state.items[index].id)}`);
      if (state.items[state.selected] && state.items[state.selected].id === detail.id) renderDetail(detail);
    } catch (error) { fail(error); }
  }

  function nextUndecided(from) {
    for (let i = from + 1; i < state.items.length; i += 1) if (!state.items[i].decision) return i;
    for (let i = 0; i < from; i += 1) if (!state.items[i].decision) return i;
    return -1;
  }

  function replaceItem(summary) {
    const index = state.items.findIndex((item) => item.id === summary.id);
    if (index >= 0) state.items[index] = { ...state.items[index], ...summary };
    return index;
  }

  // --- decisions -----------------------------------------------------------------------------------
  async function decide(decision) {
    const item = state.items[state.selected];
    if (!item || state.busy) return;
    state.busy = true;
    const note = $("note").value.trim() || null;
    try {
      const review = await api("POST", `/v1/items/${encodeURIComponent(item.id)}/reviews`,
        { decision, note }, { "Idempotency-Key": requestId() });
      item.decision = review.decision;
      state.undo.push({ itemId: item.id, reviewId: review.id });
      $("note").value = "";
      say(`${decision} recorded — press u to undo`);
      const next = state.mode === "queue" ? nextUndecided(state.selected) : state.selected;
      if (next >= 0 && next !== state.selected) await select(next);
      else await select(state.selected);
    } catch (error) { fail(error); } finally { state.busy = false; }
  }

  // Undo acts on the open item only: it retracts that item's own decision. On an item without one, it opens
  // the item of this session's last decision instead (a second press undoes it there, in view), so a
  // decision is never retracted on an item the reviewer is not looking at.
  async function undo() {
    if (state.busy || !state.detail) return;
    const open = state.detail;
    const own = ownDecision(open);
    if (!own) {
      const last = state.undo[state.undo.length - 1];
      if (!last) { say("nothing to undo on this item"); return; }
      let index = state.items.findIndex((item) => item.id === last.itemId);
      if (index < 0) {
        try { state.items.unshift(await api("GET", `/v1/items/${encodeURIComponent(last.itemId)}`)); index = 0; }
        catch (error) { fail(error); return; }
      }
      await select(index);
      say("this is your last decision: press u again to undo it", false, last.itemId);
      return;
    }
    state.busy = true;
    try {
      await api("POST", `/v1/items/${encodeURIComponent(open.id)}/reviews/${own.id}/retract`, {});
      state.undo = state.undo.filter((entry) => entry.reviewId !== own.id);
      const detail = await api("GET", `/v1/items/${encodeURIComponent(open.id)}`);
      let index = replaceItem({ id: detail.id, decision: detail.decision });
      if (index < 0) { state.items.unshift(detail); index = 0; }
      await select(index);
      say("decision undone", false, open.id);
    } catch (error) { fail(error); } finally { state.busy = false; }
  }

  async function toggleHeatmap() {
    const heat = $("heat");
    if (!state.detail || !state.detail.heatmap_url) return;
    if (!heat.hidden) { heat.hidden = true; return; }
    const token = ++state.heatToken;
    const itemId = state.detail.id;
    const url = state.detail.heatmap_url;
    // Every await may return after another item opened (renderDetail bumps heatToken): then stop quietly.
    const current = () => token === state.heatToken;
    say("making the heatmap…", false, itemId);
    for (let tries = 0; tries < 120 && current(); tries += 1) {
      const response = await fetch(url);
      if (!current()) return;
      if (response.status === 200) {
        const blob = await response.blob();
        if (!current()) return;
        if (heat.src.startsWith("blob:")) URL.revokeObjectURL(heat.src);
        heat.src = URL.createObjectURL(blob);
        heat.hidden = false;
        say("heatmap: where the model saw evidence of a fake", false, itemId);
        return;
      }
      if (response.status !== 202) { say(`heatmap unavailable (HTTP ${response.status})`, true, itemId); return; }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
    if (current()) say("the heatmap is taking long; try again later", true, itemId);
  }

  // --- wiring --------------------------------------------------------------------------------------
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("key-input").value.trim());
  });
  $("signout").addEventListener("click", () => signOut(true));
  $("claim").addEventListener("click", claim);
  $("tab-queue").addEventListener("click", () => setMode("queue"));
  $("tab-browse").addEventListener("click", () => setMode("browse"));
  $("browse-tools").addEventListener("submit", (event) => { event.preventDefault(); browse(false); });
  $("more").addEventListener("click", () => browse(true));
  for (const id of ["d-fake", "d-real", "d-escalate"]) {
    $(id).addEventListener("click", () => decide($(id).dataset.decision));
  }
  $("undo").addEventListener("click", undo);
  $("toggle-heat").addEventListener("click", toggleHeatmap);

  document.addEventListener("keydown", (event) => {
    if ($("app").hidden || event.ctrlKey || event.metaKey || event.altKey) return;
    const tag = event.target.tagName;
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") {
      if (event.key === "Escape") event.target.blur();
      return;
    }
    const actions = {
      j: () => select(state.selected + 1), ArrowDown: () => select(state.selected + 1),
      k: () => select(state.selected - 1), ArrowUp: () => select(state.selected - 1),
      f: () => decide("confirmed_fake"), r: () => decide("overturned_real"), e: () => decide("escalated"),
      u: undo, h: toggleHeatmap,
    };
    const action = actions[event.key];
    if (action) { event.preventDefault(); action(); }
  });

  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) signIn(saved);
})();
