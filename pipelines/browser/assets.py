"""The site's stylesheet and script, written to ``<site>/assets/`` beside plotly.min.js (from the installed plotly).

The script draws every chart from the JSON in ``<script type="application/json" data-chart=ID>`` (no inline
script, so the server can forbid them), sends the runs page's checked runs to the compare page, and builds the
compare page from the data embedded in it and its query string (``?runs=a,b,c``): it works from disk too.
It only ever sets ``textContent``: run ids and config values are user text.
"""

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 1.5rem 2rem; color: #1d2330; }
nav { padding: .7rem 0; border-bottom: 1px solid #d8dce4; margin-bottom: 1rem; }
nav a { margin-left: 1rem; }
table { border-collapse: collapse; margin: .5rem 0 1.2rem; }
th, td { border-bottom: 1px solid #e3e6ec; padding: .25rem .6rem; text-align: left; vertical-align: top; }
thead th { background: #f3f5f8; }
code { font-size: 12px; }
.status-succeeded .status, .gate.passed, .verdict-ok .verdict { color: #11753a; }
.status-blocked .status, .gate.blocked, .verdict-drift .verdict, .verdict-schema_drift .verdict { color: #b3261e;
  font-weight: 600; }
.status-failed .status, .status-unreadable .status, .problem { color: #b3261e; }
.status-skipped .status, .gate.none, .status-unfinished .status { color: #6b7280; }
td.production { font-weight: 600; color: #1a56b0; }
tr.differs td { background: #fff6d6; }
.chart { width: 100%; max-width: 1100px; height: 360px; }
iframe { width: 100%; height: 720px; border: 1px solid #d8dce4; resize: vertical; }
.markdown { max-width: 1000px; }
pre { background: #f6f7f9; padding: .6rem; overflow: auto; max-height: 480px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }
dt { color: #6b7280; } dd { margin: 0; }
footer { margin-top: 2rem; color: #6b7280; font-size: 12px; }
aside#problems { border: 1px solid #b3261e; padding: .5rem 1rem; margin-top: 1rem; }
"""

JS = r"""
(function () {
  "use strict";
  var plotConfig = { displaylogo: false, responsive: true };

  function plot(id, figure) {
    if (window.Plotly && document.getElementById(id)) {
      window.Plotly.newPlot(id, figure.data, figure.layout || {}, plotConfig);
    }
  }

  document.querySelectorAll("script[data-chart]").forEach(function (node) {
    plot(node.getAttribute("data-chart"), JSON.parse(node.textContent));
  });

  var button = document.getElementById("compare-selected");
  if (button) {
    button.addEventListener("click", function () {
      var ids = Array.prototype.map.call(document.querySelectorAll("input.compare-pick:checked"),
                                         function (box) { return box.value; });
      if (ids.length < 2) {
        document.getElementById("compare-hint").textContent = "Pick at least two runs.";
        return;
      }
      window.location.href = button.getAttribute("data-href") + "?runs=" +
        ids.map(encodeURIComponent).join(",");
    });
  }

  var dataNode = document.getElementById("compare-data");
  if (dataNode) { compare(JSON.parse(dataNode.textContent)); }

  function cellText(value) {
    if (value === null || value === undefined) { return "-"; }
    if (typeof value === "number") { return String(Math.round(value * 1e6) / 1e6); }
    if (typeof value === "object") { return JSON.stringify(value); }
    return String(value);
  }

  function compare(data) {
    var asked = new URLSearchParams(window.location.search).get("runs");
    var ids = asked ? asked.split(",").filter(function (id) { return id.length > 0; }) : [];
    var missing = ids.filter(function (id) { return !(id in data.runs); });
    ids = ids.filter(function (id) { return id in data.runs; });
    if (missing.length) {
      var note = document.getElementById("compare-missing");
      note.textContent = "No such run here: " + missing.join(", ") + ".";
      note.hidden = false;
    }
    if (ids.length < 2) {
      document.getElementById("compare-empty").hidden = false;
      return;
    }
    var table = document.getElementById("compare-table");
    var head = table.tHead.insertRow();
    ["section", "key"].concat(ids).forEach(function (text) {
      var th = document.createElement("th");
      th.textContent = text;
      head.appendChild(th);
    });
    var body = table.tBodies[0];
    data.sections.forEach(function (section) {
      var keys = [];
      ids.forEach(function (id) {
        Object.keys(data.runs[id][section]).forEach(function (key) {
          if (keys.indexOf(key) < 0) { keys.push(key); }
        });
      });
      keys.forEach(function (key) {
        var cells = ids.map(function (id) { return cellText(data.runs[id][section][key]); });
        var row = body.insertRow();
        var differs = cells.some(function (c) { return c !== cells[0]; });
        row.className = differs ? "differs" : "same";
        row.setAttribute("data-section", section);
        row.setAttribute("data-key", key);
        [section, key].concat(cells).forEach(function (text) { row.insertCell().textContent = text; });
      });
    });
    var only = document.getElementById("compare-only-diff");
    only.addEventListener("change", function () {
      body.querySelectorAll("tr.same").forEach(function (row) { row.hidden = only.checked; });
    });
    var metrics = [];
    ids.forEach(function (id) {
      Object.keys(data.runs[id].metrics).forEach(function (key) {
        var value = data.runs[id].metrics[key];  // the shares (accuracy, F1, ECE): one scale for all bars
        if (metrics.indexOf(key) < 0 && typeof value === "number" && value >= 0 && value <= 1) { metrics.push(key); }
      });
    });
    plot("chart-compare", {
      data: ids.map(function (id) {
        return { type: "bar", name: id, x: metrics,
                 y: metrics.map(function (key) { return data.runs[id].metrics[key]; }) };
      }),
      layout: { title: { text: "Metrics" }, barmode: "group", margin: { t: 40, b: 120 } }
    });
  }
})();
"""
