"""Golden runs: ``capture`` saves the reference's captures, ``parity --golden`` judges ports
against them with the same verdicts as a direct run, never loading the reference, and refuses a
golden run of another model, other weights or another prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from harness.backends.torch_backend import TorchBackend
from harness.checks.golden import MANIFEST, open_golden
from harness.cli.main import main
from tests.upstream_writer import write_upstream_checkpoint

MLX_MODULE = Path(__import__("mlx_lm").__file__).parent / "models" / "bailing_hybrid.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_upstream_checkpoint(tmp_path_factory.mktemp("upstream") / "ling26")


@pytest.fixture(scope="module")
def golden(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("golden") / "run"
    assert main(["capture", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture
def torch_loads(monkeypatch) -> list[str]:
    """The dtype of every torch model loaded (the reference is the float64 one)."""
    loads: list[str] = []
    real = TorchBackend.load

    def spy(self, checkpoint_dir, options):
        loads.append(options.dtype)
        return real(self, checkpoint_dir, options)

    monkeypatch.setattr(TorchBackend, "load", spy)
    return loads


def parity(*args: str) -> int:
    return main(["parity", *args])


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def copied(golden: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "elsewhere" / "golden"
    shutil.copytree(golden, dest)
    return dest


def test_the_manifest_ties_the_captures_to_checkpoint_prompt_and_reference(checkpoint, golden):
    manifest = json.loads((golden / MANIFEST).read_text())
    n_tensors = len(load_file(checkpoint / "model.safetensors"))
    assert len(manifest["fingerprint"]["tensors"]) == n_tensors
    assert manifest["config"] == json.loads((checkpoint / "config.json").read_text())
    assert len(manifest["tokens"]) == 64
    assert manifest["reference"]["label"] == "torch-float64"
    assert manifest["slope_convention"]["slope"] == "corrected"
    assert manifest["store_dtype"] == "float64"
    assert "gla_out-0" in manifest["capture_points"]
    assert "result_output" in manifest["capture_points"]
    assert {"bailing-parity", "torch", "numpy", "safetensors"} <= set(manifest["versions"])
    (record,) = manifest["files"]
    assert (golden / record["file"]).stat().st_size == record["size"]


def test_a_copied_golden_run_gives_the_direct_runs_verdicts_without_loading_the_reference(
        checkpoint, golden, tmp_path, torch_loads):
    common = ("--checkpoint", str(checkpoint), "--backends", "torch,mlx",
              "--modes", "prefill,decode")
    assert parity(*common, "--out", str(tmp_path / "direct")) == 0
    assert torch_loads == ["float64", "float32"]  # the direct run's reference, then the candidate
    torch_loads.clear()
    assert parity(*common, "--golden", str(copied(golden, tmp_path)),
                  "--out", str(tmp_path / "via-golden")) == 0
    assert torch_loads == ["float32"]  # the torch candidate only: no float64 reference
    direct, via = summary_of(tmp_path / "direct"), summary_of(tmp_path / "via-golden")
    assert via["checks"] == direct["checks"]
    assert len(via["checks"]) == 4
    assert via["pairs"] == direct["pairs"]  # first divergences and every NMSE, exactly


def test_an_mlx_port_with_the_slope_off_by_one_is_caught_at_gla_out_0_against_a_golden_run(
        checkpoint, golden, tmp_path, torch_loads):
    port = tmp_path / "my_bailing_hybrid.py"
    source = MLX_MODULE.read_text()
    assert "self.layer_idx / denom" in source
    port.write_text(source.replace("self.layer_idx / denom", "(self.layer_idx - 1) / denom"))
    out = tmp_path / "run"
    code = parity("--checkpoint", str(checkpoint), "--golden", str(golden), "--backends", "mlx",
                  "--mlx-model-module", str(port), "--modes", "prefill,decode", "--out", str(out))
    assert code == 1
    assert torch_loads == []
    pairs = summary_of(out)["pairs"]
    assert {k: p["first_divergence"] for k, p in pairs.items()} == {
        "mlx-float32,module=my_bailing_hybrid.py vs torch-float64": "gla_out-0",
        "mlx-float32,module=my_bailing_hybrid.py vs torch-float64 (decode)": "gla_out-0",
    }


def _other_config(checkpoint: Path, dest: Path) -> Path:
    shutil.copytree(checkpoint, dest)
    config = json.loads((dest / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _other_weights(checkpoint: Path, dest: Path) -> Path:
    return write_upstream_checkpoint(dest, seed=1)


def _one_weight_changed(checkpoint: Path, dest: Path) -> Path:
    shutil.copytree(checkpoint, dest)
    weights = load_file(dest / "model.safetensors")
    weights["model.layers.2.mlp.gate.weight"][0, 0] += 1.0
    save_file(weights, str(dest / "model.safetensors"))
    return dest


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (_other_config, "rms_norm_eps=1e-05 here, 1e-06 in the golden run"),
        (_other_weights, "captured from other weights than"),
        (_one_weight_changed, "tensor model.layers.2.mlp.gate.weight has other bytes"),
    ],
    ids=["other-config", "other-weights", "one-weight-changed"],
)
def test_a_golden_run_of_another_checkpoint_is_refused_naming_what_differs(
        checkpoint, golden, tmp_path, capsys, torch_loads, make, named):
    other = make(checkpoint, tmp_path / "other")
    code = parity("--checkpoint", str(other), "--golden", str(golden), "--backends", "mlx",
                  "--out", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and named in err and str(golden / MANIFEST) in err
    assert "Traceback" not in err
    assert torch_loads == [] and not (tmp_path / "out").exists()


def test_a_prompt_other_than_the_golden_runs_is_refused(checkpoint, golden, tmp_path, capsys):
    tokens = open_golden(golden).tokens
    tokens[5] = (tokens[5] + 1) % 128
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps({"tokens": tokens}))
    code = parity("--checkpoint", str(checkpoint), "--golden", str(golden), "--backends", "mlx",
                  "--prompt-tokens", str(prompt), "--out", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2
    assert f"{prompt}: tokens differ from the golden run's" in err
    assert "64 vs 64 tokens, first difference at position 5" in err


def test_the_golden_runs_own_prompt_given_again_is_accepted(checkpoint, golden, tmp_path):
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps({"tokens": open_golden(golden).tokens}))
    assert parity("--checkpoint", str(checkpoint), "--golden", str(golden), "--backends", "mlx",
                  "--prompt-tokens", str(prompt), "--out", str(tmp_path / "out")) == 0


def test_the_same_tensors_resharded_with_a_reformatted_config_are_accepted(
        checkpoint, golden, tmp_path):
    other = tmp_path / "resharded"
    other.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(reversed(config.items()))))
    weights = load_file(checkpoint / "model.safetensors")
    names = sorted(weights)
    index = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: weights[n] for n in part}, str(other / file))
        index.update(dict.fromkeys(part, file))
    (other / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    assert parity("--checkpoint", str(other), "--golden", str(golden), "--backends", "mlx",
                  "--out", str(tmp_path / "out")) == 0


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "said"),
    [(_truncate, "truncated or replaced"), (_flip_a_byte, "corrupted")],
    ids=["truncated", "corrupted-in-place"],
)
def test_a_damaged_golden_capture_file_is_an_input_error_naming_it(
        checkpoint, golden, tmp_path, capsys, damage, said):
    bad = copied(golden, tmp_path)
    (shard,) = bad.glob("captures-*.safetensors")
    damage(shard)
    code = parity("--checkpoint", str(checkpoint), "--golden", str(bad), "--backends", "mlx",
                  "--out", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {shard}: golden capture file") and said in err


def test_a_folder_without_a_manifest_is_refused(checkpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert parity("--checkpoint", str(checkpoint), "--golden", str(tmp_path / "empty"),
                  "--backends", "mlx") == 2
    assert f"{tmp_path / 'empty' / MANIFEST}: not found" in capsys.readouterr().err


def test_a_slope_other_than_the_golden_runs_is_refused(checkpoint, golden, tmp_path, capsys):
    assert parity("--checkpoint", str(checkpoint), "--golden", str(golden), "--backends", "mlx",
                  "--slope", "hf_off_by_one", "--out", str(tmp_path / "out")) == 2
    assert "slope convention corrected" in capsys.readouterr().err


def test_capture_never_writes_into_a_folder_that_holds_something(checkpoint, tmp_path, capsys):
    out = tmp_path / "golden"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["capture", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    assert "never overwritten" in capsys.readouterr().err


def test_a_capture_that_fails_while_writing_leaves_no_golden_folder(
        checkpoint, tmp_path, monkeypatch):
    import safetensors.numpy

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        main(["capture", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "golden")])
    assert list(tmp_path.iterdir()) == []
