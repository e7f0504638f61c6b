"""Speculative decoding with the MTP head: verification never changes the greedy output, the
metrics mean what vLLM and llama-server mean, the reference's drafts are its teacher-forced MTP
rows, and MLX's MTP head drafts exactly the reference's tokens."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.backends.mlx_backend import MlxBackend
from harness.backends.targets import Target
from harness.checks.cases import CASES_DIR, load_case, materialize
from harness.checks.mtp import MtpPrompt, MtpRunner, load_mtp_model, mtp_section
from harness.checks.mtp_decoding import (
    DraftStep,
    OracleDrafts,
    SpecResult,
    plain_greedy,
    replay_drafts,
    speculative_greedy,
)
from harness.checks.mtp_store import MTP_COLUMNS, mtp_frame, save_mtp
from harness.core.errors import InputError
from harness.core.metrics import nmse
from harness.report.page import render_section
from references.model import BailingHybridReference
from references.mtp_session import ReferenceMtpModel
from tests.tiny_checkpoint import write_tiny_checkpoint

needs_mlx = pytest.mark.skipif(
    not MlxBackend().availability().ok, reason=MlxBackend().availability().reason
)
STEPS = 12
# The float64 reference's greedy acceptance over STEPS tokens (chain 1) on each fast case
# prompt: (num_drafts, num_draft_tokens, num_accepted_tokens).  The case weights are random, MTP
# head included, so its drafts are right only by chance: 0 accepted is the honest figure, and
# the oracle tests below cover acceptance > 0.
REFERENCE_ACCEPTANCE = {
    ("flash-mini", "short"): (10, 10, 0),
    ("heads-6", "random-40"): (10, 10, 0),
    ("no-qlora", "random-40"): (10, 10, 0),
}


def _checkpoint(name: str) -> tuple[Path, dict[str, tuple[int, ...]]]:
    case = load_case(CASES_DIR / f"{name}.toml")
    return materialize(case), {p.name: p.tokens for p in case.prompts}


@pytest.fixture(scope="module")
def flash():
    return _checkpoint("flash-mini")


@pytest.fixture(scope="module")
def reference(flash):
    return load_mtp_model(Target.parse("torch-float64"), flash[0])


@pytest.fixture(scope="module")
def mlx(flash):
    return load_mtp_model(Target.parse("mlx-float32"), flash[0])


def test_metrics_follow_the_vllm_definitions():
    def step(drafts, accepted):
        return DraftStep(0, 1, tuple(drafts), accepted, np.zeros((len(drafts), 4)))

    r = SpecResult(
        (1,), (1,) * 9, (step([1, 2], 2), step([1, 2], 0), step([1, 2], 1), step([], 0)), 2
    )
    assert (r.num_drafts, r.num_draft_tokens, r.num_accepted_tokens) == (3, 6, 3)
    assert r.acceptance_rate == 3 / 6  # accepted / drafted
    assert r.mean_acceptance_length == 1 + 3 / 3  # bonus token included
    assert r.accepted_per_pos == [2, 1]
    assert r.acceptance_per_pos == [2 / 3, 1 / 3]
    empty = SpecResult((1,), (1,), (), 1)
    assert math.isnan(empty.acceptance_rate) and math.isnan(empty.mean_acceptance_length)


@pytest.mark.parametrize("chain", [1, 2, 3])
def test_oracle_drafts_are_always_accepted(reference, flash, chain):
    prompt = flash[1]["short"]
    oracle = OracleDrafts(reference, prompt, STEPS + chain)
    r = speculative_greedy(oracle, prompt, STEPS, chain)
    assert list(r.tokens) == oracle.sequence[len(prompt) : len(prompt) + STEPS]
    assert r.acceptance_rate == 1.0
    assert all(s.accepted == len(s.drafts) for s in r.steps)
    assert r.mean_acceptance_length == 1 + r.num_draft_tokens / r.num_drafts
    assert r.accepted_per_pos[0] == r.num_drafts


@pytest.mark.parametrize("chain", [1, 3])
def test_rejections_roll_back_without_changing_the_greedy_output(reference, flash, chain):
    """Every third draft is wrong: the verifier restores the caches and re-feeds."""
    prompt = flash[1]["short"]
    oracle = OracleDrafts(reference, prompt, STEPS + chain, wrong_every=3)
    r = speculative_greedy(oracle, prompt, STEPS, chain)
    assert list(r.tokens) == plain_greedy(reference, prompt, STEPS)
    assert 0 < r.acceptance_rate < 1
    rejected = [s for s in r.steps if s.accepted < len(s.drafts)]
    assert rejected and all(s.accepted < len(s.drafts) for s in rejected)


def test_reference_drafts_are_its_teacher_forced_mtp_rows(reference, flash):
    """The drafting session and ReferenceSession's MTP capture are the same math: replayed after
    a run with accepted (multi-row MTP catch-up) and rejected steps, every draft row equals the
    teacher-forced mtp_result_output row of its position."""
    prompt = flash[1]["short"]
    run = speculative_greedy(OracleDrafts(reference, prompt, STEPS + 1, 3), prompt, STEPS)
    assert any(s.accepted for s in run.steps) and any(not s.accepted for s in run.draft_steps)
    rows = replay_drafts(reference, run)
    model: BailingHybridReference = reference.model
    forced = model.start(["mtp_result_output"]).feed([*prompt, *run.tokens])["mtp_result_output"]
    for s, row in zip(run.draft_steps, (r for r in rows if r.size), strict=True):
        assert nmse(row[0], forced[s.position]) < 1e-26


def test_a_checkpoint_without_an_mtp_head_is_refused(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "no-mtp", num_nextn_predict_layers=0)
    with pytest.raises(InputError, match="no MTP head"):
        ReferenceMtpModel(BailingHybridReference.from_checkpoint(ckpt))


@needs_mlx
@pytest.mark.parametrize("chain", [2])
def test_mlx_oracle_run_matches_the_reference_decision_for_decision(reference, mlx, flash, chain):
    """The same accept/reject pattern on both backends: rollback of mlx-lm's KVCache and GLA
    state keeps MLX's greedy output, and its MTP head (catching up several rows after accepted
    steps, chaining on its own output) drafts the reference's logits."""
    prompt = flash[1]["short"]
    runs = {
        m.label: speculative_greedy(OracleDrafts(m, prompt, STEPS + chain, 3), prompt, STEPS, chain)
        for m in (reference, mlx)
    }
    ref_run, mlx_run = runs[reference.label], runs[mlx.label]
    assert mlx_run.trace() == ref_run.trace()
    assert list(mlx_run.tokens) == plain_greedy(reference, prompt, STEPS)
    for a, b in zip(replay_drafts(mlx, ref_run), replay_drafts(reference, ref_run), strict=True):
        if a.size:
            assert nmse(a, b) < 1e-9
            assert np.array_equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize(("case", "prompt"), sorted(REFERENCE_ACCEPTANCE))
def test_reference_acceptance_is_stated_and_mlx_equals_it_draft_for_draft(case, prompt):
    ckpt, prompts = _checkpoint(case)
    mlx_ok = MlxBackend().availability().ok
    runner = MtpRunner(steps=STEPS)
    runs = runner.run(
        ckpt, MtpPrompt(case, prompt, prompts[prompt]), [Target.parse("mlx")] * mlx_ok
    )
    ref = runs[0]
    assert ref.backend == "torch-float64" and ref.greedy_unchanged
    r = ref.result
    figures = (r.num_drafts, r.num_draft_tokens, r.num_accepted_tokens)
    assert figures == REFERENCE_ACCEPTANCE[(case, prompt)]
    if not mlx_ok:
        pytest.skip(f"reference figures checked; mlx: {MlxBackend().availability().reason}")
    cand = runs[1]
    assert cand.backend == "mlx-float32"
    assert cand.result.trace() == r.trace()  # same drafts, same verdicts, every step
    assert cand.drafts_match_reference and cand.greedy_unchanged
    assert cand.result.acceptance_rate == r.acceptance_rate
    assert cand.result.mean_acceptance_length == r.mean_acceptance_length
    assert cand.draft_top1 == 1.0 and cand.draft_nmse_max < 1e-9
    assert not runner.findings


def test_the_table_has_the_gate_columns_and_the_section_says_what_it_shows(flash, tmp_path):
    prompt = flash[1]["short"]
    runner = MtpRunner(steps=6)
    runs = runner.run(flash[0], MtpPrompt("flash-mini", "short", prompt), [])
    df = mtp_frame(runs)
    assert list(df.columns[: len(MTP_COLUMNS)]) == list(MTP_COLUMNS)
    row = df.iloc[0]
    assert (row["backend"], row["num_drafts"], row["draft_top1"]) == ("torch-float64", 4, 1.0)
    assert row["mean_acceptance_length"] == 1 + row["num_accepted_tokens"] / row["num_drafts"]
    paths = save_mtp(df, tmp_path)
    back = pd.read_parquet(paths["parquet"])
    assert list(back.columns[: len(MTP_COLUMNS)]) == list(MTP_COLUMNS)
    html = render_section(mtp_section(runs))
    assert "torch-float64" in html and "mean acc. length" in html


def test_mtp_cli_writes_the_gate_table_for_a_checkpoint_no_case_made(tmp_path):
    from harness.cli.main import main
    from tests.upstream_writer import write_upstream_checkpoint

    ckpt = write_upstream_checkpoint(tmp_path / "ling26")
    out = tmp_path / "run"
    backends = "mlx" if MlxBackend().availability().ok else "torch"
    argv = ["mtp", "--checkpoint", str(ckpt), "--backends", backends, "--steps", "5"]
    assert main([*argv, "--chain", "2", "--out", str(out)]) == 0
    df = pd.read_csv(out / "mtp.csv")
    assert list(df.columns[: len(MTP_COLUMNS)]) == list(MTP_COLUMNS)
    assert df["backend"].tolist()[0] == "torch-float64" and len(df) == 2
    assert df["greedy_unchanged"].all() and df["drafts_match_reference"].all()
    assert "MTP speculative decoding" in (out / "index.html").read_text()
    assert main([*argv, "--out", str(out)]) == 2  # never overwrites a report
