"""Every tensor name and shape a Ling-2.6 checkpoint must hold, derived from its config.

One function answers "what should be in the checkpoint" for three users: the loader (validate
before computing), the case materialiser (what to generate) and the GGUF inventory (what to
account for).  Shapes are PyTorch ``[out, in]`` order, as HF safetensors store them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from references.config import BailingHybridConfig


class Init(StrEnum):
    """How a synthetic checkpoint initialises a tensor (so a dropped one is always caught)."""

    LINEAR = "linear"  # normal(0, 1/sqrt(fan_in))
    EMBED = "embed"  # normal(0, 1)
    NORM = "norm"  # 1 + normal(0, 0.1): never the identity
    BIAS = "bias"  # expert_bias: normal(0, 0.1): steers selection


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: Init
    mtp: bool = False  # lives in the MTP file (model-mtp-layer.safetensors upstream)


def _attention(cfg: BailingHybridConfig, p: str, mla: bool, mtp: bool) -> list[TensorSpec]:
    h, d = cfg.hidden_size, cfg.head_dim
    n = cfg.num_attention_heads
    a = f"{p}.attention"
    if not mla:
        return [
            TensorSpec(f"{a}.query_key_value.weight", (3 * n * d, h), Init.LINEAR, mtp),
            TensorSpec(f"{a}.query_layernorm.weight", (d,), Init.NORM, mtp),
            TensorSpec(f"{a}.key_layernorm.weight", (d,), Init.NORM, mtp),
            TensorSpec(f"{a}.g_proj.weight", (n * d, h), Init.LINEAR, mtp),
            TensorSpec(f"{a}.g_norm.weight", (n * d,), Init.NORM, mtp),
            TensorSpec(f"{a}.dense.weight", (h, n * d), Init.LINEAR, mtp),
        ]
    qk = cfg.qk_head_dim
    out: list[TensorSpec] = []
    if cfg.q_lora_rank:
        r = cfg.q_lora_rank
        out += [
            TensorSpec(f"{a}.q_a_proj.weight", (r, h), Init.LINEAR, mtp),
            TensorSpec(f"{a}.q_a_layernorm.weight", (r,), Init.NORM, mtp),
            TensorSpec(f"{a}.q_b_proj.weight", (n * qk, r), Init.LINEAR, mtp),
        ]
    else:
        out.append(TensorSpec(f"{a}.q_proj.weight", (n * qk, h), Init.LINEAR, mtp))
    c = cfg.kv_lora_rank
    out += [
        TensorSpec(f"{a}.kv_a_proj_with_mqa.weight", (c + cfg.qk_rope_head_dim, h), Init.LINEAR,
                   mtp),
        TensorSpec(f"{a}.kv_a_layernorm.weight", (c,), Init.NORM, mtp),
        TensorSpec(f"{a}.kv_b_proj.weight", (n * (cfg.qk_nope_head_dim + cfg.v_head_dim), c),
                   Init.LINEAR, mtp),
        TensorSpec(f"{a}.dense.weight", (h, n * cfg.v_head_dim), Init.LINEAR, mtp),
    ]
    return out


def _swiglu(prefix: str, h: int, inter: int, mtp: bool) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.gate_proj.weight", (inter, h), Init.LINEAR, mtp),
        TensorSpec(f"{prefix}.up_proj.weight", (inter, h), Init.LINEAR, mtp),
        TensorSpec(f"{prefix}.down_proj.weight", (h, inter), Init.LINEAR, mtp),
    ]


def _ffn(cfg: BailingHybridConfig, p: str, moe: bool, mtp: bool) -> list[TensorSpec]:
    h = cfg.hidden_size
    if not moe:
        return _swiglu(f"{p}.mlp", h, cfg.intermediate_size, mtp)
    out = [TensorSpec(f"{p}.mlp.gate.weight", (cfg.num_experts, h), Init.LINEAR, mtp)]
    if cfg.moe_router_enable_expert_bias:
        out.append(TensorSpec(f"{p}.mlp.gate.expert_bias", (cfg.num_experts,), Init.BIAS, mtp))
    for e in range(cfg.num_experts):
        out += _swiglu(f"{p}.mlp.experts.{e}", h, cfg.moe_intermediate_size, mtp)
    if cfg.num_shared_experts:
        out += _swiglu(f"{p}.mlp.shared_experts", h, cfg.shared_intermediate_size, mtp)
    return out


def _block(cfg: BailingHybridConfig, layer: int, *, mla: bool, moe: bool, mtp: bool):
    p = f"model.layers.{layer}"
    h = cfg.hidden_size
    return [
        TensorSpec(f"{p}.input_layernorm.weight", (h,), Init.NORM, mtp),
        TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), Init.NORM, mtp),
        *_attention(cfg, p, mla, mtp),
        *_ffn(cfg, p, moe, mtp),
    ]


def expected_tensors(cfg: BailingHybridConfig, *, include_mtp: bool = True) -> list[TensorSpec]:
    """All checkpoint tensors, trunk first, in upstream (HF) names."""
    h, v = cfg.hidden_size, cfg.vocab_size
    out = [TensorSpec("model.word_embeddings.weight", (v, h), Init.EMBED)]
    for layer in range(cfg.num_hidden_layers):
        out += _block(cfg, layer, mla=cfg.is_mla(layer), moe=cfg.is_moe(layer), mtp=False)
    out.append(TensorSpec("model.norm.weight", (h,), Init.NORM))
    if not cfg.tie_word_embeddings:
        out.append(TensorSpec("lm_head.weight", (v, h), Init.LINEAR))
    if include_mtp:
        for layer in cfg.mtp_layers:
            p = f"model.layers.{layer}"
            # The MTP layer is always MLA + MoE (HF-R BailingMoeV2_5MTPLayer).
            out += _block(cfg, layer, mla=True, moe=True, mtp=True)
            out += [
                TensorSpec(f"{p}.enorm.weight", (h,), Init.NORM, True),
                TensorSpec(f"{p}.hnorm.weight", (h,), Init.NORM, True),
                TensorSpec(f"{p}.eh_proj.weight", (h, 2 * h), Init.LINEAR, True),
                TensorSpec(f"{p}.final_layernorm.weight", (h,), Init.NORM, True),
            ]
    return out
