"""The machinery both MLX candidates share: loading through mlx-lm, recording taps, sessions.

:mod:`harness.backends.mlx_backend` (Ling-2.6) and :mod:`harness.backends.mlx_ling3` (Ling 3.0)
build on it; it knows neither, so neither imports the other's internals.  Activations are captured
without editing mlx-lm: after loading, the instances of interest get their ``__class__`` swapped to
a recording subclass (see :func:`tap`); the module tree, parameter names and attributes such as
``layer.is_global`` are untouched.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from harness.backends.base import Captures, Recorder, wanted_points
from harness.core.capture_points import layer_point
from harness.core.errors import InputError, PortFailure, port_boundary

_DTYPES = ("float32", "bfloat16", "float16")  # what mlx computes in
PAIR = "|"  # joins a router's (ids, weights) point names into one recorder key
_GATHER_MM_HINT = (
    "mlx GatherMM on this CPU supports float32 only, so the MoE forward cannot run in {dtype} "
    "here; run mlx in float32 (or on a Metal GPU)"
)


def load_port_model(
    checkpoint_dir: Path,
    port_path: Path | None,
    stock_module: str,
    stock_name: str,
    *,
    lazy: bool = False,
) -> tuple[Any, dict[str, Any], Any]:
    """(model, config, module) through ``mlx_lm.utils.load_model`` with the user's port module
    (``model_module``) or ``stock_module``: a failing user port is a PortFailure (a finding
    about the port), a checkpoint mlx-lm itself cannot load an InputError.  ``lazy``: weights
    are read when first evaluated (as ``mlx_lm convert`` loads)."""
    from mlx_lm.utils import load_model

    arch = _import_port(Path(port_path)) if port_path else importlib.import_module(stock_module)
    try:
        model, config = load_model(
            checkpoint_dir, lazy=lazy,
            get_model_classes=lambda config: (arch.Model, arch.ModelArgs),
        )
    except Exception as e:
        if port_path:
            raise PortFailure(
                f"{port_path}: loading {checkpoint_dir} with this MLX port failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        raise InputError(
            f"{checkpoint_dir}: {stock_name} could not load this checkpoint: "
            f"{type(e).__name__}: {e}"
        ) from e
    return model, config, arch


class _Recorder(Recorder):
    """The recorder plus the router's (ids, weights) pair."""

    def put_route(self, topk: str, weights: str, out: Any) -> None:
        """Router ids and weights travel together: sorting the ids reorders the weights."""
        if (self.wants(topk) or self.wants(weights)) and isinstance(out, tuple) and len(out) == 2:
            self.store[f"{topk}{PAIR}{weights}"] = out


class MlxLoadedModel:
    """A loaded mlx-lm model with recording taps; sessions own mlx-lm's caches."""

    def __init__(
        self, model: Any, config: dict[str, Any], dtype: str, stream: Any, module: str
    ) -> None:
        self.model = model
        self.config = config
        self.dtype = dtype
        self.module = module
        self._stream = stream
        self._recorder = _Recorder()
        self.layers = _layers(model)
        self.n_layers = len(self.layers)
        self.vocab_size = int(config.get("vocab_size", 0)) or None
        self.findings: list[str] = []  # what loading noticed (e.g. a quantized directory ran)
        _install_taps(model, self.layers, self._recorder)

    def start(self, capture: Collection[str] = ()) -> MlxSession:
        """A fresh session with a fresh ``model.make_cache()``."""
        return MlxSession(self, wanted_points(capture))


class MlxSession:
    """One sequence: prefill and single-token steps go through mlx-lm's KV cache and GLA state."""

    def __init__(self, loaded: MlxLoadedModel, wanted: frozenset[str]) -> None:
        self._loaded = loaded
        self._wanted = wanted
        with port_boundary("mlx", "make_cache() failed"):
            self._cache = loaded.model.make_cache()

    def feed(self, tokens: Sequence[int]) -> Captures:
        """Run the model on ``tokens`` with this session's cache; captures for these tokens."""
        import mlx.core as mx

        tokens = [int(t) for t in tokens]
        if not tokens:
            raise InputError("mlx backend: feed() needs at least one token")
        vocab = self._loaded.vocab_size
        if vocab is not None and not all(0 <= t < vocab for t in tokens):
            raise InputError(f"mlx backend: token ids outside the vocabulary [0, {vocab})")

        loaded = self._loaded
        rec = loaded._recorder
        store: dict[str, Any] = {}
        rec.wanted, rec.store = self._wanted, store
        try:
            with mx.stream(loaded._stream):
                logits = loaded.model(mx.array([tokens]), cache=self._cache)
                store["result_output"] = logits
                mx.eval(list(store.values()))
                # The caches are lazy too: evaluate them now so a later step cannot fail late.
                mx.eval([c.state for c in self._cache if hasattr(c, "state")])
        except Exception as e:
            raise _port_failure(e, loaded.dtype) from e
        finally:
            rec.wanted, rec.store = frozenset(), None
        return _convert(store, self._wanted)


# ---------------------------------------------------------------------------------------------
# Loading helpers


def check_dtype(dtype: str) -> str:
    """``dtype`` if mlx can compute in it here; InputError (naming the choices) otherwise."""
    if dtype == "float64":
        raise InputError(
            "mlx backend: float64 is not supported (mlx has no float64 matmul on CPU and none "
            "at all on GPU); use float32, bfloat16 or float16"
        )
    if dtype not in _DTYPES:
        raise InputError(f"mlx backend: unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}")
    return dtype


def stream_for(device: str) -> Any:
    """The mlx stream for ``device`` ("cpu" or "gpu"); InputError when it is not available."""
    import mlx.core as mx

    if device == "cpu":
        return mx.cpu
    if device == "gpu":
        if not mx.is_available(mx.gpu):
            raise InputError("mlx backend: device 'gpu' requested but mlx has no GPU here")
        return mx.gpu
    raise InputError(f"mlx backend: unknown device {device!r}; known: cpu, gpu")


def _import_port(path: Path) -> ModuleType:
    """Import a user's port as ``mlx_lm.models._port_<hash>`` so ``from .base import ...`` works."""
    import mlx_lm.models  # noqa: F401  (the parent package must be imported first)

    path = path.expanduser().resolve()
    if not path.is_file():
        raise InputError(f"{path}: model_module file not found")
    try:
        source = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: model_module cannot be read ({e})") from None
    digest = hashlib.sha256(str(path).encode() + b"\0" + source).hexdigest()[:12]
    name = f"mlx_lm.models._port_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"{path}: model_module is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "mlx_lm.models"
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        sys.modules.pop(name, None)
        raise InputError(
            f"{path}: model_module has a syntax error (line {e.lineno}: {e.msg})"
        ) from None
    except Exception as e:
        sys.modules.pop(name, None)
        raise InputError(
            f"{path}: model_module failed to import: {type(e).__name__}: {e}"
        ) from None
    missing = [n for n in ("Model", "ModelArgs") if not isinstance(getattr(module, n, None), type)]
    if missing:
        sys.modules.pop(name, None)
        raise InputError(
            f"{path}: model_module defines no {' or '.join(missing)} class "
            "(it must be shaped like mlx_lm/models/bailing_hybrid.py)"
        )
    return module


def cast_parameters(model: Any, dtype: Any) -> None:
    """Cast float parameters; below float32, keep what the module's ``cast_predicate`` protects."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    keep = getattr(model, "cast_predicate", None) if dtype != mx.float32 else None

    def cast(path: str, x: Any) -> Any:
        if not isinstance(x, mx.array) or not mx.issubdtype(x.dtype, mx.floating):
            return x
        if keep is not None and not keep(path):
            return x
        return x.astype(dtype)

    model.update(tree_map_with_path(cast, model.parameters()))
    mx.eval(model.parameters())


def _port_failure(e: Exception, dtype: str) -> PortFailure:
    text = f"{type(e).__name__}: {e}"
    if "GatherMM" in text and "float32" in text:
        return PortFailure(f"{_GATHER_MM_HINT.format(dtype=dtype)} ({text})")
    return PortFailure(f"mlx forward failed: {text}")


# ---------------------------------------------------------------------------------------------
# Capture taps


def _layers(model: Any) -> list[Any]:
    inner = model.get("model") if hasattr(model, "get") else None
    layers = inner.get("layers") if inner is not None and hasattr(inner, "get") else None
    if layers is None:
        layers = getattr(model, "layers", None)
    if layers is None:
        raise PortFailure("mlx model has neither model.model.layers nor model.layers")
    return list(layers)


_TAPPED: dict[type, type] = {}


def _tapped_class(base: type) -> type:
    """A subclass of ``base`` whose ``__call__`` reports inputs/outputs to the recorder."""
    if getattr(base, "_parity_tapped", False):
        return base
    cls = _TAPPED.get(base)
    if cls is not None:
        return cls

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        rec: _Recorder = self._parity_rec
        if rec.store is None:
            return base.__call__(self, *args, **kwargs)
        for where, name in self._parity_taps:
            if where == "in" and args:
                rec.put(name, args[0])
        out = base.__call__(self, *args, **kwargs)
        for where, name in self._parity_taps:
            if where == "out":
                rec.put(name, out)
            elif where == "route":
                topk, weights = name.split(PAIR)
                rec.put_route(topk, weights, out)
        return out

    cls = type(base.__name__, (base,), {"__call__": __call__, "_parity_tapped": True})
    cls.__qualname__ = base.__qualname__
    cls.__module__ = base.__module__
    _TAPPED[base] = cls
    return cls


def tap(module: Any, rec: _Recorder, *taps: tuple[str, str]) -> None:
    """Make ``module`` record ``taps`` ((where, canonical name)) without touching its parameters.

    ``nn.Module`` is a dict of parameters and children; plain Python attributes live in the
    instance ``__dict__`` and are invisible to ``parameters()``/``load_weights``.
    """
    if module is None or not callable(module):
        return
    previous = module.__dict__.get("_parity_taps", ())
    object.__setattr__(module, "_parity_rec", rec)
    object.__setattr__(module, "_parity_taps", tuple(previous) + taps)
    module.__class__ = _tapped_class(type(module))


def child(module: Any, name: str) -> Any:
    """The named child of an mlx module, or None (so a missing child means no capture point)."""
    return module.get(name) if module is not None and hasattr(module, "get") else None


def _install_taps(model: Any, layers: list[Any], rec: _Recorder) -> None:
    """Map mlx-lm's module tree onto the canonical capture points (missing children: no point)."""
    for i, layer in enumerate(layers):
        tap(layer, rec, ("out", layer_point("l_out", i)))
        tap(child(layer, "input_layernorm"), rec, ("out", layer_point("attn_norm", i)))
        attn = child(layer, "attention")
        tap(attn, rec, ("out", layer_point("attn_out", i)))
        tap(child(attn, "kv_a_layernorm"), rec, ("out", layer_point("kv_cmpr", i)))
        tap(child(attn, "g_norm"), rec, ("in", layer_point("gla_out", i)))
        tap(child(attn, "g_proj"), rec, ("out", layer_point("g_gate", i)))
        tap(
            child(layer, "post_attention_layernorm"),
            rec,
            ("in", layer_point("ffn_inp", i)),
            ("out", layer_point("ffn_norm", i)),
        )
        mlp = child(layer, "mlp")
        tap(mlp, rec, ("out", layer_point("ffn_out", i)))
        gate = child(mlp, "gate")
        if gate is not None and child(gate, "gate_proj") is not None:  # a router, not a SwiGLU
            tap(child(gate, "gate_proj"), rec, ("out", layer_point("ffn_moe_logits", i)))
            route = f"{layer_point('ffn_moe_topk', i)}{PAIR}{layer_point('ffn_moe_weights', i)}"
            tap(gate, rec, ("route", route))
        tap(child(mlp, "shared_experts"), rec, ("out", layer_point("ffn_shexp", i)))
    tap(child(child(model, "model"), "norm"), rec, ("out", "result_norm"))


def _convert(store: dict[str, Any], wanted: frozenset[str]) -> Captures:
    """numpy captures from the recorded mlx arrays (already evaluated)."""
    out: Captures = {}
    for key, value in store.items():
        if PAIR not in key:
            out[key] = _to_numpy(value)
            continue
        topk, weights = key.split(PAIR)
        ids, w = _to_numpy(value[0]), _to_numpy(value[1])
        order = np.argsort(ids, axis=-1, kind="stable")
        if topk in wanted:
            out[topk] = np.take_along_axis(ids, order, axis=-1).astype(np.int64)
        if weights in wanted:
            out[weights] = np.take_along_axis(w, order, axis=-1)
    return out


def _to_numpy(value: Any) -> np.ndarray:
    """float64 (int64 for integer arrays) with the batch axis dropped; bf16 goes via float32."""
    import mlx.core as mx

    if not isinstance(value, mx.array) or value.ndim < 1:
        shape = getattr(value, "shape", None)
        raise PortFailure(f"the MLX model returned {type(value).__name__}"
                          f"{f' of shape {tuple(shape)}' if shape is not None else ''} where an "
                          "array with a batch axis was expected (returned no logits?)")
    if mx.issubdtype(value.dtype, mx.integer):
        return np.array(value.astype(mx.int64), copy=True)[0]
    return np.array(value.astype(mx.float32), copy=True).astype(np.float64)[0]
