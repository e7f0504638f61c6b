"""Charts for report sections: a matplotlib figure with the words a screen reader says, turned
into inline SVG (the Jinja filter ``svg``) only when the page is rendered."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import matplotlib as mpl
from markupsafe import Markup, escape
from matplotlib.figure import Figure

__all__ = ["Chart", "inline_svg"]


@dataclass(frozen=True)
class Chart:
    """A figure for a section: ``prefix`` keeps its SVG ids unique on the page, ``label`` is its
    accessible name."""

    figure: Figure
    prefix: str
    label: str


def inline_svg(chart: Chart) -> Markup:
    """The figure as an SVG element for inline HTML, with ids made unique per chart."""
    buf = io.StringIO()
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": chart.prefix}):
        chart.figure.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.DOTALL)
    # Inline SVG in HTML needs no namespace declarations; dropping them keeps the page URL-free.
    svg = re.sub(r'\s+xmlns(?::\w+)?="[^"]*"', "", svg)
    prefix = chart.prefix
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', svg)
    svg = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", svg)
    label = escape(chart.label)
    # Trusted: matplotlib wrote the SVG from our figure; the label is escaped above.
    return Markup(svg.replace("<svg", f'<svg role="img" aria-label="{label}"', 1))
