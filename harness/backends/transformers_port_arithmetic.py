"""transformers' Ling 3.0 computing what a quantized llama.cpp port computes on its own weights.

A quantized Ling 3.0 port is judged against transformers' model run on the port's weights
(every weight overwritten from the GGUF, :mod:`harness.backends.transformers_port_weights`).  What
still separates the two, beyond float32 arithmetic, is where ggml rounds: its CPU matmul rounds
each activation row to the weight type's vec_dot type first (q8_0, q8_1, q8_K, f16, bf16;
:mod:`references.activation_rounding`).  :func:`install` makes transformers' model round where
the port does, changing no formula of transformers':

- every ``nn.Linear`` rounds its input as its weight's GGUF type says (through
  :func:`references.ops.linear`, which the Ling-2.6 reference uses for every projection);
- the routed experts, fused 3D tensors in transformers, run one expert at a time as
  transformers' eager loop does, each of gate, up and down rounding its input as its own GGUF
  tensor's type says (:func:`references.ops.swiglu`);
- MLA attends *absorbed*, as llama.cpp's ``bailingmoe3`` graph does (``attn_k_b`` folded into
  the query, ``attn_v_b`` applied to the attended latent): the rounded inputs are then the
  port's (``q_nope`` and the attended latent), not the latent transformers decompresses.  The
  attention itself is :func:`references.mla.attend`, the Ling-2.6 reference's, on transformers'
  own projections, RoPE and latent cache.

Every declaration is read from the GGUF by checkpoint name; a Linear whose checkpoint tensor the
GGUF does not hold is an InputError, so a renamed module never silently skips its rounding.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Any

import torch

from harness.core.errors import InputError
from references.activation_rounding import declare
from references.mla import MLACache, MLADims, attend
from references.ops import linear, swiglu

WHERE = "transformers (Ling 3.0) on a port's weights"

@dataclass
class PortArithmetic:
    """What :func:`install` did: the port's weights, and how many of them round their input
    (0: the port computes exactly, e.g. an F32 file)."""

    weights: Any  # GgufWeights
    rounding: int

    def declare(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Mark ``tensor`` (checkpoint tensor ``name``) with the port's rounding of its input:
        for the weights our MTP head reads itself (references.ling3.mtp)."""
        kind, block_min = self.weights.declaration(name, tensor.dtype, tensor.device)
        return declare(tensor, kind, block_min=block_min)


def install(model: Any, weights: Any) -> PortArithmetic:
    """Round every projection of transformers' ``model`` as the port behind ``weights`` (a
    :class:`~harness.quant.gguf_weights.GgufWeights`) does; MLA attends absorbed."""
    from transformers.models.bailing_hybrid import modeling_bailing_hybrid as hf

    rounding = 0
    for path, module in model.named_modules():
        if isinstance(module, hf.BailingHybridExperts):
            rounding += _experts(module, path, weights)
        elif isinstance(module, hf.BailingHybridAttention):
            _check_mla(module, path)
            module.forward = types.MethodType(_absorbed_mla_forward, module)
        elif isinstance(module, hf.BailingHybridTopkRouter):
            _exact_router(module, path, weights)
        elif isinstance(module, torch.nn.Linear):
            name = _checkpoint_name(path, weights)
            kind, block_min = weights.declaration(name, module.weight.dtype,
                                                  module.weight.device)
            kinds = kind if isinstance(kind, tuple) else (kind,)
            if all(k is None for k in kinds) and block_min is None:
                continue
            rounding += 1
            declare(module.weight, kind, block_min=block_min)
            if not path.endswith("kv_b_proj"):  # absorbed MLA applies kv_b's parts itself
                module.forward = types.MethodType(_rounded_linear_forward, module)
    return PortArithmetic(weights, rounding)


def _checkpoint_name(path: str, weights: Any) -> str:
    """The checkpoint tensor of transformers' projection ``path`` (its weight's source)."""
    from harness.backends.transformers_port_weights import checkpoint_name

    name = checkpoint_name(f"{path}.weight", weights)
    if not weights.has(name):
        raise InputError(f"{weights.path}: no GGUF tensor {name} for transformers' {path}: "
                         "cannot round its input as the port does")
    return name


def _rounded_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = linear(x, self.weight)
    return out if self.bias is None else out + self.bias


def _exact_router(module: Any, path: str, weights: Any) -> None:
    """llama.cpp keeps the router (``ffn_gate_inp``) in float32; a file that quantized it
    would round the router's input, which transformers' router (a float32 F.linear) does not."""
    name = _checkpoint_name(path, weights)
    kind, _ = weights.declaration(name)
    if kind is not None:
        raise InputError(f"{weights.path}: the router {name} is stored as "
                         f"{'+'.join(weights.gguf_types(name))}; its rounded input is not "
                         "emulated here (llama.cpp's own quantizer keeps routers in F32)")


def _experts(module: Any, path: str, weights: Any) -> int:
    """Expert ``e``'s gate, up and down as declared views of transformers' fused tensors, and
    a forward that runs them with :func:`references.ops.swiglu`."""
    if "silu" not in type(module.act_fn).__name__.lower():  # SiLU, transformers' SiLUActivation
        raise InputError(f"{WHERE}: {path} uses {module.act_fn!r}; the port's experts are "
                         "SwiGLU")
    inter = module.intermediate_dim
    prefix = path.replace(".mlp.experts", ".mlp.experts.{e}")
    parts = []
    rounding = 0
    for e in range(module.num_experts):
        views = {"gate": module.gate_up_proj[e, :inter], "up": module.gate_up_proj[e, inter:],
                 "down": module.down_proj[e]}
        for part, view in views.items():
            name = f"{prefix.format(e=e)}.{part}_proj.weight"
            if not weights.has(name):
                raise InputError(f"{weights.path}: no GGUF tensor for {name}: cannot round "
                                 f"the input of transformers' {path}[{e}] as the port does")
            kind, block_min = weights.declaration(name, view.dtype, view.device)
            rounding += kind is not None
            declare(view, kind, block_min=block_min)
        parts.append(views)
    module._port_parts = parts
    module.forward = types.MethodType(_experts_forward, module)
    return rounding


def _experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager expert loop, each expert through :func:`references.ops.swiglu`."""
    out = torch.zeros_like(hidden_states)
    for e in torch.unique(top_k_index).tolist():
        if e >= self.num_experts:
            continue
        token, slot = torch.where(top_k_index == e)
        w = self._port_parts[e]
        y = swiglu(hidden_states[token], w["gate"], w["up"], w["down"])
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
    return out


def _check_mla(module: Any, path: str) -> None:
    dims = _dims(module)
    if not math.isclose(module.scaling, dims.scale, rel_tol=1e-12):
        raise InputError(f"{WHERE}: {path} scales scores by {module.scaling} (YaRN mscale); "
                         f"the absorbed attention here uses {dims.scale}")


def _dims(module: Any) -> MLADims:
    return MLADims(num_heads=module.num_heads, qk_nope_head_dim=module.qk_nope_head_dim,
                   qk_rope_head_dim=module.qk_rope_head_dim, v_head_dim=module.v_head_dim,
                   kv_lora_rank=module.kv_lora_rank, rope_theta=math.nan)


def _absorbed_mla_forward(self: Any, hidden_states: torch.Tensor,
                          position_embeddings: tuple[torch.Tensor, torch.Tensor],
                          attention_mask: torch.Tensor | None, cache: Any = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' ``BailingHybridAttention.forward`` up to the latent cache, then the
    absorbed attention of llama.cpp's graph (:func:`references.mla.attend`)."""
    from transformers.models.bailing_hybrid.modeling_bailing_hybrid import (
        apply_rotary_pos_emb_interleave,
    )

    batch, seq = hidden_states.shape[:-1]
    if batch != 1:
        raise InputError(f"{WHERE}: one sequence at a time (got a batch of {batch})")
    if self.q_lora_rank is None:
        q = self.q_proj(hidden_states)
    else:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q = q.view(batch, seq, -1, self.qk_head_dim).transpose(1, 2)
    q_nope, q_rot = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
    kv_nope, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states),
                                 [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
    kv_nope = self.kv_a_layernorm(kv_nope).view(batch, 1, seq, self.kv_lora_rank)
    k_rot = k_rot.view(batch, 1, seq, self.qk_rope_head_dim)
    cos, sin = position_embeddings
    q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
    if cache is not None:
        kv_nope, k_rot = cache.update(kv_nope, k_rot, self.layer_idx, kwargs=kwargs)
    latent, k_pe = kv_nope[0, 0], k_rot[0, 0]  # [S, C], [S, rope]
    o = attend(q_nope[0], q_rot[0], MLACache(latent, k_pe), self.kv_b_proj.weight,
               _dims(self), latent.shape[0] - seq, impl="absorbed")  # [H, T, v]
    gate = torch.sigmoid(self.g_proj(hidden_states).float()).to(hidden_states.dtype)
    o = o.transpose(0, 1)[None] * gate.unsqueeze(-1)  # [1, T, H, v]
    return self.o_proj(o.reshape(batch, seq, -1)), None
