"""Speculative greedy decoding with the MTP (NextN) head, and its acceptance metrics.

Backend-agnostic: a backend supplies an :class:`MtpModel` whose sessions feed the trunk, draft from
the MTP head, and can undo a rejected verification.  Verification is greedy exact match, as in
mlx-lm's ``speculative_generate_step`` and llama.cpp's ``draft-mtp``, so speculation must never
change the greedy output: :func:`speculative_greedy` and :func:`plain_greedy` agree token for token
on any correct backend, and a run records it.

Metric names are vLLM's / llama-server's (parity-conventions §0 item 9): acceptance rate =
accepted / drafted tokens; mean acceptance length = 1 + accepted / num_drafts; per-position
acceptance = accepted at draft position i / num_drafts.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from markupsafe import escape

from harness.backends.targets import REFERENCE, Target
from harness.checks.compare import Tolerance, compare_captures, first_divergence, nmse
from harness.core.errors import InputError, PortFailure, describe_exception
from harness.report.page import Section

# Columns of mtp.parquet / mtp.csv; the regression gate reads these names.
MTP_COLUMNS: tuple[str, ...] = (
    "case",
    "prompt",
    "backend",
    "num_drafts",
    "num_draft_tokens",
    "num_accepted_tokens",
    "acceptance_rate",
    "mean_acceptance_length",
    "draft_nmse_max",
    "draft_top1",
)
# Written after MTP_COLUMNS: what a reader needs to trust or debug the row.
EXTRA_COLUMNS: tuple[str, ...] = (
    "chain",
    "steps",
    "accepted_per_pos",
    "drafts_match_reference",
    "greedy_unchanged",
    "draft_tolerance",
    "mtp_first_divergence",
    "error",
)

# backend name -> "module:function(checkpoint_dir, BackendOptions, label) -> MtpModel".
# A llama.cpp MTP context plugs in here.
MTP_BACKENDS: dict[str, str] = {
    "torch": "harness.checks.mtp:_load_torch",
    "mlx": "harness.backends.mlx_mtp:load_mlx_mtp",
}
MTP_BACKENDS["llamacpp"] = "harness.llamacpp.mtp:load_llamacpp_mtp"


# --------------------------------------------------------------------------------------------
# Protocol


@runtime_checkable
class MtpSession(Protocol):
    """One sequence through the trunk and the MTP head, with undo.

    MTP position t reads the trunk hidden of position t and the token at t+1, so the head can only
    run once the next token is chosen; a session keeps the hiddens it still owes the head and the
    MTP layer's own KV cache in step with the trunk.
    """

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        """Trunk: consume ``tokens`` after everything fed before; logits [T, vocab] (float64)."""
        ...

    def draft(self, next_token: int) -> np.ndarray:
        """``next_token`` follows the last fed token: commit the MTP rows of every fed position
        whose next token is now known and return the draft logits [vocab] of the last one (a
        prediction of the token after ``next_token``)."""
        ...

    def draft_chain(self, token: int) -> np.ndarray:
        """Reuse the head on its own previous output with ``token`` (the previous draft) as the
        next token: draft logits [vocab] one position further. Speculative: what it adds to the
        MTP cache is dropped by the next :meth:`draft`."""
        ...

    def snapshot(self) -> object:
        """An opaque copy of the session state (trunk caches, MTP cache, pending hiddens)."""
        ...

    def restore(self, snap: object) -> None:
        """Return to a :meth:`snapshot` (undo a verification batch with rejected drafts)."""
        ...


@runtime_checkable
class MtpModel(Protocol):
    """A checkpoint loaded with its MTP head.

    Optionally also ``capture(tokens) -> {point: array}``: the prompt teacher-forced through the
    trunk and the head, the canonical mtp_* points it can name (rows 0..T-2) plus
    ``result_output``; :func:`first_mtp_divergence` uses it to say where a head goes wrong.
    """

    label: str
    vocab_size: int

    def start(self) -> MtpSession: ...


# --------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class DraftStep:
    """One verification step: ``next_token`` (already chosen) is fed with the drafts after it."""

    position: int  # trunk position of the MTP row that drafted (the last fed position)
    next_token: int
    drafts: tuple[int, ...]  # empty: a plain step (no room left for a draft)
    accepted: int  # length of the accepted draft prefix
    draft_logits: np.ndarray  # [len(drafts), vocab]


@dataclass(frozen=True)
class SpecResult:
    """A speculative greedy run and its acceptance metrics."""

    prompt: tuple[int, ...]
    tokens: tuple[int, ...]  # the generated tokens
    steps: tuple[DraftStep, ...]
    chain: int

    @property
    def draft_steps(self) -> list[DraftStep]:
        return [s for s in self.steps if s.drafts]

    @property
    def num_drafts(self) -> int:
        return len(self.draft_steps)

    @property
    def num_draft_tokens(self) -> int:
        return sum(len(s.drafts) for s in self.steps)

    @property
    def num_accepted_tokens(self) -> int:
        return sum(s.accepted for s in self.steps)

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted tokens (NaN without drafts)."""
        n = self.num_draft_tokens
        return self.num_accepted_tokens / n if n else math.nan

    @property
    def mean_acceptance_length(self) -> float:
        """1 + accepted / num_drafts: tokens per verification step, the bonus token included."""
        n = self.num_drafts
        return 1 + self.num_accepted_tokens / n if n else math.nan

    @property
    def accepted_per_pos(self) -> list[int]:
        """How many steps accepted draft position i (vLLM's per-position counter)."""
        return [sum(s.accepted > i for s in self.steps) for i in range(self.chain)]

    @property
    def acceptance_per_pos(self) -> list[float]:
        """accepted_per_pos[i] / num_drafts (llama-server's "acc per pos")."""
        n = self.num_drafts
        return [c / n if n else math.nan for c in self.accepted_per_pos]

    def trace(self) -> list[tuple[int, tuple[int, ...], int]]:
        """(next_token, drafts, accepted) per step: equal traces mean identical decoding."""
        return [(s.next_token, s.drafts, s.accepted) for s in self.steps]


def _argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def plain_greedy(model: MtpModel, prompt: Sequence[int], n_new: int) -> list[int]:
    """Greedy decoding through the trunk only, one token per step: the ground truth."""
    _check_run(prompt, n_new, 1)
    session = model.start()
    out = [_argmax(session.feed(list(prompt))[-1])]
    while len(out) < n_new:
        out.append(_argmax(session.feed([out[-1]])[-1]))
    return out


def speculative_greedy(
    model: MtpModel, prompt: Sequence[int], n_new: int, chain: int = 1
) -> SpecResult:
    """Greedy decoding where the MTP head drafts ``chain`` tokens per step (chained reuse of the
    one MTP layer) and the trunk verifies them in one batch by exact match.

    A step feeds [next_token, d_1..d_k]; the longest prefix of drafts equal to the trunk's argmax
    is accepted, and the argmax after it is the next token (bonus or correction).  On a rejection
    the session is restored and the accepted part re-fed, so caches hold only committed tokens.
    Drafts never run past ``n_new``: when one token is left, the step is a plain one.
    """
    _check_run(prompt, n_new, chain)
    session = model.start()
    out = [_argmax(session.feed(list(prompt))[-1])]
    fed = len(prompt)
    steps: list[DraftStep] = []
    while len(out) < n_new:
        y = out[-1]
        k = min(chain, n_new - len(out) - 1)
        rows: list[np.ndarray] = []
        drafts: list[int] = []
        if k:
            rows.append(np.asarray(session.draft(y), dtype=np.float64))
            drafts.append(_argmax(rows[-1]))
            for _ in range(k - 1):
                rows.append(np.asarray(session.draft_chain(drafts[-1]), dtype=np.float64))
                drafts.append(_argmax(rows[-1]))
        snap = session.snapshot() if drafts else None
        logits = session.feed([y, *drafts])
        accepted = 0
        while accepted < len(drafts) and _argmax(logits[accepted]) == drafts[accepted]:
            accepted += 1
        if accepted < len(drafts):
            session.restore(snap)
            session.feed([y, *drafts[:accepted]])
        vocab = logits.shape[-1]
        steps.append(
            DraftStep(
                position=fed - 1,
                next_token=y,
                drafts=tuple(drafts),
                accepted=accepted,
                draft_logits=np.stack(rows) if rows else np.zeros((0, vocab)),
            )
        )
        fed += 1 + accepted
        out += [*drafts[:accepted], _argmax(logits[accepted])]
    return SpecResult(tuple(int(t) for t in prompt), tuple(out[:n_new]), tuple(steps), chain)


def _check_run(prompt: Sequence[int], n_new: int, chain: int) -> None:
    if not prompt:
        raise InputError("MTP decoding needs a non-empty prompt")
    if n_new < 1:
        raise InputError(f"MTP decoding needs at least one new token, got {n_new}")
    if chain < 1:
        raise InputError(f"chain must be >= 1, got {chain}")


def replay_drafts(reference: MtpModel, result: SpecResult) -> list[np.ndarray]:
    """The reference's draft logits for each step of ``result``, in the same contexts: the
    reference is fed exactly the tokens the run committed and drafts after the same tokens
    (chained drafts after the run's own drafts), so differences are the head's alone."""
    session = reference.start()
    session.feed(list(result.prompt))
    out = []
    for step in result.steps:
        rows = []
        if step.drafts:
            rows.append(session.draft(step.next_token))
            rows += [session.draft_chain(d) for d in step.drafts[:-1]]
        vocab = step.draft_logits.shape[-1]
        out.append(np.stack(rows).astype(np.float64) if rows else np.zeros((0, vocab)))
        session.feed([step.next_token, *step.drafts[: step.accepted]])
    return out


def draft_agreement(result: SpecResult, reference_rows: list[np.ndarray]) -> tuple[float, float]:
    """(max NMSE over steps, top-1 agreement over draft rows) of the run's draft logits against
    the reference's (NMSE normalised by the reference, as everywhere in the harness)."""
    nmses, same, rows = [], 0, 0
    for step, ref in zip(result.steps, reference_rows, strict=True):
        if not step.drafts:
            continue
        nmses.append(nmse(step.draft_logits, ref))
        same += int(np.sum(np.argmax(step.draft_logits, -1) == np.argmax(ref, -1)))
        rows += len(step.drafts)
    if not rows:
        return math.nan, math.nan
    return max(nmses), same / rows


class OracleDrafts:
    """An :class:`MtpModel` whose drafts are the trunk's own greedy tokens (one-hot logits): a
    self-draft that every correct verifier must accept 100 % (mlx-lm's self-draft test).

    The wrapped head still runs at every draft, so its cache bookkeeping is exercised under the
    accept/reject pattern of the oracle; ``wrong_every=n`` makes every n-th draft wrong (the
    oracle token + 1), a known pattern of rejections.
    """

    def __init__(
        self, model: MtpModel, prompt: Sequence[int], n_ahead: int, wrong_every: int = 0
    ) -> None:
        self._model = model
        self.label = f"oracle({model.label})"
        self.vocab_size = model.vocab_size
        self.wrong_every = wrong_every
        self.sequence = [*prompt, *plain_greedy(model, prompt, n_ahead)]

    def start(self) -> _OracleSession:
        return _OracleSession(self, self._model.start())


class _OracleSession:
    def __init__(self, owner: OracleDrafts, inner: MtpSession) -> None:
        self._owner, self._inner = owner, inner
        self._fed = 0
        self._ahead = 0
        self._drafted = 0

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        self._fed += len(tokens)
        return self._inner.feed(tokens)

    def _one_hot(self) -> np.ndarray:
        o = self._owner
        index = self._fed + self._ahead  # the sequence index of the drafted token
        self._drafted += 1
        row = np.zeros(o.vocab_size)
        if index < len(o.sequence):
            wrong = o.wrong_every and self._drafted % o.wrong_every == 0
            row[(o.sequence[index] + int(bool(wrong))) % o.vocab_size] = 1.0
        return row

    def draft(self, next_token: int) -> np.ndarray:
        self._inner.draft(next_token)
        self._ahead = 1
        return self._one_hot()

    def draft_chain(self, token: int) -> np.ndarray:
        self._inner.draft_chain(token)
        self._ahead += 1
        return self._one_hot()

    def snapshot(self) -> object:
        return (self._inner.snapshot(), self._fed)

    def restore(self, snap: object) -> None:
        inner, self._fed = snap  # type: ignore[misc]
        self._inner.restore(inner)


# --------------------------------------------------------------------------------------------
# Runs over backends


def _load_torch(checkpoint_dir: Path, options: Any, label: str) -> MtpModel:
    """Ling-2.6: our reference with its MTP head; Ling 3.0: transformers' trunk with our head."""
    from harness.backends.torch_backend import reference_options
    from harness.backends.transformers_ling3 import checkpoint_family
    from references.model import BailingHybridReference
    from references.mtp_session import ReferenceMtpModel

    if checkpoint_family(checkpoint_dir) == "ling3":
        from references.ling3.mtp import load_ling3_mtp

        return load_ling3_mtp(checkpoint_dir, options, label)
    model = BailingHybridReference.from_checkpoint(checkpoint_dir, reference_options(options))
    return ReferenceMtpModel(model, label)


def load_mtp_model(target: Target, checkpoint_dir: Path) -> MtpModel:
    """Load ``target``'s backend with its MTP head (InputError: unknown backend, no MTP head)."""
    if target.backend not in MTP_BACKENDS:
        raise InputError(
            f"no MTP implementation for backend {target.backend!r}; "
            f"known: {', '.join(MTP_BACKENDS)}"
        )
    module, func = MTP_BACKENDS[target.backend].split(":")
    loader: Callable[..., MtpModel] = getattr(importlib.import_module(module), func)
    return loader(Path(checkpoint_dir), target.options(), target.label)


@dataclass
class MtpRun:
    """One backend's speculative run on one prompt, judged against the reference's."""

    case: str
    prompt: str
    backend: str
    result: SpecResult | None
    greedy_unchanged: bool = False
    drafts_match_reference: bool = False
    draft_nmse_max: float = math.nan
    draft_top1: float = math.nan
    error: str = ""
    # The draft-logit NMSE limit this run was held to (None: not held, e.g. low precision); equal
    # draft tokens can hide a wrong head whose logits differ by far more than rounding.
    draft_tolerance: float | None = None
    # Teacher-forced mtp_* points against the reference's: the first beyond the tolerance,
    # "none" when all are within it, "" when the backend cannot capture its head's points.
    mtp_first_divergence: str = ""

    @property
    def draft_logits_ok(self) -> bool:
        tol = self.draft_tolerance
        return tol is None or math.isnan(self.draft_nmse_max) or self.draft_nmse_max <= tol

    @property
    def ok(self) -> bool:
        """Speculation kept the greedy output, the drafts are the reference's and so, within
        the tolerance, are the draft logits."""
        return (
            not self.error
            and self.greedy_unchanged
            and self.drafts_match_reference
            and self.draft_logits_ok
            and self.mtp_first_divergence in ("", "none")
        )

    def row(self) -> dict[str, Any]:
        r = self.result
        metrics: dict[str, Any] = {
            "num_drafts": r.num_drafts if r else 0,
            "num_draft_tokens": r.num_draft_tokens if r else 0,
            "num_accepted_tokens": r.num_accepted_tokens if r else 0,
            "acceptance_rate": r.acceptance_rate if r else math.nan,
            "mean_acceptance_length": r.mean_acceptance_length if r else math.nan,
        }
        return {
            "case": self.case,
            "prompt": self.prompt,
            "backend": self.backend,
            **metrics,
            "draft_nmse_max": self.draft_nmse_max,
            "draft_top1": self.draft_top1,
            "chain": r.chain if r else 0,
            "steps": len(r.tokens) if r else 0,
            "accepted_per_pos": ",".join(map(str, r.accepted_per_pos)) if r else "",
            "drafts_match_reference": self.drafts_match_reference,
            "greedy_unchanged": self.greedy_unchanged,
            "draft_tolerance": math.nan if self.draft_tolerance is None else self.draft_tolerance,
            "mtp_first_divergence": self.mtp_first_divergence,
            "error": self.error,
        }


def default_draft_tolerance(target: Target) -> float | None:
    """The parity NMSE tolerance of the candidate's dtype (float32: 1e-8); none below float32,
    where only the greedy output must survive speculation."""
    from harness.checks.cases import DEFAULT_TOLERANCES

    if target.dtype in ("float32", "float64"):
        return DEFAULT_TOLERANCES["float32"].nmse
    return None


@dataclass
class MtpPrompt:
    case: str
    name: str
    tokens: tuple[int, ...]


@dataclass
class MtpRunner:
    """Runs the reference and each candidate on the prompts; models are loaded once."""

    steps: int = 32
    chain: int = 1
    reference: Target = field(default_factory=lambda: Target.parse(REFERENCE))
    runs: list[MtpRun] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    # candidate -> the max draft-logit NMSE it is held to (None: only the drafts must match)
    draft_tolerance: Callable[[Target], float | None] = field(
        default_factory=lambda: default_draft_tolerance
    )
    _models: dict[tuple[Target, Path], MtpModel] = field(default_factory=dict)

    def model(self, target: Target, checkpoint: Path) -> MtpModel:
        key = (target, Path(checkpoint))
        if key not in self._models:
            self._models[key] = load_mtp_model(target, checkpoint)
        return self._models[key]

    def run(
        self, checkpoint: Path, prompt: MtpPrompt, candidates: Sequence[Target]
    ) -> list[MtpRun]:
        """The reference's run, then each candidate's compared with it (reference row first)."""
        ref_model = self.model(self.reference, checkpoint)
        ref = speculative_greedy(ref_model, prompt.tokens, self.steps, self.chain)
        ref_plain = plain_greedy(ref_model, prompt.tokens, self.steps)
        out = [
            MtpRun(
                prompt.case,
                prompt.name,
                self.reference.label,
                ref,
                greedy_unchanged=list(ref.tokens) == ref_plain,
                drafts_match_reference=True,
                draft_nmse_max=0.0,
                draft_top1=1.0 if ref.num_drafts else math.nan,
            )
        ]
        for target in candidates:
            if target == self.reference:
                continue
            out.append(self._candidate(checkpoint, prompt, target, ref, ref_model))
        for r in out:
            if r.result is not None and not r.greedy_unchanged:
                self.findings.append(
                    f"{r.backend} on {r.case}/{r.prompt}: speculative decoding changed the greedy "
                    "output (a verification or cache-rollback bug)"
                )
        self.runs += out
        return out

    def _candidate(
        self,
        checkpoint: Path,
        prompt: MtpPrompt,
        target: Target,
        ref: SpecResult,
        ref_model: MtpModel,
    ) -> MtpRun:
        try:
            model = self.model(target, checkpoint)
            spec = speculative_greedy(model, prompt.tokens, self.steps, self.chain)
            plain = plain_greedy(model, prompt.tokens, self.steps)
        except (InputError, PortFailure) as e:
            self.findings.append(f"{target.label} MTP on {prompt.case}/{prompt.name}: {e}")
            return MtpRun(prompt.case, prompt.name, target.label, None, error=str(e))
        except (Exception, SystemExit) as e:  # a port that crashes is a finding, not ours
            msg = describe_exception(e)
            self.findings.append(f"{target.label} MTP on {prompt.case}/{prompt.name}: {msg}")
            return MtpRun(prompt.case, prompt.name, target.label, None, error=msg)
        nmse_max, top1 = draft_agreement(spec, replay_drafts(ref_model, spec))
        same = spec.trace() == ref.trace()
        if not same:
            self.findings.append(
                f"{target.label} on {prompt.case}/{prompt.name}: drafts or acceptance differ from "
                f"the reference ({spec.num_accepted_tokens}/{spec.num_draft_tokens} vs "
                f"{ref.num_accepted_tokens}/{ref.num_draft_tokens} accepted)"
            )
        run = MtpRun(
            prompt.case,
            prompt.name,
            target.label,
            spec,
            greedy_unchanged=list(spec.tokens) == plain,
            drafts_match_reference=same,
            draft_nmse_max=nmse_max,
            draft_top1=top1,
            draft_tolerance=self.draft_tolerance(target),
        )
        if not run.draft_logits_ok:
            self.findings.append(
                f"{target.label} on {prompt.case}/{prompt.name}: draft logits differ from the "
                f"reference's (NMSE max {nmse_max:.2e} > {run.draft_tolerance:.0e})"
            )
        run.mtp_first_divergence = self._first_divergence(model, ref_model, prompt, target)
        if run.mtp_first_divergence not in ("", "none"):
            self.findings.append(
                f"{target.label} on {prompt.case}/{prompt.name}: the MTP head first differs from "
                f"the reference's at {run.mtp_first_divergence} (teacher-forced on the prompt)"
            )
        return run

    def _first_divergence(
        self, model: MtpModel, ref_model: MtpModel, prompt: MtpPrompt, target: Target
    ) -> str:
        tol = self.draft_tolerance(target)
        if tol is None:
            return ""
        try:
            return first_mtp_divergence(model, ref_model, prompt.tokens, tol)
        except (InputError, PortFailure) as e:
            self.findings.append(f"{target.label} MTP capture on {prompt.case}/{prompt.name}: {e}")
        except Exception as e:  # a port whose capture crashes is a finding, not a harness crash
            self.findings.append(
                f"{target.label} MTP capture on {prompt.case}/{prompt.name}: "
                f"{type(e).__name__}: {e}"
            )
        return ""


def first_mtp_divergence(
    model: MtpModel, reference: MtpModel, tokens: Sequence[int], nmse_tolerance: float
) -> str:
    """Where ``model``'s head first leaves the reference's, point by point, with ``tokens``
    teacher-forced through both: the first mtp_* (or trunk) point beyond the tolerance among
    those the candidate names, "none" when every one is within it, "" when either side cannot
    capture (no ``capture`` method)."""
    capture = getattr(model, "capture", None)
    ref_capture = getattr(reference, "capture", None)
    if capture is None or ref_capture is None or len(tokens) < 2:
        return ""
    df = compare_captures(capture(tokens), ref_capture(tokens), Tolerance(nmse=nmse_tolerance))
    return first_divergence(df) or "none"


# --------------------------------------------------------------------------------------------
# Tables and report


def mtp_frame(runs: Sequence[MtpRun]) -> pd.DataFrame:
    """One row per (case, prompt, backend): the gate's columns first, then the extras."""
    df = pd.DataFrame([r.row() for r in runs], columns=[*MTP_COLUMNS, *EXTRA_COLUMNS])
    for c in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "chain", "steps"):
        df[c] = df[c].astype(np.int64)
    for c in ("acceptance_rate", "mean_acceptance_length", "draft_nmse_max", "draft_top1",
              "draft_tolerance"):
        df[c] = df[c].astype(np.float64)
    for c in ("drafts_match_reference", "greedy_unchanged"):
        df[c] = df[c].astype(bool)
    for c in ("case", "prompt", "backend", "accepted_per_pos", "mtp_first_divergence", "error"):
        df[c] = df[c].astype(str)
    return df


def save_mtp(df: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Write ``mtp.parquet`` and ``mtp.csv`` (the regression gate reads MTP_COLUMNS)."""
    missing = [c for c in MTP_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"save_mtp: missing column(s) {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"parquet": out_dir / "mtp.parquet", "csv": out_dir / "mtp.csv"}
    df.to_parquet(paths["parquet"], index=False)
    df.to_csv(paths["csv"], index=False)
    return paths


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "–"
    return format(value, spec)


def mtp_section(runs: Sequence[MtpRun]) -> Section:
    """The MTP table: acceptance per backend and prompt, per-position acceptance, draft-logit
    agreement with the reference, and whether speculation kept the greedy output."""
    head = (
        "<tr><th>case</th><th>prompt</th><th>backend</th><th>drafts</th><th>draft tokens</th>"
        "<th>accepted</th><th>acceptance rate</th><th>mean acc. length</th><th>acc. per pos</th>"
        "<th>draft NMSE max</th><th>draft top-1</th><th>same drafts as ref</th>"
        "<th>first MTP divergence</th><th>greedy unchanged</th></tr>"
    )
    body = []
    for run in runs:
        r = run.result
        if r is None:
            cells = [run.case, run.prompt, run.backend]
            body.append(
                '<tr class="fail">'
                + "".join(f"<td>{escape(c)}</td>" for c in cells)
                + f'<td colspan="11">{escape(run.error)}</td></tr>'
            )
            continue
        per_pos = _acceptance_bars(r.acceptance_per_pos)
        cells = [
            escape(run.case),
            escape(run.prompt),
            escape(run.backend),
            str(r.num_drafts),
            str(r.num_draft_tokens),
            str(r.num_accepted_tokens),
            _fmt(r.acceptance_rate, ".3f"),
            _fmt(r.mean_acceptance_length, ".3f"),
            per_pos,
            _fmt(run.draft_nmse_max, ".1e"),
            _fmt(run.draft_top1, ".3f"),
            _verdict(run.drafts_match_reference),
            _divergence(run.mtp_first_divergence),
            _verdict(run.greedy_unchanged),
        ]
        css = "pass" if run.ok else "fail"
        body.append(f'<tr class="{css}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    note = (
        '<p class="muted">Greedy speculative decoding, drafts verified by exact match. '
        "Acceptance rate = accepted/drafted; mean acceptance length = 1 + accepted/num_drafts; "
        "per-position acceptance = accepted at draft position i / num_drafts. Draft NMSE and "
        "top-1 compare each backend's draft logits with the float64 reference's in the same "
        "contexts. First MTP divergence: the prompt teacher-forced through both heads, the first "
        "mtp_* point (among those the backend names) beyond the NMSE tolerance; – where the "
        "backend cannot capture its head.</p>"
    )
    html = f'{note}<table class="mtp">{head}{"".join(body)}</table>'
    return Section("MTP speculative decoding", html)


def _acceptance_bars(per_pos: Sequence[float]) -> str:
    """Acceptance per draft position as a row of small bars (the value in each tooltip and as
    text), so the fall-off with depth shows at a glance."""
    bars = "".join(
        f'<span class="accpos" title="draft position {i}: {_fmt(p, ".2f")}">'
        f'<span style="width: {max(0.0, min(1.0, p)) * 100:.0f}%"></span></span>'
        for i, p in enumerate(per_pos, start=1)
        if not math.isnan(p)
    )
    return f'{bars} <span class="mono">{", ".join(_fmt(p, ".2f") for p in per_pos)}</span>'


def _divergence(point: str) -> str:
    if not point:
        return "–"
    if point == "none":
        return '<span class="verdict-pass">none</span>'
    return f'<span class="verdict-fail">{escape(point)}</span>'


def _verdict(ok: bool) -> str:
    return (
        '<span class="verdict-pass">yes</span>' if ok else ('<span class="verdict-fail">NO</span>')
    )
