"""The numbers a comparison is judged by (``a`` is always the candidate, ``b`` the reference).

NMSE follows llama.cpp's ``test-backend-ops`` convention (normalised by the *reference*), and the
KL-divergence summary uses ``llama-perplexity --kl-divergence`` statistic names, so numbers compare
directly with llama.cpp's.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["cosine", "index_agreement", "kld_stats", "max_abs", "nmse", "top1_agreement"]

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
