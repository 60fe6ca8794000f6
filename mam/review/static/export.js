// mam review, export page: while an export runs, reload the page when it is done.
"use strict";
(function () {
  const box = document.getElementById("export-status");
  if (!box || box.dataset.state !== "running") return;
  const ROOT = document.querySelector('meta[name="app-root"]').content;
  async function poll() {
    try {
      const r = await fetch(ROOT + "/export/status", { headers: { Accept: "application/json" } });
      const d = await r.json();
      if (d.state !== "running") { location.reload(); return; }
      box.textContent = `Exporting\u2026 ${d.done} of ${d.total} recordings.`;
    } catch (e) { /* retry */ }
    setTimeout(poll, 1000);
  }
  setTimeout(poll, 500);
})();
