"""The router follows doc §2.5 step by step, and the MoE output is sum_k w_k E_k(x) + S(x)."""

from __future__ import annotations

import math

import pytest
import torch

from references.moe import MoEWeights, RouterConfig, SwiGLUWeights, moe_forward, route
from references.variant import Variant

# With an identity router the logits are the inputs themselves: z = x.
EYE = torch.eye(8, dtype=torch.float64)


def _cfg(k: int = 2, n_group: int = 1, topk_group: int = 1, norm: bool = True) -> RouterConfig:
    return RouterConfig(k, n_group, topk_group, norm, routed_scaling_factor=2.5)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _x(*probs: float) -> torch.Tensor:
    return torch.tensor([[_logit(p) for p in probs]], dtype=torch.float64)


def test_bias_changes_the_selection_but_not_the_weights():
    x = _x(0.9, 0.8, 0.3, 0.3, 0.3, 0.3, 0.2, 0.1)
    plain = route(x, EYE, None, _cfg())
    assert plain.ids.tolist() == [[0, 1]]
    bias = torch.tensor([0, 0, 0, 0, 0, 0, 1.0, 1.0], dtype=torch.float64)
    biased = route(x, EYE, bias, _cfg())
    assert biased.ids.tolist() == [[6, 7]]
    # The weights are the unbiased sigmoid scores 0.2 and 0.1, normalised and scaled.
    torch.testing.assert_close(
        biased.weights, torch.tensor([[2.5 * 2 / 3, 2.5 / 3]], dtype=torch.float64)
    )
    torch.testing.assert_close(biased.logits, x)


def test_bias_in_weights_mutation_takes_weights_from_the_biased_scores():
    x = _x(0.9, 0.8, 0.3, 0.3, 0.3, 0.3, 0.2, 0.1)
    bias = torch.tensor([0, 0, 0, 0, 0, 0, 1.0, 1.0], dtype=torch.float64)
    r = route(x, EYE, bias, _cfg(), Variant(bias_in_weights=True))
    assert r.ids.tolist() == [[6, 7]]
    torch.testing.assert_close(
        r.weights, 2.5 * torch.tensor([[1.2, 1.1]], dtype=torch.float64) / 2.3
    )


def test_group_limit_excludes_experts_of_dropped_groups():
    # Groups {0,1} {2,3} {4,5} {6,7}; top-2 sums 1.0, 1.2, 1.1, 0.2: groups 1 and 2 are kept.
    x = _x(0.99, 0.01, 0.6, 0.6, 0.55, 0.55, 0.1, 0.1)
    cfg = _cfg(k=2, n_group=4, topk_group=2)
    limited = route(x, EYE, None, cfg)
    assert limited.ids.tolist() == [[2, 3]]
    unlimited = route(x, EYE, None, cfg, Variant(group_limit=False))
    assert 0 in unlimited.ids.tolist()[0]


def test_group_score_uses_the_biased_scores_and_dropped_experts_stay_out_even_if_negative():
    x = _x(0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5)
    bias = torch.tensor([-2.0, -2.0, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    # Group 0 has the most negative scores; kept groups must never lose to a dropped -inf.
    r = route(x, EYE, bias, _cfg(k=4, n_group=4, topk_group=2))
    assert set(r.ids.tolist()[0]) <= {2, 3, 4, 5, 6, 7}
    assert {2, 3} <= set(r.ids.tolist()[0])


def test_weights_sum_to_the_routed_scaling_factor_and_ids_are_sorted():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    router = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    bias = 0.1 * torch.randn(8, generator=gen, dtype=torch.float64)
    r = route(x, router, bias, _cfg(k=3, n_group=4, topk_group=2))
    torch.testing.assert_close(r.weights.sum(-1), torch.full((50,), 2.5, dtype=torch.float64))
    assert (r.ids.diff(dim=-1) > 0).all()
    # Weights stay aligned with their ids after sorting.
    p = torch.sigmoid(x @ router.T)
    expected = 2.5 * p.gather(1, r.ids) / p.gather(1, r.ids).sum(-1, keepdim=True)
    torch.testing.assert_close(r.weights, expected)


def test_without_norm_topk_prob_weights_are_scaled_scores():
    x = _x(0.9, 0.8, 0.3, 0.3, 0.3, 0.3, 0.2, 0.1)
    r = route(x, EYE, None, _cfg(norm=False))
    torch.testing.assert_close(
        r.weights, torch.tensor([[2.5 * 0.9, 2.5 * 0.8]], dtype=torch.float64)
    )


def test_router_logits_are_at_least_float32():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    r = route(x, EYE.to(torch.bfloat16), None, _cfg())
    assert r.logits.dtype == torch.float32


def _moe(seed: int = 0) -> tuple[MoEWeights, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def mlp(inter: int) -> SwiGLUWeights:
        return SwiGLUWeights(
            *(
                torch.randn(*s, generator=gen, dtype=torch.float64) / 4
                for s in ((inter, 16), (inter, 16), (16, inter))
            )
        )

    w = MoEWeights(
        router=torch.randn(8, 16, generator=gen, dtype=torch.float64),
        expert_bias=0.1 * torch.randn(8, generator=gen, dtype=torch.float64),
        experts=tuple(mlp(6) for _ in range(8)),
        shared=mlp(10),
    )
    return w, torch.randn(30, 16, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("shared", [True, False])
def test_moe_output_is_the_weighted_sum_of_chosen_experts_plus_the_shared_one(shared):
    w, x = _moe()
    cfg = _cfg(k=2, n_group=4, topk_group=2)
    out = moe_forward(x, w, cfg, Variant(shared_experts=shared))
    r = out.routing
    for t in range(x.shape[0]):
        expected = sum(r.weights[t, s] * w.experts[int(r.ids[t, s])](x[t]) for s in range(2))
        if shared:
            expected = expected + w.shared(x[t])
        torch.testing.assert_close(out.out[t], expected, rtol=1e-13, atol=1e-13)
    # A port that drops the shared expert adds zero (and reports zero).
    assert out.shared is not None and bool((out.shared == 0).all()) != shared
