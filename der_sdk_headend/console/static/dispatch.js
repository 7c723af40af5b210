/* der-sdk operator console: the dispatch forms (limits shown, out-of-range values flagged
 * before sending) and the Site page's aggregate MW trend. The server checks everything
 * again: this only helps the operator see a mistake before sending it. */
(function () {
  "use strict";

  function fmt(x) {
    return String(Math.round(x * 1000) / 1000);
  }

  function limitsOf(form) {
    var select = form.querySelector("[data-dispatch-target]");
    var mw = form.querySelector("[data-dispatch-mw]");
    if (select) {
      var option = select.options[select.selectedIndex];
      if (!option || !option.value) return null;
      return {
        min: parseFloat(option.getAttribute("data-min")),
        max: parseFloat(option.getAttribute("data-max")),
        kind: option.getAttribute("data-kind"),
        current: option.hasAttribute("data-current")
          ? parseFloat(option.getAttribute("data-current")) : null
      };
    }
    if (mw && mw.hasAttribute("min")) {
      return { min: parseFloat(mw.min), max: parseFloat(mw.max), kind: "site", current: null };
    }
    return null;
  }

  function check(form) {
    var mw = form.querySelector("[data-dispatch-mw]");
    var text = form.querySelector("[data-dispatch-limits]");
    var warning = form.querySelector("[data-dispatch-range-warning]");
    var limits = limitsOf(form);
    if (!mw || !warning) return;
    if (limits) {
      mw.min = limits.min;
      mw.max = limits.max;
      if (text) {
        text.textContent = "Limits: " + fmt(limits.min) + " to " + fmt(limits.max) + " MW" +
          (limits.current !== null ? "; setpoint now " + fmt(limits.current) + " MW" : "");
      }
    }
    var value = parseFloat(mw.value);
    var bad = limits && mw.value !== "" && isFinite(value) &&
      (value < limits.min || value > limits.max);
    warning.hidden = !bad;
    warning.textContent = bad
      ? fmt(value) + " MW is outside the limits " + fmt(limits.min) + " to " +
        fmt(limits.max) + " MW: the headend will refuse it"
      : "";
    mw.setAttribute("aria-invalid", bad ? "true" : "false");
  }

  function bind(form) {
    form.addEventListener("input", function () { check(form); });
    form.addEventListener("change", function () { check(form); });
    check(form);
  }

  document.addEventListener("DOMContentLoaded", function () {
    ["dispatch-form", "site-dispatch-form"].forEach(function (id) {
      var form = document.getElementById(id);
      if (form) bind(form);
    });
    drawTrend();
  });

  // A refused form (400, 403, 404) still shows its answer in the preview area.
  document.addEventListener("htmx:beforeSwap", function (event) {
    var status = event.detail.xhr.status;
    var target = event.detail.target;
    if (target && target.id === "dispatch-preview" && status >= 400 && status < 500) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
      if (status === 403 || status === 401) {
        var p = document.createElement("p");
        p.id = "dispatch-error";
        p.className = "error";
        p.setAttribute("role", "alert");
        p.textContent = event.detail.xhr.responseText || "refused (" + status + ")";
        var box = document.createElement("div");
        box.id = "dispatch-preview";
        box.appendChild(p);
        event.detail.serverResponse = box.outerHTML;
      }
    }
  });

  // --- the Site page's aggregate MW trend: server values, then the live tail
  function drawTrend() {
    var holder = document.getElementById("site-trend");
    var data = document.getElementById("site-trend-data");
    if (!holder || !data || !window.uPlot) return;
    var trend = JSON.parse(data.textContent);
    function width() {
      // the section's width, not the chart's own (the canvas would keep it wide)
      var box = holder.parentNode;
      return Math.max(260, (box ? box.clientWidth : 600) - 40);
    }
    var series = [trend.t, trend.mw];
    var plot = new window.uPlot({
      width: width(),
      height: 220,
      series: [{}, { label: "MW", stroke: "#2563eb", spanGaps: true }],
      axes: [{}, { label: "MW" }]
    }, series, holder);
    var summary = document.getElementById("site-summary");
    var total = document.getElementById("site-aggregate-mw");
    var seed = document.getElementById("site-latest-data");
    var latest = seed ? JSON.parse(seed.textContent) : {};
    var live = window.DerLive;
    if (!live || !summary) return;
    live.on("samples", function (samples) {
      var changed = false;
      (samples || []).forEach(function (s) {
        if (s.site_id === summary.getAttribute("data-site-id")) {
          latest[s.asset_id] = s.mw;
          changed = true;
        }
      });
      if (!changed) return;
      var sum = 0;
      Object.keys(latest).forEach(function (k) { sum += latest[k]; });
      if (total) total.textContent = sum.toFixed(2);
      series[0].push(Date.now() / 1000);
      series[1].push(sum);
      if (series[0].length > 2000) { series[0].shift(); series[1].shift(); }
      plot.setData(series);
    });
    window.addEventListener("resize", function () {
      plot.setSize({ width: width(), height: 220 });
    });
  }
})();
