"""Read an HF-layout checkpoint directory and check it against the config before any compute.

Accepts one ``model.safetensors``, or shards listed by ``model.safetensors.index.json``, plus any
other ``model*.safetensors`` (upstream keeps the MTP layer in ``model-mtp-layer.safetensors``).
Every problem is an :class:`~harness.errors.InputError` naming the file and tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from harness.errors import InputError
from references.checkpoint_spec import expected_tensors
from references.config import BailingHybridConfig

INDEX_NAME = "model.safetensors.index.json"


def weight_files(checkpoint_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the file holding it (index first, then the remaining files)."""
    checkpoint_dir = Path(checkpoint_dir)
    where: dict[str, Path] = {}
    index = checkpoint_dir / INDEX_NAME
    files: list[Path] = []
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{index}: not a valid safetensors index ({e})") from None
        for name, fname in weight_map.items():
            where[name] = checkpoint_dir / fname
        files = sorted(set(where.values()))
        for f in files:
            if not f.is_file():
                raise InputError(f"{index}: lists {f.name}, which does not exist")
    extra = sorted(p for p in checkpoint_dir.glob("model*.safetensors") if p not in files)
    if not files and not extra:
        raise InputError(f"{checkpoint_dir}: no model*.safetensors files")
    for f in extra:
        for name in _keys(f):
            where.setdefault(name, f)
    return where


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="numpy") as fh:
            return list(fh.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable safetensors file ({e})") from None


def read_state_dict(
    checkpoint_dir: Path, cfg: BailingHybridConfig, *, include_mtp: bool = True
) -> dict[str, np.ndarray]:
    """All expected tensors as float numpy arrays, after checking names, shapes and finiteness."""
    where = weight_files(checkpoint_dir)
    specs = expected_tensors(cfg, include_mtp=include_mtp)
    if include_mtp and cfg.num_nextn_predict_layers:
        mtp_missing = [s.name for s in specs if s.mtp and s.name not in where]
        if len(mtp_missing) == sum(s.mtp for s in specs):
            # A checkpoint without its MTP file (e.g. upstream -int4 repos) still runs the trunk.
            specs = [s for s in specs if not s.mtp]
    missing = [s.name for s in specs if s.name not in where]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise InputError(
            f"{checkpoint_dir}: missing tensor(s) {', '.join(missing[:5])}{more} "
            f"required by config.json"
        )
    return read_tensors(where, {s.name: s.shape for s in specs})


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
