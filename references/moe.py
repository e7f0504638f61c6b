"""The sparse MoE feed-forward block and its group-limited sigmoid router (doc §2.5).

Router, per token:
  1. z = x W_gate^T in >= float32; p = sigmoid(z).
  2. r = p + expert_bias: the bias steers *selection only*.
  3. Group score = sum of the top-2 r in each of n_group groups; keep the best topk_group groups,
     set r = -inf elsewhere.
  4. ids = top-k of r; weights = the *unbiased* p at ids, divided by their sum (+1e-20) when
     norm_topk_prob and k > 1, times routed_scaling_factor.
Output: sum_k w_k E_k(x) + S(x), every expert and the shared expert S being a SwiGLU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from references.ops import accumulation_dtype, swiglu
from references.variant import CORRECT, Variant


@dataclass(frozen=True)
class SwiGLUWeights:
    """down(SiLU(gate x) * up x), HF [out, in] layout."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate, self.up, self.down)


@dataclass(frozen=True)
class RouterConfig:
    """The routing hyper-parameters (names as in config.json)."""

    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float

    @classmethod
    def from_config(cls, cfg: Any) -> RouterConfig:
        """From any config naming these keys as config.json does (Ling-2.6 and Ling 3.0 do)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class MoEWeights:
    """One MoE block: router, optional expert bias, routed experts, optional shared expert."""

    router: torch.Tensor  # [E, hidden]
    expert_bias: torch.Tensor | None  # [E]
    experts: tuple[SwiGLUWeights, ...]
    shared: SwiGLUWeights | None


@dataclass(frozen=True)
class Routing:
    """Router result for T tokens; ids sorted ascending per token, weights aligned to them."""

    logits: torch.Tensor  # [T, E], before the sigmoid
    ids: torch.Tensor  # [T, k] int64
    weights: torch.Tensor  # [T, k]


@dataclass(frozen=True)
class MoEOutput:
    out: torch.Tensor  # [T, hidden]: routed + shared
    routing: Routing
    shared: torch.Tensor | None  # [T, hidden] shared-expert output (None without one)


def route(
    x: torch.Tensor,
    router: torch.Tensor,
    expert_bias: torch.Tensor | None,
    cfg: RouterConfig,
    variant: Variant = CORRECT,
) -> Routing:
    """Select experts and their weights for every token of ``x`` [T, hidden]."""
    dt = accumulation_dtype(x.dtype)
    logits = F.linear(x.to(dt), router.to(dt))
    probs = torch.sigmoid(logits)
    scores = probs if expert_bias is None else probs + expert_bias.to(dt)
    if variant.group_limit and cfg.topk_group < cfg.n_group:
        grouped = scores.view(-1, cfg.n_group, scores.shape[-1] // cfg.n_group)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
        kept = group_score.topk(cfg.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        # -inf, not 0: a bias-corrected score may be negative.
        scores = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(scores)
    ids = scores.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = (scores if variant.bias_in_weights else probs).gather(1, ids)
    if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    weights = weights * cfg.routed_scaling_factor
    ids, order = ids.sort(dim=-1)
    return Routing(logits=logits, ids=ids, weights=weights.gather(1, order))


def moe_forward(
    x: torch.Tensor, w: MoEWeights, cfg: RouterConfig, variant: Variant = CORRECT
) -> MoEOutput:
    """Routed experts (each run on the tokens routed to it) plus the shared expert."""
    routing = route(x, w.router, w.expert_bias, cfg, variant)
    out = torch.zeros_like(x)
    for e in routing.ids.unique().tolist():
        rows, slot = (routing.ids == e).nonzero(as_tuple=True)
        gate = routing.weights[rows, slot].to(x.dtype)[:, None]
        out.index_add_(0, rows, gate * w.experts[e](x[rows]))
    shared = None
    if w.shared is not None:
        # A port that drops the shared expert adds nothing: its shared output is zero.
        shared = w.shared(x) if variant.shared_experts else torch.zeros_like(x)
        out = out + shared
    return MoEOutput(out=out, routing=routing, shared=shared)
