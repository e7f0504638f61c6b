"""The elementary operations match the architecture doc's formulas and sample values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from references.config import config_from_dict
from references.model import layer_is_mla
from references.ops import group_rms_norm, layer_factor, log_decay, rms_norm, rope, slopes
from references.variant import Variant
from tests.tiny_checkpoint import tiny_config


def test_slopes_for_32_heads_are_powers_of_two_to_the_minus_quarter():
    b = slopes(32)
    assert len(b) == 32
    assert b[0] == pytest.approx(2**-0.25) and b[0] == pytest.approx(0.8409, abs=5e-5)
    assert b[1] == pytest.approx(0.7071, abs=5e-5)
    assert b[31] == 2.0**-8
    assert all(b[h] == pytest.approx(2 ** (-(h + 1) / 4), rel=1e-15) for h in range(32))


def test_slopes_for_6_heads_take_4_then_every_other_of_8():
    # p = 4: 2^-2, 2^-4, 2^-6, 2^-8; then 2p = 8 gives 2^-1, 2^-2, ..., every other: 2^-1, 2^-3.
    assert slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


# (layer, f corrected, f off-by-one, lambda head 0 (f / f'), lambda head 31 (f / f')), L = 32.
DOC_TABLE = [
    (0, 1.00001, 1.03227, 0.4313, 0.4198, 0.99610, 0.99598),
    (6, 0.80646, 0.83872, 0.5076, 0.4940, 0.99686, 0.99673),
    (14, 0.54840, 0.58066, 0.6306, 0.6137, 0.99786, 0.99773),
    (30, 0.03227, 0.06453, 0.9732, 0.9472, 0.99987, 0.99975),
]


@pytest.mark.parametrize(("layer", "f", "f_off", "l0", "l0_off", "l31", "l31_off"), DOC_TABLE)
def test_decay_matches_the_doc_table(layer, f, f_off, l0, l0_off, l31, l31_off):
    assert layer_factor(layer, 32, "corrected") == pytest.approx(f, abs=5e-6)
    assert layer_factor(layer, 32, "hf_off_by_one") == pytest.approx(f_off, abs=5e-6)
    lam = log_decay(32, layer, 32, "corrected").exp()
    lam_off = log_decay(32, layer, 32, "hf_off_by_one").exp()
    assert float(lam[0]) == pytest.approx(l0, abs=5e-5)
    assert float(lam_off[0]) == pytest.approx(l0_off, abs=5e-5)
    assert float(lam[31]) == pytest.approx(l31, abs=5e-5)
    assert float(lam_off[31]) == pytest.approx(l31_off, abs=5e-5)


def test_off_by_one_adds_one_over_l_minus_one_and_decay_stays_negative():
    for layer in range(32):
        diff = layer_factor(layer, 32, "hf_off_by_one") - layer_factor(layer, 32, "corrected")
        assert diff == pytest.approx(1 / 31, rel=1e-12)
        assert (log_decay(32, layer, 32, "hf_off_by_one") < 0).all()
    assert layer_factor(0, 1) == pytest.approx(1 + 1e-5)  # L = 1 guarded, no division by zero


def _cfg(**overrides):
    return config_from_dict(tiny_config(**overrides), Path("config.json"))


def test_layer_rule_tail_clause_makes_the_leftover_layers_mla():
    cfg = _cfg(num_hidden_layers=7, layer_group_size=3)
    assert {n for n in range(7) if layer_is_mla(cfg, n)} == {2, 5, 6}
    dropped = Variant(tail_clause=False)
    assert {n for n in range(7) if layer_is_mla(cfg, n, dropped)} == {2, 5}


def test_layer_rule_for_ling_flash_shape_has_no_tail():
    cfg = _cfg(num_hidden_layers=32, layer_group_size=8)
    for variant in (Variant(), Variant(tail_clause=False)):
        assert {n for n in range(32) if layer_is_mla(cfg, n, variant)} == {7, 15, 23, 31}


def test_group_rms_norm_normalises_each_group_separately():
    x = torch.randn(3, 8, dtype=torch.float64)
    x[:, 4:] *= 100.0  # the second group's scale must not leak into the first
    w = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)
    out = group_rms_norm(x, 2, w, 0.0)
    halves = torch.cat((rms_norm(x[:, :4], None, 0.0), rms_norm(x[:, 4:], None, 0.0)), -1)
    torch.testing.assert_close(out, w * halves, rtol=1e-15, atol=0)
    assert out[:, :4].pow(2).div(w[:4] ** 2).mean(-1).allclose(torch.ones(3, dtype=torch.float64))
    # "2 channels per group" (4 groups) is a different normalisation.
    assert not torch.allclose(group_rms_norm(x, 4, w, 0.0), out)


def test_rms_norm_reduces_in_float32_and_returns_the_input_dtype():
    x = torch.randn(4, 64, dtype=torch.float64) * 3
    w = torch.rand(64, dtype=torch.float64) + 0.5
    ref = rms_norm(x, w, 1e-6)
    assert ref.dtype == torch.float64
    assert (ref / w).pow(2).mean(-1).allclose(torch.ones(4, dtype=torch.float64), rtol=1e-5)
    for dt in (torch.float32, torch.bfloat16):
        out = rms_norm(x.to(dt), w.to(dt), 1e-6)
        assert out.dtype == dt
        expected = w.to(dt) * (
            x.to(dt).float() * torch.rsqrt(x.to(dt).float().pow(2).mean(-1, keepdim=True) + 1e-6)
        ).to(dt)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _deinterleave(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...) on the first dim channels."""
    rot = x[..., :dim]
    return torch.cat((rot[..., 0::2], rot[..., 1::2], x[..., dim:]), -1)


@pytest.mark.parametrize("style", ["interleaved", "half_split"])
def test_rope_rotates_only_the_first_dim_channels_and_is_relative(style):
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    pos = torch.arange(5)
    y = rope(x, pos, 8, 10000.0, style)
    torch.testing.assert_close(y[..., 8:], x[..., 8:], rtol=0, atol=0)
    torch.testing.assert_close(y[:, 0], x[:, 0], rtol=0, atol=0)  # position 0 is the identity
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-14, atol=0)
    # q(m).k(n) depends only on m - n.
    q, k = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    qs, ks = q.expand(1, 9, 12), k.expand(1, 9, 12)
    rq, rk = (
        rope(qs, torch.arange(9), 8, 10000.0, style),
        rope(ks, torch.arange(9), 8, 10000.0, style),
    )
    assert float(rq[0, 5] @ rk[0, 2]) == pytest.approx(float(rq[0, 7] @ rk[0, 4]), rel=1e-12)


def test_rope_interleaved_equals_half_split_after_deinterleaving():
    """HF-R's MLA trick: de-interleave, then half-split == interleaved (then de-interleaved)."""
    x = torch.randn(3, 6, 10, dtype=torch.float64)
    pos = torch.arange(100, 106)
    inter = rope(x, pos, 6, 6e6, "interleaved")
    half = rope(_deinterleave(x, 6), pos, 6, 6e6, "half_split")
    torch.testing.assert_close(_deinterleave(inter, 6), half, rtol=1e-14, atol=1e-14)
    assert not torch.allclose(inter, rope(x, pos, 6, 6e6, "half_split"))


def test_rope_frequencies_are_base_to_the_minus_2i_over_dim():
    x = torch.zeros(1, 1, 4, dtype=torch.float64)
    x[..., 2] = 1.0  # the second pair, i = 1, of an interleaved 4-dim rope
    y = rope(x, torch.tensor([3]), 4, 100.0, "interleaved")
    theta = 3 * 100.0 ** (-2 / 4)
    assert float(y[0, 0, 2]) == pytest.approx(math.cos(theta), rel=1e-14)
    assert float(y[0, 0, 3]) == pytest.approx(math.sin(theta), rel=1e-14)
