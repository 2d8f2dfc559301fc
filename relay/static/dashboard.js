// tunnel-relay dashboard: polls the data API and writes what it gets into the page as text.
// Everything from the network (site names, AE titles, reasons) goes in through textContent or
// attribute values, never as markup. No inline script: the Content-Security-Policy forbids it.
"use strict";

(function () {
  const POLL_MS = 2000;
  const DASH = "—";
  const page = document.body.dataset.page;
  let polls = 0;

  // --- formatting ------------------------------------------------------------------------------

  function fmtBytes(n) {
    if (n === null || n === undefined) return DASH;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? String(Math.round(n)) : n.toFixed(1)) + " " + units[i];
  }

  function fmtRate(n) { return n === null || n === undefined ? DASH : fmtBytes(n) + "/s"; }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined) return DASH;
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function fmtTime(epoch) {
    if (!epoch) return DASH;
    return new Date(epoch * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  function fmtSince(epoch, now) {
    return epoch ? fmtTime(epoch) + " (" + fmtDuration(now - epoch) + ")" : DASH;
  }

  function fmtMs(ms) { return ms === null || ms === undefined ? DASH : ms.toFixed(1) + " ms"; }

  function fmtPercent(p) { return p === null || p === undefined ? DASH : p.toFixed(0) + " %"; }

  function fmtExpiry(notAfter, now) {
    if (!notAfter) return DASH;
    const days = (notAfter - now) / 86400;
    return days < 0 ? "expired " + fmtTime(notAfter) : days.toFixed(1) + " days (" + fmtTime(notAfter) + ")";
  }

  // The site's paths: relay/agent for each agent tunnel the fleet's relays hold (the relay alone for an
  // agent without a name); one alone is the site's single path (as relay/cli.py's _paths says).
  function fmtTunnelsOn(held) {
    const pairs = [];
    for (const path of held || []) {
      const agents = path.agents && path.agents.length ? path.agents : [""];
      for (const agent of agents) pairs.push(agent ? path.relay + "/" + agent : path.relay);
    }
    if (pairs.length === 0) return DASH;
    return pairs.length === 1 ? pairs[0] + " (single path)" : pairs.join(", ");
  }

  function fmtEcho(echo) {
    if (!echo) return "no report";
    if (echo.total === 0) return "no destinations";
    if (echo.failing > 0) return echo.failing + "/" + echo.total + " failing: " + echo.first_failure;
    const latency = echo.max_latency_ms === null ? "" : ", max " + fmtMs(echo.max_latency_ms);
    const unchecked = echo.total - echo.ok - echo.failing;
    return echo.ok + "/" + echo.total + " ok" + latency + (unchecked > 0 ? ", " + unchecked + " not checked yet" : "");
  }

  function fmtHost(host) {
    if (!host) return DASH;
    return "cpu " + fmtPercent(host.cpu_percent) + ", mem " + fmtPercent(host.memory_percent) +
      ", disk free " + fmtBytes(host.disk_free_bytes) + ", rss " + fmtBytes(host.rss_bytes) +
      ", fds " + (host.open_fds === null ? DASH : host.open_fds);
  }

  function fmtThroughput(t) {
    return t ? fmtRate(t.to_site_bps) + " / " + fmtRate(t.from_site_bps) : DASH;
  }

  // The relay's own heartbeat RTT once it has one; until then what the agent last reported.
  function rttOf(site) {
    if (site.rtt_ms !== null && site.rtt_ms !== undefined) return site.rtt_ms;
    return site.agent ? site.agent.rtt_ms : null;
  }

  function certificateText(site, now) {
    const notAfter = site.certificate_not_after ||
      (site.agent_certificate ? site.agent_certificate.not_after : null);
    let text = fmtExpiry(notAfter, now);
    if (site.agent_certificate && site.agent_certificate.renewal_error) {
      text += "; renewal failing: " + site.agent_certificate.renewal_error;
    }
    return text;
  }

  // --- DOM helpers (text only) -----------------------------------------------------------------

  function cell(text, field) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined || text === "" ? DASH : String(text);
    if (field) td.dataset.field = field;
    return td;
  }

  function badge(condition) {
    const span = document.createElement("span");
    span.className = "badge cond-" + (["up", "degraded", "down"].includes(condition) ? condition : "unknown");
    span.textContent = condition || "unknown";
    return span;
  }

  function fillTable(table, rows, columns, emptyText) {
    const tbody = table.tBodies[0];
    const trs = rows.map(function (row) {
      const tr = document.createElement("tr");
      columns.forEach(function (col) { tr.appendChild(cell(col(row))); });
      return tr;
    });
    if (trs.length === 0) {
      const tr = document.createElement("tr");
      const td = cell(emptyText || "none");
      td.colSpan = columns.length;
      td.className = "empty";
      tr.appendChild(td);
      trs.push(tr);
    }
    tbody.replaceChildren.apply(tbody, trs);
  }

  function fillList(dl, pairs) {
    const nodes = [];
    pairs.forEach(function (pair) {
      const dt = document.createElement("dt");
      dt.textContent = pair[0];
      const dd = document.createElement("dd");
      dd.textContent = pair[1] === null || pair[1] === undefined || pair[1] === "" ? DASH : String(pair[1]);
      nodes.push(dt, dd);
    });
    dl.replaceChildren.apply(dl, nodes);
  }

  function setCsrf(session) {
    document.querySelectorAll("input.csrf").forEach(function (input) {
      input.value = session ? session.csrf : "";
    });
  }

  // --- overview page ---------------------------------------------------------------------------

  function siteRow(site, now) {
    const tr = document.createElement("tr");
    tr.dataset.site = site.name;
    tr.dataset.condition = site.condition;
    const name = document.createElement("td");
    name.dataset.field = "name";
    const link = document.createElement("a");
    link.href = "/sites/" + encodeURIComponent(site.name);
    link.textContent = site.name;
    name.appendChild(link);
    const status = document.createElement("td");
    status.dataset.field = "condition";
    status.appendChild(badge(site.condition));
    tr.append(
      name, status,
      cell(site.reason, "reason"),
      cell(site.transport, "transport"),
      cell(site.connected ? fmtSince(site.connected_since, now) : DASH, "connected_since"),
      cell(fmtMs(rttOf(site)), "rtt"),
      cell(fmtThroughput(site.throughput), "throughput"),
      cell(site.active_streams, "active"),
      cell(fmtEcho(site.echo), "echo"),
      cell(certificateText(site, now), "certificate"),
      cell(fmtHost(site.host), "host"),
      cell(fmtTunnelsOn(site.tunnels_on), "tunnels_on"),
    );
    return tr;
  }

  function drawChart(svg, series) {
    const width = 720, height = 120, slots = 180;
    const slot = width / slots;
    const shown = series.slice(-slots);
    const max = Math.max(1, ...shown.map(function (b) { return b.completed + b.rejected + b.failed; }));
    const nodes = [];
    shown.forEach(function (bucket, i) {
      const x = width - (shown.length - i) * slot;
      let y = height;
      ["completed", "rejected", "failed"].forEach(function (kind) {
        const n = bucket[kind];
        if (!n) return;
        const h = (n / max) * (height - 4);
        y -= h;
        const rect = document.createElementNS(svg.namespaceURI, "rect");
        rect.setAttribute("x", x.toFixed(2));
        rect.setAttribute("y", y.toFixed(2));
        rect.setAttribute("width", Math.max(1, slot - 1).toFixed(2));
        rect.setAttribute("height", h.toFixed(2));
        rect.setAttribute("class", "bar " + kind);
        const title = document.createElementNS(svg.namespaceURI, "title");
        title.textContent = fmtTime(bucket.start) + ": " + n + " " + kind;
        rect.appendChild(title);
        nodes.push(rect);
      });
    });
    svg.replaceChildren.apply(svg, nodes);
    document.getElementById("chart-caption").textContent = "(tallest bar: " + max + " per 10 s)";
  }

  function outcomeRows(outcomes) {
    const lastWindow = {};
    outcomes.series.forEach(function (bucket) {
      Object.keys(bucket.reasons).forEach(function (reason) {
        lastWindow[reason] = (lastWindow[reason] || 0) + bucket.reasons[reason];
      });
    });
    const names = Array.from(new Set(Object.keys(outcomes.totals).concat(Object.keys(lastWindow)))).sort();
    return names.map(function (name) {
      return {name: name, window: lastWindow[name] || 0, total: outcomes.totals[name] || 0};
    });
  }

  function kindOf(outcome) {
    if (outcome === "completed") return "completed";
    if (/^(rejected:|refused:|bad-first-pdu:)/.test(outcome) ||
        ["artim-timeout", "closed-before-associate", "destination-unreachable"].includes(outcome)) {
      return "rejected";
    }
    return "failed";
  }

  function renderOverview(data) {
    const now = data.now;
    const tbody = document.querySelector("#sites tbody");
    tbody.replaceChildren.apply(tbody, data.sites.map(function (s) { return siteRow(s, now); }));
    const counts = {up: 0, degraded: 0, down: 0};
    data.sites.forEach(function (s) { counts[s.condition] = (counts[s.condition] || 0) + 1; });
    document.getElementById("relay-summary").textContent =
      counts.up + " up, " + counts.degraded + " degraded, " + counts.down + " down · " +
      data.relay.active_associations + " active associations · relay " +
      (data.relay.ready ? "ready" : "not ready: " + data.relay.ready_reason) +
      " · up " + fmtDuration(now - data.relay.started);
    drawChart(document.getElementById("outcome-chart"), data.outcomes.series);
    fillTable(document.getElementById("outcome-reasons"), outcomeRows(data.outcomes), [
      function (r) { return r.name; },
      function (r) { return kindOf(r.name); },
      function (r) { return r.window; },
      function (r) { return r.total; },
    ], "no associations yet");
  }

  // --- site page -------------------------------------------------------------------------------

  function siteName() {
    const parts = location.pathname.split("/");
    return decodeURIComponent(parts[parts.length - 1] || "");
  }

  function renderSite(data) {
    const now = data.now;
    const site = data.site;
    document.title = "tunnel-relay · " + data.name;
    document.getElementById("site-name").textContent = data.name;
    const condition = document.getElementById("site-condition");
    condition.replaceChildren(badge(site ? site.condition : "unknown"));
    document.getElementById("site-reason").textContent = site ? site.reason : "not configured on this relay";
    if (site) {
      fillList(document.getElementById("site-tunnel"), [
        ["connected", site.connected ? "yes" : "no"],
        ["transport", site.transport],
        ["peer", site.peer],
        ["connected since", site.connected ? fmtSince(site.connected_since, now) : null],
        ["RTT", fmtMs(rttOf(site))],
        ["throughput to / from site", fmtThroughput(site.throughput)],
        ["bytes to / from site", fmtBytes(site.bytes.to_site) + " / " + fmtBytes(site.bytes.from_site)],
        ["active associations", site.active_streams],
        ["connects", site.connects],
        ["last disconnect", site.last_disconnect ? fmtTime(site.last_disconnect) : null],
        ["last disconnect reason", site.last_disconnect_reason],
        ["certificate serial", site.certificate_serial],
        ["certificate expires", certificateText(site, now)],
      ]);
      const agent = site.agent || {};
      fillList(document.getElementById("site-agent"), [
        ["health report age", site.health_age_s === null ? "no report" : fmtDuration(site.health_age_s)],
        ["agent version", agent.version],
        ["agent RTT", fmtMs(agent.rtt_ms)],
        ["reconnects", agent.reconnects],
        ["PACS echo", fmtEcho(site.echo)],
        ["host", fmtHost(site.host)],
      ]);
    }
    const reg = data.registry;
    fillList(document.getElementById("site-registry"), reg ? [
      ["created", fmtTime(reg.created_at)],
      ["revoked", reg.revoked ? fmtTime(reg.revoked_at) + " " + (reg.revoked_why || "") : "no"],
      ["certificates issued", reg.certificates],
      ["latest certificate expires", fmtExpiry(reg.latest_not_after, now)],
      ["has routes", reg.configured ? "yes" : "no"],
    ] : [["registry", "not registered"]]);
    fillTable(document.getElementById("echo-destinations"), data.echo_destinations, [
      function (d) { return d.route; },
      function (d) { return d.host + ":" + d.port; },
      function (d) { return d.ok === null ? "not checked yet" : (d.ok ? "ok" : "failing"); },
      function (d) { return fmtMs(d.latency_ms); },
      function (d) { return fmtTime(d.last_success); },
      function (d) { return fmtTime(d.last_failure); },
      function (d) { return d.last_failure_reason; },
      function (d) { return fmtTime(d.checked_at); },
    ], site && site.health_age_s !== null ? "no destinations" : "no health report from the agent");
    fillTable(document.getElementById("spool-destinations"), data.spool_destinations || [], [
      function (d) { return d.name; },
      function (d) { return d.called_ae; },
      function (d) { return d.instances === null ? "" : d.instances; },
      function (d) { return d.bytes === null ? "" : fmtBytes(d.bytes); },
      function (d) { return d.oldest_age === null ? "empty" : fmtDuration(d.oldest_age); },
      function (d) { return d.forwarded === null ? "" : d.forwarded; },
      function (d) { return d.quarantined === null ? "" : d.quarantined; },
      function (d) { return d.last_error; },
    ], "no spool destinations");
    fillTable(document.getElementById("relay-destinations"), data.relay_destinations, [
      function (d) { return d.called_ae; },
      function (d) { return d.host + ":" + d.port; },
      function (d) { return d.allowed_calling_aes.join(", "); },
    ]);
    fillTable(document.getElementById("listener-routes"), data.listener_routes, [
      function (r) { return r.listener; },
      function (r) { return r.called_ae; },
      function (r) { return r.route; },
      function (r) { return r.allowed_calling_aes.join(", "); },
    ]);
    fillTable(document.getElementById("active-associations"), data.active, [
      function (a) { return a.id; },
      function (a) { return a.direction; },
      function (a) { return a.calling_ae; },
      function (a) { return a.called_ae; },
      function (a) { return a.route; },
      function (a) { return fmtSince(a.started, now); },
    ]);
    fillTable(document.getElementById("recent-associations"), data.recent, [
      function (a) { return a.id; },
      function (a) { return a.direction; },
      function (a) { return a.calling_ae; },
      function (a) { return a.called_ae; },
      function (a) { return a.route; },
      function (a) { return fmtBytes(a.bytes_from_caller) + " / " + fmtBytes(a.bytes_to_caller); },
      function (a) { return fmtDuration(a.ended - a.started); },
      function (a) { return a.outcome; },
    ]);
  }

  // --- polling ---------------------------------------------------------------------------------

  function setUpdateStatus(text, failed) {
    const status = document.getElementById("update-status");
    status.textContent = text;
    status.classList.toggle("failed", Boolean(failed));
  }

  async function poll() {
    const url = page === "site"
      ? "/api/dashboard/sites/" + encodeURIComponent(siteName())
      : "/api/dashboard";
    try {
      const response = await fetch(url, {credentials: "same-origin", cache: "no-store",
        headers: {"Accept": "application/json"}});
      if (response.status === 401) {
        location.assign("/login");
        return;
      }
      if (response.status === 404 && page === "site") {
        setUpdateStatus("no site of this name", true);
        return;
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      const data = await response.json();
      setCsrf(data.session);
      if (page === "site") renderSite(data); else renderOverview(data);
      polls += 1;
      document.body.dataset.polls = String(polls);
      setUpdateStatus("updated " + fmtTime(data.now) + " · refreshes every " + POLL_MS / 1000 + " s");
    } catch (error) {
      setUpdateStatus("update failed: " + error.message + " (retrying)", true);
    }
    setTimeout(poll, POLL_MS);
  }

  poll();
})();
