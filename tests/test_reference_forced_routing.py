"""Router-forced reference runs (issue 11): the reference can run a quantized candidate's expert
choices, so one near-tie flip does not make every later point diverge, and it says how far each
forced choice is from a tie in its own selection (0 agreed, > 0 a flip; an expert of a dropped
group counts lower by its group's gap to the last kept group)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import references.moe as moe_mod
from harness.checks.cases import load_cases, materialize
from harness.core.capture_points import all_points, in_forward_order, kind_of
from harness.core.errors import InputError
from references.model import BailingHybridReference, ReferenceOptions
from references.moe import RouterConfig, route, routing_margins

LAYER = 2  # a trunk MoE layer of flash-mini (layer 0 is dense), GLA attention
TOKEN = 5  # the token whose expert set a test changes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: torch's thread pool only slows them on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _flash_mini():
    return next(c for c in load_cases(["flash-mini"]))


@pytest.fixture(scope="module", params=["memory", "streamed"])
def model(request) -> BailingHybridReference:
    ckpt = materialize(_flash_mini())
    return BailingHybridReference.from_checkpoint(ckpt, ReferenceOptions(load=request.param))


@pytest.fixture(scope="module")
def memory_model() -> BailingHybridReference:
    ckpt = materialize(_flash_mini())
    return BailingHybridReference.from_checkpoint(ckpt, ReferenceOptions(load="memory"))


def _tokens() -> list[int]:
    return list(_flash_mini().prompts[0].tokens)


def _points(model: BailingHybridReference) -> list[str]:
    return all_points(model.n_layers, mtp=model.mtp is not None)


def _topk_name(model: BailingHybridReference, layer: int) -> str:
    return "mtp_ffn_moe_topk" if layer == model.n_layers else f"ffn_moe_topk-{layer}"


def _run(model, feeds: list[list[int]], forced=None) -> tuple[list[dict], object]:
    session = model.start(_points(model), forced_routing=forced)
    return [session.feed(f) for f in feeds], session


def _own_routing(model, captures: list[dict]) -> dict[int, np.ndarray]:
    """Every MoE layer's (and the MTP block's) own ids, rows in feed order."""
    return {
        layer: np.concatenate([c[_topk_name(model, layer)] for c in captures])
        for layer in model.moe_layers()
    }


def _assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in in_forward_order(list(a)):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---- forcing the reference's own choice changes nothing ----


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_forcing_the_own_ids_reproduces_every_capture_bit_exactly(model, mode):
    tokens = _tokens()
    feeds = [tokens] if mode == "prefill" else [tokens[:12]] + [[t] for t in tokens[12:]]
    plain, _ = _run(model, feeds)
    own = _own_routing(model, plain)
    assert model.n_layers in own and own[model.n_layers].shape[0] == len(tokens) - 1
    forced, session = _run(model, feeds, own)
    for a, b in zip(plain, forced, strict=True):
        _assert_identical(a, b)
    assert sorted(session.routing_margins) == sorted(own)
    for layer, margins in session.routing_margins.items():
        assert margins.shape == (own[layer].shape[0],)
        assert (margins == 0).all(), layer


def test_forced_ids_are_taken_in_any_order(memory_model):
    plain, _ = _run(memory_model, [_tokens()])
    own = _own_routing(memory_model, plain)
    shuffled = {layer: ids[:, ::-1].copy() for layer, ids in own.items()}
    forced, _ = _run(memory_model, [_tokens()], shuffled)
    _assert_identical(plain[0], forced[0])


# ---- forcing a different choice on one token ----


def _selection(
    model, captures: dict, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(selection scores [T, E], own ids [T, k], tie scores [T, E]) of ``layer``, recomputed
    from its input."""
    ffn = model.blocks[layer].ffn
    r = route(torch.from_numpy(captures[f"ffn_norm-{layer}"]), ffn.router, ffn.expert_bias,
              model.router_config)
    return r.scores, r.own_ids, r.tie_scores


def _swap(model, plain: dict, replace_with: str) -> tuple[np.ndarray, float]:
    """Own ids of LAYER with TOKEN's lowest-scoring pick replaced by the best unchosen expert of
    a kept group ("kept") or by an expert of a dropped group ("dropped"); the expected margin."""
    scores, own, tie = _selection(model, plain, LAYER)
    row, picks = scores[TOKEN], own[TOKEN].tolist()
    lowest = min(picks, key=lambda e: float(row[e]))
    others = [e for e in range(row.shape[0]) if e not in picks]
    if replace_with == "kept":
        new = max((e for e in others if math.isfinite(row[e])), key=lambda e: float(row[e]))
        expected = float(row[lowest] - row[new])
    else:
        new = next(e for e in others if row[e] == float("-inf"))
        expected = float(tie[TOKEN][lowest] - tie[TOKEN][new])  # own picks: tie == score
    ids = own.numpy().copy()
    ids[TOKEN] = [new if e == lowest else e for e in picks]
    return ids, expected


def _forcing_effects(plain: dict, forced: dict, ids: np.ndarray, probs: np.ndarray) -> list[str]:
    """What a one-token forced change at LAYER got wrong (empty: all as specified)."""
    problems = []
    order = in_forward_order(list(plain))
    at = order.index(f"ffn_moe_topk-{LAYER}")
    problems += [f"{n} changed" for n in order[:at] if not np.array_equal(plain[n], forced[n])]
    if not np.array_equal(forced[f"ffn_moe_topk-{LAYER}"], np.sort(ids, axis=-1)):
        problems.append("the forced ids are not the ids used")
    # Weights from the reference's own probabilities at the forced ids, normalised, scaled.
    p = np.take_along_axis(probs, np.sort(ids, axis=-1), axis=-1)
    if not np.allclose(forced[f"ffn_moe_weights-{LAYER}"], 2.5 * p / p.sum(-1, keepdims=True),
                       rtol=1e-13, atol=0):
        problems.append("the weights are not the own probabilities at the forced ids")
    # The shared expert and the MTP head's embedding norm do not depend on the routing.
    same = {f"ffn_shexp-{LAYER}", "mtp_enorm"}
    problems += [f"{n} changed" for n in same if not np.array_equal(plain[n], forced[n])]
    later = [n for n in order[at + 1:] if n not in same and kind_of(n).value != "index"]
    assert f"ffn_out-{LAYER}" in later and "result_output" in later
    for n in later:
        if np.allclose(plain[n][TOKEN], forced[n][TOKEN], rtol=1e-6, atol=1e-9):
            problems.append(f"{n} of the forced token did not change")
        # Attention is causal: the tokens before the forced one see nothing of it.
        if not np.allclose(plain[n][:TOKEN], forced[n][:TOKEN], rtol=1e-12, atol=1e-14):
            problems.append(f"{n} changed before the forced token")
    return problems


def _force_one_token(model, replace_with: str):
    plain, _ = _run(model, [_tokens()])
    ids, expected = _swap(model, plain[0], replace_with)
    forced, session = _run(model, [_tokens()], {LAYER: ids})
    probs = 1 / (1 + np.exp(-plain[0][f"ffn_moe_logits-{LAYER}"]))
    return plain[0], forced[0], ids, probs, session.routing_margins[LAYER], expected


@pytest.mark.parametrize("replace_with", ["kept", "dropped"])
def test_forcing_one_token_changes_it_from_that_layer_on_and_nothing_before(model, replace_with):
    plain, forced, ids, probs, _, _ = _force_one_token(model, replace_with)
    assert _forcing_effects(plain, forced, ids, probs) == []


def test_a_route_that_ignores_forced_ids_is_caught(memory_model, monkeypatch):
    """Mutation: the router keeps its own selection whatever it is told."""
    real = moe_mod.route

    def deaf(x, router, bias, cfg, variant=moe_mod.CORRECT, forced_ids=None):
        return real(x, router, bias, cfg, variant)

    monkeypatch.setattr(moe_mod, "route", deaf)
    plain, forced, ids, probs, _, _ = _force_one_token(memory_model, "kept")
    problems = _forcing_effects(plain, forced, ids, probs)
    assert "the forced ids are not the ids used" in problems
    assert f"ffn_out-{LAYER} of the forced token did not change" in problems


# ---- margins ----


def test_flash_mini_limits_groups():
    cfg = _flash_mini().config
    assert cfg["topk_group"] < cfg["n_group"]


def test_margin_is_the_score_gap_for_a_forced_unchosen_expert(memory_model):
    *_, margins, expected = _force_one_token(memory_model, "kept")
    assert 0 < expected < math.inf
    assert margins[TOKEN] == pytest.approx(expected, rel=1e-12)
    assert (np.delete(margins, TOKEN) == 0).all()


def test_an_expert_of_a_dropped_group_counts_lower_by_its_groups_gap(memory_model):
    *_, margins, expected = _force_one_token(memory_model, "dropped")
    assert 0 < expected < math.inf
    assert margins[TOKEN] == pytest.approx(expected, rel=1e-12)
    assert (np.delete(margins, TOKEN) == 0).all()


def test_margin_is_the_gap_by_which_the_forced_set_misses_the_top_k():
    """Two swaps: one near-tie (0.50 -> 0.49) and one far (0.90 -> 0.48); the margin reports the
    far one, max(dropped) - min(added), so a near-tie cannot hide a wrong pick."""
    scores = torch.tensor([[0.9, 0.5, 0.49, 0.48, 0.1, float("-inf")]], dtype=torch.float64)
    own = torch.tensor([[0, 1]])
    assert routing_margins(scores, own, torch.tensor([[1, 0]])).tolist() == [0.0]
    assert routing_margins(scores, own, torch.tensor([[0, 2]])).tolist() == [pytest.approx(0.01)]
    assert routing_margins(scores, own, torch.tensor([[2, 3]])).tolist() == [pytest.approx(0.42)]
    assert routing_margins(scores, own, torch.tensor([[0, 5]])).tolist() == [math.inf]


def test_route_weights_forced_ids_by_its_own_unbiased_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0], dtype=torch.float64)
    cfg = RouterConfig(2, 2, 1, True, routed_scaling_factor=2.0)
    r = route(logits, torch.eye(4, dtype=torch.float64), bias, cfg,
              forced_ids=torch.tensor([[1, 0]]))
    assert r.own_ids.tolist() == [[2, 3]]  # the bias picks group {2, 3}
    assert r.ids.tolist() == [[0, 1]]
    p = torch.sigmoid(logits[0, :2])
    torch.testing.assert_close(r.weights[0], 2.0 * p / p.sum())
    # group {0, 1} was dropped: its experts count lower by the group gap, so the margin is the
    # 5-point bias plus that gap, large and finite
    margin = r.margins.item()
    assert 5 < margin < math.inf


# ---- bad input ----


@pytest.mark.parametrize(
    ("forced", "message"),
    [
        ({0: np.zeros((16, 4), dtype=np.int64)}, "layer 0, which has no router"),
        ({LAYER: np.zeros((16, 3), dtype=np.int64)}, "num_experts_per_tok=4"),
        ({LAYER: np.full((16, 4), 0.5)}, "must be integers"),
        ({LAYER: np.tile([0, 1, 2, 16], (16, 1))}, "outside [0, 16)"),
        ({LAYER: np.tile([0, 1, 2, 2], (16, 1))}, "repeat an expert for token 0"),
    ],
)
def test_malformed_forced_routing_is_refused_at_start(memory_model, forced, message):
    with pytest.raises(InputError, match=re.escape(message)):
        memory_model.start(forced_routing=forced)


def test_too_few_forced_rows_are_refused_before_anything_runs(memory_model):
    session = memory_model.start(forced_routing={LAYER: np.tile([0, 1, 2, 3], (3, 1))})
    with pytest.raises(InputError, match=f"layer {LAYER} has 3 rows.*position 3"):
        session.feed([1, 2, 3, 4])
    assert session.position == 0
    session.feed([1, 2, 3])  # the rows it has still serve
    assert session.routing_margins[LAYER].shape == (3,)
