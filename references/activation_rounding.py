"""Activations rounded the way a port's matmul rounds them before it multiplies.

A quantized port does not only run on rounded weights: ggml's CPU matmul also converts each
activation row to the weight type's "vec_dot" type before the dot products (q8_0 blocks of 32
for Q4_0/Q5_0/Q8_0/IQ4_NL weights, q8_1 for Q4_1/Q5_1, q8_K blocks of 256 for the K-quants and
most IQ types, f16 for F16 and bf16 for BF16 weights).  That rounding is part of what the port
legitimately computes, so the reference that judges the port's correctness applies it too: then
what remains between the two is float32 accumulation, not 8-bit noise, and a tolerance can be
tight enough to catch a wrong formula.

A weight declares how its input is rounded with :func:`declare` (the weight source does it:
:class:`harness.quant.gguf_weights.GgufWeights` from each GGUF tensor's type);
:func:`references.ops.linear` rounds the input of every projection by what its weight declares.
A weight that declares nothing (every checkpoint weight) leaves the input exact, bit for bit.

The emulation follows ggml's x86 quantizers: q8_0 scales by ``127 / amax`` in float32 and
rounds half to even, storing ``d = amax / 127`` as float16; q8_K scales by ``-127 / max`` (the
signed value of largest magnitude) and stores ``d = 1 / scale`` as float32.  The port's input
differs from ours by float32 rounding, so a rare element may round to the other neighbour: a
difference of one quantization step, far below the error of a wrong formula.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Kind = Literal["q8_0", "q8_1", "q8_K", "f16", "bf16"]
KINDS: tuple[str, ...] = ("q8_0", "q8_1", "q8_K", "f16", "bf16")
BLOCK = {"q8_0": 32, "q8_1": 32, "q8_K": 256}
ATTR = "activation_rounding"  # the attribute a weight tensor carries
BLOCK_MIN_ATTR = "activation_block_min"  # q8_1 only: the weight's per-block minimum m [out, n/32]


def declare(weight: torch.Tensor, kind: Any, block_min: Any = None) -> torch.Tensor:
    """Mark ``weight``: its input is rounded to ``kind`` (None: exact) before it is applied.
    ``kind`` may be a tuple for a tensor a port stores in parts (MLA's ``kv_b_proj``).

    ``block_min``: for Q4_1/Q5_1 weights (``w = d q + m`` per block of 32), ``m`` [out, in/32]
    (a tuple, like ``kind``, for a tensor stored in parts):
    ggml adds ``m * s`` with ``s = d_x sum(q_x)`` rounded to float16, which no rounding of the
    input alone reproduces; :func:`sum_error` gives what that float16 adds."""
    for k in kind if isinstance(kind, tuple) else (kind,):
        if k is not None and k not in KINDS:
            raise ValueError(f"activation rounding {k!r}: expected one of {', '.join(KINDS)}")
    setattr(weight, ATTR, kind)
    if block_min is not None:
        setattr(weight, BLOCK_MIN_ATTR, block_min)
    return weight


def declared(weight: torch.Tensor) -> Any:
    """What ``weight`` declares (None when nothing: the input stays exact)."""
    return getattr(weight, ATTR, None)


def round_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` as the port hands it to a matmul with ``weight`` (``x`` itself when exact)."""
    kind = declared(weight)
    return x if kind is None else round_activations(x, kind)


def block_min(weight: torch.Tensor) -> torch.Tensor | None:
    """The per-block minimum a Q4_1/Q5_1 weight declared (None otherwise)."""
    return getattr(weight, BLOCK_MIN_ATTR, None)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x``'s rows as float32 (the port's activations) blocks of ``block``."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"activation rounding: rows of {n} are not whole blocks of {block}")
    return x.to(torch.float32).reshape(*x.shape[:-1], n // block, block)


def _q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, d) of ggml's q8_0/q8_1 x86 quantizer, blocks of 32 (d float32, stored as float16)."""
    xb = _blocks(x, BLOCK["q8_0"])
    amax = xb.abs().amax(-1, keepdim=True)
    # a true float32 division (``127.0 / t`` is computed as ``127 * (1 / t)``, off by an ulp)
    scale = torch.where(amax != 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return torch.round(xb * scale), amax / 127.0


def sum_error(x: torch.Tensor) -> torch.Tensor:
    """Per q8_1 block of ``x`` [.., n/32]: ``fp16(d sum(q)) - d sum(q)`` (d float16, the
    product float32 as ggml forms it), the error a Q4_1/Q5_1 matmul adds times ``m``."""
    q, d = _q8(x)
    s = d.squeeze(-1) * q.sum(-1)  # float32, as ggml's d * hsum
    exact = d.to(torch.float16).to(x.dtype).squeeze(-1) * q.sum(-1).to(x.dtype)
    return s.to(torch.float16).to(x.dtype) - exact


def round_activations(x: torch.Tensor, kind: Kind) -> torch.Tensor:
    """Each row of ``x`` (last axis) quantized to ``kind`` and back, in ``x``'s dtype."""
    if kind in ("f16", "bf16"):
        half = torch.float16 if kind == "f16" else torch.bfloat16
        return x.to(torch.float32).to(half).to(x.dtype)
    if kind in ("q8_0", "q8_1"):
        q, d = _q8(x)
        return (q.to(x.dtype) * d.to(torch.float16).to(x.dtype)).reshape(x.shape)
    if kind != "q8_K":
        raise ValueError(f"activation rounding {kind!r}: expected one of {', '.join(KINDS)}")
    xb = _blocks(x, BLOCK["q8_K"])
    peak = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))  # signed, first of largest |x|
    scale = torch.where(peak != 0, torch.full_like(peak, -127.0) / peak, torch.zeros_like(peak))
    q = torch.round(xb * scale).clamp(max=127)
    step = torch.where(scale != 0, torch.ones_like(scale) / scale,
                       torch.zeros_like(scale)).to(x.dtype)
    return (q.to(x.dtype) * step).reshape(x.shape)
