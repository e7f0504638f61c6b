"""The Ling 3.0 (`BailingMoeV3ForCausalLM`) config as a typed, validated object.

Keys are named as in Ant's published ``config.json`` (the names mlx-lm and llama.cpp's converter
read: ``n_group``, ``num_experts_per_tok``, ``head_dim`` = the KDA head dim, ...), not as
transformers renames them.  Every missing, ill-typed or unsupported key is an
:class:`~harness.core.errors.InputError` naming the file and the key, before any weight is made or
read.
Constraints that only exist because one of the three implementations cannot express something say
which one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.errors import InputError
from references.config import read_config_json, typed_values

ARCHITECTURE = "BailingMoeV3ForCausalLM"
TRANSFORMERS_ARCHITECTURE = "BailingHybridForCausalLM"  # what transformers' save_pretrained writes
MODEL_TYPE = "bailing_hybrid"
FULL, LINEAR = "full_attention", "linear_attention"  # transformers' layer_types vocabulary


@dataclass(frozen=True)
class Ling3Config:
    """Hyper-parameters of Ling 3.0, named as in its upstream ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int  # KDA head dim (transformers keeps it as linear_head_dim)
    num_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    layer_group_size: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    num_shared_experts: int = 1
    moe_shared_expert_intermediate_size: int | None = None
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    score_function: str = "sigmoid"
    short_conv_kernel_size: int = 4
    kda_lower_bound: float = -5.0
    kda_safe_gate: bool = True
    no_kda_lora: bool = True
    gated_attention_proj_granularity_type: str = "head_wise"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 6_000_000.0
    rope_interleave: bool = True
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    num_key_value_heads: int | None = None
    layer_types: list[str] | None = None
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    attention_bias: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    # ---- derived quantities ----

    def is_mla(self, layer: int) -> bool:
        """Upstream rule, with the tail clause: MLA iff (l+1) % G == 0 or l >= floor(L/G)*G.

        mlx-lm (``_is_kda_layer``) and llama.cpp's converter (``is_full_attention``) both apply
        the tail clause; transformers does not (see :meth:`transformers_layer_types`).
        """
        g, n = self.layer_group_size, self.num_hidden_layers
        return (layer + 1) % g == 0 or layer >= (n // g) * g

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def upstream_layer_types(self) -> list[str]:
        """The layer pattern every loader must build, in transformers' vocabulary."""
        return [FULL if self.is_mla(i) else LINEAR for i in range(self.num_hidden_layers)]

    def transformers_layer_types(self) -> list[str]:
        """What transformers derives when ``layer_types`` is absent: no tail clause."""
        g = self.layer_group_size
        return [FULL if (i + 1) % g == 0 else LINEAR for i in range(self.num_hidden_layers)]

    @property
    def has_tail(self) -> bool:
        return self.num_hidden_layers % self.layer_group_size != 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mtp_layers(self) -> range:
        """Checkpoint layer indices of the MTP heads (``model.layers.{L}`` onwards)."""
        n = self.num_hidden_layers
        return range(n, n + self.num_nextn_predict_layers)


def config_from_dict(raw: dict[str, Any], path: Path) -> Ling3Config:
    """Validate a parsed Ling 3.0 config.json (or a case's [config]); errors name path and key."""
    archs = raw.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not any(a in (ARCHITECTURE, TRANSFORMERS_ARCHITECTURE) for a in archs):
        raise InputError(
            f"{path}: 'architectures' is {archs!r}; Ling 3.0 is {ARCHITECTURE} "
            f"(transformers writes {TRANSFORMERS_ARCHITECTURE})"
        )
    cfg = Ling3Config(**typed_values(Ling3Config, raw, path))
    _check_consistency(cfg, path)
    return cfg


def _check_consistency(cfg: Ling3Config, path: Path) -> None:
    def bad(key: str, msg: str) -> InputError:
        return InputError(f"{path}: key {key!r}: {msg}")

    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "head_dim", "num_experts", "num_experts_per_tok", "n_group", "layer_group_size",
                "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                "intermediate_size", "moe_intermediate_size", "short_conv_kernel_size"):
        if getattr(cfg, key) <= 0:
            raise bad(key, f"must be positive, got {getattr(cfg, key)}")
    if cfg.qk_rope_head_dim % 2:
        raise bad("qk_rope_head_dim", f"must be even (RoPE pairs), got {cfg.qk_rope_head_dim}")
    if not 0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers:
        raise bad("first_k_dense_replace", f"must be in [0, {cfg.num_hidden_layers}]")
    if cfg.num_experts % cfg.n_group:
        raise bad("n_group", f"{cfg.n_group} must divide num_experts {cfg.num_experts}")
    if not 0 < cfg.topk_group <= cfg.n_group:
        raise bad("topk_group", f"{cfg.topk_group} must be in [1, n_group={cfg.n_group}]")
    per_group = cfg.num_experts // cfg.n_group
    if per_group < 2:
        raise bad("n_group", "groups are scored by their top-2 experts: need >= 2 per group")
    if cfg.num_experts_per_tok > cfg.topk_group * per_group:
        raise bad(
            "num_experts_per_tok",
            f"{cfg.num_experts_per_tok} exceeds the experts left after the group limit "
            f"({cfg.topk_group} groups x {per_group})",
        )
    # What one implementation cannot express, the harness refuses rather than compare two models.
    if cfg.num_key_value_heads not in (None, cfg.num_attention_heads):
        raise bad("num_key_value_heads", "MLA has one latent KV: must equal num_attention_heads "
                  "(transformers would repeat_kv an already per-head K/V)")
    if cfg.moe_shared_expert_intermediate_size not in (None, cfg.moe_intermediate_size):
        raise bad("moe_shared_expert_intermediate_size",
                  "transformers sizes the shared expert as moe_intermediate_size x "
                  "num_shared_experts; a different width cannot be built there")
    if cfg.score_function != "sigmoid":
        raise bad("score_function", f"{cfg.score_function!r}: Ling 3.0 routes with 'sigmoid'")
    if not cfg.no_kda_lora:
        raise bad("no_kda_lora", "KDA LoRA gates exist in neither transformers nor mlx-lm")
    if not cfg.kda_safe_gate:
        raise bad("kda_safe_gate", "mlx-lm and llama.cpp support only the bounded (safe) gate")
    if cfg.gated_attention_proj_granularity_type != "head_wise":
        raise bad("gated_attention_proj_granularity_type", "only 'head_wise' MLA gates exist")
    if not cfg.rope_interleave:
        raise bad("rope_interleave", "transformers and mlx-lm implement interleaved RoPE only")
    if cfg.rope_scaling not in (None, {}):
        raise bad("rope_scaling", "not supported by this harness yet (default RoPE only)")
    if cfg.hidden_act != "silu":
        raise bad("hidden_act", f"{cfg.hidden_act!r}: mlx-lm hard-codes SwiGLU (silu)")
    if cfg.attention_bias:
        raise bad("attention_bias", "mlx-lm's MLA has no projection biases")
    if cfg.num_nextn_predict_layers not in (0, 1):
        raise bad("num_nextn_predict_layers", "llama.cpp supports exactly one MTP layer")
    if cfg.layer_types is not None and cfg.layer_types != cfg.upstream_layer_types():
        raise bad("layer_types", f"{cfg.layer_types} is not the layer_group_size pattern "
                  f"{cfg.upstream_layer_types()} that mlx-lm and llama.cpp derive (they ignore "
                  "layer_types)")
    if not math.isfinite(cfg.rms_norm_eps) or cfg.rms_norm_eps <= 0:
        raise bad("rms_norm_eps", f"must be a positive number, got {cfg.rms_norm_eps}")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        tok = getattr(cfg, key)
        if tok is not None and not 0 <= tok < cfg.vocab_size:
            raise bad(key, f"{tok} is outside the vocabulary [0, {cfg.vocab_size})")


def load_config(checkpoint_dir: Path) -> Ling3Config:
    """Read and validate ``checkpoint_dir/config.json``."""
    path = Path(checkpoint_dir) / "config.json"
    return config_from_dict(read_config_json(path), path)
