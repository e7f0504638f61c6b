"""``"module:attr"`` names resolved on use: the one place the harness imports lazily by name.

Backends and model families are named this way so that a backend's optional packages (mlx,
llama_cpp, transformers) are imported only when that backend runs.
"""

from __future__ import annotations

import importlib
from typing import Any


def resolve(spec: str) -> Any:
    """The attribute ``attr`` of ``module`` for ``"module:attr"``, imported now."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)
