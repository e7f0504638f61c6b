"""The capture vocabulary: llama.cpp-style names, forward order, and strictness."""

from __future__ import annotations

import pytest

from harness.core import capture_points as cp


def test_layer_points_use_llama_cpp_eval_callback_names():
    assert cp.layer_point("l_out", 3) == "l_out-3"
    assert cp.layer_of("attn_norm-12") == 12
    assert cp.layer_of("result_output") is None


def test_forward_order_is_layer_major_then_trunk_then_mtp():
    names = ["result_output", "mtp_result_output", "l_out-1", "attn_norm-1", "ffn_out-0",
             "result_norm", "gla_out-0", "l_out-10", "l_out-2"]
    assert cp.in_forward_order(names) == [
        "gla_out-0", "ffn_out-0", "attn_norm-1", "l_out-1", "l_out-2", "l_out-10",
        "result_norm", "result_output", "mtp_result_output",
    ]


def test_within_a_layer_attention_comes_before_the_ffn_and_l_out_is_last():
    order = cp.in_forward_order([cp.layer_point(p.stem, 0) for p in cp.LAYER_POINTS])
    assert order[0] == "attn_norm-0"
    assert order.index("g_gate-0") < order.index("attn_out-0") < order.index("ffn_inp-0")
    assert order.index("ffn_moe_topk-0") < order.index("ffn_out-0")
    assert order[-1] == "l_out-0"


def test_kinds_say_how_a_point_is_compared():
    assert cp.kind_of("result_output") is cp.Kind.LOGITS
    assert cp.kind_of("ffn_moe_topk-4") is cp.Kind.INDEX
    assert cp.kind_of("l_out-4") is cp.Kind.DENSE


@pytest.mark.parametrize("bad", ["l_out", "result_output-3", "blk.0.attn_norm", "Qcur-0", ""])
def test_names_outside_the_vocabulary_are_rejected(bad):
    with pytest.raises(cp.UnknownCapturePoint):
        cp.parse(bad)


def test_all_points_covers_every_layer():
    names = cp.all_points(3, mtp=True)
    assert {"l_out-0", "l_out-2", "result_output", "mtp_result_output"} <= set(names)
    assert "l_out-3" not in names


# --- what usually breaks at a point (the advice the report and the CLI give) ---


def test_every_capture_stem_has_an_explanation() -> None:
    generic = cp.explain_divergence("not_a_point-3")
    assert "no specific advice" in generic
    for spec in cp.LAYER_POINTS + cp.TRUNK_POINTS + cp.MTP_POINTS:
        name = f"{spec.stem}-0" if spec in cp.LAYER_POINTS else spec.stem
        assert spec.advice and cp.explain_divergence(name) == spec.advice, spec.stem


def test_explanations_name_the_usual_culprits() -> None:
    assert "l/(L-1)" in cp.explain_divergence("gla_out-4")
    assert "input_layernorm" in cp.explain_divergence("g_gate-0")
    assert "expert_bias" in cp.explain_divergence("ffn_moe_topk-9")
    assert "routed_scaling_factor" in cp.explain_divergence("ffn_moe_weights-9")
    assert "interleaved" in cp.explain_divergence("attn_out-7")


def test_a_malformed_name_still_gets_its_stems_advice() -> None:
    """A global point with a layer suffix is not canonical, but its stem says what it is."""
    assert cp.explain_divergence("result_norm-3") == cp.explain_divergence("result_norm")
