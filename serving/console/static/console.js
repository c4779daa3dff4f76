// agencyllm console: copy buttons and focus on a newly minted key. Everything works without it
// (keys can be selected and copied by hand); nothing here talks to any server.
(function () {
  "use strict";
  function status(id, text) {
    var out = document.querySelector('[data-copy-status="' + id + '"]');
    if (out) { out.textContent = text; }
  }
  function copyFrom(id) {
    var source = document.getElementById(id);
    if (!source) { return; }
    var text = source.value !== undefined ? source.value : source.textContent;
    var done = function () { status(id, "Copied to the clipboard."); };
    var fallback = function () {
      if (source.select) { source.select(); } else {
        var range = document.createRange(); range.selectNodeContents(source);
        var sel = window.getSelection(); sel.removeAllRanges(); sel.addRange(range);
      }
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      status(id, ok ? "Copied to the clipboard." : "Selected: press Ctrl+C (or Cmd+C) to copy.");
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, fallback);
    } else {
      fallback();
    }
  }
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (button) { copyFrom(button.getAttribute("data-copy")); }
  });
  document.addEventListener("DOMContentLoaded", function () {
    var first = document.querySelector("[data-autofocus]");
    if (first) { first.focus(); }
  });
})();
