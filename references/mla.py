"""Multi-head latent attention, the global layers' token mixer (doc §2.3).

Keys and values of all heads are decompressed from one normalised latent c [kv_lora_rank] per
token plus one shared rotary key k_pe [qk_rope_head_dim].  Two forms of the same math:

* naive: decompress [k_nope_h ; v_h] = W_kvb,h c for every cached token, then ordinary causal
  softmax attention with scores (q_nope.k_nope + q_pe.k_pe) * (qk_nope + qk_rope)^-0.5;
* absorbed: fold W_kb,h into the query, q~_h = W_kb,h^T q_nope_h, score against the latents
  directly, and decompress only the attended latent, o_h = W_vb,h (sum_j p_j c_j).

Both keep the same cache: the latents c and the roped k_pe of every past token ([c ; k_pe],
kv_lora_rank + qk_rope_head_dim floats per token), which is what makes incremental decode exact.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from references.activation_rounding import block_min, declare, declared, round_input, sum_error
from references.ops import RopeStyle, accumulation_dtype, linear, rms_norm, rope

# HF-R builds q_a_layernorm / kv_a_layernorm with the RMSNorm class default, not rms_norm_eps.
LORA_NORM_EPS = 1e-6

MlaImpl = Literal["naive", "absorbed"]


QUERY_BLOCK = 512  # query rows attended at once

@dataclass(frozen=True)
class MLADims:
    """The MLA shape parameters (names as in config.json)."""

    num_heads: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    kv_lora_rank: int
    rope_theta: float

    @classmethod
    def from_config(cls, cfg: Any) -> MLADims:
        """From any config naming these keys as config.json does (Ling-2.6 and Ling 3.0 do)."""
        named = {f.name: f.name for f in fields(cls)} | {"num_heads": "num_attention_heads"}
        return cls(**{field: getattr(cfg, key) for field, key in named.items()})

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def scale(self) -> float:
        """Softmax scale (qk_nope + qk_rope)^-0.5 (no YaRN mscale: rope_scaling is null)."""
        return self.qk_head_dim**-0.5


@dataclass(frozen=True)
class MLAWeights:
    """One MLA layer's weights, HF [out, in] layout; q comes from q_proj or from the q-LoRA."""

    kv_a_proj: torch.Tensor  # [kv_lora_rank + qk_rope, hidden]
    kv_a_norm: torch.Tensor  # [kv_lora_rank]
    kv_b_proj: torch.Tensor  # [H * (qk_nope + v), kv_lora_rank], per head [k_nope ; v] rows
    dense: torch.Tensor  # [hidden, H * v]
    q_proj: torch.Tensor | None = None  # [H * qk_head_dim, hidden] when q_lora_rank is None
    q_a_proj: torch.Tensor | None = None  # [q_lora_rank, hidden]
    q_a_norm: torch.Tensor | None = None  # [q_lora_rank]
    q_b_proj: torch.Tensor | None = None  # [H * qk_head_dim, q_lora_rank]
    # Ling 3.0 only: head-wise output gate, o_h *= sigmoid(g_proj_h . a) (a: the layer's input)
    g_proj: torch.Tensor | None = None  # [H, hidden]

    def __post_init__(self) -> None:
        n_lora = sum(t is not None for t in (self.q_a_proj, self.q_a_norm, self.q_b_proj))
        if not (n_lora == 0 if self.q_proj is not None else n_lora == 3):
            raise ValueError("MLAWeights: give either q_proj or all of q_a_proj/q_a_norm/q_b_proj")


@dataclass
class MLACache:
    """Per-layer decode cache: normalised latents [S, kv_lora_rank] and roped k_pe [S, rope]."""

    latent: torch.Tensor | None = None
    k_pe: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.latent is None else self.latent.shape[0]

    def append(self, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
        if self.latent is None or self.k_pe is None:
            self.latent, self.k_pe = latent, k_pe
        else:
            self.latent = torch.cat((self.latent, latent))
            self.k_pe = torch.cat((self.k_pe, k_pe))


def mla_forward(
    a: torch.Tensor,
    w: MLAWeights,
    dims: MLADims,
    cache: MLACache,
    *,
    impl: MlaImpl = "naive",
    rope_style: RopeStyle = "interleaved",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend the new tokens ``a`` [T, hidden] over the cache and themselves; extends ``cache``.

    Positions continue from the cache length.  Returns (output [T, hidden], latent c [T, C]).
    """
    t, h = a.shape[0], dims.num_heads
    positions = torch.arange(cache.length, cache.length + t, device=a.device)
    if w.q_proj is not None:
        q = linear(a, w.q_proj)
    else:
        q = linear(rms_norm(linear(a, w.q_a_proj), w.q_a_norm, LORA_NORM_EPS), w.q_b_proj)
    q = q.view(t, h, dims.qk_head_dim).transpose(0, 1)  # [H, T, qk]
    q_nope, q_pe = q.split([dims.qk_nope_head_dim, dims.qk_rope_head_dim], dim=-1)
    latent, k_pe = linear(a, w.kv_a_proj).split([dims.kv_lora_rank, dims.qk_rope_head_dim], -1)
    latent = rms_norm(latent, w.kv_a_norm, LORA_NORM_EPS)
    q_pe = rope(q_pe, positions, dims.qk_rope_head_dim, dims.rope_theta, rope_style)
    k_pe = rope(k_pe, positions, dims.qk_rope_head_dim, dims.rope_theta, rope_style)
    q_offset = cache.length
    cache.append(latent, k_pe)
    o = attend(q_nope, q_pe, cache, w.kv_b_proj, dims, q_offset, impl=impl)  # [H, T, v]
    if w.g_proj is not None:
        o = o * torch.sigmoid(linear(a, w.g_proj)).transpose(0, 1)[..., None]
    return linear(o.transpose(0, 1).reshape(t, h * dims.v_head_dim), w.dense), latent


def attend(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: MLACache,
    kv_b: torch.Tensor,
    dims: MLADims,
    q_offset: int,
    *,
    impl: MlaImpl = "naive",
) -> torch.Tensor:
    """Queries ``q_nope`` [H, T, nope] and roped ``q_pe`` [H, T, rope] at positions
    ``q_offset..`` over every cached token (causal): the heads' outputs [H, T, v].

    Also what a port-arithmetic model built on another framework's MLA calls
    (:mod:`harness.backends.transformers_port_arithmetic`), so both attend the same way."""
    attend_block = {"naive": _attend_naive, "absorbed": _attend_absorbed}[impl]
    # Query blocks keep the score matrix at [H, block, S] instead of [H, T, S]: a long prompt
    # costs O(T * block) memory, not O(T^2); rows are independent, so the math is unchanged.
    t = q_nope.shape[1]
    return torch.cat(
        [
            attend_block(q_nope[:, i : i + QUERY_BLOCK], q_pe[:, i : i + QUERY_BLOCK], cache,
                         kv_b, dims, q_offset + i)
            for i in range(0, max(t, 1), QUERY_BLOCK)  # t == 0: one empty block
        ],
        dim=1,
    )


def _causal_softmax(scores: torch.Tensor, q_offset: int) -> torch.Tensor:
    """Softmax over keys j <= q_offset + i, reduced in >= float32 (HF eager attention)."""
    t, s = scores.shape[-2:]
    rows = torch.arange(q_offset, q_offset + t, device=scores.device)[:, None]
    visible = torch.arange(s, device=scores.device)[None, :] <= rows
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=accumulation_dtype(scores.dtype)).to(scores.dtype)


def _split_kv_b(kv_b: torch.Tensor, dims: MLADims) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj rows per head are [k_nope ; v]: W_kb [H, nope, C] and W_vb [H, v, C]."""
    per_head = kv_b.view(dims.num_heads, dims.qk_nope_head_dim + dims.v_head_dim, -1)
    w_kb, w_vb = per_head.split([dims.qk_nope_head_dim, dims.v_head_dim], dim=1)
    kinds = declared(kv_b)  # a port stores the halves apart, each of its own type
    if kinds is not None:
        k_kind, v_kind = kinds if isinstance(kinds, tuple) else (kinds, kinds)
        k_min, v_min = block_min(kv_b) or (None, None)
        declare(w_kb, k_kind, block_min=k_min)
        declare(w_vb, v_kind, block_min=v_min)
    return w_kb, w_vb


def _attend_naive(q_nope, q_pe, cache: MLACache, kv_b, dims: MLADims, q_offset: int):
    w_kb, w_vb = _split_kv_b(kv_b, dims)
    k_nope = torch.einsum("hdc,sc->hsd", w_kb, cache.latent)  # [H, S, nope]
    v = torch.einsum("hdc,sc->hsd", w_vb, cache.latent)  # [H, S, v]
    scores = (q_nope @ k_nope.transpose(-1, -2) + q_pe @ cache.k_pe.T) * dims.scale
    return _causal_softmax(scores, q_offset) @ v


def _attend_absorbed(q_nope, q_pe, cache: MLACache, kv_b, dims: MLADims, q_offset: int):
    w_kb, w_vb = _split_kv_b(kv_b, dims)
    # W_kb^T q_nope: [H, T, C]
    q_latent = torch.einsum("htd,hdc->htc", round_input(q_nope, w_kb), w_kb)
    if (m := block_min(w_kb)) is not None:  # [H, C, nope/32]: ggml's Q4_1/Q5_1 sum term
        q_latent = q_latent + torch.einsum("htb,hcb->htc", sum_error(q_nope), m)
    scores = (q_latent @ cache.latent.T + q_pe @ cache.k_pe.T) * dims.scale
    attended = _causal_softmax(scores, q_offset) @ cache.latent  # [H, T, C]
    out = torch.einsum("htc,hdc->htd", round_input(attended, w_vb), w_vb)
    if (m := block_min(w_vb)) is not None:  # [H, v, C/32]
        out = out + torch.einsum("htb,hdb->htd", sum_error(attended), m)
    return out
