"""transformers' Ling 3.0 made to round where a quantized llama.cpp port rounds
(harness/backends/transformers_port_arithmetic.py) still computes transformers' function: with
nothing to round, its absorbed MLA and one-expert-at-a-time MoE give transformers' own outputs to
float64 rounding; every projection finds its checkpoint tensor, and one that cannot is named."""

from __future__ import annotations

import pytest

from harness.backends.targets import REFERENCE, Target
from harness.backends.transformers_port_arithmetic import checkpoint_names, install
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

    def declaration(self, name: str):
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
    assert checkpoint_names(module)[0] == name


def test_every_projection_of_transformers_ling3_has_its_checkpoint_tensor() -> None:
    import torch

    from references.checkpoint_io import weight_files

    checkpoint = materialize(LING3)
    names = set(weight_files(checkpoint))
    model = load(checkpoint).model
    linears = [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    assert all(any(n in names for n in checkpoint_names(p)) for p in linears)


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
    with pytest.raises(InputError, match=r"exact\.gguf: no GGUF tensor for transformers' "
                                         r"model\.layers\.0\.self_attn\.g_proj"):
        install(model, Exact(weight_files(checkpoint), missing=gone))
