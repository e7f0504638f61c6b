"""Simple gated linear attention ("Lightning"), the local layers' token mixer (doc §2.4 step 5).

Per head, with a fixed per-step decay lambda = exp(g), g < 0:

    S_t = lambda * S_{t-1} + k_t^T v_t          (S in R^{D x Dv}, S_0 = initial state or 0)
    o_t = (s q_t) S_t

Two forms of the same math.  :func:`gla_recurrent` is the literal recurrence, the definition.
:func:`gla_chunked` is the form used for long prompts; inside a chunk it unrolls the recurrence
into a decay-masked causal attention, and carries the state across chunks:

    o_i = s * sum_{j<=i} exp(g (i-j)) (q_i . k_j) v_j  +  s * exp(g (i+1)) q_i S_prev
    S_new = exp(g C) S_prev + sum_j exp(g (C-1-j)) k_j^T v_j

Exponents are taken relative to the chunk start and are never positive, so nothing overflows for
any T.  Both forms accumulate in the state dtype (float64 for a float64 model, else float32, as
fla and HF keep the state) and return the output in q's dtype.
"""

from __future__ import annotations

import torch

from references.ops import accumulation_dtype


def _prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    if q.ndim != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2] or g.shape != q.shape[:1]:
        raise ValueError(
            f"gla: expected q, k [H, T, D], v [H, T, Dv], g [H]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}"
        )
    dt = accumulation_dtype(q.dtype) if state is None else state.dtype
    h, _, d = q.shape
    dv = v.shape[-1]
    if state is None:
        state = torch.zeros(h, d, dv, dtype=dt, device=q.device)
    elif state.shape != (h, d, dv):
        raise ValueError(f"gla: state shape {tuple(state.shape)}, expected {(h, d, dv)}")
    return q.to(dt), k.to(dt), v.to(dt), g.to(dt), state


def gla_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The literal per-step recurrence; returns (o [H, T, Dv], final state [H, D, Dv])."""
    qf, kf, vf, gf, s = _prepare(q, k, v, g, state)
    lam = gf.exp()[:, None, None]
    out = torch.empty(*q.shape[:2], v.shape[-1], dtype=s.dtype, device=q.device)
    for t in range(q.shape[1]):
        s = lam * s + kf[:, t, :, None] * vf[:, t, None, :]
        out[:, t] = torch.einsum("hd,hde->he", scale * qf[:, t], s)
    return out.to(q.dtype), s


def gla_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form: O(T*C + D^2) memory per head; returns (o [H, T, Dv], final state)."""
    if chunk_size < 1:
        raise ValueError(f"gla_chunked: chunk_size must be >= 1, got {chunk_size}")
    qf, kf, vf, gf, s = _prepare(q, k, v, g, state)
    gh = gf[:, None, None]  # [H, 1, 1]
    out = torch.empty(*q.shape[:2], v.shape[-1], dtype=s.dtype, device=q.device)
    for start in range(0, q.shape[1], chunk_size):
        qc = scale * qf[:, start : start + chunk_size]
        kc, vc = kf[:, start : start + chunk_size], vf[:, start : start + chunk_size]
        n = qc.shape[1]
        pos = torch.arange(n, dtype=s.dtype, device=q.device)
        # exp(g (i - j)) on and below the diagonal, 0 above; the exponent is clamped to <= 0.
        lag = pos[:, None] - pos[None, :]
        decay = torch.exp(gh * lag.clamp(min=0)).tril_()  # [H, n, n]
        intra = ((qc @ kc.transpose(-1, -2)) * decay) @ vc
        inter = (qc * torch.exp(gh * (pos[:, None] + 1))) @ s  # S_prev decayed i+1 steps
        out[:, start : start + n] = intra + inter
        k_decayed = kc * torch.exp(gh * (n - 1 - pos[:, None]))
        s = torch.exp(gh * n) * s + k_decayed.transpose(-1, -2) @ vc
    return out.to(q.dtype), s
