"""The cache key of a checkpoint folder: cheap at any size, and never stale.

A GGUF converted from a checkpoint is reused while the checkpoint's identity holds.  The identity
hashes small files whole and counts weight files by name, size, mtime and a few sampled tensor
bytes, so a 208 GB checkpoint costs a few MB of reads, and any rewrite of a weight file (which
changes its mtime) converts again.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from harness.checks.cases import CASES_DIR, load_case, materialize
from harness.llamacpp.identity import checkpoint_identity


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    src = materialize(load_case(CASES_DIR / "flash-mini.toml"))
    dst = tmp_path / "flash-mini"
    shutil.copytree(src, dst)
    return dst


def _weights(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*.safetensors"))[0]


def test_the_identity_is_stable_while_nothing_changes(ckpt: Path) -> None:
    assert checkpoint_identity(ckpt) == checkpoint_identity(ckpt)


def test_a_copy_elsewhere_with_the_same_times_has_the_same_identity(ckpt: Path, tmp_path: Path):
    other = tmp_path / "elsewhere"
    shutil.copytree(ckpt, other)  # copy2 keeps mtimes
    assert checkpoint_identity(other) == checkpoint_identity(ckpt)


def test_rewriting_sampled_bytes_changes_the_identity_even_with_the_old_mtime(ckpt: Path):
    """The sampled tensors tie the key to bytes, not only to file times (the first sorted tensor
    is always sampled)."""
    from harness.llamacpp.identity import _safetensors_header
    from references.checkpoint_io import weight_files

    before = checkpoint_identity(ckpt)
    where = weight_files(ckpt)
    first = sorted(where)[0]
    header, start = _safetensors_header(where[first])
    offset = start + int(header[first]["data_offsets"][0])
    w = where[first]
    st = w.stat()
    data = bytearray(w.read_bytes())
    data[offset] ^= 0xFF  # same size
    w.write_bytes(bytes(data))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert checkpoint_identity(ckpt) != before


def test_touching_a_weight_file_converts_again(ckpt: Path) -> None:
    """Conservative by design: a new mtime is a new identity (one more conversion, never a
    stale GGUF)."""
    before = checkpoint_identity(ckpt)
    w = _weights(ckpt)
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert checkpoint_identity(ckpt) != before


def test_an_edited_config_changes_the_identity(ckpt: Path) -> None:
    before = checkpoint_identity(ckpt)
    cfg = ckpt / "config.json"
    cfg.write_text(cfg.read_text().replace('"rms_norm_eps"', '"rms_norm_eps" ', 1))
    assert checkpoint_identity(ckpt) != before
