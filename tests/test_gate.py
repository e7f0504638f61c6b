"""The regression gate passes a rerun of the same code and flags what got worse, by name."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from harness.backends.targets import Target
from harness.checks.cases import load_case, materialize
from harness.checks.compare import save_results
from harness.checks.gate import GateRules, gate, load_baseline, load_run, save_baseline
from harness.checks.session import CheckSession
from harness.cli.gate import run as gate_cli
from harness.core.errors import InputError

CASES = Path(__file__).resolve().parent.parent / "cases"


def _parity_run(out: Path) -> Path:
    """A real parity run (fresh runner: nothing memoised) of two candidates on one prompt."""
    runner = CheckSession()
    case = load_case(CASES / "flash-mini.toml")
    prompt = case.prompts[0]
    for cand in ("torch-float32", "mlx-float32"):
        runner.compare(case=case.name, prompt=prompt.name, checkpoint=materialize(case),
                       tokens=prompt.tokens, candidate=Target.parse(cand),
                       reference=Target.parse("torch-float64"),
                       tolerance=case.tolerance("float32"))
    save_results(runner.results, out)
    return out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    run = _parity_run(tmp_path_factory.mktemp("base"))
    return save_baseline(load_run(run), tmp_path_factory.mktemp("bl") / "baseline.json")


def test_a_rerun_of_the_same_code_passes(baseline, tmp_path):
    rerun = _parity_run(tmp_path / "rerun")
    assert gate(load_baseline(baseline), load_run(rerun)).empty
    assert gate_cli(_args(rerun, baseline)) == 0


def _worsen(run: Path, point: str, factor: float, out: Path) -> Path:
    """A copy of a run where one capture point of the mlx pair got ``factor`` times worse."""
    df = pd.read_parquet(run / "parity.parquet")
    hit = (df["point"] == point) & (df["candidate"] == "mlx-float32")
    assert hit.sum() == 1
    df.loc[hit, "nmse"] *= factor
    out.mkdir()
    df.to_parquet(out / "parity.parquet")
    return out


def test_a_worsened_layer_is_flagged_by_name_even_inside_tolerance(baseline, tmp_path):
    run = _parity_run(tmp_path / "run")
    worse = _worsen(run, "l_out-4", 1e3, tmp_path / "worse")
    found = gate(load_baseline(baseline), load_run(worse))
    assert list(found["key"]) == ["flash-mini/short/mlx-float32/torch-float64/prefill/l_out-4"]
    assert found["metric"].iloc[0] == "nmse"
    assert gate_cli(_args(worse, baseline)) == 1


def test_a_point_that_now_fails_its_tolerance_is_flagged(baseline, tmp_path):
    run = _parity_run(tmp_path / "run")
    df = pd.read_parquet(run / "parity.parquet")
    hit = (df["point"] == "gla_out-0") & (df["candidate"] == "torch-float32")
    df.loc[hit, ["nmse", "passed"]] = [1e-3, False]
    df.to_parquet(run / "parity.parquet")
    found = gate(load_baseline(baseline), load_run(run))
    assert set(found["metric"]) == {"passed"}
    assert found["key"].iloc[0].endswith("torch-float32/torch-float64/prefill/gla_out-0")


def test_throughput_within_the_measured_spread_passes_and_a_slowdown_fails():
    cols = ["target", "case", "PP", "TG", "B", "S_PP", "T_PP", "T_PP_spread", "S_TG", "T_TG",
            "T_TG_spread"]
    base = pd.DataFrame([["mlx-float32", "c", 128, 32, 1, 1000.0, 0.128, 0.01, 50.0, 0.64,
                          0.064]], columns=cols)
    noisy = base.assign(S_TG=42.0)  # 16% slower, but each run's spread is 10%: plausible noise
    slowed = base.assign(S_PP=500.0)  # twice as slow, spread ~8%: a regression
    assert gate({"throughput": base}, {"throughput": noisy}).empty
    found = gate({"throughput": base}, {"throughput": slowed})
    assert list(found["metric"]) == ["S_PP"]


def test_mtp_acceptance_drop_beyond_binomial_noise_is_flagged():
    base = pd.DataFrame([{"case": "c", "prompt": "p", "backend": "mlx", "acceptance_rate": 0.8,
                          "num_draft_tokens": 100}])
    assert gate({"mtp": base}, {"mtp": base.assign(acceptance_rate=0.75)}).empty
    found = gate({"mtp": base}, {"mtp": base.assign(acceptance_rate=0.5)})
    assert list(found["metric"]) == ["acceptance_rate"]


def test_mtp_draft_logits_drifting_inside_their_tolerance_are_flagged():
    """A head whose draft logits grow 1000x worse (still far inside 1e-8) or whose draft top-1
    drops is a regression even while acceptance holds."""
    base = pd.DataFrame([{"case": "c", "prompt": "p", "backend": "llamacpp",
                          "acceptance_rate": 0.5, "num_draft_tokens": 20,
                          "draft_nmse_max": 2e-14, "draft_top1": 1.0}])
    assert gate({"mtp": base}, {"mtp": base.assign(draft_nmse_max=5e-14)}).empty
    drifted = gate({"mtp": base}, {"mtp": base.assign(draft_nmse_max=2e-11)})
    assert list(drifted["metric"]) == ["draft_nmse_max"]
    flipped = gate({"mtp": base}, {"mtp": base.assign(draft_top1=0.95)})
    assert list(flipped["metric"]) == ["draft_top1"]


def test_a_missing_baseline_is_bad_input_and_only_an_explicit_update_writes_one(tmp_path):
    run = _parity_run(tmp_path / "run")
    path = tmp_path / "none.json"
    with pytest.raises(InputError, match="--update-baseline"):
        gate_cli(_args(run, path))
    assert not path.exists()
    assert gate_cli(_args(run, path, update=True)) == 0
    assert set(load_baseline(path)) == {"parity"}


def test_rules_are_adjustable():
    assert GateRules(nmse_factor=10).nmse_factor == 10


def _args(run: Path, baseline: Path, update: bool = False):
    from argparse import Namespace

    return Namespace(run=run, baseline=baseline, update_baseline=update, force=False,
                     nmse_factor=GateRules.nmse_factor, min_drop=GateRules.min_drop)
