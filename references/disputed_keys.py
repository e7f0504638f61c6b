"""Config keys that known Ling-2.6 implementations read differently, and what the harness does.

Found by running the authors' remote code (HF-R, ``modeling_bailing_moe_v2_5.py``) against this
reference on the same checkpoints (issue 15).  A checkpoint whose config makes the readings
diverge is refused with a message naming the key and the disagreement, never silently read one
way; where only one reading can be applied to the checkpoint's tensors it is applied with a note
(a run finding).  The README's "Disputed config keys" table lists the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.core.errors import InputError


@dataclass(frozen=True)
class DisputedKey:
    """One config key and how the implementations read it."""

    key: str
    readings: str  # who reads it how
    harness: str  # what the harness does with a diverging value


DISPUTED_KEYS: tuple[DisputedKey, ...] = (
    DisputedKey(
        "rope_interleave",
        "HF-R refuses false (its non-interleaved MLA branch raises); mlx-lm reads false as "
        "half-split MLA RoPE (traditional=False)",
        "false is refused",
    ),
    DisputedKey(
        "norm_topk_prob",
        "HF-R always normalises the top-k weights when top-k > 1; mlx-lm and vLLM honour false",
        "false with num_experts_per_tok > 1 is refused",
    ),
    DisputedKey(
        "num_key_value_heads",
        "HF-R repeats the MLA K/V heads (num_attention_heads / num_key_value_heads); mlx-lm, "
        "vLLM and this reference ignore the key (GLA forces kv heads = heads everywhere)",
        "a value other than num_attention_heads is refused",
    ),
    DisputedKey(
        "moe_shared_expert_intermediate_size",
        "HF-R sizes the shared expert moe_intermediate_size x num_shared_experts; vLLM uses "
        "this key x num_shared_experts; mlx-lm this key when set",
        "a value other than moe_intermediate_size x num_shared_experts is refused",
    ),
    DisputedKey(
        "qk_rope_head_dim",
        "HF-R's MLA rotary width is head_dim x partial_rotary_factor; mlx-lm, vLLM and this "
        "reference use qk_rope_head_dim (equal on Ling-2.6-flash: 128 x 0.5 = 64)",
        "HF-R's width below qk_rope_head_dim is refused; above it, HF-R's tables do not fit q_pe "
        "and qk_rope_head_dim is used, with a note",
    ),
)


def check_disputed(cfg: Any, path: object) -> list[str]:
    """Refuse a config on which the implementations' readings diverge; return notes for the
    cases where only one reading can apply."""
    where = f"{path}: key"
    if not cfg.rope_interleave:
        raise InputError(
            f"{where} 'rope_interleave' = false: implementations disagree (HF-R refuses it, "
            "mlx-lm applies half-split MLA RoPE); the harness does not pick one"
        )
    if not cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        raise InputError(
            f"{where} 'norm_topk_prob' = false: implementations disagree (HF-R normalises the "
            f"top-{cfg.num_experts_per_tok} weights anyway, mlx-lm and vLLM do not); the harness "
            "does not pick one"
        )
    kv = cfg.num_key_value_heads
    if kv is not None and kv != cfg.num_attention_heads:
        raise InputError(
            f"{where} 'num_key_value_heads' = {kv} != num_attention_heads = "
            f"{cfg.num_attention_heads}: implementations disagree (HF-R repeats MLA K/V heads "
            "to match, mlx-lm and vLLM ignore the key); the harness does not pick one"
        )
    shared = cfg.moe_shared_expert_intermediate_size
    hf_shared = cfg.moe_intermediate_size * cfg.num_shared_experts
    if cfg.num_shared_experts and shared and shared != hf_shared:
        raise InputError(
            f"{where} 'moe_shared_expert_intermediate_size' = {shared} != moe_intermediate_size "
            f"x num_shared_experts = {hf_shared}: implementations disagree on the shared "
            f"expert's width (HF-R {hf_shared}, mlx-lm {shared}); the harness does not pick one"
        )
    hf_rope = int(cfg.head_dim * cfg.partial_rotary_factor)
    if hf_rope < cfg.qk_rope_head_dim:
        raise InputError(
            f"{where} 'qk_rope_head_dim' = {cfg.qk_rope_head_dim} > head_dim x "
            f"partial_rotary_factor = {hf_rope}: implementations disagree on the MLA rotary "
            f"width (HF-R {hf_rope}, mlx-lm and vLLM {cfg.qk_rope_head_dim}); the harness does "
            "not pick one"
        )
    if hf_rope > cfg.qk_rope_head_dim:
        return [
            f"{path}: MLA rotary width read as qk_rope_head_dim = {cfg.qk_rope_head_dim} "
            f"(mlx-lm, vLLM); HF-R's head_dim x partial_rotary_factor = {hf_rope} is wider than "
            "q_pe and cannot apply to this checkpoint"
        ]
    return []
