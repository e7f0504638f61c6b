"""Elementary operations of the Ling-2.6 forward pass (architecture doc §2).

Each is written once, in the plainest form that is still exact, so the model code above it reads
as the formulas in the doc.  Precision rule (HF's): norms reduce in at least float32 -- in float64
for a float64 model -- and cast back to the input dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from references.activation_rounding import block_min, round_input, sum_error
from references.variant import SlopeFormula

RopeStyle = Literal["interleaved", "half_split"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions and recurrent state use: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, reduced in >= float32."""
    xf = x.to(accumulation_dtype(x.dtype))
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if weight is None else weight * normed


def group_rms_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over each of ``groups`` equal contiguous slices of the last axis, then ``weight``.

    ``groups`` is the number of groups (Ling-2.6's ``group_norm_size`` = 4 groups of 1024).
    """
    width = x.shape[-1]
    if width % groups:
        raise ValueError(f"group_rms_norm: {groups} groups do not divide {width} channels")
    grouped = x.reshape(*x.shape[:-1], groups, width // groups)
    return weight * rms_norm(grouped, None, eps).reshape(x.shape)


def rope(
    x: torch.Tensor, positions: torch.Tensor, dim: int, base: float, style: RopeStyle
) -> torch.Tensor:
    """Rotate the first ``dim`` channels of ``x`` [..., T, d] by position; the rest pass through.

    Frequencies theta_i = base^(-2i/dim), i < dim/2.  ``interleaved`` (GPT-J, ggml NORM) rotates
    pairs (x_2i, x_2i+1); ``half_split`` (NeoX) rotates pairs (x_i, x_{i+dim/2}).  Angles are
    computed in float64 and the cos/sin cast to x's dtype.
    """
    if dim % 2 or not 0 < dim <= x.shape[-1]:
        raise ValueError(f"rope: dim {dim} must be even and in (0, {x.shape[-1]}]")
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, dim/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    rot, rest = x[..., :dim], x[..., dim:]
    if style == "interleaved":
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    elif style == "half_split":
        x1, x2 = rot[..., : dim // 2], rot[..., dim // 2 :]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        raise ValueError(f"rope: unknown style {style!r}")
    return torch.cat((rotated, rest), dim=-1)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x W^T``, every projection of the model: ``x`` first rounded as the weight declares
    (:mod:`references.activation_rounding`; exact for checkpoint weights)."""
    out = F.linear(round_input(x, weight), weight)
    m = block_min(weight)
    return out if m is None else out + F.linear(sum_error(x), m.to(out.dtype))


def swiglu(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """down(SiLU(gate x) * up x): the dense MLP, every routed expert and the shared expert."""
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def _power_of_two_slopes(n: int) -> list[float]:
    rate = 2.0 ** -(math.log2(n) - 3)
    return [2.0 ** (-rate * (h + 1)) for h in range(n)]


def slopes(n_heads: int) -> list[float]:
    """ALiBi-style base decay rates b_h for any head count (doc §2.4 step 4).

    Power of two: b_h = start^(h+1) with start = 2^(-2^-(log2 H - 3)).  Otherwise the slopes of
    the closest lower power of two p, then every other slope of 2p for the remaining H - p heads.
    """
    if n_heads < 1:
        raise ValueError(f"slopes: need at least one head, got {n_heads}")
    if math.log2(n_heads).is_integer():
        return _power_of_two_slopes(n_heads)
    p = 2 ** math.floor(math.log2(n_heads))
    return _power_of_two_slopes(p) + _power_of_two_slopes(2 * p)[0::2][: n_heads - p]


def layer_factor(layer: int, n_layers: int, formula: SlopeFormula = "corrected") -> float:
    """Per-layer decay multiplier: 1 - l/(L-1) + 1e-5 (corrected) or 1 - (l-1)/(L-1) + 1e-5.

    The off-by-one form is HF-R's original code; L = 1 is guarded as max(1, L-1).
    """
    denom = max(1, n_layers - 1)
    if formula == "corrected":
        return 1.0 - layer / denom + 1e-5
    if formula == "hf_off_by_one":
        return 1.0 - (layer - 1) / denom + 1e-5
    raise ValueError(f"layer_factor: unknown formula {formula!r}")


def log_decay(
    n_heads: int, layer: int, n_layers: int, formula: SlopeFormula = "corrected"
) -> torch.Tensor:
    """g_h(l) = -b_h * f(l) as float64 [H]: the GLA per-step decay is exp(g) < 1."""
    factor = layer_factor(layer, n_layers, formula)
    return -torch.tensor(slopes(n_heads), dtype=torch.float64) * factor
