// tally ops: refreshes the overview's figures in place at the interval the
// operator picked (0 pauses). Without this script the page refreshes whole
// (a <noscript> meta refresh), so every page works without JavaScript.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) return;
  var seconds = parseInt(live.getAttribute("data-refresh"), 10) || 0;
  var select = document.getElementById("refresh");
  var timer = null;
  function schedule() {
    if (timer) clearTimeout(timer);
    timer = seconds > 0 ? setTimeout(refresh, seconds * 1000) : null;
  }
  function refresh() {
    fetch(live.getAttribute("data-src"), { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        // A lapsed session answers the sign-in page: load it whole.
        if (response.status === 401) { window.location.reload(); return null; }
        return response.ok ? response.text() : null;
      })
      .then(function (html) { if (html !== null) live.innerHTML = html; })
      .catch(function () { /* keep the figures shown; try again next time */ })
      .then(schedule);
  }
  if (select) {
    select.addEventListener("change", function () {
      seconds = parseInt(select.value, 10) || 0;
      var url = new URL(window.location.href);
      url.searchParams.set("refresh", String(seconds));
      window.history.replaceState(null, "", url.toString());
      schedule();
    });
  }
  schedule();
})();
