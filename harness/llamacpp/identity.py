"""Is this GGUF the checkpoint's, and is this cached file the one we wrote?

Three cheap checks that keep bad input from being blamed on a port:

- :func:`fingerprint`: sha256 over a few sampled tensors' bytes, read straight from the
  safetensors files (header offsets, no tensor is loaded).  Our conversion stores it in the
  GGUF's metadata (``FINGERPRINT_KEY``); a user's ``gguf=`` file is checked against it.
- :func:`check_user_gguf`: a user-given GGUF must be of the checkpoint's architecture, have its
  shape-defining hyperparameters and element counts, and carry its fingerprint; a GGUF made
  elsewhere (no fingerprint) gets a sampled-values check (a few small tensors dequantized with
  the ``gguf`` package against the checkpoint's, tolerant of f16/bf16/q8_0 rounding).
- :func:`file_record` / :func:`record_mismatch`: size + sha256 of the header and sampled blocks
  of a cached GGUF, so a truncated or corrupted-in-place cache entry is found before use.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.errors import InputError
from harness.llamacpp.tensor_maps import PORT_MAP_KEY

FINGERPRINT_KEY = "bailing_parity.fingerprint"
FINGERPRINT_VERSION = "v1"
N_SAMPLED_TENSORS = 8
SAMPLE_BYTES = 1 << 15  # from the start and from the end of each sampled tensor
# GGUF architectures a checkpoint family may legitimately be converted to.
FAMILY_ARCHES: dict[str, tuple[str, ...]] = {
    "ling26": ("bailing_hybrid",),
    "ling3": ("bailingmoe3",),
}
# GGUF key suffixes that fix tensor shapes: a disagreement means another model, not a port bug.
SHAPE_KEYS = (
    "embedding_length",
    "attention.head_count",
    "expert_count",
    "attention.kv_lora_rank",
    "attention.q_lora_rank",
    "leading_dense_block_count",
)
# HF tensor -> GGUF tensor pairs small enough to dequantize and compare (both families).
SAMPLED_VALUES = (
    ("model.norm.weight", "output_norm.weight"),
    ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
    ("model.layers.0.post_attention_layernorm.weight", "blk.0.ffn_norm.weight"),
)
VALUE_RTOL, VALUE_ATOL = 1e-2, 1e-3  # bf16 rounds at 2**-8 relative; norms stay f32 in q8_0
RECORD_WHOLE_FILE_BELOW = 64 << 20  # smaller files are hashed whole
RECORD_HEAD_BYTES = 16 << 20  # a real model's header (tokenizer arrays included) fits
RECORD_BLOCKS, RECORD_BLOCK_SIZE = 256, 1 << 16


# --- checkpoint fingerprint ---------------------------------------------------------------
def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, data start) of a safetensors file."""
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise InputError(f"{path}: unreadable safetensors header ({e})") from None
    return header, 8 + n


def fingerprint(checkpoint: Path | str) -> str:
    """``v1:<sha256>`` over the names, dtypes, shapes and first/last bytes of a few tensors
    spread over the sorted names (tensors config.json ignores are sampled like any other)."""
    from references.checkpoint_io import IGNORED_SUFFIXES, weight_files

    where = weight_files(Path(checkpoint))
    names = sorted(n for n in where if not n.endswith(IGNORED_SUFFIXES))
    if not names:
        raise InputError(f"{checkpoint}: no tensors to fingerprint")
    step = max(1, len(names) // N_SAMPLED_TENSORS)
    sampled = names[::step][:N_SAMPLED_TENSORS]
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    headers: dict[Path, tuple[dict[str, Any], int]] = {}
    for name in sampled:
        path = where[name]
        if path not in headers:
            headers[path] = _safetensors_header(path)
        header, start = headers[path]
        meta = header[name]
        lo, hi = (int(x) for x in meta["data_offsets"])
        h.update(f"{name}\0{meta['dtype']}\0{meta['shape']}\0".encode())
        with path.open("rb") as fh:
            fh.seek(start + lo)
            h.update(fh.read(min(SAMPLE_BYTES, hi - lo)))
            fh.seek(start + max(lo, hi - SAMPLE_BYTES))
            h.update(fh.read(hi - max(lo, hi - SAMPLE_BYTES)))
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()}"


def checkpoint_identity(checkpoint: Path | str) -> str:
    """A cache key for a checkpoint folder that reads a few MB however large the checkpoint is.

    Small files (config, index, tokenizer) are hashed whole; a weight file counts by name, size
    and mtime (any rewrite changes the mtime), and the sampled-tensor :func:`fingerprint` ties the
    key to the bytes as well.  Hashing every byte instead took minutes per load on a 208 GB
    checkpoint.
    """
    root = Path(checkpoint)
    h = hashlib.sha256(b"checkpoint-identity-v1\0")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    for p in files:
        st = p.stat()
        if st.st_size < RECORD_WHOLE_FILE_BELOW and not p.name.endswith(".safetensors"):
            h.update(f"{p.name}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\0".encode())
        else:
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    if any(p.name.endswith(".safetensors") for p in files):
        h.update(fingerprint(root).encode())
    return h.hexdigest()


def metadata_for(checkpoint: Path, port_map: str | None) -> dict[str, str]:
    """The ``bailing_parity.*`` keys our conversion writes into the GGUF."""
    kv = {FINGERPRINT_KEY: fingerprint(checkpoint)}
    if port_map:
        kv[PORT_MAP_KEY] = port_map
    return kv


# --- a user's GGUF against the checkpoint ---------------------------------------------------
def _first(items: list[str], limit: int = 3) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _hparam_mismatches(
    arch: str, meta: Mapping[str, Any], config: Mapping[str, Any], config_keys: Mapping[str, Any]
) -> list[str]:
    out = []
    n_layers = config.get("num_hidden_layers")
    blocks = meta.get(f"{arch}.block_count")
    nextn = int(meta.get(f"{arch}.nextn_predict_layers", 0) or 0)
    if isinstance(n_layers, int) and blocks is not None and int(blocks) - nextn != n_layers:
        out.append(f"{arch}.block_count={blocks} (nextn {nextn}) but num_hidden_layers={n_layers}")
    for suffix in SHAPE_KEYS:
        cfg_key = next((k for k in config_keys.get(suffix, ()) if config.get(k) is not None), None)
        got = meta.get(f"{arch}.{suffix}")
        if cfg_key is None or got is None or isinstance(got, list):
            continue
        if int(got) != int(config[cfg_key]):
            out.append(f"{arch}.{suffix}={got} but config.json has {cfg_key}={config[cfg_key]}")
    return out


def check_architecture(gguf: Path, arch: str, family: Any) -> None:
    """InputError unless ``arch`` is one the checkpoint's family converts to."""
    allowed = FAMILY_ARCHES.get(family.name, ())
    if allowed and arch not in allowed:
        raise InputError(
            f"llamacpp: gguf={gguf} is a {arch or 'no-architecture'!r} GGUF, but the checkpoint "
            f"is {family.name} ({family.architecture}), converted to {' or '.join(allowed)}: "
            "not a GGUF of this checkpoint"
        )


def _sampled_values(gguf: Path, checkpoint: Path) -> tuple[list[str], list[str]]:
    """(names compared, names that differ) for SAMPLED_VALUES present on both sides."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    from references.checkpoint_io import weight_files

    where = weight_files(checkpoint)
    tensors = {t.name: t for t in GGUFReader(str(gguf)).tensors}
    compared, differ = [], []
    for hf, name in SAMPLED_VALUES:
        if hf not in where or name not in tensors:
            continue
        with safe_open(where[hf], framework="pt") as fh:
            want = fh.get_tensor(hf).double().numpy().reshape(-1)
        t = tensors[name]
        got = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
        compared.append(name)
        if got.shape != want.shape or not np.allclose(got, want, rtol=VALUE_RTOL, atol=VALUE_ATOL):
            differ.append(f"{name} vs {hf}")
    return compared, differ


def check_user_gguf(
    gguf: Path,
    checkpoint: Path,
    meta: Mapping[str, Any],
    inventory: Any,
    config: Mapping[str, Any],
    config_keys: Mapping[str, Any],
) -> list[str]:
    """InputError when a user-given GGUF is not the checkpoint's (hyperparameters, element
    counts, fingerprint or sampled values); the findings of checks that could not be made."""
    arch = str(meta.get("general.architecture", ""))
    problems = _hparam_mismatches(arch, meta, config, config_keys)
    problems += [f"element count {m}" for m in inventory.count_mismatches]
    if problems:
        raise InputError(
            f"llamacpp: gguf={gguf} does not match the checkpoint {checkpoint}: "
            f"{_first(problems)}; pass the GGUF of this checkpoint (or leave gguf= out to convert)"
        )
    stored = meta.get(FINGERPRINT_KEY)
    if stored is not None:
        if str(stored) != fingerprint(checkpoint):
            raise InputError(
                f"llamacpp: gguf={gguf} was converted from other weights than {checkpoint} (its "
                f"{FINGERPRINT_KEY} differs from the checkpoint's): pass the GGUF of this "
                "checkpoint (or leave gguf= out to convert)"
            )
        return []
    compared, differ = _sampled_values(gguf, checkpoint)
    if differ:
        raise InputError(
            f"llamacpp: gguf={gguf} holds other weights than {checkpoint}: sampled tensor values "
            f"differ ({_first(differ)}): pass the GGUF of this checkpoint"
        )
    if not compared:
        return [f"GGUF {gguf.name}: identity with the checkpoint not verified (no "
                f"{FINGERPRINT_KEY} and none of the sampled tensors present)"]
    return [f"GGUF {gguf.name}: made elsewhere (no {FINGERPRINT_KEY}); sampled tensors "
            f"{', '.join(compared)} agree with the checkpoint"]


# --- cached files: size + digest of header and sampled blocks ------------------------------
def file_record(path: Path) -> dict[str, Any]:
    """Size and sha256 of the file (whole below RECORD_WHOLE_FILE_BELOW, else its first
    RECORD_HEAD_BYTES and RECORD_BLOCKS blocks spread evenly up to the end)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as fh:
        if size < RECORD_WHOLE_FILE_BELOW:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        else:
            h.update(fh.read(RECORD_HEAD_BYTES))  # the GGUF header: metadata and tensor infos
            span = size - RECORD_BLOCK_SIZE
            for i in range(RECORD_BLOCKS + 1):
                fh.seek(span * i // RECORD_BLOCKS)
                h.update(fh.read(RECORD_BLOCK_SIZE))
    return {"file": path.name, "size": size, "sha256": h.hexdigest()}


def record_mismatch(path: Path, record: Mapping[str, Any]) -> str | None:
    """Why ``path`` no longer matches ``record`` (None when it does)."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != record.get("size"):
        return f"{path.name} is {size} bytes, recorded {record.get('size')} (truncated or replaced)"
    if file_record(path)["sha256"] != record.get("sha256"):
        return f"{path.name} has other bytes than recorded at conversion (corrupted in place)"
    return None
