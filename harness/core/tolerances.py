"""Pass thresholds for a comparison, parsed from a case's config so a typo never loosens a gate."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from harness.core.capture_points import Kind

__all__ = ["Tolerance"]


@dataclass(frozen=True)
class Tolerance:
    """Pass thresholds for one comparison; kept with the results so a verdict can be re-read."""

    nmse: float  # max NMSE for DENSE and LOGITS points
    top1: float = 1.0  # min fraction of LOGITS rows with the same argmax
    index_agreement: float = 1.0  # min fraction of INDEX rows with identical id sets

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"tolerance {f.name!r} must be a number, got {value!r}")
            if math.isnan(value) or value < 0:
                raise ValueError(f"tolerance {f.name!r} must be >= 0, got {value!r}")
            if f.name != "nmse" and value > 1:
                raise ValueError(f"tolerance {f.name!r} is a fraction in [0, 1], got {value!r}")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> Tolerance:
        """Build from a config table; unknown keys are errors so a typo never loosens a gate."""
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise ValueError(
                    f"unknown tolerance key {key!r}; expected one of: {', '.join(known)}"
                )
        if "nmse" not in d:
            raise ValueError("tolerance needs an 'nmse' key (max allowed NMSE)")
        return cls(**{key: _number(key, value) for key, value in d.items()})

    def threshold(self, kind: Kind) -> str:
        """The rule a point of ``kind`` must meet, as shown in tables, e.g. ``nmse<=1e-08``."""
        if kind is Kind.INDEX:
            return f"index_agreement>={self.index_agreement:g}"
        if kind is Kind.LOGITS:
            return f"nmse<={self.nmse:g}, top1>={self.top1:g}"
        return f"nmse<={self.nmse:g}"


def _number(key: str, value: object) -> float:
    """A config value as a float (YAML reads "1e-8" as a string); ValueError naming the key."""
    if not isinstance(value, bool):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
    raise ValueError(f"tolerance {key!r} must be a number, got {value!r}")
