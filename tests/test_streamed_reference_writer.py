"""The synthetic writer's bfloat16, sharded, upstream-layout output (references.synthetic)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from harness.checks.cases import load_case, load_cases
from harness.core.errors import InputError
from references.checkpoint_spec import expected_tensors
from references.config import config_from_dict
from references.model import BailingHybridReference, ReferenceOptions
from references.synthetic import (
    SHAPING_KEY,
    generate_rows,
    generate_tensor,
    write_synthetic_checkpoint,
)
from tests.test_streamed_reference import _one_thread  # noqa: F401 (autouse fixture)

FLASH = next(c for c in load_cases() if c.name == "flash-mini")


def _write(tmp_path, **knobs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_synthetic_checkpoint(FLASH.config_json(), FLASH.seed, tmp_path, knobs)
    return tmp_path


def test_row_blocks_draw_the_same_values_as_the_whole_tensor():
    cfg = config_from_dict(FLASH.config_json(), "flash-mini")
    spec = next(s for s in expected_tensors(cfg) if s.name == "lm_head.weight")
    whole = generate_tensor(spec, 7)
    pieces = np.concatenate(list(generate_rows(spec, 7, block=64 * 37)))  # 37 rows a block
    assert pieces.shape == whole.shape
    assert np.array_equal(pieces.astype(np.float32), whole)


def test_bfloat16_checkpoint_holds_each_float64_value_rounded_once(tmp_path):
    out = _write(tmp_path, dtype="bfloat16")
    cfg = config_from_dict(FLASH.config_json(), "flash-mini")
    spec = next(s for s in expected_tensors(cfg)
                if s.name == "model.layers.1.mlp.experts.3.down_proj.weight")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with safe_open(out / index["weight_map"][spec.name], framework="pt") as fh:
        got = fh.get_tensor(spec.name)
    want = torch.from_numpy(np.concatenate(list(generate_rows(spec, FLASH.seed))))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))


def test_shards_respect_the_size_and_the_mtp_layer_has_its_own_file(tmp_path):
    out = _write(tmp_path, dtype="bfloat16", shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    trunk = [f for f in files if f != "model-mtp-layer.safetensors"]
    assert len(trunk) > 2 and all(f.endswith(f"-of-{len(trunk):05d}.safetensors") for f in trunk)
    assert {n for n, f in index["weight_map"].items() if f == "model-mtp-layer.safetensors"} == {
        s.name for s in expected_tensors(config_from_dict(FLASH.config_json(), "x")) if s.mtp}
    sizes = {f: (out / f).stat().st_size for f in trunk}
    lm = 512 * 64 * 2  # the largest tensor alone may exceed the shard size; no shard holds more
    assert max(sizes.values()) <= max(40_000, lm) + 20_000  # data + header
    assert index["metadata"]["total_size"] == sum(
        int(np.prod(s.shape)) * 2 for s in expected_tensors(config_from_dict(FLASH.config_json(),
                                                                             "x")))
    assert SHAPING_KEY not in json.loads((out / "config.json").read_text())


def test_the_reference_reads_the_bfloat16_checkpoint_both_ways(tmp_path):
    out = _write(tmp_path, dtype="bfloat16", shard_bytes=100_000)
    tokens = list(FLASH.prompts[0].tokens)
    caps = [BailingHybridReference.from_checkpoint(out, ReferenceOptions(load=mode))
            .start().feed(tokens)["result_output"] for mode in ("memory", "streamed")]
    assert np.array_equal(caps[0], caps[1])
    assert np.isfinite(caps[0]).all()


@pytest.mark.parametrize("knobs,message", [({"dtype": "float16"}, "dtype must be one of"),
                                           ({"shard_bytes": 0}, "shard_bytes must be")])
def test_bad_storage_knobs_are_named(tmp_path, knobs, message):
    with pytest.raises(InputError, match=message):
        _write(tmp_path, **knobs)


def test_the_flash_widths_case_is_a_bfloat16_benchmark_case():
    case = load_case(FLASH.source.parent / "bench" / "flash-widths.toml")
    cfg = case.config_json()
    assert cfg[SHAPING_KEY] == {"dtype": "bfloat16"}
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]) == (4096, 9216, 157184)
    assert case.name not in {c.name for c in load_cases()}  # not collected by the parity suite
