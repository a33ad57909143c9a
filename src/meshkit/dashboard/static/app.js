/* meshkit dashboard: one page, hash routes, vanilla JS (no framework, nothing loaded from outside).
 *
 * Every element is built with createElement + textContent, never innerHTML with data: span names, log lines and
 * message bodies cannot inject markup. The JSON API is read with relative URLs ("api/..."), so the page works
 * wherever the dashboard is mounted. Element ids and classes used by tests are listed in docs/dashboard.md.
 */
"use strict";

(() => {
  // The SVG namespace name: an XML identifier that createElementNS requires, never fetched.
  const SVG_NS = "http://www.w3.org/2000/svg";
  const ROW_H = 24; // px, one waterfall row
  const OVERSCAN = 12; // rows rendered above and below the visible ones
  const FLAME_ROW = 18; // px, one flame chart level
  const MAX_INDENT = 32; // levels of indentation shown before the depth is only written
  const LOG_ROWS = 2000; // rows kept in the log table

  // -- small helpers ---------------------------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    if (!attrs) return;
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") el.setAttribute("class", value);
      else if (key === "text") el.textContent = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(el.dataset, value);
      else if (key === "style") Object.assign(el.style, value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
  }

  function append(el, children) {
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  const $ = (selector, root = document) => root.querySelector(selector);
  const enc = encodeURIComponent;

  class ApiError extends Error {
    constructor(status, error, message) {
      super(message || error || `HTTP ${status}`);
      this.status = status;
      this.error = error;
    }
  }

  async function api(path, options) {
    let response;
    try {
      response = await fetch(`api/${path}`, { headers: { accept: "application/json" }, ...options });
    } catch (exc) {
      setStatus(false);
      throw new ApiError(0, "offline", "the dashboard does not answer");
    }
    setStatus(true);
    let body = null;
    try {
      body = await response.json();
    } catch (exc) {
      body = null;
    }
    if (!response.ok) {
      throw new ApiError(response.status, body && body.error, body && body.message);
    }
    return body;
  }

  function post(path, body) {
    return api(path, {
      method: "POST",
      headers: { accept: "application/json", "content-type": "application/json" },
      body: JSON.stringify(body),
    });
  }

  function setStatus(ok) {
    const el = $("#status");
    if (!el) return;
    el.textContent = ok ? "● live" : "● offline";
    el.className = ok ? "ok" : "down";
  }

  function query(params) {
    const out = new URLSearchParams();
    for (const [key, value] of Object.entries(params)) {
      if (value !== undefined && value !== null && value !== "" && value !== false) out.set(key, String(value));
    }
    const text = out.toString();
    return text ? `?${text}` : "";
  }

  function fmtDuration(ns) {
    if (ns === null || ns === undefined || Number.isNaN(ns)) return "–";
    const abs = Math.abs(ns);
    if (abs < 1e3) return `${Math.round(ns)} ns`;
    if (abs < 1e6) return `${(ns / 1e3).toPrecision(3)} µs`;
    if (abs < 1e9) return `${(ns / 1e6).toPrecision(3)} ms`;
    if (abs < 60e9) return `${(ns / 1e9).toPrecision(3)} s`;
    return fmtSeconds(ns / 1e9);
  }

  function fmtSeconds(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    let rest = Math.max(0, Math.floor(seconds));
    const d = Math.floor(rest / 86400);
    rest -= d * 86400;
    const hh = Math.floor(rest / 3600);
    rest -= hh * 3600;
    const mm = Math.floor(rest / 60);
    const ss = rest - mm * 60;
    if (d) return `${d}d ${hh}h`;
    if (hh) return `${hh}h ${mm}m`;
    if (mm) return `${mm}m ${ss}s`;
    return `${ss}s`;
  }

  function fmtTime(unixSeconds) {
    if (!unixSeconds) return "–";
    const date = new Date(unixSeconds * 1000);
    return date.toLocaleString(undefined, { hour12: false });
  }

  function fmtClock(unixSeconds) {
    const date = new Date(unixSeconds * 1000);
    const pad = (n, w = 2) => String(n).padStart(w, "0");
    return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
  }

  function colorOf(name) {
    let hash = 0;
    for (let i = 0; i < name.length; i++) hash = (hash * 31 + name.charCodeAt(i)) | 0;
    return `hsl(${Math.abs(hash) % 360} 55% 55%)`;
  }

  function valueText(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  function shortId(id) {
    return id ? `${id.slice(0, 8)}…` : "";
  }

  function toast(message, kind = "info") {
    const el = $("#toast");
    el.textContent = message;
    el.className = kind;
    el.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => {
      el.hidden = true;
    }, 4000);
  }

  function confirmDialog(message) {
    const dialog = $("#confirm-dialog");
    $("#confirm-message").textContent = message;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }

  function errorBox(exc) {
    return h("div", { class: "error-box", role: "alert" }, exc instanceof Error ? exc.message : String(exc));
  }

  function showTooltip(x, y, lines) {
    const el = $("#tooltip");
    el.replaceChildren(...lines.map((line, i) => h(i === 0 ? "strong" : "div", {}, line)));
    el.hidden = false;
    const width = el.offsetWidth;
    const left = Math.min(x + 14, window.innerWidth - width - 8);
    el.style.left = `${Math.max(4, left)}px`;
    el.style.top = `${y + 14}px`;
  }

  function hideTooltip() {
    $("#tooltip").hidden = true;
  }

  // -- routing ---------------------------------------------------------------------------------------------------

  const app = { token: 0, timers: [], cleanups: [], info: null };

  function parseHash() {
    const raw = location.hash.replace(/^#\/?/, "");
    const cut = raw.indexOf("?");
    const path = cut < 0 ? raw : raw.slice(0, cut);
    const params = new URLSearchParams(cut < 0 ? "" : raw.slice(cut + 1));
    const parts = path.split("/").filter(Boolean).map((p) => decodeURIComponent(p));
    return { parts, params };
  }

  function every(ms, fn) {
    app.timers.push(setInterval(fn, ms));
  }

  // Loads what path() names now and every `ms` while the page is shown, handing it to show(); a failure is shown
  // in `problem` (and cleared by the next success). Returns the loader, to call again at once.
  function poll(token, problem, path, show, ms) {
    async function load() {
      try {
        const data = await api(path());
        if (!current(token)) return;
        problem.replaceChildren();
        show(data);
      } catch (exc) {
        if (current(token)) problem.replaceChildren(errorBox(exc));
      }
    }
    load();
    every(ms, load);
    return load;
  }

  function onLeave(fn) {
    app.cleanups.push(fn);
  }

  function current(token) {
    return token === app.token;
  }

  const pages = {
    services: servicesPage,
    traces: tracesPage,
    topology: topologyPage,
    resilience: resiliencePage,
    messaging: messagingPage,
    data: dataPage,
    logs: logsPage,
  };

  function route() {
    const { parts, params } = parseHash();
    const page = pages[parts[0]] ? parts[0] : "services";
    // A link to another span of the trace on screen selects it instead of reloading the trace.
    if (page === "traces" && parts[1] && trace.id === parts[1] && $("#waterfall")) {
      if (params.get("span")) selectSpanById(params.get("span"), true);
      return;
    }
    for (const timer of app.timers) clearInterval(timer);
    for (const fn of app.cleanups) fn();
    app.timers = [];
    app.cleanups = [];
    app.token += 1;
    hideTooltip();
    for (const link of document.querySelectorAll("#nav a")) {
      link.classList.toggle("active", link.dataset.route === page);
    }
    const view = $("#view");
    view.replaceChildren();
    view.dataset.page = page;
    pages[page](view, app.token, parts.slice(1), params);
  }

  // -- services --------------------------------------------------------------------------------------------------

  function servicesPage(view, token) {
    const expanded = new Set();
    const endpoints = new Map();
    const body = h("tbody");
    const table = h(
      "table",
      { id: "services-table", class: "grid" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ["Service", "Instances", "Health", "Uptime", "Restarts", "Subscriptions", "Endpoints"].map((t) =>
            h("th", {}, t),
          ),
        ),
      ),
      body,
    );
    const problem = h("div");
    view.append(h("h1", {}, "Services"), problem, table);
    let last = null;

    function endpointRow(service) {
      const cell = h("td", { colspan: 7 });
      const data = endpoints.get(service.name);
      if (!data) cell.append(h("span", { class: "muted" }, "loading…"));
      else if (data instanceof Error) cell.append(errorBox(data));
      else if (!data.endpoints.length) cell.append(h("span", { class: "muted" }, "no endpoints"));
      else {
        cell.append(
          h(
            "table",
            { class: "endpoints" },
            h(
              "tbody",
              {},
              data.endpoints.map((e) =>
                h(
                  "tr",
                  { class: `endpoint${e.deprecated ? " deprecated" : ""}` },
                  h("td", {}, h("span", { class: `method method-${e.method.toLowerCase()}` }, e.method)),
                  h("td", { class: "mono" }, e.path),
                  h("td", {}, e.summary),
                ),
              ),
            ),
          ),
        );
      }
      return h("tr", { class: "endpoints-row", dataset: { service: service.name } }, cell);
    }

    function render(services) {
      last = services;
      const rows = [];
      for (const svc of services) {
        const instances = svc.instances.length
          ? svc.instances.map((i) =>
              h(
                "div",
                { class: "instance", dataset: { instance: i.id } },
                h("span", { class: "mono" }, i.address),
                " ",
                h("span", { class: `badge status-${i.status}` }, i.status),
                i.version ? h("span", { class: "muted" }, ` v${i.version}`) : null,
                h("span", { class: "muted" }, ` up ${fmtSeconds(i.uptime_s)}`),
              ),
            )
          : h("span", { class: "muted" }, svc.managed ? "none registered" : "seen in traces only");
        const health = svc.instances.length
          ? h(
              "span",
              { class: `badge ${svc.healthy === svc.instances.length ? "status-passing" : svc.healthy ? "status-warning" : "status-critical"}` },
              `${svc.healthy}/${svc.instances.length} healthy`,
            )
          : h("span", { class: "muted" }, "–");
        const toggle = svc.openapi
          ? h(
              "button",
              {
                class: "endpoints-toggle small",
                "aria-expanded": expanded.has(svc.name) ? "true" : "false",
                onclick: () => toggleEndpoints(svc),
              },
              expanded.has(svc.name) ? "hide" : "show",
            )
          : h("span", { class: "muted" }, "–");
        rows.push(
          h(
            "tr",
            { class: "service-row", dataset: { service: svc.name } },
            h("td", {}, h("span", { class: "svc-chip", style: { background: colorOf(svc.name) } }), " ", h("strong", {}, svc.name)),
            h("td", {}, instances),
            h("td", {}, health, svc.registry_error ? h("div", { class: "error-text" }, svc.registry_error) : null),
            h("td", {}, svc.uptime_s === null ? "–" : fmtSeconds(svc.uptime_s)),
            h("td", { class: svc.restarts ? "warn-text" : "" }, String(svc.restarts)),
            h(
              "td",
              {},
              svc.subscriptions.length
                ? svc.subscriptions.map((sub) =>
                    h("div", {}, h("a", { href: `#/messaging/${enc(sub.topic)}` }, sub.topic), h("span", { class: "muted" }, ` (${sub.group})`)),
                  )
                : h("span", { class: "muted" }, "–"),
            ),
            h("td", {}, toggle),
          ),
        );
        if (expanded.has(svc.name)) rows.push(endpointRow(svc));
      }
      if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No services yet.")));
      body.replaceChildren(...rows);
    }

    async function toggleEndpoints(svc) {
      if (expanded.has(svc.name)) {
        expanded.delete(svc.name);
        render(last);
        return;
      }
      expanded.add(svc.name);
      endpoints.delete(svc.name);
      render(last);
      try {
        endpoints.set(svc.name, await api(`services/${enc(svc.name)}/endpoints`));
      } catch (exc) {
        endpoints.set(svc.name, exc);
      }
      if (current(token)) render(last);
    }

    poll(token, problem, () => "services", (data) => render(data.services), 5000);
  }

  // -- traces: the list ------------------------------------------------------------------------------------------

  function tracesPage(view, token, rest, params) {
    if (rest[0]) {
      traceView(view, token, rest[0], params);
      return;
    }
    const service = h("select", { id: "f-service", name: "service" }, h("option", { value: "" }, "any service"));
    const operation = h("select", { id: "f-operation", name: "operation" }, h("option", { value: "" }, "any operation"));
    const minDuration = h("input", {
      id: "f-min-duration",
      name: "min_duration_ms",
      type: "number",
      min: "0",
      step: "any",
      placeholder: "min ms",
      value: params.get("min_duration_ms") || "",
    });
    const errors = h("input", { id: "f-errors", name: "errors", type: "checkbox" });
    errors.checked = params.get("status") === "error";
    const limit = h("input", { id: "f-limit", name: "limit", type: "number", min: "1", max: "1000", value: params.get("limit") || "50" });
    const form = h(
      "form",
      { id: "trace-filters", class: "filters" },
      h("label", {}, "Service ", service),
      h("label", {}, "Operation ", operation),
      h("label", {}, "Min duration ", minDuration, " ms"),
      h("label", { class: "check" }, errors, " errors only"),
      h("label", {}, "Limit ", limit),
      h("button", { id: "f-search", type: "submit" }, "Search"),
    );
    const body = h("tbody");
    const table = h(
      "table",
      { id: "trace-list", class: "grid" },
      h("thead", {}, h("tr", {}, ["Started", "Root span", "Duration", "Spans", "Errors", "Services"].map((t) => h("th", {}, t)))),
      body,
    );
    const problem = h("div");
    view.append(h("h1", {}, "Traces"), form, problem, table);

    let operations = {};
    function fillOperations() {
      const chosen = params.get("operation") || "";
      const names = service.value ? operations[service.value] || [] : [...new Set(Object.values(operations).flat())].sort();
      operation.replaceChildren(h("option", { value: "" }, "any operation"), names.map((n) => h("option", { value: n }, n)));
      operation.value = names.includes(chosen) ? chosen : "";
    }
    service.addEventListener("change", () => {
      params.delete("operation");
      fillOperations();
    });
    api("operations")
      .then((data) => {
        if (!current(token)) return;
        operations = data.services;
        service.append(...Object.keys(operations).map((n) => h("option", { value: n }, n)));
        service.value = params.get("service") || "";
        fillOperations();
      })
      .catch((exc) => problem.replaceChildren(errorBox(exc)));

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      location.hash = `#/traces${query({
        service: service.value,
        operation: operation.value,
        status: errors.checked ? "error" : "",
        min_duration_ms: minDuration.value,
        limit: limit.value,
      })}`;
    });

    async function load() {
      try {
        const data = await api(
          `traces${query({
            service: params.get("service"),
            operation: params.get("operation"),
            status: params.get("status"),
            min_duration_ms: params.get("min_duration_ms"),
            limit: params.get("limit"),
          })}`,
        );
        if (!current(token)) return;
        const longest = Math.max(1, ...data.traces.map((t) => t.duration_ns));
        body.replaceChildren(
          ...data.traces.map((t) =>
            h(
              "tr",
              {
                class: `trace-row${t.error_count ? " has-error" : ""}`,
                dataset: { traceId: t.trace_id },
                tabindex: "0",
                onclick: () => {
                  location.hash = `#/traces/${t.trace_id}`;
                },
                onkeydown: (event) => {
                  if (event.key === "Enter") location.hash = `#/traces/${t.trace_id}`;
                },
              },
              h("td", { class: "nowrap" }, fmtTime(t.start_ns / 1e9)),
              h(
                "td",
                {},
                h("span", { class: "svc-chip", style: { background: colorOf(t.root_service) } }),
                " ",
                h("span", { class: "muted" }, `${t.root_service}: `),
                h("a", { href: `#/traces/${t.trace_id}` }, t.root_name),
              ),
              h(
                "td",
                { class: "duration-cell" },
                h("div", { class: "duration-bar", style: { width: `${(100 * t.duration_ns) / longest}%` } }),
                h("span", {}, fmtDuration(t.duration_ns)),
              ),
              h("td", { class: "num" }, String(t.span_count)),
              h("td", { class: `num${t.error_count ? " error-text" : ""}` }, String(t.error_count)),
              h("td", {}, t.services.map((n) => h("span", { class: "tag", style: { borderColor: colorOf(n) } }, n))),
            ),
          ),
        );
        if (!data.traces.length) body.append(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No trace matches.")));
      } catch (exc) {
        if (current(token)) problem.replaceChildren(errorBox(exc));
      }
    }
    load();
  }

  // -- traces: one trace -----------------------------------------------------------------------------------------

  // The trace on screen. Rows are the spans in depth-first order (as the API sends them); a collapsed row hides
  // its `descendants` following rows; `visible` holds the indexes of the rows shown.
  const trace = {
    id: null,
    data: null,
    spans: [],
    byId: new Map(),
    parent: null,
    collapsed: new Set(),
    visible: [],
    byDepth: [],
    t0: 0,
    t1: 1,
    selected: -1,
    hover: -1,
    render: null,
  };

  function computeVisible() {
    const out = [];
    const spans = trace.spans;
    for (let i = 0; i < spans.length; ) {
      out.push(i);
      i += trace.collapsed.has(i) ? spans[i].descendants + 1 : 1;
    }
    trace.visible = out;
  }

  function loadTrace(data) {
    trace.id = data.trace_id;
    trace.data = data;
    trace.spans = data.spans;
    trace.byId = new Map(data.spans.map((sp, i) => [sp.span_id, i]));
    trace.parent = new Int32Array(data.spans.length).fill(-1);
    const stack = [];
    data.spans.forEach((sp, i) => {
      stack.length = sp.depth;
      if (sp.depth > 0) trace.parent[i] = stack[sp.depth - 1];
      stack[sp.depth] = i;
    });
    trace.byDepth = [];
    data.spans.forEach((sp, i) => {
      (trace.byDepth[sp.depth] ||= []).push(i);
    });
    for (const level of trace.byDepth) if (level) level.sort((a, b) => data.spans[a].offset_ns - data.spans[b].offset_ns);
    trace.collapsed = new Set();
    trace.t0 = 0;
    trace.t1 = Math.max(1, data.duration_ns);
    trace.selected = -1;
    computeVisible();
  }

  function traceView(view, token, traceId, params) {
    trace.id = null;
    view.append(h("p", { class: "muted" }, "Loading trace…"));
    api(`traces/${enc(traceId)}`)
      .then((data) => {
        if (!current(token)) return;
        loadTrace(data);
        buildTraceView(view, token, params);
      })
      .catch((exc) => {
        if (!current(token)) return;
        view.replaceChildren(h("p", {}, h("a", { href: "#/traces" }, "← Traces")), errorBox(exc));
      });
  }

  function buildTraceView(view, token, params) {
    const data = trace.data;
    const root = data.spans[0];
    const header = h(
      "div",
      { id: "trace-header" },
      h("p", {}, h("a", { href: "#/traces" }, "← Traces")),
      h("h1", {}, h("span", { class: "muted" }, `${root.service}: `), root.name),
      h(
        "div",
        { class: "trace-meta" },
        h("span", { class: "mono" }, data.trace_id),
        h("span", {}, fmtTime(data.start_ns / 1e9)),
        h("span", {}, `duration ${fmtDuration(data.duration_ns)}`),
        h("span", {}, `${data.span_count} spans`),
        h("span", {}, `depth ${data.max_depth + 1}`),
        h("span", { class: data.error_count ? "error-text" : "" }, `${data.error_count} errors`),
        h("span", {}, data.services.map((n) => h("span", { class: "tag", style: { borderColor: colorOf(n) } }, n))),
        h("a", { href: `#/logs?trace_id=${data.trace_id}` }, "logs of this trace"),
      ),
      h(
        "div",
        { class: "legend" },
        h("span", { class: "legend-critical" }, "critical path"),
        h("span", { class: "legend-error" }, "error"),
        h("span", { class: "muted" }, "drag on the minimap to zoom, double-click to reset"),
        h("button", { id: "zoom-reset", class: "small", onclick: () => setWindow(0, Math.max(1, data.duration_ns)) }, "Reset zoom"),
        h("button", { id: "expand-all", class: "small", onclick: () => setCollapsed(new Set()) }, "Expand all"),
      ),
    );

    // minimap
    const minimap = h("canvas", { id: "minimap", height: "56" });
    const mmWindow = h("div", { id: "minimap-window" });
    const mmWrap = h("div", { id: "minimap-wrap" }, minimap, mmWindow);

    // waterfall
    const axis = h("div", { id: "waterfall-axis" });
    const wfHeader = h("div", { id: "waterfall-header" }, h("div", { class: "span-label" }, "Span"), axis);
    const spacer = h("div", { class: "waterfall-spacer" });
    const rowsLayer = h("div", { class: "waterfall-rows" });
    const waterfall = h("div", { id: "waterfall", role: "treegrid", "aria-rowcount": String(data.span_count) }, spacer, rowsLayer);

    // flame chart
    const flame = h("canvas", { id: "flamechart" });
    const flameSpacer = h("div", { class: "flame-spacer" });
    const flameWrap = h("div", { id: "flame-wrap" }, flame, flameSpacer);

    const details = h("aside", { id: "span-details" }, h("p", { class: "muted" }, "Select a span."));
    view.replaceChildren(
      header,
      mmWrap,
      h(
        "div",
        { id: "trace-body" },
        h("section", { id: "trace-charts" }, wfHeader, waterfall, h("h2", {}, "Flame chart"), flameWrap),
        details,
      ),
    );

    // -- drawing
    // What the next frame redraws: "scroll" (the waterfall scrolled: its rows that came into view), "rows" (every
    // row of the waterfall), "charts" (flame chart, axis, minimap window) or "all". Scrolling or collapsing the
    // waterfall leaves the flame chart as it is (redrawing it took 15-20 ms a frame of a 10,000-span trace).
    const stale = { rows: false, rebuild: false, charts: false };
    function scheduleRender(parts = "all") {
      if (parts !== "charts") stale.rows = true;
      if (parts === "rows" || parts === "all") stale.rebuild = true;
      if (parts === "charts" || parts === "all") stale.charts = true;
      if (scheduleRender.pending) return;
      scheduleRender.pending = true;
      requestAnimationFrame(() => {
        scheduleRender.pending = false;
        if (!current(token)) return;
        const { rows, rebuild, charts } = stale;
        stale.rows = stale.rebuild = stale.charts = false;
        if (rows) renderRows(rebuild);
        if (charts) {
          renderFlame();
          renderAxis();
          renderMinimapWindow();
        }
      });
    }
    trace.render = scheduleRender;

    function xPercent(ns) {
      return (100 * (ns - trace.t0)) / (trace.t1 - trace.t0);
    }

    function renderAxis() {
      const ticks = [];
      for (let k = 0; k <= 4; k++) {
        const t = trace.t0 + ((trace.t1 - trace.t0) * k) / 4;
        ticks.push(h("span", { class: "tick", style: { left: `${k * 25}%` } }, fmtDuration(t)));
      }
      axis.replaceChildren(...ticks);
    }

    // Only the rows in view (and OVERSCAN around them) are in the page, in order. A scroll keeps the rows that
    // stay in view and adds those that come in; anything that changes rows (selection, collapse, zoom) rebuilds.
    let shown = new Map(); // position in trace.visible -> its row element
    function renderRows(rebuild = true) {
      spacer.style.height = `${trace.visible.length * ROW_H}px`;
      const top = waterfall.scrollTop;
      const first = Math.max(0, Math.floor(top / ROW_H) - OVERSCAN);
      const last = Math.min(trace.visible.length, Math.ceil((top + waterfall.clientHeight) / ROW_H) + OVERSCAN);
      if (rebuild) {
        shown = new Map();
        rowsLayer.replaceChildren();
      }
      for (const [position, row] of shown) {
        if (position < first || position >= last) {
          row.remove();
          shown.delete(position);
        }
      }
      const before = document.createDocumentFragment();
      const after = document.createDocumentFragment();
      const kept = shown.size ? Math.min(...shown.keys()) : last;
      for (let v = first; v < last; v++) {
        if (shown.has(v)) continue;
        const row = spanRow(trace.visible[v], v);
        shown.set(v, row);
        (v < kept ? before : after).append(row);
      }
      rowsLayer.prepend(before);
      rowsLayer.append(after);
    }

    function spanRow(index, position) {
      const sp = trace.spans[index];
      const classes = ["span-row"];
      if (sp.status_code === "error") classes.push("error");
      if (sp.critical) classes.push("critical");
      if (index === trace.selected) classes.push("selected");
      const collapsed = trace.collapsed.has(index);
      if (collapsed) classes.push("collapsed");
      const indent = Math.min(sp.depth, MAX_INDENT);
      const toggle = sp.descendants
        ? h(
            "button",
            {
              class: "toggle",
              "aria-expanded": collapsed ? "false" : "true",
              title: collapsed ? `show ${sp.descendants} hidden spans` : "collapse",
              onclick: (event) => {
                event.stopPropagation();
                const next = new Set(trace.collapsed);
                if (collapsed) next.delete(index);
                else next.add(index);
                setCollapsed(next);
              },
            },
            collapsed ? "▸" : "▾",
          )
        : h("span", { class: "toggle-spacer" });
      const left = Math.max(0, Math.min(100, xPercent(sp.offset_ns)));
      const right = Math.max(0, Math.min(100, xPercent(sp.offset_ns + sp.duration_ns)));
      const bar = h("div", {
        class: "span-bar",
        style: { left: `${left}%`, width: `max(2px, ${right - left}%)`, background: sp.status_code === "error" ? "" : colorOf(sp.service) },
      });
      // the duration goes after the bar, or before it near the right edge, or inside the end of a wide bar
      let place = { left: `${right + 0.5}%` };
      let inside = false;
      if (right > 80) {
        inside = right - left > 20;
        place = inside ? { right: `${100 - right + 0.5}%` } : { right: `${100 - left + 0.5}%` };
      }
      const label = h("span", { class: `span-duration${inside ? " inside" : ""}`, style: place }, fmtDuration(sp.duration_ns));
      return h(
        "div",
        {
          class: classes.join(" "),
          role: "row",
          "aria-level": String(sp.depth + 1),
          dataset: { spanId: sp.span_id, index: String(index) },
          style: { top: `${position * ROW_H}px` },
          onclick: () => select(index),
        },
        h(
          "div",
          { class: "span-label", style: { paddingLeft: `${indent * 12 + 4}px` }, title: `${sp.service}: ${sp.name}` },
          sp.depth > MAX_INDENT ? h("span", { class: "depth" }, `${sp.depth}`) : null,
          toggle,
          h("span", { class: "svc-chip", style: { background: colorOf(sp.service) } }),
          h("span", { class: "svc-name" }, sp.service),
          h("span", { class: "span-name" }, sp.name),
          sp.descendants && collapsed ? h("span", { class: "hidden-count" }, `+${sp.descendants}`) : null,
        ),
        h("div", { class: "span-timeline" }, bar, label),
      );
    }

    function setCollapsed(next) {
      trace.collapsed = next;
      computeVisible();
      scheduleRender("rows"); // the flame chart shows every span, collapsed or not
    }

    // flame chart: canvas sized to its viewport; the spacer gives the scroll height
    function renderFlame() {
      const levels = trace.byDepth.length;
      const total = levels * FLAME_ROW;
      flameWrap.style.height = `${Math.min(320, total + 2)}px`;
      const ratio = window.devicePixelRatio || 1;
      const width = flameWrap.clientWidth;
      const height = Math.min(flameWrap.clientHeight, total);
      flameSpacer.style.height = `${Math.max(0, total - height)}px`;
      if (flame.width !== Math.round(width * ratio) || flame.height !== Math.round(height * ratio)) {
        flame.width = Math.round(width * ratio);
        flame.height = Math.round(height * ratio);
        flame.style.width = `${width}px`;
        flame.style.height = `${height}px`;
      }
      const ctx = flame.getContext("2d");
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, width, height);
      ctx.font = "11px system-ui, sans-serif";
      ctx.textBaseline = "middle";
      const top = flameWrap.scrollTop;
      const firstLevel = Math.floor(top / FLAME_ROW);
      const lastLevel = Math.min(levels, Math.ceil((top + height) / FLAME_ROW));
      const scale = width / (trace.t1 - trace.t0);
      const selected = trace.selected >= 0 ? trace.spans[trace.selected] : null;
      for (let d = firstLevel; d < lastLevel; d++) {
        const level = trace.byDepth[d] || [];
        const y = d * FLAME_ROW - top;
        let lastPixel = -1;
        for (const i of level) {
          const sp = trace.spans[i];
          const x0 = (sp.offset_ns - trace.t0) * scale;
          const x1 = (sp.offset_ns + sp.duration_ns - trace.t0) * scale;
          if (x1 < 0 || x0 > width) continue;
          const w = Math.max(1, x1 - x0);
          if (w < 2 && Math.floor(x0) === lastPixel) continue; // many tiny spans on one pixel: draw it once
          lastPixel = Math.floor(x0);
          ctx.fillStyle = sp.status_code === "error" ? "#dc2626" : colorOf(sp.service);
          ctx.fillRect(x0, y + 1, w, FLAME_ROW - 2);
          if (sp.critical) {
            ctx.fillStyle = "#f59e0b";
            ctx.fillRect(x0, y + FLAME_ROW - 4, w, 3);
          }
          if (w > 30) {
            const visibleX = Math.max(x0, 0);
            const room = Math.min(x1, width) - visibleX - 6;
            const chars = Math.floor(room / 6.2);
            if (chars > 2) {
              const text = sp.name.length > chars ? `${sp.name.slice(0, chars - 1)}…` : sp.name;
              ctx.fillStyle = "#0b1020";
              ctx.fillText(text, visibleX + 3, y + FLAME_ROW / 2);
            }
          }
        }
      }
      if (selected) {
        const x0 = (selected.offset_ns - trace.t0) * scale;
        const x1 = (selected.offset_ns + selected.duration_ns - trace.t0) * scale;
        const y = selected.depth * FLAME_ROW - top;
        ctx.strokeStyle = "#111827";
        ctx.lineWidth = 2;
        ctx.strokeRect(x0, y + 1, Math.max(2, x1 - x0), FLAME_ROW - 2);
      }
    }

    function flameSpanAt(x, y) {
      const width = flameWrap.clientWidth;
      const depth = Math.floor((y + flameWrap.scrollTop) / FLAME_ROW);
      const level = trace.byDepth[depth];
      if (!level) return -1;
      const t = trace.t0 + (x / width) * (trace.t1 - trace.t0);
      const slack = (2 / width) * (trace.t1 - trace.t0); // a span thinner than a pixel is still hit
      let best = -1;
      for (const i of level) {
        const sp = trace.spans[i];
        if (sp.offset_ns > t + slack) break;
        if (sp.offset_ns + sp.duration_ns >= t - slack) best = i;
      }
      return best;
    }
    trace.flameSpanAt = flameSpanAt;

    flame.addEventListener("mousemove", (event) => {
      const rect = flame.getBoundingClientRect();
      const index = flameSpanAt(event.clientX - rect.left, event.clientY - rect.top);
      if (index < 0) {
        hideTooltip();
        flame.style.cursor = "default";
        return;
      }
      const sp = trace.spans[index];
      flame.style.cursor = "pointer";
      showTooltip(event.clientX, event.clientY, [sp.name, `${sp.service} · ${fmtDuration(sp.duration_ns)}`, sp.status_code === "error" ? "error" : ""]);
    });
    flame.addEventListener("mouseleave", hideTooltip);
    flame.addEventListener("click", (event) => {
      const rect = flame.getBoundingClientRect();
      const index = flameSpanAt(event.clientX - rect.left, event.clientY - rect.top);
      if (index >= 0) select(index);
    });
    flameWrap.addEventListener("scroll", () => scheduleRender("charts"), { passive: true });
    waterfall.addEventListener("scroll", () => scheduleRender("scroll"), { passive: true });

    // minimap: every span as a thin line (rows top to bottom, time left to right); drag to choose the window
    function renderMinimap() {
      const ratio = window.devicePixelRatio || 1;
      const width = mmWrap.clientWidth;
      const height = 56;
      minimap.width = Math.round(width * ratio);
      minimap.height = Math.round(height * ratio);
      minimap.style.width = `${width}px`;
      minimap.style.height = `${height}px`;
      const ctx = minimap.getContext("2d");
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, width, height);
      const n = trace.spans.length;
      const rowH = Math.max(height / n, 0.5);
      const scale = width / Math.max(1, data.duration_ns);
      for (const pass of ["normal", "critical"]) {
        trace.spans.forEach((sp, i) => {
          if ((pass === "critical") !== Boolean(sp.critical || sp.status_code === "error")) return;
          ctx.fillStyle = sp.status_code === "error" ? "#dc2626" : sp.critical ? "#f59e0b" : colorOf(sp.service);
          ctx.fillRect(sp.offset_ns * scale, (i / n) * height, Math.max(1, sp.duration_ns * scale), Math.max(1, rowH));
        });
      }
    }

    function renderMinimapWindow() {
      const total = Math.max(1, data.duration_ns);
      mmWindow.style.left = `${(100 * trace.t0) / total}%`;
      mmWindow.style.width = `${(100 * (trace.t1 - trace.t0)) / total}%`;
    }

    function setWindow(t0, t1) {
      const total = Math.max(1, data.duration_ns);
      trace.t0 = Math.max(0, Math.min(t0, t1));
      trace.t1 = Math.min(total, Math.max(t0, t1));
      if (trace.t1 - trace.t0 < 1) trace.t1 = trace.t0 + 1;
      scheduleRender();
    }

    let dragStart = null;
    mmWrap.addEventListener("mousedown", (event) => {
      const rect = mmWrap.getBoundingClientRect();
      dragStart = (event.clientX - rect.left) / rect.width;
      event.preventDefault();
    });
    const onMove = (event) => {
      if (dragStart === null) return;
      const rect = mmWrap.getBoundingClientRect();
      const at = Math.max(0, Math.min(1, (event.clientX - rect.left) / rect.width));
      if (Math.abs(at - dragStart) * rect.width < 3) return;
      const total = Math.max(1, data.duration_ns);
      setWindow(Math.min(dragStart, at) * total, Math.max(dragStart, at) * total);
    };
    const onUp = () => {
      dragStart = null;
    };
    window.addEventListener("mousemove", onMove);
    window.addEventListener("mouseup", onUp);
    const onResize = () => {
      renderMinimap();
      scheduleRender();
    };
    window.addEventListener("resize", onResize);
    onLeave(() => {
      window.removeEventListener("mousemove", onMove);
      window.removeEventListener("mouseup", onUp);
      window.removeEventListener("resize", onResize);
      trace.render = null;
    });
    mmWrap.addEventListener("dblclick", () => setWindow(0, Math.max(1, data.duration_ns)));

    // keyboard: up/down move the selection, left/right collapse/expand
    waterfall.tabIndex = 0;
    waterfall.addEventListener("keydown", (event) => {
      if (trace.selected < 0) return;
      const position = trace.visible.indexOf(trace.selected);
      if (event.key === "ArrowDown" && position + 1 < trace.visible.length) select(trace.visible[position + 1]);
      else if (event.key === "ArrowUp" && position > 0) select(trace.visible[position - 1]);
      else if (event.key === "ArrowLeft" && trace.spans[trace.selected].descendants) {
        setCollapsed(new Set(trace.collapsed).add(trace.selected));
      } else if (event.key === "ArrowRight") {
        const next = new Set(trace.collapsed);
        next.delete(trace.selected);
        setCollapsed(next);
      } else return;
      event.preventDefault();
    });

    function select(index) {
      trace.selected = index;
      // open the ancestors so the row is visible
      let changed = false;
      for (let p = trace.parent[index]; p >= 0; p = trace.parent[p]) {
        if (trace.collapsed.delete(p)) changed = true;
      }
      if (changed) computeVisible();
      const position = trace.visible.indexOf(index);
      const top = position * ROW_H;
      if (top < waterfall.scrollTop || top + ROW_H > waterfall.scrollTop + waterfall.clientHeight) {
        waterfall.scrollTop = Math.max(0, top - waterfall.clientHeight / 3);
      }
      const sp = trace.spans[index];
      const flameTop = sp.depth * FLAME_ROW;
      if (flameTop < flameWrap.scrollTop || flameTop + FLAME_ROW > flameWrap.scrollTop + flameWrap.clientHeight) {
        flameWrap.scrollTop = Math.max(0, flameTop - flameWrap.clientHeight / 3);
      }
      renderDetails(details, sp);
      history.replaceState(null, "", `#/traces/${trace.id}?span=${sp.span_id}`);
      scheduleRender();
    }
    trace.select = select;

    renderMinimap();
    renderRows();
    renderAxis();
    renderMinimapWindow();
    renderFlame();
    const wanted = params.get("span");
    if (wanted && trace.byId.has(wanted)) select(trace.byId.get(wanted));
  }

  function selectSpanById(spanId) {
    if (trace.byId.has(spanId) && trace.select) trace.select(trace.byId.get(spanId));
  }

  function renderDetails(panel, sp) {
    const start = trace.data.start_ns;
    const attrs = Object.entries(sp.attributes || {});
    const resource = Object.entries(sp.resource || {});
    const parentIndex = sp.parent_span_id ? trace.byId.get(sp.parent_span_id) : undefined;
    panel.replaceChildren(
      ...[
      h("h2", {}, sp.name),
      h(
        "dl",
        { class: "facts" },
        h("dt", {}, "Service"),
        h("dd", {}, h("span", { class: "svc-chip", style: { background: colorOf(sp.service) } }), ` ${sp.service}`),
        h("dt", {}, "Kind"),
        h("dd", {}, sp.kind),
        h("dt", {}, "Status"),
        h(
          "dd",
          {},
          h("span", { class: `badge status-${sp.status_code}` }, sp.status_code),
          sp.status_message ? h("div", { class: "error-text" }, sp.status_message) : null,
        ),
        h("dt", {}, "Start"),
        h("dd", {}, `+${fmtDuration(sp.offset_ns)}`),
        h("dt", {}, "Duration"),
        h("dd", {}, fmtDuration(sp.duration_ns), sp.critical ? h("span", { class: "badge critical-badge" }, "critical path") : null),
        h("dt", {}, "Span id"),
        h("dd", { class: "mono" }, sp.span_id),
        h("dt", {}, "Parent"),
        h(
          "dd",
          { class: "mono" },
          sp.parent_span_id
            ? parentIndex !== undefined
              ? h("a", { href: `#/traces/${trace.id}?span=${sp.parent_span_id}`, class: "parent-link" }, sp.parent_span_id)
              : `${sp.parent_span_id} (not in the trace)`
            : "– (root)",
        ),
        sp.scope ? [h("dt", {}, "Scope"), h("dd", {}, sp.scope)] : null,
      ),
      h("h3", {}, `Attributes (${attrs.length})`),
      attrs.length
        ? h(
            "table",
            { class: "attr-table" },
            h(
              "tbody",
              {},
              attrs.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", { class: "mono" }, valueText(v)))),
            ),
          )
        : h("p", { class: "muted" }, "none"),
      h("h3", {}, `Events (${sp.events.length})`),
      sp.events.length
        ? h(
            "ul",
            { class: "events" },
            sp.events.map((e) =>
              h(
                "li",
                { class: e.name === "exception" ? "error-text" : "" },
                h("span", { class: "muted" }, `+${fmtDuration(e.time_ns - start)} `),
                h("strong", {}, e.name),
                Object.entries(e.attributes || {}).map(([k, v]) => h("div", { class: "event-attr" }, h("span", { class: "muted" }, `${k}: `), h("pre", {}, valueText(v)))),
              ),
            ),
          )
        : h("p", { class: "muted" }, "none"),
      h("h3", {}, `Links (${sp.links.length})`),
      sp.links.length
        ? h(
            "ul",
            { class: "links" },
            sp.links.map((link) =>
              h(
                "li",
                {},
                h(
                  "a",
                  { class: "span-link", href: `#/traces/${link.trace_id}?span=${link.span_id}`, dataset: { traceId: link.trace_id, spanId: link.span_id } },
                  link.trace_id === trace.id ? `span ${link.span_id} (this trace)` : `trace ${shortId(link.trace_id)} span ${link.span_id}`,
                ),
                Object.entries(link.attributes || {}).map(([k, v]) => h("div", { class: "muted" }, `${k}: ${valueText(v)}`)),
              ),
            ),
          )
        : h("p", { class: "muted" }, "none"),
      resource.length
        ? h(
            "details",
            {},
            h("summary", {}, `Resource (${resource.length})`),
            h("table", { class: "attr-table" }, h("tbody", {}, resource.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", { class: "mono" }, valueText(v)))))),
          )
        : null,
      h("p", {}, h("a", { href: `#/logs?trace_id=${trace.id}` }, "logs of this trace")),
      ].filter(Boolean),
    );
  }

  // -- topology --------------------------------------------------------------------------------------------------

  // The windows the service map can count over (seconds; "" is everything the store holds, without rates).
  const TOPOLOGY_WINDOWS = [
    ["60", "last minute"],
    ["300", "last 5 minutes"],
    ["900", "last 15 minutes"],
    ["3600", "last hour"],
    ["", "all stored traces"],
  ];

  function fmtRate(perSecond) {
    if (perSecond === null || perSecond === undefined) return "–";
    if (perSecond === 0) return "0/s";
    if (perSecond >= 10) return `${Math.round(perSecond)}/s`;
    if (perSecond >= 0.01) return `${Number(perSecond.toPrecision(2))}/s`;
    return `${Number((perSecond * 60).toPrecision(2))}/min`;
  }

  function fmtPercent(percent) {
    if (percent === null || percent === undefined) return "–";
    return percent >= 10 || percent === 0 ? `${Math.round(percent)}%` : `${Number(percent.toPrecision(2))}%`;
  }

  function topologyPage(view, token, parts, params) {
    const graph = s("svg", { id: "topology", role: "img", "aria-label": "service map" });
    const problem = h("div");
    const chosen = params.get("window") ?? "300";
    const windowSelect = h(
      "select",
      { id: "topology-window", "aria-label": "time window" },
      TOPOLOGY_WINDOWS.map(([value, label]) => h("option", { value, selected: value === chosen }, label)),
    );
    windowSelect.addEventListener("change", () => {
      history.replaceState(null, "", `#/topology${query({ window: windowSelect.value || "all" })}`);
      load();
    });
    if (!TOPOLOGY_WINDOWS.some(([value]) => value === chosen)) windowSelect.value = "";
    view.append(
      h("h1", {}, "Topology"),
      h(
        "div",
        { class: "legend" },
        h("span", { class: "legend-sync" }, "synchronous call"),
        h("span", { class: "legend-async" }, "asynchronous message"),
        windowSelect,
        h("span", { class: "muted", id: "topology-note" }),
      ),
      problem,
      h("div", { id: "topology-wrap" }, graph),
    );

    function layout(nodes, edges) {
      const names = nodes.map((n) => n.name);
      const out = new Map(names.map((n) => [n, []]));
      for (const e of edges) if (e.source !== e.target) out.get(e.source)?.push(e.target);
      // layers: longest path from a source, ignoring the edges that close a cycle
      const layer = new Map();
      const state = new Map();
      function visit(start) {
        const stack = [[start, 0]];
        state.set(start, "open");
        layer.set(start, layer.get(start) ?? 0);
        while (stack.length) {
          const top = stack[stack.length - 1];
          const [name, next] = top;
          const targets = out.get(name) || [];
          if (next >= targets.length) {
            state.set(name, "done");
            stack.pop();
            continue;
          }
          top[1] += 1;
          const target = targets[next];
          if (state.get(target) === "open") continue; // a cycle
          const depth = layer.get(name) + 1;
          if ((layer.get(target) ?? -1) < depth) {
            layer.set(target, depth);
            state.set(target, "open");
            stack.push([target, 0]);
          }
        }
      }
      const incoming = new Set(edges.map((e) => e.target));
      for (const n of names) if (!incoming.has(n)) visit(n);
      for (const n of names) if (!layer.has(n)) visit(n);
      const columns = [];
      for (const n of names) (columns[layer.get(n)] ||= []).push(n);
      const pos = new Map();
      columns.forEach((column, x) => (column || []).forEach((n, y) => pos.set(n, { x: 40 + x * 240, y: 50 + y * 110 })));
      return { pos, width: 40 + columns.length * 240, height: 60 + Math.max(1, ...columns.map((c) => (c || []).length)) * 110 };
    }

    function render(data) {
      const { pos, width, height } = layout(data.nodes, data.edges);
      graph.setAttribute("viewBox", `0 0 ${Math.max(width, 400)} ${Math.max(height, 200)}`);
      graph.setAttribute("width", String(Math.max(width, 400)));
      graph.setAttribute("height", String(Math.max(height, 200)));
      const defs = s(
        "defs",
        {},
        s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" }, s("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow-head" })),
      );
      const edgeLayer = s("g", { class: "edges" });
      const seen = new Map();
      for (const e of data.edges) {
        const a = pos.get(e.source);
        const b = pos.get(e.target);
        if (!a || !b) continue;
        const key = `${e.source}>${e.target}`;
        const bend = (seen.get(key) || 0) * 18;
        seen.set(key, (seen.get(key) || 0) + 1);
        let d;
        let lx;
        let ly;
        if (e.source === e.target) {
          d = `M${a.x + 60},${a.y} C${a.x + 60},${a.y - 50} ${a.x + 120},${a.y - 50} ${a.x + 120},${a.y}`;
          lx = a.x + 90;
          ly = a.y - 40;
        } else if (b.x > a.x) {
          const x1 = a.x + 160;
          const y1 = a.y + 22 + bend;
          const x2 = b.x;
          const y2 = b.y + 22 + bend;
          d = `M${x1},${y1} C${x1 + 50},${y1} ${x2 - 50},${y2} ${x2},${y2}`;
          lx = (x1 + x2) / 2;
          ly = (y1 + y2) / 2 - 6;
        } else {
          // backwards (a cycle) or within a column: a curve under both boxes, labelled at its lowest point
          const x1 = a.x + 70;
          const y1 = a.y + 44;
          const x2 = b.x + 90;
          const y2 = b.y + 44;
          const dip = Math.max(y1, y2) + 34 + bend;
          d = `M${x1},${y1} C${x1},${dip} ${x2},${dip} ${x2},${y2}`;
          lx = (x1 + x2) / 2;
          ly = dip - 4;
        }
        const failing = (e.error_rate ?? 0) >= 5;
        const cls = `edge ${e.kind}${failing ? " has-errors" : ""}`;
        const path = s("path", {
          d,
          class: cls,
          "marker-end": "url(#arrow)",
          "stroke-dasharray": e.kind === "async" ? "7 5" : null,
          dataset: { source: e.source, target: e.target, kind: e.kind },
        });
        const rate = e.calls_per_s === null || e.calls_per_s === undefined ? `${e.calls}` : fmtRate(e.calls_per_s);
        const label = `${rate}${e.errors ? ` · ${fmtPercent(e.error_rate)} err` : ""}`;
        path.append(
          s(
            "title",
            {},
            `${e.source} → ${e.target} (${e.kind}): ${e.calls} calls (${fmtRate(e.calls_per_s)}), ${e.errors} errors (${fmtPercent(e.error_rate)})${e.estimated ? " (split estimated)" : ""}`,
          ),
        );
        edgeLayer.append(
          path,
          s(
            "text",
            { x: String(lx), y: String(ly), class: `edge-label${e.errors ? " error" : ""}`, "text-anchor": "middle", dataset: { source: e.source, target: e.target } },
            label,
          ),
        );
      }
      const nodeLayer = s("g", { class: "nodes" });
      for (const n of data.nodes) {
        const p = pos.get(n.name);
        const health = n.instances === undefined ? "" : n.healthy === n.instances && n.instances ? " healthy" : n.healthy ? " degraded" : " down";
        const inbound = n.calls_in_per_s === null || n.calls_in_per_s === undefined ? `${n.calls_in} in` : `${fmtRate(n.calls_in_per_s)} in`;
        const sub = n.instances === undefined ? inbound : `${n.healthy}/${n.instances} up · ${inbound}`;
        const node = s(
          "g",
          { class: `node${health}${n.errors_in ? " has-errors" : ""}`, transform: `translate(${p.x},${p.y})`, dataset: { service: n.name } },
          s("rect", { width: "160", height: "44", rx: "8", ry: "8" }),
          s("rect", { width: "6", height: "44", rx: "3", class: "node-color", fill: colorOf(n.name) }),
          s("text", { x: "14", y: "19", class: "node-name" }, n.name.length > 20 ? `${n.name.slice(0, 19)}…` : n.name),
          s("text", { x: "14", y: "35", class: "node-sub" }, sub),
        );
        node.append(
          s(
            "title",
            {},
            `${n.name}: ${n.calls_in} calls in (${fmtRate(n.calls_in_per_s)}, ${fmtPercent(n.error_rate_in)} errors), ${n.calls_out} calls out (${fmtRate(n.calls_out_per_s)})`,
          ),
        );
        node.addEventListener("click", () => {
          location.hash = `#/traces${query({ service: n.name })}`;
        });
        nodeLayer.append(node);
      }
      graph.replaceChildren(defs, edgeLayer, nodeLayer);
      const windowName = TOPOLOGY_WINDOWS.find(([value]) => Number(value) === data.window_s)?.[1] ?? `last ${fmtSeconds(data.window_s)}`;
      const over = data.window_s ? `rates over the ${windowName}` : "call counts of all stored traces";
      $("#topology-note").textContent = data.nodes.length
        ? `${data.nodes.length} services, ${data.edges.length} edges; ${over} (kinds read from ${data.sampled_traces} recent traces)`
        : "No traces in this window: the map is drawn from the spans services send.";
    }

    const load = poll(token, problem, () => `topology${query({ since_s: windowSelect.value })}`, render, 10000);
  }

  // -- resilience ------------------------------------------------------------------------------------------------

  function resiliencePage(view, token) {
    const header = (titles) => h("thead", {}, h("tr", {}, titles.map((title) => h("th", {}, title))));
    const body = h("tbody");
    const table = h(
      "table",
      { id: "resilience-table", class: "grid" },
      header(["Breaker", "Kind", "Where", "Instance", "State", "Failure rate", "Calls", "Failed", "Rejected", "Last change"]),
      body,
    );
    const transitions = h("ul", { id: "transitions" });
    const refusedBody = h("tbody");
    const refused = h(
      "table",
      { id: "rejections-table", class: "grid" },
      header(["Policy", "Kind", "Where", "Refused", "Last refused", "Now"]),
      refusedBody,
    );
    const unreachable = h("ul", { id: "resilience-errors" });
    const problem = h("div");
    view.append(
      h("h1", {}, "Resilience"),
      problem,
      unreachable,
      h("h2", {}, "Circuit breakers"),
      table,
      h("h2", {}, "Recent transitions"),
      transitions,
      h("h2", {}, "Rejections (bulkheads, rate limits)"),
      refused,
    );

    const pick = (row, ...keys) => {
      for (const key of keys) if (row[key] !== undefined && row[key] !== null) return row[key];
      return null;
    };
    // where a policy lives: "gateway" (and its route), or a service and its instance
    const whereOf = (row) => {
      const service = String(pick(row, "service") ?? "");
      const instance = row.instance ? ` (${row.instance})` : "";
      const route = row.route ? ` route ${row.route}` : "";
      return service ? `${service}${instance}${route}` : route.trim() || "–";
    };
    const breakerName = (b) => {
      const name = String(pick(b, "name", "route", "client") ?? "?");
      return b.downstream && b.downstream !== name ? `${name} → ${b.downstream}` : name;
    };
    const cell = (value) => h("td", { class: "num" }, value === null || value === undefined ? "–" : String(value));
    // the instance of the downstream a per-instance client breaker guards (none for the others)
    const targetOf = (b) => {
      if (!b.downstream_instance) return "";
      return b.downstream_address ? `${b.downstream_instance} (${b.downstream_address})` : String(b.downstream_instance);
    };

    function renderBreakers(breakers) {
      const rows = breakers.map((b) => {
        const name = breakerName(b);
        const state = String(pick(b, "state") ?? "unknown").toLowerCase().replace(/[^a-z_]/g, "_");
        const rate = pick(b, "failure_rate");
        const last = (b.transitions || []).at(-1);
        return h(
          "tr",
          {
            class: "breaker-row",
            dataset: { name, state, kind: String(pick(b, "kind") ?? ""), service: String(pick(b, "service") ?? ""), instance: String(b.downstream_instance ?? "") },
          },
          h("td", {}, h("strong", {}, name)),
          h("td", {}, String(pick(b, "kind") ?? (b.route ? "route" : b.client ? "client" : "–"))),
          h("td", {}, whereOf(b)),
          h("td", { class: "instance" }, targetOf(b) || "–"),
          h("td", {}, h("span", { class: `badge state-${state}` }, state.replace("_", "-"))),
          h("td", { class: "num" }, rate === null || rate < 0 ? "–" : `${Number(rate).toFixed(1)}%`),
          cell(pick(b, "calls")),
          cell(pick(b, "failed", "failed_calls")),
          cell(pick(b, "not_permitted", "rejections", "rejected")),
          h("td", { class: "muted" }, last ? `${fmtTime(last.time)} → ${last.to}` : "–"),
        );
      });
      if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 10, class: "muted" }, "No circuit breakers.")));
      body.replaceChildren(...rows);
      const events = [];
      for (const b of breakers) {
        const name = b.downstream_instance ? `${breakerName(b)} @ ${targetOf(b)}` : breakerName(b);
        for (const t of b.transitions || []) events.push({ name, where: whereOf(b), ...t });
      }
      events.sort((a, b) => (b.time || 0) - (a.time || 0));
      transitions.replaceChildren(
        ...events.slice(0, 100).map((t) =>
          h(
            "li",
            { class: `transition to-${String(t.to ?? "").replace(/[^a-z_]/g, "_")}` },
            h("span", { class: "muted" }, `${fmtTime(t.time)} `),
            h("strong", {}, t.name),
            h("span", { class: "muted" }, ` at ${t.where}: `),
            `${t.from ?? "?"} → ${t.to ?? "?"}`,
            typeof t.failure_rate === "number" ? h("span", { class: "muted" }, ` (failure rate ${t.failure_rate.toFixed(1)}%)`) : null,
          ),
        ),
      );
      if (!events.length) transitions.append(h("li", { class: "muted" }, "none"));
    }

    function renderRejections(rejections) {
      const rows = rejections.map((r) => {
        const kind = String(pick(r, "kind") ?? "");
        const policy = String(pick(r, "policy") ?? "?");
        const name = r.client && !policy.startsWith(`${r.client} `) ? `${policy} (${r.client})` : policy;
        let now = "–";
        if (r.limit !== undefined && r.limit !== null) now = `${r.in_flight ?? 0}/${r.limit} in flight${r.waiting ? `, ${r.waiting} waiting` : ""}`;
        else if (r.allowed !== undefined && r.allowed !== null) now = `${r.allowed} allowed`;
        return h(
          "tr",
          { class: `rejection-row${r.count ? " has-rejections" : ""}`, dataset: { kind, service: String(pick(r, "service") ?? ""), policy: String(pick(r, "policy") ?? "") } },
          h("td", {}, h("strong", {}, name)),
          h("td", {}, kind.replace("_", " ")),
          h("td", {}, r.route === null && r.service === "gateway" ? "gateway (every route)" : whereOf(r)),
          cell(pick(r, "count")),
          h("td", { class: "muted" }, r.last ? fmtTime(r.last) : "–"),
          h("td", { class: "muted" }, now),
        );
      });
      if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No bulkheads or rate limits.")));
      refusedBody.replaceChildren(...rows);
    }

    function render(data) {
      if (!data.available) {
        body.replaceChildren(h("tr", {}, h("td", { colspan: 10, class: "muted" }, "The runner gave the dashboard no resilience source.")));
        transitions.replaceChildren();
        refusedBody.replaceChildren();
        unreachable.replaceChildren();
        return;
      }
      renderBreakers(data.breakers || []);
      renderRejections(data.rejections || []);
      unreachable.replaceChildren(
        ...(data.errors || []).map((e) =>
          h("li", { class: "error-box" }, `${e.service} ${e.instance ?? ""} at ${e.address ?? "?"} did not report: ${e.error}`),
        ),
      );
    }

    poll(token, problem, () => "resilience", render, 2000);
  }

  // -- messaging -------------------------------------------------------------------------------------------------

  function auditTable() {
    const body = h("tbody");
    const table = h(
      "table",
      { id: "audit-list", class: "grid" },
      h("thead", {}, h("tr", {}, ["Time", "Action", "Topic", "Settled", "By", "Error"].map((t) => h("th", {}, t)))),
      body,
    );
    async function load() {
      const data = await api("audit");
      body.replaceChildren(
        ...data.entries.map((e) =>
          h(
            "tr",
            { class: `audit-row${e.error ? " has-error" : ""}` },
            h("td", { class: "nowrap" }, fmtTime(e.time)),
            h("td", {}, e.action),
            h("td", {}, e.topic),
            // no ids: every dead letter of the topic was asked for (meshkit dlq without --id)
            h("td", { class: "num", title: e.ids.length ? e.ids.join(", ") : "every dead letter" }, `${e.count}/${e.requested || "all"}`),
            h("td", { class: "muted" }, e.client || "–"),
            h("td", { class: "error-text" }, e.error || ""),
          ),
        ),
      );
      if (!data.entries.length) body.append(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "Nothing replayed or discarded yet.")));
    }
    return { table, load };
  }

  // How far a consumer group is behind: waiting + in flight when the broker tells both (see docs/dashboard.md).
  function lagBadge(g) {
    if (!g.lag) return h("span", { class: "lag muted", title: g.lag_error || "" }, " · lag –");
    const n = g.lag.total ?? g.lag.waiting;
    const parts = [g.lag.waiting !== null ? `${g.lag.waiting} waiting` : null, g.lag.in_flight !== null ? `${g.lag.in_flight} in flight` : null];
    return h("span", { class: `lag${n ? " behind" : ""}`, title: parts.filter(Boolean).join(", ") }, ` · lag ${n ?? "?"}`);
  }

  function messagingPage(view, token, rest) {
    if (rest[0]) {
      dlqPage(view, token, rest[0]);
      return;
    }
    const body = h("tbody");
    const table = h(
      "table",
      { id: "messaging-table", class: "grid" },
      h("thead", {}, h("tr", {}, ["Topic", "Consumer groups (lag)", "Dead letters"].map((t) => h("th", {}, t)))),
      body,
    );
    const audit = auditTable();
    const problem = h("div");
    view.append(h("h1", {}, "Messaging"), problem, table, h("h2", {}, "Audit"), audit.table);

    async function load() {
      try {
        const data = await api("messaging");
        if (!current(token)) return;
        problem.replaceChildren(data.broker ? "" : h("p", { class: "muted" }, "The runner gave the dashboard no broker: dead letters are not shown."));
        body.replaceChildren(
          ...data.topics.map((t) =>
            h(
              "tr",
              { class: "topic-row", dataset: { topic: t.topic } },
              h("td", {}, h("strong", {}, t.topic)),
              h("td", {}, t.groups.map((g) => h("div", { class: "group-row" }, g.group, h("span", { class: "muted" }, ` (${g.service})`), lagBadge(g)))),
              h(
                "td",
                {},
                t.dlq_error
                  ? h("span", { class: "error-text" }, t.dlq_error)
                  : t.dlq === null
                    ? "–"
                    : h("a", { class: `dlq-link${t.dlq ? " has-dead" : ""}`, href: `#/messaging/${enc(t.topic)}` }, `${t.dlq}${t.dlq_truncated ? "+" : ""}`),
              ),
            ),
          ),
        );
        if (!data.topics.length) body.append(h("tr", {}, h("td", { colspan: 3, class: "muted" }, "No service subscribes to a topic.")));
        await audit.load();
      } catch (exc) {
        if (current(token)) problem.replaceChildren(errorBox(exc));
      }
    }
    load();
    every(5000, load);
  }

  function dlqPage(view, token, topic) {
    const chosen = new Set();
    const body = h("tbody");
    const all = h("input", { type: "checkbox", id: "dlq-select-all", title: "select all" });
    const table = h(
      "table",
      { id: "dlq-table", class: "grid" },
      h("thead", {}, h("tr", {}, h("th", {}, all), ["Id", "Group", "Deliveries", "Reason", "Dead since", "Data", ""].map((t) => h("th", {}, t)))),
      body,
    );
    const replaySelected = h("button", { id: "dlq-replay-selected", onclick: () => settle("replay", [...chosen]) }, "Replay selected");
    const discardSelected = h("button", { id: "dlq-discard-selected", class: "danger", onclick: () => settle("discard", [...chosen]) }, "Discard selected");
    const audit = auditTable();
    const problem = h("div");
    const count = h("span", { id: "dlq-count", class: "muted" });
    view.append(
      h("p", {}, h("a", { href: "#/messaging" }, "← Messaging")),
      h("h1", {}, "Dead letters of ", h("span", { class: "mono" }, topic)),
      h("div", { class: "toolbar" }, replaySelected, discardSelected, count),
      problem,
      table,
      h("h2", {}, "Audit"),
      audit.table,
    );
    let messages = [];

    function updateButtons() {
      replaySelected.disabled = discardSelected.disabled = chosen.size === 0;
      all.checked = messages.length > 0 && chosen.size === messages.length;
      count.textContent = `${messages.length} dead letters${chosen.size ? `, ${chosen.size} selected` : ""}`;
    }
    all.addEventListener("change", () => {
      chosen.clear();
      if (all.checked) for (const m of messages) chosen.add(m.id);
      for (const box of body.querySelectorAll(".dlq-select")) box.checked = all.checked;
      updateButtons();
    });

    async function settle(action, ids) {
      if (!ids.length) return;
      const what = ids.length === 1 ? "1 dead letter" : `${ids.length} dead letters`;
      const question = action === "replay" ? `Replay ${what} to ${topic}? They will be handled again.` : `Discard ${what} of ${topic}? This cannot be undone.`;
      if (!(await confirmDialog(question))) return;
      try {
        const result = await post(`messaging/${enc(topic)}/dlq/${action}`, { ids, confirm: true });
        toast(`${action === "replay" ? "Replayed" : "Discarded"} ${result.count} of ${result.requested}`, result.count === result.requested ? "ok" : "warn");
        for (const id of ids) chosen.delete(id);
      } catch (exc) {
        toast(exc.message, "error");
      }
      if (current(token)) await load();
    }

    function render() {
      body.replaceChildren(
        ...messages.map((m) => {
          const box = h("input", { type: "checkbox", class: "dlq-select", title: "select" });
          box.checked = chosen.has(m.id);
          box.addEventListener("change", () => {
            if (box.checked) chosen.add(m.id);
            else chosen.delete(m.id);
            updateButtons();
          });
          const text = typeof m.data === "string" ? m.data : JSON.stringify(m.data, null, 2);
          return h(
            "tr",
            { class: "dlq-row", dataset: { id: m.id } },
            h("td", {}, box),
            h("td", { class: "mono", title: m.original_id ? `original id ${m.original_id}` : "" }, m.id),
            h("td", {}, m.group || "–"),
            h("td", { class: "num" }, String(m.deliveries)),
            h("td", { class: "error-text reason" }, m.reason || ""),
            h("td", { class: "nowrap" }, m.time ? new Date(m.time).toLocaleString(undefined, { hour12: false }) : "–", m.trace_id ? h("div", {}, h("a", { href: `#/traces/${m.trace_id}` }, "trace")) : null),
            h("td", {}, h("details", {}, h("summary", { class: "mono" }, text.length > 60 ? `${text.slice(0, 60)}…` : text), h("pre", { class: "data" }, text))),
            h(
              "td",
              { class: "nowrap" },
              h("button", { class: "replay small", onclick: () => settle("replay", [m.id]) }, "Replay"),
              " ",
              h("button", { class: "discard small danger", onclick: () => settle("discard", [m.id]) }, "Discard"),
            ),
          );
        }),
      );
      if (!messages.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No dead letters.")));
      updateButtons();
    }

    async function load() {
      try {
        const data = await api(`messaging/${enc(topic)}/dlq`);
        if (!current(token)) return;
        messages = data.messages;
        const ids = new Set(messages.map((m) => m.id));
        for (const id of [...chosen]) if (!ids.has(id)) chosen.delete(id);
        problem.replaceChildren(data.truncated ? h("p", { class: "muted" }, "Showing the first dead letters only.") : "");
        render();
        await audit.load();
      } catch (exc) {
        if (current(token)) problem.replaceChildren(errorBox(exc));
      }
    }
    load();
    every(5000, () => {
      if (!$("#confirm-dialog").open) load();
    });
  }

  // -- logs ------------------------------------------------------------------------------------------------------

  function logsPage(view, token, rest, params) {
    const service = h("select", { id: "log-service" }, h("option", { value: "" }, "all services"));
    const level = h(
      "select",
      { id: "log-level" },
      ["", "debug", "info", "warning", "error", "critical"].map((l) => h("option", { value: l }, l ? `${l} and above` : "any level")),
    );
    const traceId = h("input", { id: "log-trace", type: "search", placeholder: "trace id", size: "34", value: params.get("trace_id") || "" });
    const text = h("input", { id: "log-q", type: "search", placeholder: "search text", value: params.get("q") || "" });
    const follow = h("input", { id: "log-follow", type: "checkbox" });
    follow.checked = true;
    level.value = params.get("level") || "";
    const form = h(
      "form",
      { id: "log-filters", class: "filters" },
      h("label", {}, "Service ", service),
      h("label", {}, "Level ", level),
      h("label", {}, "Trace ", traceId),
      h("label", {}, "Text ", text),
      h("label", { class: "check" }, follow, " live tail"),
    );
    const body = h("tbody");
    const table = h(
      "table",
      { id: "log-table", class: "grid logs" },
      h("thead", {}, h("tr", {}, ["Time", "Service", "Level", "Message", "Trace"].map((t) => h("th", {}, t)))),
      body,
    );
    const scroller = h("div", { id: "log-view" }, table);
    const problem = h("div");
    const note = h("div", { id: "log-note", class: "muted" });
    view.append(h("h1", {}, "Logs"), form, problem, note, scroller);
    let cursor = 0;
    let generation = 0;
    let busy = false;
    let knownServices = [];

    function row(r) {
      return h(
        "tr",
        { class: `log-row log-${r.level.toLowerCase()}`, dataset: { seq: String(r.seq), level: r.level } },
        h("td", { class: "nowrap mono" }, fmtClock(r.time)),
        h("td", { class: "nowrap" }, h("span", { class: "svc-chip", style: { background: colorOf(r.service) } }), ` ${r.service}`),
        h("td", {}, h("span", { class: `badge level-${r.level.toLowerCase()}` }, r.level)),
        h("td", { class: "message" }, r.logger && r.logger !== r.service ? h("span", { class: "muted" }, `${r.logger}: `) : null, r.message),
        h("td", {}, r.trace_id ? h("a", { class: "trace-link mono", href: `#/traces/${r.trace_id}` }, shortId(r.trace_id)) : ""),
      );
    }

    async function poll(reset) {
      if (busy && !reset) return; // the previous tail request has not answered yet
      busy = true;
      const mine = reset ? ++generation : generation;
      if (reset) {
        cursor = 0;
        body.replaceChildren();
      }
      try {
        const data = await api(
          `logs${query({ service: service.value, level: level.value, trace_id: traceId.value.trim(), q: text.value.trim(), since: cursor, limit: 1000 })}`,
        );
        if (!current(token) || mine !== generation) return;
        problem.replaceChildren();
        if (!data.available) {
          note.textContent = "The runner gave the dashboard no log buffer.";
          return;
        }
        if (data.services.join() !== knownServices.join()) {
          knownServices = data.services;
          const chosen = service.value || params.get("service") || "";
          service.replaceChildren(h("option", { value: "" }, "all services"), data.services.map((n) => h("option", { value: n }, n)));
          service.value = data.services.includes(chosen) ? chosen : "";
        }
        const nearBottom = scroller.scrollTop + scroller.clientHeight >= scroller.scrollHeight - 30;
        if (data.truncated) body.append(h("tr", { class: "gap" }, h("td", { colspan: 5, class: "muted" }, "… older lines skipped …")));
        const fragment = document.createDocumentFragment();
        for (const r of data.records) fragment.append(row(r));
        body.append(fragment);
        while (body.children.length > LOG_ROWS) body.firstChild.remove();
        cursor = data.cursor;
        note.textContent = `${body.querySelectorAll(".log-row").length} lines shown`;
        if (nearBottom || reset) scroller.scrollTop = scroller.scrollHeight;
      } catch (exc) {
        if (current(token)) problem.replaceChildren(errorBox(exc));
      } finally {
        if (mine === generation) busy = false;
      }
    }

    let debounce = null;
    const refilter = () => {
      clearTimeout(debounce);
      debounce = setTimeout(() => poll(true), 250);
    };
    for (const el of [service, level]) el.addEventListener("change", () => poll(true));
    for (const el of [traceId, text]) el.addEventListener("input", refilter);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      poll(true);
    });
    onLeave(() => clearTimeout(debounce));
    poll(true);
    every(1000, () => {
      if (follow.checked) poll(false);
    });
  }

  // -- data: sagas and projections -------------------------------------------------------------------------------

  function statusBadge(status) {
    const name = String(status ?? "unknown").replace(/[^a-z_]/g, "_");
    return h("span", { class: `badge saga-${name}` }, name);
  }

  function dataPage(view, token, rest, params) {
    if (rest[0] === "sagas" && rest[1]) {
      sagaPage(view, token, rest[1]);
      return;
    }
    const status = h(
      "select",
      { id: "saga-status", "aria-label": "saga status" },
      ["", "running", "compensating", "completed", "compensated", "failed"].map((v) =>
        h("option", { value: v, selected: v === (params.get("status") || "") }, v || "any status"),
      ),
    );
    const sagaBody = h("tbody");
    const sagas = h(
      "table",
      { id: "sagas-table", class: "grid" },
      h("thead", {}, h("tr", {}, ["Saga", "Id", "Owner", "Status", "Failed step", "Started", "Updated"].map((t) => h("th", {}, t)))),
      sagaBody,
    );
    const projectionBody = h("tbody");
    const projections = h(
      "table",
      { id: "projections-table", class: "grid" },
      h("thead", {}, h("tr", {}, ["Projection", "Position", "Head", "Lag", "Updated", "Error"].map((t) => h("th", {}, t)))),
      projectionBody,
    );
    const problem = h("div");
    view.append(
      h("h1", {}, "Sagas and projections"),
      problem,
      h("h2", {}, "Sagas"),
      h("form", { class: "filters" }, h("label", {}, "Status ", status)),
      sagas,
      h("h2", {}, "Projections (read models)"),
      projections,
    );

    function renderSagas(data) {
      if (!data.available) {
        sagaBody.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "The runner gave the dashboard no database.")));
        return;
      }
      sagaBody.replaceChildren(
        ...data.sagas.map((g) =>
          h(
            "tr",
            { class: "saga-row", dataset: { id: g.id, status: g.status } },
            h("td", {}, h("strong", {}, g.name)),
            h("td", { class: "mono" }, h("a", { href: `#/data/sagas/${enc(g.id)}` }, g.id)),
            h("td", {}, g.owner),
            h("td", {}, statusBadge(g.status)),
            h("td", {}, g.failed_step || "–"),
            h("td", { class: "muted" }, fmtTime(g.created)),
            h("td", { class: "muted" }, fmtTime(g.updated)),
          ),
        ),
      );
      if (!data.sagas.length) sagaBody.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No sagas yet.")));
    }

    function renderProjections(data) {
      if (!data.available) {
        projectionBody.replaceChildren(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "The runner gave the dashboard no database.")));
        return;
      }
      projectionBody.replaceChildren(
        ...data.projections.map((p) =>
          h(
            "tr",
            { class: `projection-row${p.error ? " has-error" : ""}`, dataset: { name: p.name } },
            h("td", {}, h("strong", {}, p.name)),
            h("td", { class: "num" }, String(p.position)),
            h("td", { class: "num" }, String(p.head)),
            h("td", { class: "num" }, h("span", { class: `badge ${p.lag ? "lag-behind" : "lag-none"}` }, String(p.lag))),
            h("td", { class: "muted" }, p.updated ? fmtTime(p.updated) : "–"),
            h("td", {}, p.error ? h("span", { class: "error-text" }, p.error) : "–"),
          ),
        ),
      );
      if (!data.projections.length) projectionBody.append(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No projections yet.")));
    }

    const loadSagas = poll(token, problem, () => `sagas${query({ status: status.value })}`, renderSagas, 2000);
    poll(token, problem, () => "projections", renderProjections, 2000);
    status.addEventListener("change", () => {
      history.replaceState(null, "", `#/data${query({ status: status.value })}`);
      loadSagas();
    });
  }

  function sagaPage(view, token, id) {
    const problem = h("div");
    const summary = h("dl", { id: "saga-summary", class: "details" });
    const stepBody = h("tbody");
    const steps = h(
      "table",
      { id: "saga-steps", class: "grid" },
      h("thead", {}, h("tr", {}, ["Step", "Phase", "Status", "Started", "Took", "Error"].map((t) => h("th", {}, t)))),
      stepBody,
    );
    const data = h("pre", { id: "saga-data", class: "mono" });
    view.append(h("p", {}, h("a", { href: "#/data" }, "← sagas and projections")), h("h1", {}, `Saga ${id}`), problem, summary, h("h2", {}, "Steps"), steps, h("h2", {}, "Data and results"), data);

    poll(
      token,
      problem,
      () => `sagas/${enc(id)}`,
      (g) => {
        const pairs = [
          ["Saga", g.name],
          ["Owner", g.owner],
          ["Status", statusBadge(g.status)],
          ["Failed step", g.failed_step || "–"],
          ["Error", g.error || "–"],
          ["Started", fmtTime(g.created)],
          ["Updated", fmtTime(g.updated)],
        ];
        summary.replaceChildren(...pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
        stepBody.replaceChildren(
          ...g.steps.map((st) =>
            h(
              "tr",
              { class: "saga-step", dataset: { step: st.step, phase: st.phase, status: st.status } },
              h("td", {}, h("strong", {}, st.step)),
              h("td", {}, st.phase),
              h("td", {}, statusBadge(st.status)),
              h("td", { class: "muted" }, fmtTime(st.started)),
              h("td", { class: "num" }, st.ended ? fmtDuration((st.ended - st.started) * 1e9) : "–"),
              h("td", {}, st.error ? h("span", { class: "error-text" }, st.error) : "–"),
            ),
          ),
        );
        data.textContent = JSON.stringify({ data: g.data, results: g.results }, null, 2);
      },
      2000,
    );
  }

  // -- start -----------------------------------------------------------------------------------------------------

  // For tests and the browser console: read what is on screen without scraping pixels.
  window.meshkitDashboard = {
    route,
    trace: () => trace.data,
    selectedSpan: () => (trace.selected >= 0 ? trace.spans[trace.selected].span_id : null),
    selectSpan: (spanId) => selectSpanById(spanId),
    flameSpanAt: (x, y) => {
      const index = trace.flameSpanAt ? trace.flameSpanAt(x, y) : -1;
      return index >= 0 ? trace.spans[index].span_id : null;
    },
  };

  function start() {
    window.addEventListener("hashchange", route);
    api("info")
      .then((info) => {
        app.info = info;
        $("#brand-title").textContent = info.title;
        document.title = `${info.title} dashboard`;
      })
      .catch(() => setStatus(false));
    if (!location.hash) history.replaceState(null, "", "#/services");
    route();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
