"""The run browser's jinja2 templates (autoescaped: run ids, config values and reasons are user text). Kept in a
module rather than as package data, so the installed package and the images carry them without packaging rules.

Stable element ids (the browser tests rely on them; docs/browser.md lists them): every page has
``<main id="page-NAME">`` (runs, run, compare, releases, monitoring); tables ``runs-table`` (rows ``data-run-id``),
``steps-table``, ``gates-table``, ``metrics-table``, ``config-table``, ``compare-table``, ``releases-timeline``
(rows ``data-record-id``), ``monitoring-table`` (rows ``data-window``); charts ``<div class="chart"
id="chart-NAME">`` (``chart-accuracy``, ``chart-steps``, ``chart-compare``, ``chart-releases``,
``chart-monitoring-trend``); reports ``<section class="report" id="report-NAME">``.
"""

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}{% endblock %} - kfp-mlops runs</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{{ root }}assets/site.css">
</head><body>
<nav><strong>kfp-mlops</strong>
<a href="{{ root }}index.html">Runs</a> <a href="{{ root }}compare.html">Compare</a>
<a href="{{ root }}releases.html">Releases</a> <a href="{{ root }}monitoring.html">Monitoring</a></nav>
{% block main %}{% endblock %}
{% if problems %}<aside id="problems"><h2>Could not read</h2><ul>
{% for p in problems %}<li>{{ p }}</li>{% endfor %}</ul></aside>{% endif %}
<footer>Built {{ built_at }} from {{ runs_dir }} (read-only). <code>mlops ui</code> serves it and rebuilds it when
runs change.</footer>
{% if charts %}<script src="{{ root }}assets/plotly.min.js"></script>{% endif %}
<script src="{{ root }}assets/site.js"></script>
</body></html>
"""

CHART = """{% macro chart(name, figure) %}<div class="chart" id="chart-{{ name }}"></div>
<script type="application/json" data-chart="chart-{{ name }}">{{ figure }}</script>{% endmacro %}
{% macro gate_cell(passed) %}{% if passed is none %}<td class="gate none" title="did not run">-</td>
{% elif passed %}<td class="gate passed">passed</td>{% else %}<td class="gate blocked">BLOCKED</td>{% endif %}
{% endmacro %}
{% macro num(value, digits=3) %}{% if value is none %}-{% elif value is number %}{{ value|round(digits) }}{% else %}{{ value }}{% endif %}{% endmacro %}
{% macro run_link(run_id, root, known) %}{% if run_id and run_id in known %}<a href="{{ root }}run/{{ run_id|urlencode }}.html">{{ run_id }}</a>{% elif run_id %}{{ run_id }}{% else %}-{% endif %}{% endmacro %}
"""

RUNS = """{% extends "base" %}{% from "chart" import chart, gate_cell, num %}
{% block title %}Runs{% endblock %}
{% block main %}<main id="page-runs"><h1>Runs</h1>
{% if production %}<p id="production">In production: model <code>{{ production.model_version }}</code>
{% if production.run_id %}from run <a href="run/{{ production.run_id|urlencode }}.html">{{ production.run_id }}</a>{% endif %}
 ({{ production.serving }}{% if production.stopped_at %} since {{ production.stopped_at }}{% endif %}).</p>
{% else %}<p id="production">Nothing in production: no serving state and no release in the ledger.</p>{% endif %}
{% if not runs %}<p id="runs-empty">No runs under {{ runs_dir }} yet. Make one with
<code>mlops run --config examples/quick.yaml</code> (about a minute) or <code>mlops run</code>, then reload
(<code>mlops ui</code> rebuilds this page; <code>mlops ui --build-only</code> rewrites the files).</p>
{% else %}
{{ chart("accuracy", accuracy_figure) }}
<p><button id="compare-selected" data-href="compare.html">Compare selected</button> <span id="compare-hint"></span></p>
<table id="runs-table"><thead><tr><th></th><th>run</th><th>status</th><th>started (UTC)</th><th>duration</th>
<th>model version</th><th>test accuracy</th>{% for g in gate_names %}<th>{{ g }}</th>{% endfor %}
<th>CPU s</th><th>wall s (steps)</th><th>production</th></tr></thead><tbody>
{% for r in runs %}<tr data-run-id="{{ r.run_id }}" data-status="{{ r.status }}" class="status-{{ r.status }}">
<td><input type="checkbox" class="compare-pick" value="{{ r.run_id }}" aria-label="compare {{ r.run_id }}"></td>
<td><a href="run/{{ r.run_id|urlencode }}.html">{{ r.run_id }}</a></td>
<td class="status">{{ r.status }}{% if r.failed_step %} ({{ r.failed_step }}){% endif %}</td>
<td>{{ r.started_at|when }}</td><td>{% if r.seconds is not none %}{{ r.seconds|round(1) }} s{% else %}-{% endif %}</td>
<td><code>{{ r.model_version or "-" }}</code></td><td>{{ num(r.test_accuracy, 4) }}</td>
{% for g in gate_names %}{{ gate_cell(r.gates.get(g)) }}{% endfor %}
<td>{{ num(r.cost.cpu_seconds, 1) }}</td><td>{{ num(r.cost.wall_seconds, 1) }}</td>
<td class="production">{% if r.in_production %}in production{% endif %}</td></tr>
{% endfor %}</tbody></table>{% endif %}
</main>{% endblock %}
"""

RUN = """{% extends "base" %}{% from "chart" import chart, gate_cell, num %}
{% block title %}Run {{ run.run_id }}{% endblock %}
{% block main %}<main id="page-run" data-run-id="{{ run.run_id }}"><h1>Run {{ run.run_id }}</h1>
<p id="run-status" class="status-{{ run.status }}">{{ run.status }}{% if run.blocked_by %}: blocked by
{{ run.blocked_by|join(", ") }}{% endif %}{% if run.failed_step %}: step {{ run.failed_step }} failed{% endif %}
{% if run.in_production %} - <strong>in production</strong>{% endif %}</p>
{% if run.problem %}<p class="problem">{{ run.problem }}</p>{% endif %}
<dl id="run-facts"><dt>started (UTC)</dt><dd>{{ run.started_at or "-" }}</dd>
<dt>duration</dt><dd>{% if run.seconds is not none %}{{ run.seconds|round(1) }} s{% else %}-{% endif %}</dd>
<dt>model version</dt><dd><code>{{ run.model_version or "-" }}</code></dd>
<dt>test accuracy</dt><dd>{{ num(run.test_accuracy, 4) }}</dd>
<dt>cost</dt><dd>{{ num(run.cost.wall_seconds, 1) }} s wall, {{ num(run.cost.cpu_seconds, 1) }} s CPU,
{{ num(run.cost.gpu_seconds, 1) }} s GPU, peak {{ num(run.cost.peak_rss_mb, 0) }} MB</dd>
<dt>runner</dt><dd>{{ run.runner or "-" }}</dd>
{% if run.endpoint %}<dt>endpoint</dt><dd>{{ run.endpoint }}</dd>{% endif %}
{% if run.overridden_gates %}<dt>overridden gates</dt><dd>{{ run.overridden_gates|join(", ") }}</dd>{% endif %}
{% if run.log %}<dt>log</dt><dd><code>{{ run.log }}</code></dd>{% endif %}</dl>
<h2>Steps</h2>
{% if run.steps %}{{ chart("steps", steps_figure) }}{% endif %}
<table id="steps-table"><thead><tr><th>step</th><th>status</th><th>seconds</th><th>CPU s</th><th>peak MB</th>
<th>after</th><th>note</th></tr></thead><tbody>
{% for s in run.steps %}<tr data-step="{{ s.name }}" class="status-{{ s.status }}"><td>{{ s.name }}</td>
<td class="status">{{ s.status }}</td><td>{{ num(s.seconds, 2) }}</td><td>{{ num(s.cost.get("cpu_seconds"), 1) }}</td>
<td>{{ num(s.cost.get("peak_rss_mb"), 0) }}</td><td>{{ s.parents|join(", ") }}</td><td>{{ s.reason or "" }}</td></tr>
{% else %}<tr><td colspan="7">The summary lists no steps.</td></tr>{% endfor %}</tbody></table>
<h2>Gates</h2>
<table id="gates-table"><thead><tr><th>gate</th><th>verdict</th><th>reason</th></tr></thead><tbody>
{% for g in run.gates_detail %}<tr data-gate="{{ g.name }}"><td>{{ g.name }}</td>{{ gate_cell(g.passed) }}
<td>{{ g.reason or "" }}{% if g.overridden %} (overridden){% endif %}</td></tr>{% endfor %}</tbody></table>
<h2>Metrics</h2>
<table id="metrics-table"><tbody>{% for k, v in run.metrics.items() %}<tr><th>{{ k }}</th><td>{{ num(v, 4) }}</td></tr>
{% else %}<tr><td>No metrics (evaluate did not finish).</td></tr>{% endfor %}</tbody></table>
<h2>Reports</h2>
{% for rep in reports %}<section class="report report-{{ rep.kind }}" id="report-{{ rep.name }}"><h3>{{ rep.name }}
{% if rep.href %}<a href="{{ rep.href }}">open</a>{% endif %}</h3>
{% if not rep.exists %}<p class="problem">{{ rep.path }} is gone.</p>
{% elif rep.kind == "markdown" %}<div class="markdown">{{ rep.body }}</div>
{% elif rep.kind == "html" %}<iframe sandbox="allow-scripts allow-same-origin" src="{{ rep.href }}" title="{{ rep.name }} report" loading="lazy"></iframe>
{% elif rep.kind == "json" %}<pre>{{ rep.body }}</pre>
{% else %}<p><code>{{ rep.path }}</code></p>{% endif %}</section>
{% else %}<p>No reports: the steps that write them did not run.</p>{% endfor %}
<h2>Config</h2>
{% if run.config_problem %}<p class="problem">{{ run.config_problem }}</p>{% endif %}
<details><summary>{{ config|length }} settings</summary><table id="config-table"><tbody>
{% for k, v in config.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</tbody></table></details>
</main>{% endblock %}
"""

COMPARE = """{% extends "base" %}
{% block title %}Compare{% endblock %}
{% block main %}<main id="page-compare"><h1>Compare runs</h1>
<p id="compare-empty" hidden>Pick two or more runs on the <a href="index.html">runs page</a> (or open
<code>compare.html?runs=RUN_A,RUN_B</code>).</p>
<p id="compare-missing" class="problem" hidden></p>
<p><label><input type="checkbox" id="compare-only-diff"> only what differs</label></p>
<div class="chart" id="chart-compare"></div>
<table id="compare-table"><thead></thead><tbody></tbody></table>
<script type="application/json" id="compare-data">{{ compare_data }}</script>
</main>{% endblock %}
"""

RELEASES = """{% extends "base" %}{% from "chart" import chart, run_link %}
{% block title %}Releases{% endblock %}
{% block main %}<main id="page-releases"><h1>Releases</h1>
<p>The release ledger {% if ledger %}<code>{{ ledger }}</code>{% endif %}: what served when, promotions, rollbacks,
drift verdicts and retrains, newest first.</p>
{% if production %}<p id="production">In production: model <code>{{ production.model_version }}</code>
{% if production.record %}(record {{ production.record }}){% endif %} {{ run_link(production.run_id, "", known_runs) }}</p>{% endif %}
{% if not events %}<p id="releases-empty">No ledger records yet: a run's record step writes them
(<code>mlops run</code>), as do <code>mlops serve start</code>, <code>mlops releases</code> and <code>mlops monitor</code>.</p>
{% else %}{{ chart("releases", releases_figure) }}{% endif %}
<table id="releases-timeline"><thead><tr><th>at (UTC)</th><th>record</th><th>event</th><th>model version</th>
<th>run</th><th>what</th><th>report</th><th>by</th></tr></thead><tbody>
{% for e in events %}<tr data-record-id="{{ e.id }}" data-type="{{ e.type }}" class="event-{{ e.type }}{% if e.drift_detected %} drifted{% endif %}">
<td>{{ e.at|when }}</td><td>{{ e.id }}</td><td>{{ e.type }}</td><td><code>{{ e.model_version or "-" }}</code></td>
<td>{{ run_link(e.run_id, "", known_runs) }}</td><td>{{ e.summary }}</td>
<td>{% if e.href %}<a href="{{ e.href }}">report</a>{% endif %}</td><td>{{ e.actor }}</td></tr>
{% endfor %}</tbody></table>
</main>{% endblock %}
"""

MONITORING = """{% extends "base" %}{% from "chart" import chart, num, run_link %}
{% block title %}Monitoring{% endblock %}
{% block main %}<main id="page-monitoring"><h1>Monitoring windows</h1>
{% if not windows %}<p id="monitoring-empty">No monitoring window yet: a run's monitor step judges its replay, and
<code>mlops monitor --last 1h</code> judges served traffic (results under {{ runs_dir }}/monitor).</p>
{% else %}{{ chart("monitoring-trend", trend_figure) }}{% endif %}
<table id="monitoring-table"><thead><tr><th>window (UTC)</th><th>model version</th><th>verdict</th><th>drift share</th>
<th>drifted features</th><th>requests</th><th>run</th><th>ledger</th><th>report</th></tr></thead><tbody>
{% for w in windows %}<tr data-window="{{ w.model_version }}/{{ w.since }}--{{ w.until }}" class="verdict-{{ w.status }}">
<td>{{ w.since|when if w.since else "start" }} - {{ w.until|when if w.until else "open" }}</td><td><code>{{ w.model_version or "all" }}</code></td>
<td class="verdict">{{ w.status }}</td><td>{{ num(w.drift_share, 3) }}</td>
<td>{{ w.drifted_features|join(", ") or "none" }}</td><td>{{ num(w.current_rows, 0) }}</td>
<td>{{ run_link(w.run_id, "", known_runs) }}</td><td>{{ w.ledger_record or "-" }}</td>
<td>{% if w.href %}<a href="{{ w.href }}">report</a>{% endif %}</td></tr>
{% endfor %}</tbody></table>
</main>{% endblock %}
"""

TEMPLATES = {"base": BASE, "chart": CHART, "runs": RUNS, "run": RUN, "compare": COMPARE, "releases": RELEASES,
             "monitoring": MONITORING}
