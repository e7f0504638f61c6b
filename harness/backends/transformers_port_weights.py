"""transformers' Ling 3.0 with a port's own weights in place of the checkpoint's.

A quantized port is judged against the reference run on the port's own weights (the
*dequantized reference*, :mod:`harness.checks.quantized`).  Ling 3.0's reference is transformers'
model, which reads no GGUF and no MLX directory; so it loads the checkpoint as usual and then
every parameter is overwritten, one source tensor at a time, from a weight source that reads the
port's file back under the checkpoint's names (:class:`harness.quant.gguf_weights.GgufWeights`,
:class:`harness.quant.mlx_weights.MlxWeights`).  No dequantized copy is written to disk and the
peak memory is the model's own.

:func:`sources` is transformers' ``bailing_hybrid`` conversion mapping read backwards (renames;
the q/k/v short-convolution kernels concatenated; the routed experts fused into 3D tensors, gate
before up).  Every parameter must be written, each from tensors of exactly its shape, or an
InputError names it: a transformers rename can never leave a checkpoint weight in place.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from harness.core.errors import InputError

_LAYER = re.compile(r"^(model\.layers\.\d+)\.(.+)$")
_BUFFERS = ("e_score_correction_bias",)  # buffers that hold weights (the router's bias)

# (index into the transformers tensor, the checkpoint tensor that fills it)
Assignment = tuple[tuple[Any, ...], str]


def sources(name: str, shape: torch.Size, weights: Any) -> list[Assignment]:
    """Where transformers' tensor ``name`` (of ``shape``) comes from in the checkpoint."""
    if name == "model.embed_tokens.weight":
        return [((), "model.word_embeddings.weight")]
    if name == "lm_head.weight":  # tied: the port multiplies by its token embedding
        return [((), _first(weights, name, ["lm_head.weight", "model.word_embeddings.weight"]))]
    m = _LAYER.match(name)
    if m is None:
        return [((), name)]
    layer, rest = m.groups()
    if rest == "self_attn.conv1d.weight":
        c = shape[0] // 3
        return [((slice(i * c, (i + 1) * c),), f"{layer}.attention.{x}_conv1d.weight")
                for i, x in enumerate("qkv")]
    if rest == "mlp.experts.gate_up_proj":
        inter = shape[1] // 2
        return [a for e in range(shape[0]) for a in (
            ((e, slice(0, inter)), f"{layer}.mlp.experts.{e}.gate_proj.weight"),
            ((e, slice(inter, 2 * inter)), f"{layer}.mlp.experts.{e}.up_proj.weight"))]
    if rest == "mlp.experts.down_proj":
        return [((e,), f"{layer}.mlp.experts.{e}.down_proj.weight") for e in range(shape[0])]
    if rest == "mlp.gate.e_score_correction_bias":
        return [((), f"{layer}.mlp.gate.expert_bias")]
    rest = rest.replace("self_attn.forget_gate.", "self_attn.")
    if rest == "self_attn.o_proj.weight":  # MLA's is dense in the checkpoint, KDA's o_proj
        return [((), _first(weights, name, [f"{layer}.attention.dense.weight",
                                             f"{layer}.attention.o_proj.weight"]))]
    return [((), f"{layer}.{rest.replace('self_attn.', 'attention.')}")]


def checkpoint_name(name: str, weights: Any) -> str:
    """The one checkpoint tensor transformers' (unfused) tensor ``name`` comes from."""
    (_, source), = sources(name, torch.Size(), weights)
    return source


def _first(weights: Any, name: str, candidates: list[str]) -> str:
    found = next((c for c in candidates if weights.has(c)), None)
    if found is None:
        raise InputError(f"{_where(weights)}: no tensor for transformers' {name} (looked for "
                         f"{' or '.join(candidates)})")
    return found


def _where(weights: Any) -> str:
    return str(getattr(weights, "path", None) or getattr(weights, "model_dir", None)
               or type(weights).__name__)


@torch.no_grad()
def load_port_weights(model: Any, weights: Any) -> int:
    """Overwrite every weight of transformers' ``model`` from ``weights``; the number of
    checkpoint tensors read."""
    targets = dict(model.named_parameters())
    targets.update((n, b) for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in _BUFFERS)
    cpu = torch.device("cpu")
    read = 0
    for name, tensor in targets.items():
        for index, source in sources(name, tensor.shape, weights):
            if not weights.has(source):
                raise InputError(f"{_where(weights)}: no tensor {source} for transformers' "
                                 f"{name}: cannot run the reference on this port's weights")
            part = tensor[index] if index else tensor
            value = weights.get(source, tensor.dtype, cpu)
            if tuple(value.shape) != tuple(part.shape):
                raise InputError(f"{_where(weights)}: {source} has shape {tuple(value.shape)}; "
                                 f"transformers' {name}{list(index) if index else ''} needs "
                                 f"{tuple(part.shape)}")
            part.copy_(value)
            read += 1
    return read
