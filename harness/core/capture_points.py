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
    """One kind of capture point: its stem, how it is compared, what it means and what usually
    breaks there (the advice the report and the CLI give at a first divergence)."""

    stem: str
    kind: Kind
    doc: str
    advice: str  # what usually breaks when this point is the first divergence


# Per-layer points, in forward order within a layer.
LAYER_POINTS: tuple[PointSpec, ...] = (
    PointSpec(
        "attn_norm",
        Kind.DENSE,
        "input_layernorm output [T, hidden]",
        "input_layernorm output differs: check RMSNorm (x/sqrt(mean(x²)+eps)·w computed in "
        "fp32, eps = rms_norm_eps) and, at layer 0, the word embedding lookup",
    ),
    PointSpec(
        "kv_cmpr",
        Kind.DENSE,
        "MLA: normalised KV latent c [T, kv_lora_rank]",
        "MLA KV latent differs: check the kv_a_proj_with_mqa split ([c ; k_pe], c first) "
        "and the kv_a_layernorm (eps 1e-6)",
    ),
    PointSpec(
        "gla_out",
        Kind.DENSE,
        "GLA (Ling 3.0: KDA): recurrence output before GroupRMSNorm (KDA: o_norm) [T, H*D]",
        "linear-attention recurrence output differs: Ling-2.6's GLA: check the decay slopes "
        "(layer factor l/(L-1) vs (l-1)/(L-1)), the GLA rope mode (half-split, partial) and "
        "q/k norms; Ling 3.0's KDA: check the forget gate (A_log, dt_bias, the safe gate's "
        "lower bound), the short convolution, the q/k L2 norm and the delta rule's beta",
    ),
    PointSpec(
        "g_gate",
        Kind.DENSE,
        "GLA: output-gate logits before the sigmoid [T, H*D]",
        "output-gate logits differ: the gate must be fed the input_layernorm output, not "
        "the attention output",
    ),
    PointSpec(
        "attn_out",
        Kind.DENSE,
        "attention output after the dense projection [T, hidden]",
        "attention output differs: in an MLA layer check MLA rope (interleaved pairs), the "
        "q/kv LoRA norms and the (qk_nope + qk_rope)^-0.5 scale (192^-0.5 in Ling-2.6-flash; "
        "Ling 3.0 also gates each head by sigmoid(g_proj)); in a GLA layer check GroupRMSNorm "
        "groups (groups vs channels per group), the sigmoid gate and the dense projection; in "
        "a KDA layer the gated o_norm, the forget gate and the short convolution",
    ),
    PointSpec(
        "ffn_inp",
        Kind.DENSE,
        "residual after attention [T, hidden]",
        "residual after attention differs although attention matched: check the residual "
        "add (h = x + attn(x)) and its dtype",
    ),
    PointSpec(
        "ffn_norm",
        Kind.DENSE,
        "post_attention_layernorm output [T, hidden]",
        "post_attention_layernorm output differs: check its weight and eps",
    ),
    PointSpec(
        "ffn_moe_logits",
        Kind.DENSE,
        "router logits before the sigmoid [T, E]",
        "router logits differ: the router matmul (mlp.gate.weight) should run in fp32 on "
        "the post_attention_layernorm output",
    ),
    PointSpec(
        "ffn_moe_topk",
        Kind.INDEX,
        "selected expert ids, sorted ascending [T, k]",
        "router selected different experts: check expert_bias (selection only), group limit "
        "(top-2 sum per group), sigmoid scoring",
    ),
    PointSpec(
        "ffn_moe_weights",
        Kind.DENSE,
        "final routing weights, aligned to sorted ids [T, k]",
        "routing weights differ: weights must be unbiased sigmoid scores, normalised, times "
        "routed_scaling_factor",
    ),
    PointSpec(
        "ffn_shexp",
        Kind.DENSE,
        "shared-expert output [T, hidden]",
        "shared-expert output differs: check the shared SwiGLU's intermediate size "
        "(moe_shared_expert_intermediate_size × num_shared_experts) and that it has no gate "
        "or norm",
    ),
    PointSpec(
        "ffn_out",
        Kind.DENSE,
        "dense MLP or MoE (+ shared) output [T, hidden]",
        "MLP/MoE output differs: check the dense SwiGLU in layer 0, the expert SwiGLUs, the "
        "weighted sum of routed experts and that the shared experts are added once",
    ),
    PointSpec(
        "l_out",
        Kind.DENSE,
        "layer output, the residual stream [T, hidden]",
        "layer output differs though its parts matched: check the second residual add (y = "
        "h + FFN(h)) and the layer type assignment (MLA every layer_group_size-th layer)",
    ),
)

# Global points of the trunk, in forward order (after all layers).
TRUNK_POINTS: tuple[PointSpec, ...] = (
    PointSpec(
        "result_norm",
        Kind.DENSE,
        "final model.norm output [T, hidden]",
        "final norm output differs: check model.norm's weight and eps",
    ),
    PointSpec(
        "result_output",
        Kind.LOGITS,
        "logits [T, vocab]",
        "logits differ: check lm_head (not tied to the embedding) and the final norm input",
    ),
)

# MTP head points, in forward order (after the trunk).
MTP_POINTS: tuple[PointSpec, ...] = (
    PointSpec(
        "mtp_enorm",
        Kind.DENSE,
        "enorm(embedding of token t+1) [T, hidden]",
        "MTP enorm differs: it normalises the embedding of token t+1 (the next token), not t",
    ),
    PointSpec(
        "mtp_hnorm",
        Kind.DENSE,
        "hnorm(post-norm trunk hidden) [T, hidden]",
        "MTP hnorm differs: it must be fed the post-final-norm trunk hidden (model.norm "
        "output), not the pre-norm l_out",
    ),
    PointSpec(
        "mtp_eh_proj",
        Kind.DENSE,
        "eh_proj([enorm; hnorm]) [T, hidden]",
        "MTP eh_proj differs: the concat order is [enorm(embedding) ; hnorm(hidden)], "
        "embedding first",
    ),
    PointSpec(
        "mtp_attn_out",
        Kind.DENSE,
        "MTP layer MLA output [T, hidden]",
        "MTP attention differs: the MTP layer is always MLA; check its rope positions "
        "(those of the hidden) and its own KV cache",
    ),
    PointSpec(
        "mtp_ffn_inp",
        Kind.DENSE,
        "MTP residual after attention [T, hidden]",
        "MTP residual after attention differs: check the residual add on eh_proj output",
    ),
    PointSpec(
        "mtp_ffn_moe_topk",
        Kind.INDEX,
        "MTP router ids, sorted ascending [T, k]",
        "MTP router selected different experts: the MTP MoE has its own router and "
        "expert_bias (selection only), with the same group limit as the trunk",
    ),
    PointSpec(
        "mtp_ffn_moe_weights",
        Kind.DENSE,
        "MTP routing weights [T, k]",
        "MTP routing weights differ: unbiased sigmoid scores, normalised, times "
        "routed_scaling_factor",
    ),
    PointSpec(
        "mtp_ffn_out",
        Kind.DENSE,
        "MTP MoE (+ shared) output [T, hidden]",
        "MTP MoE output differs: check its routed experts and its own shared expert",
    ),
    PointSpec(
        "mtp_l_out",
        Kind.DENSE,
        "MTP block output before final_layernorm [T, hidden]",
        "MTP block output differs: check the second residual add of the MTP layer",
    ),
    PointSpec(
        "mtp_result_norm",
        Kind.DENSE,
        "MTP final_layernorm output [T, hidden]",
        "MTP final norm differs: it is the MTP layer's final_layernorm, not the trunk's model.norm",
    ),
    PointSpec(
        "mtp_result_output",
        Kind.LOGITS,
        "MTP draft logits [T, vocab]",
        "MTP draft logits differ: the lm_head is shared with the trunk and applied to the "
        "MTP final_layernorm output",
    ),
)

_BY_STEM: dict[str, tuple[int, PointSpec]] = {
    p.stem: (i, p) for i, p in enumerate(LAYER_POINTS + TRUNK_POINTS + MTP_POINTS)
}
_LAYER_STEMS = {p.stem for p in LAYER_POINTS}
_NAME_RE = re.compile(r"^(?P<stem>[a-z_]+?)(?:-(?P<layer>\d+))?$")
_STEM_RE = re.compile(r"^(?P<stem>.+?)(?:-\d+)?$")


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


def explain_divergence(point: str) -> str:
    """What usually breaks at ``point``, in words, for the report and the CLI (a malformed name
    still gets its stem's advice: ``result_norm-3`` is the final norm)."""
    try:
        stem = parse(point)[0].stem
    except UnknownCapturePoint:
        m = _STEM_RE.match(point)
        stem = m["stem"] if m else point
    found = _BY_STEM.get(stem)
    if found is None:
        return f"{point} differs: no specific advice for this capture point"
    return found[1].advice
