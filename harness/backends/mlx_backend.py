"""The MLX candidate: mlx-lm's Ling-2.6 module (or a user's port shaped like it), run as shipped.

The checkpoint goes through mlx-lm's own loader (``mlx_lm.utils.load_model``: config parsing,
``sanitize``, expert stacking, MLA ``kv_b_proj`` absorption) and every token goes through mlx-lm's
own caches (``KVCache`` for MLA, ``ArraysCache`` for the GLA state), so what is measured is what a
user of mlx-lm runs.

Quantized candidates: ``bits=4[:group=64]`` quantizes the checkpoint with mlx-lm's own code path
(:mod:`harness.quant.mlx_quantize`, cached) and ``model_dir=DIR`` runs a user's MLX model directory
(``mlx_lm convert`` output, quantized or not); both load that directory exactly as mlx-lm loads
it.  :func:`candidate_mlx_dir` names the directory without loading it, so that the reference can
run on its dequantized weights (``torch-float64:weights_mlx=DIR``).

Loading, taps and sessions are :mod:`harness.backends.mlx_model`'s (shared
with Ling 3.0's :mod:`harness.backends.mlx_ling3`, which a Ling 3.0 checkpoint is handed to).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.backends.base import Availability, BackendOptions
from harness.backends.families import family_of
from harness.backends.mlx_ling3 import load_ling3
from harness.backends.mlx_model import (
    MlxLoadedModel,
    cast_parameters,
    check_dtype,
    load_port_model,
    stream_for,
)
from harness.backends.options import parse_options
from harness.core.errors import InputError
from harness.quant.mlx_quantize import (
    DEFAULT_GROUP,
    bits_group_problem,
    check_same_weights,
    conversion_note,
    dir_quantization,
    quantize_checkpoint,
    read_config,
)

STOCK_MODULE = "mlx_lm.models.bailing_hybrid"
STOCK_MODULES = {"ling26": (STOCK_MODULE, "mlx-lm"),
                 "ling3": ("mlx_lm.models.bailing_moe_v3", "mlx-lm's bailing_moe_v3 (Ling 3.0)")}
# config.json keys an MLX conversion may change without changing the model
_CONVERSION_KEYS = frozenset({"torch_dtype", "dtype", "transformers_version", "_name_or_path",
                              "quantization", "quantization_config"})


@dataclass(frozen=True)
class MlxOptions:
    """The MLX candidate's knobs."""

    model_module: Path | None = None  # a user's port file, shaped like mlx-lm's module
    bits: int | None = None  # quantize the checkpoint with mlx-lm (2, 3, 4, 5, 6, 8)
    group: int | None = None  # its group size (32, 64, 128; 64 when bits is given)
    model_dir: Path | None = None  # a user's MLX model directory (mlx_lm convert output)

    def __post_init__(self) -> None:
        problem = bits_group_problem(self.bits, self.group)
        if problem is None and self.bits is not None and self.model_dir is not None:
            problem = (f"options bits={self.bits} and model_dir={self.model_dir} conflict: "
                       "model_dir runs the given directory as it is (drop one)")
        if problem:
            raise ValueError(problem)  # parse_options names the backend

    @property
    def group_size(self) -> int | None:
        """The group mlx-lm quantizes with (None: no ``bits``)."""
        return None if self.bits is None else (self.group or DEFAULT_GROUP)


def mlx_options(options: BackendOptions) -> MlxOptions:
    """The typed options a target parsed, or ``options.extra`` parsed now (direct callers)."""
    if isinstance(options.settings, MlxOptions):
        return options.settings
    return parse_options(MlxOptions, options.extra, "mlx backend")


class MlxBackend:
    """mlx-lm's ``bailing_hybrid`` (Ling-2.6) as a candidate implementation."""

    name = "mlx"

    def availability(self) -> Availability:
        """mlx and mlx-lm must both import; the reason says how to install what is missing."""
        for pkg, pip_name in (("mlx.core", "mlx"), ("mlx_lm", "mlx-lm")):
            try:
                importlib.import_module(pkg)
            except Exception as e:  # ImportError, or a broken native extension
                extra = "mlx[cpu]" if pip_name == "mlx" and sys.platform != "darwin" else pip_name
                return Availability(
                    False, f"{pip_name} is not importable ({e}); install with: pip install {extra}"
                )
        return Availability(True)

    def load(self, checkpoint_dir: Path, options: BackendOptions) -> MlxLoadedModel:
        """Load via ``mlx_lm.utils.load_model`` with the Ling-2.6 module (or the user's port),
        from the checkpoint or from the MLX directory ``bits``/``model_dir`` name."""
        import mlx.core as mx

        checkpoint_dir = Path(checkpoint_dir)
        dtype = check_dtype(options.dtype)
        settings = mlx_options(options)  # a bad key is refused before loading
        port_path = settings.model_module
        stream = stream_for(options.device)
        family = _check_config(checkpoint_dir)
        source = _model_dir(checkpoint_dir, settings, family) or checkpoint_dir
        if family == "ling3":  # Ling 3.0: mlx-lm's bailing_moe_v3
            loaded: MlxLoadedModel = load_ling3(source, options, port_path)
        else:
            model, config, arch = load_port_model(source, port_path, STOCK_MODULE, "mlx-lm")
            cast_parameters(model, getattr(mx, dtype))
            loaded = MlxLoadedModel(model, config, dtype, stream, module=arch.__name__)
        if source != checkpoint_dir:
            q, said = dir_quantization(source), conversion_note(source)
            loaded.findings.append(
                f"mlx runs the MLX model directory {source} "
                f"({q.tag if q else 'unquantized'}), not the checkpoint's safetensors"
                + (f"; mlx-lm: {said.removeprefix('[INFO] ')}" if said else ""))
        return loaded


def candidate_mlx_dir(target_or_options: Any, checkpoint_dir: Path) -> Path | None:
    """The MLX model directory an mlx target runs on ``checkpoint_dir``: ``bits=``'s mlx-lm
    quantization (built and cached as needed, without loading the model) or the user's
    ``model_dir=``; None when it runs the checkpoint's own weights (no ``bits``/``model_dir``,
    or an unquantized ``model_dir`` in the checkpoint's dtype; a bfloat16 conversion of a
    float32 checkpoint is returned, its weights are rounded).

    ``target_or_options``: a :class:`~harness.backends.targets.Target` or
    :class:`BackendOptions` of the mlx backend.
    """
    from harness.backends.targets import options_of

    checkpoint = Path(checkpoint_dir)
    settings = mlx_options(options_of(target_or_options, "mlx", "MLX model directory"))
    folder = _model_dir(checkpoint, settings, _check_config(checkpoint))
    if folder is not None and settings.model_dir is not None and dir_quantization(folder) is None:
        return None if check_same_weights(folder, checkpoint) else folder
    return folder


def _model_dir(checkpoint_dir: Path, settings: MlxOptions, family: str) -> Path | None:
    """The directory to load instead of the checkpoint (None: the checkpoint), checked to be
    the checkpoint's model."""
    if settings.model_dir is not None:
        model_dir = settings.model_dir.expanduser().resolve()
        if not (model_dir / "config.json").is_file():
            raise InputError(f"mlx: model_dir={settings.model_dir}: no config.json there (an MLX "
                             "model directory, e.g. mlx_lm convert output, was expected)")
        _check_same_model(model_dir, checkpoint_dir, family)
        check_same_weights(model_dir, checkpoint_dir)
        return model_dir
    if settings.bits is None:
        return None
    module, name = STOCK_MODULES[family]
    return quantize_checkpoint(checkpoint_dir, settings.bits, settings.group_size or 0,
                               port_path=settings.model_module, stock_module=module,
                               stock_name=name)


def _check_same_model(model_dir: Path, checkpoint_dir: Path, family: str) -> None:
    """A model_dir of another family, or whose config.json differs from the checkpoint's in a
    key a conversion does not touch, is refused naming the keys."""
    mine = read_config(model_dir)
    theirs = read_config(checkpoint_dir)
    if family_of(mine, model_dir / "config.json").name != family:
        raise InputError(f"mlx: model_dir={model_dir}: its config.json is not of the "
                         f"checkpoint's family ({family})")
    differ = sorted(k for k, v in theirs.items()
                    if k not in _CONVERSION_KEYS and k in mine and mine[k] != v)
    if differ:
        shown = ", ".join(f"{k}={mine[k]!r} (checkpoint: {theirs[k]!r})" for k in differ[:3])
        raise InputError(f"mlx: model_dir={model_dir}: config.json differs from "
                         f"{checkpoint_dir}'s: {shown}{' ...' if len(differ) > 3 else ''}")


def _check_config(checkpoint_dir: Path) -> str:
    """The checkpoint's family (``harness.backends.families``), decided before mlx-lm guesses a
    module."""
    from references.config import read_config_json

    path = checkpoint_dir / "config.json"
    return family_of(read_config_json(path), path).name
