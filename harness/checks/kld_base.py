"""The reference's logits over a corpus, saved once and reused (``kld --save-base`` /
``kld --base``), like llama-perplexity's ``--kl-divergence-base`` file.

A base is a folder: ``manifest.json`` plus one ``chunk-NNNNN.safetensors`` per chunk holding that
chunk's ``tokens`` (int64, ``ctx``) and the reference's ``logits`` at the scored positions
(float64, ``[ctx - 1 - ctx // 2, vocab]``: llama-perplexity scores the second half of each chunk).
float64 and not llama's 16-bit log-probs, so a base run gives a direct run's numbers exactly.
The manifest ties it to the checkpoint (config digest and golden.checkpoint_fingerprint), the
reference target and slope convention, ``ctx`` and the chunk count; a base of anything else is
refused (InputError, exit 2) before a model loads. Written atomically (complete or absent).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.checks.golden import check_recorded_checkpoint, read_manifest
from harness.core.atomic import staged_dir, write_text
from harness.core.cache import file_sha256
from harness.core.errors import InputError

FORMAT = "bailing-parity-kld-base/1"
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format", "ctx", "n_chunks", "first", "reference", "config_sha256",
                 "fingerprint", "files")


def chunk_file(i: int) -> str:
    return f"chunk-{i + 1:05d}.safetensors"


class BaseWriter:
    """Collects the chunks' reference logits in a folder; :meth:`finish` writes the manifest."""

    def __init__(self, folder: Path, manifest: Mapping[str, Any]) -> None:
        self.folder = folder
        self.manifest = dict(manifest)
        self.files: list[dict[str, Any]] = []

    def add(self, tokens: Sequence[int], logits: np.ndarray) -> None:
        """One chunk's tokens and the reference's scored logits (kept in float64)."""
        from safetensors.numpy import save_file

        name = chunk_file(len(self.files))
        path = self.folder / name
        save_file({"tokens": np.asarray(tokens, dtype=np.int64),
                   "logits": np.ascontiguousarray(logits, dtype=np.float64)},
                  str(path), metadata={"format": FORMAT})
        self.files.append({"file": name, "size": path.stat().st_size, "sha256": file_sha256(path)})

    def finish(self) -> None:
        write_text(self.folder / MANIFEST,
                   json.dumps({"format": FORMAT, **self.manifest, "files": self.files}, indent=1))


@contextmanager
def writing_base(out: Path, manifest: Mapping[str, Any]) -> Iterator[BaseWriter]:
    """A :class:`BaseWriter` on a staged folder that appears as ``out`` only when complete."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: --save-base exists and is not an empty folder; a base is never "
                         "overwritten")
    with staged_dir(out) as tmp:
        writer = BaseWriter(tmp, manifest)
        yield writer
        writer.finish()


@dataclass(frozen=True)
class KldBase:
    """A saved base: its manifest, checked for shape; chunks are read one at a time."""

    path: Path
    manifest: dict[str, Any]

    @property
    def ctx(self) -> int:
        return int(self.manifest["ctx"])

    @property
    def n_chunks(self) -> int:
        return int(self.manifest["n_chunks"])

    def check_checkpoint(self, checkpoint: Path, raw_config: Mapping[str, Any]) -> None:
        """InputError naming what differs when ``checkpoint`` is not the one the base ran."""
        check_recorded_checkpoint(self.path / MANIFEST, self.manifest, checkpoint, raw_config,
                                  "the base was computed")

    def check_run(self, *, ctx: int | None, chunks: int | None,
                  tokens: np.ndarray | None, corpus: Path | None) -> None:
        """InputError when a given ``--ctx``, ``--chunks`` or ``--corpus`` disagrees with it."""
        where = self.path / MANIFEST
        if ctx is not None and ctx != self.ctx:
            raise InputError(f"--ctx {ctx}: the base {where} was computed with ctx {self.ctx}; "
                             "leave --ctx out or save a new base")
        if chunks is not None and chunks != self.n_chunks:
            raise InputError(f"--chunks {chunks}: the base {where} holds {self.n_chunks} chunks; "
                             "leave --chunks out or save a new base")
        if tokens is not None:
            mine = self.tokens()
            if tokens.shape != mine.shape or not np.array_equal(tokens, mine):
                flat_a, flat_b = tokens.ravel(), mine.ravel()
                n = min(flat_a.size, flat_b.size)
                at = int(np.flatnonzero(flat_a[:n] != flat_b[:n])[0]) if np.any(
                    flat_a[:n] != flat_b[:n]) else n
                raise InputError(f"--corpus {corpus}: its tokens differ from the base's ({where}):"
                                 f" first difference at token {at}; leave --corpus out to use "
                                 "the base's tokens")

    def _load(self, i: int) -> dict[str, np.ndarray]:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        rec = self.manifest["files"][i]
        path = self.path / rec["file"]
        if not path.is_file():
            raise InputError(f"{path}: base chunk file missing")
        if path.stat().st_size != rec["size"] or file_sha256(path) != rec["sha256"]:
            raise InputError(f"{path}: base chunk file has other bytes than the manifest records "
                             "(truncated or altered)")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{path}: unreadable base chunk file ({e})") from None

    def tokens(self) -> np.ndarray:
        """Every chunk's tokens, ``[n_chunks, ctx]``."""
        return np.stack([self._load(i)["tokens"] for i in range(self.n_chunks)])

    def logits(self, i: int) -> np.ndarray:
        """Chunk ``i``'s scored reference logits."""
        return self._load(i)["logits"]


def open_base(path: Path) -> KldBase:
    """The base in folder ``path``; InputError naming the file for anything unusable."""
    where = Path(path) / MANIFEST
    manifest = read_manifest(path, FORMAT, REQUIRED_KEYS, kind="kld base", option="--base",
                             writer="python -m harness kld --save-base")
    if len(manifest["files"]) != manifest["n_chunks"]:
        raise InputError(f"{where}: lists {len(manifest['files'])} chunk files for "
                         f"{manifest['n_chunks']} chunks")
    return KldBase(Path(path), manifest)
