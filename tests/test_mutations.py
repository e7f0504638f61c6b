"""Every parity check could have failed: each deliberately wrong reference variant is caught,
and named at the first capture point it affects, in the first layer it affects.

A mutant runs in float64 and is held to the float32 tolerance, the bar a real float32 port meets:
so each row below proves the check that passes real ports would have failed this bug.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.backends.targets import Target
from harness.checks.cases import load_case, materialize
from harness.checks.session import CheckSession

CASES = Path(__file__).resolve().parent.parent / "cases"

# mutation -> (case, the first divergent capture point)
EXPECTED = {
    "slope_off_by_one": ("flash-mini", "gla_out-0"),
    "tail_clause_dropped": ("tail-clause", "attn_out-6"),
    "gla_rope_interleaved": ("flash-mini", "gla_out-0"),
    "mla_rope_half_split": ("flash-mini", "attn_out-3"),
    "group_norm_swapped": ("flash-mini", "attn_out-0"),
    "gate_fed_attn_output": ("flash-mini", "g_gate-0"),
    "expert_bias_in_weights": ("flash-mini", "ffn_moe_weights-1"),
    "no_group_limit": ("flash-mini", "ffn_moe_topk-1"),
    "shared_experts_dropped": ("flash-mini", "ffn_shexp-1"),
}

REFERENCE = Target.parse("torch-float64")


@pytest.fixture(scope="module")
def runner() -> CheckSession:
    return CheckSession()


def _compare(runner: CheckSession, case_name: str, mutation: str | None):
    case = load_case(CASES / f"{case_name}.toml")
    prompt = case.prompts[-1]
    extra = {"variant": mutation} if mutation else {}
    candidate = Target.parse("torch-float64", extra)
    return runner.compare(
        case=case.name, prompt=prompt.name, checkpoint=materialize(case), tokens=prompt.tokens,
        candidate=candidate, reference=REFERENCE, tolerance=case.tolerance("float32"),
    )


@pytest.mark.parametrize("mutation", sorted(EXPECTED))
def test_mutation_is_caught_at_the_first_affected_point(runner, mutation):
    case_name, point = EXPECTED[mutation]
    result = _compare(runner, case_name, mutation)
    assert not result.passed, f"{mutation} passed parity: the check could not have failed"
    assert result.first_divergence == point, result.summary_line()


@pytest.mark.parametrize("case_name", sorted({c for c, _ in EXPECTED.values()}))
def test_the_unmutated_reference_passes_the_same_check(runner, case_name):
    result = _compare(runner, case_name, None)
    assert result.passed, result.summary_line()


def test_slope_off_by_one_hurts_layer_0_most(runner):
    """The off-by-one adds 1/(L-1) to every layer factor; relative to f(0)=1 it is largest at 0."""
    table = _compare(runner, "flash-mini", "slope_off_by_one").table
    gla = table[table["point"].str.startswith("gla_out-")].set_index("layer")["nmse"]
    assert gla.idxmax() == 0 or gla.index.min() == 0
    assert gla.loc[0] > 1e-6
