"""Atomic outputs: a file or folder appears complete under its final name, or not at all.

Every cache entry, run folder and baseline goes through these two helpers, so a run killed at
any moment (SIGTERM, Ctrl-C, a crash) leaves no half-written file that looks finished, and its
temporary sibling is removed on the way out.  A rename within one folder is atomic on POSIX.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _tmp_prefix(final: Path) -> str:
    # Hidden, and named after its target, so a leftover (only after SIGKILL) says what it was.
    return f".{final.name}.tmp-"


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``path`` through a temporary sibling and ``os.replace``; replaces any old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """:func:`write_bytes` for UTF-8 text."""
    return write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_dir(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; on success it is renamed to ``final``.

    On any exception (KeyboardInterrupt and the harness's termination included) the temporary
    folder is removed and ``final`` is untouched.  ``final`` must not exist unless ``replace``
    (an existing empty folder counts as free); with ``replace`` an old entry is swapped out only
    once the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
    try:
        yield tmp
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final}: exists; refusing to overwrite it")
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final) + "old-", dir=final.parent))
            old.rmdir()
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``path`` for the block.

    Two processes (pytest-xdist workers, two CLI runs) that would build the same cache entry
    take it in turn; the second then finds the entry complete instead of racing the first.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
