"""Checks of the HTML reports the steps write: which plotly figures a page draws, and that it fetches nothing."""

import re

PLOTLY_BUNDLE = "* plotly.js v"  # the banner at the top of the embedded plotly.js


def plotly_ids(page: str) -> list[str]:
    """The div ids of the page's figures, in order (one ``Plotly.newPlot("id", ...)`` call each)."""
    return re.findall(r'Plotly\.newPlot\(\s*"([^"]+)"', page)


def external_sources(page: str) -> list[str]:
    """src / href attributes of the page's tags that point anywhere but into the page itself (script bodies, the
    embedded plotly.js among them, are code, not tags)."""
    tags = re.sub(r"(<script[^>]*>).*?(</script>)", r"\1\2", page, flags=re.IGNORECASE | re.DOTALL)
    refs = re.findall(r"""<[a-z]+[^>]*?\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", tags, re.IGNORECASE)
    return [r for r in refs if not r.startswith(("#", "data:"))]


def assert_offline_report(page: str, figure_ids: list[str]) -> None:
    """A whole page that draws exactly ``figure_ids``, carries plotly.js once (none without figures) and needs
    nothing from the network."""
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert plotly_ids(page) == figure_ids
    assert page.count(PLOTLY_BUNDLE) == (1 if figure_ids else 0)
    assert external_sources(page) == []
    assert not re.search(r"<link|@import", page.split(PLOTLY_BUNDLE)[0], re.IGNORECASE)


def figure_traces(page: str, div_id: str) -> list[dict]:
    """The traces of one figure as plotly wrote them, read back from its ``Plotly.newPlot`` call."""
    import json

    start = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*', page).end()
    traces, _ = json.JSONDecoder().raw_decode(page, start)
    return traces
