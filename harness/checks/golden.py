"""Saved reference captures ("golden runs"), like llama-perplexity's ``--kl-divergence-base``.

The float64 reference of a real checkpoint needs a big machine; the ports are checked on a small
one.  ``python -m harness capture`` runs only the reference and writes its captures here;
``parity --golden`` compares ports against them without loading the reference's weights.

A golden run is a folder: ``manifest.json`` plus ``captures-NNNNN-of-NNNNN.safetensors`` shards.
The manifest ties the captures to what produced them, so they are never compared with another
model: the canonical config.json and its hash, a fingerprint of the checkpoint (every tensor's
name, dtype, shape and a digest of three sampled 4 KiB blocks of its bytes, never a full read),
the prompt's tokens, the reference target (dtype, load mode, slope convention), the capture
points, the storage dtype, each shard's size and sha256, and the harness and library versions.

Storage is float64 by default: the float64 candidate tolerance (NMSE 1e-18) is below the error
a float32 store adds (about 1e-15, measured in tests/test_golden_store.py), so only float64
keeps every verdict and NMSE of a direct run; ``--store-dtype float32`` halves the size and is
refused for float64 candidates.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.backends.targets import Target
from harness.core.atomic import staged_dir, write_text
from harness.core.captures import Captures
from harness.core.errors import InputError

FORMAT = "bailing-parity-golden/1"
MANIFEST = "manifest.json"
STORE_DTYPES = ("float64", "float32")
SHARD_BYTES = 1 << 30  # captures per safetensors shard (a 64-token run of Ling-2.6-flash: ~1 GB)
SAMPLE_BLOCK = 4096  # bytes read from the start, middle and end of every tensor
FINGERPRINT_VERSION = "golden-v1"
LIST_LIMIT = 3
VERSIONED = ("numpy", "torch", "safetensors", "mlx", "mlx-lm", "llama_cpp_python", "gguf")


# --- identity of the checkpoint ------------------------------------------------------------
def config_digest(raw: Mapping[str, Any]) -> str:
    """sha256 of config.json's content (canonical JSON: key order and spacing do not count)."""
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()


def _sampled_digest(fh: Any, start: int, lo: int, hi: int) -> str:
    """16 hex digits of sha256 over a tensor's first, middle and last SAMPLE_BLOCK bytes."""
    h = hashlib.sha256()
    size = hi - lo
    for offset in sorted({0, max(0, size // 2 - SAMPLE_BLOCK // 2), max(0, size - SAMPLE_BLOCK)}):
        fh.seek(start + lo + offset)
        h.update(fh.read(min(SAMPLE_BLOCK, size - offset)))
    return h.hexdigest()[:16]


def checkpoint_fingerprint(checkpoint: Path) -> dict[str, Any]:
    """Every tensor -> [dtype, shape, sampled-bytes digest], and one digest over all of them.

    Reads the safetensors headers and 12 KiB per tensor (about 300 MB for a 24k-tensor
    checkpoint's worth of seeks, not its 208 GB)."""
    from harness.llamacpp.identity import _safetensors_header
    from references.checkpoint_io import IGNORED_SUFFIXES, weight_files

    where = weight_files(Path(checkpoint))
    by_file: dict[Path, list[str]] = {}
    for name in sorted(where):
        if not name.endswith(IGNORED_SUFFIXES):
            by_file.setdefault(where[name], []).append(name)
    tensors: dict[str, list[Any]] = {}
    for path, names in by_file.items():
        header, start = _safetensors_header(path)
        with path.open("rb") as fh:
            for name in names:
                meta = header[name]
                lo, hi = (int(x) for x in meta["data_offsets"])
                tensors[name] = [meta["dtype"], list(meta["shape"]),
                                 _sampled_digest(fh, start, lo, hi)]
    tensors = dict(sorted(tensors.items()))
    digest = hashlib.sha256(json.dumps([FINGERPRINT_VERSION, tensors]).encode()).hexdigest()
    return {"version": FINGERPRINT_VERSION, "digest": digest, "tensors": tensors}


def _listed(items: Sequence[str]) -> str:
    more = f" (+{len(items) - LIST_LIMIT} more)" if len(items) > LIST_LIMIT else ""
    return "; ".join(items[:LIST_LIMIT]) + more


def fingerprint_differences(recorded: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, tensor by tensor (empty when they match)."""
    if recorded.get("digest") == here.get("digest"):
        return []
    old, new = recorded.get("tensors", {}), here.get("tensors", {})
    out = [f"tensor {n} is missing here" for n in old if n not in new]
    out += [f"tensor {n} is not in the golden run" for n in new if n not in old]
    for n in (n for n in new if n in old and old[n] != new[n]):
        (d0, s0, _), (d1, s1, _) = old[n], new[n]
        if (d0, s0) != (d1, s1):
            out.append(f"tensor {n} is {d1} {s1} here, {d0} {s0} in the golden run")
        else:
            out.append(f"tensor {n} has other bytes")
    return out or [f"fingerprint {here.get('version')} differs from {recorded.get('version')}"]


_ABSENT = object()


def config_differences(recorded: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """Keys of config.json whose values differ (here vs recorded)."""
    keys = sorted(set(recorded) | set(here))
    return [f"{k}={here.get(k, '<absent>')!r} here, {recorded.get(k, '<absent>')!r} in the "
            "golden run" for k in keys if recorded.get(k, _ABSENT) != here.get(k, _ABSENT)]


# --- writing -------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """The harness's and the numeric libraries' versions (absent ones left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("bailing-parity", *VERSIONED):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def target_json(target: Target) -> dict[str, Any]:
    return {"label": target.label, "backend": target.backend, "dtype": target.dtype,
            "extra": [list(kv) for kv in target.extra]}


def _stored(array: np.ndarray, store_dtype: str) -> np.ndarray:
    arr = np.ascontiguousarray(array)
    return arr.astype(store_dtype) if arr.dtype.kind in "fc" else arr


def _shards(captures: Captures, store_dtype: str) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in captures.items():
        arr = _stored(np.asarray(value), store_dtype)
        if shards[-1] and size + arr.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    return shards


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_golden(out: Path, captures: Captures, manifest: Mapping[str, Any],
                 store_dtype: str = "float64") -> Path:
    """Write the captures and ``manifest`` (plus the shards' records) as one folder that
    appears complete under ``out`` or not at all (harness.core.atomic.staged_dir)."""
    from safetensors.numpy import save_file

    if store_dtype not in STORE_DTYPES:
        raise InputError(f"--store-dtype {store_dtype!r}; expected one of "
                         f"{', '.join(STORE_DTYPES)}")
    shards = _shards(captures, store_dtype)
    with staged_dir(out) as tmp:
        files = []
        for i, shard in enumerate(shards):
            name = f"captures-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": FORMAT})
            files.append({"file": name, "size": (tmp / name).stat().st_size,
                          "sha256": _file_digest(tmp / name), "points": sorted(shard)})
        full = {"format": FORMAT, **manifest, "store_dtype": store_dtype,
                "capture_points": list(captures), "files": files}
        write_text(tmp / MANIFEST, json.dumps(full, indent=1))
    return out


# --- reading -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GoldenRun:
    """A golden run's manifest, read and checked for shape; captures are read on demand."""

    path: Path
    manifest: dict[str, Any]

    @property
    def tokens(self) -> list[int]:
        return list(self.manifest["tokens"])

    @property
    def store_dtype(self) -> str:
        return str(self.manifest["store_dtype"])

    @property
    def reference(self) -> Target:
        ref = self.manifest["reference"]
        return Target(ref["backend"], ref["dtype"], tuple(tuple(kv) for kv in ref["extra"]))

    @property
    def slope_convention(self) -> dict[str, str] | None:
        return self.manifest.get("slope_convention")

    def check_checkpoint(self, checkpoint: Path, raw_config: Mapping[str, Any]) -> None:
        """InputError naming what differs when ``checkpoint`` is not the one captured."""
        where = self.path / MANIFEST
        if config_digest(raw_config) != self.manifest["config_sha256"]:
            diff = config_differences(self.manifest.get("config", {}), raw_config)
            raise InputError(f"{where}: captured from another config than {checkpoint}/"
                             f"config.json: {_listed(diff or ['content differs'])}")
        diff = fingerprint_differences(self.manifest["fingerprint"],
                                       checkpoint_fingerprint(checkpoint))
        if diff:
            raise InputError(f"{where}: captured from other weights than {checkpoint}: "
                             f"{_listed(diff)}")

    def check_tokens(self, tokens: Sequence[int], source: str) -> None:
        """InputError when ``tokens`` (from ``source``) are not the golden run's prompt."""
        mine = self.tokens
        if list(tokens) == mine:
            return
        at = next((i for i, (a, b) in enumerate(zip(tokens, mine, strict=False)) if a != b),
                  min(len(tokens), len(mine)))
        raise InputError(f"{source}: tokens differ from the golden run's ({self.path / MANIFEST}):"
                         f" {len(tokens)} vs {len(mine)} tokens, first difference at position "
                         f"{at}; leave --prompt-tokens out to use the golden run's")

    def captures(self) -> Captures:
        """Every stored capture; a missing, truncated or altered shard is an InputError naming
        the file (its size and sha256 are checked against the manifest before it is parsed)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        out: Captures = {}
        for rec in self.manifest["files"]:
            path = self.path / rec["file"]
            if not path.is_file():
                raise InputError(f"{path}: golden capture file missing")
            size = path.stat().st_size
            if size != rec["size"]:
                raise InputError(f"{path}: golden capture file is {size} bytes, the manifest "
                                 f"records {rec['size']} (truncated or replaced)")
            if _file_digest(path) != rec["sha256"]:
                raise InputError(f"{path}: golden capture file has other bytes than the manifest "
                                 "records (corrupted)")
            try:
                shard = load_file(str(path))
            except (SafetensorError, OSError, ValueError) as e:
                raise InputError(f"{path}: unreadable golden capture file ({e})") from None
            out.update(shard)
        missing = [p for p in self.manifest["capture_points"] if p not in out]
        if missing:
            raise InputError(f"{self.path / MANIFEST}: capture points {_listed(missing)} are in "
                             "no capture file")
        return {p: out[p] for p in self.manifest["capture_points"]}


REQUIRED_KEYS = ("tokens", "reference", "config_sha256", "fingerprint", "files",
                 "capture_points", "store_dtype")


def open_golden(path: Path) -> GoldenRun:
    """The golden run in folder ``path``; InputError naming the file for anything unusable."""
    where = Path(path) / MANIFEST
    if not where.is_file():
        raise InputError(f"{where}: not found (--golden takes a folder written by "
                         "`python -m harness capture`)")
    try:
        manifest = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{where}: unreadable golden manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{where}: not a golden manifest of format {FORMAT}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise InputError(f"{where}: golden manifest lacks {', '.join(missing)}")
    if manifest["store_dtype"] not in STORE_DTYPES:
        raise InputError(f"{where}: store_dtype {manifest['store_dtype']!r}; expected one of "
                         f"{', '.join(STORE_DTYPES)}")
    return GoldenRun(Path(path), manifest)
