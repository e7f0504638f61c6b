"""Mutation tests still bite when the reference streams its weights: a wrong variant run
streamed, against the streamed float64 reference, fails at the same first capture point as in
memory (tests/test_mutations.py), and the unmutated streamed reference passes."""

from __future__ import annotations

import pytest
import torch

from harness.backends.targets import Target
from harness.checks.cases import load_case, materialize
from harness.checks.session import CheckSession
from tests.test_mutations import CASES, EXPECTED

STREAMED = {"load": "streamed"}
REFERENCE = Target.parse("torch-float64", STREAMED)
# One mutation in the attention (GLA), one in MLA, two in the MoE (router, shared expert).
PICKED = ("slope_off_by_one", "mla_rope_half_split", "no_group_limit", "shared_experts_dropped")


@pytest.fixture(scope="module")
def runner():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: the thread pool only costs on a shared machine
    yield CheckSession()
    torch.set_num_threads(before)


def _compare(runner: CheckSession, mutation: str | None):
    case = load_case(CASES / "flash-mini.toml")
    prompt = case.prompts[-1]
    candidate = Target.parse("torch-float64", {**STREAMED, **({"variant": mutation}
                                                              if mutation else {})})
    return runner.compare(
        case=case.name, prompt=prompt.name, checkpoint=materialize(case), tokens=prompt.tokens,
        candidate=candidate, reference=REFERENCE, tolerance=case.tolerance("float32"),
    )


@pytest.mark.parametrize("mutation", PICKED)
def test_a_streamed_mutant_is_caught_at_the_first_affected_point(runner, mutation):
    _, point = EXPECTED[mutation]
    result = _compare(runner, mutation)
    assert not result.passed, f"{mutation} passed parity streamed"
    assert result.first_divergence == point, result.summary_line()


def test_the_streamed_models_really_stream(runner):
    _compare(runner, None)
    model = runner.model(REFERENCE, materialize(load_case(CASES / "flash-mini.toml")))
    assert model.load_mode == "streamed"
    assert model.weight_reads.bytes_read > 0


def test_the_unmutated_streamed_reference_passes(runner):
    result = _compare(runner, None)
    assert result.passed, result.summary_line()
