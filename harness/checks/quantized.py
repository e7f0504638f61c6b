"""A quantized port judged in two parts: its own arithmetic, and what its weights lost.

A Q4 port differs from the float64 reference by far more than any float32 tolerance, whether it
is right or not; llama-perplexity's KLD says how far a quant is from the base model, not whether
the difference is quantization or a bug.  So a quantized candidate is compared twice:

- **port correctness**: the candidate against the *dequantized reference*, the float64
  reference run on the candidate's own weights (the GGUF's tensors dequantized exactly,
  :class:`harness.quant.gguf_weights.GgufWeights`; an MLX directory's with ``mx.dequantize``,
  :class:`harness.quant.mlx_weights.MlxWeights`, for Ling-2.6 and Ling 3.0 alike),
  with activations rounded where the port's matmul rounds them (ggml-cpu's q8_0/q8_1/q8_K
  input blocks: :mod:`references.activation_rounding`), and *layer-local*: each layer of the
  reference takes the candidate's own input to that layer (its ``l_out`` of the layer below,
  :meth:`references.model.BailingHybridReference.start`'s ``anchors``).  What remains is float32
  arithmetic plus the rare activation that rounds to the other neighbour (one quantization
  step of one element), which anchoring keeps from being amplified by the layers above; so the
  tolerance is tight (:data:`harness.checks.cases.DEFAULT_TOLERANCES` ``["quantized"]``) and a
  wrong formula fails at its first point;
- **quantization error**: the dequantized reference against the original reference (per-point
  NMSE, and llama-perplexity's KLD statistics on the logits), never a failure by itself: how
  much each layer loses is information for the reader, not a port bug.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.backends.targets import Target, gguf_type
from harness.checks.compare import PairResult
from harness.core import capture_points
from harness.core.tolerances import Tolerance

# The quantization error is reported, never judged.
INFORMATIONAL = Tolerance(nmse=math.inf, top1=0.0, index_agreement=0.0)


def _with(reference: Target, **options: str) -> Target:
    extra = {**dict(reference.extra), **options}
    return Target(reference.backend, reference.dtype, tuple(sorted(extra.items())))


def names_quantized_weights(candidate: Target) -> bool:
    """Whether ``candidate``'s options name weights that may be quantized (a ``quant=``, a
    user's ``gguf=``, an ``outtype`` other than f32, MLX ``bits=`` or ``model_dir=``), without
    building or reading anything: what a test plan can know before a check runs."""
    settings = candidate.settings
    if candidate.backend == "llamacpp":
        return (getattr(settings, "quant", None) is not None
                or getattr(settings, "gguf", None) is not None
                or (getattr(settings, "outtype", None) or "f32") != "f32")
    if candidate.backend == "mlx":
        return (getattr(settings, "bits", None) is not None
                or getattr(settings, "model_dir", None) is not None)
    return False


def dequantized_reference(candidate: Target, checkpoint: Path, reference: Target
                          ) -> Target | None:
    """The reference on ``candidate``'s own weights, or None when the candidate's weights are
    the checkpoint's (an f32 GGUF, an unquantized MLX model): then one comparison says it all.

    Builds (and caches) the candidate's quantized file if needed, as the candidate would."""
    if reference.backend != "torch":
        return None  # only our reference reads a GGUF or an MLX directory back
    if candidate.backend == "llamacpp":
        from harness.backends.llamacpp_backend import candidate_gguf

        if not names_quantized_weights(candidate):
            return None
        gguf = candidate_gguf(candidate, checkpoint)
        if gguf_type(gguf) in (None, "F32"):
            return None
        return _with(reference, weights_gguf=str(gguf), activations="ggml-cpu")
    if candidate.backend == "mlx":
        from harness.backends.mlx_backend import candidate_mlx_dir

        folder = candidate_mlx_dir(candidate, checkpoint)
        if folder is None:
            return None
        return _with(reference, weights_mlx=str(folder))  # Ling 3.0: transformers reads it too
    return None


LAYER_LOCAL = "layer-local"


def port_tolerance(dequantized: Target, candidate: Target) -> str:
    """The tolerance a quantized port's own arithmetic is held to: ``quantized`` where its
    matmuls round activations (ggml: the rare activation a float32 ulp puts on the other side
    of a rounding step), the candidate's dtype where they keep float activations (mlx's
    quantized matmul: then only float32 arithmetic separates it from the reference on its
    weights, and a float32 tolerance catches what 1e-4 would let through)."""
    rounds = dict(dequantized.extra).get("activations") == "ggml-cpu"
    return "quantized" if rounds else candidate.dtype


def anchored_captures(model: Any, tokens: Sequence[int], candidate: Mapping[str, Any]
                      ) -> tuple[dict[str, np.ndarray], list[int]]:
    """The reference's captures with each sublayer fed the candidate's input to it (its
    ``l_out``, ``ffn_inp`` and the norms that feed matmuls, which then round as the port's
    did); also the points the candidate does not give (what follows them takes the reference's
    own values)."""
    anchors, missing = anchor_rows(model, len(tokens), candidate)
    names = capture_points.all_points(model.n_layers)
    return model.start(names, anchors=anchors).feed(list(tokens)), missing


def anchor_rows(model: Any, n_tokens: int, candidate: Mapping[str, Any]
                ) -> tuple[dict[str, np.ndarray], list[str]]:
    """(the candidate's rows at every point ``model`` can anchor, the points it does not
    give): what the reference's sublayers start from to be compared sublayer-local."""
    anchors, missing = {}, []
    points = [f"{stem}-{i}" for i in range(model.n_layers) for stem in model.ANCHOR_STEMS]
    points.append("result_norm")
    for point in points:
        rows = candidate.get(point)
        if rows is None or np.asarray(rows).shape[0] != n_tokens:
            missing.append(point)
        else:
            anchors[point] = np.asarray(rows, dtype=np.float64)
    return anchors, missing


def verdict_text(port: PairResult, loss: PairResult) -> str:
    """The check's story: port correctness first (it decides), then the quantization error."""
    lines = [f"port correctness: {port.summary_line()}"]
    logits = loss.table.loc[loss.table["point"] == "result_output"]
    if not logits.empty:
        kld = loss.kld
        lines.append(
            f"  quantization error ({loss.candidate} vs {loss.reference}): logits NMSE "
            f"{float(logits.iloc[0]['nmse']):.2e}, mean KLD "
            f"{kld.get('mean_kld', math.nan):.3g}, max KLD {kld.get('kld_max', math.nan):.3g}, "
            f"same top p {kld.get('same_top_p', math.nan):.1%} ± "
            f"{kld.get('same_top_p_unc', math.nan):.1%}")
    return "\n".join(lines)
