"""Which llama.cpp eval-callback tensor is which canonical capture point, per port (as data).

Names were read from the vendored llama.cpp (``src/models/<arch>.cpp`` and the helpers in
``src/llama-graph.cpp``) AND confirmed by running the graphs on tiny random GGUFs
(``tests/llamacpp_testing.py``) and listing every node name the callback was offered.  A
node's name is the LAST ``cb()`` applied to it (``build_norm`` names its output ``norm-N``
and the model then renames it ``attn_norm-N``); unnamed nodes show up as ``node_<index>``,
which is unstable and never mapped.

Each entry maps a canonical stem to llama.cpp stems in order of preference; for a layer the
first one present in the capture wins.  That expresses both per-layer-type names (``mla_out``
on MLA layers, ``kda_out`` on KDA layers) and hparam-dependent ones (routing weights are
``ffn_moe_weights_scaled`` when a routed scale != 1 is set, else ``..._norm``, else raw).

Upstream ``bailingmoe3`` at 0c1e57098, confirmed names per layer (N = layer index)::

    attn_norm-N            input RMSNorm output                       -> attn_norm
    q_a-N, q_a_norm-N, q_b-N, kq-N, kq_soft_max-N, kqv-N, kqv_mla-N, v_cont-N, kqv_out-N
                           MLA internals (kqv_out = after wv_b, before the head gate)
    mla_out-N              MLA output after gate and wo               -> attn_out
    kda_gate-N, new_state-N, attn_output-N
                           KDA internals (attn_output = recurrence output, pre-norm)
    kda_out-N              KDA output after o-norm, gate and wo       -> attn_out
    ffn_gate-N, ffn_up-N, ffn_swiglu-N
                           dense FFN (lead layers) or shared expert (MoE layers)
    ffn_moe_logits-N       router logits, pre-sigmoid [T, E]           -> ffn_moe_logits
    ffn_moe_probs-N, ffn_moe_probs_biased-N, ffn_moe_argsort-N
    ffn_moe_topk-N         selected expert ids (I32) [T, k]           -> ffn_moe_topk (sorted)
    ffn_moe_weights-N, ffn_moe_weights_sum-N, ffn_moe_weights_sum_clamped-N,
    ffn_moe_weights_norm-N, ffn_moe_weights_scaled-N                   -> ffn_moe_weights
    ffn_moe_gate-N, ffn_moe_up-N, ffn_moe_swiglu-N, ffn_moe_down-N, ffn_moe_weighted-N
    ffn_moe_out-N          routed experts summed (no shared expert)
    l_out-N                layer output                               -> l_out
    norm-N                 every bare RMSNorm before its weight (repeats within a layer)

and globals ``model.input_embed``, ``norm``, ``h_nextn`` (final norm before the output-row
gather), ``result_norm`` and ``result_output``.  NOT named upstream (so not capturable without
a patch): ``ffn_inp`` (the post-attention residual), ``ffn_norm`` output, ``ffn_down`` (only
named when the FFN has a bias), hence neither ``ffn_shexp`` nor ``ffn_out``; ``kv_cmpr`` (the
normalised KV latent).  ``gla_out``/``g_gate`` are Ling-2.6-only and upstream has no Ling-2.6.
The MTP graph (a separate ``LLAMA_CONTEXT_TYPE_MTP`` context, driven by
:mod:`harness.llamacpp.mtp`) names ``mtp_eh_proj-{L}`` (L = n_layer, the MTP block), the MLA and
router internals with ``-{L}`` as above, and ``h_nextn`` (the MTP final_layernorm output, the
hidden it hands back for chaining); not the enorm/hnorm outputs, the attention output, the
residuals or the block output.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from harness.core.capture_points import Kind, parse
from harness.core.captures import Captures


@dataclass(frozen=True)
class PortNames:
    """The name map of one llama.cpp architecture (or patched port)."""

    arch: str  # general.architecture in the GGUF
    layer: Mapping[str, tuple[str, ...]]  # canonical stem -> llama.cpp stems, preferred first
    trunk: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "result_norm": ("result_norm",),
            "result_output": ("result_output",),
        }
    )
    missing: tuple[str, ...] = ()  # canonical stems this port cannot produce, for reports
    note: str = ""
    # MTP context: canonical mtp_* stem -> llama.cpp names, "{L}" = the MTP block's index
    mtp: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


PORTS: dict[str, PortNames] = {
    # Upstream Ling 3.0 (BailingMoeV3 / bailing_hybrid MLA + KDA) at the vendored commit.
    "bailingmoe3": PortNames(
        arch="bailingmoe3",
        layer={
            "attn_norm": ("attn_norm",),
            "attn_out": ("mla_out", "kda_out"),
            "ffn_moe_logits": ("ffn_moe_logits",),
            "ffn_moe_topk": ("ffn_moe_topk",),
            "ffn_moe_weights": (
                "ffn_moe_weights_scaled",
                "ffn_moe_weights_norm",
                "ffn_moe_weights_softmax",
                "ffn_moe_weights",
            ),
            "l_out": ("l_out",),
        },
        missing=("kv_cmpr", "gla_out", "g_gate", "ffn_inp", "ffn_norm", "ffn_shexp", "ffn_out"),
        note="upstream llama.cpp 0c1e57098; unnamed nodes need a patch to be captured",
        mtp={
            "mtp_eh_proj": ("mtp_eh_proj-{L}",),
            "mtp_ffn_moe_topk": ("ffn_moe_topk-{L}",),
            "mtp_ffn_moe_weights": (
                "ffn_moe_weights_scaled-{L}",
                "ffn_moe_weights_norm-{L}",
                "ffn_moe_weights-{L}",
            ),
            "mtp_result_norm": ("h_nextn",),
        },
    ),
    # llama.cpp's own llama graph: used by the worker's tests, and a sanity anchor.
    "llama": PortNames(
        arch="llama",
        layer={
            "attn_norm": ("attn_norm",),
            "attn_out": ("attn_out",),
            "ffn_inp": ("ffn_inp",),
            "ffn_norm": ("ffn_norm",),
            "ffn_out": ("ffn_out",),
            "l_out": ("l_out",),
        },
        missing=(
            "kv_cmpr",
            "gla_out",
            "g_gate",
            "ffn_moe_logits",
            "ffn_moe_topk",
            "ffn_moe_weights",
            "ffn_shexp",
        ),
    ),
}


def _candidates(port: PortNames, canonical: str) -> tuple[str, ...]:
    spec, layer = parse(canonical)
    if layer is None:
        return port.trunk.get(spec.stem, ())
    return tuple(f"{s}-{layer}" for s in port.layer.get(spec.stem, ()))


def _with_router_ids(canonical: Collection[str]) -> set[str]:
    """Routing weights are only meaningful aligned to sorted ids, so they pull the ids in."""
    names = set(canonical)
    for name in canonical:
        spec, layer = parse(name)
        if spec.stem == "ffn_moe_weights":
            names.add(f"ffn_moe_topk-{layer}")
    return names


def wanted_names(port: PortNames, canonical: Collection[str]) -> set[str]:
    """Every llama.cpp name the callback must keep to serve the requested canonical points."""
    return {n for c in _with_router_ids(canonical) for n in _candidates(port, c)}


def to_canonical(
    port: PortNames, raw: Mapping[str, np.ndarray], canonical: Collection[str], n_tokens: int
) -> Captures:
    """Canonical captures from a worker's raw ones: ``[T, ...]`` rows, float64 / int64.

    ggml puts the token axis outermost for every mapped point, so ``reshape(T, -1)`` on the
    ``(ne3, ne2, ne1, ne0)`` array yields rows.  Router ids are sorted ascending per row and
    the routing weights are permuted the same way (the canonical INDEX convention); weights
    without their ids are left out rather than compared in llama.cpp's top-k order.  Points
    this port cannot produce are left out, as the backend protocol asks.
    """
    rows: Captures = {}
    for name in _with_router_ids(canonical):
        src = next((n for n in _candidates(port, name) if n in raw), None)
        if src is not None:
            kind = parse(name)[0].kind
            rows[name] = (
                raw[src]
                .reshape(n_tokens, -1)
                .astype(np.int64 if kind is Kind.INDEX else np.float64)
            )
    out: Captures = {}
    for name in canonical:
        spec, layer = parse(name)
        if spec.stem in ("ffn_moe_topk", "ffn_moe_weights"):
            ids = rows.get(f"ffn_moe_topk-{layer}")
            if ids is None or name not in rows:
                continue
            order = np.argsort(ids, axis=1, kind="stable")
            out[name] = np.take_along_axis(rows[name], order, axis=1)
        elif name in rows:
            out[name] = rows[name]
    return out


def mtp_wanted(port: PortNames, mtp_layer: int) -> set[str]:
    """The llama.cpp names the MTP context's callback must keep for every mapped mtp_* point."""
    return {n.replace("{L}", str(mtp_layer)) for cands in port.mtp.values() for n in cands}


def mtp_to_canonical(
    port: PortNames, raw: Mapping[str, np.ndarray], mtp_layer: int, n_rows: int
) -> Captures:
    """Canonical mtp_* rows of one MTP batch (router ids sorted, weights aligned to them);
    points the port does not name are left out."""
    rows: Captures = {}
    for canonical, candidates in port.mtp.items():
        names = [c.replace("{L}", str(mtp_layer)) for c in candidates]
        src = next((n for n in names if n in raw), None)
        if src is not None:
            kind = parse(canonical)[0].kind
            rows[canonical] = (
                raw[src].reshape(n_rows, -1).astype(np.int64 if kind is Kind.INDEX else np.float64)
            )
    ids = rows.get("mtp_ffn_moe_topk")
    if ids is not None:
        order = np.argsort(ids, axis=1, kind="stable")
        rows["mtp_ffn_moe_topk"] = np.take_along_axis(ids, order, axis=1)
        if "mtp_ffn_moe_weights" in rows:
            rows["mtp_ffn_moe_weights"] = np.take_along_axis(rows["mtp_ffn_moe_weights"], order, 1)
    else:
        rows.pop("mtp_ffn_moe_weights", None)  # meaningless without the ids that order them
    return rows
