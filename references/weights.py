"""Where the reference's weights come from: all in memory, or streamed from the safetensors files.

The in-memory source holds every tensor (read once, checked for finiteness, then converted to the
compute dtype as the model is built).  The streamed source holds nothing but the files' headers:
each read opens the file (safetensors memory-maps it), copies out the rows or columns asked for,
converts them to the compute dtype and closes the file again, so the mapped pages leave the
process's RSS as soon as the weight is built.  Its log of reads lets a test prove that a forward
pass reads each byte of the checkpoint at most once.

:func:`choose_load` is the ``load="auto"`` rule: in memory while the float copy fits comfortably,
streamed beyond.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from harness.core.errors import InputError
from references.host import physical_memory

LoadMode = Literal["auto", "memory", "streamed"]
LOAD_MODES: tuple[str, ...] = ("auto", "memory", "streamed")

# A streamed matrix whose compute-dtype copy exceeds this is applied in row (or column) blocks
# (lm_head in vocabulary blocks, the dense lead layer in intermediate blocks): at Ling-2.6-flash
# widths in float64 that bounds any one weight buffer by this, qkv (403 MB) aside.
BLOCK_BYTES = 256 * 2**20
# load="auto" keeps the weights in memory while (compute copy + the float32 copy read first) fits
# in this fraction of physical memory; the rest of the machine is left to the ports under test.
AUTO_MEMORY_FRACTION = 0.25
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


class WeightSource(Protocol):
    """Named tensors in the compute dtype, whole or by row/column ranges."""

    def has(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(
        self,
        name: str,
        dtype: torch.dtype,
        device: torch.device,
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
    ) -> torch.Tensor: ...


class MemoryWeights:
    """Every tensor already read (float32/float64 numpy arrays from :func:`read_state_dict`)."""

    streamed = False

    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors = tensors

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(self, name, dtype, device, rows=None, cols=None) -> torch.Tensor:
        arr = self.tensors[name]
        if rows is not None:
            arr = arr[rows[0] : rows[1]]
        if cols is not None:
            arr = arr[:, cols[0] : cols[1]]
        return torch.from_numpy(np.ascontiguousarray(arr)).to(device, dtype)


@dataclass(frozen=True)
class Read:
    """One read from the checkpoint: a tensor's row and column range and the bytes copied."""

    name: str
    rows: tuple[int, int]
    cols: tuple[int, int]
    nbytes: int


@dataclass
class StreamedWeights:
    """Tensors read on demand from the safetensors files; nothing is held between reads.

    ``where`` maps each tensor to its file, ``shapes`` and ``dtypes`` come from the headers
    (checked against config.json before anything is computed).  Finiteness is checked on every
    read, naming file and tensor, since no read of the whole checkpoint happens up front.
    """

    where: dict[str, Path]
    shapes: dict[str, tuple[int, ...]]
    itemsize: dict[str, int]
    log: list[Read] = field(default_factory=list)
    streamed: bool = True

    def has(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    @property
    def bytes_read(self) -> int:
        return sum(r.nbytes for r in self.log)

    def get(self, name, dtype, device, rows=None, cols=None) -> torch.Tensor:
        shape = self.shapes[name]
        r = rows or (0, shape[0] if shape else 1)
        c = cols or (0, shape[1] if len(shape) > 1 else 1)
        path = self.where[name]
        try:
            # One open per read: leaving the `with` unmaps the file, so the pages just read do
            # not stay in this process's RSS (they stay in the page cache, which is not ours).
            with safe_open(path, framework="pt") as fh:
                view = fh.get_slice(name)
                if len(shape) <= 1:
                    raw = view[r[0] : r[1]] if rows else view[:]
                elif cols is None:
                    raw = view[r[0] : r[1]]
                else:
                    raw = view[r[0] : r[1], c[0] : c[1]]
                out = raw.to(device, dtype, copy=True)
                del raw, view
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path}: tensor {name} cannot be read ({e})") from None
        if not torch.isfinite(out).all():
            raise InputError(f"{path}: tensor {name} contains NaN or inf values")
        n_el = out.numel()
        self.log.append(Read(name, r, c, n_el * self.itemsize[name]))
        return out


def header_inventory(where: dict[str, Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes and on-disk dtypes of the named tensors, from the files' headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in where.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(path, framework="pt") as fh:
                for name in names:
                    view = fh.get_slice(name)
                    shapes[name] = tuple(view.get_shape())
                    dtypes[name] = str(view.get_dtype())
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path}: unreadable safetensors file ({e})") from None
    return shapes, dtypes


def streamed_source(
    where: dict[str, Path], expected: dict[str, tuple[int, ...]]
) -> StreamedWeights:
    """A :class:`StreamedWeights` over the expected tensors, after checking shapes and dtypes."""
    shapes, dtypes = header_inventory({n: where[n] for n in expected})
    for name, want in expected.items():
        if dtypes[name] not in _ST_DTYPES:
            raise InputError(
                f"{where[name]}: tensor {name} has dtype {dtypes[name]}, expected a float type"
            )
        if shapes[name] != want:
            raise InputError(
                f"{where[name]}: tensor {name} has shape {shapes[name]}, expected {want} "
                "from config.json"
            )
    return StreamedWeights(
        where={n: where[n] for n in expected},
        shapes={n: shapes[n] for n in expected},
        itemsize={n: _ST_DTYPES[dtypes[n]] for n in expected},
    )


def in_memory_bytes(n_elements: int, dtype: torch.dtype) -> int:
    """Peak bytes of the in-memory load: the float32 copy read first plus the compute copy."""
    return n_elements * (4 + torch.empty((), dtype=dtype).element_size())


def choose_load(mode: LoadMode, n_elements: int, dtype: torch.dtype, ram: int | None = None) -> str:
    """``memory`` or ``streamed``: ``auto`` streams once the in-memory load would take more than
    :data:`AUTO_MEMORY_FRACTION` of physical memory (unknown memory: stream)."""
    if mode not in LOAD_MODES:
        raise ValueError(f"load={mode!r}; expected one of {LOAD_MODES}")
    if mode != "auto":
        return mode
    ram = physical_memory() if ram is None else ram
    fits = ram > 0 and in_memory_bytes(n_elements, dtype) <= AUTO_MEMORY_FRACTION * ram
    return "memory" if fits else "streamed"


_LIBC: ctypes.CDLL | bool | None = False  # False: not looked up yet; None: no malloc_trim here


def release_freed_memory() -> None:
    """Give the allocator's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A streamed forward frees hundreds of MB per layer while keeping a few MB of captures; glibc
    keeps buffers under its (adaptive, up to 32 MB) mmap threshold on the heap, where the freed
    space between captures stays resident.  Measured at flash widths, 16 layers: without this the
    peak grew with the layer count beyond the captures themselves.
    """
    global _LIBC
    if _LIBC is False:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _LIBC = lib if lib is not None and hasattr(lib, "malloc_trim") else None
        except OSError:
            _LIBC = None
    if _LIBC:
        _LIBC.malloc_trim(0)
