// der-sdk console helpers, shared by every page (served from the headend, no CDN).
// window.derConsole.csrfToken()        the session's CSRF token (from <meta name="csrf-token">)
// window.derConsole.fetch(url, opts)   fetch() that sends the CSRF token and same-origin cookies;
//                                      a JSON body (opts.json) is serialised with its content type
// window.derConsole.formatMw(x)        "1.234 MW" style text for a number (or "–")
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
  window.derConsole = { csrfToken: csrfToken, fetch: consoleFetch, formatMw: formatMw };
})();
