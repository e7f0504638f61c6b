"""Read an HF-layout checkpoint directory and check it against the config before any compute.

Accepts one ``model.safetensors``, or shards listed by ``model.safetensors.index.json``, plus any
other ``model*.safetensors`` (upstream keeps the MTP layer in ``model-mtp-layer.safetensors``).
Every problem is an :class:`~harness.core.errors.InputError` naming the file and tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from harness.core.errors import InputError
from references.checkpoint_spec import expected_tensors
from references.config import BailingHybridConfig

INDEX_NAME = "model.safetensors.index.json"
# Set to 1 (the CLI's --allow-extra-tensors does) to ignore tensors config.json does not account
# for, with a finding, instead of refusing the checkpoint.
ALLOW_EXTRA_ENV = "BAILING_PARITY_ALLOW_EXTRA_TENSORS"
# Non-persistent buffers some exports carry; every consumer recomputes them (the llama.cpp
# converter drops them too), so they are neither expected nor extra.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".slope")
LIST_LIMIT = 5  # names shown in one message


def extra_tensors_allowed() -> bool:
    """Whether tensors config.json does not account for are ignored (env ``ALLOW_EXTRA_ENV``)."""
    return os.environ.get(ALLOW_EXTRA_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _first(names: list[str], limit: int = LIST_LIMIT) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def weight_file_list(checkpoint_dir: Path) -> tuple[list[Path], dict[str, Path]]:
    """(every weights file, the index's name -> file map or {}): the files the index lists plus
    every other ``model*.safetensors`` (upstream keeps the MTP layer in its own file)."""
    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / INDEX_NAME
    listed: dict[str, Path] = {}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            listed = {str(n): checkpoint_dir / str(f) for n, f in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{index}: not a valid safetensors index ({e})") from None
        for f in sorted(set(listed.values())):
            if not f.is_file():
                raise InputError(f"{index}: lists {f.name}, which does not exist")
    files = sorted(set(listed.values()))
    files += sorted(p for p in checkpoint_dir.glob("model*.safetensors") if p not in files)
    if not files:
        raise InputError(f"{checkpoint_dir}: no model*.safetensors files")
    return files, listed


def tensor_files(checkpoint_dir: Path) -> dict[str, list[Path]]:
    """Every tensor name -> the files that hold it (headers only), in weight_file_list order."""
    files, _ = weight_file_list(checkpoint_dir)
    held: dict[str, list[Path]] = {}
    for f in files:
        for name in _keys(f):
            held.setdefault(name, []).append(f)
    return held


def weight_files(checkpoint_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the one file holding it.

    A name held by two files is refused (InputError naming the tensor and both files): loaders
    disagree on which copy wins, so the reference and a port would run different weights and the
    difference would be blamed on the port.  So is an index entry naming a file that lacks it.
    """
    _, listed = weight_file_list(checkpoint_dir)
    held = tensor_files(checkpoint_dir)
    dups = sorted(n for n, fs in held.items() if len(fs) > 1)
    if dups:
        a, b = held[dups[0]][:2]
        more = f" ({len(dups) - 1} more tensor(s) are duplicated)" if len(dups) > 1 else ""
        raise InputError(
            f"{checkpoint_dir}: tensor {dups[0]} is in two files, {a.name} and {b.name}{more}; "
            "keep one copy (loaders disagree on which one wins)"
        )
    wrong = sorted(n for n, f in listed.items() if held.get(n, [f])[0] != f)
    if wrong:
        n = wrong[0]
        where = held[n][0].name if n in held else "no file"
        raise InputError(
            f"{Path(checkpoint_dir) / INDEX_NAME}: maps {n} to {listed[n].name}, but it is in "
            f"{where}" + (f" ({len(wrong) - 1} more such entries)" if len(wrong) > 1 else "")
        )
    return {n: fs[0] for n, fs in held.items()}


def unaccounted(where: Collection[str], expected: Collection[str]) -> list[str]:
    """Checkpoint tensor names the config does not account for (known buffers aside), sorted."""
    want = set(expected)
    return sorted(n for n in where if n not in want and not n.endswith(IGNORED_SUFFIXES))


def check_extra_tensors(
    checkpoint_dir: Path, extra: list[str], allow_extra: bool | None = None
) -> str | None:
    """InputError listing ``extra`` unless extras are allowed; then the finding to report."""
    if not extra:
        return None
    allow = extra_tensors_allowed() if allow_extra is None else allow_extra
    listing = f"{len(extra)} tensor(s) config.json does not account for: {_first(extra)}"
    if not allow:
        raise InputError(
            f"{checkpoint_dir}: {listing}; remove them, or pass --allow-extra-tensors "
            f"({ALLOW_EXTRA_ENV}=1) to ignore them"
        )
    return f"{checkpoint_dir}: ignored {listing} (extra tensors allowed)"


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="numpy") as fh:
            return list(fh.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable safetensors file ({e})") from None


def read_state_dict(
    checkpoint_dir: Path,
    cfg: BailingHybridConfig,
    *,
    include_mtp: bool = True,
    allow_extra: bool | None = None,
    findings: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """All expected tensors as float numpy arrays, after checking names, shapes and finiteness.

    Tensors config.json does not account for are refused unless ``allow_extra`` (default: the
    environment, see :func:`extra_tensors_allowed`); when allowed, the finding saying they were
    ignored is appended to ``findings``.
    """
    where, shapes = planned_tensors(
        checkpoint_dir, cfg, include_mtp=include_mtp, allow_extra=allow_extra, findings=findings
    )
    return read_tensors(where, shapes)


def planned_tensors(
    checkpoint_dir: Path,
    cfg: BailingHybridConfig,
    *,
    include_mtp: bool = True,
    allow_extra: bool | None = None,
    findings: list[str] | None = None,
) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    """(name -> file, name -> expected shape) of the tensors the reference will read, after the
    checks of :func:`read_state_dict` that need no tensor data (names, files, extras, missing)."""
    where = weight_files(checkpoint_dir)
    specs = expected_tensors(cfg, include_mtp=include_mtp)
    note = check_extra_tensors(
        checkpoint_dir, unaccounted(where, {s.name for s in expected_tensors(cfg)}), allow_extra
    )
    if note and findings is not None:
        findings.append(note)
    if include_mtp and cfg.num_nextn_predict_layers:
        mtp_missing = [s.name for s in specs if s.mtp and s.name not in where]
        if len(mtp_missing) == sum(s.mtp for s in specs):
            # A checkpoint without its MTP file (e.g. upstream -int4 repos) still runs the trunk.
            specs = [s for s in specs if not s.mtp]
    missing = [s.name for s in specs if s.name not in where]
    if missing:
        raise InputError(
            f"{checkpoint_dir}: missing tensor(s) {_first(missing)} required by config.json"
        )
    return where, {s.name: s.shape for s in specs}


def read_tensors(
    where: dict[str, Path], shapes: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Read the named tensors (all listed in ``where``), checking shape and finiteness; every
    problem names the file and the tensor."""
    out: dict[str, np.ndarray] = {}
    by_file: dict[Path, list[str]] = {}
    for name in shapes:
        by_file.setdefault(where[name], []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(path, framework="pt") as fh:
                for name in names:
                    arr = _get(fh, path, name)
                    if tuple(arr.shape) != shapes[name]:
                        raise InputError(
                            f"{path}: tensor {name} has shape {tuple(arr.shape)}, expected "
                            f"{shapes[name]} from config.json"
                        )
                    if not np.isfinite(arr).all():
                        raise InputError(f"{path}: tensor {name} contains NaN or inf values")
                    out[name] = arr
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path}: unreadable safetensors file ({e})") from None
    return out


def _get(fh, path: Path, name: str) -> np.ndarray:
    try:
        t = fh.get_tensor(name)
    except (SafetensorError, TypeError, ValueError) as e:
        raise InputError(f"{path}: tensor {name} cannot be read ({e})") from None
    if not t.is_floating_point():
        raise InputError(f"{path}: tensor {name} has dtype {t.dtype}, expected a float type")
    # bfloat16 has no numpy dtype; float32 holds it exactly.
    return t.double().numpy() if t.dtype == torch.float64 else t.float().numpy()
