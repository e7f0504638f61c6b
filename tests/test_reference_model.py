"""The whole reference on a tiny random checkpoint: caches, precisions, forms, MTP, mutants."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from harness.backends.base import forward, stepwise
from harness.core.capture_points import all_points, in_forward_order, kind_of
from harness.core.errors import InputError
from harness.core.metrics import nmse
from references.model import BailingHybridReference, ReferenceOptions
from references.ops import rms_norm
from references.variant import mutations
from tests.tiny_checkpoint import write_tiny_checkpoint

N_LAYERS = 5
ALL = all_points(N_LAYERS, mtp=True)
TOKENS = [int(t) for t in np.random.default_rng(0).integers(0, 64, size=40)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _load(checkpoint, **options) -> BailingHybridReference:
    return BailingHybridReference.from_checkpoint(checkpoint, ReferenceOptions(**options))


@pytest.fixture(scope="module")
def model(checkpoint):
    return _load(checkpoint)


@pytest.fixture(scope="module")
def full(model):
    return forward(model, TOKENS, ALL)


def _assert_same(a: dict, b: dict, bound: float = 1e-18) -> None:
    assert set(a) == set(b)
    for name in in_forward_order(list(a)):
        assert a[name].shape == b[name].shape, name
        if kind_of(name).value == "index":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            assert nmse(a[name], b[name]) <= bound, name


def test_layer_kinds_and_capture_points(model, full):
    """Layers 1, 3 (group rule) and 4 (tail clause) are MLA; layer 0 is dense."""
    for layer in range(N_LAYERS):
        mla = layer in (1, 3, 4)
        assert (f"kv_cmpr-{layer}" in full) == mla
        assert (f"gla_out-{layer}" in full) == (f"g_gate-{layer}" in full) == (not mla)
        assert (f"ffn_moe_topk-{layer}" in full) == (layer >= 1)
    assert full["result_output"].shape == (40, 64)
    assert full["gla_out-0"].shape == full["g_gate-0"].shape == (40, 32)
    assert full["kv_cmpr-1"].shape == (40, 16)
    assert full["ffn_moe_logits-2"].shape == (40, 8)
    topk = full["ffn_moe_topk-2"]
    assert topk.dtype == np.int64 and topk.shape == (40, 2) and (np.diff(topk, axis=1) > 0).all()
    assert all(v.dtype == np.float64 for k, v in full.items() if "topk" not in k)
    np.testing.assert_allclose(full["ffn_moe_weights-3"].sum(-1), 2.5, rtol=1e-14)


def test_residual_stream_bookkeeping(full):
    for layer in range(N_LAYERS):
        prev = full[f"l_out-{layer - 1}"] if layer else None
        if prev is not None:
            np.testing.assert_allclose(
                full[f"ffn_inp-{layer}"], prev + full[f"attn_out-{layer}"], rtol=1e-13, atol=1e-13
            )
        np.testing.assert_allclose(
            full[f"l_out-{layer}"],
            full[f"ffn_inp-{layer}"] + full[f"ffn_out-{layer}"],
            rtol=1e-13,
            atol=1e-13,
        )


@pytest.mark.parametrize("n_prefill", [1, 13])
def test_prefill_then_decode_equals_one_full_forward(model, full, n_prefill):
    _assert_same(stepwise(model, TOKENS, n_prefill, ALL), full)


def test_mtp_rows_cover_the_positions_whose_next_token_is_known(model, full):
    assert full["mtp_result_output"].shape == (39, 64)
    session = model.start(ALL)
    with_next = session.feed(TOKENS[:20], next_token=TOKENS[20])
    assert with_next["mtp_enorm"].shape == (20, 32)
    rest = session.feed(TOKENS[20:])
    assert rest["mtp_enorm"].shape == (19, 32)
    for name in full:
        if name.startswith("mtp_"):
            joined = np.concatenate([with_next[name], rest[name]])
            if kind_of(name).value == "index":
                np.testing.assert_array_equal(joined, full[name])
            else:
                assert nmse(joined, full[name]) <= 1e-18, name


def test_mtp_inputs_are_the_next_token_embedding_and_the_post_norm_hidden(model, full):
    head = model.mtp
    nxt = torch.tensor(TOKENS[1:])
    enorm = rms_norm(model.embed[nxt], head.enorm, model.eps).numpy()
    hnorm = rms_norm(torch.from_numpy(full["result_norm"][:-1]), head.hnorm, model.eps).numpy()
    np.testing.assert_allclose(full["mtp_enorm"], enorm, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(full["mtp_hnorm"], hnorm, rtol=1e-14, atol=1e-14)
    eh = np.concatenate([enorm, hnorm], axis=-1) @ head.eh_proj.numpy().T
    np.testing.assert_allclose(full["mtp_eh_proj"], eh, rtol=1e-12, atol=1e-12)


def test_a_broken_next_token_promise_is_refused(model):
    session = model.start(["mtp_result_output"])
    session.feed(TOKENS[:5], next_token=7)
    with pytest.raises(ValueError, match="next_token=7"):
        session.feed([8])


def test_mtp_is_computed_only_when_asked(model):
    caps = model.start(["l_out-4"]).feed(TOKENS[:6])
    assert set(caps) == {"l_out-4", "result_output"}


def test_float32_is_close_to_float64(checkpoint, full):
    f32 = forward(_load(checkpoint, dtype="float32"), TOKENS, ALL)
    assert nmse(f32["result_output"], full["result_output"]) < 1e-10
    assert nmse(f32["mtp_result_output"], full["mtp_result_output"]) < 1e-10


def test_bfloat16_runs_with_finite_logits(checkpoint, full):
    bf16 = forward(_load(checkpoint, dtype="bfloat16"), TOKENS, ALL)
    assert np.isfinite(bf16["result_output"]).all()
    assert nmse(bf16["result_output"], full["result_output"]) < 0.5


@pytest.mark.parametrize(
    "options",
    [{"gla_impl": "recurrent"}, {"chunk_size": 1}, {"chunk_size": 7}, {"mla_impl": "absorbed"}],
)
def test_alternative_forms_agree_with_the_default(checkpoint, full, options):
    _assert_same(forward(_load(checkpoint, **options), TOKENS, ALL), full)


def test_absorbed_recurrent_decode_equals_the_default_full_forward(checkpoint, full):
    model = _load(checkpoint, gla_impl="recurrent", mla_impl="absorbed")
    _assert_same(stepwise(model, TOKENS, 3, ALL), full)


def test_unknown_capture_points_are_named(model):
    with pytest.raises(ValueError, match=r"bogus.*l_out-5|l_out-5.*bogus"):
        model.start(["l_out-4", "bogus", "l_out-5"])


def test_out_of_vocabulary_tokens_are_input_errors(model):
    with pytest.raises(InputError, match="64"):
        model.start().feed([1, 64])


# The first capture point each mutation changes, on this tiny model.
FIRST_AFFECTED = {
    "slope_off_by_one": "gla_out-0",
    "tail_clause_dropped": "attn_out-4",
    "gla_rope_interleaved": "gla_out-0",
    "mla_rope_half_split": "attn_out-1",
    "group_norm_swapped": "attn_out-0",
    "gate_fed_attn_output": "g_gate-0",
    "expert_bias_in_weights": "ffn_moe_weights-1",
    "no_group_limit": "ffn_moe_topk-1",
    "shared_experts_dropped": "ffn_shexp-1",
    "mtp_pre_norm_hidden": "mtp_hnorm",
    "mtp_trunk_norm": "mtp_result_norm",
    "mtp_router_no_bias": "mtp_ffn_moe_topk",
    "mtp_concat_swapped": "mtp_eh_proj",
    "mtp_wrong_token": "mtp_enorm",
}


def test_every_mutation_is_listed():
    assert set(FIRST_AFFECTED) == set(mutations())


@pytest.mark.parametrize("name", sorted(FIRST_AFFECTED))
def test_each_mutation_first_changes_the_point_where_its_math_differs(checkpoint, full, name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mutant = forward(_load(checkpoint, variant=mutations()[name]), TOKENS, ALL)
    # Only a mutant that builds an MLA layer as GLA has to invent weights, and says so.
    assert any("freshly initialised" in str(w.message) for w in caught) == (
        name == "tail_clause_dropped"
    )
    common = in_forward_order(list(set(mutant) & set(full)))
    changed = [n for n in common if not np.allclose(mutant[n], full[n], rtol=0, atol=1e-12)]
    assert changed and changed[0] == FIRST_AFFECTED[name]
