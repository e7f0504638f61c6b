"""The knobs on which real Ling-2.6 ports disagree, as data.

The defaults are the correct math (architecture doc §2-§3). Each non-default value reproduces one
mistake seen in, or plausible for, a port; the reference applies it at the single point where the
math differs, so a "mutant" reference is a faithful model of that wrong port and the harness can
be shown to catch it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

SlopeFormula = Literal["corrected", "hf_off_by_one"]
# The GLA decay conventions a checkpoint may have been trained and published with (issue 15):
# which one is right is a property of the checkpoint, not of the math.
SLOPE_CONVENTIONS: tuple[SlopeFormula, ...] = ("corrected", "hf_off_by_one")
DEFAULT_SLOPE: SlopeFormula = "corrected"  # Ling-2.6-flash's, as mlx-lm/vLLM/SGLang apply it


def other_slope(slope: SlopeFormula) -> SlopeFormula:
    """The convention a checkpoint of convention ``slope`` does not use."""
    return "hf_off_by_one" if slope == "corrected" else "corrected"


@dataclass(frozen=True)
class Variant:
    """Where a port may deviate; every default is the correct behaviour."""

    # GLA decay layer factor: 1 - l/(L-1) + 1e-5 (corrected) or 1 - (l-1)/(L-1) + 1e-5 (HF-R).
    slope_formula: SlopeFormula = "corrected"
    # Layer rule: MLA iff (l+1) % G == 0, or l >= floor(L/G)*G (the tail clause).
    tail_clause: bool = True
    # GLA partial RoPE pairs (x_i, x_{i+d/2}); MLA RoPE pairs (x_2i, x_2i+1).
    gla_rope: Literal["half_split", "interleaved"] = "half_split"
    mla_rope: Literal["interleaved", "half_split"] = "interleaved"
    # group_norm_size is the number of groups (wrong: channels per group).
    group_norm: Literal["groups", "channels_per_group"] = "groups"
    # The GLA output gate reads the input_layernorm output a (wrong: the attention output o).
    gate_input: Literal["attn_norm", "attn_output"] = "attn_norm"
    # Routing weights are the unbiased sigmoid scores (wrong: the bias-corrected ones).
    bias_in_weights: bool = False
    # Experts outside the best topk_group groups are excluded.
    group_limit: bool = True
    # The shared expert's output is added to the routed output.
    shared_experts: bool = True
    # MTP (doc §3.1): hidden fed after model.norm; MTP final_layernorm before the shared head;
    # the MTP router uses its expert_bias; concat is [enorm(embedding) ; hnorm(hidden)]; the
    # embedding is that of token t+1.
    mtp_hidden: Literal["post_norm", "pre_norm"] = "post_norm"
    mtp_final_norm: Literal["mtp_final_layernorm", "trunk_norm"] = "mtp_final_layernorm"
    mtp_router_bias: bool = True
    mtp_concat: Literal["embed_first", "hidden_first"] = "embed_first"
    mtp_token_shift: int = 1

    def __post_init__(self) -> None:
        allowed = {
            "slope_formula": ("corrected", "hf_off_by_one"),
            "gla_rope": ("half_split", "interleaved"),
            "mla_rope": ("interleaved", "half_split"),
            "group_norm": ("groups", "channels_per_group"),
            "gate_input": ("attn_norm", "attn_output"),
            "mtp_hidden": ("post_norm", "pre_norm"),
            "mtp_final_norm": ("mtp_final_layernorm", "trunk_norm"),
            "mtp_concat": ("embed_first", "hidden_first"),
        }
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ValueError(f"Variant.{key}={getattr(self, key)!r}; expected one of {values}")
        if self.mtp_token_shift not in (0, 1):
            raise ValueError(f"Variant.mtp_token_shift={self.mtp_token_shift}; expected 0 or 1")

    def describe(self) -> str:
        """The knobs that differ from the correct math, e.g. ``"group_limit=False"``."""
        default = Variant()
        diff = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        ]
        return ", ".join(diff) or "correct"


CORRECT = Variant()


def mutations() -> dict[str, Variant]:
    """The named wrong variants, one deviation each."""
    return {
        "slope_off_by_one": Variant(slope_formula="hf_off_by_one"),
        "tail_clause_dropped": Variant(tail_clause=False),
        "gla_rope_interleaved": Variant(gla_rope="interleaved"),
        "mla_rope_half_split": Variant(mla_rope="half_split"),
        "group_norm_swapped": Variant(group_norm="channels_per_group"),
        "gate_fed_attn_output": Variant(gate_input="attn_output"),
        "expert_bias_in_weights": Variant(bias_in_weights=True),
        "no_group_limit": Variant(group_limit=False),
        "shared_experts_dropped": Variant(shared_experts=False),
        "mtp_pre_norm_hidden": Variant(mtp_hidden="pre_norm"),
        "mtp_trunk_norm": Variant(mtp_final_norm="trunk_norm"),
        "mtp_router_no_bias": Variant(mtp_router_bias=False),
        "mtp_concat_swapped": Variant(mtp_concat="hidden_first"),
        "mtp_wrong_token": Variant(mtp_token_shift=0),
    }
