"""The comparison engine: turns two sets of captures into per-point verdicts.

It knows capture points (:mod:`harness.core.capture_points`) and tolerances, never backends: a
candidate and a reference are just :data:`Captures` plus a label.  NMSE follows llama.cpp's
``test-backend-ops`` convention (normalised by the *reference*), and the KL-divergence summary uses
``llama-perplexity --kl-divergence`` statistic names, so numbers compare directly with llama.cpp.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.backends.base import Captures
from harness.core.capture_points import Kind, UnknownCapturePoint, in_forward_order, parse

__all__ = [
    "COLUMNS",
    "PAIR_COLUMNS",
    "PAIR_KEYS",
    "PairResult",
    "Tolerance",
    "compare_captures",
    "compare_pair",
    "cosine",
    "explain_divergence",
    "first_divergence",
    "index_agreement",
    "kld_stats",
    "max_abs",
    "nmse",
    "pairs_frame",
    "results_frame",
    "save_results",
    "top1_agreement",
]

# Columns of the per-point table, in order.
COLUMNS: tuple[str, ...] = (
    "point",
    "layer",
    "kind",
    "nmse",
    "max_abs",
    "cosine",
    "top1",
    "index_agreement",
    "mean_kld",
    "kld_99",
    "kld_max",
    "passed",
    "threshold",
    "note",
)
# Columns that identify a pair, prepended to the long table.
PAIR_KEYS: tuple[str, ...] = ("case", "prompt", "candidate", "reference", "mode")
# Columns of pairs.csv, one row per pair.
PAIR_COLUMNS: tuple[str, ...] = (
    *PAIR_KEYS,
    "passed",
    "first_divergence",
    "worst_point",
    "worst_nmse",
    "top1",
    "mean_kld",
)
_FLOAT_COLUMNS: tuple[str, ...] = (
    "nmse",
    "max_abs",
    "cosine",
    "top1",
    "index_agreement",
    "mean_kld",
    "kld_99",
    "kld_max",
)
# Percentiles reported by llama-perplexity, as (statistic name, percentile).
_KLD_PERCENTILES: tuple[tuple[str, float], ...] = (
    ("kld_max", 100.0),
    ("kld_99.9", 99.9),
    ("kld_99", 99.0),
    ("kld_95", 95.0),
    ("kld_90", 90.0),
    ("kld_median", 50.0),
    ("kld_10", 10.0),
    ("kld_5", 5.0),
    ("kld_1", 1.0),
    ("kld_0.1", 0.1),
    ("kld_min", 0.0),
)
# Targets are next-token ids, which only ``result_output`` predicts (MTP logits predict t+2).
_TARGETS_POINT = "result_output"


# --------------------------------------------------------------------------------------------
# Tolerance


@dataclass(frozen=True)
class Tolerance:
    """Pass thresholds for one comparison; kept with the results so a verdict can be re-read."""

    nmse: float  # max NMSE for DENSE and LOGITS points
    top1: float = 1.0  # min fraction of LOGITS rows with the same argmax
    index_agreement: float = 1.0  # min fraction of INDEX rows with identical id sets

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"tolerance {f.name!r} must be a number, got {value!r}")
            if math.isnan(value) or value < 0:
                raise ValueError(f"tolerance {f.name!r} must be >= 0, got {value!r}")
            if f.name != "nmse" and value > 1:
                raise ValueError(f"tolerance {f.name!r} is a fraction in [0, 1], got {value!r}")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> Tolerance:
        """Build from a config table; unknown keys are errors so a typo never loosens a gate."""
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise ValueError(
                    f"unknown tolerance key {key!r}; expected one of: {', '.join(known)}"
                )
        if "nmse" not in d:
            raise ValueError("tolerance needs an 'nmse' key (max allowed NMSE)")
        return cls(**{key: _number(key, value) for key, value in d.items()})

    def threshold(self, kind: Kind) -> str:
        """The rule a point of ``kind`` must meet, as shown in tables, e.g. ``nmse<=1e-08``."""
        if kind is Kind.INDEX:
            return f"index_agreement>={self.index_agreement:g}"
        if kind is Kind.LOGITS:
            return f"nmse<={self.nmse:g}, top1>={self.top1:g}"
        return f"nmse<={self.nmse:g}"


def _number(key: str, value: object) -> float:
    """A config value as a float (YAML reads "1e-8" as a string); ValueError naming the key."""
    if not isinstance(value, bool):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
    raise ValueError(f"tolerance {key!r} must be a number, got {value!r}")


# --------------------------------------------------------------------------------------------
# Metrics (``a`` is always the candidate, ``b`` the reference)


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape {a.shape} vs reference {b.shape}")


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    """Σ(a−b)²/Σb² with ``b`` the reference, as llama.cpp's test-backend-ops (asymmetric)."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    _same_shape(a64, b64)
    ref_sq = float(np.sum(b64 * b64))
    err_sq = float(np.sum((a64 - b64) ** 2))
    if ref_sq == 0.0:
        return 0.0 if err_sq == 0.0 else math.inf
    return err_sq / ref_sq


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Largest elementwise |a−b|; 0 for empty arrays."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    _same_shape(a64, b64)
    return float(np.max(np.abs(a64 - b64))) if a64.size else 0.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the flattened arrays; 1 if both are zero, 0 if only one is."""
    a64 = np.asarray(a, dtype=np.float64).ravel()
    b64 = np.asarray(b, dtype=np.float64).ravel()
    _same_shape(a64, b64)
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a64, b64) / (na * nb))


def _rows(logits: np.ndarray) -> np.ndarray:
    """Logits as [rows, vocab] float64 (a single vector is one row)."""
    x = np.asarray(logits, dtype=np.float64)
    return x.reshape(1, -1) if x.ndim == 1 else x.reshape(-1, x.shape[-1])


def top1_agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Fraction of rows whose argmax agrees ("Same top p" in llama-perplexity)."""
    a, b = _rows(logits_a), _rows(logits_b)
    _same_shape(a, b)
    if a.shape[0] == 0:
        return math.nan
    return float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def kld_stats(
    logits_a: np.ndarray, logits_b: np.ndarray, targets: np.ndarray | None = None
) -> dict[str, float]:
    """Per-row KL(P_ref || P_cand) summarised with llama-perplexity's names (a = candidate).

    ``targets`` are next-token ids for the first ``len(targets)`` rows (negative ids are skipped);
    with them the change in the target's probability, Δp = p_cand − p_ref, is summarised too.
    """
    a, b = _rows(logits_a), _rows(logits_b)
    _same_shape(a, b)
    n = a.shape[0]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        log_p, log_q = _log_softmax(b), _log_softmax(a)
        p = np.exp(log_p)
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    kld = np.sum(terms, axis=-1)
    stats: dict[str, float] = {"mean_kld": float(np.mean(kld)) if n else math.nan}
    for name, q in _KLD_PERCENTILES:
        stats[name] = float(np.percentile(kld, q)) if n else math.nan
    same = top1_agreement(a, b)
    stats["same_top_p"] = same
    stats["same_top_p_unc"] = math.sqrt(same * (1 - same) / (n - 1)) if n >= 2 else 0.0
    if targets is not None:
        stats.update(_delta_p(log_q, log_p, np.asarray(targets)))
    return stats


def _delta_p(log_q: np.ndarray, log_p: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Mean and RMS of p_cand(target) − p_ref(target) over rows with a target."""
    t = targets.astype(np.int64).ravel()
    if t.size > log_p.shape[0]:
        raise ValueError(f"{t.size} targets for only {log_p.shape[0]} logits rows")
    rows = np.flatnonzero(t >= 0)
    if np.any(t[rows] >= log_p.shape[1]):
        raise ValueError(f"target id out of range for vocab size {log_p.shape[1]}")
    if rows.size == 0:
        return {"mean_delta_p": math.nan, "rms_delta_p": math.nan}
    dp = np.exp(log_q[rows, t[rows]]) - np.exp(log_p[rows, t[rows]])
    return {"mean_delta_p": float(np.mean(dp)), "rms_delta_p": float(np.sqrt(np.mean(dp * dp)))}


def index_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows whose id sets are identical (rows are sorted first; order is not a bug)."""
    ia, ib = np.asarray(a), np.asarray(b)
    ia = ia.reshape(-1, 1) if ia.ndim == 1 else ia.reshape(-1, ia.shape[-1])
    ib = ib.reshape(-1, 1) if ib.ndim == 1 else ib.reshape(-1, ib.shape[-1])
    _same_shape(ia, ib)
    if ia.shape[0] == 0:
        return math.nan
    return float(np.mean(np.all(np.sort(ia, axis=-1) == np.sort(ib, axis=-1), axis=-1)))


# --------------------------------------------------------------------------------------------
# Per-point table


def _blank_row(name: str, kind: Kind, layer: int | None, tol: Tolerance) -> dict[str, Any]:
    row: dict[str, Any] = {c: math.nan for c in _FLOAT_COLUMNS}
    row.update(point=name, layer=layer, kind=kind.value, passed=False, note="")
    row["threshold"] = tol.threshold(kind)
    return row


def _problem(cand: np.ndarray, ref: np.ndarray) -> str:
    """Why two arrays cannot be compared at all, or '' if they can."""
    if cand.shape != ref.shape:
        return f"shape {cand.shape} vs reference {ref.shape}"
    for label, x in (("candidate", cand), ("reference", ref)):
        if x.dtype.kind in "fc" and not np.all(np.isfinite(x)):
            return f"non-finite values in {label}"
    return ""


def _compare_point(
    name: str, cand: np.ndarray, ref: np.ndarray, tol: Tolerance, targets: np.ndarray | None
) -> tuple[dict[str, Any], dict[str, float] | None]:
    """One table row, plus the KLD summary for LOGITS points."""
    spec, layer = parse(name)
    row = _blank_row(name, spec.kind, layer, tol)
    cand, ref = np.asarray(cand), np.asarray(ref)
    row["note"] = _problem(cand, ref)
    if row["note"]:
        return row, None
    if spec.kind is Kind.INDEX:
        row["index_agreement"] = index_agreement(cand, ref)
        row["passed"] = bool(row["index_agreement"] >= tol.index_agreement)
        return row, None
    row["nmse"], row["max_abs"], row["cosine"] = (
        nmse(cand, ref),
        max_abs(cand, ref),
        cosine(cand, ref),
    )
    row["passed"] = bool(row["nmse"] <= tol.nmse)
    if spec.kind is not Kind.LOGITS:
        return row, None
    stats = kld_stats(cand, ref, targets if name == _TARGETS_POINT else None)
    row["top1"] = stats["same_top_p"]
    row["mean_kld"], row["kld_99"], row["kld_max"] = (
        stats[k] for k in ("mean_kld", "kld_99", "kld_max")
    )
    row["passed"] = bool(row["passed"] and stats["same_top_p"] >= tol.top1)
    return row, stats


def _table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame with stable dtypes, even when empty."""
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["layer"] = df["layer"].astype("Int64")
    df["passed"] = df["passed"].astype(bool)
    for c in _FLOAT_COLUMNS:
        df[c] = df[c].astype(np.float64)
    for c in ("point", "kind", "threshold", "note"):
        df[c] = df[c].astype(str)
    return df


def compare_captures(
    candidate: Captures,
    reference: Captures,
    tol: Tolerance,
    *,
    targets: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per point captured by both sides, in forward order.

    Points only one side produced are not failures (a backend may not expose them); they are
    listed in ``df.attrs["only_candidate"]`` / ``["only_reference"]``.  ``df.attrs["kld"]`` maps
    each compared LOGITS point to its :func:`kld_stats`; ``targets`` apply to ``result_output``.
    """
    common = in_forward_order(set(candidate) & set(reference))
    rows, klds = [], {}
    for name in common:
        row, stats = _compare_point(name, candidate[name], reference[name], tol, targets)
        rows.append(row)
        if stats is not None:
            klds[name] = stats
    df = _table(rows)
    df.attrs["only_candidate"] = sorted(set(candidate) - set(reference))
    df.attrs["only_reference"] = sorted(set(reference) - set(candidate))
    df.attrs["kld"] = klds
    df.attrs["tolerance"] = {f.name: getattr(tol, f.name) for f in fields(tol)}
    return df


def first_divergence(df: pd.DataFrame) -> str | None:
    """The first failing point in forward order: where to start looking for the bug."""
    failing = df.loc[~df["passed"].astype(bool), "point"]
    if failing.empty:
        return None
    return in_forward_order(list(failing))[0]


# --------------------------------------------------------------------------------------------
# Pairs


@dataclass
class PairResult:
    """One candidate compared against one reference on one prompt of one case."""

    case: str
    prompt: str
    candidate: str
    reference: str
    mode: str  # "prefill" or "decode"
    table: pd.DataFrame
    first_divergence: str | None
    passed: bool
    kld: dict[str, float] = field(default_factory=dict)

    def summary_line(self) -> str:
        """One line for logs and test failure messages."""
        mode = "" if self.mode == "prefill" else f" ({self.mode})"
        head = f"{self.candidate} vs {self.reference} on {self.case}/{self.prompt}{mode}"
        if self.table.empty:
            return f"{head}: FAIL, no capture points in common"
        if not self.passed:
            return f"{head}: FAIL, {_failure_text(self.table, self.first_divergence)}"
        n = len(self.table)
        worst = _worst(self.table)
        if worst is None:
            return f"{head}: PASS ({n} points compared)"
        return f"{head}: PASS, worst nmse {worst[1]:.1e} at {worst[0]} ({n} points compared)"


def _failure_text(table: pd.DataFrame, point: str | None) -> str:
    """'first divergence at X (why)' for the failing point ``point``."""
    if point is None:
        return "no failing point"
    row = table.loc[table["point"] == point].iloc[0]
    tol = table.attrs.get("tolerance", {})
    if row["note"]:
        why = row["note"]
    elif row["kind"] == Kind.INDEX.value:
        why = f"index agreement {row['index_agreement']:.3g} < {tol.get('index_agreement', 1):g}"
    elif row["kind"] == Kind.LOGITS.value and not row["nmse"] > tol.get("nmse", math.inf):
        why = f"top1 {row['top1']:.3g} < {tol.get('top1', 1):g}"
    else:
        why = f"nmse {row['nmse']:.1e} > {tol.get('nmse', math.nan):g}"
    return f"first divergence at {point} ({why})"


def _worst(table: pd.DataFrame) -> tuple[str, float] | None:
    """The point with the largest NMSE, or None if no point has one."""
    values = table["nmse"]
    if values.isna().all():
        return None
    i = values.idxmax()
    return str(table.at[i, "point"]), float(values[i])


def compare_pair(
    case: str,
    prompt: str,
    candidate_label: str,
    reference_label: str,
    candidate_caps: Captures,
    reference_caps: Captures,
    tol: Tolerance,
    mode: str = "prefill",
    targets: np.ndarray | None = None,
) -> PairResult:
    """Compare two capture sets and wrap the verdict with what was compared."""
    if mode not in ("prefill", "decode"):
        raise ValueError(f"mode must be 'prefill' or 'decode', got {mode!r}")
    table = compare_captures(candidate_caps, reference_caps, tol, targets=targets)
    return PairResult(
        case=case,
        prompt=prompt,
        candidate=candidate_label,
        reference=reference_label,
        mode=mode,
        table=table,
        first_divergence=first_divergence(table),
        passed=bool(len(table)) and bool(table["passed"].all()),
        kld=dict(table.attrs["kld"].get("result_output", {})),
    )


def results_frame(results: list[PairResult]) -> pd.DataFrame:
    """All pairs' rows in one long table, keyed by the pair columns."""
    parts = []
    for r in results:
        if r.table.empty:
            continue
        part = r.table.copy()
        part.attrs = {}
        for i, key in enumerate(PAIR_KEYS):
            part.insert(i, key, getattr(r, key))
        parts.append(part)
    if not parts:
        empty = _table([])
        for i, key in enumerate(PAIR_KEYS):
            empty.insert(i, key, pd.Series(dtype=str))
        return empty
    df = pd.concat(parts, ignore_index=True)
    df.attrs = {}
    return df


def pairs_frame(results: list[PairResult]) -> pd.DataFrame:
    """One row per pair: the verdict, where it diverged and the logits summary."""
    rows = []
    for r in results:
        worst = _worst(r.table) if not r.table.empty else None
        logits = r.table.loc[r.table["point"] == "result_output", "top1"]
        rows.append(
            {
                **{key: getattr(r, key) for key in PAIR_KEYS},
                "passed": r.passed,
                "first_divergence": r.first_divergence,
                "worst_point": worst[0] if worst else None,
                "worst_nmse": worst[1] if worst else math.nan,
                "top1": float(logits.iloc[0]) if not logits.empty else math.nan,
                "mean_kld": r.kld.get("mean_kld", math.nan),
            }
        )
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS))


def save_results(results: list[PairResult], out_dir: Path) -> dict[str, Path]:
    """Write parity.parquet / parity.csv (long table) and pairs.csv (one row per pair)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "parquet": out_dir / "parity.parquet",
        "csv": out_dir / "parity.csv",
        "pairs": out_dir / "pairs.csv",
    }
    long = results_frame(results)
    long.to_parquet(paths["parquet"], index=False)
    long.to_csv(paths["csv"], index=False)
    pairs_frame(results).to_csv(paths["pairs"], index=False)
    return paths


# --------------------------------------------------------------------------------------------
# Words


_EXPLANATIONS: dict[str, str] = {
    "attn_norm": (
        "input_layernorm output differs: check RMSNorm (x/sqrt(mean(x²)+eps)·w computed in "
        "fp32, eps = rms_norm_eps) and, at layer 0, the word embedding lookup"
    ),
    "kv_cmpr": (
        "MLA KV latent differs: check the kv_a_proj_with_mqa split ([c ; k_pe], c first) and "
        "the kv_a_layernorm (eps 1e-6)"
    ),
    "gla_out": (
        "GLA recurrence output differs: check the decay slopes (layer factor l/(L-1) vs "
        "(l-1)/(L-1)), the GLA rope mode (half-split, partial) and q/k norms"
    ),
    "g_gate": (
        "output-gate logits differ: the gate must be fed the input_layernorm output, not the "
        "attention output"
    ),
    "attn_out": (
        "attention output differs: in an MLA layer check MLA rope (interleaved pairs), the q/kv "
        "LoRA norms and the 192^-0.5 scale; in a GLA layer check GroupRMSNorm groups (groups vs "
        "channels per group), the sigmoid gate and the dense projection"
    ),
    "ffn_inp": (
        "residual after attention differs although attention matched: check the residual add "
        "(h = x + attn(x)) and its dtype"
    ),
    "ffn_norm": "post_attention_layernorm output differs: check its weight and eps",
    "ffn_moe_logits": (
        "router logits differ: the router matmul (mlp.gate.weight) should run in fp32 on the "
        "post_attention_layernorm output"
    ),
    "ffn_moe_topk": (
        "router selected different experts: check expert_bias (selection only), group limit "
        "(top-2 sum per group), sigmoid scoring"
    ),
    "ffn_moe_weights": (
        "routing weights differ: weights must be unbiased sigmoid scores, normalised, times "
        "routed_scaling_factor"
    ),
    "ffn_shexp": (
        "shared-expert output differs: check the shared SwiGLU's intermediate size "
        "(moe_shared_expert_intermediate_size × num_shared_experts) and that it has no gate or norm"
    ),
    "ffn_out": (
        "MLP/MoE output differs: check the dense SwiGLU in layer 0, the expert SwiGLUs, the "
        "weighted sum of routed experts and that the shared experts are added once"
    ),
    "l_out": (
        "layer output differs though its parts matched: check the second residual add "
        "(y = h + FFN(h)) and the layer type assignment (MLA every layer_group_size-th layer)"
    ),
    "result_norm": "final norm output differs: check model.norm's weight and eps",
    "result_output": (
        "logits differ: check lm_head (not tied to the embedding) and the final norm input"
    ),
    "mtp_enorm": (
        "MTP enorm differs: it normalises the embedding of token t+1 (the next token), not t"
    ),
    "mtp_hnorm": (
        "MTP hnorm differs: it must be fed the post-final-norm trunk hidden (model.norm output), "
        "not the pre-norm l_out"
    ),
    "mtp_eh_proj": (
        "MTP eh_proj differs: the concat order is [enorm(embedding) ; hnorm(hidden)], "
        "embedding first"
    ),
    "mtp_attn_out": (
        "MTP attention differs: the MTP layer is always MLA; check its rope positions (those of "
        "the hidden) and its own KV cache"
    ),
    "mtp_ffn_inp": "MTP residual after attention differs: check the residual add on eh_proj output",
    "mtp_ffn_moe_topk": (
        "MTP router selected different experts: the MTP MoE has its own router and expert_bias "
        "(selection only), with the same group limit as the trunk"
    ),
    "mtp_ffn_moe_weights": (
        "MTP routing weights differ: unbiased sigmoid scores, normalised, times "
        "routed_scaling_factor"
    ),
    "mtp_ffn_out": "MTP MoE output differs: check its routed experts and its own shared expert",
    "mtp_l_out": "MTP block output differs: check the second residual add of the MTP layer",
    "mtp_result_norm": (
        "MTP final norm differs: it is the MTP layer's final_layernorm, not the trunk's model.norm"
    ),
    "mtp_result_output": (
        "MTP draft logits differ: the lm_head is shared with the trunk and applied to the MTP "
        "final_layernorm output"
    ),
}
_STEM_RE = re.compile(r"^(?P<stem>.+?)(?:-\d+)?$")


def explain_divergence(point: str) -> str:
    """What usually breaks at ``point``, in words, for the report and the CLI."""
    try:
        stem = parse(point)[0].stem
    except UnknownCapturePoint:
        m = _STEM_RE.match(point)
        stem = m["stem"] if m else point
    return _EXPLANATIONS.get(stem, f"{point} differs: no specific advice for this capture point")
