// Filter the feature table (works from disk: no requests).
(function () {
  const box = document.getElementById("filter");
  const table = document.getElementById("features");
  if (!box || !table) return;
  const rows = Array.from(table.tBodies[0].rows);
  const shown = document.getElementById("shown");
  function apply() {
    const q = box.value.trim().toLowerCase();
    let n = 0;
    for (const r of rows) {
      const hit = !q || r.dataset.search.toLowerCase().split(" ").some((w) => w === q || (isNaN(q) && w.includes(q)));
      r.hidden = !hit;
      if (hit) n++;
    }
    if (shown) shown.textContent = q ? n + " shown" : "";
  }
  box.addEventListener("input", apply);
  apply();
})();

// Sort the feature table by a numeric column (click its header; again to reverse).
(function () {
  const table = document.getElementById("features");
  if (!table) return;
  table.querySelectorAll("th.sortable").forEach((th) => {
    th.addEventListener("click", () => {
      const col = th.cellIndex;
      const down = th.dataset.dir !== "down";
      th.dataset.dir = down ? "down" : "up";
      const body = table.tBodies[0];
      const rows = Array.from(body.rows);
      rows.sort((a, b) => (parseFloat(b.cells[col].dataset.v) - parseFloat(a.cells[col].dataset.v)) * (down ? 1 : -1));
      rows.forEach((r) => body.appendChild(r));
    });
  });
})();
