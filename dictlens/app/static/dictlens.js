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
