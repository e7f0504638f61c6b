"""Specification of the comparison engine: metrics, verdicts, first divergence and result files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.checks.compare import (
    COLUMNS,
    PAIR_COLUMNS,
    compare,
    compare_captures,
    compare_pair,
    first_divergence,
    results_frame,
    save_results,
)
from harness.core.metrics import cosine, index_agreement, kld_stats, max_abs, nmse, top1_agreement
from harness.core.tolerances import Tolerance

TOL = Tolerance(nmse=1e-8, top1=1.0, index_agreement=1.0)
LLAMA_PERPLEXITY_KLD_NAMES = [
    "mean_kld",
    "kld_max",
    "kld_99.9",
    "kld_99",
    "kld_95",
    "kld_90",
    "kld_median",
    "kld_10",
    "kld_5",
    "kld_1",
    "kld_0.1",
    "kld_min",
    "same_top_p",
    "same_top_p_unc",
]


def model_captures(n_layers: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """A reference-like capture set: a few dense points per layer, router ids and logits."""
    rng = np.random.default_rng(seed)
    caps: dict[str, np.ndarray] = {}
    for layer in range(n_layers):
        for stem in ("attn_out", "ffn_out", "l_out"):
            caps[f"{stem}-{layer}"] = rng.normal(size=(5, 32))
        caps[f"ffn_moe_topk-{layer}"] = np.sort(rng.choice(16, size=(5, 4)), axis=1)
    caps["result_norm"] = rng.normal(size=(5, 32))
    caps["result_output"] = rng.normal(size=(5, 50))
    return caps


def copy_caps(caps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in caps.items()}


def row(df: pd.DataFrame, point: str) -> pd.Series:
    return df.loc[df["point"] == point].iloc[0]


# --- NMSE and the dense metrics -------------------------------------------------------------


def test_nmse_is_squared_error_over_the_reference_energy() -> None:
    reference = np.array([1.0, 1.0])
    candidate = np.array([2.0, 2.0])
    # (1² + 1²) / (1² + 1²)
    assert nmse(candidate, reference) == pytest.approx(1.0)


def test_nmse_is_asymmetric_because_it_normalises_by_the_reference() -> None:
    a, b = np.array([2.0, 2.0]), np.array([1.0, 1.0])
    assert nmse(a, b) == pytest.approx(2 / 2)  # reference b: Σb² = 2
    assert nmse(b, a) == pytest.approx(2 / 8)  # reference a: Σa² = 8


def test_nmse_of_an_all_zero_reference_is_zero_only_for_an_exact_match() -> None:
    zeros = np.zeros((3, 4))
    assert nmse(zeros, zeros) == 0.0
    assert nmse(zeros + 1e-30, zeros) == math.inf


def test_dense_metrics_are_computed_in_float64() -> None:
    reference = np.ones(1000, dtype=np.float32)
    candidate = reference + np.float32(1e-4)
    assert nmse(candidate, reference) == pytest.approx(
        float(np.mean((candidate.astype(np.float64) - 1.0) ** 2)), rel=1e-12
    )
    assert max_abs(candidate, reference) == pytest.approx(1e-4, rel=1e-3)


def test_cosine_flattens_and_ignores_scale() -> None:
    x = np.arange(1.0, 7.0).reshape(2, 3)
    assert cosine(3 * x, x) == pytest.approx(1.0)
    assert cosine(-x, x) == pytest.approx(-1.0)
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0


# --- compare_captures: verdicts and first divergence ---------------------------------------


def test_identical_captures_have_zero_nmse_and_pass() -> None:
    reference = model_captures()
    df = compare_captures(copy_caps(reference), reference, TOL)
    dense = df[df["kind"] != "index"]
    assert (dense["nmse"] == 0.0).all()
    assert df["passed"].all()
    assert first_divergence(df) is None


def test_rows_are_the_common_points_in_forward_order_with_the_documented_columns() -> None:
    reference = model_captures(n_layers=2)
    df = compare_captures(copy_caps(reference), reference, TOL)
    assert list(df.columns) == list(COLUMNS)
    assert list(df["point"][:5]) == [
        "attn_out-0",
        "ffn_moe_topk-0",
        "ffn_out-0",
        "l_out-0",
        "attn_out-1",
    ]
    assert list(df["point"][-2:]) == ["result_norm", "result_output"]
    assert str(df["layer"].dtype) == "Int64"
    assert df["layer"].isna().sum() == 2  # the two global points
    assert df["passed"].dtype == bool


def test_a_perturbed_layer_is_the_first_divergence() -> None:
    reference = model_captures()
    candidate = copy_caps(reference)
    for layer in (2, 3):  # an error propagates downstream; the first one is what matters
        candidate[f"l_out-{layer}"] = candidate[f"l_out-{layer}"] + 1e-3
    candidate["result_output"] = candidate["result_output"] + 1e-3
    df = compare_captures(candidate, reference, TOL)
    assert first_divergence(df) == "l_out-2"
    assert not row(df, "l_out-2")["passed"]
    assert row(df, "ffn_out-2")["passed"]


def test_points_only_one_side_has_are_listed_but_never_the_first_divergence() -> None:
    reference = model_captures()
    candidate = copy_caps(reference)
    candidate["attn_norm-0"] = np.full((5, 32), np.nan)  # earlier than anything, but unmatched
    candidate["l_out-1"] = candidate["l_out-1"] * 1.01
    del candidate["ffn_out-3"]
    df = compare_captures(candidate, reference, TOL)
    assert "attn_norm-0" not in set(df["point"])
    assert first_divergence(df) == "l_out-1"
    found = compare(candidate, reference, TOL)
    assert (found.only_candidate, found.only_reference) == (("attn_norm-0",), ("ffn_out-3",))
    assert found.table.equals(df)


def test_first_divergence_follows_forward_order_not_row_order() -> None:
    reference = model_captures()
    candidate = copy_caps(reference)
    candidate["ffn_out-1"] = candidate["ffn_out-1"] + 1.0
    candidate["l_out-2"] = candidate["l_out-2"] + 1.0
    df = compare_captures(candidate, reference, TOL)
    shuffled = df.iloc[::-1].reset_index(drop=True)
    assert first_divergence(shuffled) == "ffn_out-1"


def test_a_shape_mismatch_is_a_failing_row_not_an_exception() -> None:
    reference = {"l_out-0": np.zeros((5, 32)), "l_out-1": np.ones((5, 32))}
    candidate = {"l_out-0": np.zeros((5, 64)), "l_out-1": np.ones((5, 32))}
    df = compare_captures(candidate, reference, TOL)
    bad = row(df, "l_out-0")
    assert not bad["passed"]
    assert bad["note"] == "shape (5, 64) vs reference (5, 32)"
    assert math.isnan(bad["nmse"])
    assert row(df, "l_out-1")["passed"]


def test_non_finite_candidate_values_fail_with_a_note() -> None:
    reference = {"l_out-0": np.ones((2, 3)), "result_output": np.ones((2, 3))}
    candidate = copy_caps(reference)
    candidate["l_out-0"][1, 2] = np.nan
    candidate["result_output"][0, 0] = np.inf
    df = compare_captures(candidate, reference, TOL)
    assert list(df["passed"]) == [False, False]
    assert set(df["note"]) == {"non-finite values in candidate"}


def test_metrics_that_do_not_apply_to_a_kind_are_nan() -> None:
    reference = model_captures(n_layers=1)
    df = compare_captures(copy_caps(reference), reference, TOL)
    dense, index, logits = row(df, "l_out-0"), row(df, "ffn_moe_topk-0"), row(df, "result_output")
    assert math.isnan(dense["top1"]) and math.isnan(dense["index_agreement"])
    assert math.isnan(index["nmse"]) and math.isnan(index["mean_kld"])
    assert logits["top1"] == 1.0 and logits["mean_kld"] == 0.0
    assert dense["threshold"] == "nmse<=1e-08"
    assert index["threshold"] == "index_agreement>=1"


# --- INDEX points -----------------------------------------------------------------------------


def test_index_agreement_is_the_fraction_of_rows_with_identical_id_sets() -> None:
    reference = np.array([[1, 3], [2, 5], [0, 7], [4, 6]])
    candidate = np.array([[1, 3], [2, 6], [0, 7], [4, 5]])
    assert index_agreement(candidate, reference) == pytest.approx(0.5)


def test_index_agreement_ignores_order_within_a_row() -> None:
    assert index_agreement(np.array([[3, 1, 2]]), np.array([[1, 2, 3]])) == 1.0


def test_index_points_pass_on_agreement_not_on_nmse() -> None:
    reference = {"ffn_moe_topk-1": np.array([[1, 3], [2, 5]])}
    candidate = {"ffn_moe_topk-1": np.array([[1, 3], [2, 6]])}
    strict = compare_captures(candidate, reference, TOL)
    lenient = compare_captures(candidate, reference, Tolerance(nmse=1e-8, index_agreement=0.5))
    assert row(strict, "ffn_moe_topk-1")["index_agreement"] == 0.5
    assert not row(strict, "ffn_moe_topk-1")["passed"]
    assert row(lenient, "ffn_moe_topk-1")["passed"]


# --- LOGITS points: top-1 and KL divergence ---------------------------------------------------


def test_top1_agreement_counts_rows_with_the_same_argmax() -> None:
    reference = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    candidate = np.array([[0.0, 1.5, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    assert top1_agreement(candidate, reference) == pytest.approx(2 / 3)


def test_kld_of_identical_logits_is_zero() -> None:
    logits = np.random.default_rng(1).normal(size=(7, 40))
    stats = kld_stats(logits.copy(), logits)
    assert stats["mean_kld"] == 0.0
    assert stats["kld_max"] == 0.0
    assert stats["same_top_p"] == 1.0


def test_kld_of_different_logits_is_positive() -> None:
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(7, 40))
    stats = kld_stats(reference + rng.normal(scale=0.1, size=(7, 40)), reference)
    assert stats["mean_kld"] > 0
    assert stats["kld_min"] > 0


def test_kld_matches_a_hand_computed_2x3_example() -> None:
    # Row 0: reference uniform (1/3 each), candidate softmax([ln 2, 0, 0]) = (1/2, 1/4, 1/4).
    #   KL(P_ref || P_cand) = Σ 1/3·ln((1/3)/q) = -ln 3 + (5/3)·ln 2
    # Row 1: identical, KL = 0.
    reference = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    candidate = np.array([[math.log(2.0), 0.0, 0.0], [1.0, 2.0, 3.0]])
    kl0 = -math.log(3) + 5 / 3 * math.log(2)
    stats = kld_stats(candidate, reference)
    assert stats["kld_max"] == pytest.approx(kl0, rel=1e-12)
    assert stats["kld_min"] == pytest.approx(0.0, abs=1e-15)
    assert stats["mean_kld"] == pytest.approx(kl0 / 2, rel=1e-12)
    assert stats["kld_median"] == pytest.approx(kl0 / 2, rel=1e-12)  # linear interpolation
    assert stats["kld_90"] == pytest.approx(0.9 * kl0, rel=1e-12)


def test_kld_is_reference_weighted_so_swapping_sides_changes_it() -> None:
    reference = np.array([[0.0, 0.0, 0.0]])
    candidate = np.array([[math.log(2.0), 0.0, 0.0]])
    assert kld_stats(candidate, reference)["mean_kld"] != pytest.approx(
        kld_stats(reference, candidate)["mean_kld"]
    )


def test_kld_stats_use_llama_perplexity_names() -> None:
    logits = np.random.default_rng(3).normal(size=(4, 10))
    assert list(kld_stats(logits, logits)) == LLAMA_PERPLEXITY_KLD_NAMES


def test_same_top_p_uncertainty_is_binomial() -> None:
    reference = np.eye(4)  # argmax 0, 1, 2, 3
    candidate = np.eye(4)[[0, 1, 3, 2]]  # half the rows agree
    stats = kld_stats(candidate, reference)
    assert stats["same_top_p"] == 0.5
    assert stats["same_top_p_unc"] == pytest.approx(math.sqrt(0.25 / 3))
    assert kld_stats(candidate[:1], reference[:1])["same_top_p_unc"] == 0.0


def test_targets_add_the_change_in_the_correct_tokens_probability() -> None:
    reference = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    candidate = np.array([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])
    stats = kld_stats(candidate, reference, targets=np.array([0, 2]))
    # Δp = p_cand(target) − p_ref(target): 1/2 − 1/3 on row 0, 0 on row 1.
    assert stats["mean_delta_p"] == pytest.approx((1 / 6) / 2)
    assert stats["rms_delta_p"] == pytest.approx(math.sqrt((1 / 36) / 2))


def test_logits_fail_on_top1_even_when_nmse_is_within_tolerance() -> None:
    reference = {"result_output": np.array([[1.0, 0.99], [0.0, 1.0]])}
    candidate = {"result_output": np.array([[0.99, 1.0], [0.0, 1.0]])}
    result = compare_pair("tiny", "p", "cand", "ref", candidate, reference, Tolerance(nmse=1.0))
    assert row(result.table, "result_output")["top1"] == 0.5
    assert not result.passed
    assert "top1 0.5 < 1" in result.summary_line()


# --- Tolerance --------------------------------------------------------------------------------


def test_tolerance_from_mapping_rejects_unknown_keys_by_name() -> None:
    with pytest.raises(ValueError, match="unknown tolerance key 'nsme'"):
        Tolerance.from_mapping({"nsme": 1e-8})


def test_tolerance_from_mapping_reads_numbers_and_numeric_strings() -> None:
    tol = Tolerance.from_mapping({"nmse": "1e-8", "top1": 0.99})
    assert tol == Tolerance(nmse=1e-8, top1=0.99, index_agreement=1.0)
    with pytest.raises(ValueError, match="'top1'"):
        Tolerance.from_mapping({"nmse": 1e-8, "top1": "most"})
    with pytest.raises(ValueError, match="'nmse'"):
        Tolerance.from_mapping({"top1": 1.0})


def test_tolerance_fractions_must_lie_in_zero_one() -> None:
    with pytest.raises(ValueError, match="'index_agreement'"):
        Tolerance(nmse=1e-8, index_agreement=2.0)


# --- pairs, summaries and files -------------------------------------------------------------


def test_summary_line_names_the_pair_and_the_first_divergence() -> None:
    reference = model_captures()
    candidate = copy_caps(reference)
    candidate["attn_out-1"] = candidate["attn_out-1"] + 0.1
    fail = compare_pair(
        "flash-mini", "short", "mlx[float32]", "torch[float64]", candidate, reference, TOL
    )
    line = fail.summary_line()
    assert line.startswith("mlx[float32] vs torch[float64] on flash-mini/short: FAIL")
    assert "first divergence at attn_out-1 (nmse " in line and "> 1e-08)" in line
    assert fail.first_divergence == "attn_out-1"


def test_summary_line_of_a_passing_pair_reports_the_worst_point() -> None:
    reference = model_captures()
    candidate = copy_caps(reference)
    candidate["l_out-3"] = candidate["l_out-3"] * (1 + 1e-6)
    ok = compare_pair("c", "p", "a", "b", candidate, reference, TOL, mode="decode")
    assert ok.passed
    assert ok.summary_line().startswith(
        "a vs b on c/p (decode): PASS, worst nmse 1.0e-12 at l_out-3"
    )


def test_a_pair_with_nothing_in_common_fails() -> None:
    result = compare_pair("c", "p", "a", "b", {"l_out-0": np.ones(3)}, {"l_out-1": np.ones(3)}, TOL)
    assert not result.passed
    assert "no capture points in common" in result.summary_line()


def test_compare_pair_keeps_the_kld_summary_of_the_logits() -> None:
    reference = model_captures()
    candidate = copy_caps(reference)
    candidate["result_output"] = candidate["result_output"] + np.linspace(0, 1, 50)
    targets = np.array([1, 2, 3, 4])  # next-token ids for the first four positions
    result = compare_pair("c", "p", "a", "b", candidate, reference, TOL, targets=targets)
    assert result.kld["mean_kld"] == pytest.approx(row(result.table, "result_output")["mean_kld"])
    assert result.kld["mean_kld"] > 0
    assert "rms_delta_p" in result.kld


def test_save_results_writes_readable_parquet_and_csv(tmp_path: Path) -> None:
    reference = model_captures()
    candidate = copy_caps(reference)
    candidate["ffn_out-2"] = candidate["ffn_out-2"] + 1.0
    results = [
        compare_pair("tiny", "short", "mlx[float32]", "torch[float64]", candidate, reference, TOL),
        compare_pair(
            "tiny", "short", "torch[float32]", "torch[float64]", reference, reference, TOL
        ),
    ]
    paths = save_results(results, tmp_path / "run")
    assert set(paths) == {"parquet", "csv", "pairs"}
    long = pd.read_parquet(paths["parquet"])
    pd.testing.assert_frame_equal(long, results_frame(results), check_dtype=False)
    assert list(long.columns[:5]) == ["case", "prompt", "candidate", "reference", "mode"]
    assert len(pd.read_csv(paths["csv"])) == len(long) == 2 * len(results[0].table)
    pairs = pd.read_csv(paths["pairs"])
    assert list(pairs.columns) == list(PAIR_COLUMNS)
    assert list(pairs["passed"]) == [False, True]
    assert pairs.loc[0, "first_divergence"] == "ffn_out-2"
    assert pairs.loc[0, "worst_point"] == "ffn_out-2"
