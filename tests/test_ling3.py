"""Ling 3.0 as a second family: dispatch, one checkpoint for every loader, per-layer parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.backends.base import forward, stepwise
from harness.backends.families import family_of
from harness.backends.targets import Target
from harness.checks.cases import load_case, materialize
from harness.checks.session import CheckSession
from harness.core.errors import InputError
from references.ling3.config import Ling3Config, config_from_dict, load_config
from references.ling3.normalize import (
    CONFIG_RULES,
    MTP_FINDING,
    TENSOR_RENAMES,
    normalisation_findings,
    normalise_config,
    tensor_renames,
)

pytest.importorskip("transformers.models.bailing_hybrid")

ROOT = Path(__file__).resolve().parent.parent
CASE = ROOT / "cases" / "ling3-mini.toml"


def _mlx_ok() -> bool:
    from harness.backends.mlx_backend import MlxBackend

    return MlxBackend().availability().ok


needs_mlx = pytest.mark.skipif(not _mlx_ok(), reason="mlx / mlx-lm not importable")


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum((a - b) ** 2) / np.sum(b**2))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on shared cores their spin-waits cost 5x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ling3-cache")


@pytest.fixture(scope="module")
def case():
    return load_case(CASE)


@pytest.fixture(scope="module")
def ckpt(case, cache_root: Path) -> Path:
    return materialize(case, cache_root)


@pytest.fixture(scope="module")
def cfg(ckpt: Path) -> Ling3Config:
    return load_config(ckpt)


@pytest.fixture(scope="module")
def runner() -> CheckSession:
    return CheckSession()


# --- family dispatch --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("archs", "family"),
    [
        (["BailingMoeV3ForCausalLM"], "ling3"),
        (["BailingHybridForCausalLM"], "ling3"),  # what transformers' save_pretrained writes
        ("BailingMoeV3ForCausalLM", "ling3"),
        (["BailingMoeV2_5ForCausalLM"], "ling26"),
    ],
)
def test_the_family_is_chosen_by_architectures(archs, family: str) -> None:
    assert family_of({"architectures": archs, "model_type": "bailing_hybrid"}).name == family


def test_model_type_alone_chooses_no_family() -> None:
    with pytest.raises(InputError, match="BailingMoeV3ForCausalLM"):
        family_of({"model_type": "bailing_hybrid"}, "x/config.json")


def test_the_case_is_a_ling3_case_with_the_required_shape(case, cfg: Ling3Config) -> None:
    assert case.family == "ling3"
    assert case.config_json()["architectures"] == ["BailingMoeV3ForCausalLM"]
    assert cfg.has_tail and cfg.is_mla(cfg.num_hidden_layers - 1)
    assert not cfg.is_mla(0) and cfg.is_mla(1)  # KDA and MLA both present
    assert cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    assert cfg.first_k_dense_replace == 1 and cfg.num_nextn_predict_layers == 1


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 9}, "topk_group"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"moe_shared_expert_intermediate_size": 48}, "moe_shared_expert_intermediate_size"),
        ({"kda_safe_gate": False}, "kda_safe_gate"),
        ({"layer_types": ["linear_attention"] * 5}, "layer_types"),
        ({"head_dim": "16"}, "head_dim"),
    ],
)
def test_bad_configs_name_the_path_and_the_key(case, patch: dict, key: str) -> None:
    raw = {**case.config_json(), **patch}
    with pytest.raises(InputError, match=rf"cfg\.json: key '{key}'"):
        config_from_dict(raw, Path("cfg.json"))
    raw = {k: v for k, v in case.config_json().items() if k != "v_head_dim"}
    with pytest.raises(InputError, match=r"cfg\.json: missing required key.*v_head_dim"):
        config_from_dict(raw, Path("cfg.json"))


# --- one checkpoint, every loader -------------------------------------------------------------


def test_the_checkpoint_is_upstream_shaped(ckpt: Path, cfg: Ling3Config) -> None:
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["architectures"] == ["BailingMoeV3ForCausalLM"]
    assert raw["head_dim"] == cfg.head_dim and "linear_head_dim" not in raw
    for key in ("n_group", "num_experts_per_tok", "norm_topk_prob", "score_function",
                "no_kda_lora", "kda_safe_gate", "moe_shared_expert_intermediate_size",
                "gated_attention_proj_granularity_type", "layer_types"):
        assert key in raw, key
    names = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(names.values())) >= 3  # two trunk shards (at least) and the MTP shard
    for i in range(cfg.num_hidden_layers):
        proj = "dense" if cfg.is_mla(i) else "o_proj"
        assert f"model.layers.{i}.attention.{proj}.weight" in names
    mtp = cfg.num_hidden_layers
    assert f"model.layers.{mtp}.eh_proj.weight" in names
    assert f"model.layers.{mtp}.final_layernorm.weight" in names


def test_norm_weights_and_biases_are_never_trivial(ckpt: Path) -> None:
    from safetensors.numpy import load_file

    weights: dict[str, np.ndarray] = {}
    for f in ckpt.glob("*.safetensors"):
        weights.update(load_file(str(f)))
    norms = [n for n in weights if n.endswith("norm.weight")]
    biases = [n for n in weights if n.endswith(("expert_bias", ".bias"))]
    assert norms and biases
    for name in norms:
        assert np.abs(weights[name] - 1).max() > 0.01, name
    for name in biases:
        assert np.abs(weights[name]).max() > 0.01, name


def test_transformers_loads_it_with_the_upstream_layer_pattern(ckpt: Path, cfg: Ling3Config):
    import torch
    from transformers import BailingHybridForCausalLM

    model = BailingHybridForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    kinds = [type(layer.self_attn).__name__ for layer in model.model.layers]
    assert kinds == [
        "BailingHybridAttention" if cfg.is_mla(i) else "BailingHybridDeltaAttention"
        for i in range(cfg.num_hidden_layers)
    ]
    assert model.model.layers[0].self_attn.head_dim == cfg.head_dim
    assert model.model.layers[1].mlp.gate.num_group == cfg.n_group


@needs_mlx
def test_mlx_lm_loads_it_through_its_own_dispatch(ckpt: Path, cfg: Ling3Config) -> None:
    from mlx_lm.utils import load_model

    model, _ = load_model(ckpt)  # mlx-lm picks the module from architectures itself
    assert type(model).__module__ == "mlx_lm.models.bailing_moe_v3"
    assert [not layer.is_linear for layer in model.layers] == [
        cfg.is_mla(i) for i in range(cfg.num_hidden_layers)
    ]
    assert model.layers[1].mlp.gate.n_group == cfg.n_group
    assert model.layers[1].mlp.gate.top_k == cfg.num_experts_per_tok


def test_transformers_alone_would_drop_the_tail_clause(case) -> None:
    """The finding behind pinning layer_types: transformers' own rule has no tail clause."""
    from transformers import BailingHybridConfig

    cfg = config_from_dict(case.config_json(), CASE)
    plain = BailingHybridConfig(
        num_hidden_layers=cfg.num_hidden_layers, layer_group_size=cfg.layer_group_size
    )
    assert plain.layer_types == cfg.transformers_layer_types() != cfg.upstream_layer_types()
    try:
        from mlx_lm.models.bailing_moe_v3 import _is_kda_layer
    except ImportError:
        return
    n, g = cfg.num_hidden_layers, cfg.layer_group_size
    assert [not _is_kda_layer(i, g, n) for i in range(n)] == [cfg.is_mla(i) for i in range(n)]


# --- normalisations are findings --------------------------------------------------------------


def test_every_normalisation_is_a_finding() -> None:
    findings = normalisation_findings()
    assert len(findings) == len(CONFIG_RULES) + len(TENSOR_RENAMES) + 1
    assert MTP_FINDING in findings
    text = "\n".join(findings)
    for needle in ("attention.o_proj", "attention.dense", "BailingHybridForCausalLM",
                   "moe_shared_expert_intermediate_size", "score_function", "no_kda_lora",
                   "head_wise", "num_expert_group", "linear_head_dim", "tail clause"):
        assert needle in text, needle


def test_each_normalisation_is_needed_by_what_transformers_writes(case, tmp_path: Path) -> None:
    """Raw save_pretrained output: every config rule and tensor rename actually applies."""
    from references.ling3.synthetic import build_model

    cfg = config_from_dict(case.config_json(), CASE)
    build_model(case.config_json(), case.seed).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == ["BailingHybridForCausalLM"]
    _, applied = normalise_config(written, cfg)
    assert applied == [r.finding for r in CONFIG_RULES]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    renames = tensor_renames(names, cfg)
    kda = [i for i in range(cfg.num_hidden_layers) if not cfg.is_mla(i)]
    assert sorted(renames) == sorted(f"model.layers.{i}.attention.dense.weight" for i in kda)
    assert not any(n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in names)


# --- parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "candidate", ["torch-float32", pytest.param("mlx-float32", marks=needs_mlx)]
)
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_candidates_agree_with_transformers_float64_per_layer(
    runner: CheckSession, case, ckpt: Path, cfg: Ling3Config, candidate: str, mode: str
) -> None:
    for prompt in case.prompts:
        result = runner.compare(
            case=case.name, prompt=prompt.name, checkpoint=ckpt, tokens=prompt.tokens,
            candidate=Target.parse(candidate), reference=Target.parse("torch-float64"),
            tolerance=case.tolerance("float32"), mode=mode, n_decode=case.decode_steps,
        )
        points = set(result.table["point"])
        for i in range(cfg.num_hidden_layers):
            for stem in ("attn_norm", "attn_out", "ffn_inp", "ffn_norm", "ffn_out", "l_out"):
                assert f"{stem}-{i}" in points, (candidate, f"{stem}-{i}")
            if cfg.is_mla(i):
                assert f"kv_cmpr-{i}" in points
            else:
                assert f"gla_out-{i}" in points
            if cfg.is_moe(i):
                assert {f"ffn_moe_topk-{i}", f"ffn_moe_weights-{i}", f"ffn_shexp-{i}"} <= points
        assert {"result_norm", "result_output"} <= points
        assert result.passed, result.summary_line()
        assert float(result.table["nmse"].max()) < 1e-10


@pytest.mark.parametrize("backend", ["torch", pytest.param("mlx", marks=needs_mlx)])
def test_stepwise_decode_equals_a_full_forward(
    runner: CheckSession, case, ckpt: Path, backend: str
):
    from harness.core.capture_points import all_points

    dtype = "float64" if backend == "torch" else "float32"
    model = runner.model(Target.parse(f"{backend}-{dtype}"), ckpt)  # loaded once per module
    tokens = next(p.tokens for p in case.prompts if p.name == "random-80")
    names = all_points(model.n_layers)
    full = forward(model, tokens, names)
    steps = stepwise(model, tokens, len(tokens) - 12, names)
    assert set(full) == set(steps)
    for name in ("l_out-0", "l_out-4", "result_output"):
        assert steps[name].shape == full[name].shape
        # float32 inside transformers' float64 (chunked vs recurrent KDA) bounds this, not 0.
        assert nmse(steps[name], full[name]) < 1e-11, name
    assert np.array_equal(steps["ffn_moe_topk-3"], full["ffn_moe_topk-3"])


def test_the_ling3_case_items_pass_under_pytest(
    ckpt: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pytest cases --cases ling3-mini`` in-process (torch and mlx are imported already)."""
    monkeypatch.setenv("BAILING_PARITY_CACHE", str(cache_root))
    monkeypatch.chdir(ROOT)
    code = pytest.main(["cases", "--cases", "ling3-mini", "-q", "-p", "no:cacheprovider"])
    assert code == pytest.ExitCode.OK
