"""What a run ran on, recorded in every report and summary: the Python, the machine, and the
versions of the libraries whose numbers the report compares."""

from __future__ import annotations

import platform
from importlib import metadata

__all__ = ["environment"]

_DISTRIBUTIONS: tuple[str, ...] = ("torch", "mlx", "mlx-lm", "numpy", "llama-cpp-python")


def environment() -> dict[str, str]:
    """What the run ran on: recorded in every report (a package not installed says so)."""
    env = {"python": platform.python_version(), "machine": platform.platform()}
    for dist in _DISTRIBUTIONS:
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = "not installed"
    return env
