"""MLA: the naive and absorbed forms are one function, cached decode equals a full pass, and
both equal the textbook per-head softmax attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.core.metrics import nmse
from references.mla import LORA_NORM_EPS, MLACache, MLADims, MLAWeights, mla_forward
from references.ops import rms_norm, rope

DIMS = MLADims(
    num_heads=4,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    kv_lora_rank=16,
    rope_theta=10000.0,
)
HIDDEN = 32


def _weights(q_lora: bool, seed: int = 0) -> MLAWeights:
    gen = torch.Generator().manual_seed(seed)

    def lin(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=gen, dtype=torch.float64) / inp**0.5

    def norm(n: int) -> torch.Tensor:
        return 1 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)

    h, qk = DIMS.num_heads, DIMS.qk_head_dim
    c, r = DIMS.kv_lora_rank, DIMS.qk_rope_head_dim
    q = (
        {"q_a_proj": lin(12, HIDDEN), "q_a_norm": norm(12), "q_b_proj": lin(h * qk, 12)}
        if q_lora
        else {"q_proj": lin(h * qk, HIDDEN)}
    )
    return MLAWeights(
        kv_a_proj=lin(c + r, HIDDEN),
        kv_a_norm=norm(c),
        kv_b_proj=lin(h * (DIMS.qk_nope_head_dim + DIMS.v_head_dim), c),
        dense=lin(HIDDEN, h * DIMS.v_head_dim),
        **q,
    )


def _x(t: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(
        t, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return nmse(a.numpy(), b.numpy())


@pytest.mark.parametrize("q_lora", [True, False])
def test_absorbed_equals_naive(q_lora):
    w, x = _weights(q_lora), _x(23)
    naive, c1 = mla_forward(x, w, DIMS, MLACache(), impl="naive")
    absorbed, c2 = mla_forward(x, w, DIMS, MLACache(), impl="absorbed")
    assert _agree(absorbed, naive) <= 1e-18
    torch.testing.assert_close(c1, c2, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["naive", "absorbed"])
@pytest.mark.parametrize("q_lora", [True, False])
def test_cached_decode_equals_one_full_pass(impl, q_lora):
    w, x = _weights(q_lora), _x(20)
    full, _ = mla_forward(x, w, DIMS, MLACache(), impl=impl)
    cache = MLACache()
    parts = [mla_forward(x[:7], w, DIMS, cache, impl=impl)[0]]
    parts += [mla_forward(x[i : i + 1], w, DIMS, cache, impl=impl)[0] for i in range(7, 20)]
    assert _agree(torch.cat(parts), full) <= 1e-18
    # The cache holds [c ; k_pe] per token: kv_lora_rank + qk_rope_head_dim floats.
    assert cache.latent.shape == (20, DIMS.kv_lora_rank)
    assert cache.k_pe.shape == (20, DIMS.qk_rope_head_dim)


def _textbook(x: torch.Tensor, w: MLAWeights) -> torch.Tensor:
    """Per head, per query: softmax over keys j <= i of q.k * 12^-0.5, then W_dense."""
    t, d = x.shape[0], DIMS
    pos = torch.arange(t)
    q = F.linear(rms_norm(F.linear(x, w.q_a_proj), w.q_a_norm, LORA_NORM_EPS), w.q_b_proj)
    kv = F.linear(x, w.kv_a_proj)
    c = rms_norm(kv[:, : d.kv_lora_rank], w.kv_a_norm, LORA_NORM_EPS)
    k_pe = rope(kv[:, d.kv_lora_rank :], pos, 4, d.rope_theta, "interleaved")
    heads = []
    for h in range(d.num_heads):
        qh = q.view(t, d.num_heads, 12)[:, h]
        q_nope, q_pe = qh[:, :8], rope(qh[:, 8:], pos, 4, d.rope_theta, "interleaved")
        kvb = w.kv_b_proj.view(d.num_heads, 14, d.kv_lora_rank)[h]
        k_nope, v = c @ kvb[:8].T, c @ kvb[8:].T
        rows = []
        for i in range(t):
            s = torch.stack([q_nope[i] @ k_nope[j] + q_pe[i] @ k_pe[j] for j in range(i + 1)])
            p = torch.softmax(s / 12**0.5, dim=0)
            rows.append((p[:, None] * v[: i + 1]).sum(0))
        heads.append(torch.stack(rows))
    return F.linear(torch.cat(heads, dim=-1), w.dense)


def test_naive_form_is_the_textbook_formula():
    w, x = _weights(True, seed=5), _x(9, seed=6)
    assert DIMS.scale == 12**-0.5
    out, _ = mla_forward(x, w, DIMS, MLACache())
    assert _agree(out, _textbook(x, w)) <= 1e-18


def test_attention_is_causal():
    w, x = _weights(True), _x(12)
    y = x.clone()
    y[8:] = torch.randn(4, HIDDEN, dtype=torch.float64)
    a, _ = mla_forward(x, w, DIMS, MLACache())
    b, _ = mla_forward(y, w, DIMS, MLACache())
    torch.testing.assert_close(a[:8], b[:8], rtol=0, atol=0)
    assert not torch.allclose(a[8:], b[8:])


def test_rope_style_matters():
    w, x = _weights(True), _x(10)
    a, _ = mla_forward(x, w, DIMS, MLACache(), rope_style="interleaved")
    b, _ = mla_forward(x, w, DIMS, MLACache(), rope_style="half_split")
    assert _agree(b, a) > 1e-8
    torch.testing.assert_close(a[0], b[0], rtol=1e-14, atol=1e-14)  # position 0 is unrotated


def test_weights_need_one_query_path():
    w = _weights(True)
    with pytest.raises(ValueError, match="q_proj"):
        MLAWeights(w.kv_a_proj, w.kv_a_norm, w.kv_b_proj, w.dense)
    with pytest.raises(ValueError, match="q_proj"):
        MLAWeights(
            w.kv_a_proj, w.kv_a_norm, w.kv_b_proj, w.dense, q_proj=w.q_b_proj, q_a_proj=w.q_a_proj
        )
