// The leaderboard site's one script, inlined into every page: sortable columns and filters, nothing fetched.
"use strict";
(function () {
  function cellValue(row, index) {
    var cell = row.cells[index];
    return cell ? (cell.getAttribute("data-value") || cell.textContent.trim()) : "";
  }

  function compare(a, b, numeric) {
    if (numeric) {
      var x = parseFloat(a), y = parseFloat(b);
      var xn = isNaN(x), yn = isNaN(y);
      if (xn || yn) { return xn === yn ? 0 : (xn ? 1 : -1); } // blanks last, whatever the direction
      return x - y;
    }
    return a.localeCompare(b);
  }

  function sortBy(table, th) {
    var index = Array.prototype.indexOf.call(th.parentNode.children, th);
    var numeric = th.classList.contains("num");
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r1, r2) {
      var v1 = cellValue(r1, index), v2 = cellValue(r2, index);
      var blank1 = numeric && isNaN(parseFloat(v1)), blank2 = numeric && isNaN(parseFloat(v2));
      if (blank1 || blank2) { return blank1 === blank2 ? 0 : (blank1 ? 1 : -1); }
      var c = compare(v1, v2, numeric);
      return ascending ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }

  function applyFilters(table, controls, counter) {
    var shown = 0;
    Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
      var keep = controls.every(function (c) {
        var want = c.value.trim().toLowerCase();
        if (!want) { return true; }
        if (c.tagName === "SELECT") { return row.getAttribute("data-" + c.getAttribute("data-col")) === c.value; }
        return row.textContent.toLowerCase().indexOf(want) !== -1;
      });
      row.hidden = !keep;
      if (keep) { shown += 1; }
    });
    if (counter) { counter.textContent = shown + " of " + table.tBodies[0].rows.length + " rows shown"; }
    revealMatches(table, controls);
  }

  // A long cell keeps most of its text in a closed <details>: the search matches it there (textContent), so
  // open the ones whose hidden text holds the search, to show why the row is kept; close again only those
  // opened here, never one the reader opened.
  function revealMatches(table, controls) {
    var want = controls.filter(function (c) { return c.tagName !== "SELECT"; })
      .map(function (c) { return c.value.trim().toLowerCase(); }).filter(Boolean);
    Array.prototype.forEach.call(table.querySelectorAll("details.long"), function (d) {
      var full = d.querySelector(".full"), preview = d.querySelector(".preview");
      var hidden = full ? full.textContent.toLowerCase() : "", shown = preview ? preview.textContent.toLowerCase() : "";
      var reveal = !d.closest("tr").hidden && want.some(function (w) {
        return hidden.indexOf(w) !== -1 && shown.indexOf(w) === -1;
      });
      if (reveal && !d.open) { d.open = true; d.setAttribute("data-revealed", ""); }
      if (!reveal && d.hasAttribute("data-revealed")) { d.open = false; d.removeAttribute("data-revealed"); }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
        th.addEventListener("click", function () { sortBy(table, th); });
      });
      var panel = document.querySelector('.filters[data-for="' + table.id + '"]');
      if (!panel) { return; }
      var controls = Array.prototype.slice.call(panel.querySelectorAll("select, input"));
      var counter = panel.querySelector(".count");
      controls.forEach(function (c) {
        c.addEventListener(c.tagName === "SELECT" ? "change" : "input", function () {
          applyFilters(table, controls, counter);
        });
      });
      applyFilters(table, controls, counter);
    });
  });
})();
