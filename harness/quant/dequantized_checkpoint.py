"""A port's own weights written back as a checkpoint folder, for a reference that reads only
checkpoints.

Ling 3.0's reference is transformers' ``BailingHybridForCausalLM``; it loads safetensors through
its own conversion mapping and reads no GGUF.  To run it on a quantized port's weights (the
*dequantized reference*, :mod:`harness.checks.quantized`), every tensor of the original
checkpoint is read back from the port's file (:class:`harness.quant.gguf_weights.GgufWeights`:
dequantized exactly, the converter's rearrangements undone) and written under its checkpoint
name, in float32 -- every GGUF type dequantizes to float32, so nothing is rounded on the way.
The other files (config.json, tokenizer, generation config) are copied, so transformers loads the
folder exactly as it loads the checkpoint.

One tensor is held at a time and shards are flushed at :data:`SHARD_BYTES`, so the folder is
written at real scale in bounded memory.  It is cached by the port file's content and the
checkpoint's path (a re-quantized file gets a new folder) and written atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from harness.core import cache
from harness.core.atomic import locked, staged_dir
from harness.core.errors import InputError

SHARD_BYTES = 2 << 30
VERSION = "dequantized-checkpoint-v1"
INDEX = "model.safetensors.index.json"


class Readable(Protocol):
    """What the writer needs of a weight source (GgufWeights, MlxWeights)."""

    def has(self, name: str) -> bool: ...

    def get(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor: ...


def content_key(port_file: Path, checkpoint: Path) -> str:
    """The port file's size, mtime and first and last MiB, and the checkpoint's path."""
    return cache.file_key(port_file, VERSION, str(checkpoint.resolve()))


def cache_dir() -> Path:
    return cache.root() / "dequantized"


def dequantized_checkpoint(weights: Readable, checkpoint: Path, port_file: Path) -> Path:
    """The folder of ``checkpoint``'s tensors as ``weights`` holds them (built once, cached).

    Every tensor the checkpoint has must be in ``weights``: an InputError names the ones that
    are not, and which file was read."""
    from references.checkpoint_io import weight_files

    checkpoint = Path(checkpoint)
    names = weight_files(checkpoint)
    missing = [n for n in names if not weights.has(n)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise InputError(f"{port_file}: holds no tensor for {', '.join(missing[:3])}{more} of "
                         f"{checkpoint}: cannot run the reference on this port's weights")
    final = cache_dir() / f"{checkpoint.name}-{content_key(port_file, checkpoint)}"
    with locked(final.with_suffix(".lock")):
        if (final / INDEX).is_file():
            return final
        with staged_dir(final, replace=True) as tmp:
            _copy_side_files(checkpoint, tmp)
            _write_shards(weights, sorted(names, key=lambda n: (str(names[n]), n)), tmp)
            (tmp / "SOURCE").write_text(f"{port_file.resolve()}\n{checkpoint.resolve()}\n")
    return final


def _copy_side_files(checkpoint: Path, out: Path) -> None:
    """Everything but the weights and their index: config, tokenizer, generation config."""
    for p in sorted(checkpoint.iterdir()):
        if p.is_file() and p.suffix != ".safetensors" and p.name != INDEX:
            shutil.copy2(p, out / p.name)


def _write_shards(weights: Readable, names: list[str], out: Path) -> None:
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    files: list[list[str]] = []
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            files.append(list(shard))
            save_file(shard, str(out / f"part-{len(files):05d}.safetensors"))
        shard, size = {}, 0

    for name in names:
        t = weights.get(name, torch.float32, torch.device("cpu")).contiguous()
        if size and size + t.numel() * 4 > SHARD_BYTES:
            flush()
        shard[name] = t
        size += t.numel() * 4
    flush()
    n = len(files)
    weight_map: dict[str, Any] = {}
    for i, keys in enumerate(files, start=1):
        final_name = f"model-{i:05d}-of-{n:05d}.safetensors"
        (out / f"part-{i:05d}.safetensors").rename(out / final_name)
        weight_map.update(dict.fromkeys(keys, final_name))
    (out / INDEX).write_text(json.dumps({"metadata": {"source": VERSION},
                                         "weight_map": weight_map}, indent=1))
