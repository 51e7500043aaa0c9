/* Sortable tables: a click on a column heading's button sorts the rows by that column, a second click
   reverses the order. Cells may carry data-value (numbers); empty values always sort last. */
(function () {
  "use strict";

  function key(cell, type) {
    var v = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent.trim();
    if (type === "num") {
      var n = parseFloat(v);
      return v === "" || isNaN(n) ? null : n;
    }
    return v.toLowerCase();
  }

  document.querySelectorAll("table[data-sortable]").forEach(function (table) {
    var heads = table.querySelectorAll("thead th");
    heads.forEach(function (th, col) {
      var button = th.querySelector("button[data-sort]");
      if (!button) { return; }
      button.addEventListener("click", function () {
        var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
        heads.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
        th.setAttribute("aria-sort", dir);
        var type = button.getAttribute("data-sort");
        var sign = dir === "ascending" ? 1 : -1;
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[col], type);
          var y = key(b.cells[col], type);
          if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }
          return x < y ? -sign : (x > y ? sign : 0);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
})();
