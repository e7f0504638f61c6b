"""The PyTorch reference (:mod:`references.model`) behind the common Backend protocol.

``torch-float64`` is the harness's reference; other dtypes, the alternative GLA/MLA forms and the
named mutations (``variant=<name>``) make it a candidate too.  Its options are
:class:`TorchOptions`.  Ling-2.6 only: Ling 3.0 has no hand-written reference and runs on the
``transformers`` backend (:mod:`harness.backends.registry`).

``weights_gguf=<file>`` builds the reference on the weights a quantized llama.cpp candidate runs
(:class:`harness.quant.gguf_weights.GgufWeights`: the GGUF dequantized exactly, under the
checkpoint's names) instead of the safetensors, so the port's own error is told from the error
its weights carry; labelled ``torch-float64,dequantized=<TYPE>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from harness.backends.base import DTYPES, Availability, BackendOptions, LoadedModel
from harness.backends.options import parse_options
from harness.core.errors import InputError
from harness.core.progress import LayerProgress


@dataclass(frozen=True)
class TorchOptions:
    """The reference's knobs (None: the reference's own default)."""

    gla_impl: Literal["chunked", "recurrent"] | None = None
    chunk_size: int | None = None
    mla_impl: Literal["naive", "absorbed"] | None = None
    # the GLA decay convention (references.variant.SLOPE_CONVENTIONS)
    slope_formula: Literal["corrected", "hf_off_by_one"] | None = None
    variant: str | None = None  # a name from references.variant.mutations()
    # how weights are held: streamed reads each weight when a forward needs it
    load: Literal["auto", "memory", "streamed"] | None = None
    # a GGUF whose dequantized weights replace the safetensors (always streamed from the file)
    weights_gguf: Path | None = None
    # a quantized MLX model directory whose dequantized weights replace the safetensors
    weights_mlx: Path | None = None
    # how activations reach each projection: exactly, or rounded as the port's matmul rounds them
    # (ggml-cpu: q8_0/q8_1/q8_K blocks, f16, bf16 by the weight's GGUF type; weights_gguf only)
    activations: Literal["exact", "ggml-cpu"] | None = None

    def __post_init__(self) -> None:
        if self.activations == "ggml-cpu" and self.weights_gguf is None:
            raise ValueError("activations=ggml-cpu rounds activations by each GGUF tensor's "
                             "type: it needs weights_gguf=<file>")


def torch_options(options: BackendOptions) -> TorchOptions:
    """The typed options a target parsed, or ``options.extra`` parsed now (direct callers)."""
    if isinstance(options.settings, TorchOptions):
        return options.settings
    return parse_options(TorchOptions, options.extra, "torch")


class TorchBackend:
    """Loads a checkpoint into :class:`references.model.BailingHybridReference`."""

    name = "torch"

    def availability(self) -> Availability:
        try:
            import torch  # noqa: F401
        except ImportError as e:
            return Availability(False, f"torch is not importable ({e})")
        return Availability(True)

    def load(self, checkpoint_dir: Path, options: BackendOptions) -> LoadedModel:
        model = build_reference(Path(checkpoint_dir), options)
        if model.streamed:  # a real checkpoint's forward reads it all: minutes, so show it
            model.layer_done = LayerProgress(
                f"{checkpoint_dir} forward ({options.dtype}, streamed)")
        return model


def load_mtp(checkpoint_dir: Path, options: BackendOptions, label: str) -> Any:
    """Our reference with its MTP head (references.mtp_session): an MtpModel."""
    from references.mtp_session import ReferenceMtpModel

    return ReferenceMtpModel(build_reference(Path(checkpoint_dir), options), label)


def build_reference(checkpoint_dir: Path, options: BackendOptions) -> Any:
    """The reference on the checkpoint's safetensors, or on ``weights_gguf``'s dequantized
    weights (checked against the checkpoint's config.json before anything is computed)."""
    from references.model import BailingHybridReference

    ref_options = reference_options(options)
    gguf = torch_options(options).weights_gguf
    if torch_options(options).weights_mlx is not None:
        return mlx_reference(checkpoint_dir, options)
    if gguf is None:
        return BailingHybridReference.from_checkpoint(checkpoint_dir, ref_options)
    from harness.quant.gguf_quantize import gguf_file_type
    from harness.quant.gguf_weights import GgufWeights
    from references.config import load_config

    if not gguf.is_file():
        raise InputError(f"torch: weights_gguf={gguf}: file not found")
    cfg_path = checkpoint_dir / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{cfg_path}: cannot read ({e})") from None
    cfg = load_config(checkpoint_dir)  # validates the config as from_checkpoint does
    activations = torch_options(options).activations or "exact"
    if activations == "ggml-cpu" and ref_options.mla_impl != "absorbed":
        # ggml rounds the query before W_kb and the attended latent before W_vb: absorbed MLA
        ref_options = replace(ref_options, mla_impl="absorbed")
    model = BailingHybridReference(cfg, GgufWeights(gguf, config, activations=activations),
                                   ref_options)
    model.findings = [f"reference weights dequantized from {gguf} ({gguf_file_type(gguf)}), "
                      "not read from the checkpoint's safetensors"
                      + ("; activations rounded as ggml-cpu's matmuls round them"
                         if activations == "ggml-cpu" else "")]
    return model


def mlx_reference(checkpoint_dir: Path, options: BackendOptions) -> Any:
    """The reference on ``weights_mlx``'s weights (:class:`harness.quant.mlx_weights.MlxWeights`:
    dequantized with ``mx.dequantize``, under the checkpoint's names; its MTP from the
    checkpoint), so an MLX candidate's own error is told from its weights'."""
    from harness.quant.mlx_weights import MlxWeights
    from references.config import load_config
    from references.model import BailingHybridReference

    opts = torch_options(options)
    if opts.weights_gguf is not None:
        raise InputError(f"torch: options weights_gguf={opts.weights_gguf} and weights_mlx="
                         f"{opts.weights_mlx} conflict: the reference runs one set of weights")
    if not (opts.weights_mlx / "config.json").is_file():
        raise InputError(f"torch: weights_mlx={opts.weights_mlx}: no config.json there (an MLX "
                         "model directory was expected)")
    cfg = load_config(checkpoint_dir)  # validates the config as from_checkpoint does
    weights = MlxWeights(opts.weights_mlx, checkpoint_dir)
    model = BailingHybridReference(cfg, weights, reference_options(options))
    model.findings = list(weights.findings)
    return model


def reference_options(options: BackendOptions):
    """Map backend options onto :class:`references.model.ReferenceOptions` (InputError if bad)."""
    from references.model import ReferenceOptions
    from references.variant import Variant, mutations

    if options.dtype not in DTYPES:
        raise InputError(f"torch: unknown dtype {options.dtype!r}; known: {', '.join(DTYPES)}")
    opts = torch_options(options)
    variant = Variant()
    if opts.variant is not None:
        named = mutations()
        if opts.variant not in named:
            raise InputError(
                f"torch: unknown variant {opts.variant!r}; known: {', '.join(sorted(named))}"
            )
        variant = named[opts.variant]
    if opts.slope_formula is not None:
        variant = replace(variant, slope_formula=opts.slope_formula)
    kwargs: dict[str, object] = {"dtype": options.dtype, "device": options.device}
    for key in ("chunk_size", "gla_impl", "mla_impl", "load"):
        if getattr(opts, key) is not None:
            kwargs[key] = getattr(opts, key)
    try:
        return ReferenceOptions(variant=variant, **kwargs)  # type: ignore[arg-type]
    except ValueError as e:
        raise InputError(f"torch: {e}") from None
