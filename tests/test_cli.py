"""``python -m harness parity`` on checkpoints no case made: verdicts, exit codes, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from harness.cli.main import main
from tests.upstream_writer import write_upstream_checkpoint

MLX_MODULE = Path(__import__("mlx_lm").__file__).parent / "models" / "bailing_hybrid.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_upstream_checkpoint(tmp_path_factory.mktemp("upstream") / "ling26")


def run(*args: str) -> int:
    return main(["parity", *args])


def test_a_correct_port_passes_and_the_summary_says_so(checkpoint, tmp_path):
    out = tmp_path / "run"
    assert run("--checkpoint", str(checkpoint), "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    pair = summary["pairs"]["mlx-float32 vs torch-float64"]
    assert pair["first_divergence"] is None
    assert pair["top1_agreement"] == 1.0
    assert pair["nmse"]["l_out-3"] < 1e-8
    assert "torch-float32 vs torch-float64" in summary["pairs"]
    assert (out / "index.html").is_file() and (out / "parity.parquet").is_file()


def test_an_mlx_port_with_the_slope_off_by_one_is_caught_in_layer_0(checkpoint, tmp_path):
    port = tmp_path / "my_bailing_hybrid.py"
    source = MLX_MODULE.read_text()
    assert "self.layer_idx / denom" in source
    port.write_text(source.replace("self.layer_idx / denom", "(self.layer_idx - 1) / denom"))
    out = tmp_path / "run"
    code = run("--checkpoint", str(checkpoint), "--backends", "mlx",
               "--mlx-model-module", str(port), "--out", str(out))
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    (pair,) = summary["pairs"].values()
    assert pair["first_divergence"] == "gla_out-0"
    html = (out / "index.html").read_text()
    assert "gla_out-0" in html and "slope" in html


def _broken_copy(checkpoint: Path, tmp_path: Path, edit) -> Path:
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    weights = load_file(checkpoint / "model.safetensors")
    edit(config, weights)
    (bad / "config.json").write_text(json.dumps(config))
    save_file(weights, str(bad / "model.safetensors"))
    return bad


def _drop_key(config, weights):
    del config["num_experts"]


def _drop_tensor(config, weights):
    del weights["model.layers.1.attention.kv_b_proj.weight"]


def _wrong_shape(config, weights):
    weights["model.layers.0.attention.g_proj.weight"] = np.zeros((5, 5), np.float32)


def _nan_weight(config, weights):
    weights["model.layers.2.mlp.gate.weight"][0, 0] = np.nan


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (_drop_key, "'num_experts'"),
        (_drop_tensor, "model.layers.1.attention.kv_b_proj.weight"),
        (_wrong_shape, "model.layers.0.attention.g_proj.weight"),
        (_nan_weight, "model.layers.2.mlp.gate.weight"),
    ],
    ids=["config-missing-key", "missing-tensor", "wrong-shape", "nan-weights"],
)
def test_bad_checkpoints_exit_2_with_one_clear_line(checkpoint, tmp_path, capsys, edit, named):
    bad = _broken_copy(checkpoint, tmp_path, edit)
    assert run("--checkpoint", str(bad), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and str(bad) in err
    assert "Traceback" not in err


def test_an_unreadable_weight_file_is_named(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((checkpoint / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"this is not a safetensors file")
    assert run("--checkpoint", str(bad)) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_a_bad_prompt_file_is_named(checkpoint, tmp_path, capsys):
    prompt = tmp_path / "prompt.json"
    prompt.write_text('{"tokens": [1, 2, 100000]}')
    assert run("--checkpoint", str(checkpoint), "--prompt-tokens", str(prompt)) == 2
    assert "100000" in capsys.readouterr().err


def test_an_existing_report_is_never_overwritten(checkpoint, tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "index.html").write_text("my old report")
    assert run("--checkpoint", str(checkpoint), "--out", str(out)) == 2
    assert (out / "index.html").read_text() == "my old report"
    assert "never overwritten" in capsys.readouterr().err
