"""Quantize a checkpoint with mlx-lm's own code path; read an MLX model directory's quantization.

A quantized MLX port is judged against the weights it actually runs, so the quantization must be
mlx-lm's: the steps of ``mlx_lm convert -q`` (load through the port's module and ``sanitize``,
cast to the config's ``torch_dtype`` as convert does, ``mlx_lm.utils.quantize_model`` with the
module's own ``quant_predicate``, ``save_model`` + ``save_config``), with the port module the
candidate runs (``model_module=`` or mlx-lm's).  convert itself is not called because it insists
on a tokenizer, which synthetic checkpoints lack; the tokenizer files are copied instead.

Results are cached under ``cache.root() / "mlx-quant"`` by a content key (:func:`cache_key`: the
checkpoint's identity, bits, group, the mlx / mlx-lm versions and the port module's bytes),
written atomically and built under a lock, so two pytest-xdist workers quantize once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core import cache
from harness.core.atomic import locked, staged_dir
from harness.core.errors import InputError, PortFailure

BITS = (2, 3, 4, 5, 6, 8)  # what mlx's affine quantization packs
GROUPS = (32, 64, 128)
DEFAULT_GROUP = 64  # mlx-lm's default for affine
_CONVERSION_DTYPES = ("float16", "bfloat16", "float32")  # mlx_lm.convert.MODEL_CONVERSION_DTYPES
_NOT_COPIED = ("config.json", "model.safetensors.index.json")
_COPY_BELOW = 64 << 20  # tokenizer, chat template, generation config: small files only
RECORD = "bailing_parity.quantization.json"  # what made a cached directory
NORMS = ("model.norm.weight", "model.layers.0.input_layernorm.weight",
         "model.layers.0.post_attention_layernorm.weight")  # compared by check_same_weights


@dataclass(frozen=True)
class MlxQuant:
    """An MLX directory's quantization, as its config.json's ``quantization`` states it."""

    bits: int
    group: int
    mode: str = "affine"

    @property
    def tag(self) -> str:
        """``q4g64`` (affine), else the mode and its group (``mxfp4g32``): labels use it."""
        if self.mode == "affine":
            return f"q{self.bits}g{self.group}"
        return f"{self.mode}g{self.group}"


def bits_group_problem(bits: int | None, group: int | None) -> str | None:
    """What is wrong with ``bits``/``group`` (naming the key and the allowed values), or None."""
    if bits is not None and bits not in BITS:
        return f"option bits={bits}: expected one of {', '.join(map(str, BITS))}"
    if group is not None and group not in GROUPS:
        return f"option group={group}: expected one of {', '.join(map(str, GROUPS))}"
    if group is not None and bits is None:
        return (f"option group={group} needs bits= ({', '.join(map(str, BITS))}): group alone "
                "quantizes nothing")
    return None


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of an MLX (or HF) model directory; InputError naming the file otherwise."""
    from references.config import read_config_json

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: not found (an MLX model directory holds config.json and "
                         "model*.safetensors)")
    return read_config_json(path)


def dir_quantization(model_dir: Path) -> MlxQuant | None:
    """The directory's top-level quantization (None: unquantized); per-layer overrides, such as
    mlx-lm's 8-bit router, are the dequantizer's business, not the label's."""
    path = Path(model_dir) / "config.json"
    q = read_config(model_dir).get("quantization")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise InputError(f"{path}: quantization must be an object, got {q!r}")
    try:
        return MlxQuant(int(q["bits"]), int(q["group_size"]), str(q.get("mode", "affine")))
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path}: quantization needs integer bits and group_size, got "
                         f"{q!r}") from None


def check_same_weights(model_dir: Path, checkpoint: Path) -> bool:
    """A directory made from other weights is refused: the norms (never quantized; convert only
    casts them to the config's dtype) must be the checkpoint's, cast alike, bit for bit.  True
    when they were not even cast (convert casts every float tensor alike)."""
    import torch
    from safetensors import safe_open

    from references.checkpoint_io import weight_files

    mine = {k: v for f in sorted(Path(model_dir).glob("model*.safetensors"))
            for k, v in _keys(f).items()}
    theirs = weight_files(checkpoint)
    names = [n for n in NORMS if n in mine and n in theirs]
    uncast = bool(names)
    for name in names:
        with safe_open(mine[name], framework="pt") as a, safe_open(theirs[name], "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        if x.shape != y.shape or not torch.equal(x, y.to(x.dtype)):
            raise InputError(f"mlx: model_dir={model_dir}: {name} is not {checkpoint}'s (nor its "
                             f"cast to {x.dtype}): the directory holds other weights")
        uncast = uncast and x.dtype == y.dtype
    return uncast


def _keys(path: Path) -> dict[str, Path]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            return dict.fromkeys(fh.keys(), path)
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: unreadable safetensors file ({e})") from None


@functools.lru_cache(maxsize=64)
def _tag(path: str, size: int, mtime_ns: int) -> str | None:
    try:
        q = dir_quantization(Path(path))
    except InputError:
        return None
    return q.tag if q else None


def dir_tag(model_dir: Path) -> str | None:
    """``q4g64`` for a quantized MLX directory (its config.json read once per version); None for
    an unquantized, missing or unreadable one (loading it says why)."""
    config = Path(model_dir).expanduser() / "config.json"
    try:
        st = config.stat()
    except OSError:
        return None
    return _tag(str(config.parent.resolve()), st.st_size, st.st_mtime_ns)


def options_tag(settings: Any) -> str | None:
    """The quantization an mlx target's options run (``q4g64`` for ``bits=4``, the directory's
    for ``model_dir=``), None for none: what its label is named by."""
    bits, model_dir = getattr(settings, "bits", None), getattr(settings, "model_dir", None)
    if bits is not None:
        return MlxQuant(bits, getattr(settings, "group", None) or DEFAULT_GROUP).tag
    return dir_tag(model_dir) if isinstance(model_dir, Path) else None


def cache_dir() -> Path:
    """Where quantized MLX model directories are kept (outside the repo)."""
    return cache.root() / "mlx-quant"


def cache_key(checkpoint: Path, bits: int, group: int, port_path: Path | None) -> str:
    """Content key: the checkpoint's identity, bits, group, mlx and mlx-lm versions and the
    port module's bytes (its ``sanitize`` and ``quant_predicate`` decide the weights)."""
    from importlib.metadata import version

    from harness.llamacpp.identity import checkpoint_identity

    h = hashlib.sha256(b"mlx-quant-v1\0")
    h.update(checkpoint_identity(checkpoint).encode())
    h.update(f"\0{bits}\0{group}\0{version('mlx')}\0{version('mlx-lm')}\0".encode())
    if port_path is not None:
        try:
            h.update(Path(port_path).expanduser().read_bytes())
        except OSError as e:
            raise InputError(f"{port_path}: model_module cannot be read ({e})") from None
    return h.hexdigest()[:20]


def quantize_checkpoint(
    checkpoint: Path,
    bits: int,
    group: int,
    *,
    port_path: Path | None,
    stock_module: str,
    stock_name: str,
) -> Path:
    """``checkpoint`` quantized by mlx-lm to ``bits``/``group``, saved once as an MLX model
    directory (cached); returns it.  A port whose loading or quantization fails: PortFailure."""
    if problem := bits_group_problem(bits, group):
        raise InputError(f"mlx: {problem}")
    checkpoint = Path(checkpoint).expanduser().resolve()
    key = cache_key(checkpoint, bits, group, port_path)
    out = cache_dir() / f"{checkpoint.name}-q{bits}g{group}-{key}"
    if (out / "config.json").is_file():
        return out
    with locked(out.with_name(f".{out.name}.lock")):
        if (out / "config.json").is_file():  # another process quantized it while we waited
            return out
        with staged_dir(out, replace=True) as tmp:
            said = convert(checkpoint, tmp, bits, group, port_path=port_path,
                           stock_module=stock_module, stock_name=stock_name)
            record = {"checkpoint": str(checkpoint), "bits": bits, "group": group,
                      "model_module": str(port_path) if port_path else None, "mlx_lm": said}
            (tmp / RECORD).write_text(json.dumps(record, indent=1))
    return out


def conversion_note(model_dir: Path) -> str | None:
    """What mlx-lm said when it quantized a cached directory (its bits per weight), if known."""
    try:
        return str(json.loads((Path(model_dir) / RECORD).read_text())["mlx_lm"]) or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def convert(
    checkpoint: Path,
    out: Path,
    bits: int | None,
    group: int,
    *,
    port_path: Path | None,
    stock_module: str,
    stock_name: str,
) -> str:
    """``mlx_lm convert -q``'s steps into ``out`` (an empty folder; ``bits`` None: convert
    without ``-q``); returns mlx-lm's report line (bits per weight)."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import quantize_model, save_config, save_model

    from harness.backends.mlx_model import load_port_model

    model, config, _ = load_port_model(checkpoint, port_path, stock_module, stock_name, lazy=True)
    dtype = config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    if dtype in _CONVERSION_DTYPES:  # as convert does: the checkpoint's dtype, cast_predicate kept
        keep = getattr(model, "cast_predicate", lambda _: True)
        target = getattr(mx, dtype)

        def cast(path: str, v: Any) -> Any:
            return v.astype(target) if keep(path) and mx.issubdtype(v.dtype, mx.floating) else v

        model.update(tree_map_with_path(cast, model.parameters()))
    said = io.StringIO()
    doing = (f"mlx-lm quantizing {checkpoint} to {bits} bits, group {group}" if bits
             else f"mlx-lm converting {checkpoint}")
    try:
        with contextlib.redirect_stdout(said):  # mlx-lm prints its bits-per-weight line
            if bits is not None:
                model, config = quantize_model(model, config, group, bits)
            save_model(out, model, donate_model=True)
    except Exception as e:
        raise PortFailure(f"{doing}{f' with {port_path}' if port_path else ''}: "
                          f"{type(e).__name__}: {e}") from e
    save_config(config, out / "config.json")
    for p in checkpoint.iterdir():
        small = p.is_file() and p.stat().st_size < _COPY_BELOW
        if small and not p.name.endswith(".safetensors") and p.name not in _NOT_COPIED:
            shutil.copy2(p, out / p.name)
    return said.getvalue().strip()


__all__ = [
    "BITS",
    "DEFAULT_GROUP",
    "GROUPS",
    "MlxQuant",
    "bits_group_problem",
    "cache_dir",
    "check_same_weights",
    "conversion_note",
    "dir_quantization",
    "dir_tag",
    "options_tag",
    "quantize_checkpoint",
    "read_config",
]
