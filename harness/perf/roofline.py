"""Decode roofline: how fast one-token decode could go if it only had to stream the weights.

Single-token decode of a MoE model is memory-bound: every step reads the weights it uses once.
So ``roofline tok/s = bandwidth / weight bytes read per token``, and ``S_TG / roofline`` says how
close a backend gets.  What one token reads (:func:`weight_bytes_per_token`): one embedding row,
every attention and norm weight, the dense FFNs, the shared experts and the router in full, only
``num_experts_per_tok`` routed experts per MoE layer, and the whole ``lm_head``.  KV-cache and GLA
state reads are not counted, so the roofline is an upper bound that ignores context length.

Bandwidth convention (:func:`measure_bandwidth_gbs`): a numpy copy counts the bytes read **plus**
the bytes written (STREAM's "Copy" convention), in decimal GB/s (1e9 bytes).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping

import numpy as np

from references.checkpoint_spec import expected_tensors
from references.config import BailingHybridConfig

# Bytes per parameter of the storage types a target may name (GGUF block types included:
# block bytes / block size, e.g. Q4_K = 144 bytes per 256 weights).
BYTES_PER_PARAM: dict[str, float] = {
    "float64": 8.0,
    "f64": 8.0,
    "float32": 4.0,
    "f32": 4.0,
    "bfloat16": 2.0,
    "bf16": 2.0,
    "float16": 2.0,
    "f16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "q6_k": 210 / 256,
    "q5_k": 176 / 256,
    "q4_k": 144 / 256,
    "q3_k": 110 / 256,
    "q2_k": 84 / 256,
}

_EXPERT = re.compile(r"^(?P<layer>model\.layers\.\d+)\.mlp\.experts\.\d+\.")
_EMBEDDING = "model.word_embeddings.weight"


def dtype_bytes(dtype: str) -> float | None:
    """Bytes per weight for a dtype / GGUF type name (case-insensitive); None when unknown."""
    return BYTES_PER_PARAM.get(dtype.strip().lower().replace("-", "_"))


def measure_bandwidth_gbs(size_mb: float = 512, repeats: int = 5) -> float:
    """Memory bandwidth in GB/s from a numpy copy of ``size_mb`` MiB: (read + write) bytes / time,
    best of ``repeats`` (the best run is the one least disturbed by other processes)."""
    if size_mb <= 0 or repeats < 1:
        raise ValueError("size_mb must be positive and repeats >= 1")
    n = max(1, int(size_mb * 2**20) // 8)
    src = np.ones(n, dtype=np.float64)  # ones, not empty: every page is really mapped
    dst = np.zeros_like(src)
    np.copyto(dst, src)  # first touch outside the timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / max(best, 1e-9) / 1e9


def weight_bytes_per_token(
    cfg: BailingHybridConfig,
    bytes_per_param: float | Mapping[str, float],
    *,
    include_mtp: bool = False,
) -> int:
    """Weight bytes one decode step reads (see the module docstring for what counts).

    ``bytes_per_param`` is either one number for every weight (4.0 for float32) or a map from
    every tensor's HF name (as :func:`references.checkpoint_spec.expected_tensors` spells it) to
    that tensor's total size in bytes, e.g. from a GGUF's tensor types.  A routed expert counts
    as the mean size of its layer's experts, ``num_experts_per_tok`` times.  With
    ``include_mtp`` the MTP head adds its own tensors (active experts only), one more embedding
    row and a second ``lm_head`` pass for its draft logits.
    """

    def size(name: str, shape: tuple[int, ...]) -> float:
        if isinstance(bytes_per_param, Mapping):
            if name not in bytes_per_param:
                raise ValueError(f"no byte count for tensor {name!r} in the per-tensor map")
            return float(bytes_per_param[name])
        return float(np.prod(shape)) * float(bytes_per_param)

    total = 0.0
    experts: dict[str, list[float]] = {}  # layer prefix -> bytes of each routed expert tensor
    sizes: dict[str, float] = {}
    for spec in expected_tensors(cfg, include_mtp=include_mtp):
        b = size(spec.name, spec.shape)
        sizes[spec.name] = b
        match = _EXPERT.match(spec.name)
        if match:
            experts.setdefault(match["layer"], []).append(b)
        elif spec.name == _EMBEDDING:
            total += b / cfg.vocab_size  # one row
        else:
            total += b
    if cfg.tie_word_embeddings:
        total += sizes[_EMBEDDING]  # the lm_head is the embedding matrix, read in full
    lm_head = sizes[_EMBEDDING if cfg.tie_word_embeddings else "lm_head.weight"]
    if include_mtp and cfg.num_nextn_predict_layers:
        n = cfg.num_nextn_predict_layers
        total += n * (sizes[_EMBEDDING] / cfg.vocab_size + lm_head)
    for tensors in experts.values():
        # Each expert has the same tensors, so mean bytes per expert = sum / num_experts.
        total += sum(tensors) / cfg.num_experts * cfg.num_experts_per_tok
    return round(total)


def roofline_tgs(bandwidth_gbs: float, bytes_per_token: float) -> float:
    """Decode tokens per second if every step only streamed its weights at ``bandwidth_gbs``."""
    if not bytes_per_token or bytes_per_token <= 0 or not bandwidth_gbs:
        return float("nan")
    return bandwidth_gbs * 1e9 / bytes_per_token
