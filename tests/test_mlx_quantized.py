"""Quantized MLX candidates, and the float64 reference on the weights they actually run.

``mlx:bits=4[:group=64]`` quantizes the checkpoint with mlx-lm's own code path (the steps of
``mlx_lm convert -q``, cached) and is labelled ``mlx-q4g64``; ``mlx:model_dir=DIR`` runs a user's
MLX directory.  ``torch-float64:weights_mlx=DIR`` is our reference on that directory's weights,
dequantized with ``mx.dequantize`` and mapped back to the checkpoint's names
(``torch-float64,dequantized=q4g64``); :func:`candidate_mlx_dir` names the directory.

Fast: options, refusals, labels, ``mx.dequantize`` against a hand computation.  On flash-mini:
the mapping is exact on an unquantized directory (bit for bit, the MTP layers from the
checkpoint), a broken inverse of mlx-lm's ``sanitize`` is caught, the candidate matches its
dequantized reference to float32 rounding at every point, and a wrong-slope port quantized to 4
bits is caught at the first GLA point, where against the original reference it hides in the
quantization error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from harness.backends.base import BackendOptions
from harness.backends.mlx_backend import MlxBackend, candidate_mlx_dir
from harness.backends.registry import supports
from harness.backends.targets import Target
from harness.core.errors import InputError
from harness.core.tolerances import Tolerance

pytestmark = pytest.mark.skipif(
    not MlxBackend().availability().ok, reason=MlxBackend().availability().reason
)

ROOT = Path(__file__).resolve().parent.parent
FLOAT32_ROUNDING = 1e-9  # NMSE of the candidate against its dequantized reference (measured ~2e-12)
EXACT = Tolerance(nmse=FLOAT32_ROUNDING, top1=1.0, index_agreement=1.0)
LOOSE = Tolerance(nmse=1.0, top1=0.0, index_agreement=0.0)
STOCK_SLOPE = "1 - self.layer_idx / denom + 1e-5"  # mlx-lm's GLA layer factor
OFF_BY_ONE = "1 - (self.layer_idx - 1) / denom + 1e-5"  # HF-R's original, the wrong slope


def hand_dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group: int,
                    bits: int) -> np.ndarray:
    """``scale * q + bias`` in float32, q unpacked LSB-first from the uint32 stream."""
    stream = np.unpackbits(packed.astype("<u4").view(np.uint8), axis=-1, bitorder="little")
    q = (stream.reshape(*packed.shape[:-1], -1, bits) << np.arange(bits)).sum(-1)
    s = np.repeat(scales.astype(np.float32), group, axis=-1)
    b = np.repeat(biases.astype(np.float32), group, axis=-1)
    return s * q.astype(np.float32) + b


def write_config(folder: Path, **config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ---- options, refusals, labels (fast) --------------------------------------------------------


def test_bits_defaults_to_group_64_and_mlx_declares_quantized() -> None:
    settings = Target.parse("mlx:bits=4").settings
    assert (settings.bits, settings.group, settings.group_size) == (4, None, 64)
    assert Target.parse("mlx:bits=8:group=32").settings.group_size == 32
    assert Target.parse("mlx").settings.group_size is None
    assert supports("mlx", "ling26", "quantized") and supports("mlx", "ling3", "quantized")


@pytest.mark.parametrize(("spec", "match"), [
    ("mlx:bits=7", r"mlx-float32: option bits=7: expected one of 2, 3, 4, 5, 6, 8"),
    ("mlx:bits=4:group=48", r"option group=48: expected one of 32, 64, 128"),
    ("mlx:group=32", r"option group=32 needs bits="),
    ("mlx:bits=four", r"option bits='four': expected an integer"),
    ("mlx:bits=4:model_dir=/some/mlx", r"bits=4 and model_dir=/some/mlx conflict"),
])
def test_bad_quantization_options_are_refused_naming_the_key(spec: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        Target.parse(spec)


def test_quantized_targets_are_labelled_by_bits_and_group(tmp_path: Path) -> None:
    q4 = write_config(tmp_path / "ling-q4", quantization={"group_size": 32, "bits": 4})
    mx4 = write_config(tmp_path / "ling-mx", quantization={"group_size": 32, "bits": 4,
                                                           "mode": "mxfp4"})
    plain = write_config(tmp_path / "ling-bf16", torch_dtype="bfloat16")
    assert Target.parse("mlx:bits=4").label == "mlx-q4g64"
    assert Target.parse("mlx:bits=8:group=32").label == "mlx-q8g32"
    assert Target.parse("mlx-bfloat16:bits=4").label == "mlx-q4g64,dtype=bfloat16"
    assert Target.parse("mlx:bits=4:model_module=/p/port.py").label == "mlx-q4g64,module=port.py"
    assert Target.parse(f"mlx:model_dir={q4}").label == "mlx-q4g32,model_dir=ling-q4"
    assert Target.parse(f"mlx:model_dir={mx4}").label == "mlx-mxfp4g32,model_dir=ling-mx"
    assert Target.parse(f"mlx:model_dir={plain}").label == f"mlx-float32,model_dir={plain}"
    assert Target.parse(f"torch-float64:weights_mlx={q4}").label == (
        "torch-float64,dequantized=q4g32")
    assert Target.parse("torch-float64:weights_mlx=/absent").label == (
        "torch-float64,weights_mlx=/absent")
    assert Target.parse("mlx").label == "mlx-float32"  # unchanged without a quantization


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequantize_is_scale_times_q_plus_bias_in_float32(bits: int, group: int) -> None:
    import mlx.core as mx

    from harness.quant.mlx_weights import dequantize

    w = np.random.default_rng(bits * group).standard_normal((6, 256)).astype(np.float32)
    packed, scales, biases = (np.array(a) for a in mx.quantize(mx.array(w), group, bits))
    ours = dequantize(packed, scales, biases, (group, bits, "affine"))
    assert ours.dtype == np.float32
    assert np.array_equal(ours, hand_dequantize(packed, scales, biases, group, bits))


def test_candidate_mlx_dir_is_none_without_a_quantization_and_refuses_other_backends(
    tmp_path: Path,
) -> None:
    write_config(tmp_path, architectures=["BailingMoeV2_5ForCausalLM"])
    assert candidate_mlx_dir(Target.parse("mlx"), tmp_path) is None
    assert candidate_mlx_dir(BackendOptions(dtype="float32"), tmp_path) is None
    with pytest.raises(InputError, match=r"torch target, not mlx: it runs no MLX model directory"):
        candidate_mlx_dir(Target.parse("torch-float64"), tmp_path)
    with pytest.raises(InputError, match=r"model_dir=.*absent: no config\.json there"):
        candidate_mlx_dir(Target.parse(f"mlx:model_dir={tmp_path / 'absent'}"), tmp_path)


def test_a_missing_weights_mlx_is_an_input_error(tmp_path: Path) -> None:
    from harness.backends.torch_backend import TorchBackend

    options = Target.parse(f"torch-float64:weights_mlx={tmp_path / 'absent'}").options()
    with pytest.raises(InputError, match=r"weights_mlx=.*absent: no config\.json there"):
        TorchBackend().load(tmp_path, options)


# ---- flash-mini ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flash(tmp_path_factory: pytest.TempPathFactory):
    """flash-mini, with the quantization cache in a folder of this module's own."""
    from harness.checks.cases import load_case, materialize
    from harness.core import cache

    case = load_case(ROOT / "cases" / "flash-mini.toml")
    ckpt = materialize(case)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cache.ENV, str(tmp_path_factory.mktemp("cache")))
        yield case, ckpt


@pytest.fixture(scope="module")
def session(flash):
    from harness.checks.session import CheckSession

    return CheckSession()


@pytest.fixture(scope="module")
def wrong_slope_port(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mlx_lm.models.bailing_hybrid as stock

    text = Path(stock.__file__).read_text()
    assert text.count(STOCK_SLOPE) == 1, "mlx-lm's slope line moved: update this test"
    port = tmp_path_factory.mktemp("ports") / "bailing_hybrid_off_by_one.py"
    port.write_text(text.replace(STOCK_SLOPE, OFF_BY_ONE))
    return port


@pytest.fixture(scope="module")
def unquantized_dir(flash, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """flash-mini through ``mlx_lm convert`` without ``-q``."""
    from harness.backends.mlx_backend import STOCK_MODULE
    from harness.quant.mlx_quantize import convert

    out = tmp_path_factory.mktemp("mlx-f32")
    convert(flash[1], out, None, 64, port_path=None, stock_module=STOCK_MODULE,
            stock_name="mlx-lm")
    return out


def compare(session, flash, candidate: Target, reference: Target, tolerance: Tolerance):
    case, ckpt = flash
    prompt = case.prompts[1]
    return session.compare(case=case.name, prompt=prompt.name, checkpoint=ckpt,
                           tokens=prompt.tokens, candidate=candidate, reference=reference,
                           tolerance=tolerance)


def dequantized_reference(candidate: Target, ckpt: Path) -> Target:
    return Target.parse(f"torch-float64:weights_mlx={candidate_mlx_dir(candidate, ckpt)}")


def test_bits_quantizes_with_mlx_lm_once_into_a_cached_directory(flash) -> None:
    from harness.quant.mlx_quantize import cache_dir, conversion_note

    _, ckpt = flash
    target = Target.parse("mlx:bits=4")
    folder = candidate_mlx_dir(target, ckpt)
    assert folder is not None and folder.parent == cache_dir()
    quantization = json.loads((folder / "config.json").read_text())["quantization"]
    assert (quantization["bits"], quantization["group_size"]) == (4, 64)
    # mlx-lm's own quant_predicate ran: its routers stay at 8 bits
    assert quantization["model.layers.1.mlp.gate.gate_proj"] == {"group_size": 64, "bits": 8}
    assert "bits per weight" in (conversion_note(folder) or "")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert candidate_mlx_dir(target, ckpt) == folder  # cached, not quantized again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert candidate_mlx_dir(Target.parse("mlx:bits=8"), ckpt) != folder


def test_the_dequantized_weights_are_the_stored_groups_under_the_checkpoints_names(flash) -> None:
    from harness.quant.mlx_weights import MlxWeights

    _, ckpt = flash
    folder = candidate_mlx_dir(Target.parse("mlx:bits=4"), ckpt)
    weights = MlxWeights(folder, ckpt)
    cpu = torch.device("cpu")
    with safe_open(folder / "model.safetensors", framework="numpy") as fh:
        def stored(key: str, index: int | None = None) -> list[np.ndarray]:
            parts = [fh.get_tensor(f"{key}.{p}") for p in ("weight", "scales", "biases")]
            return parts if index is None else [p[index] for p in parts]

        cases = {  # HF name -> (its packed groups, bits)
            "model.layers.1.mlp.experts.5.gate_proj.weight": (
                stored("model.layers.1.mlp.switch_mlp.gate_proj", 5), 4),
            "model.layers.1.mlp.gate.weight": (stored("model.layers.1.mlp.gate.gate_proj"), 8),
            "model.word_embeddings.weight": (stored("model.word_embeddings"), 4),
        }
        for name, (parts, bits) in cases.items():
            want = hand_dequantize(*parts, 64, bits).astype(np.float64)
            got = weights.get(name, torch.float64, cpu).numpy()
            assert np.array_equal(got, want), name
            assert weights.quantized(name)
            rows = weights.get(name, torch.float64, cpu, rows=(3, 7), cols=(8, 40)).numpy()
            assert np.array_equal(rows, want[3:7, 8:40]), name
    # a matrix whose input width is no multiple of 64 is left in float32 by mlx-lm
    assert not weights.quantized("model.layers.1.mlp.experts.5.down_proj.weight")
    assert any("of" in f and "matrices quantized" in f for f in weights.findings)


def test_an_unquantized_directory_gives_the_checkpoints_weights_bit_for_bit(
    flash, unquantized_dir: Path
) -> None:
    """The self-check: sanitize's stacking, renaming and MLA split inverted exactly; the MTP
    layer (dropped by mlx-lm) read from the checkpoint unchanged."""
    from harness.quant.mlx_weights import MlxWeights
    from references.checkpoint_io import planned_tensors
    from references.config import load_config
    from references.weights import streamed_source

    _, ckpt = flash
    weights = MlxWeights(unquantized_dir, ckpt)
    original = streamed_source(*planned_tensors(ckpt, load_config(ckpt)))
    cpu = torch.device("cpu")
    names = sorted(original.shapes)
    assert all(weights.has(n) for n in names)
    differ = [n for n in names if not torch.equal(weights.get(n, torch.float64, cpu),
                                                  original.get(n, torch.float64, cpu))]
    assert differ == []
    assert weights.plans["model.layers.8.eh_proj.weight"].kind == "checkpoint"
    assert weights.plans["model.layers.3.attention.kv_b_proj.weight"].kind == "kv_b"
    assert any("MTP" in f and "unchanged" in f for f in weights.findings)


def test_an_unquantized_model_dir_needs_a_dequantized_reference_only_when_it_was_cast(
    flash, unquantized_dir: Path, tmp_path: Path
) -> None:
    """float32 convert output of a float32 checkpoint runs the checkpoint's weights (None); a
    bfloat16 one runs rounded weights, which its reference must read."""
    import safetensors.torch

    from harness.quant.mlx_weights import MlxWeights

    _, ckpt = flash
    assert candidate_mlx_dir(Target.parse(f"mlx:model_dir={unquantized_dir}"), ckpt) is None
    bf16 = tmp_path / "ling-bf16"
    shutil.copytree(unquantized_dir, bf16)
    tensors = safetensors.torch.load_file(bf16 / "model.safetensors")
    safetensors.torch.save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()},
                                bf16 / "model.safetensors", metadata={"format": "mlx"})
    assert candidate_mlx_dir(Target.parse(f"mlx:model_dir={bf16}"), ckpt) == bf16.resolve()
    name = "model.layers.3.attention.kv_b_proj.weight"
    cpu = torch.device("cpu")
    original = MlxWeights(unquantized_dir, ckpt).get(name, torch.float64, cpu)
    rounded = MlxWeights(bf16, ckpt).get(name, torch.float64, cpu)
    assert torch.equal(rounded, original.to(torch.bfloat16).to(torch.float64))
    assert not torch.equal(rounded, original)


def test_a_broken_inverse_of_sanitize_is_caught_by_the_self_check(
    flash, unquantized_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation: kv_b_proj rebuilt with the value rows before the nope rows (shapes still fit)."""
    from harness.quant import mlx_weights
    from references.checkpoint_io import planned_tensors
    from references.config import load_config
    from references.weights import streamed_source

    def swapped(embed_q: np.ndarray, unembed_out: np.ndarray) -> np.ndarray:
        per_head = np.concatenate([unembed_out, embed_q.swapaxes(-1, -2)], axis=1)
        return per_head.reshape(-1, per_head.shape[-1])

    monkeypatch.setitem(mlx_weights.INVERSES, "kv_b", swapped)
    _, ckpt = flash
    weights = mlx_weights.MlxWeights(unquantized_dir, ckpt)
    original = streamed_source(*planned_tensors(ckpt, load_config(ckpt)))
    cpu = torch.device("cpu")
    differ = [n for n in sorted(original.shapes)
              if not torch.equal(weights.get(n, torch.float64, cpu),
                                 original.get(n, torch.float64, cpu))]
    assert differ == ["model.layers.3.attention.kv_b_proj.weight",
                      "model.layers.7.attention.kv_b_proj.weight"]


def test_the_reference_on_an_unquantized_directory_is_the_original_reference(
    session, flash, unquantized_dir: Path
) -> None:
    _, ckpt = flash
    model = session.model(Target.parse(f"torch-float64:weights_mlx={unquantized_dir}"), ckpt)
    assert model.streamed and any("MLX model directory" in f for f in model.findings)
    tokens = list(flash[0].prompts[0].tokens)
    a = model.start(["l_out-3"]).feed(tokens)
    b = session.model(Target.parse("torch-float64"), ckpt).start(["l_out-3"]).feed(tokens)
    assert np.array_equal(a["result_output"], b["result_output"])
    assert np.array_equal(a["l_out-3"], b["l_out-3"])


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_candidate_matches_the_reference_on_its_dequantized_weights(
    session, flash, bits: int
) -> None:
    _, ckpt = flash
    candidate = Target.parse(f"mlx:bits={bits}")
    reference = dequantized_reference(candidate, ckpt)
    assert (candidate.label, reference.label) == (f"mlx-q{bits}g64",
                                                  f"torch-float64,dequantized=q{bits}g64")
    r = compare(session, flash, candidate, reference, EXACT)
    vs_deq = r.table.set_index("point")["nmse"]
    vs_orig = compare(session, flash, candidate, Target.parse("torch-float64"),
                      LOOSE).table.set_index("point")["nmse"]
    print(f"\nq{bits}g64: worst vs dequantized {vs_deq.idxmax()} {vs_deq.max():.2e}; "
          f"gla_out-0 {vs_deq['gla_out-0']:.2e} (vs original {vs_orig['gla_out-0']:.2e}); "
          f"worst vs original {vs_orig.idxmax()} {vs_orig.max():.2e}")
    assert r.passed and r.first_divergence is None, r.summary_line
    assert 0 < vs_deq.max() <= FLOAT32_ROUNDING  # float32 activations, not bit-exact
    assert vs_orig["gla_out-0"] > 1e3 * vs_deq["gla_out-0"]  # the weights' error is elsewhere


def test_a_wrong_slope_port_quantized_to_4_bits_is_caught_at_the_first_gla_point(
    session, flash, wrong_slope_port: Path
) -> None:
    """Mutation: mlx-lm's module with the off-by-one GLA decay, quantized by mlx-lm."""
    _, ckpt = flash
    right = Target.parse("mlx:bits=4")
    wrong = Target.parse(f"mlx:bits=4:model_module={wrong_slope_port}")
    assert wrong.label == f"mlx-q4g64,module={wrong_slope_port.name}"
    r = compare(session, flash, wrong, dequantized_reference(wrong, ckpt), EXACT)
    vs_deq = r.table.set_index("point")["nmse"]
    ok = compare(session, flash, right, dequantized_reference(right, ckpt), EXACT)
    vs_orig = compare(session, flash, wrong, Target.parse("torch-float64"),
                      LOOSE).table.set_index("point")["nmse"]
    right_orig = compare(session, flash, right, Target.parse("torch-float64"),
                         LOOSE).table.set_index("point")["nmse"]
    print(f"\nwrong slope q4g64: gla_out-0 vs dequantized {vs_deq['gla_out-0']:.2e} (right "
          f"port {ok.table.set_index('point')['nmse']['gla_out-0']:.2e}); vs original "
          f"{vs_orig['gla_out-0']:.2e} (right port {right_orig['gla_out-0']:.2e})")
    assert not r.passed and r.first_divergence == "gla_out-0"
    assert vs_deq["gla_out-0"] > 1e-4 > FLOAT32_ROUNDING
    assert ok.first_divergence is None
    # against the original reference both ports are off by the quantization error alike
    assert vs_orig["gla_out-0"] < 2 * right_orig["gla_out-0"]


def test_a_users_model_dir_runs_as_given_and_its_config_must_be_the_checkpoints(
    session, flash, tmp_path: Path
) -> None:
    _, ckpt = flash
    user_dir = tmp_path / "ling-flash-mini-4bit"
    shutil.copytree(candidate_mlx_dir(Target.parse("mlx:bits=4"), ckpt), user_dir)
    target = Target.parse(f"mlx:model_dir={user_dir}")
    assert target.label == "mlx-q4g64,model_dir=ling-flash-mini-4bit"
    assert candidate_mlx_dir(target, ckpt) == user_dir.resolve()
    r = compare(session, flash, target, dequantized_reference(target, ckpt), EXACT)
    assert r.passed, r.summary_line
    assert any("MLX model directory" in f for f in session.model(target, ckpt).findings)

    config = json.loads((user_dir / "config.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(user_dir, other)
    (other / "config.json").write_text(json.dumps({**config, "num_experts": 8}))
    with pytest.raises(InputError, match=r"model_dir=.*other: config\.json differs.*"
                                         r"num_experts=8 \(checkpoint: 16\)"):
        candidate_mlx_dir(Target.parse(f"mlx:model_dir={other}"), ckpt)

    (other / "config.json").write_text(json.dumps(config))  # same config, other weights
    tensors = load_file(other / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, other / "model.safetensors", metadata={"format": "mlx"})
    with pytest.raises(InputError, match=r"model_dir=.*other: model\.norm\.weight is not "
                                         r".*the directory holds other weights"):
        candidate_mlx_dir(Target.parse(f"mlx:model_dir={other}"), ckpt)


def test_a_group_wider_than_every_row_quantizes_nothing_and_the_finding_says_so(flash) -> None:
    """flash-mini's widest trunk input is 96: at group 128 mlx-lm leaves every matrix in float."""
    from harness.quant.mlx_weights import MlxWeights

    _, ckpt = flash
    weights = MlxWeights(candidate_mlx_dir(Target.parse("mlx:bits=2:group=128"), ckpt), ckpt)
    assert any("q2g128; 0 of" in f for f in weights.findings), weights.findings
