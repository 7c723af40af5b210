/* der-sdk operator console: the Asset page's trends (uPlot).
 *
 * Loads /console/assets/{id}/trend (downsampled on the server: per-bucket min/max/avg) for
 * the chosen range, draws MW with its setpoint and each numeric detail, and while the range
 * is a "last ..." one appends the samples arriving on the page's live stream (live.js).
 * Each chart's element carries data-points (how many points it shows) for tests.
 */
(function () {
  "use strict";

  var RANGES = { "15m": 900, "1h": 3600, "24h": 86400, "7d": 604800 };
  var POINTS = 600;
  var root, assetId, detailNames, charts = {}, data = {}, span = null, unsubscribe = null;

  function el(id) { return document.getElementById(id); }

  function status(text) { el("trend-status").textContent = text; }

  function width(node) { return Math.max(280, (node.clientWidth || 800) - 4); }

  function setPoints(name) {
    var node = name === "mw" ? el("trend-mw") : el("trend-" + name);
    if (node) node.setAttribute("data-points", String(data[name] ? data[name][0].length : 0));
  }

  function chartFor(name, node, series) {
    if (charts[name]) { charts[name].destroy(); delete charts[name]; }
    node.innerHTML = "";
    var opts = {
      width: width(node),
      height: name === "mw" ? 260 : 180,
      scales: { x: { time: true } },
      series: [{}].concat(series),
      axes: [{}, { size: 60 }],
      legend: { live: true },
    };
    charts[name] = new uPlot(opts, data[name], node);
    setPoints(name);
  }

  function avgMinMax(label, color) {
    return [
      { label: label, stroke: color, width: 2, spanGaps: false },
      { label: label + " min", stroke: color, width: 1, dash: [2, 4], alpha: 0.5, show: true },
      { label: label + " max", stroke: color, width: 1, dash: [2, 4], alpha: 0.5, show: true },
    ];
  }

  function series(trend, name) {
    var s = trend.series[name];
    return s ? [s.avg, s.min, s.max] : [[], [], []];
  }

  function draw(trend) {
    var x = trend.t;
    var mw = series(trend, "mw");
    var sp = trend.series.mw_setpoint ? trend.series.mw_setpoint.avg : x.map(function () { return null; });
    data.mw = [x.slice(), mw[0], mw[1], mw[2], sp];
    chartFor("mw", el("trend-mw"), avgMinMax("MW", "#1f6f4a").concat([
      { label: "setpoint", stroke: "#b35c00", width: 2, dash: [6, 4], paths: uPlot.paths.stepped({ align: 1 }) },
    ]));
    detailNames.forEach(function (name) {
      var card = el("trend-card-" + name);
      var node = el("trend-" + name);
      if (!card || !node) return;
      var s = trend.series[name];
      if (!s || !s.avg.some(function (v) { return v !== null; })) {
        card.hidden = true;
        data[name] = null;
        setPoints(name);
        return;
      }
      card.hidden = false;
      data[name] = [x.slice(), s.avg, s.min, s.max];
      chartFor(name, node, avgMinMax(name, "#2b5797"));
    });
    var text = trend.samples + " samples in " + x.length + " points of " + trend.bucket_s + " s";
    if (trend.sampled) text += " (long range: the newest samples of each bucket)";
    status(text + (span ? " · live" : ""));
  }

  function query() {
    var range = el("trend-range").value;
    var params = new URLSearchParams({ points: String(POINTS) });
    if (range === "custom") {
      var start = el("trend-start").value, end = el("trend-end").value;
      if (!start) { status("choose a start time"); return null; }
      params.set("start", start + "Z");
      if (end) params.set("end", end + "Z");
      span = null;
    } else {
      params.set("range", range);
      span = RANGES[range] || null;
    }
    return params;
  }

  function load() {
    var params = query();
    if (!params) return;
    status("loading…");
    fetch("/console/assets/" + encodeURIComponent(assetId) + "/trend?" + params.toString(), {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    })
      .then(function (response) {
        if (!response.ok) {
          return response.text().then(function (text) { throw new Error(response.status + " " + text); });
        }
        return response.json();
      })
      .then(draw)
      .catch(function (err) { status("could not load the trend: " + err.message); });
  }

  function append(name, row) {
    var d = data[name];
    if (!d) return;
    var x = d[0];
    if (x.length && row[0] <= x[x.length - 1]) return; // not newer than what is drawn
    for (var i = 0; i < d.length; i++) d[i].push(row[i]);
    var from = row[0] - span;
    var drop = 0;
    while (drop < x.length && x[drop] < from) drop++;
    if (drop) for (var j = 0; j < d.length; j++) d[j].splice(0, drop);
    charts[name].setData(d);
    setPoints(name);
  }

  function onSamples(samples) {
    if (!span) return;
    samples.forEach(function (s) {
      if (s.asset_id !== assetId) return;
      var t = Date.parse(s.ts) / 1000;
      append("mw", [t, s.mw, s.mw, s.mw, s.mw_setpoint]);
      detailNames.forEach(function (name) {
        var v = s.details ? s.details[name] : undefined;
        if (typeof v === "number") append(name, [t, v, v, v]);
      });
    });
  }

  function onDispatch(dispatches) {
    dispatches.forEach(function (d) {
      var row = el("dispatch-" + d.dispatch_id);
      var mine = (d.targets || []).filter(function (t) { return t.asset_id === assetId; })[0];
      if (!mine && d.asset_id !== assetId) return;
      var state = mine ? mine.state : d.state;
      if (!row) {
        var body = el("asset-dispatches").tBodies[0];
        var empty = body.querySelector("tr.empty");
        if (empty) empty.remove();
        row = document.createElement("tr");
        row.id = "dispatch-" + d.dispatch_id;
        row.setAttribute("data-dispatch-id", d.dispatch_id);
        var cells = [d.created_at, d.dispatch_id.slice(0, 8), d.site_id && !d.asset_id ? "site" : "asset",
          mine ? mine.mw.toFixed(3) : "–", "", d.source];
        cells.forEach(function (text, i) {
          var td = document.createElement("td");
          if (i === 1) { var code = document.createElement("code"); code.textContent = text; td.appendChild(code); }
          else td.textContent = text;
          if (i === 3) td.className = "num";
          if (i === 4) td.setAttribute("data-field", "state");
          row.appendChild(td);
        });
        body.insertBefore(row, body.firstChild);
      }
      var cell = row.querySelector('[data-field="state"]');
      cell.innerHTML = "";
      var badge = document.createElement("span");
      badge.className = "state state-" + state;
      badge.textContent = state;
      cell.appendChild(badge);
    });
  }

  function toggleCustom() {
    var custom = el("trend-range").value === "custom";
    document.querySelectorAll(".trend-custom").forEach(function (node) { node.hidden = !custom; });
  }

  function init() {
    root = el("asset");
    if (!root || typeof uPlot === "undefined") return;
    assetId = root.getAttribute("data-asset");
    detailNames = (root.getAttribute("data-details") || "").split(",").filter(Boolean);
    toggleCustom();
    el("trend-range").addEventListener("change", function () {
      toggleCustom();
      if (el("trend-range").value !== "custom") {
        history.replaceState(null, "", "?range=" + el("trend-range").value);
        load();
      }
    });
    el("trend-form").addEventListener("submit", function (ev) { ev.preventDefault(); load(); });
    var live = window.DerLive || window.derLive;
    if (live && live.subscribe) {
      unsubscribe = live.subscribe({ assets: [assetId], dispatch: "1" }, function (topic, payload) {
        if (topic === "samples") onSamples(payload);
        else if (topic === "dispatch") onDispatch(payload);
        else if (topic === "resync") load();
      });
    }
    window.addEventListener("resize", function () {
      Object.keys(charts).forEach(function (name) {
        var node = name === "mw" ? el("trend-mw") : el("trend-" + name);
        charts[name].setSize({ width: width(node), height: charts[name].height });
      });
    });
    load();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
