// der-sdk console helpers, shared by every page (served from the headend, no CDN).
// window.derConsole.csrfToken()        the session's CSRF token (from <meta name="csrf-token">)
// window.derConsole.fetch(url, opts)   fetch() that sends the CSRF token and same-origin cookies;
//                                      a JSON body (opts.json) is serialised with its content type
// window.derConsole.formatMw(x)        "1.234 MW" style text for a number (or "–")
// window.derConsole.fleet              the Fleet table's live aggregates (see below)
(function () {
  "use strict";
  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }
  function consoleFetch(url, opts) {
    opts = Object.assign({ credentials: "same-origin" }, opts || {});
    var headers = new Headers(opts.headers || {});
    headers.set("X-CSRF-Token", csrfToken());
    if (opts.json !== undefined) {
      headers.set("Content-Type", "application/json");
      opts.body = JSON.stringify(opts.json);
      delete opts.json;
    }
    opts.headers = headers;
    return fetch(url, opts);
  }
  function formatMw(x) {
    return typeof x === "number" && isFinite(x) ? x.toFixed(3) + " MW" : "–";
  }
  // The Fleet table (section[data-fleet]) kept in step with live samples: live.js updates the
  // cells marked data-asset-id + data-field; this keeps each site's aggregate MW (its rows'
  // data-mw plus the site row's data-others: the site's assets not on this page), the
  // status badge and last seen. Connects and disconnects come with the table's re-read.
  var siteMembers = {};
  function fleetReset(root) {
    siteMembers = {};
    (root || document).querySelectorAll("tr.site-row[data-site-id]").forEach(function (row) {
      var site = row.getAttribute("data-site-id");
      var members = {};
      try { members = JSON.parse(row.getAttribute("data-others") || "{}"); } catch (e) { members = {}; }
      siteMembers[site] = members;
    });
    document.querySelectorAll("tr[data-asset-id][data-site-id]").forEach(function (row) {
      var mw = parseFloat(row.getAttribute("data-mw"));
      var members = siteMembers[row.getAttribute("data-site-id")];
      if (members && isFinite(mw)) members[row.getAttribute("data-asset-id")] = mw;
    });
  }
  function fleetSamples(samples) {
    var touched = {};
    samples.forEach(function (s) {
      var members = siteMembers[s.site_id];
      if (members && typeof s.mw === "number") { members[s.asset_id] = s.mw; touched[s.site_id] = true; }
      var row = document.querySelector('tr[data-asset-id="' + CSS.escape(s.asset_id) + '"][data-site-id]');
      if (!row) return;
      row.setAttribute("data-mw", String(s.mw));
      var online = s.online !== false;
      row.classList.toggle("offline", !online);
      var status = row.querySelector("[data-status]");
      if (status) {
        status.innerHTML = online ? '<span class="badge on">connected</span>'
          : '<span class="badge off">reports offline</span>';
      }
      var seen = row.querySelector("[data-last-seen]");
      if (seen && s.ts) {
        seen.setAttribute("data-ts", s.ts);
        seen.textContent = String(s.ts).replace("T", " ").slice(0, 19);
      }
      var quality = row.querySelector('[data-field="quality"]');
      if (quality) quality.classList.toggle("q-bad", s.quality !== "good");
    });
    Object.keys(touched).forEach(function (site) {
      var cell = document.querySelector('tr.site-row[data-site-id="' + CSS.escape(site) + '"] [data-field="site_mw"]');
      if (!cell) return;
      var members = siteMembers[site];
      var total = Object.keys(members).reduce(function (sum, id) { return sum + members[id]; }, 0);
      cell.textContent = total.toFixed(3);
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    if (!document.querySelector("[data-fleet]")) return;
    fleetReset(document);
    document.addEventListener("htmx:afterSwap", function () { fleetReset(document); });
    document.addEventListener("der:samples", function (ev) { fleetSamples(ev.detail || []); });
  });

  window.derConsole = {
    csrfToken: csrfToken,
    fetch: consoleFetch,
    formatMw: formatMw,
    fleet: { reset: fleetReset, samples: fleetSamples },
  };
})();
