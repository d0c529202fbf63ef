// jobq web: live parts of a page, where scripts run. Every few seconds it fetches the page
// it is on and swaps each element marked data-live for its fresh copy (same id). The copy
// comes from the server already escaped, is parsed inertly (DOMParser runs no script), and
// no string is ever put into the page as HTML. Without scripts the pages are plain links and
// forms: reload to refresh.
(function () {
  "use strict";
  var every = parseInt(document.body.getAttribute("data-live-every"), 10) || 2000;

  function note(text) {
    var el = document.getElementById("live-state");
    if (el) { el.textContent = text; }
  }

  function busy(region) {  // someone is typing or choosing inside it: leave it alone
    var active = document.activeElement;
    return active && active !== document.body && region.contains(active) &&
      /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName);
  }

  function refresh() {
    var regions = document.querySelectorAll("[data-live]");
    if (!regions.length) { return; }
    if (document.hidden) { setTimeout(refresh, every); return; }
    fetch(window.location.href, {credentials: "same-origin", cache: "no-store",
                                 headers: {"Accept": "text/html"}})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html");
        regions.forEach(function (region) {
          var copy = fresh.getElementById(region.id);
          if (copy && !busy(region)) { region.replaceWith(document.importNode(copy, true)); }
        });
        note("· live: updated " + new Date().toLocaleTimeString());
      })
      .catch(function (error) { note("· live: cannot refresh (" + error.message + ")"); })
      .then(function () { setTimeout(refresh, every); });
  }

  setTimeout(refresh, every);
}());
