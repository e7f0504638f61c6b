"""The MTP table says where a head goes wrong: the prompt teacher-forced through the candidate's
head and the reference's, the first mtp_* point beyond the tolerance (among those the backend
names) is the first MTP divergence.

Each MTP mutation of the reference, judged against every correct backend, must be named at the
first point the backend exposes: all of them for torch and our llama.cpp port (whose graph names
every mtp_* point), the glue's points for MLX (the block is mlx-lm's own), and what upstream
bailingmoe3's MTP graph names (``mtp_eh_proj``, the router, ``h_nextn``) for Ling 3.0.
"""

from __future__ import annotations

import pytest

from harness.backends.targets import Target
from harness.checks.cases import CASES_DIR, load_case, materialize
from harness.checks.mtp import first_mtp_divergence, load_mtp_model
from references.variant import mutations
from tests.llamacpp_testing import require_llamacpp

TOL = 1e-8
ALL_POINTS = {  # torch, and our port's MTP graph
    "mtp_pre_norm_hidden": "mtp_hnorm",
    "mtp_trunk_norm": "mtp_result_norm",
    "mtp_router_no_bias": "mtp_ffn_moe_topk",
    "mtp_concat_swapped": "mtp_eh_proj",
    "mtp_wrong_token": "mtp_enorm",
}
MLX_GLUE = {**ALL_POINTS, "mtp_router_no_bias": "mtp_l_out"}  # routing is inside mlx-lm's block
UPSTREAM_BAILINGMOE3 = {  # no enorm/hnorm outputs named: the projection is the first point
    **ALL_POINTS,
    "mtp_pre_norm_hidden": "mtp_eh_proj",
    "mtp_wrong_token": "mtp_eh_proj",
}
EXPECTED = {
    ("mtp-agree", "torch-float32"): ALL_POINTS,
    ("mtp-agree", "mlx-float32"): MLX_GLUE,
    ("mtp-agree", "llamacpp-float32"): ALL_POINTS,
    ("ling3-mtp-agree", "torch-float32"): ALL_POINTS,
    ("ling3-mtp-agree", "mlx-float32"): MLX_GLUE,
    ("ling3-mtp-agree", "llamacpp-float32"): UPSTREAM_BAILINGMOE3,
}
_models: dict[tuple[str, str], object] = {}


def _model(case: str, target: str):
    """Loaded once per (case, target) for the whole module."""
    if (case, target) not in _models:
        if target.startswith("llamacpp"):
            require_llamacpp()
        ckpt = materialize(load_case(CASES_DIR / f"{case}.toml"))
        _models[case, target] = load_mtp_model(Target.parse(target), ckpt)
    return _models[case, target]


def _tokens(case: str) -> tuple[int, ...]:
    return load_case(CASES_DIR / f"{case}.toml").prompts[0].tokens


def test_every_mtp_mutation_has_an_expected_point():
    wanted = {m for m in mutations() if m.startswith("mtp_")}
    assert all(set(table) == wanted for table in EXPECTED.values())


@pytest.mark.parametrize(("case", "target"), sorted(EXPECTED))
def test_a_correct_head_does_not_diverge(case, target):
    reference = _model(case, "torch-float64")
    assert first_mtp_divergence(_model(case, target), reference, _tokens(case), TOL) == "none"


@pytest.mark.parametrize("mutation", sorted(ALL_POINTS))
@pytest.mark.parametrize(("case", "target"), sorted(EXPECTED))
def test_a_wrong_head_is_named_at_the_first_point_the_backend_exposes(case, target, mutation):
    wrong = _model(case, f"torch-float64:variant={mutation}")
    named = first_mtp_divergence(_model(case, target), wrong, _tokens(case), TOL)
    assert named == EXPECTED[case, target][mutation]


def test_a_crashing_capture_is_a_finding_for_that_backend_not_a_harness_crash():
    from harness.checks.mtp import MtpPrompt, MtpRunner

    case = load_case(CASES_DIR / "mtp-agree.toml")
    ckpt = materialize(case)
    reference = _model("mtp-agree", "torch-float64")

    class CrashingCapture:  # drafts as the reference does; its capture blows up
        label, vocab_size = "broken-port", reference.vocab_size

        def start(self):
            return reference.start()

        def capture(self, tokens):
            raise RuntimeError("shape mismatch inside the port")

    target = Target.parse("torch-float32")
    runner = MtpRunner(steps=8)
    runner._models[target, ckpt] = CrashingCapture()
    _, run = runner.run(ckpt, MtpPrompt(case.name, "p", _tokens("mtp-agree")), [target])
    assert run.mtp_first_divergence == "" and run.error == ""
    assert any("RuntimeError: shape mismatch inside the port" in f for f in runner.findings)
