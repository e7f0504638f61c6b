"""The MLX candidate for Ling 3.0: mlx-lm's ``bailing_moe_v3`` (or a user's port shaped like it).

``MlxBackend.load`` dispatches here for a Ling 3.0 checkpoint.  Loading and running are those of
:mod:`harness.backends.mlx_model`, shared with Ling-2.6 (``mlx_lm.utils.load_model``, mlx-lm's own
``KVCache``/``ArraysCache``, recording taps by class swap); its generic taps already fit
``bailing_moe_v3``'s module tree (``input_layernorm``, ``attention``, ``kv_a_layernorm``,
``g_proj``, ``post_attention_layernorm``, ``mlp``, ``shared_experts``, ``model.norm``).  This
module adds what Ling 3.0 names differently: the KDA recurrence output is the input of
``attention.o_norm`` (flattened to [T, H*D] like transformers') and the router ``mlp.gate`` returns
``(ids, weights)`` itself (no ``gate_proj`` child, so no ``ffn_moe_logits`` point: mlx-lm computes
the logits inline).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from harness.backends.base import BackendOptions, Captures
from harness.backends.mlx_model import (
    PAIR,
    MlxLoadedModel,
    cast_parameters,
    check_dtype,
    child,
    load_port_model,
    stream_for,
    tap,
)
from harness.core.capture_points import layer_point

STOCK_MODULE = "mlx_lm.models.bailing_moe_v3"


def load_ling3(
    checkpoint_dir: Path, options: BackendOptions, port_path: Path | None = None
) -> MlxLing3LoadedModel:
    """Load via ``mlx_lm.utils.load_model`` with ``bailing_moe_v3`` (or the port at
    ``port_path``, the parsed ``model_module`` option)."""
    import mlx.core as mx

    checkpoint_dir = Path(checkpoint_dir)
    dtype = check_dtype(options.dtype)
    stream = stream_for(options.device)
    model, config, arch = load_port_model(
        checkpoint_dir, port_path, STOCK_MODULE, "mlx-lm's bailing_moe_v3 (Ling 3.0)"
    )
    cast_parameters(model, getattr(mx, dtype))
    return MlxLing3LoadedModel(model, config, dtype, stream, module=arch.__name__)


class MlxLing3LoadedModel(MlxLoadedModel):
    """The Ling-2.6 loaded model plus the Ling 3.0 taps (KDA ``o_norm`` input, router)."""

    def __init__(
        self, model: Any, config: dict[str, Any], dtype: str, stream: Any, module: str
    ) -> None:
        super().__init__(model, config, dtype, stream, module)
        rec = self._recorder
        for i, layer in enumerate(self.layers):
            attn = child(layer, "attention")
            tap(child(attn, "o_norm"), rec, ("in", layer_point("gla_out", i)))
            gate = child(child(layer, "mlp"), "gate")
            if gate is not None and child(child(layer, "mlp"), "switch_mlp") is not None:
                topk, weights = layer_point("ffn_moe_topk", i), layer_point("ffn_moe_weights", i)
                tap(gate, rec, ("route", f"{topk}{PAIR}{weights}"))

    def start(self, capture: Collection[str] = ()) -> _FlatHeads:
        return _FlatHeads(super().start(capture))


class _FlatHeads:
    """mlx-lm's KDA output is [T, H, D]; the canonical ``gla_out`` is [T, H*D]."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def feed(self, tokens: Sequence[int]) -> Captures:
        out = self._session.feed(tokens)
        for name, value in out.items():
            if name.startswith("gla_out-") and value.ndim == 3:
                out[name] = value.reshape(value.shape[0], -1)
        return out
