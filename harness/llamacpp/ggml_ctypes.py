"""ctypes access to ggml tensors handed to llama.cpp's eval callback.

llama-cpp-python 0.3.36 binds the callback type but no tensor accessors, so they are declared
here against ``libggml-base`` (where ``ggml.c`` and ``ggml-backend.cpp`` live).  Only functions
are bound; the ``ggml_tensor`` struct is NOT mirrored.  The two fields without a getter (``type``
and ``ne``/``nb``) are read at their fixed offsets in the layout of the vendored commit
(``0c1e57098``)::

    enum ggml_type type;            // offset 0  (int32, then 4 bytes padding)
    ggml_backend_buffer * buffer;   // offset 8
    int64_t ne[4];                  // offset 16
    size_t  nb[4];                  // offset 48

and :func:`check_layout` proves those offsets on every new tensor shape against getters
(``ggml_nelements``, ``ggml_nbytes``, ``ggml_element_size``), so a layout drift in another
llama.cpp build fails loudly instead of reading garbage.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import numpy as np

GGML_MAX_DIMS = 4
OFF_TYPE = 0
OFF_NE = 16
OFF_NB = OFF_NE + 8 * GGML_MAX_DIMS

# enum ggml_type values needed here (ggml.h at the vendored commit).
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_I8 = 24
GGML_TYPE_I16 = 25
GGML_TYPE_I32 = 26
GGML_TYPE_I64 = 27
GGML_TYPE_F64 = 28
GGML_TYPE_BF16 = 30

_NUMPY_TYPES: dict[int, np.dtype] = {
    GGML_TYPE_F32: np.dtype(np.float32),
    GGML_TYPE_F16: np.dtype(np.float16),
    GGML_TYPE_BF16: np.dtype(np.uint16),  # widened to float32 below
    GGML_TYPE_F64: np.dtype(np.float64),
    GGML_TYPE_I8: np.dtype(np.int8),
    GGML_TYPE_I16: np.dtype(np.int16),
    GGML_TYPE_I32: np.dtype(np.int32),
    GGML_TYPE_I64: np.dtype(np.int64),
}


class GgmlLayoutError(RuntimeError):
    """The assumed ``ggml_tensor`` field offsets disagree with the library's own getters."""


def _lib_filename(base: str) -> str:
    if sys.platform == "darwin":
        return f"lib{base}.dylib"
    if sys.platform == "win32":
        return f"{base}.dll"
    return f"lib{base}.so"


def library_dir() -> Path:
    """The directory whose libllama is in use: ``LLAMA_CPP_LIB_PATH`` if set, else the package's.

    ggml-base must come from the same directory as the libllama that llama_cpp loaded, so that
    the tensors and the getters share one build (the same path resolves to the same handle).
    """
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise ImportError("llama_cpp is not installed (python -m harness.llamacpp.build --install)")
    return Path(spec.origin).parent / "lib"


class Ggml:
    """The bound ggml-base functions plus field readers; one instance per process is enough."""

    def __init__(self, lib_dir: Path | None = None) -> None:
        lib_dir = lib_dir or library_dir()
        candidates = [lib_dir / _lib_filename("ggml-base"), lib_dir / _lib_filename("ggml")]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise ImportError(f"no libggml-base or libggml in {lib_dir}")
        self.path = path
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        vp, sz = ctypes.c_void_p, ctypes.c_size_t

        def bind(name: str, restype: object, *argtypes: object) -> ctypes._CFuncPtr:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, list(argtypes)
            return fn

        self.get_name = bind("ggml_get_name", ctypes.c_char_p, vp)
        self.nbytes = bind("ggml_nbytes", sz, vp)
        self.nelements = bind("ggml_nelements", ctypes.c_int64, vp)
        self.n_dims = bind("ggml_n_dims", ctypes.c_int, vp)
        self.element_size = bind("ggml_element_size", sz, vp)
        self.type_size = bind("ggml_type_size", sz, ctypes.c_int)
        self.blck_size = bind("ggml_blck_size", ctypes.c_int64, ctypes.c_int)
        self.type_name = bind("ggml_type_name", ctypes.c_char_p, ctypes.c_int)
        self.op_desc = bind("ggml_op_desc", ctypes.c_char_p, vp)
        self.is_contiguous = bind("ggml_is_contiguous", ctypes.c_bool, vp)
        self.tensor_get = bind("ggml_backend_tensor_get", None, vp, vp, sz, sz)
        self._checked: set[tuple[int, ...]] = set()

    # --- fields without a getter, read at fixed offsets -------------------------------------
    @staticmethod
    def type_of(t: int) -> int:
        """``t->type`` (offset 0)."""
        return ctypes.c_int32.from_address(t + OFF_TYPE).value

    @staticmethod
    def ne(t: int) -> tuple[int, int, int, int]:
        """``t->ne`` (elements per dim, innermost first)."""
        a = (ctypes.c_int64 * GGML_MAX_DIMS).from_address(t + OFF_NE)
        return (a[0], a[1], a[2], a[3])

    @staticmethod
    def nb(t: int) -> tuple[int, int, int, int]:
        """``t->nb`` (byte strides per dim, innermost first)."""
        a = (ctypes.c_size_t * GGML_MAX_DIMS).from_address(t + OFF_NB)
        return (a[0], a[1], a[2], a[3])

    def name(self, t: int) -> str:
        """``ggml_get_name(t)``, decoded; unnamed tensors give ``""``."""
        raw = self.get_name(t)
        return raw.decode(errors="replace") if raw else ""

    def check_layout(self, t: int) -> None:
        """Raise GgmlLayoutError unless the fixed-offset fields agree with ggml's getters.

        ``ggml_nelements`` checks ``ne``; ``ggml_element_size`` checks ``type``; for
        unquantised types ``ggml_nbytes`` (computed by ggml from ne and nb) checks ``nb``.
        Checked once per (type, ne, nb) signature, so the cost stays negligible.
        """
        typ, ne, nb = self.type_of(t), self.ne(t), self.nb(t)
        sig = (typ, *ne, *nb)
        if sig in self._checked:
            return
        n = ne[0] * ne[1] * ne[2] * ne[3]
        if n != self.nelements(t):
            raise GgmlLayoutError(
                f"ggml_tensor.ne at offset {OFF_NE} reads {ne} (product {n}) but "
                f"ggml_nelements says {self.nelements(t)}: the struct layout differs from 0c1e57098"
            )
        if not 0 <= typ < 64 or self.type_size(typ) != self.element_size(t):
            raise GgmlLayoutError(
                f"ggml_tensor.type at offset {OFF_TYPE} reads {typ}, inconsistent with "
                f"ggml_element_size={self.element_size(t)}"
            )
        if self.blck_size(typ) == 1 and n > 0:
            expect = self.type_size(typ) + sum((ne[i] - 1) * nb[i] for i in range(GGML_MAX_DIMS))
            if expect != self.nbytes(t):
                raise GgmlLayoutError(
                    f"ggml_tensor.nb at offset {OFF_NB} reads {nb}, implying {expect} bytes, but "
                    f"ggml_nbytes says {self.nbytes(t)}"
                )
        self._checked.add(sig)

    def read_tensor(self, t: int) -> tuple[str, np.ndarray]:
        """Copy a computed tensor out of its backend buffer.

        Returns ``(name, array)`` with the array shaped ``(ne[3], ne[2], ne[1], ne[0])``: ggml's
        innermost-first order reversed to numpy row-major, always 4-D because ``ggml_n_dims``
        drops trailing size-1 dims (a 1-token batch would lose its token axis).  Float types
        (f32/f16/bf16/f64) come back as float32 (f64 stays float64), integer types keep their
        width (router ids are I32).  Views with arbitrary strides are handled by copying
        ``ggml_nbytes`` bytes from the tensor's start and applying ``nb`` as numpy strides.
        """
        self.check_layout(t)
        name = self.name(t)
        typ = self.type_of(t)
        if typ not in _NUMPY_TYPES:
            tname = self.type_name(typ).decode()
            raise TypeError(f"{name}: ggml type {tname} is not readable here")
        ne, nb = self.ne(t), self.nb(t)
        shape = tuple(reversed(ne))
        if 0 in ne:
            return name, np.zeros(shape, dtype=_out_dtype(typ))
        size = self.nbytes(t)
        dt = _NUMPY_TYPES[typ]
        buf = np.empty(-(-size // dt.itemsize), dtype=dt)
        self.tensor_get(t, buf.ctypes.data, 0, size)
        view = np.lib.stride_tricks.as_strided(
            buf, shape=shape, strides=tuple(reversed(nb)), writeable=False
        )
        arr = np.ascontiguousarray(view)
        if typ == GGML_TYPE_BF16:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif typ == GGML_TYPE_F16:
            arr = arr.astype(np.float32)
        return name, arr


def _out_dtype(typ: int) -> np.dtype:
    if typ in (GGML_TYPE_F16, GGML_TYPE_BF16):
        return np.dtype(np.float32)
    return _NUMPY_TYPES[typ]


_GGML: Ggml | None = None


def ggml() -> Ggml:
    """The process-wide :class:`Ggml` (bound lazily, after llama_cpp has loaded its libraries)."""
    global _GGML
    if _GGML is None:
        _GGML = Ggml()
    return _GGML


def read_tensor(ptr: int) -> tuple[str, np.ndarray]:
    """``(name, array)`` for a ``ggml_tensor *`` from the eval callback (Ggml.read_tensor)."""
    return ggml().read_tensor(ptr)
