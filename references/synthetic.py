"""Deterministic synthetic Ling-2.6 checkpoints in the upstream HF layout, for parity cases.

Per-tensor seeds come from the case seed and the tensor's name (as llama.cpp's test-llama-archs
does), so adding a tensor never changes the others.  Norm weights and biases are never trivial,
so a port that drops one is caught.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from references.checkpoint_spec import Init, TensorSpec, expected_tensors
from references.config import config_from_dict

TRUNK_SHARD_TENSORS = 400  # trunk tensors per shard; small models still get 2 shards and an index


def generate_tensor(spec: TensorSpec, seed: int) -> np.ndarray:
    """A deterministic random tensor: seeded by the case seed and the tensor's name."""
    name_seed = int.from_bytes(hashlib.sha256(spec.name.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, name_seed])
    normal = rng.standard_normal(spec.shape)
    if spec.init is Init.LINEAR:
        values = normal / np.sqrt(spec.shape[-1])
    elif spec.init is Init.EMBED:
        values = normal
    elif spec.init is Init.NORM:
        values = 1.0 + 0.1 * normal
    else:  # Init.BIAS
        values = 0.1 * normal
    return values.astype(np.float32)


def write_synthetic_checkpoint(cfg_json: dict[str, Any], seed: int, out_dir: Path) -> None:
    """Write config.json, sharded trunk safetensors, the MTP file and the index into ``out_dir``."""
    cfg = config_from_dict(cfg_json, out_dir / "config.json")
    specs = expected_tensors(cfg)
    trunk = [s for s in specs if not s.mtp]
    mtp = [s for s in specs if s.mtp]
    shards = [trunk[i : i + TRUNK_SHARD_TENSORS] for i in range(0, len(trunk), TRUNK_SHARD_TENSORS)]
    if len(shards) == 1 and len(trunk) > 1:  # always exercise the index with >= 2 shards
        half = len(trunk) // 2
        shards = [trunk[:half], trunk[half:]]
    files = [
        (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", s) for i, s in enumerate(shards)
    ]
    if mtp:
        files.append(("model-mtp-layer.safetensors", mtp))
    weight_map: dict[str, str] = {}
    total = 0
    for fname, group in files:
        tensors = {s.name: generate_tensor(s, seed) for s in group}
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({s.name: fname for s in group})
        total += sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(cfg_json, indent=2))
