/* der-sdk operator console: the Dispatch form's schedule fields. With steps, Target MW
 * stays empty (give MW or steps), so it is not required then; the server checks again. */
(function () {
  "use strict";
  function bind(steps) {
    var form = steps.form;
    var mw = form && form.querySelector("[data-dispatch-mw]");
    if (!mw) return;
    function sync() {
      var stepped = steps.value.trim() !== "";
      mw.required = !stepped;
      mw.disabled = stepped;
    }
    steps.addEventListener("input", sync);
    sync();
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-schedule-steps]").forEach(bind);
  });
})();
