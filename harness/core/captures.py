"""What every backend returns and every check compares: captures keyed by capture-point name.

Lives in the core so the comparison engine, the golden store and the llama.cpp name maps can speak
of captures without importing the backend protocol (:mod:`harness.backends.base` re-exports it).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DTYPES", "Captures"]

# Canonical capture-point name -> float64 (INDEX points: int64) array, token axis first.
Captures = dict[str, np.ndarray]

# The compute dtypes a backend may be asked for, most precise first.
DTYPES = ("float64", "float32", "bfloat16")
