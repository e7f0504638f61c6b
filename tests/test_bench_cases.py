"""The benchmark shapes in cases/bench/ load, have the sizes they claim, materialise, and stay out
of the parity suite; harness.perf.bench_port's byte accounting.  Nothing here runs a benchmark."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from harness.checks.cases import CASES_DIR, load_cases, materialize
from harness.perf.bench_port import BENCH_DIR, DEFAULT_CASES, gguf_tensor_bytes
from harness.perf.roofline import weight_bytes_per_token
from references.checkpoint_spec import expected_tensors
from references.config import config_from_dict


def _ling26():
    case = load_cases(["ling26-100m"], BENCH_DIR)[0]
    return case, config_from_dict(case.config_json(), case.source)


def _ling3_param_counts() -> tuple[int, int]:
    """(total, active) parameters of ling3-100m from transformers' own module tree (meta device:
    nothing is allocated): active = total - embedding rows but one - the routed experts not used."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import BailingHybridForCausalLM

    from references.ling3.config import config_from_dict as ling3_config
    from references.ling3.synthetic import transformers_config

    case = load_cases(["ling3-100m"], BENCH_DIR)[0]
    raw = case.config_json()
    cfg = ling3_config(raw, case.source)
    with torch.device("meta"):
        model = BailingHybridForCausalLM(transformers_config(raw, cfg))
    total = experts = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".mlp.experts." in name:
            experts += p.numel()
    unused = experts * (1 - cfg.num_experts_per_tok / cfg.num_experts)
    active = total - unused - (cfg.vocab_size - 1) * cfg.hidden_size
    return total, round(active)


def test_the_bench_cases_load_from_their_own_folder_and_are_not_parity_cases() -> None:
    bench = {c.name: c for c in load_cases(cases_dir=BENCH_DIR)}
    # flash-widths: the memory benchmark's shape (harness.perf.memory_bench), not a throughput case
    assert set(bench) == {*DEFAULT_CASES, "flash-widths"}
    assert set(DEFAULT_CASES) == {"ling26-100m", "ling3-100m"}
    assert bench["ling26-100m"].family == "ling26" and bench["ling3-100m"].family == "ling3"
    assert BENCH_DIR.parent == CASES_DIR  # a subfolder: the parity plugin collects cases/*.toml
    assert not set(bench) & {c.name for c in load_cases()}


def test_ling26_100m_has_flash_proportions_at_about_100m_parameters() -> None:
    _, cfg = _ling26()
    total = sum(int(np.prod(s.shape)) for s in expected_tensors(cfg))
    active = weight_bytes_per_token(cfg, 1.0)  # one byte a weight: active parameters
    assert 90e6 < total < 110e6 and 30e6 < active < 40e6
    mla = [layer for layer in range(cfg.num_hidden_layers) if cfg.is_mla(layer)]
    assert mla == [7, 15]  # flash's one MLA layer in eight
    assert cfg.q_lora_rank and cfg.num_attention_heads * cfg.head_dim == cfg.hidden_size
    assert cfg.num_experts_per_tok == 4 and 32 <= cfg.num_experts <= 64
    assert cfg.first_k_dense_replace == 1 and cfg.num_nextn_predict_layers == 0


def test_ling3_100m_is_the_same_active_size() -> None:
    total, active = _ling3_param_counts()
    _, cfg26 = _ling26()
    active26 = weight_bytes_per_token(cfg26, 1.0)
    assert 90e6 < total < 110e6
    assert abs(active / active26 - 1) < 0.1, (active, active26)


@pytest.mark.slow
def test_the_bench_cases_materialise() -> None:
    """Materialised into the shared cache (what the benchmark itself reuses): ~0.8 GB once."""
    for case in load_cases(list(DEFAULT_CASES), cases_dir=BENCH_DIR):
        ckpt = materialize(case)
        config = json.loads((ckpt / "config.json").read_text())
        assert config["hidden_size"] == 512 and config["num_hidden_layers"] == 16
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        assert 4 * 90e6 < index["metadata"]["total_size"] < 4 * 110e6  # float32


def test_gguf_byte_accounting_counts_one_embedding_row_and_the_used_experts(tmp_path) -> None:
    pytest.importorskip("gguf")
    from tests.llamacpp_testing import (
        TinyBailingMoe3,
        bailingmoe3_tensor_shapes,
        write_tiny_bailingmoe3,
    )

    cfg = TinyBailingMoe3()
    path = write_tiny_bailingmoe3(tmp_path / "tiny.gguf", cfg)
    sizes = {name: int(np.prod(shape)) for name, shape in bailingmoe3_tensor_shapes(cfg).items()}
    expected = 0.0
    for name, n in sizes.items():
        if name == "token_embd.weight":
            expected += n / cfg.n_vocab
        elif "_exps" in name:
            expected += n * cfg.n_expert_used / cfg.n_expert
        else:
            expected += n
    got = gguf_tensor_bytes(path)
    assert got["params_total"] == sum(sizes.values())
    assert got["bytes_total"] == 4 * sum(sizes.values())
    assert got["bytes_per_token"] == round(4 * expected)
    assert got["params_active"] == round(expected) and got["arch"] == "bailingmoe3"


def test_the_sweep_cli_finds_cases_in_another_folder(tmp_path: Path) -> None:
    from harness.cli.sweep import add_parser, run

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "sweep", "--backends", "none", "--cases-dir", str(BENCH_DIR), "--cases", "ling26-100m",
        "--bandwidth-gbs", "20", "--no-progress", "--out", str(tmp_path / "run"),
    ])
    assert args.cases_dir == BENCH_DIR
    assert run(args) == 1  # nothing measured, but the case was found and the report written
    assert (tmp_path / "run" / "index.html").is_file()
    default = parser.parse_args(["sweep"])
    assert default.cases_dir is None  # cases/ as before
