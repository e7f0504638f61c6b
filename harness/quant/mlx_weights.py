"""An MLX model directory read back as the reference's weights, under the checkpoint's HF names.

To tell a quantized MLX port's own error from the error its weights carry, the float64 reference
runs on the very weights the port runs: each :meth:`MlxWeights.get` reads the directory's tensor
(mlx-lm's ``save_model`` output, quantized or not), dequantizes a quantized one with
``mx.dequantize`` in float32 (what the float32 candidate's quantized matmul computes: scales and
biases are cast to float32 at load, then ``scale * q + bias``), and undoes mlx-lm's ``sanitize``
(``mlx_lm/models/bailing_hybrid.py``):

- ``mlp.switch_mlp.{gate,up,down}_proj`` ``[E, out, in]`` -> expert ``E``'s
  ``mlp.experts.{E}.*`` (sanitize stacked them);
- ``mlp.gate.gate_proj.weight`` -> ``mlp.gate.weight``;
- MLA ``embed_q`` ``[H, kv_lora, nope]`` and ``unembed_out`` ``[H, v, kv_lora]`` ->
  ``kv_b_proj`` ``[H*(nope+v), kv_lora]`` (sanitize split it per head, ``embed_q`` transposed);
- every other name is the checkpoint's.

A Ling 3.0 checkpoint's directory is ``bailing_moe_v3``'s (``mlx_lm/models/bailing_moe_v3.py``,
dispatched on the checkpoint's family): the same expert stacking and MLA split (its router
``mlp.gate.weight`` keeps its name), plus

- ``*_conv1d.weight`` ``[C, K, 1]`` -> ``[C, 1, K]`` (sanitize moved the kernel axis for
  ``nn.Conv1d``);
- with ``tie_word_embeddings``, ``lm_head.weight`` -> ``model.word_embeddings.weight`` (sanitize
  dropped the head; the port multiplies by the embeddings);

and every tensor of the checkpoint's safetensors is expected, with the shape its header gives.

mlx-lm drops the MTP layers (``model.layers.{n >= num_hidden_layers}``); those tensors are read
from the checkpoint's safetensors unchanged, and :attr:`MlxWeights.findings` says so.  Nothing is
cached: one tensor (or row range) is read per call through a fresh ``safe_open``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from harness.core.errors import InputError
from harness.quant.mlx_quantize import dir_quantization, read_config
from harness.quant.tensors import finite_tensor

_SWITCH = re.compile(r"^(model\.layers\.\d+\.mlp)\.switch_mlp\.(\w+)\.(weight|bias)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
EMBED_Q, UNEMBED_OUT = "attention.embed_q.weight", "attention.unembed_out.weight"
CONV1D = "_conv1d.weight"  # bailing_moe_v3's KDA short convolutions
LM_HEAD, EMBEDDINGS = "lm_head.weight", "model.word_embeddings.weight"


@dataclass(frozen=True)
class Stored:
    """One stored tensor of the MLX directory (quantized: its packed weight)."""

    file: Path
    shape: tuple[int, ...]  # the shape of the dequantized tensor
    quant: tuple[int, int, str] | None = None  # (group, bits, mode) when quantized


@dataclass(frozen=True)
class Plan:
    """How one HF tensor comes out of the directory (or, for MTP, the checkpoint)."""

    hf: str
    keys: tuple[str, ...]  # MLX names (two for kv_b_proj)
    expert: int | None = None
    kind: str = "direct"  # direct | kv_b | conv1d | checkpoint


def _join_kv_b(embed_q: np.ndarray, unembed_out: np.ndarray) -> np.ndarray:
    """``kv_b_proj`` from ``embed_q`` ``[H, kv_lora, nope]`` and ``unembed_out``
    ``[H, v, kv_lora]``: per head the rows [nope | v], sanitize's ``reshape(H, nope+v, -1)``
    undone."""
    per_head = np.concatenate([embed_q.swapaxes(-1, -2), unembed_out], axis=1)
    return per_head.reshape(-1, per_head.shape[-1])


def _conv_kernel_last(weight: np.ndarray) -> np.ndarray:
    """``[C, K, 1]`` (mlx's ``nn.Conv1d`` layout) -> the checkpoint's ``[C, 1, K]``."""
    return weight.swapaxes(1, 2)


# mlx-lm's rearrangements undone, by kind (module-level so a test can break one).
INVERSES = {"kv_b": _join_kv_b, "conv1d": _conv_kernel_last}


def dequantize(
    packed: np.ndarray, scales: np.ndarray, biases: np.ndarray | None, quant: tuple[int, int, str]
) -> np.ndarray:
    """``mx.dequantize`` in float32 (float scales and biases widened exactly first; the uint8
    exponent scales of the mx/nv float modes kept as they are)."""
    import mlx.core as mx

    group, bits, mode = quant
    s = mx.array(scales if scales.dtype == np.uint8 else scales.astype(np.float32))
    b = None if biases is None else mx.array(biases.astype(np.float32))
    out = mx.dequantize(mx.array(packed), s, b, group_size=group, bits=bits, mode=mode)
    return np.array(out.astype(mx.float32), copy=True)


class MlxWeights:
    """A :class:`references.weights.WeightSource` over an MLX model directory.

    ``checkpoint_dir`` is the checkpoint the directory was made from: its config.json (Ling-2.6)
    or its safetensors' headers (Ling 3.0) fix the shapes every tensor must have (checked before
    anything is computed) and its safetensors supply what mlx-lm dropped (the MTP layers).
    """

    streamed = True

    def __init__(self, model_dir: Path | str, checkpoint_dir: Path | str) -> None:
        from harness.backends.families import checkpoint_family

        self.path = Path(model_dir)
        self.checkpoint = Path(checkpoint_dir)
        self.config = read_config(self.path)
        self.quantization = dir_quantization(self.path)
        self.family = checkpoint_family(self.checkpoint) or "ling26"
        self.files = self._files()  # what mlx_lm's load_model reads
        self.stored = self._inventory()
        if self.family == "ling3":
            from references.ling3.config import load_config as ling3_config

            self.cfg = ling3_config(self.checkpoint)
            ckpt_where, ckpt_shapes = _header_shapes(self.checkpoint)
        else:
            from references.checkpoint_io import planned_tensors
            from references.config import load_config

            self.cfg = load_config(self.checkpoint)
            ckpt_where, ckpt_shapes = planned_tensors(self.checkpoint, self.cfg)
        self._ckpt_where = ckpt_where
        self.plans = self._plans(ckpt_shapes)
        self._expected = ckpt_shapes
        self._check_shapes()
        self.findings = self._findings()

    # --- WeightSource ---------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.plans

    def shape(self, name: str) -> tuple[int, ...]:
        plan = self._plan(name)
        if plan.kind == "checkpoint":
            return self._expected[name]
        if plan.kind == "kv_b":
            q, o = (self.stored[k].shape for k in plan.keys)
            return (q[0] * (q[2] + o[1]), q[1])
        if plan.kind == "conv1d":
            c, k, one = self.stored[plan.keys[0]].shape
            return (c, one, k)
        shape = self.stored[plan.keys[0]].shape
        return shape[1:] if plan.expert is not None else shape

    def get(
        self,
        name: str,
        dtype: torch.dtype,
        device: torch.device,
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        plan = self._plan(name)
        if plan.kind == "checkpoint":
            arr = self._read_checkpoint(name, rows)
        elif plan.kind == "kv_b":
            arr = INVERSES["kv_b"](*(self._read(k) for k in plan.keys))
            arr = arr if rows is None else arr[rows[0] : rows[1]]
        elif plan.kind == "conv1d":
            arr = INVERSES["conv1d"](self._read(plan.keys[0], rows=rows))
        else:  # a quantized row is whole groups: rows are read (and dequantized) alone
            arr = self._read(plan.keys[0], index=plan.expert, rows=rows)
        return finite_tensor(arr, cols, dtype, device,
                             f"{self.path}: {'+'.join(plan.keys)} (for {name})")

    def quantized(self, name: str) -> bool:
        """Whether the port runs ``name`` quantized (False: a float tensor or the checkpoint's)."""
        plan = self._plan(name)
        return plan.kind != "checkpoint" and any(self.stored[k].quant for k in plan.keys)

    # --- internals ------------------------------------------------------------------------
    def _plan(self, name: str) -> Plan:
        plan = self.plans.get(name)
        if plan is None:
            raise InputError(f"{self.path}: no MLX tensor holds {name}")
        return plan

    def _files(self) -> list[Path]:
        files = sorted(self.path.glob("model*.safetensors"))  # what mlx_lm's load_model reads
        if not files:
            raise InputError(f"{self.path}: no model*.safetensors (not an MLX model directory)")
        return files

    def _inventory(self) -> dict[str, Stored]:
        """Every stored tensor from the headers; a quantized weight as its dequantized shape."""
        raw: dict[str, tuple[Path, tuple[int, ...]]] = {}
        for path in self.files:
            try:
                with safe_open(path, framework="pt") as fh:
                    for key in fh.keys():  # noqa: SIM118 (safe_open is no mapping)
                        if key in raw:
                            raise InputError(f"{self.path}: tensor {key} is in both "
                                             f"{raw[key][0].name} and {path.name}")
                        raw[key] = (path, tuple(fh.get_slice(key).get_shape()))
            except (SafetensorError, OSError) as e:
                raise InputError(f"{path}: unreadable safetensors file ({e})") from None
        out: dict[str, Stored] = {}
        for key, (path, shape) in raw.items():
            stem = key.removesuffix(".weight")
            if key.endswith((".scales", ".biases")) and f"{key[:-7]}.weight" in raw:
                continue
            if key.endswith(".weight") and f"{stem}.scales" in raw:
                quant = self._quant_of(stem, shape, raw[f"{stem}.scales"][1])
                shape = (*shape[:-1], shape[-1] * 32 // quant[1])
                out[key] = Stored(path, shape, quant)
            else:
                out[key] = Stored(path, shape)
        return out

    def _quant_of(
        self, module: str, packed: tuple[int, ...], scales: tuple[int, ...]
    ) -> tuple[int, int, str]:
        """(group, bits, mode) of one quantized module: config.json's entry for its path, else
        the top-level one; checked against the packed and scales shapes."""
        top = self.config.get("quantization") or {}
        own = top.get(module) if isinstance(top, dict) else None
        q = own if isinstance(own, dict) else top
        try:
            group, bits = int(q["group_size"]), int(q["bits"])
            mode = str(q.get("mode", top.get("mode", "affine")))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{self.path / 'config.json'}: {module} is stored quantized but "
                             "quantization gives it no integer bits and group_size") from None
        if packed[-1] * 32 != scales[-1] * group * bits:
            raise InputError(
                f"{self.path}: {module}.weight {packed} with scales {scales} does not fit "
                f"{bits} bits in groups of {group} (config.json's quantization)")
        return group, bits, mode

    def _plans(self, ckpt_shapes: dict[str, tuple[int, ...]]) -> dict[str, Plan]:
        """HF name -> how to read it: sanitize inverted, then the MTP layers from the checkpoint."""
        out: dict[str, Plan] = {}
        for key, stored in self.stored.items():
            if m := _SWITCH.match(key):
                for e in range(stored.shape[0]):
                    hf = f"{m.group(1)}.experts.{e}.{m.group(2)}.{m.group(3)}"
                    out[hf] = Plan(hf, (key,), expert=e)
            elif key.endswith(".mlp.gate.gate_proj.weight"):
                hf = key.replace(".gate.gate_proj.", ".gate.")
                out[hf] = Plan(hf, (key,))
            elif key.endswith(EMBED_Q):
                partner = key.removesuffix(EMBED_Q) + UNEMBED_OUT
                if partner not in self.stored:
                    raise InputError(f"{self.path}: {key} without {partner}: kv_b_proj cannot "
                                     "be rebuilt")
                hf = key.removesuffix(EMBED_Q) + "attention.kv_b_proj.weight"
                out[hf] = Plan(hf, (key, partner), kind="kv_b")
            elif self.family == "ling3" and key.endswith(CONV1D) and len(stored.shape) == 3:
                out[key] = Plan(key, (key,), kind="conv1d")
            elif not key.endswith(UNEMBED_OUT):
                out[key] = Plan(key, (key,))
        tied = self.family == "ling3" and self.cfg.tie_word_embeddings
        if tied and LM_HEAD in ckpt_shapes and LM_HEAD not in out and EMBEDDINGS in out:
            out[LM_HEAD] = Plan(LM_HEAD, (EMBEDDINGS,))  # the tied head sanitize dropped
        n = self.cfg.num_hidden_layers
        for hf in ckpt_shapes:
            m = _LAYER.match(hf)
            if hf not in out and m and int(m.group(1)) >= n:  # the MTP layers mlx-lm dropped
                out[hf] = Plan(hf, (hf,), kind="checkpoint")
        return out

    def _check_shapes(self) -> None:
        """Every tensor the reference reads: present, with config.json's shape."""
        missing = [name for name in self._expected if name not in self.plans]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise InputError(f"{self.path}: no MLX tensor for {', '.join(missing[:3])}{more} "
                             f"(config.json of {self.checkpoint} needs them)")
        for name, want in self._expected.items():
            if self.shape(name) != want:
                plan = self.plans[name]
                raise InputError(f"{self.path}: {'+'.join(plan.keys)} gives {name} the shape "
                                 f"{self.shape(name)}, config.json implies {want}")

    def _findings(self) -> list[str]:
        names = [n for n in self._expected if self.plans[n].kind != "checkpoint"]
        matrices = [n for n in names if len(self.shape(n)) >= 2]
        quantized = sum(self.quantized(n) for n in matrices)
        tag = self.quantization.tag if self.quantization else "unquantized"
        out = [f"reference weights dequantized from the MLX model directory {self.path} ({tag}; "
               f"{quantized} of {len(matrices)} matrices quantized, the rest stored in float), "
               "not read from the checkpoint's safetensors"]
        dropped = sorted(n for n in self._expected if self.plans[n].kind == "checkpoint")
        if dropped:
            layers = sorted({int(m.group(1)) for n in dropped if (m := _LAYER.match(n))})
            out.append(f"{len(dropped)} tensors of layer(s) {layers} (MTP, which mlx-lm's "
                       f"sanitize drops) are read from {self.checkpoint}'s safetensors unchanged")
        return out

    def _read(
        self, key: str, *, index: int | None = None, rows: tuple[int, int] | None = None
    ) -> np.ndarray:
        """One stored tensor (or one slice of its outermost axis, then a row range), dequantized
        to float32 when quantized, through a file handle dropped on return."""
        stored = self.stored[key]
        parts = [key]
        if stored.quant:
            stem = key.removesuffix(".weight")
            parts += [f"{stem}.scales"] + ([f"{stem}.biases"] if stored.quant[2] == "affine"
                                           else [])
        try:
            with safe_open(stored.file, framework="pt") as fh:
                arrays = [_numpy(_slice(fh.get_slice(p), index, rows)) for p in parts]
        except (SafetensorError, OSError) as e:
            raise InputError(f"{stored.file}: tensor {key} cannot be read ({e})") from None
        if not stored.quant:
            return arrays[0]
        return dequantize(arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else None,
                          stored.quant)

    def _read_checkpoint(self, name: str, rows: tuple[int, int] | None) -> np.ndarray:
        path = self._ckpt_where[name]
        try:
            with safe_open(path, framework="pt") as fh:
                return _numpy(_slice(fh.get_slice(name), None, rows))
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path}: tensor {name} cannot be read ({e})") from None


def _header_shapes(checkpoint: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    """(name -> file, name -> shape) of every tensor of a (Ling 3.0) checkpoint, from its
    safetensors headers: transformers, the reference, loads them all."""
    from references.checkpoint_io import weight_files

    where = weight_files(checkpoint)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(where.values())):
        try:
            with safe_open(path, framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open is no mapping)
                    if where.get(key) == path:
                        shapes[key] = tuple(fh.get_slice(key).get_shape())
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path}: unreadable safetensors file ({e})") from None
    return where, shapes


def _slice(view: Any, index: int | None, rows: tuple[int, int] | None) -> torch.Tensor:
    """``view[index][rows]`` read from the file (only those bytes)."""
    if index is not None:
        return view[index : index + 1][0] if rows is None else (
            view[index : index + 1, rows[0] : rows[1]][0])
    return view[:] if rows is None else view[rows[0] : rows[1]]


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A stored tensor as numpy: floats widened to float64 exactly (bf16 has no numpy dtype),
    packed integers kept."""
    if t.dtype.is_floating_point:
        return t.to(torch.float64).numpy()
    return t.numpy()


__all__ = ["INVERSES", "MlxWeights", "dequantize"]
