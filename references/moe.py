"""The sparse MoE feed-forward block and its group-limited sigmoid router (doc §2.5).

Router, per token:
  1. z = x W_gate^T in >= float32; p = sigmoid(z).
  2. r = p + expert_bias: the bias steers *selection only*.
  3. Group score = sum of the top-2 r in each of n_group groups; keep the best topk_group groups,
     set r = -inf elsewhere.
  4. ids = top-k of r; weights = the *unbiased* p at ids, divided by their sum (+1e-20) when
     norm_topk_prob and k > 1, times routed_scaling_factor.
Output: sum_k w_k E_k(x) + S(x), every expert and the shared expert S being a SwiGLU.

Router-forced (judging a quantized port, whose near-tie expert choices may flip): step 4 takes
the candidate's ids instead of the top-k; the weights still come from this router's own
probabilities at those ids.  :func:`routing_margins` says how far each forced choice is from a
tie in the reference's own selection scores, so a flip at a near-tie (noise) can be told from a
router bug.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harness.core.errors import InputError
from references.activation_rounding import round_input
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
    """Router result for T tokens; ids sorted ascending per token, weights aligned to them.

    ``ids`` are the ones used (forced or own); ``own_ids`` what this router itself selects and
    ``scores`` what it selects by, kept so a forced choice can be judged (:attr:`margins`)."""

    logits: torch.Tensor  # [T, E], before the sigmoid
    ids: torch.Tensor  # [T, k] int64
    weights: torch.Tensor  # [T, k]
    scores: torch.Tensor  # [T, E] selection scores: p + bias, -inf in dropped groups
    own_ids: torch.Tensor  # [T, k] int64, sorted; equal to ids unless forced
    # [T, E] p + bias, lowered in each dropped group by its group score's gap to the last kept
    # group: how far each expert is from being chosen, groups included (finite everywhere)
    tie_scores: torch.Tensor | None = None

    @property
    def margins(self) -> torch.Tensor:
        """[T] distance of ``ids`` from a tie in the own selection (:func:`routing_margins` on
        :attr:`tie_scores`): a near tie between groups is a small margin, not an infinite one."""
        scores = self.scores if self.tie_scores is None else self.tie_scores
        return routing_margins(scores, self.own_ids, self.ids)


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
    forced_ids: torch.Tensor | None = None,
) -> Routing:
    """Select experts and their weights for every token of ``x`` [T, hidden].

    ``forced_ids`` [T, k] (any order per token) replaces the selection: a reference run with a
    candidate's expert choices, weighted by this router's own probabilities at those ids.
    """
    dt = accumulation_dtype(x.dtype)
    logits = F.linear(round_input(x, router).to(dt), router.to(dt))
    probs = torch.sigmoid(logits)
    biased = probs if expert_bias is None else probs + expert_bias.to(dt)
    scores = tie_scores = biased
    if variant.group_limit and cfg.topk_group < cfg.n_group:
        grouped = scores.view(-1, cfg.n_group, scores.shape[-1] // cfg.n_group)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
        kept = group_score.topk(cfg.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        # -inf, not 0: a bias-corrected score may be negative.
        scores = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(scores)
        gap = (group_score.gather(1, kept).amin(-1, keepdim=True) - group_score).clamp(min=0)
        tie_scores = (grouped - gap[..., None]).view_as(biased)
    own = scores.topk(cfg.num_experts_per_tok, dim=-1).indices
    ids = own if forced_ids is None else _forced_in_selection_order(forced_ids, scores, cfg)
    # Unmasked: a forced id in a dropped group still gets its own (biased) score as weight.
    weights = (biased if variant.bias_in_weights else probs).gather(1, ids)
    if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    weights = weights * cfg.routed_scaling_factor
    ids, order = ids.sort(dim=-1)
    own_ids = ids if forced_ids is None else own.sort(dim=-1).values
    return Routing(
        logits=logits,
        ids=ids,
        weights=weights.gather(1, order),
        scores=scores,
        own_ids=own_ids,
        tie_scores=tie_scores,
    )


def check_forced_ids(ids: torch.Tensor | np.ndarray, n_experts: int, k: int) -> torch.Tensor:
    """``ids`` as [T, k] int64 after checking them (integers, in range, no expert twice per
    token): a malformed forced routing is bad input, never a wrong result."""
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InputError(f"forced expert ids must be integers, got {ids.dtype}")
    if ids.ndim != 2 or ids.shape[1] != k:
        raise InputError(
            f"forced expert ids have shape {tuple(ids.shape)}; expected [tokens, "
            f"num_experts_per_tok={k}]"
        )
    ids = ids.to(torch.int64)
    outside = (ids < 0) | (ids >= n_experts)
    if bool(outside.any()):
        raise InputError(f"forced expert ids {ids[outside][:5].tolist()} outside [0, {n_experts})")
    repeated = (ids.sort(dim=-1).values.diff(dim=-1) == 0).any(dim=-1)
    if bool(repeated.any()):
        token = int(repeated.nonzero()[0, 0])
        raise InputError(
            f"forced expert ids repeat an expert for token {token}: {ids[token].tolist()}"
        )
    return ids


def _forced_in_selection_order(
    forced: torch.Tensor, scores: torch.Tensor, cfg: RouterConfig
) -> torch.Tensor:
    """Checked forced ids, ordered as ``topk`` would list them (descending selection score), so
    the weights' normalising sum adds in the same order: forcing the own ids is bit-exact."""
    t, n_experts = scores.shape
    ids = check_forced_ids(forced, n_experts, cfg.num_experts_per_tok).to(scores.device)
    if ids.shape[0] != t:
        raise InputError(f"forced expert ids for {ids.shape[0]} tokens; the router has {t}")
    order = scores.gather(1, ids).argsort(dim=-1, descending=True, stable=True)
    return ids.gather(1, order)


def routing_margins(
    scores: torch.Tensor, own_ids: torch.Tensor, forced_ids: torch.Tensor
) -> torch.Tensor:
    """Per token, how far ``forced_ids`` are from a tie in the reference's own selection.

    The margin is max(score of own picks the forced set drops) - min(score of forced picks the
    reference did not choose): the gap by which the forced set misses being the top-k of
    ``scores`` (selection scores after bias and group masking, [T, E]).  0 where the id sets
    agree; tiny for a near-tie flip (quantization noise); large for a router bug; ``inf`` when a
    forced id lies in a group the reference dropped (a disagreement about groups).
    """
    own = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, own_ids.long(), True)
    forced = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, forced_ids.long(), True)
    dropped, added = own & ~forced, forced & ~own
    highest_dropped = scores.masked_fill(~dropped, float("-inf")).amax(dim=-1)
    lowest_added = scores.masked_fill(~added, float("inf")).amin(dim=-1)
    return torch.where(
        dropped.any(dim=-1), highest_dropped - lowest_added, torch.zeros_like(highest_dropped)
    )


def moe_forward(
    x: torch.Tensor,
    w: MoEWeights,
    cfg: RouterConfig,
    variant: Variant = CORRECT,
    forced_ids: torch.Tensor | None = None,
) -> MoEOutput:
    """Routed experts (each run on the tokens routed to it) plus the shared expert;
    ``forced_ids`` as in :func:`route`."""
    routing = route(x, w.router, w.expert_bias, cfg, variant, forced_ids)
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
