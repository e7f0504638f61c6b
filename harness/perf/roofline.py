"""Decode roofline: how fast one-token decode could go if it only had to stream the weights.

Single-token decode of a MoE model is memory-bound: every step reads the weights it uses once.
So ``roofline tok/s = bandwidth / weight bytes read per token``, and ``S_TG / roofline`` says how
close a backend gets.  What one token reads (:func:`weight_bytes_per_token`): one embedding row,
every attention and norm weight, the dense FFNs, the shared experts and the router in full, only
``num_experts_per_tok`` routed experts per MoE layer, and the whole ``lm_head``.  KV-cache and GLA
state reads are not counted, so the roofline is an upper bound that ignores context length.

A quantized candidate is judged against its own limit: :func:`gguf_bytes_per_token` and
:func:`mlx_bytes_per_token` count the bytes its files really hold (a GGUF tensor's ``n_bytes``;
an MLX array's weight + scales + biases), by the same rule: a stacked routed-expert tensor
counts ``k / E`` of its bytes, the embedding one row, everything else (``lm_head`` included) in
full.  MTP blocks are left out (decode throughput is the trunk's).

Bandwidth convention (:func:`measure_bandwidth_gbs`): a numpy copy counts the bytes read **plus**
the bytes written (STREAM's "Copy" convention), in decimal GB/s (1e9 bytes).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from harness.core.errors import InputError
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


# ---------------------------------------------------------------------------------------------
# Bytes of the files a quantized candidate really runs

_GGUF_BLOCK = re.compile(r"^blk\.(?P<il>\d+)\.")
_GGUF_EXPERTS = re.compile(r"^blk\.\d+\.ffn_[a-z_]+_exps\.")  # stacked [.., .., E] (ne order)
_GGUF_EMBEDDING, _GGUF_OUTPUT = "token_embd.weight", "output.weight"
_MLX_LAYER = re.compile(r"^model\.layers\.(?P<il>\d+)\.")
_MLX_EXPERTS = re.compile(r"^model\.layers\.\d+\.mlp\.switch_mlp\.")  # stacked [E, ...]
_MLX_EMBEDDING, _MLX_LM_HEAD = "model.word_embeddings.", "lm_head."
# Bytes per element of the safetensors dtypes an MLX directory holds (packed U32 included).
_ST_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def active_bytes(
    tensors: Iterable[tuple[str, int, int]],
    *,
    is_expert: re.Pattern[str],
    embedding: str,
    lm_head: str,
    experts_per_token: int,
) -> int:
    """Bytes one decode step reads from ``(name, bytes, rows)`` tensors: for a stacked expert
    tensor ``rows`` is its expert count E and it counts ``bytes * k / E``; for an embedding
    tensor (name starting ``embedding``) ``rows`` is the vocabulary and it counts one row, plus
    all of it when no tensor starts with ``lm_head`` (tied: the logits read the whole matrix)."""
    total, embedding_bytes, tied = 0.0, 0.0, True
    for name, nbytes, rows in tensors:
        if is_expert.match(name):
            total += nbytes * experts_per_token / rows
        elif name.startswith(embedding):
            total += nbytes / rows
            embedding_bytes += nbytes
        else:
            tied = tied and not name.startswith(lm_head)
            total += nbytes
    return round(total + (embedding_bytes if tied else 0.0))


def _gguf_int(fields: Mapping[str, object], key: str, path: Path) -> int:
    field = fields.get(key)
    if field is None:
        raise InputError(f"{path}: GGUF key {key} is missing; the roofline needs it")
    return int(field.contents())  # type: ignore[attr-defined]


def gguf_bytes_per_token(path: Path | str) -> int:
    """Weight bytes one decode step reads from a GGUF: each tensor's on-disk ``n_bytes`` (its
    quantized blocks), stacked experts ``k / E`` (``expert_used_count`` of the tensor's last
    dimension), ``token_embd`` one row, the last ``nextn_predict_layers`` blocks (MTP) left out."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # truncated, or not a GGUF at all
        raise InputError(f"{path}: not a readable GGUF ({type(e).__name__}: {e})") from None
    fields = reader.fields
    if "general.architecture" not in fields:
        raise InputError(f"{path}: GGUF key general.architecture is missing")
    arch = str(fields["general.architecture"].contents())
    blocks = _gguf_int(fields, f"{arch}.block_count", path)
    nextn = int(fields[k].contents()) if (k := f"{arch}.nextn_predict_layers") in fields else 0
    tensors = {t.name: t for t in reader.tensors}
    if _GGUF_EMBEDDING not in tensors:
        raise InputError(f"{path}: no tensor {_GGUF_EMBEDDING}; the roofline needs the embedding")
    has_experts = any(_GGUF_EXPERTS.match(n) for n in tensors)
    k = _gguf_int(fields, f"{arch}.expert_used_count", path) if has_experts else 0
    rows = []
    for name, t in tensors.items():
        block = _GGUF_BLOCK.match(name)
        if block and int(block["il"]) >= blocks - nextn:
            continue  # an MTP block
        last = int(t.shape[-1]) if len(t.shape) else 1  # ne: experts / vocab are outermost
        rows.append((name, int(t.n_bytes), last))
    return active_bytes(rows, is_expert=_GGUF_EXPERTS, embedding=_GGUF_EMBEDDING,
                        lm_head=_GGUF_OUTPUT, experts_per_token=k)


def mlx_bytes_per_token(model_dir: Path | str) -> int:
    """Weight bytes one decode step reads from an MLX model directory (mlx-lm's layout):
    every array's bytes from the safetensors headers (packed weights, scales and biases alike),
    ``switch_mlp`` experts ``num_experts_per_tok / E``, the word embeddings one row, layers at or
    beyond ``num_hidden_layers`` (MTP) left out."""
    from harness.quant.mlx_quantize import read_config
    from references.checkpoint_io import weight_files
    from references.weights import header_inventory

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    try:
        layers, k = int(config["num_hidden_layers"]), int(config.get("num_experts_per_tok", 0))
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{model_dir / 'config.json'}: needs integer num_hidden_layers and "
                         "num_experts_per_tok for the roofline") from None
    where = weight_files(model_dir)
    shapes, dtypes = header_inventory(where)
    rows = []
    for name in sorted(where):
        layer = _MLX_LAYER.match(name)
        if layer and int(layer["il"]) >= layers:
            continue  # an MTP layer
        if dtypes[name] not in _ST_ITEMSIZE:
            raise InputError(f"{where[name]}: tensor {name} has dtype {dtypes[name]}, expected "
                             f"one of {', '.join(_ST_ITEMSIZE)}")
        shape = shapes[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * _ST_ITEMSIZE[dtypes[name]]
        rows.append((name, nbytes, int(shape[0]) if shape else 1))
    return active_bytes(rows, is_expert=_MLX_EXPERTS, embedding=_MLX_EMBEDDING,
                        lm_head=_MLX_LM_HEAD, experts_per_token=k)
