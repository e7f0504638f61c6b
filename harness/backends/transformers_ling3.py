"""Ling 3.0's reference: transformers' ``BailingHybridForCausalLM`` behind the Backend protocol.

There is no hand-written Ling 3.0 reference; the ``transformers`` backend runs transformers' own
model, and ``torch-float64`` on a Ling 3.0 checkpoint is an alias of ``transformers-float64``
(:mod:`harness.backends.registry`), kept so the stored labels stay.
Activations are captured with forward hooks on transformers' modules, mapped onto the canonical
names; sessions decode through transformers' own ``DynamicCache`` (MLA latent KV, KDA conv and
recurrent state), so a prefill followed by one-token feeds is what ``generate`` runs.

Caveat, measured and reported rather than hidden: transformers computes RMSNorm, the gated
``o_norm``, the router, the KDA short convolution and the KDA recurrence in float32 even when the
model is loaded in float64 (explicit ``.to(torch.float32)`` casts and
``_keep_in_fp32_modules_strict``), so this "float64" reference is float32-accurate in those places.

Options: :class:`TransformersOptions`.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from harness.backends.base import (
    DTYPES,
    Availability,
    BackendOptions,
    Captures,
    Recorder,
    wanted_points,
)
from harness.backends.options import parse_options
from harness.core.capture_points import layer_point
from harness.core.errors import InputError

WHERE = "transformers (Ling 3.0)"


@dataclass(frozen=True)
class TransformersOptions:
    """transformers' knobs, plus the MTP mutation our head on its trunk may run."""

    # sdpa (default): its float64 softmax stays float64 where eager's is float32
    attn_implementation: Literal["sdpa", "eager"] | None = None
    # default eager for float64 (grouped_mm rejects float64 at run time), transformers' otherwise
    experts_implementation: Literal["eager", "grouped_mm"] | None = None
    variant: str | None = None  # MTP runs only: one of the mtp_* mutations (references.ling3.mtp)
    # a GGUF whose dequantized weights replace the checkpoint's (a quantized port's own weights,
    # every weight of transformers' model overwritten: harness.backends.transformers_port_weights)
    weights_gguf: Path | None = None
    # an MLX model directory (mlx-lm's bailing_moe_v3) whose dequantized weights replace the
    # checkpoint's (harness.quant.mlx_weights, written back the same way); mlx's quantized matmul
    # keeps float32 activations, so none are rounded
    weights_mlx: Path | None = None
    # how activations reach each projection: exactly, or rounded as the port's matmul rounds them
    # (ggml-cpu; MLA then attends absorbed: harness.backends.transformers_port_arithmetic)
    activations: Literal["exact", "ggml-cpu"] | None = None

    def __post_init__(self) -> None:
        if self.weights_gguf is not None and self.weights_mlx is not None:
            raise ValueError(f"weights_gguf={self.weights_gguf} and weights_mlx="
                             f"{self.weights_mlx} conflict: the reference runs one set of weights")
        if self.activations == "ggml-cpu" and self.weights_gguf is None:
            raise ValueError("activations=ggml-cpu rounds activations by each GGUF tensor's "
                             "type: it needs weights_gguf=<file>"
                             + (" (mlx's quantized matmul rounds no activation)"
                                if self.weights_mlx is not None else ""))


def transformers_options(options: BackendOptions) -> TransformersOptions:
    """The typed options a target parsed, or ``options.extra`` parsed now (direct callers)."""
    if isinstance(options.settings, TransformersOptions):
        return options.settings
    return parse_options(TransformersOptions, options.extra, WHERE)


class TransformersBackend:
    """transformers' ``BailingHybridForCausalLM``: Ling 3.0's reference and a candidate."""

    name = "transformers"

    def availability(self) -> Availability:
        try:
            import torch  # noqa: F401
            from transformers import BailingHybridForCausalLM  # noqa: F401
        except ImportError as e:
            return Availability(False, f"transformers' BailingHybridForCausalLM is not "
                                       f"importable ({e}); pip install 'transformers>=5.23'")
        return Availability(True)

    def load(self, checkpoint_dir: Path, options: BackendOptions) -> TransformersLing3Model:
        return load_ling3(checkpoint_dir, options)


def load_mtp(checkpoint_dir: Path, options: BackendOptions, label: str) -> Any:
    """transformers' trunk with our MTP head (references.ling3.mtp), which reads ``variant``
    from the option strings itself."""
    from references.ling3.mtp import load_ling3_mtp

    return load_ling3_mtp(Path(checkpoint_dir), replace(options, settings=None), label,
                          load_trunk=load_ling3)


def load_ling3(checkpoint_dir: Path, options: BackendOptions) -> TransformersLing3Model:
    """Load a (normalised) Ling 3.0 checkpoint into transformers in ``options.dtype``."""
    checkpoint_dir = Path(checkpoint_dir)
    if options.dtype not in DTYPES:
        raise InputError(f"{WHERE}: unknown dtype {options.dtype!r}; known: {', '.join(DTYPES)}")
    opts = transformers_options(options)
    if opts.variant is not None:
        raise InputError(f"{WHERE}: variant={opts.variant!r} applies to MTP runs only (the "
                         "trunk is transformers' own, which has no mutations)")
    try:
        import torch
        from transformers import BailingHybridForCausalLM
    except ImportError as e:
        raise InputError(
            f"{checkpoint_dir}: Ling 3.0's reference is transformers' BailingHybridForCausalLM, "
            f"which is not importable ({e}); install with: pip install 'transformers>=5.23'"
        ) from None
    from references.ling3.config import load_config

    cfg = load_config(checkpoint_dir)  # names a bad key before transformers guesses around it
    from references.checkpoint_io import weight_files

    weight_files(checkpoint_dir)  # a tensor in two files is refused before transformers picks one
    weights = None
    if opts.weights_gguf is not None:
        weights = _gguf_weights(checkpoint_dir, opts.weights_gguf)
    elif opts.weights_mlx is not None:
        weights = _mlx_weights(checkpoint_dir, opts.weights_mlx)
    dtype = getattr(torch, options.dtype)
    experts = opts.experts_implementation or ("eager" if options.dtype == "float64" else None)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": opts.attn_implementation
                              or "sdpa"}
    if experts is not None:
        kwargs["experts_implementation"] = experts
    try:
        model = BailingHybridForCausalLM.from_pretrained(checkpoint_dir, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(
            f"{checkpoint_dir}: transformers could not load this Ling 3.0 checkpoint: "
            f"{type(e).__name__}: {e}"
        ) from None
    model = model.to(options.device).eval()
    loaded = TransformersLing3Model(model, cfg.vocab_size, options.dtype)
    if weights is None:
        return loaded
    from harness.backends.transformers_port_weights import load_port_weights

    load_port_weights(model, weights)
    loaded.weights_source = weights
    if opts.weights_gguf is not None:
        if opts.activations == "ggml-cpu":
            from harness.backends.transformers_port_arithmetic import install

            loaded.port_arithmetic = install(model, weights)
        loaded.findings = [
            f"reference weights dequantized from {opts.weights_gguf} (every weight of "
            "transformers' model overwritten), not read from the checkpoint's safetensors"
            + ("; activations rounded as ggml-cpu's matmuls round them, MLA absorbed"
               if opts.activations == "ggml-cpu" else "")]
    else:  # MlxWeights: what it dequantized, what it read from elsewhere
        loaded.findings = [f"{weights.findings[0]}; every weight of transformers' model "
                           "overwritten; activations exact (mlx's quantized matmul keeps them "
                           "in float32)", *weights.findings[1:]]
    return loaded


def _gguf_weights(checkpoint_dir: Path, gguf: Path) -> Any:
    """``weights_gguf`` read back under the checkpoint's names."""
    from harness.quant.gguf_weights import GgufWeights
    from references.config import read_config_json

    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise InputError(f"{WHERE}: weights_gguf={gguf}: file not found")
    return GgufWeights(gguf, read_config_json(checkpoint_dir / "config.json"))


def _mlx_weights(checkpoint_dir: Path, model_dir: Path) -> Any:
    """``weights_mlx`` read back under the checkpoint's names."""
    from harness.quant.mlx_weights import MlxWeights

    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{WHERE}: weights_mlx={model_dir}: no config.json there (an MLX model "
                         "directory was expected)")
    return MlxWeights(model_dir, checkpoint_dir)


class _Recorder(Recorder):
    """Keeps detached tensors (no autograd graph held by the captures)."""

    def put(self, name: str, value: Any) -> None:
        super().put(name, value.detach() if self.wants(name) else value)


Hook = Callable[[Any, tuple[Any, ...], Any], None]


class TransformersLing3Model:
    """transformers' Ling 3.0 with capture hooks; sessions own a ``DynamicCache``.

    ``anchors`` (:meth:`start`): per point of :data:`ANCHOR_STEMS` (and ``result_norm``), rows
    that replace the model's own output there once it is captured, so every sublayer after it
    starts from a port's values (:func:`harness.checks.quantized.anchored_captures`).
    transformers' decoder layer keeps its residual in a local variable, so ``ffn_inp`` is not
    an anchor here: ``l_out`` then carries the ``ffn_inp`` difference, which ``ffn_inp`` itself
    shows, and the next layer starts from the port's ``l_out`` again."""

    ANCHOR_STEMS: tuple[str, ...] = ("attn_norm", "ffn_norm", "l_out")

    def __init__(self, model: Any, vocab_size: int, dtype: str) -> None:
        self.model = model
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.n_layers = int(model.config.num_hidden_layers)
        self.weights_source: Any = None  # a port's weights (GgufWeights, MlxWeights), if any
        self.port_arithmetic: Any = None  # PortArithmetic: the rounding of a GGUF it emulates
        self.findings: list[str] = []
        self._anchors: dict[str, Any] = {}
        # transformers 5.24 renamed past_key_values to cache (the old name warns until 5.40).
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._rec = _Recorder()
        self._install_hooks()

    def start(self, capture: Collection[str] = (),
              anchors: Mapping[str, np.ndarray] | None = None) -> TransformersLing3Session:
        return TransformersLing3Session(self, wanted_points(capture), anchors or {})

    # -- hooks ------------------------------------------------------------------------------

    def _out(self, name: str) -> Hook:
        rec = self._rec

        def hook(module: Any, args: tuple[Any, ...], out: Any) -> None:
            rec.put(name, out[0] if isinstance(out, tuple) else out)

        return hook

    def _in(self, name: str, flatten_heads: bool = False) -> Hook:
        rec = self._rec

        def hook(module: Any, args: tuple[Any, ...], out: Any) -> None:
            if args and rec.wants(name):
                x = args[0]
                rec.put(name, x.flatten(-2) if flatten_heads else x)

        return hook

    def _anchor(self, name: str) -> Hook:
        """Registered after the capture hooks: the capture keeps the model's own value."""
        anchors = self._anchors

        def hook(module: Any, args: tuple[Any, ...], out: Any) -> Any:
            rows = anchors.get(name)
            if rows is None:
                return None
            value = out[0] if isinstance(out, tuple) else out
            return rows.to(value)[None].reshape(value.shape)

        return hook

    def _route(self, i: int) -> Hook:
        """The router returns (logits [T,E], weights [T,k], ids [T,k]): ids sorted, weights too."""
        rec = self._rec
        logits, topk, weights = (
            layer_point("ffn_moe_logits", i),
            layer_point("ffn_moe_topk", i),
            layer_point("ffn_moe_weights", i),
        )

        def hook(module: Any, args: tuple[Any, ...], out: Any) -> None:
            import torch

            router_logits, w, ids = out
            rec.put(logits, router_logits[None])
            ids_sorted, order = torch.sort(ids, dim=-1, stable=True)
            rec.put(topk, ids_sorted[None])
            rec.put(weights, torch.gather(w, -1, order)[None])

        return hook

    def _install_hooks(self) -> None:
        inner = self.model.model
        for i, layer in enumerate(inner.layers[: self.n_layers]):
            layer.register_forward_hook(self._out(layer_point("l_out", i)))
            layer.input_layernorm.register_forward_hook(self._out(layer_point("attn_norm", i)))
            attn = layer.self_attn
            attn.register_forward_hook(self._out(layer_point("attn_out", i)))
            attn.g_proj.register_forward_hook(self._out(layer_point("g_gate", i)))
            if hasattr(attn, "kv_a_layernorm"):  # MLA
                attn.kv_a_layernorm.register_forward_hook(self._out(layer_point("kv_cmpr", i)))
            if hasattr(attn, "o_norm"):  # KDA: recurrence output before the gated norm
                attn.o_norm.register_forward_hook(
                    self._in(layer_point("gla_out", i), flatten_heads=True)
                )
            post = layer.post_attention_layernorm
            post.register_forward_hook(self._in(layer_point("ffn_inp", i)))
            post.register_forward_hook(self._out(layer_point("ffn_norm", i)))
            mlp = layer.mlp
            mlp.register_forward_hook(self._out(layer_point("ffn_out", i)))
            if hasattr(mlp, "gate") and hasattr(mlp, "experts"):  # MoE, not the dense SwiGLU
                mlp.gate.register_forward_hook(self._route(i))
                mlp.shared_experts.register_forward_hook(self._out(layer_point("ffn_shexp", i)))
        inner.norm.register_forward_hook(self._out("result_norm"))
        for i, layer in enumerate(inner.layers[: self.n_layers]):
            layer.input_layernorm.register_forward_hook(self._anchor(layer_point("attn_norm", i)))
            layer.post_attention_layernorm.register_forward_hook(
                self._anchor(layer_point("ffn_norm", i)))
            layer.register_forward_hook(self._anchor(layer_point("l_out", i)))
        inner.norm.register_forward_hook(self._anchor("result_norm"))


class TransformersLing3Session:
    """One sequence: the first feed prefills, later feeds continue through the same cache."""

    def __init__(self, loaded: TransformersLing3Model, wanted: frozenset[str],
                 anchors: Mapping[str, np.ndarray]) -> None:
        from transformers import DynamicCache

        self._loaded = loaded
        self._wanted = wanted
        self._anchors = dict(anchors)  # for the first feed (the prompt) only
        self._cache = DynamicCache(config=loaded.model.config)

    def snapshot(self) -> object:
        """A copy of the cache (MLA latents, KDA conv and recurrent states): transformers updates
        some of them in place, so a copy, not a reference."""
        return copy.deepcopy(self._cache)

    def restore(self, snap: object) -> None:
        """Return to a :meth:`snapshot` (which stays valid for another restore)."""
        self._cache = copy.deepcopy(snap)

    def feed(self, tokens: Sequence[int]) -> Captures:
        """Run ``tokens`` after everything fed before; captures for these tokens."""
        import torch

        tokens = [int(t) for t in tokens]
        if not tokens:
            raise InputError("torch (Ling 3.0): feed() needs at least one token")
        vocab = self._loaded.vocab_size
        if not all(0 <= t < vocab for t in tokens):
            raise InputError(f"torch (Ling 3.0): token ids outside the vocabulary [0, {vocab})")
        loaded = self._loaded
        rec = loaded._rec
        store: dict[str, Any] = {}
        rec.wanted, rec.store = self._wanted, store
        anchors = {}
        for name, rows in self._anchors.items():
            if np.asarray(rows).shape[0] != len(tokens):
                raise InputError(f"torch (Ling 3.0): anchor {name} has {len(rows)} rows for "
                                 f"{len(tokens)} tokens")
            anchors[name] = torch.as_tensor(np.asarray(rows, dtype=np.float64))
        self._anchors = {}
        loaded._anchors.update(anchors)
        device = next(loaded.model.parameters()).device
        cache_kw = {loaded.cache_kwarg: self._cache}
        try:
            with torch.no_grad():
                out = loaded.model(
                    input_ids=torch.tensor([tokens], device=device), use_cache=True, **cache_kw
                )
        finally:
            rec.wanted, rec.store = frozenset(), None
            loaded._anchors.clear()
        store["result_output"] = out.logits
        return {name: _to_numpy(value) for name, value in store.items()}


def _to_numpy(value: Any) -> np.ndarray:
    """float64 (int64 for ids) with the batch axis dropped."""
    import torch

    if not value.is_floating_point():
        return value[0].to(torch.int64).cpu().numpy()
    return value[0].to(torch.float64).cpu().numpy()
