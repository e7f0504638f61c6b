"""Why MTP does or does not speed decoding up: speculative throughput per port, broken down.

A :class:`TimedModel` wraps any :class:`harness.checks.mtp.MtpModel` and times every session call by
kind, so the same driver (:func:`harness.checks.mtp.speculative_greedy`,
:func:`harness.checks.mtp.plain_greedy`)
runs unchanged and no port needs timing code of its own:

- ``decode``: a trunk feed of one token (plain greedy's step; its mean is T1, the unit below);
- ``verify``: a trunk feed of the next token and its k drafts in one call;
- ``draft``: the MTP head (``draft`` and ``draft_chain``);
- ``snapshot`` / ``restore`` / ``refeed``: the undo of rejected drafts (the feed right after a
  restore is its re-feed: a re-computation under state copy, a cache trim under ``seq_rm``);
- ``bookkeeping``: what the driver spends outside session calls (argmax, slicing, stacking).

From the per-kind costs in units of T1 and the measured acceptance, the predicted speed-up is
``(1 + accepted per step) / (1 + draft + extra verify + rollback + bookkeeping)``; the largest
cost term is named in words, and the break-even acceptance (below it MTP cannot pay) follows from
the same costs.  Plain and speculative runs are interleaved (their order alternates), and the
measured speed-up is each pair's ratio of decode tok/s: its median and its min-max spread.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from harness.checks.mtp_decoding import (
    MtpModel,
    MtpSession,
    SpecResult,
    plain_greedy,
    speculative_greedy,
)
from harness.core.errors import InputError
from harness.perf.sweep import save_table, typed_frame

if TYPE_CHECKING:
    from harness.backends.targets import Target
    from harness.checks.cases import Case

KINDS: tuple[str, ...] = ("prefill", "decode", "verify", "draft", "snapshot", "restore", "refeed")
TERMS: tuple[str, ...] = ("draft", "extra_verify", "rollback", "bookkeeping")


# --------------------------------------------------------------------------------------------
# Timing wrapper


@dataclass
class CallLog:
    """Per-kind seconds and call counts of one session, plus the decode-phase wall clock."""

    durations: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    refeed_tokens: int = 0
    decode_start: float = math.nan  # perf_counter when the prompt's feed returned

    def add(self, kind: str, seconds: float) -> None:
        self.durations[kind].append(seconds)

    @property
    def seconds(self) -> dict[str, float]:
        return {k: sum(v) for k, v in self.durations.items()}

    @property
    def calls(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.durations.items()}

    def typical(self, kind: str) -> float:
        """The median call of ``kind`` (0 without calls): robust to a call that another job
        on the machine stalled, where a mean is not."""
        d = self.durations[kind]
        return statistics.median(d) if d else 0.0

    def in_calls(self) -> float:
        """Seconds inside session calls after the prefill."""
        return sum(s for k, s in self.seconds.items() if k != "prefill")


class TimedModel:
    """An MtpModel whose sessions log each call's kind and wall time (perf_counter)."""

    def __init__(self, model: MtpModel) -> None:
        self.inner = model
        self.label = model.label
        self.vocab_size = model.vocab_size
        self.log = CallLog()

    def start(self) -> _TimedSession:
        self.log = CallLog()
        return _TimedSession(self.inner.start(), self.log)


class _TimedSession:
    def __init__(self, inner: MtpSession, log: CallLog) -> None:
        self._inner, self._log = inner, log
        self._fed = False
        self._after_restore = False

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        t0 = time.perf_counter()
        out = self._inner.feed(tokens)
        t1 = time.perf_counter()
        if not self._fed:
            kind = "prefill"
            self._fed = True
            self._log.decode_start = t1
        elif self._after_restore:
            kind = "refeed"
            self._log.refeed_tokens += len(tokens)
        else:
            kind = "decode" if len(tokens) == 1 else "verify"
        self._after_restore = False
        self._log.add(kind, t1 - t0)
        return out

    def draft(self, next_token: int) -> np.ndarray:
        return self._timed("draft", self._inner.draft, next_token)

    def draft_chain(self, token: int) -> np.ndarray:
        return self._timed("draft", self._inner.draft_chain, token)

    def snapshot(self) -> object:
        return self._timed("snapshot", self._inner.snapshot)

    def restore(self, snap: object) -> None:
        self._timed("restore", self._inner.restore, snap)
        self._after_restore = True

    def _timed(self, kind: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        self._log.add(kind, time.perf_counter() - t0)
        return out


# --------------------------------------------------------------------------------------------
# One pair of runs


@dataclass(frozen=True)
class PlainTiming:
    """A plain greedy run's decode phase: seconds and tokens after the prefill."""

    decode_s: float
    tokens: int
    log: CallLog

    @property
    def tok_s(self) -> float:
        return self.tokens / self.decode_s if self.decode_s > 0 else math.nan


@dataclass(frozen=True)
class SpecTiming(PlainTiming):
    """A speculative run's decode phase, its per-kind log and its acceptance."""

    result: SpecResult


def time_plain(model: TimedModel, prompt: Sequence[int], n_new: int) -> PlainTiming:
    """Plain greedy decoding, timed from the end of the prefill to the last token."""
    plain_greedy(model, prompt, n_new)
    end = time.perf_counter()
    log = model.log
    return PlainTiming(end - log.decode_start, n_new - 1, log)


def time_spec(model: TimedModel, prompt: Sequence[int], n_new: int, chain: int) -> SpecTiming:
    """Speculative greedy decoding, timed as :func:`time_plain`."""
    result = speculative_greedy(model, prompt, n_new, chain)
    end = time.perf_counter()
    log = model.log
    return SpecTiming(end - log.decode_start, n_new - 1, log, result)


# --------------------------------------------------------------------------------------------
# The breakdown


@dataclass(frozen=True)
class Breakdown:
    """Per-step costs of speculative decoding in units of one plain trunk step (T1)."""

    chain: int
    t1_s: float  # one plain decode step (seconds; the median step of the plain run)
    accepted_per_step: float  # mean accepted drafts per draft step
    reject_rate: float  # fraction of draft steps with a rejected draft
    head_call: float  # one MTP head forward / T1
    verify: float  # one verification feed of 1+chain tokens / T1
    snapshot: float  # one snapshot / T1
    restore: float  # one restore / T1
    refeed: float  # the feed after a restore / T1
    bookkeeping: float  # driver time outside session calls per draft step / T1
    plain_steps: int = 0  # steps of the run with no room for a draft
    draft_steps: int = 0

    @property
    def draft(self) -> float:
        return self.chain * self.head_call

    @property
    def extra_verify(self) -> float:
        return self.verify - 1.0

    @property
    def rollback(self) -> float:
        """Snapshot every draft step, restore and re-feed on each rejection."""
        return self.snapshot + self.reject_rate * (self.restore + self.refeed)

    def terms(self) -> dict[str, float]:
        return {t: float(getattr(self, t)) for t in TERMS}

    @property
    def step_cost(self) -> float:
        """One draft step in T1 units: 1 + draft + extra verify + rollback + bookkeeping."""
        return 1.0 + sum(self.terms().values())

    @property
    def predicted_speedup(self) -> float:
        """The issue's formula, per draft step: (1 + accepted per step) / step cost."""
        return (1.0 + self.accepted_per_step) / self.step_cost

    @property
    def predicted_run_speedup(self) -> float:
        """The same costs over the run's own step mix (a plain step where no draft fits costs
        1 + bookkeeping), for comparison with the measured run."""
        tokens = self.draft_steps * (1.0 + self.accepted_per_step) + self.plain_steps
        cost = self.draft_steps * self.step_cost + self.plain_steps
        return tokens / cost if cost > 0 else math.nan

    @property
    def culprit(self) -> str:
        """The largest cost term: what eats the gain."""
        return max(TERMS, key=lambda t: self.terms()[t])

    def explain(self) -> str:
        """The culprit in words, with its figure."""
        k = self.chain
        t = self.culprit
        if t == "extra_verify":
            per_token = self.extra_verify / k
            batched = "the port does not batch the verify" if per_token > 0.8 else (
                f"each extra verified token costs {per_token:.2f} of a trunk step (a memory-bound "
                "port verifies it almost free)")
            return f"verification of {1 + k} tokens costs {self.verify:.2f}x one token: {batched}"
        if t == "rollback":
            parts = {"snapshot": self.snapshot,
                     "restore": self.reject_rate * self.restore,
                     "re-feed": self.reject_rate * self.refeed}
            top = max(parts, key=lambda p: parts[p])
            why = {
                "snapshot": "every step copies the whole state before verifying",
                "restore": f"one restore costs {self.restore:.1f}x a trunk step: it rebuilds or "
                           "writes back the whole state",
                "re-feed": "after a restore the kept tokens run through the trunk again",
            }[top]
            return (f"rollback costs {self.rollback:.2f}x a trunk step per draft step "
                    f"(snapshot {self.snapshot:.2f}, restore {self.restore:.2f}, re-feed "
                    f"{self.refeed:.2f} on {self.reject_rate:.0%} of steps): {why}")
        if t == "draft":
            return (f"the MTP head costs {self.head_call:.2f}x a trunk step per draft "
                    f"({k} per step): it is not one layer's worth of the trunk")
        return (f"driver bookkeeping costs {self.bookkeeping:.2f}x a trunk step per draft step "
                "(work outside the port's calls)")

    def break_even(self) -> float:
        """The per-draft acceptance rate below which speculation cannot pay (drafts accepted
        independently with that rate; rejections cost restore + re-feed); NaN when even 100 %
        acceptance does not pay."""
        return break_even_acceptance(
            self.chain, self.draft + self.extra_verify + self.snapshot + self.bookkeeping,
            self.restore + self.refeed,
        )


def speedup_at(chain: int, alpha: float, fixed: float, on_reject: float) -> float:
    """Predicted speed-up at per-draft acceptance ``alpha``: every draft step pays ``fixed``
    (T1 units, beyond the one trunk step), a step with a rejection also ``on_reject``."""
    accepted = sum(alpha**i for i in range(1, chain + 1))
    reject = 1.0 - alpha**chain
    return (1.0 + accepted) / (1.0 + fixed + reject * on_reject)


def break_even_acceptance(chain: int, fixed: float, on_reject: float) -> float:
    """Smallest alpha in [0, 1] with :func:`speedup_at` >= 1 (bisection; monotone in alpha)."""
    if speedup_at(chain, 1.0, fixed, on_reject) < 1.0:
        return math.nan
    if speedup_at(chain, 0.0, fixed, on_reject) >= 1.0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if speedup_at(chain, mid, fixed, on_reject) >= 1.0:
            hi = mid
        else:
            lo = mid
    return hi


def breakdown(plain: PlainTiming, spec: SpecTiming) -> Breakdown:
    """The breakdown of one speculative run against one plain run (T1 = plain s per token)."""
    t1 = plain.log.typical("decode")
    log, r = spec.log, spec.result
    n_draft = r.num_drafts
    n_plain_steps = len(r.steps) - n_draft
    rejected = sum(1 for s in r.draft_steps if s.accepted < len(s.drafts))
    # driver time: the decode phase outside session calls
    outside = spec.decode_s - log.in_calls()

    def per(kind: str) -> float:
        return log.typical(kind) / t1

    return Breakdown(
        chain=r.chain,
        t1_s=t1,
        accepted_per_step=r.num_accepted_tokens / n_draft if n_draft else 0.0,
        reject_rate=rejected / n_draft if n_draft else 0.0,
        head_call=per("draft"),
        verify=per("verify"),
        snapshot=per("snapshot"),
        restore=per("restore"),
        refeed=per("refeed"),
        bookkeeping=max(outside, 0.0) / n_draft / t1 if n_draft else 0.0,
        plain_steps=n_plain_steps,
        draft_steps=n_draft,
    )


def median_breakdown(parts: Sequence[Breakdown]) -> Breakdown:
    """Each field's median over repeats (the step counts are the first run's: greedy decoding
    makes them equal)."""
    if not parts:
        raise ValueError("median_breakdown: no runs")
    first = parts[0]
    fields = ("t1_s", "accepted_per_step", "reject_rate", "head_call", "verify", "snapshot",
              "restore", "refeed", "bookkeeping")
    values = {f: statistics.median(getattr(b, f) for b in parts) for f in fields}
    return Breakdown(chain=first.chain, plain_steps=first.plain_steps,
                     draft_steps=first.draft_steps, **values)


# --------------------------------------------------------------------------------------------
# Measurement over repeats


@dataclass(frozen=True)
class MtpSpeed:
    """One backend x prompt x chain: tok/s without and with MTP, the breakdown, the verdict."""

    label: str
    chain: int
    context: int  # prompt tokens
    n_new: int
    plain_tok_s: tuple[float, ...]
    spec_tok_s: tuple[float, ...]
    speedups: tuple[float, ...]  # per interleaved pair
    acceptance_rate: float
    breakdown: Breakdown

    @property
    def measured_speedup(self) -> float:
        return statistics.median(self.speedups)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.speedups), max(self.speedups)

    def agrees(self, slack: float = 0.0) -> bool:
        """The run-matched prediction lies within the measured min-max (widened by ``slack``,
        a fraction of the measured median)."""
        lo, hi = self.spread
        pad = slack * self.measured_speedup
        return lo - pad <= self.breakdown.predicted_run_speedup <= hi + pad

    def row(self) -> dict[str, Any]:
        b = self.breakdown
        lo, hi = self.spread
        return {
            "backend": self.label, "chain": self.chain, "context": self.context,
            "n_new": self.n_new, "repeats": len(self.speedups),
            "plain_tok_s": statistics.median(self.plain_tok_s),
            "mtp_tok_s": statistics.median(self.spec_tok_s),
            "plain_tok_s_spread": max(self.plain_tok_s) - min(self.plain_tok_s),
            "mtp_tok_s_spread": max(self.spec_tok_s) - min(self.spec_tok_s),
            "acceptance_rate": self.acceptance_rate,
            "accepted_per_step": b.accepted_per_step, "reject_rate": b.reject_rate,
            "t1_ms": b.t1_s * 1e3, "head_call": b.head_call, "verify": b.verify,
            "snapshot": b.snapshot, "restore": b.restore, "refeed": b.refeed,
            **{f"term_{t}": v for t, v in b.terms().items()},
            "predicted_speedup": b.predicted_speedup,
            "predicted_run_speedup": b.predicted_run_speedup,
            "measured_speedup": self.measured_speedup,
            "measured_speedup_min": lo, "measured_speedup_max": hi,
            "prediction_within_spread": self.agrees(),
            "break_even_acceptance": b.break_even(),
            "culprit": b.culprit, "explanation": b.explain(),
        }


def measure_mtp_speed(
    model: MtpModel,
    prompt: Sequence[int],
    n_new: int,
    chain: int = 1,
    repeats: int = 3,
    warmup: int = 1,
) -> MtpSpeed:
    """Interleaved plain and speculative runs on the same prompt (the order alternates per
    repeat, so drift hits both), after ``warmup`` untimed pairs; greedy output must agree."""
    if repeats < 1 or warmup < 0:
        raise InputError(f"MTP speed: repeats must be >= 1 and warmup >= 0 ({repeats}, {warmup})")
    if n_new < 2:
        raise InputError(f"MTP speed: at least 2 new tokens are needed, got {n_new}")
    timed = TimedModel(model)
    plains: list[PlainTiming] = []
    specs: list[SpecTiming] = []
    for i in range(warmup + repeats):
        if i % 2:
            s = time_spec(timed, prompt, n_new, chain)
            p = time_plain(timed, prompt, n_new)
        else:
            p = time_plain(timed, prompt, n_new)
            s = time_spec(timed, prompt, n_new, chain)
        if i >= warmup:
            plains.append(p)
            specs.append(s)
    result = specs[0].result
    parts = [breakdown(p, s) for p, s in zip(plains, specs, strict=True)]
    return MtpSpeed(
        label=model.label, chain=chain, context=len(prompt), n_new=n_new,
        plain_tok_s=tuple(p.tok_s for p in plains), spec_tok_s=tuple(s.tok_s for s in specs),
        speedups=tuple(s.tok_s / p.tok_s for p, s in zip(plains, specs, strict=True)),
        acceptance_rate=result.acceptance_rate, breakdown=median_breakdown(parts),
    )


# --------------------------------------------------------------------------------------------
# The sweep: targets x cases x context lengths x chains


COLUMNS: tuple[str, ...] = (
    "case", "backend", "chain", "context", "n_new", "repeats",
    "plain_tok_s", "mtp_tok_s", "plain_tok_s_spread", "mtp_tok_s_spread",
    "acceptance_rate", "accepted_per_step", "reject_rate", "t1_ms",
    "head_call", "verify", "snapshot", "restore", "refeed",
    *(f"term_{t}" for t in TERMS),
    "predicted_speedup", "predicted_run_speedup", "measured_speedup",
    "measured_speedup_min", "measured_speedup_max", "prediction_within_spread",
    "break_even_acceptance",
    "culprit", "explanation", "skip_reason",
)  # fmt: skip
_STR = ("case", "backend", "culprit", "explanation", "skip_reason")
_INT = ("chain", "context", "n_new", "repeats")


def mtp_speed_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The ``mtp_speed.parquet`` table: one row per case x backend x context x chain, every
    column of :data:`COLUMNS` typed (a skipped point keeps its reason and NaN figures)."""
    return typed_frame(rows, COLUMNS, strings=_STR, ints=_INT, special={
        "prediction_within_spread": lambda c: c.astype("boolean")})


def run_mtp_sweep(
    targets: Sequence[Target],
    cases: Sequence[Case],
    *,
    prompt_lengths: Sequence[int],
    tg: int,
    chains: Sequence[int] = (1,),
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    threads: int | None = None,
) -> pd.DataFrame:
    """Every target's MTP speed on every case at every prompt length and chain; the prompts
    are the throughput sweep's (seeded random ids, the same for every target).  A target that
    cannot load its MTP head, or a point that fails, becomes a row with ``skip_reason``."""
    from harness.checks.cases import materialize
    from harness.checks.mtp import load_mtp_model
    from harness.perf.sweep import _threads

    if tg < 1:
        raise InputError(f"--tg must be >= 1 for --mtp, got {tg}")
    rows: list[dict[str, Any]] = []
    for case in cases:
        ckpt = materialize(case)
        vocab = int(case.config["vocab_size"])
        for target in targets:
            points = [(pp, k) for pp in prompt_lengths for k in chains]
            try:
                model = load_mtp_model(target, ckpt)
            except Exception as e:  # a port without an MTP head here is a row, not a crash
                reason = f"{target.label} could not load its MTP head: {type(e).__name__}: {e}"
                rows += [{"case": case.name, "backend": target.label, "context": pp,
                          "chain": k, "skip_reason": reason} for pp, k in points]
                continue
            with _threads(target.backend, threads):
                for pp, k in points:
                    tokens = np.random.default_rng([seed, pp]).integers(0, vocab, pp).tolist()
                    base = {"case": case.name, "backend": target.label, "context": pp, "chain": k}
                    try:
                        speed = measure_mtp_speed(model, tokens, tg + 1, k, repeats, warmup)
                    except Exception as e:  # e.g. a chain beyond the port's rollback planes
                        rows.append({**base, "skip_reason": f"{type(e).__name__}: {e}"})
                        continue
                    rows.append({**speed.row(), "case": case.name, "skip_reason": ""})
            close = getattr(model, "close", None)
            if callable(close):
                close()
    return mtp_speed_frame(rows)


def save_mtp_speed(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write ``mtp_speed.parquet`` and ``mtp_speed.csv`` (never over earlier results)."""
    return save_table(df, out_dir, "mtp_speed")
