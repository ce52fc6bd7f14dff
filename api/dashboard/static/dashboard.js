// The compliance dashboard: read-only views drawn from the service's JSON API.
//
// Every request is a GET to this origin with the API key the officer typed, kept in
// sessionStorage. The DOM is built with createElement/textContent only (the page's CSP enforces
// Trusted Types, so an HTML string sink would throw): text from the API never becomes markup.
"use strict";

(() => {
  const KEY_STORAGE = "uisps.apiKey";
  const API_BASE = new URL("../", window.location.href); // the dashboard lives at <api>/dashboard/
  const POLL_ACTIVE_MS = 1000; // while a job is queued or running
  const POLL_IDLE_MS = 3000; // otherwise, so that new requests appear
  const ACTIVE_STATES = new Set(["queued", "running"]);
  const STAGE_ORDER = ["loading", "inversion", "fisher", "unlearning", "evaluation", "storing"];
  const SVG_NS = "http://www.w3.org/2000/svg";

  const view = document.getElementById("view");
  const certificateChecks = new Map(); // request id -> {text, verdict}: fetched once per tab (each fetch is audited)
  let models = new Map(); // model id -> model, for names and class names
  let generation = 0; // bumped on every navigation; async work of an older view drops its result
  let pollTimer = null;

  // --- DOM helpers ---------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }

  function append(node, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function replace(node, ...children) {
    node.replaceChildren();
    append(node, children);
  }

  // --- formatting ----------------------------------------------------------------------------

  const pad = (n) => String(n).padStart(2, "0");

  function fmtTime(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined) return "—";
    return s < 10 ? `${s.toFixed(2)} s` : s < 120 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  }

  const fmtPct = (v) => (v === null || v === undefined ? "—" : `${Number(v).toFixed(1)} %`);
  const fmtBytes = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`);
  const shortId = (id) => String(id).slice(0, 8);
  const shortHash = (hash) => `${String(hash).slice(0, 8)}…`;
  // "api_key:<uuid>" is long; its first 8 characters identify it on screen (the title has it all)
  const shortActor = (actor) => actor.replace(/^(api_key:[0-9a-f]{8})[0-9a-f-]*$/, "$1");

  // {"inversion": {"iterations": 200}, "lr": 0.1} -> "inversion.iterations=200 · lr=0.1"
  function flatParams(params, prefix = "") {
    return Object.entries(params).flatMap(([k, v]) =>
      v !== null && typeof v === "object" && !Array.isArray(v) ? flatParams(v, `${prefix}${k}.`) : [`${prefix}${k}=${JSON.stringify(v)}`],
    );
  }

  function secondsBetween(start, end) {
    return start && end ? (new Date(end) - new Date(start)) / 1000 : null;
  }

  function className(model, label) {
    const name = model && model.class_names ? model.class_names[label] : undefined;
    return name === undefined || name === String(label) ? String(label) : `${label} ${name}`;
  }

  function labelChips(model, labels, highlight) {
    if (!labels || labels.length === 0) return h("span", { class: "muted" }, "none");
    const fresh = new Set(highlight || []);
    return h("span", { class: "chips" }, labels.map((l) => h("span", { class: fresh.has(l) ? "chip chip-new" : "chip" }, className(model, l))));
  }

  function versionsText(request) {
    const result = request.result_version ? `v${request.result_version}` : ACTIVE_STATES.has(request.state) ? "…" : "none";
    return `v${request.base_version} → ${result}`;
  }

  function stateBadge(request) {
    const cancelling = request.cancel_requested && ACTIVE_STATES.has(request.state);
    const text = cancelling ? `${request.state} · cancelling` : request.state;
    return h("span", { class: `badge state-${request.state}`, "data-state": request.state }, text);
  }

  function progressCell(request) {
    const value = request.state === "succeeded" ? 1 : request.progress;
    const pct = `${Math.round(value * 100)} %`;
    const stage = ACTIVE_STATES.has(request.state) ? request.stage || request.state : request.error ? request.error.code : "";
    return h(
      "div",
      { class: "progress" },
      h("progress", { max: "1", value: String(value), "aria-label": "progress" }),
      h("span", { class: "progress-text" }, pct),
      stage ? h("span", { class: "progress-stage" }, stage) : null,
    );
  }

  // --- API -----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function apiKey() {
    return window.sessionStorage.getItem(KEY_STORAGE);
  }

  async function apiFetch(path, params) {
    const url = new URL(path, API_BASE);
    for (const [name, value] of Object.entries(params || {})) {
      if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, String(value));
    }
    const headers = { Accept: "application/json" };
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(url, { method: "GET", headers, credentials: "omit", cache: "no-store" });
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = (await response.json()).detail || detail;
      } catch (_) {
        // not a problem+json body: keep the status text
      }
      if (response.status === 401 && key) signOut(`The key was refused: ${detail}`);
      throw new ApiError(response.status, detail);
    }
    return response;
  }

  const getJson = async (path, params) => (await apiFetch(path, params)).json();

  async function loadModels() {
    const found = new Map();
    let token = "";
    do {
      const page = await getJson("models", { page_size: 1000, page_token: token });
      for (const model of page.models) found.set(model.id, model);
      token = page.next_page_token;
    } while (token);
    models = found;
  }

  async function modelOf(id) {
    if (!models.has(id)) await loadModels();
    return models.get(id);
  }

  // --- session -------------------------------------------------------------------------------

  function signOut(message) {
    window.sessionStorage.removeItem(KEY_STORAGE);
    certificateChecks.clear();
    models = new Map();
    showSignIn(message || "");
  }

  function showSignIn(message) {
    stopPolling();
    generation += 1;
    document.getElementById("sign-in").hidden = false;
    document.getElementById("nav").hidden = true;
    document.getElementById("session").hidden = true;
    document.getElementById("key-error").textContent = message;
    replace(view);
    document.getElementById("key-input").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const input = document.getElementById("key-input");
    const key = input.value.trim();
    const error = document.getElementById("key-error");
    error.textContent = "";
    window.sessionStorage.setItem(KEY_STORAGE, key);
    try {
      await loadModels(); // any role may read; a refused key answers 401 here
    } catch (err) {
      window.sessionStorage.removeItem(KEY_STORAGE);
      error.textContent = err instanceof ApiError && err.status === 401 ? `The key was refused: ${err.message}` : `Could not reach the service: ${err.message}`;
      return;
    }
    input.value = "";
    route();
  }

  // --- routing and polling -------------------------------------------------------------------

  function stopPolling() {
    if (pollTimer !== null) window.clearTimeout(pollTimer);
    pollTimer = null;
  }

  // Calls `refresh` now and again after each answer: every second while `refresh` says a job
  // is active (true), every few seconds otherwise (false), never again when it says null (a
  // finished request does not change); paused while the tab is hidden.
  function poll(refresh) {
    const mine = generation;
    const tick = async () => {
      if (mine !== generation) return;
      if (document.hidden) {
        pollTimer = window.setTimeout(tick, POLL_ACTIVE_MS);
        return;
      }
      let active = false;
      try {
        active = await refresh(mine);
        setLiveStatus(mine, active ? "live" : "idle", null);
      } catch (err) {
        setLiveStatus(mine, "error", err.message);
      }
      if (active === null) return;
      if (mine === generation) pollTimer = window.setTimeout(tick, active ? POLL_ACTIVE_MS : POLL_IDLE_MS);
    };
    tick();
  }

  function setLiveStatus(mine, status, message) {
    const node = document.getElementById("live");
    if (mine !== generation || !node) return;
    node.className = `live live-${status}`;
    const now = fmtTime(new Date().toISOString()).slice(11);
    node.textContent =
      status === "error" ? `not updated: ${message}` : status === "live" ? `live · updated ${now}` : `updated ${now}`;
  }

  function route() {
    stopPolling();
    generation += 1;
    if (!apiKey()) {
      showSignIn("");
      return;
    }
    document.getElementById("sign-in").hidden = true;
    document.getElementById("nav").hidden = false;
    document.getElementById("session").hidden = false;
    document.getElementById("key-label").textContent = `key ${apiKey().slice(0, 12)}…`;
    const parts = window.location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
    const section = parts[0] || "requests";
    for (const link of document.querySelectorAll("#nav a")) {
      link.classList.toggle("active", link.dataset.section === section);
    }
    if (section === "requests" && parts[1]) showRequest(parts[1]);
    else if (section === "models" && parts[1]) showModel(parts[1]);
    else if (section === "models") showModels();
    else if (section === "audit") showAudit(new URLSearchParams(window.location.hash.split("?")[1] || "").get("model"));
    else showRequests();
    window.scrollTo(0, 0);
  }

  function pageHeader(title, ...extra) {
    return h("div", { class: "page-header" }, h("h1", {}, title), h("div", { class: "page-tools" }, extra, h("span", { id: "live", class: "live" }, "loading…")));
  }

  function failure(target, mine, err) {
    if (mine !== generation) return;
    replace(target, h("div", { class: "panel error", role: "alert" }, err.status === 404 ? "Not found, or not visible with this key." : `Could not load: ${err.message}`));
  }

  // --- deletion requests ---------------------------------------------------------------------

  function showRequests() {
    const filter = h(
      "select",
      { id: "state-filter", "aria-label": "state" },
      ["", "queued", "running", "succeeded", "failed", "cancelled"].map((s) => h("option", { value: s }, s || "every state")),
    );
    const body = h("tbody", {});
    const more = h("button", { type: "button", class: "more", hidden: true }, "Older requests");
    let pages = 1;
    filter.addEventListener("change", () => {
      pages = 1;
      stopPolling();
      generation += 1;
      poll(refresh);
    });
    more.addEventListener("click", () => {
      pages += 1;
      stopPolling();
      generation += 1;
      poll(refresh);
    });
    replace(
      view,
      pageHeader("Deletion requests", filter),
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "table", id: "requests" },
          h("thead", {}, h("tr", {}, ["Requested", "Request", "Model", "Forget", "Versions", "State", "Progress", "Took"].map((c) => h("th", {}, c)))),
          body,
        ),
      ),
      more,
    );

    async function refresh(mine) {
      const requests = [];
      let token = "";
      for (let i = 0; i < pages; i += 1) {
        const page = await getJson("deletion-requests", { state: filter.value, page_size: 50, page_token: token });
        requests.push(...page.deletion_requests);
        token = page.next_page_token;
        if (!token) break;
      }
      if (requests.some((r) => !models.has(r.model_id))) await loadModels();
      if (mine !== generation) return false;
      more.hidden = !token;
      replace(body, requests.length ? requests.map(requestRow) : h("tr", {}, h("td", { colspan: "8", class: "muted empty" }, "No deletion requests yet.")));
      return requests.some((r) => ACTIVE_STATES.has(r.state));
    }
    poll(refresh);
  }

  function requestRow(request) {
    const model = models.get(request.model_id);
    const href = `#/requests/${encodeURIComponent(request.id)}`;
    const took = secondsBetween(request.started_at, request.finished_at);
    return h(
      "tr",
      { "data-request-id": request.id, class: ACTIVE_STATES.has(request.state) ? "active" : null },
      h("td", { class: "nowrap" }, fmtTime(request.created_at)),
      h("td", {}, h("a", { href, class: "mono" }, shortId(request.id)), request.external_ref ? h("div", { class: "muted small" }, request.external_ref) : null),
      h("td", {}, h("a", { href: `#/models/${encodeURIComponent(request.model_id)}` }, model ? model.name : shortId(request.model_id))),
      h("td", {}, labelChips(model, request.forget_labels)),
      h("td", { class: "nowrap" }, versionsText(request)),
      h("td", {}, stateBadge(request)),
      h("td", { class: "progress-cell" }, progressCell(request)),
      h("td", { class: "nowrap" }, took === null ? "—" : fmtSeconds(took)),
    );
  }

  function showRequest(id) {
    const mine = generation;
    const statusSlot = h("div", {});
    const resultSlot = h("div", {});
    const title = h("span", {}, "Deletion request");
    const crumbs = h("p", { class: "crumbs" }, h("a", { href: "#/requests" }, "Deletion requests"), " › ", h("span", { class: "mono" }, id));
    replace(view, crumbs, pageHeader(title), statusSlot, resultSlot);
    let resultDrawn = false;

    // The status panel is redrawn on every refresh; the results (metrics, certificate) once, when
    // the request has ended. Refreshing stops once nothing can change any more: the request has
    // ended and its webhook, if it has a callback_url, is no longer pending.
    async function refresh(current) {
      const request = await getJson(`deletion-requests/${encodeURIComponent(id)}`);
      const model = await modelOf(request.model_id);
      if (current !== generation) return false;
      const active = ACTIVE_STATES.has(request.state);
      const labels = request.forget_labels.map((l) => className(model, l)).join(", ");
      title.textContent = `Forget ${labels} from ${model ? model.name : shortId(request.model_id)}`;
      replace(statusSlot, statusPanel(request, model));
      if (!active && !resultDrawn) {
        resultDrawn = true;
        replace(resultSlot, resultSections(request, model));
        if (request.state === "succeeded") showCertificate(request, current);
      }
      const webhookPending = Boolean(request.callback_url) && (!request.webhook || request.webhook.state === "pending");
      return active ? true : webhookPending ? false : null;
    }
    poll(async (current) => {
      try {
        return await refresh(current);
      } catch (err) {
        failure(statusSlot, mine, err);
        throw err;
      }
    });
  }

  function webhookText(request) {
    const webhook = request.webhook;
    if (!webhook) return "waiting for the request to end";
    const tries = `${webhook.attempts.length} attempt${webhook.attempts.length === 1 ? "" : "s"}`;
    const last = webhook.attempts[webhook.attempts.length - 1];
    const outcome = last ? (last.status_code ? `, last answer ${last.status_code}` : last.error ? `, last error: ${last.error}` : "") : "";
    const next = webhook.state === "pending" && webhook.next_attempt_at ? `, next ${fmtTime(webhook.next_attempt_at)}` : "";
    return `${webhook.event_type} ${webhook.state} (${tries}${outcome}${next})`;
  }

  function statusPanel(request, model) {
    const facts = [
      ["Request", h("span", { class: "mono" }, request.id)],
      ["Requested", fmtTime(request.created_at)],
      ["Model", h("a", { href: `#/models/${encodeURIComponent(request.model_id)}` }, model ? model.name : request.model_id)],
      ["Started", fmtTime(request.started_at)],
      ["Forget", labelChips(model, request.forget_labels)],
      ["Finished", fmtTime(request.finished_at)],
      ["Versions", versionsText(request)],
      ["Took", fmtSeconds(secondsBetween(request.started_at, request.finished_at))],
      ["External reference", request.external_ref || h("span", { class: "muted" }, "none")],
      ["Attempts", String(request.attempts)],
      ["Method", request.method],
      ["Parameter overrides", Object.keys(request.params).length ? h("code", {}, flatParams(request.params).join(" · ")) : h("span", { class: "muted" }, "none (service defaults)")],
    ];
    if (request.coalesced_into) {
      const leader = h("a", { href: `#/requests/${encodeURIComponent(request.coalesced_into)}`, class: "mono" }, shortId(request.coalesced_into));
      facts.push(["Ran in the job of", leader]);
    }
    if (request.callback_url) facts.push(["Webhook", h("span", { title: request.callback_url }, webhookText(request))]);
    return h(
      "section",
      { class: "panel status-panel", id: "status" },
      h("div", { class: "status-line" }, stateBadge(request), progressCell(request)),
      request.error ? h("p", { class: "error" }, `${request.error.code}: ${request.error.message}`) : null,
      h("dl", { class: "facts wide" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    );
  }

  function resultSections(request, model) {
    return [
      request.metrics ? metricsSection(request.metrics, model) : null,
      request.state === "succeeded" ? h("section", { class: "panel", id: "certificate" }, h("h2", {}, "Deletion certificate"), h("p", { class: "muted" }, "loading…")) : null,
    ];
  }

  function metricsSection(metrics, model) {
    const before = metrics.before || {};
    const after = metrics.after || {};
    const card = (id, title, help, key) =>
      h(
        "div",
        { class: "kpi", id },
        h("div", { class: "kpi-title" }, title),
        h("div", { class: "kpi-values" }, h("span", { class: "kpi-before" }, fmtPct(before[key])), h("span", { class: "arrow" }, "→"), h("span", { class: "kpi-after" }, fmtPct(after[key]))),
        h("div", { class: "muted small" }, help),
      );
    const extra = [
      ["Frozen fraction", metrics.frozen_fraction === undefined ? "—" : `${(metrics.frozen_fraction * 100).toFixed(1)} % of parameters`],
      ["Unlearning steps", metrics.steps === undefined ? "—" : `${metrics.steps} (${Number(metrics.epochs_equivalent || 0).toFixed(2)} epochs)`],
      ["Retained training samples", metrics.retained_train_samples === undefined ? "—" : String(metrics.retained_train_samples)],
      ["Previously forgotten", labelChips(model, metrics.previously_forgotten)],
      // forgotten with the request's labels: other versions of the model forgot them, the base still knew them
      ["Also forgotten (carried)", labelChips(model, metrics.carried_labels)],
      ["Device", metrics.device || "—"],
      ["Code version", metrics.code_version ? h("span", { class: "mono" }, metrics.code_version) : "—"],
    ];
    return h(
      "section",
      { class: "panel", id: "metrics" },
      h("h2", {}, "Metrics before → after"),
      h(
        "div",
        { class: "kpis" },
        card("metric-acc-retain", "A_Dr", "accuracy on retained classes (test split): should stay", "acc_retain"),
        card("metric-acc-forget", "A_Df", "accuracy on forgotten classes (test split): should fall to 0", "acc_forget"),
        card("metric-mia", "MIA", "forgotten training samples called members: should fall", "mia"),
      ),
      h(
        "div",
        { class: "two-columns" },
        h("div", {}, h("h3", {}, "Prediction histogram on the forgotten test samples"), histogram(before.forget_histogram, after.forget_histogram, model, metrics.forget_labels || [])),
        h("div", {}, h("h3", {}, "Stage seconds"), stageChart(metrics.timings || {}), h("dl", { class: "facts compact" }, extra.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))),
      ),
      metrics.mia_definition ? h("p", { class: "muted small" }, `MIA: ${metrics.mia_definition}. ${metrics.splits || ""}`) : null,
    );
  }

  // Grouped bars: for every class, how many forgotten test samples the model predicted as it,
  // before and after. Before, the forgotten classes' bars are tall; after, the predictions
  // spread over the retained classes.
  function histogram(before, after, model, forgotten) {
    if (!before || !after || before.length === 0) return h("p", { class: "muted" }, "No histogram in this report.");
    const n = Math.max(before.length, after.length);
    const top = Math.max(1, ...before, ...after);
    const W = 560, H = 240, left = 40, right = 10, topPad = 14, bottom = 40;
    const plotW = W - left - right, plotH = H - topPad - bottom;
    const slot = plotW / n, bar = Math.min(18, slot * 0.38);
    const y = (v) => topPad + plotH - (v / top) * plotH;
    const forget = new Set(forgotten);
    const nodes = [];
    for (const tick of niceTicks(top)) {
      nodes.push(svg("line", { x1: left, x2: W - right, y1: y(tick), y2: y(tick), class: "grid" }));
      nodes.push(svg("text", { x: left - 6, y: y(tick) + 4, class: "axis", "text-anchor": "end" }, String(tick)));
    }
    for (let c = 0; c < n; c += 1) {
      const cx = left + slot * c + slot / 2;
      if (forget.has(c)) nodes.push(svg("rect", { x: left + slot * c + 1, y: topPad, width: slot - 2, height: plotH, class: "forgotten-band" }));
      const b = before[c] || 0, a = after[c] || 0;
      nodes.push(svg("rect", { x: cx - bar - 1, y: y(b), width: bar, height: y(0) - y(b), class: "bar-before" }, svg("title", {}, `class ${className(model, c)}: ${b} before`)));
      nodes.push(svg("rect", { x: cx + 1, y: y(a), width: bar, height: y(0) - y(a), class: "bar-after", "data-class": c, "data-count": a }, svg("title", {}, `class ${className(model, c)}: ${a} after`)));
      nodes.push(svg("text", { x: cx, y: H - bottom + 16, class: forget.has(c) ? "axis axis-forgotten" : "axis", "text-anchor": "middle" }, className(model, c).slice(0, 8)));
    }
    nodes.push(svg("line", { x1: left, x2: W - right, y1: y(0), y2: y(0), class: "baseline" }));
    nodes.push(svg("text", { x: left + plotW / 2, y: H - 4, class: "axis", "text-anchor": "middle" }, "predicted class (shaded: forgotten)"));
    const total = before.reduce((s, v) => s + v, 0);
    return h(
      "figure",
      { class: "chart", id: "histogram" },
      svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `prediction histogram of ${total} forgotten test samples` }, nodes),
      h("figcaption", {}, h("span", { class: "swatch swatch-before" }), "before ", h("span", { class: "swatch swatch-after" }), "after", h("span", { class: "muted" }, ` · ${total} samples`)),
    );
  }

  function niceTicks(top) {
    const raw = top / 4;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) || raw;
    const ticks = [];
    for (let t = 0; t <= top + 1e-9; t += step) ticks.push(Math.round(t));
    return ticks;
  }

  function stageChart(timings) {
    const entries = Object.entries(timings).sort(([a], [b]) => stageRank(a) - stageRank(b));
    if (entries.length === 0) return h("p", { class: "muted" }, "No timings in this report.");
    const longest = Math.max(...entries.map(([, s]) => s), 1e-6);
    const total = entries.reduce((sum, [, s]) => sum + s, 0);
    const W = 420, row = 24, labelW = 90, valueW = 70;
    const nodes = entries.map(([stage, seconds], i) => {
      const width = Math.max(1, ((W - labelW - valueW) * seconds) / longest);
      return svg(
        "g",
        { transform: `translate(0 ${i * row})`, "data-stage": stage },
        svg("text", { x: 0, y: 16, class: "axis" }, stage),
        svg("rect", { x: labelW, y: 5, width, height: 14, class: "bar-stage" }),
        svg("text", { x: labelW + width + 6, y: 16, class: "axis" }, fmtSeconds(seconds)),
      );
    });
    return h(
      "figure",
      { class: "chart", id: "stages" },
      svg("svg", { viewBox: `0 0 ${W} ${entries.length * row + 4}`, role: "img", "aria-label": "seconds per stage" }, nodes),
      h("figcaption", { class: "muted" }, `total ${fmtSeconds(total)}`),
    );
  }

  function stageRank(stage) {
    const i = STAGE_ORDER.indexOf(stage);
    return i < 0 ? STAGE_ORDER.length : i;
  }

  // --- certificates --------------------------------------------------------------------------

  async function showCertificate(request, mine) {
    let check = certificateChecks.get(request.id);
    try {
      if (!check) {
        const [text, key] = await Promise.all([
          apiFetch(`deletion-requests/${encodeURIComponent(request.id)}/certificate`).then((r) => r.text()),
          apiFetch("certificate-key").then((r) => r.text()),
        ]);
        check = { text, verdict: await verifyCertificate(text, key) };
        certificateChecks.set(request.id, check);
      }
    } catch (err) {
      check = { error: err.message };
    }
    const section = document.getElementById("certificate");
    if (mine !== generation || !section) return;
    if (check.error) {
      replace(section, h("h2", {}, "Deletion certificate"), h("p", { class: "error" }, `Could not load it: ${check.error}`));
      return;
    }
    replace(section, certificateView(request, check));
  }

  function certificateView(request, check) {
    const document_ = JSON.parse(check.text);
    const cert = document_.certificate;
    const verdict = check.verdict;
    const verdictText = {
      valid: "Signature valid: Ed25519 over the canonical certificate, with the key this service publishes",
      invalid: `Signature INVALID: this document was not signed by the key this service publishes${verdict.reason ? ` (${verdict.reason})` : ""}`,
      unavailable: `Not checked in this browser: ${verdict.reason}. Run \`uisps certificate verify FILE\`.`,
    }[verdict.status];
    const download = h("a", { class: "button", download: `deletion-certificate-${request.id}.json` }, "Download JSON");
    download.href = URL.createObjectURL(new Blob([check.text], { type: "application/json" }));
    const checkpoint = (c) => (c ? h("span", {}, `v${c.version} `, h("span", { class: "mono hash", title: c.sha256 }, c.sha256)) : "—");
    const facts = [
      ["Forgotten", (cert.labels.class_names || cert.labels.forgotten).join(", ")],
      ["Forgotten by the result", (cert.labels.forgotten_by_result || []).join(", ")],
      ["Base checkpoint", checkpoint(cert.base_checkpoint)],
      ["New checkpoint", checkpoint(cert.new_checkpoint)],
      ["Code version", h("span", { class: "mono" }, cert.code_version || "—")],
      ["Audit event", cert.audit_event ? h("span", {}, `#${cert.audit_event.id} `, h("span", { class: "mono hash" }, cert.audit_event.hash)) : "—"],
      ["Signing key", h("span", { class: "mono hash" }, document_.signature.key_id)],
    ];
    return [
      h("div", { class: "section-title" }, h("h2", {}, "Deletion certificate"), download),
      h("p", { class: `verdict verdict-${verdict.status}`, id: "certificate-verdict", "data-verdict": verdict.status }, verdictText),
      h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      h("details", {}, h("summary", {}, "The signed document"), h("pre", { class: "json" }, JSON.stringify(document_, null, 2))),
      h("p", { class: "muted small" }, "Fetching the certificate is recorded in the audit log (deletion_request.certificate_downloaded)."),
    ];
  }

  // Checks the Ed25519 signature the way `uisps certificate verify` does: over the certificate
  // object in the canonical JSON its own `format` names (signedText). The format is inside the
  // signed bytes, so a document cannot be moved to the other form without breaking its signature.
  async function verifyCertificate(text, pem) {
    if (!window.isSecureContext || !window.crypto || !window.crypto.subtle) {
      return { status: "unavailable", reason: "signature checks need a secure context (HTTPS or localhost)" };
    }
    let key;
    try {
      const der = base64Bytes(pem.replace(/-----[^-]+-----/g, "").replace(/\s+/g, ""));
      key = await window.crypto.subtle.importKey("spki", der, { name: "Ed25519" }, true, ["verify"]);
    } catch (err) {
      return { status: "unavailable", reason: `this browser cannot use the Ed25519 key (${err.message})` };
    }
    try {
      const signature = JSON.parse(text).signature;
      const raw = new Uint8Array(await window.crypto.subtle.exportKey("raw", key));
      const keyId = `sha256:${hex(await window.crypto.subtle.digest("SHA-256", raw))}`;
      const signed = new TextEncoder().encode(signedText(text));
      const valid = await window.crypto.subtle.verify({ name: "Ed25519" }, key, base64Bytes(signature.value), signed);
      return { status: valid && keyId === signature.key_id ? "valid" : "invalid", keyId };
    } catch (err) {
      return { status: "invalid", reason: err.message };
    }
  }

  // The bytes a certificate's signature covers: format 2, RFC 8785 (JCS); format 1, issued
  // before, Python's json.dumps form, rebuilt from the numbers' exact text (JSON.parse would turn
  // 100.0 into 100 and change those bytes).
  function signedText(text) {
    const { certificate } = JSON.parse(text);
    const format = certificate.format;
    if (format === 2) return jcs(certificate);
    if (format === 1) return canonicalJson(parseKeepingNumbers(text).get("certificate"));
    throw new Error(`unknown certificate format ${JSON.stringify(format)}: this page checks formats 1 and 2`);
  }

  // RFC 8785: JSON.stringify writes strings and numbers exactly as the standard does (it is
  // ECMAScript's own serialisation); keys are sorted by UTF-16 code units, which sort() compares.
  function jcs(value) {
    if (typeof value === "number" && !Number.isFinite(value)) throw new Error("a number JSON cannot hold");
    if (value === null || typeof value !== "object") return JSON.stringify(value);
    if (Array.isArray(value)) return `[${value.map(jcs).join(",")}]`;
    return `{${Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${jcs(value[k])}`).join(",")}}`;
  }

  function base64Bytes(text) {
    return Uint8Array.from(window.atob(text), (c) => c.charCodeAt(0));
  }

  function hex(buffer) {
    return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  class RawNumber {
    constructor(text) {
      this.text = text;
    }
  }

  // Format 1: a JSON parser that keeps numbers as their source text and objects as Maps (no
  // prototype keys).
  function parseKeepingNumbers(text) {
    let i = 0;
    const fail = (what) => {
      throw new Error(`certificate JSON: ${what} at ${i}`);
    };
    const space = () => {
      while (i < text.length && " \t\n\r".includes(text[i])) i += 1;
    };
    const number = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;
    const value = () => {
      space();
      const c = text[i];
      if (c === "{") {
        i += 1;
        const object = new Map();
        space();
        if (text[i] === "}") return (i += 1), object;
        for (;;) {
          space();
          if (text[i] !== '"') fail("expected a key");
          const key = string();
          space();
          if (text[i] !== ":") fail("expected ':'");
          i += 1;
          object.set(key, value());
          space();
          if (text[i] === ",") i += 1;
          else if (text[i] === "}") return (i += 1), object;
          else fail("expected ',' or '}'");
        }
      }
      if (c === "[") {
        i += 1;
        const array = [];
        space();
        if (text[i] === "]") return (i += 1), array;
        for (;;) {
          array.push(value());
          space();
          if (text[i] === ",") i += 1;
          else if (text[i] === "]") return (i += 1), array;
          else fail("expected ',' or ']'");
        }
      }
      if (c === '"') return string();
      for (const [word, result] of [["true", true], ["false", false], ["null", null]]) {
        if (text.startsWith(word, i)) return (i += word.length), result;
      }
      number.lastIndex = i;
      const match = number.exec(text);
      if (!match) fail("unexpected character");
      i += match[0].length;
      return new RawNumber(match[0]);
    };
    const string = () => {
      const start = i;
      i += 1;
      while (i < text.length && text[i] !== '"') i += text[i] === "\\" ? 2 : 1;
      if (i >= text.length) fail("unterminated string");
      i += 1;
      return JSON.parse(text.slice(start, i));
    };
    const result = value();
    space();
    if (i !== text.length) fail("trailing characters");
    return result;
  }

  // Format 1: Python's json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True).
  function canonicalJson(value) {
    if (value === null) return "null";
    if (value === true) return "true";
    if (value === false) return "false";
    if (value instanceof RawNumber) return value.text;
    if (typeof value === "string") return asciiString(value);
    if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
    const keys = Array.from(value.keys()).sort(byCodePoint);
    return `{${keys.map((k) => `${asciiString(k)}:${canonicalJson(value.get(k))}`).join(",")}}`;
  }

  // Python sorts keys by code point; sort() alone compares UTF-16 code units, which puts a key
  // with a character above U+FFFF before one with a character in U+E000..U+FFFF.
  function byCodePoint(a, b) {
    const x = Array.from(a, (c) => c.codePointAt(0));
    const y = Array.from(b, (c) => c.codePointAt(0));
    for (let i = 0; i < Math.min(x.length, y.length); i += 1) if (x[i] !== y[i]) return x[i] - y[i];
    return x.length - y.length;
  }

  function asciiString(text) {
    const named = { '"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f" };
    let out = '"';
    for (let j = 0; j < text.length; j += 1) {
      const ch = text[j];
      const code = text.charCodeAt(j);
      if (named[ch]) out += named[ch];
      else if (code < 0x20 || code > 0x7e) out += `\\u${code.toString(16).padStart(4, "0")}`;
      else out += ch;
    }
    return `${out}"`;
  }

  // --- models and lineage --------------------------------------------------------------------

  function showModels() {
    const body = h("tbody", {});
    replace(
      view,
      pageHeader("Models"),
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "table", id: "models" },
          h("thead", {}, h("tr", {}, ["Name", "Architecture", "Classes", "Latest version", "Data source", "Registered"].map((c) => h("th", {}, c)))),
          body,
        ),
      ),
    );
    poll(async (mine) => {
      await loadModels();
      if (mine !== generation) return false;
      const rows = Array.from(models.values()).map((m) =>
        h(
          "tr",
          { "data-model-id": m.id },
          h("td", {}, h("a", { href: `#/models/${encodeURIComponent(m.id)}` }, m.name)),
          h("td", {}, m.architecture),
          h("td", {}, String(m.num_classes)),
          h("td", {}, m.latest_version ? `v${m.latest_version}` : "—"),
          h("td", { class: "mono" }, m.data_source),
          h("td", { class: "nowrap" }, fmtTime(m.created_at)),
        ),
      );
      replace(body, rows.length ? rows : h("tr", {}, h("td", { colspan: "6", class: "muted empty" }, "No models yet.")));
      return false;
    });
  }

  function showModel(id) {
    const mine = generation;
    const body = h("div", {});
    replace(view, h("p", { class: "crumbs" }, h("a", { href: "#/models" }, "Models"), " › ", h("span", { class: "mono" }, id)), pageHeader("Version lineage"), body);
    poll(async (current) => {
      try {
        await loadModels();
        const model = models.get(id);
        if (!model) throw new ApiError(404, "not found");
        const versions = [];
        let token = "";
        do {
          const page = await getJson(`models/${encodeURIComponent(id)}/versions`, { page_size: 1000, page_token: token });
          versions.push(...page.versions);
          token = page.next_page_token;
        } while (token);
        if (current !== generation) return false;
        replace(body, modelSummary(model), lineage(model, versions));
        return false;
      } catch (err) {
        failure(body, mine, err);
        throw err;
      }
    });
  }

  function modelSummary(model) {
    const facts = [
      ["Model", h("span", {}, model.name, " ", h("span", { class: "mono muted" }, model.id))],
      ["Architecture", model.architecture],
      ["Classes", `${model.num_classes}: ${model.class_names.join(", ")}`],
      ["Input", `${model.input_shape.join(" × ")}`],
      ["Data source", h("span", { class: "mono" }, model.data_source)],
      ["Registered", fmtTime(model.created_at)],
      ["Audit log", h("a", { href: `#/audit?model=${encodeURIComponent(model.id)}` }, "events of this model")],
    ];
    return h("section", { class: "panel" }, h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
  }

  function lineage(model, versions) {
    const byVersion = new Map(versions.map((v) => [v.version, v]));
    const rows = versions.map((v) => {
      const parent = v.parent_version ? byVersion.get(v.parent_version) : null;
      const inherited = new Set(parent ? parent.forgotten_labels : []);
      const fresh = v.forgotten_labels.filter((l) => !inherited.has(l));
      return h(
        "tr",
        { "data-version": v.version },
        h("td", {}, h("strong", {}, `v${v.version}`)),
        h("td", {}, v.parent_version ? `v${v.parent_version}` : h("span", { class: "muted" }, "upload")),
        h("td", {}, labelChips(model, v.forgotten_labels, fresh)),
        h("td", {}, h("span", { class: "mono hash sha256", title: v.sha256 }, v.sha256)),
        h("td", { class: "nowrap" }, fmtBytes(v.size_bytes)),
        h("td", { class: "nowrap" }, fmtTime(v.created_at)),
        h("td", {}, producedBy(v)),
        h("td", { class: "nowrap checkpoint" }, checkpointState(v)),
      );
    });
    return h(
      "section",
      { class: "panel", id: "lineage" },
      h("h2", {}, `${versions.length} version${versions.length === 1 ? "" : "s"}`),
      lineageGraph(model, versions),
      h(
        "table",
        { class: "table", id: "versions" },
        h("thead", {}, h("tr", {}, ["Version", "Parent", "Forgotten labels (cumulative; new in bold)", "sha256", "Size", "Created", "Produced by", "Checkpoint"].map((c) => h("th", {}, c)))),
        h("tbody", {}, rows),
      ),
    );
  }

  // A purged checkpoint's bytes are gone for good (DELETE .../checkpoint); its record stays.
  function checkpointState(version) {
    if (!version.checkpoint_purged_at) return h("span", { class: "muted" }, "kept");
    return h("span", { class: "badge purged", title: version.checkpoint_purged_at }, `purged ${fmtTime(version.checkpoint_purged_at)}`);
  }

  // Every request a version was made for: several when requests were coalesced into one job.
  function producedBy(version) {
    const ids = version.deletion_request_ids && version.deletion_request_ids.length ? version.deletion_request_ids : version.deletion_request_id ? [version.deletion_request_id] : [];
    if (ids.length === 0) return h("span", { class: "muted" }, "uploaded");
    return h("span", { class: "chips" }, ids.map((rid) => h("a", { href: `#/requests/${encodeURIComponent(rid)}`, class: "mono" }, shortId(rid))));
  }

  // Versions left to right; a child stays on its parent's lane unless an earlier sibling took
  // it, so a branch (unlearning from an older version) opens a lane below.
  function lineageGraph(model, versions) {
    if (versions.length === 0) return h("p", { class: "muted" }, "No versions uploaded yet.");
    const lane = new Map();
    const laneTaken = new Set();
    let lanes = 0;
    for (const v of versions) {
      const parentLane = v.parent_version ? lane.get(v.parent_version) : undefined;
      if (parentLane !== undefined && !laneTaken.has(v.parent_version)) {
        lane.set(v.version, parentLane);
        laneTaken.add(v.parent_version);
      } else {
        lane.set(v.version, lanes);
        lanes += 1;
        if (v.parent_version) laneTaken.add(v.parent_version);
      }
    }
    const step = 110, laneH = 58, pad = 30;
    const x = (i) => pad + i * step;
    const index = new Map(versions.map((v, i) => [v.version, i]));
    const y = (version) => 24 + lane.get(version) * laneH;
    const nodes = [];
    for (const v of versions) {
      if (!v.parent_version || !index.has(v.parent_version)) continue;
      const x1 = x(index.get(v.parent_version)), y1 = y(v.parent_version), x2 = x(index.get(v.version)), y2 = y(v.version);
      const mid = (x1 + x2) / 2;
      nodes.push(svg("path", { d: `M${x1} ${y1} C${mid} ${y1} ${mid} ${y2} ${x2} ${y2}`, class: "edge" }));
    }
    for (const v of versions) {
      const parent = versions.find((p) => p.version === v.parent_version);
      const fresh = v.forgotten_labels.filter((l) => !(parent ? parent.forgotten_labels : []).includes(l));
      const cx = x(index.get(v.version)), cy = y(v.version);
      const link = svg(
        "a",
        { href: v.deletion_request_id ? `#/requests/${encodeURIComponent(v.deletion_request_id)}` : null },
        svg("circle", { cx, cy, r: 13, class: v.deletion_request_id ? "node" : "node node-upload" }),
        svg("text", { x: cx, y: cy + 4, class: "node-label", "text-anchor": "middle" }, `v${v.version}`),
        svg("text", { x: cx, y: cy + 30, class: "axis", "text-anchor": "middle" }, v.parent_version ? `forget ${fresh.map((l) => className(model, l)).join(",") || "—"}` : "upload"),
        svg("title", {}, `v${v.version} sha256 ${v.sha256}`),
      );
      nodes.push(link);
    }
    const W = x(versions.length - 1) + pad + 20, H = lanes * laneH + 20;
    return h("figure", { class: "chart lineage-graph" }, svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": "version lineage" }, nodes));
  }

  // --- audit log -----------------------------------------------------------------------------

  function showAudit(modelId) {
    const mine = generation;
    const GENESIS = "0".repeat(64);
    const pick = h("select", { id: "audit-model", "aria-label": "model" }, h("option", { value: "" }, "every model (whole chain)"));
    const fillModels = () => {
      for (const m of models.values()) pick.append(h("option", { value: m.id, selected: m.id === modelId }, m.name));
    };
    pick.addEventListener("change", () => {
      window.location.hash = pick.value ? `#/audit?model=${encodeURIComponent(pick.value)}` : "#/audit";
    });
    const body = h("tbody", {});
    const more = h("button", { type: "button", class: "more", hidden: true }, "Newer events");
    const summary = h("div", { class: "chain-summary", id: "chain-summary" });
    replace(
      view,
      pageHeader("Audit log", pick),
      summary,
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "table audit", id: "audit" },
          h("thead", {}, h("tr", {}, ["#", "When", "Actor", "Action", "Subject", "Details", "prev_hash → hash", "Link"].map((c) => h("th", {}, c)))),
          body,
        ),
      ),
      more,
    );
    const events = [];
    let token = "";
    let broken = 0;

    // Oldest first, the order the chain is checked in. Each event must name the previous
    // event's hash; only the whole tenant log is one chain (a model's events are a subset).
    async function loadPage() {
      const page = await getJson("audit-events", { model_id: modelId, page_size: 200, page_token: token });
      if (mine !== generation) return;
      for (const event of page.audit_events) {
        const previous = events.length ? events[events.length - 1].hash : GENESIS;
        const linked = modelId ? null : event.prev_hash === previous;
        if (linked === false) broken += 1;
        events.push(event);
        body.append(auditRow(event, linked));
      }
      token = page.next_page_token;
      more.hidden = !token;
      replace(
        summary,
        modelId
          ? `${events.length} events of this model (links are checked on the whole log: choose every model).`
          : broken === 0
            ? `${events.length} events, each linked to the previous one's hash.`
            : `${broken} of ${events.length} events do NOT link to the previous event's hash.`,
        " ",
        h("span", { class: "muted" }, h("code", {}, "uisps audit verify"), " also recomputes every hash."),
      );
      summary.className = `chain-summary ${broken ? "error" : modelId ? "" : "ok"}`;
      setLiveStatus(mine, "idle", null);
    }
    const fail = (err) => {
      setLiveStatus(mine, "error", err.message);
      failure(summary, mine, err);
    };
    more.addEventListener("click", () => loadPage().catch(fail));
    (models.size ? Promise.resolve() : loadModels())
      .then(() => {
        if (mine === generation) fillModels();
        return loadPage();
      })
      .catch(fail);
  }

  const SUBJECT_NAMES = { deletion_request: "request", model_version: "version", api_key: "key" };

  function auditRow(event, linked) {
    const name = `${SUBJECT_NAMES[event.subject_type] || event.subject_type} ${shortId(event.subject_id)}`;
    const subject =
      event.subject_type === "deletion_request"
        ? h("a", { href: `#/requests/${encodeURIComponent(event.subject_id)}`, class: "mono", title: event.subject_id }, name)
        : event.model_id
          ? h("a", { href: `#/models/${encodeURIComponent(event.model_id)}`, class: "mono", title: event.subject_id }, name)
          : h("span", { class: "mono", title: event.subject_id }, name);
    const details = Object.entries(event.details || {}).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`);
    return h(
      "tr",
      { "data-event-id": event.id, "data-action": event.action },
      h("td", {}, String(event.id)),
      h("td", { class: "nowrap" }, fmtTime(event.occurred_at)),
      h("td", { class: "mono small nowrap", title: event.actor }, shortActor(event.actor)),
      h("td", {}, h("span", { class: "action" }, event.action)),
      h("td", { class: "nowrap" }, subject),
      h("td", { class: "details small", title: details.join("\n") }, details.join(" · ")),
      h("td", { class: "mono small nowrap" }, h("span", { title: event.prev_hash }, shortHash(event.prev_hash)), " → ", h("span", { title: event.hash }, shortHash(event.hash))),
      h("td", { class: "link-cell" }, linked === null ? h("span", { class: "muted" }, "—") : linked ? h("span", { class: "ok", "data-linked": "true" }, "✓") : h("span", { class: "error", "data-linked": "false" }, "✗ broken")),
    );
  }

  // --- start ---------------------------------------------------------------------------------

  document.getElementById("key-form").addEventListener("submit", signIn);
  document.getElementById("sign-out").addEventListener("click", () => signOut(""));
  window.addEventListener("hashchange", route);
  route();
})();
