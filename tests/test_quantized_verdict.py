"""A quantized port is judged in two parts (harness/checks/quantized.py).

Port correctness: the candidate against the float64 reference on the candidate's own weights,
with activations rounded where ggml-cpu's matmuls round them, sublayer-local; it decides.
Quantization error: that reference against the original one; reported, never judged.

Each claim could have failed: the same right ports fail the float32 tolerance against the
original reference, fail port correctness when the reference does not round activations as
ggml does, and a port with the wrong GLA slope fails port correctness at the first GLA point.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.backends.targets import REFERENCE, Target
from harness.checks import quantized
from harness.checks.cases import CASES_DIR, DEFAULT_TOLERANCES, load_case, materialize
from harness.checks.session import CheckSession, Subject
from harness.checks.slope_convention import case_convention
from harness.core import capture_points

pytestmark = pytest.mark.slow

FLASH = load_case(CASES_DIR / "flash-mini.toml")
HF_SLOPE = load_case(CASES_DIR / "flash-mini-hf-slope.toml")
RIGHT = ["Q8_0", "Q4_K_M", "IQ4_NL", "Q5_K_M"]  # Q5_K_M: Q5_1 (q8_1 sums) and F16 fallbacks


def reference_for(case) -> Target:
    convention = case_convention(case)
    base = Target.parse(REFERENCE)
    return convention.target(base) if convention is not None else base


def judge(case, candidate: str, mode: str = "prefill"):
    session = CheckSession()
    subject = Subject.from_case(case, case.prompts[0].name)
    result = session.run(mode, subject, Target.parse(candidate), reference_for(case))
    return session, subject, result


@pytest.mark.parametrize("quant", RIGHT)
def test_a_right_quantized_port_passes_port_correctness_and_reports_what_it_lost(quant):
    session, subject, result = judge(FLASH, f"llamacpp:quant={quant}")
    assert result.passed, result.message
    port, loss = session.results
    assert port.reference.endswith(",layer-local") and "dequantized=" in port.reference
    assert port.tolerance == DEFAULT_TOLERANCES["quantized"]
    assert loss.informational and loss.reference == REFERENCE
    logits = loss.table.set_index("point").loc["result_output"]
    # what the weights lost is far beyond any float32 tolerance: judged against the original
    # reference alone, this right port would fail
    assert logits["nmse"] > 1e3 * DEFAULT_TOLERANCES["float32"].nmse
    assert "quantization error" in result.message and "mean KLD" in result.message
    plain = session.compare(case=FLASH.name, prompt=subject.prompt,
                            checkpoint=subject.checkpoint, tokens=subject.tokens,
                            candidate=Target.parse(f"llamacpp:quant={quant}"),
                            reference=Target.parse(REFERENCE),
                            tolerance=DEFAULT_TOLERANCES["float32"])
    assert not plain.passed


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M", "IQ4_NL"])
def test_a_wrong_slope_port_quantized_fails_port_correctness_at_the_first_gla_point(quant):
    # our port applies the corrected slope; this checkpoint was published with hf_off_by_one
    _, _, result = judge(HF_SLOPE, f"llamacpp:quant={quant}")
    assert not result.passed
    assert result.result.first_divergence == "gla_out-0"
    assert "decay slopes" in result.message


def test_decode_through_the_ports_own_caches_is_judged_the_same_way():
    _, _, right = judge(FLASH, "llamacpp:quant=Q4_K_M", "decode")
    _, _, wrong = judge(HF_SLOPE, "llamacpp:quant=Q4_K_M", "decode")
    assert right.passed, right.message
    assert not wrong.passed and wrong.result.first_divergence == "gla_out-0"


def test_without_ggml_s_activation_rounding_the_right_q8_0_port_fails(monkeypatch):
    real = quantized.dequantized_reference

    def exact(candidate, checkpoint, reference):
        target = real(candidate, checkpoint, reference)
        extra = {**dict(target.extra), "activations": "exact"}
        return Target(target.backend, target.dtype, tuple(sorted(extra.items())))

    monkeypatch.setattr(quantized, "dequantized_reference", exact)
    _, _, result = judge(FLASH, "llamacpp:quant=Q8_0")
    assert not result.passed
    assert result.result.first_divergence.endswith("-0")  # in the first layer already


def test_an_unquantized_candidate_has_no_dequantized_reference():
    checkpoint = materialize(FLASH)
    reference = Target.parse(REFERENCE)
    for spec in ("llamacpp", "llamacpp-float32", "mlx", "torch-float32"):
        assert quantized.dequantized_reference(Target.parse(spec), checkpoint, reference) is None


def test_anchoring_the_reference_on_its_own_residual_stream_changes_nothing():
    from harness.backends.targets import get_backend

    checkpoint = materialize(FLASH)
    target = Target.parse(REFERENCE)
    model = get_backend("torch").load(checkpoint, target.options())
    tokens = list(FLASH.prompts[0].tokens)
    names = capture_points.all_points(model.n_layers)
    own = model.start(names).feed(tokens)
    anchored, missing = quantized.anchored_captures(model, tokens, own)
    assert missing == []
    for name in own:
        assert np.array_equal(anchored[name], own[name]), name


def test_an_anchor_moves_only_what_comes_after_it():
    from harness.backends.targets import get_backend

    checkpoint = materialize(FLASH)
    model = get_backend("torch").load(checkpoint, Target.parse(REFERENCE).options())
    tokens = list(FLASH.prompts[0].tokens)
    names = capture_points.all_points(model.n_layers)
    own = model.start(names).feed(tokens)
    moved = model.start(names, anchors={"ffn_inp-3": own["ffn_inp-3"] * 1.01}).feed(tokens)
    order = [n for n in names if n in own]
    cut = order.index("ffn_inp-3")
    assert all(np.array_equal(moved[n], own[n]) for n in order[: cut + 1])
    assert not np.array_equal(moved["ffn_norm-3"], own["ffn_norm-3"])
    assert not math.isclose(float(np.abs(moved["result_output"] - own["result_output"]).max()), 0)


def test_a_quantized_port_s_mtp_head_is_judged_teacher_forced():
    # drafts are reported (decoding runs unanchored), the head itself is judged: against a
    # reference whose MTP head concatenates in the other order, the right port must fail
    mtp_case = load_case(CASES_DIR / "mtp-agree.toml")
    subject = Subject.from_case(mtp_case, mtp_case.prompts[0].name)
    candidate = Target.parse("llamacpp:quant=Q4_K_M")
    right = CheckSession().run("mtp", subject, candidate, reference_for(mtp_case))
    assert right.passed, right.message
    wrong_head = Target.parse(f"{REFERENCE}:variant=mtp_concat_swapped")
    wrong = CheckSession().run("mtp", subject, candidate, wrong_head)
    assert not wrong.passed
    assert wrong.result.mtp_first_divergence.startswith("mtp_")
