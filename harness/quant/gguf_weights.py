"""A GGUF read back as the reference's weights, under the checkpoint's HF tensor names.

To tell a quantized port's own error from the error its weights carry, the float64 reference runs
on the very weights the port runs: each :meth:`GgufWeights.get` reads the GGUF tensor(s) the
port's tensor map (:mod:`harness.llamacpp.tensor_maps`) says the HF tensor became, dequantizes
them exactly (``gguf.quants.dequantize``: F32/F16/BF16, Q4_0..Q8_0, K-quants, IQ4_NL ...) and
undoes the converter's rearrangement:

- a 1:1 rule: a reshape (ggml ``ne`` is the HF shape reversed; the KDA conv kernels were
  reshaped ``[C, 1, K] -> [1, C, 1, K]``);
- ``mlp.experts.{E}.*``: expert ``E``'s slice of the stacked ``[E, out, in]`` tensor;
- MLA ``kv_b_proj`` ``[H*(nope+v), kv_lora]`` from ``attn_k_b`` (stored per head transposed,
  ``[H, kv_lora, nope]``) and ``attn_v_b`` (``[H, v, kv_lora]``): both converters (ours in
  ``ports/llamacpp/patches/0001``, upstream's ``conversion/bailingmoe3.py``) split it that way;
- Ling 3.0's ``A_log``: upstream stores ``exp(A_log)`` as ``ssm_a``; its log is taken in float64
  (``exp`` is not injective in float32, so this one tensor is exact only to rounding).

With ``activations="ggml-cpu"`` every tensor also declares how ggml's CPU matmul rounds the
activations it multiplies (:data:`GGML_CPU_ACTIVATIONS`, from the ggml-cpu type traits' vec_dot
types; :mod:`references.activation_rounding`), so the reference computes what the port should.

Nothing is cached and one tensor is read at a time through a fresh memory map that is dropped
after the read, like :class:`references.weights.StreamedWeights`, so it works at real scale.
An HF tensor the map cannot invert raises :class:`InputError` naming it and its GGUF tensor(s).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.core.errors import InputError
from harness.llamacpp.tensor_maps import (
    PORT_MAPS,
    PortTensorMap,
    TensorRule,
    layer_kinds,
    map_for_gguf,
)
from harness.quant.tensors import finite_tensor
from references.activation_rounding import declare

# ggml-cpu's vec_dot type per weight type: what a CPU matmul converts its float32 input to
# (ggml/src/ggml-cpu/ggml-cpu.c type_traits_cpu).  F32 weights keep the input exact.
GGML_CPU_ACTIVATIONS: dict[str, str | None] = {
    "F32": None, "F16": "f16", "BF16": "bf16",
    "Q4_0": "q8_0", "Q5_0": "q8_0", "Q8_0": "q8_0", "IQ4_NL": "q8_0", "MXFP4": "q8_0",
    "Q4_1": "q8_1", "Q5_1": "q8_1",
    **{t: "q8_K" for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ2_XXS",
                           "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0",
                           "TQ2_0")},
}
ACTIVATIONS = ("exact", "ggml-cpu")
# Q4_1/Q5_1 blocks of 32 start with float16 d and m (ggml-common.h): bytes per block
_MIN_BLOCK_BYTES = {"Q4_1": 20, "Q5_1": 24}

KV_B = "attention.kv_b_proj.weight"
A_LOG = "attention.A_log"
_CONV = re.compile(r"^attention\.[qkv]_conv1d\.weight$")
_EXPERT = "{E}"


@dataclass(frozen=True)
class GgufTensor:
    """Where one GGUF tensor's bytes are: enough to map it again without the reader."""

    name: str
    type_name: str  # ggml type (F32, Q8_0, ...)
    ne: tuple[int, ...]  # ggml shape, innermost first
    offset: int  # byte offset of the data in the file
    raw_shape: tuple[int, ...]  # numpy shape of the stored data (bytes per row if quantized)
    raw_dtype: str  # numpy dtype of the stored data

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy (row-major) shape of the dequantized tensor: ``ne`` reversed."""
        return tuple(reversed(self.ne))


@dataclass(frozen=True)
class Plan:
    """How one HF tensor comes out of the GGUF."""

    hf: str
    rule: TensorRule
    gguf: tuple[str, ...]  # full GGUF names
    expert: int | None = None


def read_layout(gguf: Path) -> tuple[dict[str, Any], dict[str, GgufTensor]]:
    """(metadata, tensors) of a GGUF, big arrays (the vocabulary) left out of the metadata."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf))
    except Exception as e:  # truncated or not a GGUF at all
        raise InputError(f"{gguf}: not a readable GGUF ({type(e).__name__}: {e})") from None
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("tokenizer.ggml."):
            continue
        meta[key] = f.contents()
    tensors = {
        t.name: GgufTensor(
            t.name,
            t.tensor_type.name,
            tuple(int(x) for x in t.shape),
            int(t.data_offset),
            tuple(int(x) for x in t.data.shape),
            str(t.data.dtype),
        )
        for t in reader.tensors
    }
    del reader  # drops the file's memory map
    return meta, tensors


def _join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """``kv_b_proj`` from ``attn_k_b`` ``[H, kv_lora, nope]`` and ``attn_v_b`` ``[H, v, kv_lora]``:
    per head the rows [nope | v], the converter's ``view(H, nope+v, kv_lora)`` undone."""
    n_head, kv_lora, _ = k_b.shape
    per_head = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)
    return per_head.reshape(n_head * per_head.shape[1], kv_lora)


# The converter rearrangements undone, by kind (module-level so a test can break one).
INVERSES: dict[str, Callable[..., np.ndarray]] = {"kv_b": _join_kv_b}


class GgufWeights:
    """A :class:`references.weights.WeightSource` over a (possibly quantized) GGUF.

    ``checkpoint_config`` is the checkpoint's config.json (a dict): for a Ling-2.6 config every
    tensor the reference will read is checked to be invertible, with the config's shape, before
    anything is computed.  ``port_map``: a :class:`PortTensorMap`, its name, or None for the map
    the GGUF names (:func:`map_for_gguf`).
    """

    streamed = True

    def __init__(
        self,
        gguf: Path | str,
        checkpoint_config: Mapping[str, Any],
        port_map: PortTensorMap | str | None = None,
        activations: str = "exact",
    ) -> None:
        if activations not in ACTIVATIONS:
            raise InputError(f"activations={activations!r}: expected one of "
                             f"{', '.join(ACTIVATIONS)}")
        self.activations = activations
        self.path = Path(gguf)
        self.config = dict(checkpoint_config)
        self.meta, self.tensors = read_layout(self.path)
        if isinstance(port_map, str):
            if port_map not in PORT_MAPS:
                raise InputError(f"unknown port tensor map {port_map!r}; known: "
                                 f"{', '.join(PORT_MAPS)}")
            port_map = PORT_MAPS[port_map]
        self.port = port_map or map_for_gguf(self.meta)
        arch = self.meta.get("general.architecture")
        if self.port is None or self.port.arch != arch:
            raise InputError(f"{self.path}: no tensor map for GGUF architecture {arch!r}"
                             + (f" (map {self.port.name} is for {self.port.arch})"
                                if self.port else ""))
        self.plans = self._plans()
        self._check_config()

    # --- WeightSource ---------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.plans

    def shape(self, name: str) -> tuple[int, ...]:
        plan = self._plan(name)
        rest = _rest(plan.hf)
        g = [self.tensors[n] for n in plan.gguf]
        if plan.expert is not None:
            _one(plan, g)
            return g[0].shape[1:]
        if rest == KV_B:
            k_b, v_b = self._kv_b_parts(plan, g)
            n_head, kv_lora, nope = k_b
            return (n_head * (nope + v_b[1]), kv_lora)
        _one(plan, g)
        if rest == A_LOG:
            return (math.prod(g[0].ne),)
        if _CONV.match(rest):
            _, c, _, k = _pad4(g[0].shape)
            return (c, 1, k)
        return g[0].shape

    def get(
        self,
        name: str,
        dtype: torch.dtype,
        device: torch.device,
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        plan = self._plan(name)
        rest = _rest(plan.hf)
        shape = self.shape(name)
        sliced = rows is not None and (plan.expert is not None or len(shape) == 2)
        if rest == KV_B:
            k_b, v_b = (self._read(n) for n in plan.gguf)
            arr = INVERSES["kv_b"](k_b, v_b)
        else:  # rows of a matrix are read alone (a quantized row is whole blocks)
            arr = self._read(plan.gguf[0], index=plan.expert, rows=rows if sliced else None)
        if rest == A_LOG:  # upstream stores exp(A_log)
            arr = np.log(arr.astype(np.float64))
        arr = arr.reshape((-1, *shape[1:]) if sliced else shape)
        if rows is not None and not sliced:
            arr = arr[rows[0] : rows[1]]
        out = finite_tensor(arr, cols, dtype, device,
                            f"{self.path}: {'+'.join(plan.gguf)} (for {name})")
        if self.activations == "ggml-cpu":
            kind, m = self.declaration(name, dtype, device, rows if sliced else None)
            if m is not None and cols is not None and rest != KV_B:
                m = m[:, cols[0] // 32 : cols[1] // 32]
            declare(out, kind, block_min=m)
        return out

    def _block_min(self, name: str, index: int | None = None,
                   rows: tuple[int, int] | None = None) -> np.ndarray:
        """The float16 minimum ``m`` of every block of a Q4_1/Q5_1 tensor (its outermost axes,
        then one per block of 32 along its rows)."""
        t = self.tensors[name]
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset,
                       shape=t.raw_shape)
        try:
            raw = mm if index is None else mm[index]
            if rows is not None:
                raw = raw[rows[0] : rows[1]]
            blocks = np.asarray(raw).reshape(*raw.shape[:-1], -1, _MIN_BLOCK_BYTES[t.type_name])
            return blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        finally:
            del mm

    def declaration(self, name: str, dtype: torch.dtype = torch.float64,
                    device: torch.device | str = "cpu",
                    rows: tuple[int, int] | None = None) -> tuple[Any, Any]:
        """(kind, block_min) of HF tensor ``name`` (of its ``rows``, a matrix's), as
        :func:`references.activation_rounding.declare` takes them: how ggml-cpu's matmul
        rounds its input, and a Q4_1/Q5_1 weight's per-block minimum ``m`` in ``dtype`` (a
        tuple each for MLA's ``kv_b_proj``, stored in two parts, each whole).  :meth:`get`
        declares with it, and so does a model that holds its own tensors (transformers' Ling
        3.0, :mod:`harness.backends.transformers_port_arithmetic`)."""
        plan = self._plan(name)
        types = self.gguf_types(name)
        kinds = tuple(self.activation_kind(t) for t in types)

        def minimum(type_name: str, gguf: str, index: int | None,
                    part_rows: tuple[int, int] | None) -> torch.Tensor | None:
            if type_name not in _MIN_BLOCK_BYTES:
                return None
            m = self._block_min(gguf, index, part_rows)
            return torch.from_numpy(np.ascontiguousarray(m)).to(device, dtype)

        if _rest(plan.hf) == KV_B:  # per part, in the GGUF's orientation (rows: what it yields)
            mins = tuple(minimum(t, g, None, None) for t, g in zip(types, plan.gguf, strict=True))
            return kinds, (mins if any(m is not None for m in mins) else None)
        matrix = len(self.shape(name)) == 2
        return kinds[0], minimum(types[0], plan.gguf[0], plan.expert, rows) if matrix else None

    def activation_kind(self, type_name: str) -> str | None:
        """How ggml-cpu rounds the input of a matmul with a weight of this type."""
        if type_name not in GGML_CPU_ACTIVATIONS:
            raise InputError(f"{self.path}: ggml type {type_name}: its CPU matmul's activation "
                             f"rounding is not known here (known: "
                             f"{', '.join(GGML_CPU_ACTIVATIONS)})")
        return GGML_CPU_ACTIVATIONS[type_name]

    def gguf_types(self, name: str) -> tuple[str, ...]:
        """The ggml types of the GGUF tensor(s) an HF tensor is read from (what it lost)."""
        return tuple(self.tensors[g].type_name for g in self._plan(name).gguf)

    # --- internals ------------------------------------------------------------------------
    def _plan(self, name: str) -> Plan:
        plan = self.plans.get(name)
        if plan is None:
            raise InputError(
                f"{self.path}: no GGUF tensor holds {name} (map {self.port.name})"
            )
        return plan

    def _plans(self) -> dict[str, Plan]:
        """HF name -> how to read it, for every rule whose GGUF tensors the file holds."""
        port = self.port
        out: dict[str, Plan] = {}
        for r in port.global_rules:
            if all(g in self.tensors for g in r.gguf):
                out.setdefault(r.hf, Plan(r.hf, r, r.gguf))
        for il, kinds in enumerate(layer_kinds(port, self.meta)):
            for r in port.layer_rules:
                if r.when and r.when not in kinds:
                    continue
                names = tuple(f"blk.{il}.{g}" for g in r.gguf)
                if not all(n in self.tensors for n in names):
                    continue
                if _EXPERT in r.hf:
                    stacked = self.tensors[names[0]]
                    for e in range(stacked.shape[0]):
                        hf = f"model.layers.{il}.{r.hf.replace(_EXPERT, str(e))}"
                        out.setdefault(hf, Plan(hf, r, names, e))
                else:
                    hf = f"model.layers.{il}.{r.hf}"
                    out.setdefault(hf, Plan(hf, r, names))
        return out

    def _kv_b_parts(
        self, plan: Plan, g: list[GgufTensor]
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        shapes = [t.shape for t in g]
        ok = (len(g) == 2 and all(len(s) == 3 for s in shapes)
              and shapes[0][0] == shapes[1][0] and shapes[0][1] == shapes[1][2])
        if not ok:
            raise InputError(
                f"{self.path}: cannot invert {plan.hf} from {' + '.join(plan.gguf)} "
                f"(shapes {shapes}; expected [H, kv_lora, nope] and [H, v, kv_lora])"
            )
        return shapes[0], shapes[1]

    def _read(
        self, name: str, *, index: int | None = None, rows: tuple[int, int] | None = None
    ) -> np.ndarray:
        """One GGUF tensor (or one slice of its outermost axis, or a row range of a matrix)
        dequantized to float32, through a memory map dropped on return."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.tensors[name]
        mm = np.memmap(self.path, dtype=np.dtype(t.raw_dtype), mode="r", offset=t.offset,
                       shape=t.raw_shape)
        try:
            raw = mm if index is None else mm[index]
            if rows is not None:
                raw = raw[rows[0] : rows[1]]
            qtype = GGMLQuantizationType[t.type_name]
            try:
                out = np.array(dequantize(np.asarray(raw), qtype), dtype=np.float32, copy=True)
            except NotImplementedError as e:
                raise InputError(f"{self.path}: tensor {name}: {e}") from None
        finally:
            del mm
        return out

    def _check_config(self) -> None:
        """Every tensor a Ling-2.6 reference reads: present, invertible, of the config's shape."""
        from references.checkpoint_spec import expected_tensors
        from references.config import ARCHITECTURE, config_from_dict

        archs = self.config.get("architectures") or []
        if ARCHITECTURE not in (archs if isinstance(archs, list) else [archs]):
            return
        cfg = config_from_dict(self.config, Path(f"config.json given with {self.path.name}"))
        specs = expected_tensors(cfg, include_mtp=self.has(
            f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"))
        missing = [s.name for s in specs if s.name not in self.plans]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise InputError(f"{self.path}: no GGUF tensor for {', '.join(missing[:3])}{more} "
                             f"(map {self.port.name})")
        for s in specs:
            if self.shape(s.name) != s.shape:
                plan = self.plans[s.name]
                raise InputError(
                    f"{self.path}: {'+'.join(plan.gguf)} gives {s.name} the shape "
                    f"{self.shape(s.name)}, config.json implies {s.shape}"
                )


def _rest(hf: str) -> str:
    """The name after ``model.layers.{L}.`` (globals unchanged)."""
    m = re.match(r"^model\.layers\.\d+\.(.+)$", hf)
    return m.group(1) if m else hf


def _one(plan: Plan, g: list[GgufTensor]) -> None:
    if len(g) != 1:
        raise InputError(
            f"cannot invert {plan.hf} from {' + '.join(plan.gguf)}: no inverse is known for a "
            "tensor the converter split this way"
        )


def _pad4(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1,) * (4 - len(shape)) + tuple(shape)
