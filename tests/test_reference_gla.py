"""The chunked GLA form is the literal recurrence, for any chunk size, length and state."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.core.metrics import nmse
from references.gla import gla_chunked, gla_recurrent
from references.ops import log_decay

ROOT = Path(__file__).resolve().parent.parent


def _inputs(h: int, t: int, d: int, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(h, t, d, generator=gen, dtype=torch.float64) for _ in range(3))
    # Real decays: the strongest head of layer 0 and the weakest of a late layer.
    g = log_decay(max(h, 2), 0, 4)[:h]
    g[-1] = log_decay(32, 30, 32)[31]
    return q.to(dtype), k.to(dtype), v.to(dtype), g.to(dtype)


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return nmse(a.double().numpy(), b.double().numpy())


@pytest.mark.parametrize("t", [1, 5, 64, 65, 200])
@pytest.mark.parametrize("chunk", [1, 7, 64, 128])
def test_chunked_equals_recurrent(t, chunk):
    q, k, v, g = _inputs(3, t, 8)
    o_rec, s_rec = gla_recurrent(q, k, v, g, 8**-0.5)
    o_chk, s_chk = gla_chunked(q, k, v, g, 8**-0.5, chunk_size=chunk)
    assert _agree(o_chk, o_rec) <= 1e-20
    assert _agree(s_chk, s_rec) <= 1e-20


@pytest.fixture(scope="module")
def long_recurrent():
    q, k, v, g = _inputs(2, 4096, 8, seed=1)
    return (q, k, v, g), gla_recurrent(q, k, v, g, 8**-0.5)


@pytest.mark.parametrize("chunk", [1, 7, 64, 128, 4096])
def test_chunked_equals_recurrent_at_4096_tokens(long_recurrent, chunk):
    (q, k, v, g), (o_rec, s_rec) = long_recurrent
    o_chk, s_chk = gla_chunked(q, k, v, g, 8**-0.5, chunk_size=chunk)
    assert _agree(o_chk, o_rec) <= 1e-20
    assert _agree(s_chk, s_rec) <= 1e-20


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_both_forms_start_from_a_given_state(chunk):
    q, k, v, g = _inputs(3, 50, 8, seed=2)
    s0 = torch.randn(3, 8, 8, dtype=torch.float64)
    o_rec, s_rec = gla_recurrent(q, k, v, g, 0.3, s0)
    o_chk, s_chk = gla_chunked(q, k, v, g, 0.3, s0, chunk_size=chunk)
    assert _agree(o_chk, o_rec) <= 1e-20 and _agree(s_chk, s_rec) <= 1e-20
    # The state matters: starting from zero gives a different output.
    assert _agree(gla_chunked(q, k, v, g, 0.3, chunk_size=chunk)[0], o_rec) > 1e-6


@pytest.mark.parametrize("fn", [gla_chunked, gla_recurrent])
def test_carrying_the_state_equals_one_call_over_the_concatenation(fn):
    q, k, v, g = _inputs(2, 160, 8, seed=3)
    o_all, s_all = fn(q, k, v, g, 0.35)
    outs, state = [], None
    for a, b in [(0, 37), (37, 38), (38, 130), (130, 160)]:
        o, state = fn(q[:, a:b], k[:, a:b], v[:, a:b], g, 0.35, state)
        outs.append(o)
    assert _agree(torch.cat(outs, dim=1), o_all) <= 1e-20
    assert _agree(state, s_all) <= 1e-20


def test_first_step_is_scaled_outer_product():
    """o_0 = (s q_0) (k_0^T v_0) from a zero state: the definition, by hand."""
    q, k, v, g = _inputs(1, 1, 4)
    o, s = gla_recurrent(q, k, v, g, 0.5)
    torch.testing.assert_close(s[0], torch.outer(k[0, 0], v[0, 0]), rtol=0, atol=0)
    torch.testing.assert_close(o[0, 0], 0.5 * q[0, 0] @ s[0], rtol=1e-15, atol=0)


def test_strong_decay_over_long_chunks_stays_finite():
    """exp(g (i - j)) with i >= j only: a decay of e^-50 per step never overflows."""
    q, k, v, _ = _inputs(2, 1000, 8)
    g = torch.tensor([-50.0, -1e-6], dtype=torch.float64)
    o_rec, _ = gla_recurrent(q, k, v, g, 1.0)
    o_chk, _ = gla_chunked(q, k, v, g, 1.0, chunk_size=500)
    assert torch.isfinite(o_chk).all()
    assert _agree(o_chk, o_rec) <= 1e-20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_keep_a_float32_state(dtype):
    q, k, v, g = _inputs(2, 100, 8, seed=4)
    o64, _ = gla_chunked(q, k, v, g, 8**-0.5)
    o, s = gla_chunked(q.to(dtype), k.to(dtype), v.to(dtype), g.float(), 8**-0.5)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert _agree(o, o64) < (1e-10 if dtype == torch.float32 else 1e-3)


def test_chunked_at_8192_tokens_never_builds_a_t_by_t_matrix():
    """H=4, D=32, T=8192 in float64: one T x T matrix per head alone would be 2 GiB."""
    script = textwrap.dedent(
        """
        import json, resource, torch
        from references.gla import gla_chunked
        torch.set_num_threads(1)
        h, t, d = 4, 8192, 32
        q, k, v = (torch.randn(h, t, d, dtype=torch.float64) for _ in range(3))
        g = -torch.rand(h, dtype=torch.float64)
        gla_chunked(q[:, :64], k[:, :64], v[:, :64], g, 0.2)  # warm up the allocator
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        o, s = gla_chunked(q, k, v, g, d ** -0.5, chunk_size=64)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"growth_kib": after - before, "finite": bool(torch.isfinite(o).all())}))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["finite"]
    assert result["growth_kib"] < 256 * 1024, result  # far under 1 GiB (Linux: KiB)
