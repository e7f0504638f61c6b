"""Bad checkpoints and bad options fail before any compute, naming the key or tensor; the torch
backend maps its options onto the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.backends.base import BackendOptions, LoadedModel
from harness.backends.torch_backend import TorchBackend, reference_options
from harness.core.errors import InputError
from references.model import BailingHybridReference, ReferenceOptions
from references.variant import Variant, mutations
from tests.tiny_checkpoint import write_tiny_checkpoint

QKV = "model.layers.2.attention.query_key_value.weight"
EXPERT = "model.layers.3.mlp.experts.5.up_proj.weight"
MTP_EH = "model.layers.5.eh_proj.weight"


def test_missing_config_key_is_named(tmp_path):
    write_tiny_checkpoint(tmp_path, kv_lora_rank=None)
    with pytest.raises(InputError, match="'kv_lora_rank'"):
        BailingHybridReference.from_checkpoint(tmp_path)


@pytest.mark.parametrize("name", [QKV, EXPERT, MTP_EH])
def test_missing_tensor_is_named(tmp_path, name):
    write_tiny_checkpoint(tmp_path, drop=(name,))
    with pytest.raises(InputError, match=f"missing tensor.*{name}"):
        BailingHybridReference.from_checkpoint(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    write_tiny_checkpoint(tmp_path, replace={EXPERT: np.zeros((16, 31), np.float32)})
    with pytest.raises(InputError, match=f"{EXPERT} has shape \\(16, 31\\)"):
        BailingHybridReference.from_checkpoint(tmp_path)


def test_nan_weight_is_named(tmp_path):
    bad = np.ones((32,), np.float32)
    bad[3] = np.nan
    write_tiny_checkpoint(tmp_path, replace={"model.layers.1.input_layernorm.weight": bad})
    with pytest.raises(InputError, match=r"model\.layers\.1\.input_layernorm\.weight.*NaN"):
        BailingHybridReference.from_checkpoint(tmp_path)


def test_checkpoint_without_its_mtp_file_runs_the_trunk(tmp_path):
    write_tiny_checkpoint(tmp_path)
    (tmp_path / "model-mtp-layer.safetensors").unlink()
    model = BailingHybridReference.from_checkpoint(tmp_path)
    caps = model.start(["mtp_result_output", "l_out-4"]).feed([1, 2, 3])
    assert set(caps) == {"l_out-4", "result_output"}


def test_gate_mutation_needs_square_g_proj(tmp_path):
    write_tiny_checkpoint(tmp_path, head_dim=12)  # H*D = 48 != hidden 32
    options = ReferenceOptions(variant=mutations()["gate_fed_attn_output"])
    with pytest.raises(ValueError, match="H\\*D == hidden"):
        BailingHybridReference.from_checkpoint(tmp_path, options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_an_input_error(tmp_path):
    write_tiny_checkpoint(tmp_path)
    with pytest.raises(InputError, match="CUDA"):
        BailingHybridReference.from_checkpoint(tmp_path, ReferenceOptions(device="cuda"))


def test_reference_options_reject_bad_values():
    with pytest.raises(ValueError, match="gla_impl"):
        ReferenceOptions(gla_impl="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        ReferenceOptions(chunk_size=0)
    with pytest.raises(ValueError, match="mtp_token_shift"):
        Variant(mtp_token_shift=2)


def test_backend_maps_extra_options():
    opts = reference_options(
        BackendOptions(
            dtype="float32",
            extra={
                "gla_impl": "recurrent",
                "chunk_size": "7",
                "mla_impl": "absorbed",
                "variant": "no_group_limit",
                "slope_formula": "hf_off_by_one",
            },
        )
    )
    assert (opts.dtype, opts.gla_impl, opts.chunk_size, opts.mla_impl) == (
        "float32",
        "recurrent",
        7,
        "absorbed",
    )
    assert opts.variant == Variant(group_limit=False, slope_formula="hf_off_by_one")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"chunk": "64"}, "unknown option"),
        ({"chunk_size": "many"}, "chunk_size"),
        ({"gla_impl": "fast"}, "gla_impl"),
        ({"variant": "nonsense"}, "unknown variant"),
        ({"slope_formula": "other"}, "slope_formula"),
    ],
)
def test_backend_rejects_bad_extra_options(extra, message):
    with pytest.raises(InputError, match=message):
        reference_options(BackendOptions(dtype="float64", extra=extra))


def test_backend_loads_a_model_that_follows_the_protocol(tmp_path):
    backend = TorchBackend()
    assert backend.name == "torch" and backend.availability().ok
    write_tiny_checkpoint(tmp_path)
    model = backend.load(tmp_path, BackendOptions(dtype="float64"))
    assert isinstance(model, LoadedModel) and model.n_layers == 5
    assert model.start().feed([3, 4])["result_output"].shape == (2, 64)
    with pytest.raises(InputError, match="dtype"):
        backend.load(tmp_path, BackendOptions(dtype="float16"))
