"""KLD over a corpus, as ``llama-perplexity --kl-divergence`` does it.

The corpus's tokens are cut into consecutive chunks of ``ctx`` tokens (the tail that fills no
chunk is dropped; a BOS the tokenizer adds replaces each chunk's first token, as llama does). Each
chunk is one fresh forward; the positions ``ctx // 2 .. ctx - 2`` are scored (each predicts the
next token), so every scored token has at least half a chunk of context. The reference runs once
(its scored logits go through a :mod:`harness.checks.kld_base` folder, saved or temporary, so a
direct run and a ``--base`` run read the very same numbers); then each backend, one in memory at
a time. Per token: KL(P_ref || P_backend), Δp of the correct token and top-1 agreement from
:func:`harness.core.metrics.kld_stats`, plus both models' NLL; the run's statistics follow
llama-perplexity's formulas and names (``perplexity.cpp::kl_divergence``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from harness.backends.base import forward
from harness.backends.targets import Target
from harness.checks.kld_base import BaseWriter, KldBase
from harness.checks.runner import Runner, check_captures
from harness.core import lifecycle
from harness.core.errors import InputError, PortFailure, port_boundary
from harness.core.metrics import kld_stats

MIN_CTX = 4
TOKEN_COLUMNS = ("backend", "chunk", "position", "token", "kld", "delta_p", "p_ref_top",
                 "p_backend_top", "same_top", "nll", "nll_base")
# llama-perplexity's percentiles: (statistic suffix, fraction); KLD's names as harness.core.metrics
KLD_PERCENTILES = (("max", 1.0), ("99.9", 0.999), ("99", 0.99), ("95", 0.95), ("90", 0.90),
                   ("median", 0.5), ("10", 0.10), ("5", 0.05), ("1", 0.01), ("0.1", 0.001),
                   ("min", 0.0))
DELTA_P_PERCENTILES = (("max", 1.0), ("99.9", 0.999), ("99", 0.99), ("95", 0.95), ("90", 0.90),
                       ("75", 0.75), ("median", 0.5), ("25", 0.25), ("10", 0.10), ("5", 0.05),
                       ("1", 0.01), ("0.1", 0.001), ("min", 0.0))


@dataclass(frozen=True)
class Chunks:
    """The corpus as ``[n_chunks, ctx]`` token ids and which positions are scored."""

    tokens: np.ndarray

    @property
    def n_chunks(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def ctx(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def first(self) -> int:
        """The first scored position (llama-perplexity: ``n_ctx / 2``)."""
        return self.ctx // 2

    @property
    def n_scored(self) -> int:
        return self.ctx - 1 - self.first

    def targets(self, i: int) -> np.ndarray:
        """The tokens the scored positions of chunk ``i`` predict."""
        return self.tokens[i, self.first + 1:]

    def scored(self, logits: np.ndarray) -> np.ndarray:
        """The scored rows of one chunk's ``[ctx, vocab]`` logits."""
        return np.asarray(logits, dtype=np.float64)[self.first:self.ctx - 1]


def split_corpus(ids: Sequence[int], ctx: int, chunks: int | None, *, bos: int | None,
                 source: str) -> tuple[Chunks, list[str]]:
    """``chunks`` (default: all that fit) consecutive chunks of ``ctx`` tokens, with notes."""
    if ctx < MIN_CTX:
        raise InputError(f"--ctx {ctx}: at least {MIN_CTX} tokens (the second half of a chunk "
                         "is scored)")
    if chunks is not None and chunks < 1:
        raise InputError(f"--chunks {chunks}: at least 1")
    fit = len(ids) // ctx
    if fit == 0:
        raise InputError(f"{source}: {len(ids)} tokens through the checkpoint's tokenizer, too "
                         f"short for one chunk of --ctx {ctx}; expected at least {ctx} tokens "
                         "(a longer corpus or a smaller --ctx)")
    notes = []
    n = fit if chunks is None else min(chunks, fit)
    if chunks is not None and chunks > fit:
        notes.append(f"--chunks {chunks}: {source} holds only {fit} chunks of {ctx} tokens; "
                     f"{fit} used")
    arr = np.asarray(list(ids[:n * ctx]), dtype=np.int64).reshape(n, ctx)
    if bos is not None:
        arr[:, 0] = bos
    return Chunks(arr), notes


def _log_probs(logits: np.ndarray) -> np.ndarray:
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def token_frame(label: str, chunk: int, first: int, ref: np.ndarray, cand: np.ndarray,
                targets: np.ndarray) -> pd.DataFrame:
    """One row per scored token of a chunk (``ref``/``cand``: its scored logits)."""
    if cand.shape != ref.shape:
        raise PortFailure(f"{label} returned logits of width {cand.shape[-1]}; the reference's "
                          f"are {ref.shape[-1]} wide")
    per = [kld_stats(cand[j], ref[j], targets[j:j + 1]) for j in range(ref.shape[0])]
    rows = np.arange(ref.shape[0])
    with np.errstate(invalid="ignore", over="ignore"):
        lp_ref, lp_cand = _log_probs(ref), _log_probs(cand)
    return pd.DataFrame({
        "backend": label, "chunk": chunk, "position": first + rows,
        "token": targets.astype(np.int64),
        "kld": [s["mean_kld"] for s in per], "delta_p": [s["mean_delta_p"] for s in per],
        "p_ref_top": np.exp(lp_ref.max(axis=-1)), "p_backend_top": np.exp(lp_cand.max(axis=-1)),
        "same_top": [s["same_top_p"] == 1.0 for s in per],
        "nll": -lp_cand[rows, targets], "nll_base": -lp_ref[rows, targets],
    })


def _mean_unc(x: np.ndarray) -> tuple[float, float]:
    """llama-perplexity's ``mean_and_uncertainty``: the mean and its standard error (0 for ten
    values or fewer)."""
    n = x.size
    if n == 0:
        return math.nan, math.nan
    mean = float(np.mean(x))
    var = float(np.mean(x * x)) - mean * mean
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def _cov(a: np.ndarray, b: np.ndarray) -> float:
    """llama-perplexity's covariance of the means (0 below ten values)."""
    n = a.size
    if n < 10:
        return 0.0
    return (float(np.mean(a * b)) - float(np.mean(a)) * float(np.mean(b))) / (n - 1)


def _percentiles(prefix: str, x: np.ndarray, table: Sequence[tuple[str, float]]
                 ) -> dict[str, float]:
    """Linear interpolation on the sorted values, as llama-perplexity (its median too)."""
    if x.size == 0:
        return {f"{prefix}_{name}": math.nan for name, _ in table}
    return {f"{prefix}_{name}": float(np.percentile(x, 100.0 * q)) for name, q in table}


def kld_summary(frame: pd.DataFrame) -> dict[str, float]:
    """llama-perplexity's final statistics over one backend's scored tokens (keys: its line
    names in snake case; probabilities as fractions, not percent)."""
    nll, base = frame["nll"].to_numpy(float), frame["nll_base"].to_numpy(float)
    kld, dp = frame["kld"].to_numpy(float), frame["delta_p"].to_numpy(float)
    n = int(kld.size)
    ln_q, ln_q_unc = _mean_unc(nll)
    ln_b, ln_b_unc = _mean_unc(base)
    cov = _cov(nll, base)
    ppl, ppl_base = math.exp(ln_q), math.exp(ln_b)
    ratio_unc = math.sqrt(max(ln_q_unc ** 2 + ln_b_unc ** 2 - 2 * cov, 0.0))
    denom = ln_q_unc * ln_b_unc
    out: dict[str, float] = {
        "n_tokens": n,
        "mean_ppl_q": ppl, "mean_ppl_q_unc": ppl * ln_q_unc,
        "mean_ppl_base": ppl_base, "mean_ppl_base_unc": ppl_base * ln_b_unc,
        "cor_ln_ppl": cov / denom if denom > 0 else math.nan,
        "mean_ln_ppl_ratio": ln_q - ln_b, "mean_ln_ppl_ratio_unc": ratio_unc,
        "mean_ppl_ratio": math.exp(ln_q - ln_b),
        "mean_ppl_ratio_unc": math.exp(ln_q - ln_b) * ratio_unc,
        "mean_ppl_diff": ppl - ppl_base,
        "mean_ppl_diff_unc": math.sqrt(max((ppl * ln_q_unc) ** 2 + (ppl_base * ln_b_unc) ** 2
                                           - 2 * ppl * ppl_base * cov, 0.0)),
    }
    out["mean_kld"], out["mean_kld_unc"] = _mean_unc(kld)
    out.update(_percentiles("kld", kld, KLD_PERCENTILES))
    out["mean_delta_p"], out["mean_delta_p_unc"] = _mean_unc(dp)
    out.update(_percentiles("delta_p", dp, DELTA_P_PERCENTILES))
    mse, mse_unc = _mean_unc(dp * dp)
    out["rms_delta_p"] = math.sqrt(mse)
    out["rms_delta_p_unc"] = 0.5 / out["rms_delta_p"] * mse_unc if out["rms_delta_p"] > 0 else 0.0
    same = float(frame["same_top"].mean()) if n else math.nan
    out["same_top_p"] = same
    out["same_top_p_unc"] = math.sqrt(same * (1 - same) / (n - 1)) if n >= 2 else 0.0
    return out


def chunk_table(frame: pd.DataFrame) -> list[dict[str, float]]:
    """Per chunk: perplexity of the backend and of the reference, mean KLD, RMS Δp, same top."""
    rows = []
    for chunk, g in frame.groupby("chunk", sort=True):
        rows.append({"chunk": int(chunk), "ppl": math.exp(g["nll"].mean()),
                     "ppl_base": math.exp(g["nll_base"].mean()),
                     "mean_kld": float(g["kld"].mean()),
                     "rms_delta_p": math.sqrt(float((g["delta_p"] ** 2).mean())),
                     "same_top_p": float(g["same_top"].mean())})
    return rows


@dataclass
class BackendKld:
    """One backend's corpus KLD against the reference, or why it has none."""

    label: str
    tokens: pd.DataFrame | None = None
    error: str | None = None

    @property
    def summary(self) -> dict[str, float] | None:
        return None if self.tokens is None else kld_summary(self.tokens)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "error": self.error, "summary": self.summary,
                "chunks": None if self.tokens is None else chunk_table(self.tokens)}


@dataclass
class CorpusKld:
    """The reference and each backend over the chunks, one model in memory at a time."""

    checkpoint: Path
    chunks: Chunks
    runner: Runner = field(default_factory=Runner)
    progress: Callable[[str], None] = lambda _msg: None

    def logits(self, target: Target, i: int) -> np.ndarray:
        """Chunk ``i``'s scored logits from ``target`` (PortFailure if it breaks)."""
        tokens = [int(t) for t in self.chunks.tokens[i]]
        model = self.runner.model(target, self.checkpoint)
        with port_boundary(target.label, f"crashed on corpus chunk {i + 1}"):
            caps = forward(model, tokens, ["result_output"])
        caps = check_captures(target.label, f"corpus chunk {i + 1}", caps, len(tokens))
        return self.chunks.scored(caps["result_output"])

    def save_reference(self, reference: Target, writer: BaseWriter) -> None:
        """Run the reference over every chunk into ``writer``, then free it."""
        lifecycle.stage("reference")
        for i in range(self.chunks.n_chunks):
            self.progress(f"{reference.label}: chunk {i + 1}/{self.chunks.n_chunks}")
            writer.add(self.chunks.tokens[i], self.logits(reference, i))
        self.runner.release(self.checkpoint)

    def against_itself(self, label: str, base: KldBase) -> BackendKld:
        """The base compared with itself: KLD exactly 0 and same top 100% when the statistics
        are sound (the table's sanity row)."""
        frames = []
        for i in range(self.chunks.n_chunks):
            ref = base.logits(i)
            frames.append(token_frame(label, i, self.chunks.first, ref, ref,
                                      self.chunks.targets(i)))
        return BackendKld(label, pd.concat(frames, ignore_index=True))

    def backend(self, target: Target, base: KldBase) -> BackendKld:
        """``target`` over every chunk against the base; a crash is its finding."""
        frames = []
        try:
            for i in range(self.chunks.n_chunks):
                self.progress(f"{target.label}: chunk {i + 1}/{self.chunks.n_chunks}")
                frames.append(token_frame(target.label, i, self.chunks.first, base.logits(i),
                                          self.logits(target, i), self.chunks.targets(i)))
        except PortFailure as e:
            return BackendKld(target.label, error=str(e))
        finally:
            self.runner.release(self.checkpoint)  # one backend in memory at a time
        return BackendKld(target.label, pd.concat(frames, ignore_index=True))


def token_table(results: Sequence[BackendKld]) -> pd.DataFrame:
    """Every backend's per-token rows (the run's ``kld.parquet``)."""
    frames = [r.tokens for r in results if r.tokens is not None]
    if not frames:
        return pd.DataFrame({c: [] for c in TOKEN_COLUMNS})
    return pd.concat(frames, ignore_index=True)[list(TOKEN_COLUMNS)]


@dataclass(frozen=True)
class KldSection:
    """The report's "Corpus KLD" section: the corpus, the chunks and one row per backend."""

    corpus: str
    ctx: int
    n_chunks: int
    first: int
    reference: str
    rows: tuple[dict[str, Any], ...]
    title: str = "Corpus KLD (llama-perplexity --kl-divergence)"
    template: ClassVar[str] = "kld.html.j2"


def kld_section(results: Sequence[BackendKld], chunks: Chunks, corpus: str,
                reference: str) -> KldSection:
    """Data for :class:`KldSection` (a crashed backend's row carries its error)."""
    rows = tuple({"label": r.label, "error": r.error, **(r.summary or {})} for r in results)
    return KldSection(corpus, chunks.ctx, chunks.n_chunks, chunks.first, reference, rows)
