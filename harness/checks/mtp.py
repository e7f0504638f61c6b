"""The MTP check: each backend's speculative greedy run against the float64 reference's.

A run must keep the greedy output (speculation never changes it), draft what the reference
drafts, and, within the dtype's tolerance, with the reference's draft logits.  The decoding
itself is :mod:`harness.checks.mtp_decoding`, the tables on disk :mod:`harness.checks.mtp_store`;
both are re-exported here, the MTP check's public face.  The report section is data
(:class:`MtpSection`), rendered by ``harness/report/templates/sections/mtp.html.j2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from harness.backends.registry import Dispatch as get_backend_dispatch
from harness.backends.registry import Implementation, require
from harness.backends.targets import REFERENCE, Target
from harness.checks.compare import compare_captures, first_divergence
from harness.checks.mtp_decoding import (
    DraftStep,
    MtpModel,
    MtpSession,
    OracleDrafts,
    SpecResult,
    draft_agreement,
    plain_greedy,
    replay_drafts,
    shared_draft_rows,
    speculative_greedy,
)
from harness.checks.mtp_store import EXTRA_COLUMNS, MTP_COLUMNS, mtp_frame, save_mtp
from harness.core.captures import Captures
from harness.core.errors import InputError, PortFailure, describe_exception
from harness.core.tolerances import Tolerance

__all__ = [
    "EXTRA_COLUMNS",
    "MTP_COLUMNS",
    "DraftStep",
    "MtpModel",
    "MtpPrompt",
    "MtpRun",
    "MtpRunner",
    "MtpSection",
    "MtpSession",
    "OracleDrafts",
    "RecordedReference",
    "SpecResult",
    "default_draft_tolerance",
    "draft_agreement",
    "first_mtp_divergence",
    "first_recorded_divergence",
    "load_mtp_model",
    "mtp_captures_declared",
    "mtp_frame",
    "mtp_section",
    "plain_greedy",
    "record_reference",
    "replay_drafts",
    "save_mtp",
    "speculative_greedy",
]


# --------------------------------------------------------------------------------------------
# Runs over backends


def load_mtp_model(target: Target, checkpoint_dir: Path) -> MtpModel:
    """Load ``target``'s implementation for the checkpoint's family with its MTP head
    (InputError: unknown backend, no declared MTP capability, no MTP head)."""
    impl = _implementation(target, checkpoint_dir)
    require(target.backend, impl.family, "mtp")
    return impl.load_mtp(Path(checkpoint_dir), target.options(), target.label)


def mtp_captures_declared(target: Target, checkpoint_dir: Path) -> bool:
    """Whether ``target``'s MTP model captures mtp_* points teacher-forced on this family."""
    return _implementation(target, checkpoint_dir).capabilities.mtp_captures


def _implementation(target: Target, checkpoint_dir: Path) -> Implementation:
    return get_backend_dispatch(target.backend).implementation_for(Path(checkpoint_dir))


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


@dataclass(frozen=True)
class RecordedReference:
    """The reference's side of the MTP check, saved by ``capture`` (a golden run) so that
    candidates are judged without loading the reference: its speculative run (draft rows as
    :func:`replay_drafts` gives them on that run), its plain greedy tokens, and its teacher-forced
    mtp_* captures (None when its implementation captures none)."""

    label: str
    spec: SpecResult
    plain: tuple[int, ...]
    captures: Captures | None
    source: str  # where it was read from, named in errors

    def check(self, tokens: Sequence[int], steps: int, chain: int) -> None:
        """InputError when the recording was made for another prompt or other settings."""
        held = (list(self.spec.prompt), len(self.spec.tokens), self.spec.chain)
        if held != (list(tokens), steps, chain):
            raise InputError(
                f"{self.source}: its MTP run is of {len(self.spec.prompt)} prompt tokens, "
                f"{len(self.spec.tokens)} steps, chain {self.spec.chain}; this check runs "
                f"{len(tokens)} tokens, {steps} steps, chain {chain} (capture again)")


def record_reference(model: MtpModel, tokens: Sequence[int], steps: int, chain: int,
                     with_captures: bool, source: str = "") -> RecordedReference:
    """Everything the MTP check takes from the reference, computed once (``capture``)."""
    spec = speculative_greedy(model, tokens, steps, chain)
    rows = replay_drafts(model, spec)  # what a live check compares equal-trace candidates with
    spec = SpecResult(spec.prompt, spec.tokens, tuple(
        DraftStep(s.position, s.next_token, s.drafts, s.accepted, r)
        for s, r in zip(spec.steps, rows, strict=True)), spec.chain)
    plain = tuple(plain_greedy(model, tokens, steps))
    caps = model.capture(tokens) if with_captures else None  # type: ignore[attr-defined]
    return RecordedReference(model.label, spec, plain, caps, source)


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
    # candidate -> the rows its trunk gave at the reference's anchor points: the reference's
    # teacher-forced trunk then starts every sublayer from them, so the head is judged on the
    # candidate's own hidden state (a quantized port: harness.checks.quantized); None: unanchored
    anchors: Callable[[Target], Mapping[str, Any] | None] = field(
        default_factory=lambda: lambda target: None
    )
    _models: dict[tuple[Target, Path], MtpModel] = field(default_factory=dict)

    def model(self, target: Target, checkpoint: Path) -> MtpModel:
        key = (target, Path(checkpoint))
        if key not in self._models:
            self._models[key] = load_mtp_model(target, checkpoint)
        return self._models[key]

    def run(
        self, checkpoint: Path, prompt: MtpPrompt, candidates: Sequence[Target],
        recorded: RecordedReference | None = None,
    ) -> list[MtpRun]:
        """The reference's run, then each candidate's compared with it (reference row first);
        with ``recorded`` (a golden run) the reference's side is read, never loaded."""
        ref_model: MtpModel | RecordedReference
        if recorded is None:
            ref_model = self.model(self.reference, checkpoint)
            ref = speculative_greedy(ref_model, prompt.tokens, self.steps, self.chain)
            ref_plain = plain_greedy(ref_model, prompt.tokens, self.steps)
        else:
            recorded.check(prompt.tokens, self.steps, self.chain)
            ref_model, ref, ref_plain = recorded, recorded.spec, list(recorded.plain)
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
        ref_model: MtpModel | RecordedReference,
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
        rows = (shared_draft_rows(spec, ref) if isinstance(ref_model, RecordedReference)
                else replay_drafts(ref_model, spec))
        nmse_max, top1 = draft_agreement(spec, rows)
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
        run.mtp_first_divergence = self._first_divergence(
            model, ref_model, prompt, target, checkpoint)
        if run.mtp_first_divergence not in ("", "none"):
            self.findings.append(
                f"{target.label} on {prompt.case}/{prompt.name}: the MTP head first differs from "
                f"the reference's at {run.mtp_first_divergence} (teacher-forced on the prompt)"
            )
        return run

    def _first_divergence(
        self, model: MtpModel, ref_model: MtpModel | RecordedReference, prompt: MtpPrompt,
        target: Target, checkpoint: Path,
    ) -> str:
        """"" when no tolerance applies or either side declares no ``mtp_captures``."""
        tol = self.draft_tolerance(target)
        recorded = isinstance(ref_model, RecordedReference)
        ref_captures = (ref_model.captures is not None if recorded else
                        _implementation(self.reference, checkpoint).capabilities.mtp_captures)
        if (tol is None or not ref_captures
                or not _implementation(target, checkpoint).capabilities.mtp_captures):
            return ""
        try:
            if recorded:
                return first_recorded_divergence(model, ref_model.captures,  # type: ignore
                                                 prompt.tokens, tol)
            return first_mtp_divergence(model, ref_model, prompt.tokens, tol,  # type: ignore
                                        self.anchors(target))
        except (InputError, PortFailure) as e:
            self.findings.append(f"{target.label} MTP capture on {prompt.case}/{prompt.name}: {e}")
        except Exception as e:  # a port whose capture crashes is a finding, not a harness crash
            self.findings.append(
                f"{target.label} MTP capture on {prompt.case}/{prompt.name}: "
                f"{type(e).__name__}: {e}"
            )
        return ""


def first_mtp_divergence(
    model: MtpModel, reference: MtpModel, tokens: Sequence[int], nmse_tolerance: float,
    anchors: Mapping[str, Any] | None = None,
) -> str:
    """Where ``model``'s head first leaves the reference's, point by point, with ``tokens``
    teacher-forced through both: the first mtp_* (or trunk) point beyond the tolerance among
    those the candidate names, "none" when every one is within it, "" for fewer than two tokens.
    Both models must have ``capture`` (their implementations declare ``mtp_captures``).
    ``anchors``: the candidate's trunk rows the reference's trunk starts each sublayer from."""
    if len(tokens) < 2:
        return ""
    ref = (reference.capture(tokens) if not anchors  # type: ignore[attr-defined]
           else reference.capture(tokens, anchors=anchors))  # type: ignore[attr-defined]
    return first_recorded_divergence(model, ref, tokens, nmse_tolerance)


def first_recorded_divergence(model: MtpModel, reference: Captures, tokens: Sequence[int],
                              nmse_tolerance: float) -> str:
    """:func:`first_mtp_divergence` against the reference's captures already taken (a golden
    run's, or a live reference's)."""
    if len(tokens) < 2:
        return ""
    df = compare_captures(model.capture(tokens), reference,  # type: ignore[attr-defined]
                          Tolerance(nmse=nmse_tolerance))
    return first_divergence(df) or "none"


# --------------------------------------------------------------------------------------------
# Report section (data; rendered by templates/sections/mtp.html.j2)


@dataclass(frozen=True)
class MtpSection:
    """The MTP table: acceptance per backend and prompt, per-position acceptance, draft-logit
    agreement with the reference, and whether speculation kept the greedy output."""

    runs: tuple[MtpRun, ...]
    title: str = "MTP speculative decoding"
    template: ClassVar[str] = "mtp.html.j2"


def mtp_section(runs: Sequence[MtpRun]) -> MtpSection:
    """The report section of ``runs`` (rendered only by the report's template)."""
    return MtpSection(tuple(runs))
