"""Specification of the decode roofline: which weight bytes one token reads, and the bandwidth."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.checks.cases import load_cases
from harness.perf.roofline import (
    dtype_bytes,
    measure_bandwidth_gbs,
    roofline_tgs,
    weight_bytes_per_token,
)
from references.checkpoint_spec import expected_tensors
from references.config import BailingHybridConfig, config_from_dict


def flash_mini(**changes: Any) -> BailingHybridConfig:
    raw = load_cases(["flash-mini"])[0].config_json() | changes
    return config_from_dict(raw, Path("flash-mini"))


def hand_count_flash_mini_params(k: int = 4) -> int:
    """Parameters one flash-mini decode step reads, counted from the case file by hand."""
    h, vocab, heads, d = 64, 512, 4, 16
    embedding_row, lm_head, final_norm = h, vocab * h, h
    layer_norms = 8 * 2 * h  # input + post-attention layernorm in each of the 8 layers
    gla = 3 * heads * d * h + d + d + heads * d * h + heads * d + h * heads * d  # qkv, q/k norm,
    gla_layers = 6 * gla  # g_proj, g_norm, dense; layers 0,1,2,4,5,6
    q_a, q_a_norm, q_b = 32 * h, 32, heads * (16 + 8) * 32
    kv_a, kv_a_norm, kv_b, dense = (32 + 8) * h, 32, heads * (16 + 16) * 32, h * heads * 16
    mla_layers = 2 * (q_a + q_a_norm + q_b + kv_a + kv_a_norm + kv_b + dense)  # layers 3 and 7
    dense_ffn = 3 * 96 * h  # layer 0 (first_k_dense_replace = 1)
    router = 16 * h + 16  # gate weight [experts, h] + expert_bias
    swiglu_32 = 3 * 32 * h  # one expert (or the shared expert): gate, up, down at width 32
    moe_layers = 7 * (router + swiglu_32 + k * swiglu_32)  # layers 1..7: shared + k routed
    return (embedding_row + lm_head + final_norm + layer_norms + gla_layers + mla_layers
            + dense_ffn + moe_layers)


def test_flash_mini_reads_what_the_hand_count_says() -> None:
    assert hand_count_flash_mini_params() == 430_000
    assert weight_bytes_per_token(flash_mini(), 4.0) == 4 * 430_000
    assert weight_bytes_per_token(flash_mini(), 2.0) == 2 * 430_000


def test_only_the_active_experts_count() -> None:
    base = weight_bytes_per_token(flash_mini(), 4.0)
    # Twice the experts (still 4 groups): the checkpoint doubles its expert weights...
    more = flash_mini(num_experts=32)
    assert sum(np.prod(s.shape) for s in expected_tensors(more)) > sum(
        np.prod(s.shape) for s in expected_tensors(flash_mini()))
    # ...but one token still reads 4 experts per layer (the router alone grows, 16 rows x 65).
    assert weight_bytes_per_token(more, 4.0) == base + 4 * 7 * 16 * (64 + 1)
    fewer_active = weight_bytes_per_token(flash_mini(num_experts_per_tok=2), 4.0)
    assert fewer_active == 4 * hand_count_flash_mini_params(k=2)
    assert base - fewer_active == 4 * 7 * 2 * (3 * 32 * 64)


def test_a_per_tensor_byte_map_is_honoured() -> None:
    cfg = flash_mini()
    specs = expected_tensors(cfg, include_mtp=False)
    as_f16 = {s.name: 2.0 * float(np.prod(s.shape)) for s in specs}
    assert weight_bytes_per_token(cfg, as_f16) == weight_bytes_per_token(cfg, 2.0)
    # A quantised lm_head (as a GGUF might store it) changes exactly its own share.
    quantised = dict(as_f16)
    quantised["lm_head.weight"] = 512 * 64 * 34 / 32  # Q8_0
    saved = 512 * 64 * 2 - 512 * 64 * 34 / 32
    assert weight_bytes_per_token(cfg, quantised) == round(2 * 430_000 - saved)
    del quantised["model.norm.weight"]
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        weight_bytes_per_token(cfg, quantised)


def test_mtp_only_when_asked_and_tied_embeddings_read_in_full() -> None:
    cfg = flash_mini()
    with_mtp = weight_bytes_per_token(cfg, 1.0, include_mtp=True)
    block = 2 * 64 + 15_936 + (16 * 64 + 16) + 3 * 32 * 64 * (1 + 4)  # norms, MLA, router,
    head = 3 * 64 + 64 * 2 * 64  # enorm, hnorm, final_layernorm, eh_proj   # shared + 4 experts
    drafting = 64 + 512 * 64  # the next token's embedding row and a second lm_head pass
    assert with_mtp - weight_bytes_per_token(cfg, 1.0) == block + head + drafting
    tied = flash_mini(tie_word_embeddings=True)
    assert weight_bytes_per_token(tied, 1.0) == 430_000  # lm_head = the embedding matrix


def test_dtype_names_map_to_bytes_per_weight() -> None:
    assert dtype_bytes("float32") == dtype_bytes("F32") == 4.0
    assert dtype_bytes("bfloat16") == 2.0
    assert dtype_bytes("Q8_0") == pytest.approx(1.0625)
    assert dtype_bytes("q4_K") == pytest.approx(4.5 / 8)
    assert dtype_bytes("mystery") is None


def test_roofline_is_bandwidth_over_bytes() -> None:
    assert roofline_tgs(400.0, 4e9) == pytest.approx(100.0)  # 400 GB/s, 4 GB per token
    assert math.isnan(roofline_tgs(400.0, 0))


def test_measured_bandwidth_is_plausible() -> None:
    gbs = measure_bandwidth_gbs(size_mb=64, repeats=3)
    assert 0.1 < gbs < 10_000  # read + write bytes of a 64 MiB copy, any machine of this era
    with pytest.raises(ValueError):
        measure_bandwidth_gbs(size_mb=0)
