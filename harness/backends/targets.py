"""A backend configured for a run ("mlx-float32", "torch-float64"), and the registry of backends."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from harness.backends.base import DTYPES, Backend, BackendOptions
from harness.core.errors import InputError

# name -> "module:Class"; imported lazily so a missing optional package only skips its backend.
BACKENDS: dict[str, str] = {
    "torch": "harness.backends.torch_backend:TorchBackend",
    "mlx": "harness.backends.mlx_backend:MlxBackend",
    "llamacpp": "harness.backends.llamacpp_backend:LlamaCppBackend",
    # the checkpoint's own modeling code (auto_map) under trust_remote_code, in a child process
    "hf_remote": "harness.backends.hf_remote:HfRemoteBackend",
}
DEFAULT_DTYPE = {"torch": "float32", "mlx": "float32", "llamacpp": "float32",
                 "hf_remote": "float32"}
REFERENCE = "torch-float64"


def get_backend(name: str) -> Backend:
    """Instantiate the named backend (raises InputError for an unknown name)."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


@dataclass(frozen=True)
class Target:
    """One backend with the options that change its numbers."""

    backend: str
    dtype: str
    extra: tuple[tuple[str, str], ...] = field(default=())

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
        if name not in BACKENDS:
            raise InputError(f"unknown backend {name!r} in {spec!r}; known: {', '.join(BACKENDS)}")
        dtype = dtype or DEFAULT_DTYPE[name]
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r} in {spec!r}; known: {', '.join(DTYPES)}")
        return cls(name, dtype, tuple(sorted((extra or {}).items())))

    @property
    def label(self) -> str:
        extra = "".join(f",{k}={v}" for k, v in self.extra if k != "model_module")
        module = dict(self.extra).get("model_module")
        if module:
            extra += f",module={module.rsplit('/', 1)[-1]}"
        return f"{self.backend}-{self.dtype}{extra}"

    def options(self) -> BackendOptions:
        return BackendOptions(dtype=self.dtype, extra=dict(self.extra))


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
