"""A quantized MLX Ling 3.0 port (mlx-lm's ``bailing_moe_v3``) is judged in two parts too.

``mlx:bits=4`` on a Ling 3.0 checkpoint quantizes it with mlx-lm's own code path; the reference,
transformers' model, then runs on the directory's own weights: :class:`MlxWeights` reads them back
under the checkpoint's names (``bailing_moe_v3``'s ``sanitize`` inverted: experts unstacked,
``kv_b_proj`` rejoined, the short-convolution kernels moved back, the dropped MTP layer read from
the checkpoint), overwriting every weight of transformers' model (``weights_mlx=DIR``), with no
activation rounding (mlx's quantized matmul keeps float32 activations), so the port is held to
the float32 tolerance (harness.checks.quantized.port_tolerance).  Each claim could have failed:
the mapping is bit-exact on an unquantized directory and a reversed conv kernel is caught; the
right port passes at float32 rounding (measured ~1e-13, tolerance 1e-8); a port whose MLA softmax
scale forgets the rope dims fails at the first MLA output, every point before passing; a port
reading the KDA gate's lower bound as -1 fails at layer 0's KDA output, which it moves by only
~1e-6 (the 1e-4 of a ggml port, which rounds activations, would let that through).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness.backends.mlx_backend import MlxBackend, candidate_mlx_dir
from harness.backends.targets import REFERENCE, Target
from harness.checks.cases import CASES_DIR, DEFAULT_TOLERANCES, load_case, materialize
from harness.checks.session import CheckSession, Subject

pytest.importorskip("transformers.models.bailing_hybrid")  # the Ling 3.0 reference
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not MlxBackend().availability().ok, reason=MlxBackend().availability().reason)]

LING3 = load_case(CASES_DIR / "ling3-mini.toml")
STOCK_SCALE = "self.scale = self.qk_head_dim**-0.5"  # bailing_moe_v3's MLA softmax scale
WRONG_SCALE = "self.scale = self.qk_nope_head_dim**-0.5"  # the rope dims forgotten
STOCK_BOUND = "self.lower_bound = args.kda_lower_bound"  # bailing_moe_v3's KDA gate bound
WRONG_BOUND = "self.lower_bound = -1.0"  # the config's -5 ignored
FLOAT32_ROUNDING = 1e-9  # worst port-correctness NMSE of the right port (measured ~1e-13)


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return materialize(LING3)


@pytest.fixture(scope="module")
def unquantized_dir(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ling3-mini through ``mlx_lm convert`` without ``-q``."""
    from harness.backends.mlx_ling3 import STOCK_MODULE
    from harness.quant.mlx_quantize import convert

    out = tmp_path_factory.mktemp("mlx-ling3-f32")
    convert(checkpoint, out, None, 64, port_path=None, stock_module=STOCK_MODULE,
            stock_name="mlx-lm's bailing_moe_v3")
    return out


def mutated_module(tmp_path_factory: pytest.TempPathFactory, stock_line: str, wrong_line: str,
                   tag: str) -> Path:
    """mlx-lm's ``bailing_moe_v3`` with one line replaced: a wrong port to run as
    ``model_module=``."""
    import mlx_lm.models.bailing_moe_v3 as stock

    text = Path(stock.__file__).read_text()
    assert text.count(stock_line) == 1, f"mlx-lm's line {stock_line!r} moved: update this test"
    port = tmp_path_factory.mktemp("ports") / f"bailing_moe_v3_{tag}.py"
    port.write_text(text.replace(stock_line, wrong_line))
    return port


@pytest.fixture(scope="module")
def wrong_scale_port(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mutated_module(tmp_path_factory, STOCK_SCALE, WRONG_SCALE, "wrong_scale")


@pytest.fixture(scope="module")
def wrong_bound_port(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mutated_module(tmp_path_factory, STOCK_BOUND, WRONG_BOUND, "wrong_bound")


def checkpoint_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from references.checkpoint_io import weight_files

    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(weight_files(checkpoint).values())):
        out.update(load_file(f))
    return out


def differing(weights, original: dict[str, torch.Tensor]) -> list[str]:
    cpu = torch.device("cpu")
    return [n for n in sorted(original)
            if not torch.equal(weights.get(n, torch.float64, cpu), original[n].double())]


def judge(case, candidate: str, mode: str = "prefill", prompt: int = 0):
    session = CheckSession()
    subject = Subject.from_case(case, case.prompts[prompt].name)
    result = session.run(mode, subject, Target.parse(candidate), Target.parse(REFERENCE))
    return session, result


# ---- the mapping ------------------------------------------------------------------------------


def test_an_unquantized_bailing_moe_v3_directory_gives_the_checkpoints_weights_bit_for_bit(
    checkpoint: Path, unquantized_dir: Path
) -> None:
    from harness.quant.mlx_weights import MlxWeights

    weights = MlxWeights(unquantized_dir, checkpoint)
    original = checkpoint_tensors(checkpoint)
    assert all(weights.has(n) for n in original)
    assert differing(weights, original) == []
    kinds = {n: p.kind for n, p in weights.plans.items()}
    assert kinds["model.layers.0.attention.q_conv1d.weight"] == "conv1d"
    assert kinds["model.layers.1.attention.kv_b_proj.weight"] == "kv_b"
    assert kinds["model.layers.5.eh_proj.weight"] == "checkpoint"  # the MTP layer mlx drops
    assert kinds["model.layers.1.mlp.experts.7.up_proj.weight"] == "direct"
    assert any("MTP" in f and "unchanged" in f for f in weights.findings)


def test_a_reversed_conv_kernel_is_caught_by_the_self_check(
    checkpoint: Path, unquantized_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation: [C, K, 1] -> [C, 1, K] with the taps in reverse order (shapes still fit)."""
    from harness.quant import mlx_weights

    monkeypatch.setitem(mlx_weights.INVERSES, "conv1d", lambda w: w.swapaxes(1, 2)[..., ::-1])
    weights = mlx_weights.MlxWeights(unquantized_dir, checkpoint)
    assert differing(weights, checkpoint_tensors(checkpoint)) == [
        f"model.layers.{i}.attention.{p}_conv1d.weight" for i in (0, 2) for p in "kqv"]


def test_the_4_bit_directory_dequantizes_to_what_mlx_computes_under_the_checkpoints_names(
    checkpoint: Path,
) -> None:
    import mlx.core as mx
    from safetensors import safe_open

    from harness.quant.mlx_weights import MlxWeights

    folder = candidate_mlx_dir(Target.parse("mlx:bits=4"), checkpoint)
    weights = MlxWeights(folder, checkpoint)
    stem = "model.layers.2.mlp.switch_mlp.gate_proj"
    with safe_open(folder / "model.safetensors", framework="numpy") as fh:
        w, s, b = (fh.get_tensor(f"{stem}.{p}")[5] for p in ("weight", "scales", "biases"))
    want = np.array(mx.dequantize(mx.array(w), mx.array(s), mx.array(b), group_size=64, bits=4))
    got = weights.get("model.layers.2.mlp.experts.5.gate_proj.weight", torch.float32,
                      torch.device("cpu")).numpy()
    assert np.array_equal(got, want)
    assert weights.quantized("model.layers.0.attention.f_proj.weight")
    # mlx-lm's quant_predicate keeps the MLA projections, the router and the KDA convs in float
    for name in ("model.layers.1.attention.kv_b_proj.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.0.attention.q_conv1d.weight"):
        assert not weights.quantized(name), name


# ---- port correctness -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_a_right_quantized_mlx_ling3_port_passes_and_reports_what_it_lost(bits, mode):
    session, result = judge(LING3, f"mlx:bits={bits}", mode)
    assert result.passed, result.message
    port, loss = session.results
    assert port.reference == f"{REFERENCE},dequantized=q{bits}g64,layer-local"
    assert port.tolerance == DEFAULT_TOLERANCES["float32"]  # no activation rounding
    assert 0 < port.table["nmse"].max() <= FLOAT32_ROUNDING  # float32 arithmetic, no rounding
    assert loss.informational
    logits = loss.table.set_index("point").loc["result_output"]
    assert logits["nmse"] > 1e3 * DEFAULT_TOLERANCES["float32"].nmse  # what the weights lost
    assert loss.kld["mean_kld"] > 0
    assert any("MLX model directory" in f and "overwritten" in f for f in session.findings)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_a_4_bit_mlx_ling3_port_with_a_wrong_mla_scale_fails_at_the_first_mla_output(
    wrong_scale_port: Path, mode: str
) -> None:
    # 1/sqrt(nope) for 1/sqrt(nope + rope): layer 0 (KDA) and layer 1's MLA inputs pass, its
    # output fails, and later layers start from the port's own values again
    _, result = judge(LING3, f"mlx:bits=4:model_module={wrong_scale_port}", mode)
    assert not result.passed, result.message
    table = result.result.table.reset_index(drop=True)
    assert result.result.first_divergence == "attn_out-1"
    cut = table.index[table["point"] == "attn_out-1"][0]
    assert cut > 0 and table.loc[: cut - 1, "passed"].all()
    assert table.loc[cut, "nmse"] > 10 * DEFAULT_TOLERANCES["quantized"].nmse
    assert any(table.loc[cut + 1 :, "passed"])


def test_a_4_bit_mlx_ling3_port_with_a_wrong_kda_gate_bound_fails_at_layer_0(
    wrong_bound_port: Path,
) -> None:
    _, result = judge(LING3, f"mlx:bits=4:model_module={wrong_bound_port}")
    assert not result.passed, result.message
    table = result.result.table.reset_index(drop=True)
    first = result.result.first_divergence
    assert first in ("gla_out-0", "attn_out-0"), first
    cut = table.index[table["point"] == first][0]
    assert table.loc[: cut - 1, "passed"].all()
    # a move the ggml ports' tolerance, sized for their activation rounding, would not see
    assert DEFAULT_TOLERANCES["float32"].nmse < table.loc[cut, "nmse"] \
        < DEFAULT_TOLERANCES["quantized"].nmse


def test_a_missing_weights_mlx_directory_is_an_input_error_naming_it(
    checkpoint: Path, tmp_path: Path
) -> None:
    from harness.backends.registry import get_backend
    from harness.core.errors import InputError

    options = Target.parse(f"transformers-float64:weights_mlx={tmp_path / 'absent'}").options()
    with pytest.raises(InputError, match=r"weights_mlx=.*absent: no config\.json there"):
        get_backend("transformers").load(checkpoint, options)
