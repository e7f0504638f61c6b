"""The canonical capture vocabulary shared by every backend and the comparison engine.

Names follow llama.cpp's eval-callback convention (``<name>-<il>`` per layer, bare names for
globals), so a tensor captured from a llama.cpp build maps onto the same key as one captured
from the PyTorch reference or from MLX.  The order in which points are listed here is the order
in which the forward pass produces them; the first failing point in that order is the
"first divergence".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """How a capture is compared."""

    DENSE = "dense"  # float activations: NMSE, max abs, cosine
    LOGITS = "logits"  # like DENSE plus top-1 agreement and KL divergence
    INDEX = "index"  # integer ids (router top-k, sorted per row): exact set agreement


@dataclass(frozen=True)
class PointSpec:
    """One kind of capture point: its stem, how it is compared and what it means."""

    stem: str
    kind: Kind
    doc: str


# Per-layer points, in forward order within a layer.
LAYER_POINTS: tuple[PointSpec, ...] = (
    PointSpec("attn_norm", Kind.DENSE, "input_layernorm output [T, hidden]"),
    PointSpec("kv_cmpr", Kind.DENSE, "MLA: normalised KV latent c [T, kv_lora_rank]"),
    PointSpec("gla_out", Kind.DENSE, "GLA: recurrence output before GroupRMSNorm [T, H*D]"),
    PointSpec("g_gate", Kind.DENSE, "GLA: output-gate logits before the sigmoid [T, H*D]"),
    PointSpec("attn_out", Kind.DENSE, "attention output after the dense projection [T, hidden]"),
    PointSpec("ffn_inp", Kind.DENSE, "residual after attention [T, hidden]"),
    PointSpec("ffn_norm", Kind.DENSE, "post_attention_layernorm output [T, hidden]"),
    PointSpec("ffn_moe_logits", Kind.DENSE, "router logits before the sigmoid [T, E]"),
    PointSpec("ffn_moe_topk", Kind.INDEX, "selected expert ids, sorted ascending [T, k]"),
    PointSpec("ffn_moe_weights", Kind.DENSE, "final routing weights, aligned to sorted ids [T, k]"),
    PointSpec("ffn_shexp", Kind.DENSE, "shared-expert output [T, hidden]"),
    PointSpec("ffn_out", Kind.DENSE, "dense MLP or MoE (+ shared) output [T, hidden]"),
    PointSpec("l_out", Kind.DENSE, "layer output, the residual stream [T, hidden]"),
)

# Global points of the trunk, in forward order (after all layers).
TRUNK_POINTS: tuple[PointSpec, ...] = (
    PointSpec("result_norm", Kind.DENSE, "final model.norm output [T, hidden]"),
    PointSpec("result_output", Kind.LOGITS, "logits [T, vocab]"),
)

# MTP head points, in forward order (after the trunk).
MTP_POINTS: tuple[PointSpec, ...] = (
    PointSpec("mtp_enorm", Kind.DENSE, "enorm(embedding of token t+1) [T, hidden]"),
    PointSpec("mtp_hnorm", Kind.DENSE, "hnorm(post-norm trunk hidden) [T, hidden]"),
    PointSpec("mtp_eh_proj", Kind.DENSE, "eh_proj([enorm; hnorm]) [T, hidden]"),
    PointSpec("mtp_attn_out", Kind.DENSE, "MTP layer MLA output [T, hidden]"),
    PointSpec("mtp_ffn_inp", Kind.DENSE, "MTP residual after attention [T, hidden]"),
    PointSpec("mtp_ffn_moe_topk", Kind.INDEX, "MTP router ids, sorted ascending [T, k]"),
    PointSpec("mtp_ffn_moe_weights", Kind.DENSE, "MTP routing weights [T, k]"),
    PointSpec("mtp_ffn_out", Kind.DENSE, "MTP MoE (+ shared) output [T, hidden]"),
    PointSpec("mtp_l_out", Kind.DENSE, "MTP block output before final_layernorm [T, hidden]"),
    PointSpec("mtp_result_norm", Kind.DENSE, "MTP final_layernorm output [T, hidden]"),
    PointSpec("mtp_result_output", Kind.LOGITS, "MTP draft logits [T, vocab]"),
)

_BY_STEM: dict[str, tuple[int, PointSpec]] = {
    p.stem: (i, p) for i, p in enumerate(LAYER_POINTS + TRUNK_POINTS + MTP_POINTS)
}
_LAYER_STEMS = {p.stem for p in LAYER_POINTS}
_NAME_RE = re.compile(r"^(?P<stem>[a-z_]+?)(?:-(?P<layer>\d+))?$")


class UnknownCapturePoint(ValueError):
    """A name that is not in the canonical vocabulary."""


def layer_point(stem: str, layer: int) -> str:
    """The canonical name of a per-layer point, e.g. ``layer_point("l_out", 3) == "l_out-3"``."""
    if stem not in _LAYER_STEMS:
        raise UnknownCapturePoint(f"{stem!r} is not a per-layer capture point")
    return f"{stem}-{layer}"


def parse(name: str) -> tuple[PointSpec, int | None]:
    """Split a canonical name into its spec and layer index (None for global points)."""
    m = _NAME_RE.match(name)
    if m is None or m["stem"] not in _BY_STEM:
        raise UnknownCapturePoint(
            f"{name!r} is not a canonical capture point; known stems: {', '.join(_BY_STEM)}"
        )
    stem, layer = m["stem"], m["layer"]
    spec = _BY_STEM[stem][1]
    if (stem in _LAYER_STEMS) != (layer is not None):
        raise UnknownCapturePoint(
            f"{name!r}: per-layer points need a '-N' suffix and global points must not have one"
        )
    return spec, (int(layer) if layer is not None else None)


def kind_of(name: str) -> Kind:
    """How the named point is compared."""
    return parse(name)[0].kind


def layer_of(name: str) -> int | None:
    """The layer index of a per-layer point, None for global points."""
    return parse(name)[1]


def sort_key(name: str) -> tuple[int, int, int]:
    """Forward-order key: layers in order, points within a layer in order, then trunk, then MTP."""
    spec, layer = parse(name)
    index = _BY_STEM[spec.stem][0]
    if layer is not None:
        return (0, layer, index)
    if spec.stem.startswith("mtp_"):
        return (2, 0, index)
    return (1, 0, index)


def in_forward_order(names: list[str] | set[str]) -> list[str]:
    """The names sorted in the order the forward pass produces them."""
    return sorted(names, key=sort_key)


def all_points(n_layers: int, *, mtp: bool = False) -> list[str]:
    """Every canonical name a model of ``n_layers`` could produce (a superset of any backend's)."""
    names = [layer_point(p.stem, i) for i in range(n_layers) for p in LAYER_POINTS]
    names += [p.stem for p in TRUNK_POINTS]
    if mtp:
        names += [p.stem for p in MTP_POINTS]
    return names
