"""The run browser: ``mlops runs list|show|compare`` and ``mlops ui`` (docs/browser.md).

``catalog`` reads runs, the release ledger and the monitoring windows into plain dicts; ``pages`` renders them
(jinja2, autoescaped; charts with plotly); ``site`` writes the static site (``runs/ui/``); ``server`` serves it
read-only on loopback; ``cli`` registers the commands.
"""
