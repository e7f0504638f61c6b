"""A backend configured for a run ("mlx-float32", "torch-float64"): name, dtype, typed options.

Which backends exist, per family, and what each can do is :mod:`harness.backends.registry`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.backends.base import DTYPES, Backend, BackendOptions
from harness.backends.registry import (
    Implementation,
    backend_names,
    default_dtype,
    implementation,
    options_class,
)
from harness.backends.registry import get_backend as _get_backend
from harness.core.errors import InputError

# The backend names (derived from the registry, for --backends defaults and pytest markers).
BACKENDS: tuple[str, ...] = backend_names()
REFERENCE = "torch-float64"
# GGUF file types that are plain floats: a ``gguf=`` file of one keeps today's label
UNQUANTIZED = ("F32", "F16", "BF16")


@functools.lru_cache(maxsize=64)
def _file_type(path: str, size: int, mtime_ns: int) -> str | None:
    from harness.core.errors import InputError
    from harness.quant.gguf_quantize import gguf_file_type

    try:
        return gguf_file_type(path)
    except (InputError, ImportError):
        return None


def gguf_type(path: Path) -> str | None:
    """The GGUF's type as llama.cpp names it (read from its header once per file version);
    None for a missing or unreadable file (loading it refuses it, with the reason)."""
    try:
        st = Path(path).expanduser().stat()
    except OSError:
        return None
    return _file_type(str(Path(path).expanduser().resolve()), st.st_size, st.st_mtime_ns)


def get_backend(name: str) -> Backend:
    """The named backend (raises InputError for an unknown name); it loads the implementation
    for the checkpoint's family."""
    return _get_backend(name)


@dataclass(frozen=True)
class Target:
    """One backend with the options that change its numbers."""

    backend: str
    dtype: str
    extra: tuple[tuple[str, str], ...] = field(default=())
    # ``extra`` parsed into the backend's options dataclass when the target is built: an unknown
    # key or a bad value is refused here, before anything is computed.
    settings: Any = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        from harness.backends.options import parse_options

        where = f"{self.backend}-{self.dtype}"
        settings = parse_options(options_class(self.backend), dict(self.extra), where)
        object.__setattr__(self, "settings", settings)

    @classmethod
    def parse(cls, spec: str, extra: dict[str, str] | None = None) -> Target:
        """``"mlx"`` (default dtype), ``"mlx-float32"``, or with options after colons:
        ``"llamacpp-float32:type_k=f16:outtype=q8_0"`` (they join ``extra``)."""
        spec, *opts = spec.strip().split(":")
        extra = dict(extra or {})
        for opt in opts:
            key, eq, value = opt.partition("=")
            if not eq or not key.strip():
                raise InputError(f"option {opt!r} in {spec!r}: expected key=value")
            extra[key.strip()] = value.strip()
        name, _, dtype = spec.strip().partition("-")
        known = backend_names()
        if name not in known:
            raise InputError(f"unknown backend {name!r} in {spec!r}; known: {', '.join(known)}")
        dtype = dtype or default_dtype(name)
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r} in {spec!r}; known: {', '.join(DTYPES)}")
        return cls(name, dtype, tuple(sorted((extra or {}).items())))

    @property
    def label(self) -> str:
        """What ran, for reports and the gate's baseline (keyed by it): ``backend-dtype`` and
        the options as given, except that a quantized llama.cpp candidate is named by its real
        type (``llamacpp-Q4_K_M``; ``llamacpp-Q4_K_M,gguf=<file name>`` for a given quantized
        file) and a reference on a GGUF's weights by theirs (``,dequantized=<TYPE>``); likewise
        a quantized mlx candidate (``mlx-q4g64``) and a reference on an MLX directory's weights
        (``,dequantized=q4g64``)."""
        from harness.quant.mlx_quantize import dir_tag, options_tag

        head = f"{self.backend}-{self.dtype}"
        items = [(k, v) for k, v in self.extra if k != "model_module"]
        quant = getattr(self.settings, "quant", None)
        gguf = getattr(self.settings, "gguf", None)
        weights = getattr(self.settings, "weights_gguf", None)
        if quant is not None:
            head = f"{self.backend}-{quant}"
            items = [(k, v) for k, v in items if k != "quant"]
        elif isinstance(gguf, Path) and (kind := gguf_type(gguf)) not in (None, *UNQUANTIZED):
            head = f"{self.backend}-{kind}"
            items = [(k, gguf.name if k == "gguf" else v) for k, v in items]
        elif (tag := options_tag(self.settings)) is not None:  # mlx: bits= or a model_dir=
            head = f"{self.backend}-{tag}"
            items = [(k, Path(v).name if k == "model_dir" else v) for k, v in items
                     if k not in ("bits", "group")]
            items += [("dtype", self.dtype)] if self.dtype != default_dtype(self.backend) else []
        if isinstance(weights, Path) and (kind := gguf_type(weights)) is not None:
            items = [("dequantized", kind) if k == "weights_gguf" else (k, v) for k, v in items]
        mlx_weights = getattr(self.settings, "weights_mlx", None)
        if isinstance(mlx_weights, Path) and (kind := dir_tag(mlx_weights)) is not None:
            items = [("dequantized", kind) if k == "weights_mlx" else (k, v) for k, v in items]
        extra = "".join(f",{k}={v}" for k, v in items)
        module = dict(self.extra).get("model_module")
        if module:
            extra += f",module={module.rsplit('/', 1)[-1]}"
        return f"{head}{extra}"

    def options(self) -> BackendOptions:
        return BackendOptions(dtype=self.dtype, extra=dict(self.extra), settings=self.settings)

    def implementation(self, family: str) -> Implementation:
        """What this target runs on ``family`` (InputError when the backend has none)."""
        return implementation(self.backend, family)


def parse_targets(spec: str, extra: dict[str, dict[str, str]] | None = None) -> list[Target]:
    """A comma-separated list of targets; ``extra`` maps a backend name to its options."""
    extra = extra or {}
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name = part.partition("-")[0]
        out.append(Target.parse(part, extra.get(name)))
    if not out:
        raise InputError("no backends given")
    return out


def options_of(target_or_options: Target | BackendOptions, backend: str,
               runs: str) -> BackendOptions:
    """The options of a ``backend`` target, or the options themselves (direct callers);
    InputError for another backend's target (``runs``: what this backend's target runs)."""
    if isinstance(target_or_options, Target):
        if target_or_options.backend != backend:
            raise InputError(f"{target_or_options.label}: a {target_or_options.backend} "
                             f"target, not {backend}: it runs no {runs}")
        return target_or_options.options()
    if isinstance(target_or_options, BackendOptions):
        return target_or_options
    raise TypeError(f"expected a Target or BackendOptions, got {type(target_or_options)}")
