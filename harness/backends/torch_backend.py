"""The PyTorch reference (:mod:`references.model`) behind the common Backend protocol.

``torch-float64`` is the harness's reference; other dtypes, the alternative GLA/MLA forms and the
named mutations (``variant=<name>``) make it a candidate too.  Recognised ``extra`` options:
``gla_impl`` (chunked|recurrent), ``chunk_size`` (int), ``mla_impl`` (naive|absorbed),
``slope_formula`` (corrected|hf_off_by_one), ``variant`` (a name from
:func:`references.variant.mutations`) and ``load`` (auto|memory|streamed: how the weights are held,
:func:`references.weights.choose_load`; streamed reads each weight from the files when a forward
needs it, so memory does not grow with layers or experts).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from harness.backends.base import DTYPES, Availability, BackendOptions, LoadedModel
from harness.core.errors import InputError
from harness.core.progress import LayerProgress

EXTRA_KEYS = ("gla_impl", "chunk_size", "mla_impl", "slope_formula", "variant", "load")


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
        from harness.backends.transformers_ling3 import checkpoint_family, load_ling3

        if checkpoint_family(Path(checkpoint_dir)) == "ling3":  # Ling 3.0: transformers' model
            return load_ling3(Path(checkpoint_dir), options)
        from references.model import BailingHybridReference

        model = BailingHybridReference.from_checkpoint(
            Path(checkpoint_dir), reference_options(options)
        )
        if model.streamed:  # a real checkpoint's forward reads it all: minutes, so show it
            model.layer_done = LayerProgress(
                f"{checkpoint_dir} forward ({options.dtype}, streamed)")
        return model


def reference_options(options: BackendOptions):
    """Map backend options onto :class:`references.model.ReferenceOptions` (InputError if bad)."""
    from references.model import ReferenceOptions
    from references.variant import Variant, mutations

    if options.dtype not in DTYPES:
        raise InputError(f"torch: unknown dtype {options.dtype!r}; known: {', '.join(DTYPES)}")
    extra = dict(options.extra)
    unknown = sorted(set(extra) - set(EXTRA_KEYS))
    if unknown:
        raise InputError(f"torch: unknown option(s) {unknown}; known: {', '.join(EXTRA_KEYS)}")
    variant = Variant()
    if "variant" in extra:
        named = mutations()
        if extra["variant"] not in named:
            raise InputError(
                f"torch: unknown variant {extra['variant']!r}; known: {', '.join(sorted(named))}"
            )
        variant = named[extra["variant"]]
    kwargs: dict[str, object] = {"dtype": options.dtype, "device": options.device}
    try:
        if "slope_formula" in extra:
            variant = replace(variant, slope_formula=extra["slope_formula"])
        if "chunk_size" in extra:
            kwargs["chunk_size"] = _int(extra["chunk_size"])
        for key in ("gla_impl", "mla_impl", "load"):
            if key in extra:
                kwargs[key] = extra[key]
        return ReferenceOptions(variant=variant, **kwargs)  # type: ignore[arg-type]
    except ValueError as e:
        raise InputError(f"torch: {e}") from None


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise ValueError(f"chunk_size must be an integer, got {value!r}") from None
