"""Writes a Ling-2.6 checkpoint the way a Hugging Face export would, without the harness:
one ``model.safetensors`` written by torch, ``config.json``, nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from references.checkpoint_spec import expected_tensors
from references.config import ARCHITECTURE, MODEL_TYPE, config_from_dict

CONFIG = {
    "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "hidden_size": 48,
    "num_hidden_layers": 4, "layer_group_size": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "head_dim": 12, "partial_rotary_factor": 0.5,
    "group_norm_size": 2, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4, "v_head_dim": 8, "rope_theta": 10000.0, "rope_interleave": True,
    "num_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
    "moe_intermediate_size": 16, "num_shared_experts": 1,
    "moe_shared_expert_intermediate_size": 16, "first_k_dense_replace": 1,
    "intermediate_size": 64, "routed_scaling_factor": 2.5, "score_function": "sigmoid",
    "vocab_size": 128, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "float32",
}


def write_upstream_checkpoint(out: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A tiny random Ling-2.6 in the upstream layout, MTP layer included, in one file."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_from_dict(CONFIG, out / "config.json")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for spec in expected_tensors(cfg):
        t = torch.randn(spec.shape, generator=gen, dtype=torch.float64)
        if "norm" in spec.name:
            t = 1 + 0.2 * t
        elif spec.name.endswith("expert_bias"):
            t = 0.05 * t
        elif "embeddings" not in spec.name:
            t = t / spec.shape[-1] ** 0.5
        tensors[spec.name] = t.to(dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    return out
