"""Deterministic synthetic Ling-2.6 checkpoints in the upstream HF layout, for parity cases.

Per-tensor seeds come from the case seed and the tensor's name (as llama.cpp's test-llama-archs
does), so adding a tensor never changes the others.  Norm weights and biases are never trivial,
so a port that drops one is caught.

Optional weight shaping (off by default; without it the bytes are those of the plain writer): a
case may put knobs under the private config key ``_synthetic``, which the writer strips before it
writes config.json.  They shape random weights into a model whose behaviour is meaningful where
pure noise is not; ``cases/mtp-agree.toml`` uses them so that the MTP head's drafts agree with the
trunk's next token often but not always:

* ``residual_scale`` (float, 1.0): multiplies every residual-branch output projection (attention
  ``dense``, dense-MLP, expert and shared-expert ``down_proj``) in the trunk layers, so the
  residual stream stays near the token's embedding: "next token = f(current token)".
* ``mtp_residual_scale`` (float, ``residual_scale``): the same for the MTP layer's block.
* ``mtp_eh_identity`` (bool, false): the MTP ``eh_proj`` acts on ``[enorm(embedding) ;
  hnorm(hidden)]`` as ``[I | mtp_eh_hidden_scale * W]`` (W the usual random init of the hidden
  half): the head passes the next token's embedding through and the trunk hidden perturbs it.
  Then the trunk at t+1 and the head at t both approximate lm_head(norm(embed(token t+1))).
* ``mtp_eh_hidden_scale`` (float, 1.0): the hidden half's scale under ``mtp_eh_identity``.

Norm weights and biases keep their non-trivial init under every knob.

Two more ``_synthetic`` keys choose how the checkpoint is stored, not its values:

* ``dtype`` ("float32" or "bfloat16"): bfloat16 is written directly (each value rounded once from
  float64) by a streaming writer that generates every tensor in row blocks, so even a
  Ling-2.6-flash-width checkpoint (a 157184 x 4096 embedding) is written in bounded memory;
* ``shard_bytes`` (int, 2e9 with bfloat16): the trunk is cut into ``model-0000i-of-0000N``
  shards of at most that size, the MTP layer goes to ``model-mtp-layer.safetensors`` and the
  index lists both, as upstream ships Ling-2.6-flash.

Every checkpoint ships the harness's tiny tokenizer of the config's vocabulary, with a chat
template (:func:`references.tokenizer.write_checkpoint_tokenizer`; 0.3 s at Ling-2.6-flash's
157184 tokens), so text prompts take a real checkpoint's path.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from harness.core.errors import InputError
from references.checkpoint_spec import Init, TensorSpec, expected_tensors
from references.config import config_from_dict
from references.tokenizer import write_checkpoint_tokenizer

TRUNK_SHARD_TENSORS = 400  # trunk tensors per shard; small models still get 2 shards and an index
SHAPING_KEY = "_synthetic"  # config key holding the shaping knobs; never written to config.json
RESIDUAL_OUTPUTS = (".attention.dense.weight", ".down_proj.weight")
WRITER_KNOBS = ("dtype", "shard_bytes")  # storage choices under SHAPING_KEY, not shaping
DEFAULT_SHARD_BYTES = 2_000_000_000
ROW_BLOCK_ELEMENTS = 16 * 2**20  # values generated at once by the streaming writer (128 MB f64)
_ST_NAMES = {"float32": ("F32", torch.float32), "bfloat16": ("BF16", torch.bfloat16)}


@dataclass(frozen=True)
class Shaping:
    """Weight-shaping knobs; the defaults leave the random init untouched."""

    residual_scale: float = 1.0
    mtp_residual_scale: float | None = None  # the MTP layers' (None: residual_scale)
    mtp_eh_identity: bool = False
    mtp_eh_hidden_scale: float = 1.0

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, where: str = SHAPING_KEY) -> Shaping:
        raw = dict(raw or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise InputError(f"{where}: unknown shaping knob(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if known[key].type == "bool":
                if not isinstance(value, bool):
                    raise InputError(f"{where}.{key} must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise InputError(f"{where}.{key} must be a positive number, got {value!r}")
            values[key] = value
        return cls(**values)

    def apply(self, spec: TensorSpec, values: np.ndarray) -> np.ndarray:
        """Shape one generated tensor (float64, before the cast to float32)."""
        return self.apply_named(spec.name, spec.mtp, values)

    def apply_named(
        self,
        name: str,
        mtp: bool,
        values: np.ndarray,
        residual_outputs: tuple[str, ...] = RESIDUAL_OUTPUTS,
    ) -> np.ndarray:
        """Shape the tensor ``name`` (``residual_outputs``: the name endings of the residual
        branches' output projections in the writer's naming)."""
        scale = self.residual_scale
        if mtp and self.mtp_residual_scale is not None:
            scale = self.mtp_residual_scale
        if scale != 1.0 and name.endswith(residual_outputs):
            values = values * scale
        if self.mtp_eh_identity and name.endswith(".eh_proj.weight"):
            h = values.shape[0]  # columns [embedding | hidden]
            values = np.concatenate([np.eye(h), self.mtp_eh_hidden_scale * values[:, h:]], -1)
        return values


def _initialised(spec: TensorSpec, normal: np.ndarray) -> np.ndarray:
    """Standard normal draws scaled as the tensor's :class:`Init` says."""
    if spec.init is Init.LINEAR:
        return normal / np.sqrt(spec.shape[-1])
    if spec.init is Init.EMBED:
        return normal
    if spec.init is Init.NORM:
        return 1.0 + 0.1 * normal
    return 0.1 * normal  # Init.BIAS


def generate_tensor(spec: TensorSpec, seed: int, shaping: Shaping | None = None) -> np.ndarray:
    """A deterministic random tensor: seeded by the case seed and the tensor's name."""
    name_seed = int.from_bytes(hashlib.sha256(spec.name.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, name_seed])
    values = _initialised(spec, rng.standard_normal(spec.shape))
    if shaping is not None:
        values = shaping.apply(spec, values)
    return values.astype(np.float32)


def generate_rows(
    spec: TensorSpec, seed: int, shaping: Shaping | None = None, block: int = ROW_BLOCK_ELEMENTS
) -> Iterator[np.ndarray]:
    """:func:`generate_tensor`'s values as float64 row blocks of about ``block`` elements, in
    order: the same random stream, drawn in pieces."""
    name_seed = int.from_bytes(hashlib.sha256(spec.name.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, name_seed])
    rows, width = (spec.shape[0], int(np.prod(spec.shape[1:]))) if spec.shape else (1, 1)
    step = max(1, block // max(1, width))
    eh_identity = shaping is not None and shaping.mtp_eh_identity
    if eh_identity and spec.name.endswith(".eh_proj.weight"):
        step = rows  # the identity block needs the whole eh_proj (4096 x 8192 at flash widths)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        values = _initialised(spec, rng.standard_normal((n, *spec.shape[1:]) if spec.shape else ()))
        if shaping is not None:
            values = shaping.apply(spec, values)
        yield values


def write_safetensors_streamed(
    path: Path, specs: list[TensorSpec], seed: int, shaping: Shaping, dtype: str
) -> int:
    """Write one safetensors file tensor by tensor, row block by row block (never a whole tensor
    in memory); returns the bytes of tensor data written."""
    st_name, torch_dtype = _ST_NAMES[dtype]
    item = torch.empty((), dtype=torch_dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        n = int(np.prod(spec.shape)) * item
        header[spec.name] = {"dtype": st_name, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for spec in specs:
            for values in generate_rows(spec, seed, shaping):
                fh.write(torch.from_numpy(values).to(torch_dtype).view(torch.uint8).numpy()
                         .tobytes())
    return offset


def _storage_knobs(knobs: dict[str, Any], where: str) -> tuple[str, int]:
    dtype = knobs.pop("dtype", "float32")
    if dtype not in _ST_NAMES:
        raise InputError(f"{where}.dtype must be one of {sorted(_ST_NAMES)}, got {dtype!r}")
    shard = knobs.pop("shard_bytes", DEFAULT_SHARD_BYTES)
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 1:
        raise InputError(f"{where}.shard_bytes must be a positive integer, got {shard!r}")
    return dtype, shard


def write_synthetic_checkpoint(
    cfg_json: dict[str, Any],
    seed: int,
    out_dir: Path,
    shaping: dict[str, Any] | None = None,
) -> None:
    """Write config.json, sharded trunk safetensors, the MTP file, the index and the tokenizer
    into ``out_dir``.

    Shaping knobs come from ``cfg_json[SHAPING_KEY]`` (a case's ``[config]`` table), overridden
    by ``shaping``; the key is stripped from the config.json written.  With ``dtype`` or
    ``shard_bytes`` among them the streaming writer (:func:`write_sharded_checkpoint`) is used.
    """
    knobs = {**(cfg_json.get(SHAPING_KEY) or {}), **(shaping or {})}
    cfg_json = {k: v for k, v in cfg_json.items() if k != SHAPING_KEY}
    where = f"{out_dir / 'config.json'}: {SHAPING_KEY}"
    streamed = any(k in knobs for k in WRITER_KNOBS)
    dtype, shard_bytes = _storage_knobs(knobs, where)
    shape = Shaping.from_dict(knobs, where)
    cfg = config_from_dict(cfg_json, out_dir / "config.json")
    specs = expected_tensors(cfg)
    write_checkpoint_tokenizer(out_dir, cfg.vocab_size)
    if streamed:
        write_sharded_checkpoint(cfg_json, specs, seed, out_dir, shape, dtype, shard_bytes)
        return
    trunk = [s for s in specs if not s.mtp]
    mtp = [s for s in specs if s.mtp]
    shards = [trunk[i : i + TRUNK_SHARD_TENSORS] for i in range(0, len(trunk), TRUNK_SHARD_TENSORS)]
    if len(shards) == 1 and len(trunk) > 1:  # always exercise the index with >= 2 shards
        half = len(trunk) // 2
        shards = [trunk[:half], trunk[half:]]
    files = [
        (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", s) for i, s in enumerate(shards)
    ]
    if mtp:
        files.append(("model-mtp-layer.safetensors", mtp))
    weight_map: dict[str, str] = {}
    total = 0
    for fname, group in files:
        tensors = {s.name: generate_tensor(s, seed, shape) for s in group}
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({s.name: fname for s in group})
        total += sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(cfg_json, indent=2))


def write_sharded_checkpoint(
    cfg_json: dict[str, Any],
    specs: list[TensorSpec],
    seed: int,
    out_dir: Path,
    shaping: Shaping,
    dtype: str,
    shard_bytes: int,
) -> None:
    """The upstream layout: trunk shards of at most ``shard_bytes`` (a tensor never split), the
    MTP layer in ``model-mtp-layer.safetensors``, an index naming both, then config.json."""
    item = torch.empty((), dtype=_ST_NAMES[dtype][1]).element_size()
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in (s for s in specs if not s.mtp):
        n = int(np.prod(spec.shape)) * item
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    files = [
        (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", s) for i, s in enumerate(shards)
    ]
    mtp = [s for s in specs if s.mtp]
    if mtp:
        files.append(("model-mtp-layer.safetensors", mtp))
    weight_map: dict[str, str] = {}
    total = 0
    for fname, group in files:
        total += write_safetensors_streamed(out_dir / fname, group, seed, shaping, dtype)
        weight_map.update({s.name: fname for s in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(cfg_json, indent=2))
