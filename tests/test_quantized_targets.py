"""Quantized llama.cpp candidates, and the float64 reference on the weights they actually run.

``llamacpp:quant=<TYPE>`` quantizes the f32 conversion with llama.cpp's own quantizer and is
labelled by the real type (``llamacpp-Q4_K_M``); ``torch-float64:weights_gguf=<file>`` is our
reference on that file's dequantized weights (``torch-float64,dequantized=Q4_K_M``).  The file
comes from :func:`candidate_gguf`, which builds exactly what the candidate runs without running it.

Fast: option parsing, refusals naming both keys, labels (every existing label unchanged).  Slow
(the llama.cpp build, flash-mini): through ``CheckSession.compare``, Q8_0 and Q4_K_M candidates
are far closer to the dequantized reference than to the original one before the first MoE router,
and a dequantized reference built from another type's file (the mutation) is caught.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.backends.base import BackendOptions
from harness.backends.llamacpp_backend import candidate_gguf, parse_options
from harness.backends.registry import implementation, supports
from harness.backends.targets import Target
from harness.core.errors import InputError
from harness.core.tolerances import Tolerance
from tests.test_gguf_quantize import tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
# before the first routing decision (flash-mini's layer 0 is dense), so no expert flip hides it
EARLY_POINTS = ("attn_out-0", "l_out-0")
DEQUANTIZED_NMSE_MAX = 1e-3
LOOSE = Tolerance(nmse=1.0, top1=0.0, index_agreement=0.0)


# ---- options and refusals (fast) -------------------------------------------------------------


def test_quant_is_normalized_and_quantizes_the_f32_conversion() -> None:
    target = Target.parse("llamacpp:quant=q4_k_m")
    assert target.settings.quant == "Q4_K_M"
    settings = parse_options(target.options())
    assert (settings.quant, settings.outtype) == ("Q4_K_M", "f32")
    assert parse_options(Target.parse("llamacpp:quant=Q8_0:outtype=f32").options()).quant == "Q8_0"
    assert parse_options(Target.parse("llamacpp").options()).quant is None
    assert supports("llamacpp", "ling26", "quantized") and supports("llamacpp", "ling3",
                                                                     "quantized")


@pytest.mark.parametrize(("spec", "match"), [
    ("llamacpp:quant=Q4_K_M:gguf=/some/model.gguf", r"quant=Q4_K_M and gguf=/some/model\.gguf"),
    ("llamacpp:quant=Q4_K_M:outtype=q8_0", r"quant=Q4_K_M and outtype=q8_0"),
    ("llamacpp:quant=Q4_K_M:outtype=bf16", r"quant=Q4_K_M and outtype=bf16"),
    ("llamacpp:quant=Q4_K_X", r"quant='Q4_K_X'.*unknown quantization type.*Q4_K_M"),
])
def test_conflicting_or_unknown_quant_options_are_refused_at_parse(spec: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        Target.parse(spec)


def test_quant_with_a_non_float32_dtype_is_refused_naming_both() -> None:
    with pytest.raises(InputError, match=r"quant=Q8_0 and dtype bfloat16"):
        parse_options(Target.parse("llamacpp-bfloat16:quant=Q8_0").options())


def test_on_ling3_the_dequantized_reference_is_transformers_on_a_gguf_or_an_mlx_directory(
) -> None:
    ling3 = implementation("torch", "ling3")
    gguf = ling3.typed(Target.parse("torch-float64:weights_gguf=/some/model.gguf:"
                                    "activations=ggml-cpu").options())
    assert type(gguf.settings).__name__ == "TransformersOptions"
    assert str(gguf.settings.weights_gguf) == "/some/model.gguf"
    assert gguf.settings.activations == "ggml-cpu"
    mlx = ling3.typed(Target.parse("torch-float64:weights_mlx=/some/mlx-dir").options())
    assert type(mlx.settings).__name__ == "TransformersOptions"
    assert str(mlx.settings.weights_mlx) == "/some/mlx-dir"
    assert mlx.settings.activations is None  # mlx's quantized matmul keeps float32 activations
    # without the option the alias still hands over to transformers
    plain = implementation("torch", "ling3").typed(Target.parse("torch-float64").options())
    assert type(plain.settings).__name__ == "TransformersOptions"


@pytest.mark.parametrize(("spec", "match"), [
    ("transformers-float64:weights_mlx=/d:activations=ggml-cpu",
     r"activations=ggml-cpu .* needs weights_gguf=<file> \(mlx's quantized matmul rounds no "
     r"activation\)"),
    ("transformers-float64:weights_mlx=/d:weights_gguf=/m.gguf",
     r"weights_gguf=/m\.gguf and weights_mlx=/d conflict"),
])
def test_transformers_refuses_ggml_rounding_or_a_gguf_with_an_mlx_directory(
    spec: str, match: str
) -> None:
    with pytest.raises(InputError, match=match):
        Target.parse(spec)


# ---- labels (fast) ---------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "label"), [
    ("llamacpp", "llamacpp-float32"),
    ("llamacpp:outtype=q8_0", "llamacpp-float32,outtype=q8_0"),
    ("llamacpp-bfloat16:type_k=f16:type_v=f16", "llamacpp-bfloat16,type_k=f16,type_v=f16"),
    ("llamacpp:gguf=/absent/model.gguf", "llamacpp-float32,gguf=/absent/model.gguf"),
    ("torch-float64", "torch-float64"),
    ("torch-float64:weights_gguf=/absent.gguf", "torch-float64,weights_gguf=/absent.gguf"),
    ("torch:gla_impl=recurrent", "torch-float32,gla_impl=recurrent"),
    ("mlx:model_module=ports/x/bailing_hybrid.py", "mlx-float32,module=bailing_hybrid.py"),
])
def test_labels_without_a_quantization_stay_as_they_were(spec: str, label: str) -> None:
    assert Target.parse(spec).label == label


def test_a_quant_candidate_is_labelled_by_its_type() -> None:
    assert Target.parse("llamacpp:quant=Q4_K_M").label == "llamacpp-Q4_K_M"
    assert Target.parse("llamacpp:quant=iq4_nl").label == "llamacpp-IQ4_NL"
    assert Target.parse("llamacpp:quant=Q8_0:type_k=f16").label == "llamacpp-Q8_0,type_k=f16"


def test_a_given_gguf_is_labelled_by_the_type_in_its_header(tmp_path: Path) -> None:
    q4 = tiny_gguf(tmp_path / "model-q4.gguf", file_type=15, types=("Q8_0",))
    q8 = tiny_gguf(tmp_path / "model-q8.gguf", types=("Q8_0", "Q8_0"))  # no general.file_type
    f32 = tiny_gguf(tmp_path / "model-f32.gguf", file_type=0)
    assert Target.parse(f"llamacpp:gguf={q4}").label == "llamacpp-Q4_K_M,gguf=model-q4.gguf"
    assert Target.parse(f"llamacpp:gguf={q8}:n_ctx=64").label == (
        "llamacpp-Q8_0,gguf=model-q8.gguf,n_ctx=64")
    assert Target.parse(f"llamacpp:gguf={f32}").label == f"llamacpp-float32,gguf={f32}"
    assert Target.parse(f"torch-float64:weights_gguf={q4}").label == (
        "torch-float64,dequantized=Q4_K_M")
    assert Target.parse(f"torch-float64:variant=x:weights_gguf={f32}").label == (
        "torch-float64,variant=x,dequantized=F32")


# ---- candidate_gguf (fast parts) -------------------------------------------------------------


def test_candidate_gguf_of_a_given_file_is_that_file(tmp_path: Path) -> None:
    q4 = tiny_gguf(tmp_path / "m.gguf", file_type=15, types=("Q8_0",))
    assert candidate_gguf(Target.parse(f"llamacpp:gguf={q4}"), tmp_path) == q4.resolve()
    options = BackendOptions(dtype="float32", extra={"gguf": str(q4)})
    assert candidate_gguf(options, tmp_path) == q4.resolve()
    with pytest.raises(InputError, match=r"torch target, not llamacpp: it runs no GGUF"):
        candidate_gguf(Target.parse("torch-float64"), tmp_path)
    with pytest.raises(InputError, match="file not found"):
        candidate_gguf(Target.parse(f"llamacpp:gguf={tmp_path / 'absent.gguf'}"), tmp_path)


def test_a_missing_weights_gguf_is_an_input_error(tmp_path: Path) -> None:
    from harness.backends.torch_backend import TorchBackend

    options = Target.parse(f"torch-float64:weights_gguf={tmp_path / 'absent.gguf'}").options()
    with pytest.raises(InputError, match=r"weights_gguf=.*absent\.gguf: file not found"):
        TorchBackend().load(tmp_path, options)


# ---- slow: flash-mini quantized by llama.cpp, against the dequantized reference ---------------


@pytest.fixture(scope="module")
def flash():
    from harness.checks.cases import load_case, materialize
    from tests.test_gguf_quantize import patched_site

    patched_site()  # skips (or fails under the CI flag) without the build
    from tests.llamacpp_testing import require_llamacpp

    require_llamacpp()
    case = load_case(ROOT / "cases" / "flash-mini.toml")
    return case, materialize(case)


@pytest.fixture(scope="module")
def session():
    from harness.checks.session import CheckSession

    return CheckSession()


def early_nmse(session, flash, candidate: Target, reference: Target) -> dict[str, float]:
    """Per early point: the candidate's NMSE against ``reference`` (via CheckSession.compare)."""
    case, ckpt = flash
    prompt = case.prompts[1]
    r = session.compare(case=case.name, prompt=prompt.name, checkpoint=ckpt,
                        tokens=prompt.tokens, candidate=candidate, reference=reference,
                        tolerance=LOOSE)
    table = r.table.set_index("point")["nmse"]
    return {p: float(table[p]) for p in EARLY_POINTS}


def tracking_failures(vs_deq: dict[str, float], vs_orig: dict[str, float], qtype: str
                      ) -> list[str]:
    """Why the dequantized reference does not explain the quantized candidate (empty: it does)."""
    bad = []
    for p in EARLY_POINTS:
        if not vs_deq[p] <= DEQUANTIZED_NMSE_MAX:
            bad.append(f"{p}: vs dequantized {vs_deq[p]:.1e} > {DEQUANTIZED_NMSE_MAX:.0e}")
        if qtype != "Q8_0" and not vs_deq[p] * 10 <= vs_orig[p]:
            bad.append(f"{p}: vs dequantized {vs_deq[p]:.1e} not 10x below vs original "
                       f"{vs_orig[p]:.1e}")
    return bad


@pytest.mark.slow
def test_candidate_gguf_is_the_quantized_file_the_candidate_runs(session, flash) -> None:
    from harness.quant.gguf_quantize import cache_dir, gguf_file_type

    _, ckpt = flash
    target = Target.parse("llamacpp:quant=Q4_K_M")
    gguf = candidate_gguf(target, ckpt)
    assert gguf.parent == cache_dir() and gguf_file_type(gguf) == "Q4_K_M"
    assert candidate_gguf(target, ckpt) == gguf  # cached
    assert gguf_file_type(candidate_gguf(Target.parse("llamacpp"), ckpt)) == "F32"
    model = session.model(target, ckpt)
    assert model.gguf == gguf and model.describe()["quant"] == "Q4_K_M"


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_a_quantized_candidate_tracks_the_reference_on_its_dequantized_weights(
    session, flash, qtype: str
) -> None:
    _, ckpt = flash
    candidate = Target.parse(f"llamacpp:quant={qtype}")
    gguf = candidate_gguf(candidate, ckpt)
    dequantized = Target.parse(f"torch-float64:weights_gguf={gguf}")
    assert (candidate.label, dequantized.label) == (
        f"llamacpp-{qtype}", f"torch-float64,dequantized={qtype}")
    vs_deq = early_nmse(session, flash, candidate, dequantized)
    vs_orig = early_nmse(session, flash, candidate, Target.parse("torch-float64"))
    print(f"\n{qtype}: vs dequantized {vs_deq}, vs original {vs_orig}")
    assert all(v > 0 for v in vs_deq.values())  # the port's 8-bit activations still differ
    assert tracking_failures(vs_deq, vs_orig, qtype) == []


@pytest.mark.slow
def test_a_dequantized_reference_of_another_type_is_caught(session, flash) -> None:
    """Mutation: Q8_0 weights as the reference of a Q4_K_M candidate."""
    _, ckpt = flash
    candidate = Target.parse("llamacpp:quant=Q4_K_M")
    wrong = Target.parse(f"torch-float64:weights_gguf="
                         f"{candidate_gguf(Target.parse('llamacpp:quant=Q8_0'), ckpt)}")
    assert wrong.label == "torch-float64,dequantized=Q8_0"
    vs_wrong = early_nmse(session, flash, candidate, wrong)
    vs_orig = early_nmse(session, flash, candidate, Target.parse("torch-float64"))
    bad = tracking_failures(vs_wrong, vs_orig, "Q4_K_M")
    assert any(b.startswith("l_out-0:") for b in bad), bad


@pytest.mark.slow
def test_the_dequantized_reference_reads_the_ggufs_weights(session, flash) -> None:
    """On the f32 conversion the dequantized reference is the original, bit for bit."""
    _, ckpt = flash
    f32 = candidate_gguf(Target.parse("llamacpp"), ckpt)
    target = Target.parse(f"torch-float64:weights_gguf={f32}")
    model = session.model(target, ckpt)
    assert model.streamed and any("dequantized from" in f for f in model.findings)
    tokens = list(flash[0].prompts[0].tokens)
    a = model.start(["l_out-0"]).feed(tokens)
    b = session.model(Target.parse("torch-float64"), ckpt).start(["l_out-0"]).feed(tokens)
    assert np.array_equal(a["result_output"], b["result_output"])
    assert np.array_equal(a["l_out-0"], b["l_out-0"])
