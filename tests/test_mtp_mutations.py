"""Every MTP-head mistake a port could make is caught, and named at the MTP capture point where it
first differs; it also moves the drafts, so the MTP table's draft top-1 flags it.

As in test_mutations.py, a mutant is the float64 reference with one knob wrong, held to the
float32 tolerance against the correct float64 reference.
"""

from __future__ import annotations

import pytest

from harness.checks.cases import CASES_DIR, load_case, materialize
from harness.checks.compare import compare_captures, first_divergence
from harness.checks.mtp_decoding import draft_agreement, replay_drafts, speculative_greedy
from harness.core.capture_points import all_points
from harness.core.metrics import nmse
from references.model import BailingHybridReference, ReferenceOptions
from references.mtp_session import ReferenceMtpModel
from references.variant import mutations

# mutation -> the first MTP capture point it changes (flash-mini, prompt "short")
EXPECTED = {
    "mtp_pre_norm_hidden": "mtp_hnorm",  # hnorm fed l_out-{L-1} instead of model.norm's output
    "mtp_trunk_norm": "mtp_result_norm",  # model.norm instead of the MTP final_layernorm
    "mtp_router_no_bias": "mtp_ffn_moe_topk",  # the bias only steers selection: ids move first
    "mtp_concat_swapped": "mtp_eh_proj",  # [hnorm ; enorm]: inputs equal, projection differs
    "mtp_wrong_token": "mtp_enorm",  # embedding of token t instead of t+1
}
STEPS = 16


@pytest.fixture(scope="module")
def case():
    case = load_case(CASES_DIR / "flash-mini.toml")
    return case, materialize(case), case.prompts[0].tokens


def _model(case, variant=None) -> BailingHybridReference:
    options = ReferenceOptions(variant=variant) if variant else ReferenceOptions()
    return BailingHybridReference.from_checkpoint(case[1], options)


@pytest.fixture(scope="module")
def correct(case):
    model = _model(case)
    names = all_points(model.n_layers, mtp=True)
    return model, model.start(names).feed(case[2])


def test_every_mtp_mutation_is_listed():
    assert set(EXPECTED) == {m for m in mutations() if m.startswith("mtp_")}


def test_the_unmutated_reference_passes_every_mtp_point(case, correct):
    _, caps = correct
    df = compare_captures(
        _model(case).start(list(caps)).feed(case[2]), caps, case[0].tolerance("float32")
    )
    assert df["passed"].all() and first_divergence(df) is None
    assert {p for p in df["point"] if p.startswith("mtp_")} == {p for p in caps if "mtp" in p}


@pytest.mark.parametrize("mutation", sorted(EXPECTED))
def test_mtp_mutation_is_named_at_its_first_mtp_point(case, correct, mutation):
    _, reference = correct
    mutant = _model(case, mutations()[mutation])
    df = compare_captures(
        mutant.start(list(reference)).feed(case[2]), reference, case[0].tolerance("float32")
    )
    assert first_divergence(df) == EXPECTED[mutation]
    trunk = df[~df["point"].str.startswith("mtp_")]
    assert trunk["passed"].all(), "an MTP-only mutation must leave the trunk untouched"
    assert not df.loc[df["point"] == "mtp_result_output", "passed"].item()


@pytest.mark.parametrize("mutation", sorted(EXPECTED))
def test_mtp_mutation_moves_the_drafts_and_drafts_like_its_capture(case, correct, mutation):
    """The drafting session honours the variant exactly as ReferenceSession's MTP capture does,
    and the draft-logit comparison in the MTP table sees the mutation (top-1 < 1)."""
    model, _ = correct
    run = speculative_greedy(ReferenceMtpModel(model), case[2], STEPS)
    mutant = _model(case, mutations()[mutation])
    rows = replay_drafts(ReferenceMtpModel(mutant), run)
    forced = mutant.start(["mtp_result_output"]).feed([*case[2], *run.tokens])
    for step, row in zip(run.steps, rows, strict=True):
        if step.drafts:
            assert nmse(row[0], forced["mtp_result_output"][step.position]) < 1e-26
    nmse_max, top1 = draft_agreement(run, rows)
    assert top1 < 1.0 and nmse_max > 1e-2
