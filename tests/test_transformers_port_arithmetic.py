"""transformers' Ling 3.0 made to round where a quantized llama.cpp port rounds
(harness/backends/transformers_port_arithmetic.py) still computes transformers' function: with
nothing to round, its absorbed MLA and one-expert-at-a-time MoE give transformers' own outputs to
float64 rounding; every projection finds its checkpoint tensor, and one that cannot is named."""

from __future__ import annotations

import pytest

from harness.backends.targets import REFERENCE, Target
from harness.backends.transformers_port_arithmetic import install
from harness.backends.transformers_port_weights import checkpoint_name
from harness.checks.cases import CASES_DIR, load_case, materialize
from harness.core import capture_points
from harness.core.errors import InputError

pytest.importorskip("transformers")

LING3 = load_case(CASES_DIR / "ling3-mini.toml")


class Exact:
    """A port that rounds nothing (an F32 GGUF): every tensor of the checkpoint, no rounding."""

    path = "exact.gguf"

    def __init__(self, names, missing: str | None = None) -> None:
        self.names = set(names) - {missing}

    def has(self, name: str) -> bool:
        return name in self.names

    def declaration(self, name: str, *like):  # (dtype, device) of the tensor declared
        return None, None


def load(checkpoint):
    from harness.backends.transformers_ling3 import load_ling3

    return load_ling3(checkpoint, Target.parse(REFERENCE).options())


@pytest.mark.parametrize(("module", "name"), [
    ("model.layers.1.self_attn.o_proj", "model.layers.1.attention.dense.weight"),
    ("model.layers.0.self_attn.forget_gate.f_proj", "model.layers.0.attention.f_proj.weight"),
    ("model.layers.1.self_attn.kv_b_proj", "model.layers.1.attention.kv_b_proj.weight"),
    ("model.layers.2.mlp.shared_experts.up_proj",
     "model.layers.2.mlp.shared_experts.up_proj.weight"),
    ("lm_head", "lm_head.weight"),
])
def test_a_module_is_traced_back_to_its_checkpoint_tensor(module: str, name: str) -> None:
    from references.checkpoint_io import weight_files

    names = set(weight_files(materialize(LING3)))
    assert checkpoint_name(f"{module}.weight", Exact(names)) == name


def test_every_projection_of_transformers_ling3_has_its_checkpoint_tensor() -> None:
    import torch

    from references.checkpoint_io import weight_files

    checkpoint = materialize(LING3)
    names = set(weight_files(checkpoint))
    model = load(checkpoint).model
    linears = [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    assert all(checkpoint_name(f"{p}.weight", Exact(names)) in names for p in linears)


def test_with_nothing_to_round_it_computes_transformers_function() -> None:
    from references.checkpoint_io import weight_files

    checkpoint = materialize(LING3)
    tokens = list(LING3.prompts[0].tokens)
    plain = load(checkpoint)
    names = capture_points.all_points(plain.n_layers)
    own = plain.start(names).feed(tokens)
    ported = load(checkpoint)
    install(ported.model, Exact(weight_files(checkpoint)))
    absorbed = ported.start(names).feed(tokens)
    assert set(absorbed) == set(own)
    for point, value in own.items():
        scale = float(abs(value).max()) or 1.0
        assert float(abs(absorbed[point] - value).max()) <= 1e-10 * scale, point


def test_a_projection_without_a_tensor_in_the_port_file_is_named() -> None:
    from references.checkpoint_io import weight_files

    checkpoint = materialize(LING3)
    model = load(checkpoint).model
    gone = "model.layers.0.attention.g_proj.weight"
    with pytest.raises(InputError, match=r"exact\.gguf: no GGUF tensor model\.layers\.0\."
                                         r"attention\.g_proj\.weight for transformers' "
                                         r"model\.layers\.0\.self_attn\.g_proj"):
        install(model, Exact(weight_files(checkpoint), missing=gone))


class CheckpointWeights:
    """The checkpoint's own tensors as a weight source (``hide``: one left out; ``reshape``:
    one given another shape): what a port's weights look like to the loader."""

    path = "port.gguf"

    def __init__(self, checkpoint, hide: str | None = None, reshape: str | None = None) -> None:
        from references.checkpoint_io import weight_files

        self.where = weight_files(checkpoint)
        self.hide, self.reshape = hide, reshape

    def has(self, name: str) -> bool:
        return name in self.where and name != self.hide

    def get(self, name, dtype, device):
        from safetensors import safe_open

        with safe_open(self.where[name], framework="pt") as fh:
            t = fh.get_tensor(name).to(device, dtype)
        return t.flatten() if name == self.reshape else t


def test_every_weight_is_overwritten_from_the_port_s_tensors() -> None:
    from harness.backends.transformers_port_weights import load_port_weights

    checkpoint = materialize(LING3)
    model = load(checkpoint).model
    with __import__("torch").no_grad():
        for p in model.parameters():
            p.zero_()
    read = load_port_weights(model, CheckpointWeights(checkpoint))
    reference = dict(load(checkpoint).model.named_parameters())
    for name, value in model.named_parameters():
        assert (value == reference[name]).all(), name
    experts = LING3.config["num_experts"]
    assert read > experts * 3  # every expert's gate, up and down, one at a time


def test_a_tensor_the_port_lacks_or_shapes_otherwise_is_named() -> None:
    from harness.backends.transformers_port_weights import load_port_weights

    checkpoint = materialize(LING3)
    model = load(checkpoint).model
    gone = "model.layers.1.mlp.experts.3.up_proj.weight"
    with pytest.raises(InputError, match=r"port\.gguf: no tensor model\.layers\.1\.mlp\.experts"
                                         r"\.3\.up_proj\.weight for transformers' "
                                         r"model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        load_port_weights(model, CheckpointWeights(checkpoint, hide=gone))
    bent = "model.layers.0.attention.k_conv1d.weight"
    with pytest.raises(InputError, match=r"k_conv1d\.weight has shape \(256,\); transformers' "
                                         r"model\.layers\.0\.self_attn\.conv1d\.weight"):
        load_port_weights(model, CheckpointWeights(checkpoint, reshape=bent))
