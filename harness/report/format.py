"""The one number formatter of the report, registered as the Jinja filter ``num``.

Every table cell that holds a number goes through :func:`fmt_number`, so "not applicable" (None,
NaN, ``pd.NA``) reads the same everywhere: an en dash.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

__all__ = ["MISSING", "fmt_number", "is_missing"]

MISSING = "–"


def is_missing(value: Any) -> bool:
    """None, NaN or ``pd.NA``: a value a cell shows as :data:`MISSING`."""
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def fmt_number(value: Any, spec: str = "") -> str:
    """``value`` in the format ``spec`` (``format``'s mini-language; integers keep integer specs
    such as ``d``), or :data:`MISSING` for a value that is not there."""
    if is_missing(value):
        return MISSING
    if isinstance(value, bool) or not spec:
        return format(value, spec)
    if spec.endswith("d"):
        return format(int(value), spec) if float(value).is_integer() else format(value, spec)
    return format(float(value), spec)
