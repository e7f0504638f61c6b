"""A GGUF that is not the checkpoint's is an input error, a damaged cache entry is rebuilt, extra
tensors do not crash the converter, the inventory reads our port's MLA rope key, and the README's
``llamacpp:type_k=f16`` loads a Ling-2.6 model.

Conversions go through our port's converter (``ports/llamacpp``) into a module-scoped cache;
nothing here computes before the checks under test, except the one ``type_k=f16`` load.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from harness.backends.base import BackendOptions
from harness.backends.llamacpp_backend import (
    LlamaCppBackend,
    parse_options,
    prepare_gguf,
)
from harness.checks.cases import load_case, materialize
from harness.core.errors import InputError
from harness.llamacpp import convert as cv
from harness.llamacpp.identity import FINGERPRINT_KEY
from harness.llamacpp.inventory import inventory, render, rewrite_gguf
from harness.llamacpp.tensor_maps import PORT_MAP_KEY
from references.checkpoint_io import ALLOW_EXTRA_ENV

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        cv.default_tree()
    except Exception as e:  # no sdist and no network
        pytest.skip(f"our port's converter is unavailable: {e}")
    return tmp_path_factory.mktemp("gguf-cache")


def _ckpt(case: str, root: Path, seed: int | None = None) -> Path:
    c = load_case(ROOT / "cases" / f"{case}.toml")
    if seed is not None:
        c = dataclasses.replace(c, seed=seed)
    return materialize(c, root)


@pytest.fixture(scope="module")
def flash(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, its f32 GGUF) of flash-mini."""
    ckpt = _ckpt("flash-mini", tmp_path_factory.mktemp("cases"))
    return ckpt, cv.convert(ckpt, "f32", cache=cache).require()


@pytest.fixture(scope="module")
def flash_other_weights(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """flash-mini's config with another seed: same shapes, other weights (its f32 GGUF)."""
    ckpt = _ckpt("flash-mini", tmp_path_factory.mktemp("cases-other"), seed=999)
    return cv.convert(ckpt, "f32", cache=cache).require()


@pytest.fixture(scope="module")
def rope_dims(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    ckpt = _ckpt("rope-dims", tmp_path_factory.mktemp("cases-rope"))
    return ckpt, cv.convert(ckpt, "f32", cache=cache).require()


def _prepare(ckpt: Path, gguf: Path, **extra: str):
    return prepare_gguf(ckpt, parse_options(BackendOptions(extra={"gguf": str(gguf), **extra})))


# --- a user's gguf= ------------------------------------------------------------------------------
def test_our_conversion_stores_the_fingerprint_and_the_port_map(flash) -> None:
    from harness.llamacpp.identity import fingerprint
    from harness.llamacpp.inventory import read_gguf

    ckpt, gguf = flash
    meta, _ = read_gguf(gguf)
    assert meta[FINGERPRINT_KEY] == fingerprint(ckpt)
    assert meta[PORT_MAP_KEY] == "ours-bailing_hybrid"


def test_the_checkpoints_own_gguf_is_accepted(flash) -> None:
    ckpt, gguf = flash
    prep = _prepare(ckpt, gguf)
    assert prep.findings[0] == f"GGUF given by the user, not converted here: {gguf}"
    assert prep.inventory.port == "ours-bailing_hybrid" and prep.inventory_findings == []


def test_a_gguf_of_other_shapes_is_an_input_error(flash, rope_dims) -> None:
    ckpt, _ = flash
    _, other = rope_dims
    with pytest.raises(InputError) as e:
        _prepare(ckpt, other)
    msg = str(e.value)
    assert msg.startswith(f"llamacpp: gguf={other} does not match the checkpoint {ckpt}: ")
    assert "bailing_hybrid.block_count=5 (nextn 1) but num_hidden_layers=8; " in msg
    assert "bailing_hybrid.expert_count=8 but config.json has num_experts=16" in msg


def test_a_gguf_of_another_architecture_is_an_input_error(flash, tmp_path: Path) -> None:
    ckpt, _ = flash
    from tests.llamacpp_testing import write_tiny_bailingmoe3

    other = write_tiny_bailingmoe3(tmp_path / "ling3.gguf")
    with pytest.raises(InputError, match=r"is a 'bailingmoe3' GGUF, but the checkpoint is ling26 "
                                         r"\(BailingMoeV2_5ForCausalLM\), converted to "
                                         r"bailing_hybrid: not a GGUF of this checkpoint"):
        _prepare(ckpt, other)


def test_a_gguf_of_the_same_shapes_from_other_weights_is_an_input_error(
    flash, flash_other_weights
) -> None:
    ckpt, _ = flash
    with pytest.raises(InputError, match=r"was converted from other weights than .* \(its "
                                         r"bailing_parity\.fingerprint differs"):
        _prepare(ckpt, flash_other_weights)


def test_a_gguf_made_elsewhere_is_checked_by_sampled_values(
    flash, flash_other_weights, tmp_path: Path
) -> None:
    ckpt, gguf = flash
    drop = [FINGERPRINT_KEY, PORT_MAP_KEY]
    own = rewrite_gguf(gguf, tmp_path / "own.gguf", drop_keys=drop)
    other = rewrite_gguf(flash_other_weights, tmp_path / "other.gguf", drop_keys=drop)
    with pytest.raises(InputError, match=r"holds other weights than .*: sampled tensor values "
                                         r"differ \(output_norm\.weight vs model\.norm\.weight"):
        _prepare(ckpt, other)
    assert (
        "GGUF own.gguf: made elsewhere (no bailing_parity.fingerprint); sampled tensors "
        "output_norm.weight, blk.0.attn_norm.weight, blk.0.ffn_norm.weight agree with the "
        "checkpoint"
    ) in _prepare(ckpt, own).findings


# --- the cache -----------------------------------------------------------------------------------
def _fresh_conversion(flash, cache: Path) -> cv.Conversion:
    ckpt, _ = flash
    conv = cv.convert(ckpt, "f32", cache=cache)
    assert conv.cached and not any("removed and rebuilt" in f for f in conv.findings)
    return conv


@pytest.mark.parametrize("damage", ["corrupted-in-place", "truncated"])
def test_a_damaged_cached_gguf_is_removed_and_rebuilt_with_a_finding(
    flash, cache: Path, damage: str
) -> None:
    conv = _fresh_conversion(flash, cache)
    gguf = conv.require()
    size = gguf.stat().st_size
    with gguf.open("r+b") as fh:
        if damage == "truncated":
            fh.truncate(size // 2)
        else:
            fh.seek(size - 4096)
            fh.write(b"\xff" * 64)
    again = cv.convert(flash[0], "f32", cache=cache)
    assert not again.cached
    assert again.findings[-1].startswith(f"cache entry {gguf.parent}: model-f32.gguf ")
    assert again.findings[-1].endswith(": removed and rebuilt")
    assert gguf.stat().st_size == size
    assert _fresh_conversion(flash, cache).gguf == gguf  # clean again: no finding


def test_an_interrupted_conversion_leaves_nothing_in_the_cache(
    flash, tmp_path: Path, monkeypatch
) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cv, "_run_converter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cv.convert(flash[0], "f32", cache=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_allowed_extra_tensors_are_left_out_of_the_conversion_with_a_finding(
    flash, cache: Path, tmp_path: Path, monkeypatch
) -> None:
    ckpt = tmp_path / "extra"
    shutil.copytree(flash[0], ckpt)
    weights = next(ckpt.glob("model*.safetensors"))
    save_file({**load_file(weights), "model.layers.0.attention.stray.weight":
               np.ones((2,), np.float32)}, weights)
    with pytest.raises(InputError, match=r"1 tensor\(s\) config\.json does not account for"):
        cv.convert(ckpt, "f32", cache=cache)
    monkeypatch.setenv(ALLOW_EXTRA_ENV, "1")
    conv = cv.convert(ckpt, "f32", cache=cache)
    assert any(f.startswith("1 checkpoint tensor(s) config.json does not account for were left "
                            "out of the staged copy") for f in conv.findings)
    assert conv.require().is_file()


# --- the inventory -------------------------------------------------------------------------------
def test_mla_layers_with_their_own_rope_dims_are_consistent_under_our_map(rope_dims) -> None:
    ckpt, gguf = rope_dims
    inv = inventory(gguf, ckpt)
    assert inv.port == "ours-bailing_hybrid"
    assert inv.shape_mismatches == [] and render(inv) == []


# --- the README's KV-cache example ---------------------------------------------------------------
def test_type_v_follows_type_k() -> None:
    s = parse_options(BackendOptions(extra={"type_k": "f16"}))
    assert (s.params.type_k, s.params.type_v) == ("f16", "f16")


def test_different_k_and_v_types_on_an_mla_model_are_an_input_error(flash) -> None:
    ckpt, gguf = flash
    with pytest.raises(InputError, match=r"type_k=f16 and type_v=f32 differ, but "
                                         r"bailing_hybrid is an MLA model"):
        _prepare(ckpt, gguf, type_k="f16", type_v="f32")


def test_the_readme_type_k_f16_example_loads_a_ling26_model(flash) -> None:
    from tests.llamacpp_testing import require_llamacpp

    require_llamacpp()
    ckpt, gguf = flash
    model = LlamaCppBackend().load(ckpt, BackendOptions(extra={"type_k": "f16",
                                                                "gguf": str(gguf)}))
    try:
        assert model.describe()["type_v"] == "f16"
        assert model.start().feed([1, 2, 3])["result_output"].shape[0] == 3
    finally:
        model.close()
