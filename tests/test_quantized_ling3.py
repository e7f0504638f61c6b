"""A quantized upstream Ling 3.0 port (llama.cpp's ``bailingmoe3``) is judged in two parts too.

Ling 3.0's reference is transformers' model; for a quantized GGUF it runs on the GGUF's own
weights, every weight of transformers' model overwritten from the GGUF
(harness/backends/transformers_port_weights.py), and
rounds where ggml-cpu rounds, with MLA absorbed as the port's graph computes it
(harness/backends/transformers_port_arithmetic.py).  Each claim could have failed: without the
rounding the right port fails in layer 0, a port reading the KDA gate's bound wrong fails at
the first KDA output it moves beyond the tolerance, and a reference head that concatenates in
the wrong order fails the MTP check at an mtp_* point.  A quantized MLX Ling 3.0 port (mlx-lm's
``bailing_moe_v3``) is judged the same way on its directory's weights:
tests/test_mlx_quantized_ling3.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from harness.backends.targets import REFERENCE, Target
from harness.checks import quantized
from harness.checks.cases import CASES_DIR, DEFAULT_TOLERANCES, load_case, materialize
from harness.checks.session import CheckSession, Subject

pytestmark = pytest.mark.slow

LING3 = load_case(CASES_DIR / "ling3-mini.toml")
MTP_CASE = load_case(CASES_DIR / "ling3-mtp-agree.toml")


def judge(case, candidate: str, mode: str = "prefill", reference: str = REFERENCE):
    session = CheckSession()
    subject = Subject.from_case(case, case.prompts[0].name)
    result = session.run(mode, subject, Target.parse(candidate), Target.parse(reference))
    return session, result


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M", "IQ4_NL"])
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_a_right_quantized_ling3_port_passes_and_reports_what_it_lost(quant, mode):
    session, result = judge(LING3, f"llamacpp:quant={quant}", mode)
    assert result.passed, result.message
    port, loss = session.results
    assert port.reference.endswith(",layer-local") and "activations=ggml-cpu" in port.reference
    assert port.tolerance == DEFAULT_TOLERANCES["quantized"]
    assert loss.informational
    logits = loss.table.set_index("point").loc["result_output"]
    assert logits["nmse"] > 1e3 * DEFAULT_TOLERANCES["float32"].nmse  # what the weights lost
    assert any("dequantized from" in f for f in session.findings)


def test_without_ggml_s_activation_rounding_the_right_ling3_port_fails(monkeypatch):
    real = quantized.dequantized_reference

    def exact(candidate, checkpoint, reference):
        target = real(candidate, checkpoint, reference)
        extra = {k: v for k, v in target.extra if k != "activations"}
        return Target(target.backend, target.dtype, tuple(sorted(extra.items())))

    monkeypatch.setattr(quantized, "dequantized_reference", exact)
    _, result = judge(LING3, "llamacpp:quant=Q8_0")
    assert not result.passed
    assert result.result.first_divergence.endswith("-0")


def _with_gate_bound(src: Path, out: Path, bound: float) -> Path:
    """A copy of ``src`` whose metadata gives the KDA gate another lower bound: a port that
    computes a wrong formula on the right weights."""
    from gguf import GGUFReader

    shutil.copyfile(src, out)
    field = GGUFReader(str(out), "r+").fields["bailingmoe3.kda.gate_lower_bound"]
    field.parts[field.data[0]][0] = bound
    return out


def test_a_ling3_port_with_a_wrong_kda_gate_bound_fails_at_a_kda_output(tmp_path: Path):
    # the bound scales every KDA layer's decay; sublayer-local, nothing before the first KDA
    # output it moves beyond the tolerance fails, and the MLA layer between passes
    from harness.backends.llamacpp_backend import candidate_gguf
    from references.ling3.config import load_config

    checkpoint = materialize(LING3)
    cfg = load_config(checkpoint)
    kda = [i for i in range(cfg.num_hidden_layers) if not cfg.is_mla(i)]
    right = candidate_gguf(Target.parse("llamacpp:quant=Q4_K_M"), checkpoint)
    wrong = _with_gate_bound(right, tmp_path / "wrong-bound.gguf", -1.0)
    for mode in ("prefill", "decode"):
        _, result = judge(LING3, f"llamacpp:gguf={wrong}", mode)
        assert not result.passed, result.message
        table = result.result.table.reset_index(drop=True)
        first = result.result.first_divergence
        stem, layer = first.rsplit("-", 1)
        assert stem == "attn_out" and int(layer) in kda, first
        cut = table.index[table["point"] == first][0]
        assert table.loc[: cut - 1, "passed"].all()
        assert table.loc[cut, "nmse"] > 10 * DEFAULT_TOLERANCES["quantized"].nmse
        assert any(table.loc[cut + 1 :, "passed"])  # later layers start from the port's values


def _mlx_missing() -> str | None:
    from harness.backends.mlx_backend import MlxBackend

    available = MlxBackend().availability()
    return None if available.ok else available.reason


@pytest.mark.parametrize("spec", [
    "llamacpp:quant=Q4_K_M",
    pytest.param("mlx:bits=4", marks=pytest.mark.skipif(_mlx_missing() is not None,
                                                        reason=str(_mlx_missing()))),
])
def test_a_quantized_ling3_mtp_head_is_judged_on_the_ports_own_hidden_state(spec):
    subject = Subject.from_case(MTP_CASE, MTP_CASE.prompts[0].name)
    candidate = Target.parse(spec)
    right = CheckSession().run("mtp", subject, candidate, Target.parse(REFERENCE))
    assert right.passed, right.message
    wrong_head = Target.parse(f"{REFERENCE}:variant=mtp_concat_swapped")
    wrong = CheckSession().run("mtp", subject, candidate, wrong_head)
    assert not wrong.passed
    assert wrong.result.mtp_first_divergence.startswith("mtp_")


def test_on_an_f32_gguf_the_reference_holds_exactly_the_checkpoint_s_weights():
    # the GGUF's tensors under transformers' names: every rename, the fused experts and the
    # concatenated convolution kernels undone right (A_log is stored as exp(A_log): its log is
    # exact only to rounding)
    from harness.backends.llamacpp_backend import candidate_gguf
    from harness.backends.transformers_ling3 import load_ling3

    checkpoint = materialize(LING3)
    gguf = candidate_gguf(Target.parse("llamacpp"), checkpoint)
    plain = load_ling3(checkpoint, Target.parse(REFERENCE).options()).model
    ported = load_ling3(checkpoint, Target.parse(f"{REFERENCE}:weights_gguf={gguf}").options())
    own = dict(plain.named_parameters())
    for name, value in ported.model.named_parameters():
        if name.endswith("A_log"):
            assert np.allclose(value.detach(), own[name].detach(), rtol=1e-6), name
        else:
            assert (value == own[name]).all(), name
    assert any("dequantized from" in f for f in ported.findings)
