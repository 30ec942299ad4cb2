// hello plugin: a live preview of the greeting, from the plugin's JSON API.
// Progressive enhancement only: the form works without JavaScript.
(function () {
  "use strict";

  var preview = document.getElementById("preview");
  var input = document.getElementById("name");
  if (!preview || !input || !window.fetch) return;

  var url = preview.getAttribute("data-preview-url");
  var timer = null;
  var inflight = null;

  function show(text, isError) {
    preview.textContent = text;
    preview.classList.toggle("is-error", Boolean(isError));
  }

  function update() {
    var name = input.value.trim();
    if (!name) { show(""); return; }
    if (inflight) inflight.abort();
    inflight = new AbortController();
    fetch(url + "?name=" + encodeURIComponent(name), {
      headers: { "Accept": "application/json" },
      signal: inflight.signal
    })
      .then(function (response) { return response.json(); })
      .then(function (data) {
        if (data.error) show(data.error, true);
        else show("Preview: " + data.greeting);
      })
      .catch(function (error) {
        if (error.name !== "AbortError") show("");
      });
  }

  input.addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(update, 200);
  });
})();
