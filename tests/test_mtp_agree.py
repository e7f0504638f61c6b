"""A case whose MTP acceptance means something: on cases/mtp-agree.toml the weights are shaped
(references/synthetic.py, ``[config._synthetic]``) so that the trunk and the MTP head both lean
on "next token = f(current token)" and agree often but not always.  The float64 reference's
acceptance is then a real figure between 0 and 1, MLX must reproduce it draft for draft, and every
MTP mutation visibly moves it: it lowers the acceptance or changes the drafts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness.backends.mlx_backend import MlxBackend
from harness.backends.targets import Target
from harness.checks.cases import CASES_DIR, load_case, materialize, write_checkpoint
from harness.checks.mtp import MtpPrompt, MtpRunner, load_mtp_model
from harness.checks.mtp_decoding import MtpModel, SpecResult, replay_drafts, speculative_greedy
from harness.core.errors import InputError
from references.synthetic import SHAPING_KEY, write_synthetic_checkpoint
from references.variant import mutations

STEPS = 32
# The float64 reference, greedy, chain 1, STEPS tokens per prompt:
# (num_drafts, num_draft_tokens, num_accepted_tokens).
REFERENCE_ACCEPTANCE = {"random-96": (21, 21, 9), "random-128": (20, 20, 10)}
# What each MTP mutation does on both prompts (mutant acceptance; drafts that differ from the
# reference's in the reference's own contexts), seed 2026:
#   mtp_concat_swapped   0/30, 0/30    21/21, 20/20 drafts differ   -> lowers acceptance
#   mtp_wrong_token      0/30, 0/30    21/21, 19/20 drafts differ   -> lowers acceptance
#   mtp_pre_norm_hidden  9/21, 11/19    2/21,  2/20 drafts differ   -> changes the drafts
#   mtp_trunk_norm       8/22, 12/18    3/21,  3/20 drafts differ   -> changes the drafts
#   mtp_router_no_bias   9/21, 11/19    3/21,  5/20 drafts differ   -> changes the drafts
# The last three only perturb the head (the hidden half of eh_proj, a norm weight, expert
# selection), so acceptance may move either way; their drafts move on every prompt.
EFFECT = {
    "mtp_concat_swapped": "lowers",
    "mtp_wrong_token": "lowers",
    "mtp_pre_norm_hidden": "changes",
    "mtp_trunk_norm": "changes",
    "mtp_router_no_bias": "changes",
}
MIN_CHANGED = 2  # drafts a "changes" mutation moves on each prompt, at least

mlx_ok = MlxBackend().availability().ok


@pytest.fixture(scope="module")
def case():
    case = load_case(CASES_DIR / "mtp-agree.toml")
    return case, materialize(case)


@pytest.fixture(scope="module")
def runs(case):
    """The reference's speculative run per prompt, and MLX's judged against it (if available)."""
    c, ckpt = case
    runner = MtpRunner(steps=STEPS)
    candidates = [Target.parse("mlx-float32")] if mlx_ok else []
    out = {
        p.name: runner.run(ckpt, MtpPrompt(c.name, p.name, p.tokens), candidates) for p in c.prompts
    }
    return out, runner


@pytest.fixture(scope="module")
def mutants(case) -> dict[str, MtpModel]:
    return {
        name: load_mtp_model(Target.parse("torch-float64", {"variant": name}), case[1])
        for name in EFFECT
    }


def _changed_drafts(mutant: MtpModel, ref: SpecResult) -> int:
    """Draft tokens the mutant's head picks differently in the reference run's contexts."""
    rows = replay_drafts(mutant, ref)
    return sum(
        int(np.argmax(row[0]) != step.drafts[0])
        for step, row in zip(ref.steps, rows, strict=True)
        if step.drafts
    )


def test_every_mtp_mutation_has_a_stated_effect():
    assert set(EFFECT) == {m for m in mutations() if m.startswith("mtp_")}


def test_the_shaping_knobs_stay_out_of_config_json(case):
    c, ckpt = case
    assert SHAPING_KEY in c.config
    written = json.loads((ckpt / "config.json").read_text())
    assert SHAPING_KEY not in written
    assert written == {k: v for k, v in c.config_json().items() if k != SHAPING_KEY}


def test_default_knobs_write_the_plain_checkpoint_byte_for_byte(tmp_path):
    """No knobs, or every knob at its default, is the unshaped writer (other cases unchanged)."""
    flash = load_case(CASES_DIR / "flash-mini.toml")
    plain, neutral = tmp_path / "plain", tmp_path / "neutral"
    plain.mkdir()
    neutral.mkdir()
    write_checkpoint(flash, plain)
    knobs = {"residual_scale": 1.0, "mtp_eh_identity": False, "mtp_eh_hidden_scale": 1.0}
    write_synthetic_checkpoint(flash.config_json(), flash.seed, neutral, knobs)
    files = sorted(p.name for p in plain.iterdir())
    assert files == sorted(p.name for p in neutral.iterdir())
    for name in files:
        assert (plain / name).read_bytes() == (neutral / name).read_bytes(), name


def test_an_unknown_or_ill_typed_knob_is_an_input_error(tmp_path):
    flash = load_case(CASES_DIR / "flash-mini.toml")
    with pytest.raises(InputError, match="residual_scal"):
        write_synthetic_checkpoint(flash.config_json(), 1, tmp_path, {"residual_scal": 0.1})
    with pytest.raises(InputError, match="mtp_eh_identity"):
        write_synthetic_checkpoint(flash.config_json(), 1, tmp_path, {"mtp_eh_identity": 1})


@pytest.mark.parametrize("prompt", sorted(REFERENCE_ACCEPTANCE))
def test_the_reference_acceptance_is_a_real_figure(runs, prompt):
    ref = runs[0][prompt][0]
    assert ref.backend == "torch-float64" and ref.greedy_unchanged
    r = ref.result
    assert (r.num_drafts, r.num_draft_tokens, r.num_accepted_tokens) == (
        REFERENCE_ACCEPTANCE[prompt]
    )
    assert 0.2 < r.acceptance_rate < 1.0
    assert 1.2 < r.mean_acceptance_length < 2.0


@pytest.mark.skipif(not mlx_ok, reason=MlxBackend().availability().reason)
@pytest.mark.parametrize("prompt", sorted(REFERENCE_ACCEPTANCE))
def test_mlx_acceptance_equals_the_reference_draft_for_draft(runs, prompt):
    by_prompt, runner = runs
    ref, cand = by_prompt[prompt]
    assert cand.backend == "mlx-float32"
    assert cand.result.trace() == ref.result.trace()  # same drafts, same verdicts, every step
    assert cand.drafts_match_reference and cand.greedy_unchanged
    assert cand.result.acceptance_rate == ref.result.acceptance_rate
    assert cand.result.mean_acceptance_length == ref.result.mean_acceptance_length
    assert cand.draft_top1 == 1.0 and cand.draft_nmse_max < 1e-9
    assert not runner.findings


@pytest.mark.parametrize("mutation", sorted(EFFECT))
def test_every_mtp_mutation_moves_the_acceptance_or_the_drafts(case, runs, mutants, mutation):
    mutant = mutants[mutation]
    for prompt in case[0].prompts:
        ref = runs[0][prompt.name][0].result
        spec = speculative_greedy(mutant, prompt.tokens, STEPS)
        # A wrong head never changes what is generated (the trunk verifies), only how fast.
        assert spec.tokens == ref.tokens, prompt.name
        changed = _changed_drafts(mutant, ref)
        if EFFECT[mutation] == "lowers":
            assert spec.acceptance_rate < ref.acceptance_rate / 2, prompt.name
            assert changed > ref.num_drafts // 2, prompt.name
        else:
            assert changed >= MIN_CHANGED, (prompt.name, changed)
