"""The MLX candidate: mlx-lm's Ling-2.6 module (or a user's port shaped like it), run as shipped.

The checkpoint goes through mlx-lm's own loader (``mlx_lm.utils.load_model``: config parsing,
``sanitize``, expert stacking, MLA ``kv_b_proj`` absorption) and every token goes through mlx-lm's
own caches (``KVCache`` for MLA, ``ArraysCache`` for the GLA state), so what is measured is what a
user of mlx-lm runs.  Loading, taps and sessions are :mod:`harness.backends.mlx_model`'s (shared
with Ling 3.0's :mod:`harness.backends.mlx_ling3`, which a Ling 3.0 checkpoint is handed to).
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

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

STOCK_MODULE = "mlx_lm.models.bailing_hybrid"


@dataclass(frozen=True)
class MlxOptions:
    """The MLX candidate's knobs."""

    model_module: Path | None = None  # a user's port file, shaped like mlx-lm's module


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
        """Load via ``mlx_lm.utils.load_model`` with the Ling-2.6 module (or the user's port)."""
        import mlx.core as mx

        checkpoint_dir = Path(checkpoint_dir)
        dtype = check_dtype(options.dtype)
        port_path = mlx_options(options).model_module  # a bad key is refused before loading
        stream = stream_for(options.device)
        if _check_config(checkpoint_dir) == "ling3":  # Ling 3.0: mlx-lm's bailing_moe_v3
            return load_ling3(checkpoint_dir, options, port_path)

        model, config, arch = load_port_model(checkpoint_dir, port_path, STOCK_MODULE, "mlx-lm")
        cast_parameters(model, getattr(mx, dtype))
        return MlxLoadedModel(model, config, dtype, stream, module=arch.__name__)


def _check_config(checkpoint_dir: Path) -> str:
    """The checkpoint's family (``harness.backends.families``), decided before mlx-lm guesses a
    module."""
    path = checkpoint_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object")
    return family_of(raw, path).name
