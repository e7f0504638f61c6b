"""The one cache root: checkpoints, GGUFs, llama.cpp builds and venvs all live under it.

Outside the repository so that wiping nox's venvs never costs a rebuild.  ``BAILING_PARITY_CACHE``
overrides it; otherwise ``$XDG_CACHE_HOME/bailing-parity`` (``~/.cache/bailing-parity``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["EDGE_BYTES", "ENV", "file_key", "file_sha256", "root"]

EDGE_BYTES = 2**20  # bytes hashed at each end of a file for its content key

ENV = "BAILING_PARITY_CACHE"


def root() -> Path:
    """The cache root, read from the environment on every call (tests point it elsewhere)."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "bailing-parity"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks (a recorded file is checked whole)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_key(path: Path, *salt: str) -> str:
    """A content key for a large file without reading it all: its size, mtime, first and last
    MiB, and ``salt`` (what is derived from it: a quant type, a tool version ...)."""
    st = path.stat()
    h = hashlib.sha256("\0".join((str(st.st_size), str(st.st_mtime_ns), *salt)).encode())
    with path.open("rb") as fh:
        h.update(fh.read(EDGE_BYTES))
        fh.seek(max(0, st.st_size - EDGE_BYTES))
        h.update(fh.read(EDGE_BYTES))
    return h.hexdigest()[:20]
