// Placeholder until the console-live part lands: it replaces this file with the helper
// that subscribes pages to the one SSE stream (/console/events) by topic.
(function () {
  "use strict";
  window.derLive = window.derLive || { subscribe: function () { return function () {}; } };
})();
