"""A tiny random Ling-2.6 checkpoint directory in HF layout, for the reference's own tests.

Five layers in groups of two put MLA at 1 and 3 by the group rule and at 4 by the tail clause;
layer 0 is dense, the rest MoE; one MTP layer lives in its own file as upstream ships it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from references.checkpoint_spec import Init, TensorSpec, expected_tensors
from references.config import ARCHITECTURE, MODEL_TYPE, config_from_dict

TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 5,
    "layer_group_size": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 8,
    "partial_rotary_factor": 0.5,
    "group_norm_size": 2,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "moe_intermediate_size": 16,
    "num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "intermediate_size": 48,
    "vocab_size": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "routed_scaling_factor": 2.5,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 4096,
}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """The config.json content; ``None`` as an override removes the key from the file."""
    raw = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, **TINY_CONFIG, **overrides}
    return {k: v for k, v in raw.items() if v is not None}


def random_tensor(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    """One tensor drawn by its Init rule, as float32."""
    if spec.init is Init.LINEAR:
        arr = rng.standard_normal(spec.shape) / np.sqrt(spec.shape[-1])
    elif spec.init is Init.EMBED:
        arr = rng.standard_normal(spec.shape)
    elif spec.init is Init.NORM:
        arr = 1.0 + 0.1 * rng.standard_normal(spec.shape)
    else:
        arr = 0.1 * rng.standard_normal(spec.shape)
    return arr.astype(np.float32)


def write_tiny_checkpoint(
    directory: Path,
    *,
    seed: int = 0,
    drop: tuple[str, ...] = (),
    replace: dict[str, np.ndarray] | None = None,
    **config_overrides: Any,
) -> Path:
    """Write config.json, model.safetensors and model-mtp-layer.safetensors into ``directory``.

    ``drop`` removes tensors and ``replace`` substitutes arrays after generation (for bad-input
    tests); the config is written as given even when it is invalid.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw = tiny_config(**config_overrides)
    (directory / "config.json").write_text(json.dumps(raw, indent=1))
    kept = {k: v for k, v in config_overrides.items() if v is not None}
    cfg = config_from_dict(tiny_config(**kept), directory / "config.json")
    rng = np.random.default_rng(seed)
    trunk: dict[str, np.ndarray] = {}
    mtp: dict[str, np.ndarray] = {}
    for spec in expected_tensors(cfg):
        (mtp if spec.mtp else trunk)[spec.name] = random_tensor(spec, rng)
    for group in (trunk, mtp):
        for name in drop:
            group.pop(name, None)
        for name, arr in (replace or {}).items():
            if name in group:
                group[name] = arr
    save_file(trunk, str(directory / "model.safetensors"))
    if mtp:
        save_file(mtp, str(directory / "model-mtp-layer.safetensors"))
    return directory
