"""Activations rounded as ggml's CPU matmul rounds them (references/activation_rounding.py).

The emulation is checked against ggml itself: libggml-cpu's own ``quantize_row_q8_0``,
``quantize_row_q8_1`` and ``quantize_row_q8_K`` (the functions a quantized matmul converts its
float32 input with) on random rows, block by block; and a weight that declares nothing leaves
every projection of the reference bit-identical to ``F.linear``.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from references.activation_rounding import declare, round_activations, round_input, sum_error
from references.ops import linear

# ggml-common.h block layouts: (block size, bytes per block)
LAYOUT = {"q8_0": (32, 34), "q8_1": (32, 36), "q8_K": (256, 292)}


@pytest.fixture(scope="module")
def ggml_cpu() -> ctypes.CDLL:
    from harness.llamacpp.ggml_ctypes import library_dir

    lib = ctypes.CDLL(str(library_dir() / "libggml-cpu.so"))
    lib.ggml_cpu_init()  # fills the float16 tables the quantizers use
    return lib


def ggml_round_trip(lib: ctypes.CDLL, kind: str, row: np.ndarray) -> tuple[np.ndarray, float]:
    """ggml's own quantization of one float32 row, dequantized as its dot products read it;
    also (q8_1) the float16 block sums ``s`` it stores."""
    block, nbytes = LAYOUT[kind]
    out = np.zeros(len(row) // block * nbytes, dtype=np.uint8)
    fn = getattr(lib, f"quantize_row_{kind}")
    fn(row.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p),
       ctypes.c_int64(len(row)))
    blocks = out.reshape(-1, nbytes)
    if kind == "q8_K":
        d = blocks[:, :4].copy().view(np.float32)[:, 0].astype(np.float64)
        q = blocks[:, 4 : 4 + 256].view(np.int8).astype(np.float64)
        return (q * d[:, None]).reshape(-1), np.nan
    d = blocks[:, :2].copy().view(np.float16)[:, 0].astype(np.float64)
    head = 4 if kind == "q8_1" else 2
    q = blocks[:, head : head + 32].view(np.int8).astype(np.float64)
    s = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float64) if kind == "q8_1" else d
    return (q * d[:, None]).reshape(-1), s


@pytest.mark.parametrize("kind", ["q8_0", "q8_1", "q8_K"])
def test_rows_round_exactly_as_ggml_cpu_rounds_them(ggml_cpu, kind):
    rng = np.random.default_rng(7)
    # gaussian rows with outliers (what hidden states look like), and an all-zero block
    rows = rng.standard_normal((16, 1024)).astype(np.float32)
    rows[:, ::97] *= 30
    rows[3, :256] = 0
    ours = round_activations(torch.from_numpy(rows).double(), kind).numpy()  # type: ignore[arg-type]
    for i, row in enumerate(rows):
        theirs, _ = ggml_round_trip(ggml_cpu, kind, np.ascontiguousarray(row))
        assert np.array_equal(ours[i], theirs), f"row {i}: {np.sum(ours[i] != theirs)} differ"


def test_q8_1_block_sum_error_is_what_ggml_stores(ggml_cpu):
    rng = np.random.default_rng(8)
    rows = rng.standard_normal((8, 256)).astype(np.float32)
    err = sum_error(torch.from_numpy(rows).double()).numpy()
    for i, row in enumerate(rows):
        deq, s = ggml_round_trip(ggml_cpu, "q8_1", np.ascontiguousarray(row))
        exact = deq.reshape(-1, 32).sum(-1)  # fp16(d) * sum(q)
        assert np.array_equal(err[i], s - exact)
    assert np.abs(err).max() > 0  # the float16 store does lose something


def test_f16_and_bf16_inputs_round_to_nearest_even():
    x = torch.tensor([[1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8]], dtype=torch.float64)
    assert round_activations(x, "f16").tolist() == [[1.0, 1 + 2**-9, 1 + 2**-8]]
    assert round_activations(x, "bf16").tolist() == [[1.0, 1.0, 1.0]]


def test_an_undeclared_weight_leaves_every_projection_bit_identical():
    x, w = torch.randn(5, 64, dtype=torch.float64), torch.randn(32, 64, dtype=torch.float64)
    assert round_input(x, w) is x
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_a_declared_weight_rounds_its_input_and_adds_the_q8_1_sum_term():
    x, w = torch.randn(5, 64, dtype=torch.float64), torch.randn(32, 64, dtype=torch.float64)
    m = torch.randn(32, 2, dtype=torch.float64)
    declare(w, "q8_1", block_min=m)
    expected = F.linear(round_activations(x, "q8_1"), w) + F.linear(sum_error(x), m)
    assert torch.equal(linear(x, w), expected)
    assert not torch.equal(linear(x, w), F.linear(x, w))


def test_unknown_kinds_and_partial_blocks_are_refused():
    with pytest.raises(ValueError, match="q4_0"):
        declare(torch.zeros(2, 32), "q4_0")
    with pytest.raises(ValueError, match="whole blocks of 256"):
        round_activations(torch.zeros(2, 300, dtype=torch.float64), "q8_K")
