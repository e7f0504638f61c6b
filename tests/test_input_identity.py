"""Bad checkpoints are input errors found before compute, never findings about a port: a tensor
held by two files, an index that points at the wrong file, tensors the config does not account
for (refused, or ignored with a finding when allowed); the weight fingerprint our conversion
stores in GGUFs follows the weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from harness.cli.main import main
from harness.core.errors import InputError
from harness.llamacpp.identity import fingerprint
from references.checkpoint_io import ALLOW_EXTRA_ENV, weight_files
from references.model import BailingHybridReference
from tests.tiny_checkpoint import write_tiny_checkpoint

NORM = "model.layers.0.input_layernorm.weight"
MTP_FILE = "model-mtp-layer.safetensors"


def _add_to(path: Path, tensors: dict[str, np.ndarray]) -> None:
    save_file({**load_file(path), **tensors}, path)


def _with_norm_copy_in_mtp_file(directory: Path) -> Path:
    """The trunk's first norm also in the MTP file, with other values (a second copy)."""
    write_tiny_checkpoint(directory)
    _add_to(directory / MTP_FILE, {NORM: np.full((32,), 2.0, np.float32)})
    return directory


def test_a_tensor_in_two_files_is_refused_naming_the_tensor_and_both_files(tmp_path) -> None:
    ckpt = _with_norm_copy_in_mtp_file(tmp_path)
    with pytest.raises(InputError) as e:
        BailingHybridReference.from_checkpoint(ckpt)
    assert str(e.value) == (
        f"{ckpt}: tensor {NORM} is in two files, {MTP_FILE} and model.safetensors; keep one "
        "copy (loaders disagree on which one wins)"
    )


def test_an_index_entry_naming_a_file_without_the_tensor_is_refused(tmp_path) -> None:
    write_tiny_checkpoint(tmp_path)
    names = {n: "model.safetensors" for n in load_file(tmp_path / "model.safetensors")}
    names["model.layers.5.eh_proj.weight"] = "model.safetensors"  # really in the MTP file
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
    with pytest.raises(InputError, match=r"maps model\.layers\.5\.eh_proj\.weight to "
                                         r"model\.safetensors, but it is in " + MTP_FILE):
        weight_files(tmp_path)


def test_a_tensor_in_two_files_exits_2_on_the_command_line(tmp_path, capsys) -> None:
    ckpt = _with_norm_copy_in_mtp_file(tmp_path / "ckpt")
    rc = main(["parity", "--checkpoint", str(ckpt), "--backends", "torch",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"tensor {NORM} is in two files" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "summary.json").exists()


def _with_extras(directory: Path, n: int) -> list[str]:
    write_tiny_checkpoint(directory)
    extra = {f"model.layers.{i}.attention.stray.weight": np.ones((2,), np.float32)
             for i in range(n)}
    _add_to(directory / "model.safetensors", extra)
    return sorted(extra)


def test_tensors_the_config_does_not_account_for_are_refused_listing_them(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv(ALLOW_EXTRA_ENV, raising=False)
    extra = _with_extras(tmp_path, 7)
    with pytest.raises(InputError) as e:
        BailingHybridReference.from_checkpoint(tmp_path)
    assert str(e.value) == (
        f"{tmp_path}: 7 tensor(s) config.json does not account for: {', '.join(extra[:5])} "
        f"(and 2 more); remove them, or pass --allow-extra-tensors ({ALLOW_EXTRA_ENV}=1) to "
        "ignore them"
    )


def test_allowed_extra_tensors_are_ignored_by_the_reference_with_a_finding(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv(ALLOW_EXTRA_ENV, "1")
    extra = _with_extras(tmp_path, 1)
    model = BailingHybridReference.from_checkpoint(tmp_path)
    assert model.findings == [
        f"{tmp_path}: ignored 1 tensor(s) config.json does not account for: {extra[0]} "
        "(extra tensors allowed)"
    ]
    assert set(model.start(["l_out-0"]).feed([1, 2])) == {"l_out-0", "result_output"}


def test_known_buffers_are_neither_expected_nor_extra(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(ALLOW_EXTRA_ENV, raising=False)
    write_tiny_checkpoint(tmp_path)
    _add_to(tmp_path / "model.safetensors",
            {"model.layers.0.attention.rotary_emb.inv_freq": np.ones((2,), np.float32)})
    assert BailingHybridReference.from_checkpoint(tmp_path).findings == []


def test_the_fingerprint_follows_the_weights_not_the_files(tmp_path) -> None:
    a = write_tiny_checkpoint(tmp_path / "a", seed=0)
    b = write_tiny_checkpoint(tmp_path / "b", seed=0)
    c = write_tiny_checkpoint(tmp_path / "c", seed=1)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    assert fingerprint(a).startswith("v1:")


def test_a_tensor_in_two_files_is_refused_for_ling3_too(tmp_path) -> None:
    """Ling 3.0's reference is transformers' model; the same check runs before it loads."""
    import shutil

    from harness.backends.base import BackendOptions
    from harness.backends.transformers_ling3 import TransformersBackend
    from harness.checks.cases import load_case, materialize

    pytest.importorskip("transformers.models.bailing_hybrid")
    ckpt = tmp_path / "ling3"
    shutil.copytree(materialize(load_case(Path("cases/ling3-mini.toml").resolve())), ckpt)
    trunk = load_file(ckpt / "model-00001-of-00003.safetensors")
    name = sorted(trunk)[0]
    save_file({name: trunk[name] + 1}, ckpt / "model-extra.safetensors")  # not in the index
    with pytest.raises(InputError, match=f"tensor {name} is in two files, "):
        TransformersBackend().load(ckpt, BackendOptions(dtype="float64"))


def test_the_command_line_flag_allows_extras_and_reports_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ALLOW_EXTRA_ENV, "0")  # restored after the run sets it
    extra = _with_extras(tmp_path / "ckpt", 1)
    out = tmp_path / "out"
    assert main(["parity", "--checkpoint", str(tmp_path / "ckpt"), "--backends", "torch",
                 "--out", str(out)]) == 2
    assert main(["parity", "--checkpoint", str(tmp_path / "ckpt"), "--backends", "torch",
                 "--allow-extra-tensors", "--out", str(out)]) == 0
    findings = json.loads((out / "summary.json").read_text())["findings"]
    assert any(f"ignored 1 tensor(s) config.json does not account for: {extra[0]}" in f
               for f in findings)
