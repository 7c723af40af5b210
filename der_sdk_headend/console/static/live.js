/* der-sdk operator console: the one live stream of a page (GET /console/events).
 *
 * A page opens ONE EventSource, whatever it shows. Topics:
 *   - assets: every element with data-asset-id and data-field is subscribed and updated
 *     automatically; more with DerLive.subscribe({assets: [...]}) or data-live-assets="id,id"
 *     (or "*") on any element; data-live-sites="id,id" for whole sites.
 *   - dispatch: data-live-dispatch="1" (or "all") on any element, or
 *     DerLive.subscribe({dispatch: "1"}).
 * Handlers: DerLive.on("samples" | "dispatch" | "resync" | "bye" | "open" | "error", fn)
 * (returns a function that removes it), or DerLive.subscribe(topics, fn): subscribes and
 * calls fn(topic, data) with the samples of those assets/sites and the dispatches.
 * window.derLive is the same object.
 * Each event is also dispatched on document as a CustomEvent "der:<topic>" (detail: the
 * parsed data), so htmx can refresh a part with hx-trigger="der:resync from:document".
 *
 * data-field (on the element with data-asset-id, or inside one: tr[data-asset-id]
 * td[data-field]) names a sample field ("mw", "mw_setpoint", "quality", "ts"), a detail
 * ("details.soc_pct"), "key" (the detail named by data-key) or "last_seen" (the sample's
 * time); fields a sample does not carry ("connected") are left alone. data-digits
 * formats numbers (default 3 for MW, 1 for "key", else 2); data-unit is appended.
 * data-live-topic="fleet" on any element subscribes to every asset.
 * The element's data-updated attribute gets the sample's timestamp, and its "live-flash"
 * class is toggled so CSS can show a change. #live-status shows the stream's state.
 */
(function () {
  "use strict";

  var handlers = {};
  var wanted = { assets: {}, allAssets: false, sites: {}, dispatch: "" };
  var source = null;
  var reopenTimer = null;
  var ended = false;
  var lastSamples = {};

  function on(topic, fn) {
    (handlers[topic] = handlers[topic] || []).push(fn);
    return function () {
      handlers[topic] = (handlers[topic] || []).filter(function (h) { return h !== fn; });
    };
  }

  function emit(topic, data) {
    (handlers[topic] || []).forEach(function (fn) {
      try {
        fn(data);
      } catch (err) {
        if (window.console) console.error("der live handler for " + topic, err);
      }
    });
    document.dispatchEvent(new CustomEvent("der:" + topic, { detail: data }));
  }

  function setStatus(state, text) {
    var el = document.getElementById("live-status");
    if (!el) return;
    el.setAttribute("data-state", state);
    el.textContent = text;
  }

  function addList(target, value) {
    String(value || "")
      .split(",")
      .map(function (s) { return s.trim(); })
      .filter(Boolean)
      .forEach(function (id) { target[id] = true; });
  }

  function subscribe(topics, fn) {
    topics = topics || {};
    var changed = false;
    (topics.assets || []).forEach(function (id) {
      if (id === "*") {
        if (!wanted.allAssets) { wanted.allAssets = true; changed = true; }
      } else if (!wanted.assets[id]) {
        wanted.assets[id] = true;
        changed = true;
      }
    });
    (topics.sites || []).forEach(function (id) {
      if (!wanted.sites[id]) { wanted.sites[id] = true; changed = true; }
    });
    if (topics.dispatch && wanted.dispatch !== "all" && wanted.dispatch !== topics.dispatch) {
      wanted.dispatch = topics.dispatch;
      changed = true;
    }
    if (changed) reopenSoon();
    if (typeof fn !== "function") return function () {};
    var mine = {};
    (topics.assets || []).forEach(function (id) { mine[id] = true; });
    var sites = {};
    (topics.sites || []).forEach(function (id) { sites[id] = true; });
    var all = (topics.assets || []).indexOf("*") >= 0;
    var offs = [
      on("samples", function (samples) {
        var picked = samples.filter(function (s) {
          return all || mine[s.asset_id] || sites[s.site_id];
        });
        if (picked.length) fn("samples", picked);
      }),
      on("resync", function (data) { fn("resync", data); }),
    ];
    if (topics.dispatch) offs.push(on("dispatch", function (data) { fn("dispatch", data); }));
    return function () { offs.forEach(function (off) { off(); }); };
  }

  function scan(root) {
    var topics = { assets: [], sites: [], dispatch: "" };
    var scope = root || document;
    scope.querySelectorAll("[data-asset-id][data-field], [data-asset-id] [data-field]").forEach(
      function (el) {
        var owner = el.hasAttribute("data-asset-id") ? el : el.closest("[data-asset-id]");
        topics.assets.push(owner.getAttribute("data-asset-id"));
      }
    );
    if (scope.querySelector('[data-live-topic="fleet"]') ||
        (scope.matches && scope.matches('[data-live-topic="fleet"]'))) {
      topics.assets.push("*");
    }
    scope.querySelectorAll("[data-live-assets]").forEach(function (el) {
      var seen = {};
      addList(seen, el.getAttribute("data-live-assets"));
      topics.assets = topics.assets.concat(Object.keys(seen));
    });
    scope.querySelectorAll("[data-live-sites]").forEach(function (el) {
      var seen = {};
      addList(seen, el.getAttribute("data-live-sites"));
      topics.sites = topics.sites.concat(Object.keys(seen));
    });
    scope.querySelectorAll("[data-live-dispatch]").forEach(function (el) {
      var value = el.getAttribute("data-live-dispatch") || "1";
      if (value === "all" || !topics.dispatch) topics.dispatch = value;
    });
    subscribe(topics);
  }

  function url() {
    var params = new URLSearchParams();
    var assets = Object.keys(wanted.assets);
    if (wanted.allAssets) params.set("assets", "*");
    else if (assets.length) params.set("assets", assets.join(","));
    var sites = Object.keys(wanted.sites);
    if (sites.length) params.set("sites", sites.join(","));
    if (wanted.dispatch) params.set("dispatch", wanted.dispatch);
    return "/console/events?" + params.toString();
  }

  function reopenSoon() {
    if (ended) return;
    if (reopenTimer) clearTimeout(reopenTimer);
    reopenTimer = setTimeout(open, 50);
  }

  function open() {
    reopenTimer = null;
    if (source) source.close();
    if (!wanted.allAssets && !Object.keys(wanted.assets).length &&
        !Object.keys(wanted.sites).length && !wanted.dispatch) {
      source = null;
      return;
    }
    setStatus("connecting", "live: connecting");
    source = new EventSource(url(), { withCredentials: true });
    source.onopen = function () {
      setStatus("live", "live: on");
      emit("open", null);
    };
    source.onerror = function () {
      // The browser reconnects by itself unless the server refused the stream.
      var closed = source && source.readyState === EventSource.CLOSED;
      setStatus("offline", closed ? "live: off" : "live: reconnecting");
      emit("error", { closed: closed });
    };
    source.addEventListener("samples", function (ev) {
      var samples = JSON.parse(ev.data);
      samples.forEach(function (s) { lastSamples[s.asset_id] = s; });
      updateFields(samples);
      emit("samples", samples);
    });
    source.addEventListener("dispatch", function (ev) {
      emit("dispatch", JSON.parse(ev.data));
    });
    source.addEventListener("resync", function (ev) {
      emit("resync", ev.data);
    });
    source.addEventListener("bye", function (ev) {
      ended = true;
      source.close();
      setStatus("offline", "live: ended (" + ev.data + ")");
      emit("bye", ev.data);
    });
  }

  function utcTime(iso) {
    // as the server renders times: UTC, "YYYY-MM-DD HH:MM:SS"
    var d = new Date(iso);
    if (isNaN(d.getTime())) return String(iso);
    return d.toISOString().replace("T", " ").slice(0, 19);
  }

  function valueOf(sample, field, el) {
    if (field === "key") {
      var key = el.getAttribute("data-key");
      return key && sample.details ? sample.details[key] : undefined;
    }
    if (field === "last_seen") return sample.ts;
    var value = sample;
    field.split(".").forEach(function (part) {
      value = value == null ? undefined : value[part];
    });
    return value;
  }

  function format(value, el, field) {
    if (value === undefined || value === null) return "–";
    if (field === "last_seen") {
      el.setAttribute("data-ts", value);
      return utcTime(value);
    }
    if (typeof value === "number") {
      var fallback = field === "key" ? "1" : /^mw/.test(field) ? "3" : "2";
      var digits = parseInt(el.getAttribute("data-digits") || fallback, 10);
      value = value.toFixed(digits);
    } else if (typeof value === "boolean") {
      value = value ? "yes" : "no";
    }
    var unit = el.getAttribute("data-unit");
    return unit ? value + " " + unit : String(value);
  }

  function updateFields(samples) {
    samples.forEach(function (s) {
      var owner = '[data-asset-id="' + CSS.escape(s.asset_id) + '"]';
      var selector = owner + "[data-field], " + owner + " [data-field]";
      document.querySelectorAll(selector).forEach(function (el) {
        var field = el.getAttribute("data-field");
        var value = valueOf(s, field, el);
        if (value === undefined) return; // not a sample field (connected, buffer...)
        var text = format(value, el, field);
        // a cell holding one badge (<span class="badge">) keeps it: its text changes
        var target = el.children.length === 1 ? el.firstElementChild : el;
        if (target.textContent !== text) {
          target.textContent = text;
          el.classList.remove("live-flash");
          void el.offsetWidth; // restart the CSS animation
          el.classList.add("live-flash");
        }
        el.setAttribute("data-updated", s.ts);
      });
    });
  }

  window.DerLive = window.derLive = {
    on: on,
    subscribe: subscribe,
    scan: scan,
    latest: function (assetId) { return lastSamples[assetId]; },
    close: function () { ended = true; if (source) source.close(); },
  };

  document.addEventListener("DOMContentLoaded", function () { scan(document); });
  // Parts swapped in by htmx may carry new data-asset-id elements.
  document.addEventListener("htmx:afterSwap", function (ev) { scan(ev.target); });
  window.addEventListener("pagehide", function () { if (source) source.close(); });
})();
