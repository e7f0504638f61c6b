"""A pair's per-point NMSE as a compact layer × capture-point heatmap (an HTML table).

One glance shows where a port drifts (a row), where it breaks (a layer) and the first divergence
(the cell marked ✕), for any number of layers; twelve overlaid line series did not.  Colours
are log10(NMSE / tolerance) through matplotlib's RdYlGn_r: green far below the tolerance,
yellow at it, red above.  Exact matches, points that were not compared and router-id points
(compared by set agreement, no NMSE) have colours of their own; every cell's tooltip holds its
exact value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm, to_hex

from harness.core.capture_points import Kind, parse

__all__ = ["Heatmap", "HeatmapCell", "heatmap", "legend"]

# log10(NMSE / tolerance) range of the colour scale: 12 decades below the tolerance to 4 above.
_LOW, _HIGH = -12.0, 4.0
_NORM = TwoSlopeNorm(vmin=_LOW, vcenter=0.0, vmax=_HIGH)
_CMAP = colormaps["RdYlGn_r"]
EXACT = "#3b75c4"  # NMSE exactly 0: blue, apart from the green "far below tolerance"
MISSING = "#d9d9d9"  # not compared (only on one side, or not applicable)
INDEX_PASS, INDEX_FAIL = "#2da44e", "#cf222e"


@dataclass(frozen=True)
class HeatmapCell:
    """One capture point: its colour, tooltip, and whether it failed or is the first divergence."""

    point: str
    color: str
    title: str
    css: str = ""


@dataclass
class Heatmap:
    """Rows are capture-point stems in forward order, columns layers; trunk and MTP points (no
    layer) form one extra row of their own."""

    layers: list[int]
    rows: list[tuple[str, list[HeatmapCell | None]]] = field(default_factory=list)
    globals: list[HeatmapCell] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.rows and not self.globals


def _color(row: dict, tolerance: float) -> tuple[str, str]:
    """(colour, value text) of one table row."""
    if row["kind"] == Kind.INDEX.value:
        agree = row["index_agreement"]
        text = "–" if pd.isna(agree) else f"index agreement {agree:.4g}"
        return (INDEX_PASS if row["passed"] else INDEX_FAIL), text
    value = row["nmse"]
    if pd.isna(value):
        color = MISSING if row["passed"] else to_hex(_CMAP(1.0))  # failed: not comparable
        return color, row["note"] or "not compared"
    if value == 0:
        return EXACT, "nmse 0 (exact)"
    if math.isinf(value):
        return to_hex(_CMAP(1.0)), "nmse inf"
    scaled = min(max(math.log10(value / tolerance), _LOW), _HIGH)
    return to_hex(_CMAP(float(_NORM(scaled)))), f"nmse {value:.2e}"


def _cell(row: dict, tolerance: float, first: str | None) -> HeatmapCell:
    color, value = _color(row, tolerance)
    css = "first" if row["point"] == first else ("" if row["passed"] else "fail")
    verdict = "FAIL" if not row["passed"] else "pass"
    title = f"{row['point']}: {value} ({verdict}; tolerance {tolerance:g})"
    return HeatmapCell(str(row["point"]), color, title, css)


def heatmap(
    table: pd.DataFrame, first_divergence: str | None, tolerance: float | None = None
) -> Heatmap:
    """The heatmap of one pair's per-point table (``PairResult.table``), coloured against its
    NMSE ``tolerance`` (``PairResult.tolerance.nmse``; 1e-6 when none is known or the table is
    informational, held to no bound: a quantized port's quantization-error table)."""
    tolerance = float(tolerance or 0)
    tolerance = tolerance if 0 < tolerance < math.inf else 1e-6
    records = table.to_dict("records")
    per_layer: dict[str, dict[int, HeatmapCell]] = {}
    order: dict[str, int] = {}
    out = Heatmap(layers=[])
    for i, rec in enumerate(records):
        spec, layer = parse(str(rec["point"]))
        cell = _cell(rec, tolerance, first_divergence)
        if layer is None:
            out.globals.append(cell)
            continue
        per_layer.setdefault(spec.stem, {})[layer] = cell
        order.setdefault(spec.stem, i)
    out.layers = sorted({layer for cells in per_layer.values() for layer in cells})
    for stem in sorted(per_layer, key=order.__getitem__):
        cells = per_layer[stem]
        out.rows.append((stem, [cells.get(layer) for layer in out.layers]))
    return out


def legend() -> list[tuple[str, str]]:
    """(colour, label) swatches explaining the scale, for the report's key."""
    steps = [(-12, "≤ 1e-12 × tol"), (-8, "1e-8 × tol"), (-4, "1e-4 × tol"), (0, "= tolerance"),
             (2, "100 × tol"), (4, "≥ 1e4 × tol")]
    return ([(EXACT, "exact (0)")]
            + [(to_hex(_CMAP(float(_NORM(v)))), label) for v, label in steps]
            + [(MISSING, "not compared"), (INDEX_PASS, "router ids agree"),
               (INDEX_FAIL, "router ids differ")])
