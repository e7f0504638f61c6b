"""Specifications for the MLX backend: mlx-lm's Ling-2.6 module (or a user's port) under test."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.backends.base import BackendOptions, forward, stepwise
from harness.backends.mlx_backend import MlxBackend
from harness.core.capture_points import all_points
from harness.core.errors import InputError, PortFailure

pytestmark = pytest.mark.skipif(
    not MlxBackend().availability().ok, reason=MlxBackend().availability().reason
)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [1, 17, 42, 99, 256, 3, 511, 7, 7, 7, 128, 64, 300, 12, 0, 45]


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum((a - b) ** 2) / np.sum(b**2))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harness.checks.cases import load_case, materialize

    case = load_case(ROOT / "cases" / "flash-mini.toml")
    return materialize(case, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


@pytest.fixture(scope="module")
def model(ckpt: Path):
    return MlxBackend().load(ckpt, BackendOptions())


def _is_mla(cfg: dict, layer: int) -> bool:
    g, n = cfg["layer_group_size"], cfg["num_hidden_layers"]
    return (layer + 1) % g == 0 or layer >= (n // g) * g


def test_availability_is_ok_here() -> None:
    availability = MlxBackend().availability()
    assert availability.ok and availability.reason == ""
    assert MlxBackend().name == "mlx"


def test_every_requested_point_has_its_shape(model, config: dict) -> None:
    n = config["num_hidden_layers"]
    assert model.n_layers == n
    hidden, vocab, t = config["hidden_size"], config["vocab_size"], len(PROMPT)
    gla_width = config["num_attention_heads"] * config["head_dim"]
    k, e = config["num_experts_per_tok"], config["num_experts"]
    out = forward(model, PROMPT, all_points(n))

    expected: dict[str, tuple[int, ...]] = {"result_norm": (t, hidden), "result_output": (t, vocab)}
    for i in range(n):
        for stem in ("attn_norm", "attn_out", "ffn_inp", "ffn_norm", "ffn_out", "l_out"):
            expected[f"{stem}-{i}"] = (t, hidden)
        if _is_mla(config, i):
            expected[f"kv_cmpr-{i}"] = (t, config["kv_lora_rank"])
        else:
            expected[f"gla_out-{i}"] = (t, gla_width)
            expected[f"g_gate-{i}"] = (t, gla_width)
        if i >= config["first_k_dense_replace"]:
            expected[f"ffn_moe_logits-{i}"] = (t, e)
            expected[f"ffn_moe_topk-{i}"] = (t, k)
            expected[f"ffn_moe_weights-{i}"] = (t, k)
            expected[f"ffn_shexp-{i}"] = (t, hidden)
    assert {name: a.shape for name, a in out.items()} == expected
    for name, a in out.items():
        assert a.dtype == (np.int64 if name.startswith("ffn_moe_topk") else np.float64), name
        assert np.all(np.isfinite(a)), name


def test_only_requested_points_and_result_output_come_back(model) -> None:
    assert set(forward(model, PROMPT)) == {"result_output"}
    assert set(forward(model, PROMPT, ["l_out-2", "ffn_moe_weights-1"])) == {
        "result_output",
        "l_out-2",
        "ffn_moe_weights-1",
    }


def test_router_ids_are_sorted_and_weights_stay_aligned(model, config: dict) -> None:
    i = config["first_k_dense_replace"]
    names = [f"ffn_moe_logits-{i}", f"ffn_moe_topk-{i}", f"ffn_moe_weights-{i}"]
    out = forward(model, PROMPT, names)
    logits, ids, weights = (out[n] for n in names)
    assert np.all(np.diff(ids, axis=-1) > 0)
    # Ling's router: sigmoid scores of the chosen experts, renormalised, times the scaling factor.
    scores = np.take_along_axis(1 / (1 + np.exp(-logits)), ids, axis=-1)
    expect = scores / scores.sum(-1, keepdims=True) * config["routed_scaling_factor"]
    np.testing.assert_allclose(weights, expect, rtol=1e-5)


def test_residual_points_are_consistent(model) -> None:
    out = forward(model, PROMPT, ["l_out-0", "l_out-1", "attn_out-1", "ffn_inp-1", "ffn_out-1"])
    np.testing.assert_allclose(out["ffn_inp-1"], out["l_out-0"] + out["attn_out-1"], atol=1e-5)
    np.testing.assert_allclose(out["l_out-1"], out["ffn_inp-1"] + out["ffn_out-1"], atol=1e-5)


def test_stepwise_decode_matches_full_forward(model, config: dict) -> None:
    # 150 tokens, 131 prefilled: a two-chunk GLA prefill (chunk 128, padded), then 19 GLA/MLA
    # single-token steps through mlx-lm's own caches.
    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], 150).tolist()
    names = [f"l_out-{i}" for i in range(model.n_layers)] + ["result_output"]
    full = forward(model, tokens, names)
    steps = stepwise(model, tokens, 131, names)
    for name in names:
        assert steps[name].shape == full[name].shape
        assert nmse(steps[name], full[name]) < 1e-10, name


def test_tapping_leaves_the_module_tree_alone(model) -> None:
    from mlx.utils import tree_flatten

    keys = [k for k, _ in tree_flatten(model.model.parameters())]
    assert "model.layers.0.input_layernorm.weight" in keys
    assert not any("parity" in k for k in keys)
    assert [layer.is_global for layer in model.model.layers] == [
        False, False, False, True, False, False, False, True,
    ]  # fmt: skip


def _port_with_shifted_layer_factor(tmp_path: Path) -> Path:
    import mlx_lm.models.bailing_hybrid as stock

    source = Path(stock.__file__).read_text()
    needle = "self.layer_idx / denom"
    assert needle in source
    path = tmp_path / "my_port.py"
    path.write_text(source.replace(needle, "(self.layer_idx - 1) / denom"))
    return path


def test_model_module_puts_the_users_port_under_test(model, ckpt: Path, tmp_path: Path) -> None:
    port = _port_with_shifted_layer_factor(tmp_path)
    loaded = MlxBackend().load(ckpt, BackendOptions(extra={"model_module": str(port)}))
    assert loaded.module.startswith("mlx_lm.models._port_")
    names = ["attn_norm-0", "gla_out-0"]
    mine, stock = forward(loaded, PROMPT, names), forward(model, PROMPT, names)
    np.testing.assert_array_equal(mine["attn_norm-0"], stock["attn_norm-0"])
    diff = np.linalg.norm(mine["gla_out-0"] - stock["gla_out-0"])
    assert diff / np.linalg.norm(stock["gla_out-0"]) > 1e-4


def test_missing_model_module_file_is_an_input_error(ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "nowhere.py"
    with pytest.raises(InputError, match=r"nowhere\.py"):
        MlxBackend().load(ckpt, BackendOptions(extra={"model_module": str(path)}))


def test_model_module_without_model_is_an_input_error(ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "no_model.py"
    path.write_text("from .base import BaseModelArgs\n\nclass ModelArgs(BaseModelArgs): ...\n")
    with pytest.raises(InputError, match=r"no_model\.py.*Model"):
        MlxBackend().load(ckpt, BackendOptions(extra={"model_module": str(path)}))


def test_model_module_with_syntax_error_is_an_input_error(ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("def Model(:\n")
    with pytest.raises(InputError, match=r"broken\.py.*syntax"):
        MlxBackend().load(ckpt, BackendOptions(extra={"model_module": str(path)}))


def test_unknown_extra_option_is_an_input_error(ckpt: Path) -> None:
    with pytest.raises(InputError, match="chunk"):
        MlxBackend().load(ckpt, BackendOptions(extra={"chunk": "64"}))


def test_an_unknown_architecture_is_an_input_error(ckpt: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="LlamaForCausalLM"):
        MlxBackend().load(other, BackendOptions())


def test_float64_is_an_input_error(ckpt: Path) -> None:
    with pytest.raises(InputError, match="float64"):
        MlxBackend().load(ckpt, BackendOptions(dtype="float64"))


@pytest.mark.skipif(sys.platform != "linux", reason="GatherMM's float32-only limit is Linux CPU")
def test_bfloat16_moe_on_linux_cpu_is_a_port_failure(ckpt: Path) -> None:
    loaded = MlxBackend().load(ckpt, BackendOptions(dtype="bfloat16"))
    with pytest.raises(PortFailure, match="GatherMM on this CPU supports float32 only"):
        forward(loaded, PROMPT)
