// mam review worklist: sort by any column, filter by text, review state, result and domain.
// Filtering happens here, in the browser: nothing typed into the filters reaches a URL or a log.
"use strict";
(function () {
  const table = document.getElementById("worklist");
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const colIndex = {};
  Array.from(table.tHead.rows[0].cells).forEach((th, i) => { colIndex[th.dataset.col] = i; });
  const f = {
    text: document.getElementById("f-text"),
    state: document.getElementById("f-state"),
    label: document.getElementById("f-label"),
    domain: document.getElementById("f-domain"),
  };
  const shown = document.getElementById("shown");
  const KEY = "mam-review-worklist";

  function apply() {
    const q = f.text.value.trim().toLowerCase();
    let n = 0;
    for (const tr of rows) {
      const ok = (!q || tr.dataset.text.includes(q)) &&
        (!f.state.value || tr.dataset.state === f.state.value) &&
        (!f.label.value || tr.dataset.label === f.label.value) &&
        (!f.domain.value || tr.dataset.domain === f.domain.value);
      tr.hidden = !ok;
      n += ok;
    }
    shown.textContent = n + " of " + rows.length + " shown";
    // Only the choices are remembered (never the text typed: it may be a name).
    sessionStorage.setItem(KEY, JSON.stringify({
      state: f.state.value, label: f.label.value, domain: f.domain.value,
      sort: table.dataset.sort || "", dir: table.dataset.dir || "",
    }));
  }

  function sortBy(col, dir) {
    const i = colIndex[col];
    const th = table.tHead.rows[0].cells[i];
    const num = th.dataset.type === "num";
    const sign = dir === "descending" ? -1 : 1;
    const key = (tr) => {
      const v = tr.cells[i].dataset.v;
      return num ? (v === "" || v === "None" ? -Infinity : parseFloat(v)) : (v || "").toLowerCase();
    };
    const sorted = rows.slice().sort((a, b) => {
      const ka = key(a), kb = key(b);
      return ka < kb ? -sign : ka > kb ? sign : 0;
    });
    for (const c of table.tHead.rows[0].cells) c.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", dir);
    table.dataset.sort = col;
    table.dataset.dir = dir;
    const frag = document.createDocumentFragment();
    sorted.forEach((tr) => frag.appendChild(tr));
    body.appendChild(frag);
  }

  for (const th of table.tHead.rows[0].cells) {
    th.tabIndex = 0;
    const go = () => {
      const dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
      sortBy(th.dataset.col, dir);
      apply();
    };
    th.addEventListener("click", go);
    th.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); go(); } });
  }
  for (const el of Object.values(f)) el.addEventListener("input", apply);

  try {
    const saved = JSON.parse(sessionStorage.getItem(KEY) || "{}");
    for (const k of ["state", "label", "domain"]) if (saved[k]) f[k].value = saved[k];
    if (saved.sort && colIndex[saved.sort] !== undefined) sortBy(saved.sort, saved.dir || "ascending");
  } catch (e) { /* nothing saved */ }
  apply();
})();
