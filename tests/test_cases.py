"""Cases are data: validated on load, materialised deterministically and cached by content."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from harness.checks.cases import (
    SMALL_PARAMETERS,
    load_case,
    load_cases,
    materialize,
    parameter_count,
)
from harness.core.errors import InputError
from references.checkpoint_io import read_state_dict
from references.config import load_config

CASES = Path(__file__).resolve().parent.parent / "cases"


def test_every_case_file_loads_and_has_prompts():
    cases = load_cases()
    assert {c.name for c in cases} >= {"flash-mini", "tail-clause", "heads-6", "rope-dims",
                                       "no-qlora", "long-context"}
    assert all(c.prompts for c in cases)


def test_the_required_shapes_are_covered():
    cfg = {c.name: load_config(materialize(c)) for c in load_cases() if c.family == "ling26"}
    flash = cfg["flash-mini"]
    assert flash.q_lora_rank and flash.n_group > 1 and flash.first_k_dense_replace == 1
    assert flash.num_nextn_predict_layers == 1 and flash.group_norm_size > 1
    tail = cfg["tail-clause"]
    assert tail.num_hidden_layers % tail.layer_group_size != 0
    assert tail.is_mla(tail.num_hidden_layers - 1)
    h = cfg["heads-6"].num_attention_heads
    assert h & (h - 1) != 0
    rope = cfg["rope-dims"]
    assert rope.gla_rope_dim != rope.qk_rope_head_dim
    assert rope.num_attention_heads * rope.head_dim != rope.hidden_size
    assert cfg["no-qlora"].q_lora_rank is None
    assert max(len(p.tokens) for p in load_case(CASES / "long-context.toml").prompts) >= 2048


def test_materialising_is_deterministic_and_cached(tmp_path):
    case = load_case(CASES / "heads-6.toml")
    a = materialize(case, tmp_path / "a")
    b = materialize(case, tmp_path / "b")
    assert a.name == b.name
    for f in sorted(a.glob("*.safetensors")):
        assert f.read_bytes() == (b / f.name).read_bytes()
    mtime = (a / "config.json").stat().st_mtime_ns
    assert materialize(case, tmp_path / "a") == a
    assert (a / "config.json").stat().st_mtime_ns == mtime  # reused, not rewritten


def test_a_different_seed_is_a_different_checkpoint(tmp_path):
    case = load_case(CASES / "heads-6.toml")
    other = replace(case, seed=case.seed + 1)
    assert materialize(case, tmp_path) != materialize(other, tmp_path)


def test_checkpoints_use_the_upstream_layout_with_an_index_and_an_mtp_file(tmp_path):
    ckpt = materialize(load_case(CASES / "flash-mini.toml"), tmp_path)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.8.eh_proj.weight"] == "model-mtp-layer.safetensors"
    assert len(set(index.values())) >= 3
    assert "model.layers.3.attention.kv_b_proj.weight" in index
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in index
    assert "model.layers.1.mlp.gate.expert_bias" in index


def test_no_norm_weight_or_bias_is_trivial(tmp_path):
    ckpt = materialize(load_case(CASES / "flash-mini.toml"), tmp_path)
    weights = {}
    for f in ckpt.glob("*.safetensors"):
        weights.update(load_file(f))
    norms = [n for n in weights if "norm" in n]
    biases = [n for n in weights if n.endswith("expert_bias")]
    assert norms and biases
    for name in norms:
        assert np.abs(weights[name] - 1).max() > 0.01, name
    for name in biases:
        assert np.abs(weights[name]).max() > 0.01, name


def test_the_reference_loader_accepts_every_materialised_ling26_case(tmp_path):
    # the realistic-width case (a 4.4 GB copy, 8.7 GB read in float32) has its own tests
    small = (c for c in load_cases() if c.family == "ling26")
    for case in (c for c in small if parameter_count(c) < SMALL_PARAMETERS):
        ckpt = materialize(case, tmp_path)
        assert read_state_dict(ckpt, load_config(ckpt))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed = 1\nprompts = []\n", "missing key 'config'"),
        ("seed = 1\nconfig = {}\nprompts = []\nfoo = 2\n", "unknown key"),
        ("seed = 1\nconfig = {}\nprompts = []\n", "missing required key"),
        ("seed = [\n", "not valid TOML"),
    ],
)
def test_bad_case_files_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        load_case(path)
    assert str(path) in str(err.value)


def test_prompt_ids_must_fit_the_vocabulary(tmp_path):
    text = (CASES / "heads-6.toml").read_text().replace(
        'random = { length = 40, seed = 3 }', "tokens = [1, 2, 99999]")
    path = tmp_path / "big-id.toml"
    path.write_text(text)
    with pytest.raises(InputError, match="99999"):
        load_case(path)
