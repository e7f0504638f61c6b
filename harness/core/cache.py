"""The one cache root: checkpoints, GGUFs, llama.cpp builds and venvs all live under it.

Outside the repository so that wiping nox's venvs never costs a rebuild.  ``BAILING_PARITY_CACHE``
overrides it; otherwise ``$XDG_CACHE_HOME/bailing-parity`` (``~/.cache/bailing-parity``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV", "root"]

ENV = "BAILING_PARITY_CACHE"


def root() -> Path:
    """The cache root, read from the environment on every call (tests point it elsewhere)."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "bailing-parity"
