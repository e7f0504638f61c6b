"""One session owns a parity run: loaded models, every check, the verdict and the run folder.

Like pytest-benchmark's ``BenchmarkSession`` owns benchmarks, :class:`CheckSession` holds the
loaded models (memoised, freed per checkpoint or target so one backend is in memory at a time),
runs any :class:`Check` named in :data:`CHECKS` on a (subject, candidate) pair and returns a typed
:class:`CheckResult`; :meth:`CheckSession.finish` gathers findings, applies the regression gate
and writes the run folder.  ``python -m harness parity`` and the pytest plugin are thin front
ends over it, so one code path produces every verdict.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from harness.backends.base import LoadedModel
from harness.backends.targets import REFERENCE, Target
from harness.checks.compare import PairResult, compare_pair
from harness.checks.runner import Runner
from harness.core import lifecycle
from harness.core.capture_points import explain_divergence
from harness.core.errors import ArchitectureNotSupported, InputError, PortFailure, port_boundary
from harness.core.tolerances import Tolerance
from harness.core.verdict import CheckVerdict, Status

MTP_STEPS = 16


# ---------------------------------------------------------------------------------------------
# What a check runs on, and what it returns


@dataclass(frozen=True, eq=False)
class Subject:
    """One prompt of a case (or of a checkpoint no case made): everything a check needs."""

    name: str  # the case's name, or the checkpoint folder's
    prompt: str
    tokens: tuple[int, ...]
    decode_steps: int
    tolerances: Mapping[str, Tolerance]  # candidate dtype -> tolerance
    source: Any  # the checkpoint folder, or the case that materialises it (on first use)
    convention: Any = None  # the GLA slope convention (SlopeConvention) the reference uses
    has_mtp: bool = False  # the model has an MTP layer
    has_slopes: bool = False  # its GLA has ALiBi-style decay slopes (Ling-2.6, not Ling 3.0)
    first_prompt: bool = True  # per-case checks (mtp, slopes) run on the first prompt only
    family: str = "ling26"  # the model family (harness.backends.families)

    def tolerance(self, dtype: str) -> Tolerance:
        return self.tolerances[dtype]

    @cached_property
    def checkpoint(self) -> Path:
        """The checkpoint folder; a case's is written when a check first needs it."""
        if isinstance(self.source, Path):
            return self.source
        from harness.checks.cases import materialize

        return materialize(self.source)

    @classmethod
    def from_case(cls, case: Any, prompt: str) -> Subject:
        """A case's prompt (the case file's tolerances, decode steps and slope convention)."""
        from harness.checks.cases import DEFAULT_TOLERANCES
        from harness.checks.slope_convention import case_convention

        index = next(i for i, p in enumerate(case.prompts) if p.name == prompt)
        return cls(
            name=case.name, prompt=prompt, tokens=tuple(case.prompts[index].tokens),
            decode_steps=case.decode_steps,
            tolerances={d: case.tolerance(d) for d in DEFAULT_TOLERANCES}, source=case,
            convention=case_convention(case),
            has_mtp=int(case.config.get("num_nextn_predict_layers") or 0) > 0,
            has_slopes=case.family == "ling26", first_prompt=index == 0, family=case.family,
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, tokens: Sequence[int], cfg: Any, *,
                        decode_steps: int, convention: Any, family: str = "ling26") -> Subject:
        """A checkpoint's one prompt, held to the default tolerances (``convention`` None: a
        family without GLA slopes)."""
        from harness.checks.cases import DEFAULT_TOLERANCES

        return cls(
            name=checkpoint.name, prompt=f"{len(tokens)} tokens",
            tokens=tuple(int(t) for t in tokens), decode_steps=decode_steps,
            tolerances=dict(DEFAULT_TOLERANCES), source=Path(checkpoint),
            convention=convention,
            has_mtp=int(getattr(cfg, "num_nextn_predict_layers", 0) or 0) > 0,
            has_slopes=convention is not None, family=family,
        )


@dataclass
class CheckResult:
    """One check of one candidate on one subject: its status, the whole story in ``message``
    (a failure's cause, or what a pass has to say) and the check's own result object
    (PairResult, GreedyResult, MtpRun or SlopeVerdict; None when it did not run)."""

    check: str
    subject: Subject
    candidate: Target
    reference: Target
    status: Status
    message: str = ""
    result: Any = None

    @property
    def passed(self) -> bool:
        return self.status is Status.PASSED

    @property
    def detail(self) -> str:
        """The verdict row's one line."""
        return self.message.strip().splitlines()[0] if self.message.strip() else ""

    def verdict_row(self, status: Status | None = None, detail: str | None = None
                    ) -> CheckVerdict:
        return CheckVerdict(self.subject.name, self.subject.prompt, self.candidate.label,
                            self.reference.label, self.check, status or self.status,
                            self.detail if detail is None else detail)


def supports(candidate: Target, capability: str, family: str | None = None) -> bool:
    """Whether the candidate's backend declares what a check needs ("mtp": an MTP driver), on
    ``family`` or (None) on any family (harness.backends.registry)."""
    from harness.backends.registry import backend_supports

    return backend_supports(candidate.backend, capability, family)


# ---------------------------------------------------------------------------------------------
# Checks


class Check:
    """One kind of check; subclasses implement :meth:`judge`."""

    name: ClassVar[str]
    per_case: ClassVar[bool] = False  # once per case (its first prompt), not per prompt
    needs_reference_weights: ClassVar[bool] = False  # a golden run's captures do not serve

    def applies(self, subject: Subject) -> bool:
        """Whether the subject has what this check checks (front ends plan with it)."""
        return subject.first_prompt or not self.per_case

    def run(self, session: CheckSession, subject: Subject, candidate: Target,
            reference: Target) -> CheckResult:
        """Judge the candidate; a port that breaks is an error, a port's coverage a skip."""
        try:
            return self.judge(session, subject, candidate, reference)
        except ArchitectureNotSupported as e:  # the port's coverage, not a missing backend
            session.note(f"{candidate.label} on {subject.name}: {e}")
            return CheckResult(self.name, subject, candidate, reference, Status.SKIPPED, str(e))
        except PortFailure as e:
            session.note(f"{subject.name}/{subject.prompt} {self.name}: {e}")
            return CheckResult(self.name, subject, candidate, reference, Status.ERROR,
                               f"port failure: {e}")

    def judge(self, session: CheckSession, subject: Subject, candidate: Target,
              reference: Target) -> CheckResult:
        raise NotImplementedError

    @staticmethod
    def dequantized(subject: Subject, candidate: Target, reference: Target) -> Target | None:
        """The reference on a quantized candidate's own weights (None for any other
        candidate): every check judges a quantized port against it
        (harness.checks.quantized)."""
        from harness.checks.quantized import dequantized_reference

        with port_boundary(candidate.label, "could not be prepared"):
            return dequantized_reference(candidate, subject.checkpoint, reference)

    def result(self, subject: Subject, candidate: Target, reference: Target, ok: bool,
               message: str, result: Any) -> CheckResult:
        return CheckResult(self.name, subject, candidate, reference,
                           Status.PASSED if ok else Status.FAILED, message, result)


class PairCheck(Check):
    """Every capture point of the candidate against the reference's prefill captures."""

    mode: ClassVar[str]

    def judge(self, session: CheckSession, subject: Subject, candidate: Target,
              reference: Target) -> CheckResult:
        dequantized = self.dequantized(subject, candidate, reference)
        if dequantized is not None:
            return self.judge_quantized(session, subject, candidate, reference, dequantized)
        res = self.compare_with(session, subject, candidate, reference,
                                subject.tolerance(candidate.dtype), self.mode)
        message = res.summary_line()
        if not res.passed and res.first_divergence:
            message = f"{message}\n  {explain_divergence(res.first_divergence)}".rstrip()
        return self.result(subject, candidate, reference, res.passed, message, res)

    def judge_quantized(self, session: CheckSession, subject: Subject, candidate: Target,
                        reference: Target, dequantized: Target) -> CheckResult:
        """Port correctness (the candidate vs the reference on its own weights: decides) and
        quantization error (that reference vs the original: reported once per prompt)."""
        from harness.checks.quantized import (
            INFORMATIONAL,
            LAYER_LOCAL,
            anchored_captures,
            port_tolerance,
            verdict_text,
        )

        cand = session.captures(candidate, subject.checkpoint, subject.tokens, self.mode,
                                subject.decode_steps)
        local, unanchored = anchored_captures(session.model(dequantized, subject.checkpoint),
                                              subject.tokens, cand)
        if unanchored:
            session.note(f"{candidate.label} does not name {', '.join(unanchored)}: what "
                         "follows them is compared from the reference's own values, not "
                         "sublayer-local")
        lifecycle.stage("comparing")
        port = compare_pair(subject.name, subject.prompt, candidate.label,
                            f"{dequantized.label},{LAYER_LOCAL}", cand, local,
                            subject.tolerance(port_tolerance(dequantized, candidate)),
                            mode=self.mode)
        session.results.append(port)
        # its own captures, then free it: the original reference may load next, and two
        # float64 models at once would double the peak (transformers' Ling 3.0 holds all)
        session.captures(dequantized, subject.checkpoint, subject.tokens, "prefill",
                         subject.decode_steps)
        session.release(subject.checkpoint, dequantized)
        loss = next((r for r in session.results
                     if (r.case, r.prompt, r.candidate, r.reference, r.mode)
                     == (subject.name, subject.prompt, dequantized.label, reference.label,
                         "prefill")), None)
        if loss is None:
            loss = self.compare_with(session, subject, dequantized, reference, INFORMATIONAL,
                                     "prefill")
        message = verdict_text(port, loss)
        if not port.passed and port.first_divergence:
            message = f"{message}\n  {explain_divergence(port.first_divergence)}"
        return self.result(subject, candidate, reference, port.passed, message, port)

    @staticmethod
    def compare_with(session: CheckSession, subject: Subject, candidate: Target,
                     reference: Target, tolerance: Tolerance, mode: str) -> PairResult:
        return session.compare(case=subject.name, prompt=subject.prompt,
                               checkpoint=subject.checkpoint, tokens=subject.tokens,
                               candidate=candidate, reference=reference, tolerance=tolerance,
                               mode=mode, n_decode=subject.decode_steps)

    @classmethod
    def compare(cls, runner: Runner, *, case: str, prompt: str, checkpoint: Path,
                tokens: Sequence[int], candidate: Target, reference: Target,
                tolerance: Tolerance, mode: str, n_decode: int) -> PairResult:
        """One candidate against the reference on one prompt; the result is kept in ``runner``.

        The reference always runs a full forward: in float64 prefill and decode agree exactly
        (a reference test proves it), so one reference run serves both candidate modes."""
        ref = runner.captures(reference, checkpoint, tokens, "prefill", n_decode)
        cand = runner.captures(candidate, checkpoint, tokens, mode, n_decode)
        lifecycle.stage("comparing")
        result = compare_pair(case, prompt, candidate.label, reference.label, cand, ref,
                              tolerance, mode=mode)
        runner.results.append(result)
        return result


class PrefillCheck(PairCheck):
    """One forward of the whole prompt."""

    name = mode = "prefill"


class DecodeCheck(PairCheck):
    """A prefill, then ``decode_steps`` tokens fed one at a time through the port's cache."""

    name = mode = "decode"


class GreedyCheck(Check):
    """vLLM's greedy rule (harness.checks.greedy) over max(decode_steps, GREEDY_STEPS) tokens."""

    name = "greedy"
    needs_reference_weights = True

    def judge(self, session: CheckSession, subject: Subject, candidate: Target,
              reference: Target) -> CheckResult:
        from harness.checks.greedy import GREEDY_STEPS, greedy_compare

        # a quantized port decodes greedily as the reference on its own weights does
        dequantized = self.dequantized(subject, candidate, reference)
        cand = session.model(candidate, subject.checkpoint)
        ref = session.model(dequantized or reference, subject.checkpoint)
        with port_boundary(candidate.label, "crashed in greedy decode"):
            res = greedy_compare(cand, ref, subject.tokens,
                                 max(subject.decode_steps, GREEDY_STEPS))
        return self.result(subject, candidate, reference, res.passed, res.summary(), res)


class MtpCheck(Check):
    """Speculative greedy decoding with the MTP head: the candidate's drafts, acceptance and
    greedy output must be the reference's (harness.checks.mtp); models come from the session."""

    name = "mtp"
    per_case = True  # a golden run serves it when it recorded the reference's MTP side

    def applies(self, subject: Subject) -> bool:
        return super().applies(subject) and subject.has_mtp

    def judge(self, session: CheckSession, subject: Subject, candidate: Target,
              reference: Target) -> CheckResult:
        from harness.checks.mtp import MtpPrompt, MtpRunner

        if not supports(candidate, "mtp", subject.family):
            return CheckResult(self.name, subject, candidate, reference, Status.SKIPPED,
                               f"no MTP driver for {candidate.backend} in the harness yet")
        tolerance = subject.tolerance(candidate.dtype).nmse
        dequantized = self.dequantized(subject, candidate, reference)
        if dequantized is not None:  # a quantized port drafts as the reference on its weights
            from harness.checks.quantized import port_tolerance

            tolerance = subject.tolerance(port_tolerance(dequantized, candidate)).nmse
        mtp = MtpRunner(steps=MTP_STEPS, reference=dequantized or reference,
                        draft_tolerance=lambda target: tolerance)
        mtp.model = lambda target, checkpoint: session.mtp_model(target, checkpoint)
        if dequantized is not None:  # its head is judged on its own trunk's hidden state
            anchors = self.trunk_anchors(session, subject, candidate, dequantized)
            mtp.anchors = lambda target: anchors if target == candidate else None
        prompt = MtpPrompt(subject.name, subject.prompt, subject.tokens)
        recorded = (None if dequantized is not None
                    else session.recorded_mtp(reference, subject.checkpoint, subject.tokens))
        ref, cand = mtp.run(subject.checkpoint, prompt, [candidate], recorded)
        session.note(*mtp.findings)
        known = {(r.case, r.prompt, r.backend) for r in session.mtp_runs}
        session.mtp_runs.extend(r for r in (ref, cand)
                                if (r.case, r.prompt, r.backend) not in known)
        if cand.error:
            raise PortFailure(cand.error)
        message = (
            f"{candidate.label} MTP on {subject.name}/{subject.prompt}: greedy output "
            f"{'kept' if cand.greedy_unchanged else 'CHANGED'}, drafts "
            f"{'match' if cand.drafts_match_reference else 'DIFFER from'} the reference's "
            f"(draft NMSE max {cand.draft_nmse_max:.2e} "
            f"{'<=' if cand.draft_logits_ok else '>'} {tolerance:.0e}, "
            f"top-1 {cand.draft_top1:.1%}), first MTP divergence "
            f"{cand.mtp_first_divergence or 'not captured'}")
        ok = cand.ok
        if dequantized is not None:
            # Decoding runs unanchored: an activation a float32 ulp puts on the other side of a
            # rounding step changes the hidden state a little, and a draft at a near-tie may
            # follow it. The MTP head itself is judged teacher-forced (first MTP divergence),
            # the speculation by its greedy output; drafts and draft logits are reported.
            ok = (cand.greedy_unchanged and not cand.error
                  and cand.mtp_first_divergence in ("", "none"))
            message += ("; a quantized port: its drafts are reported, its MTP head judged "
                        "teacher-forced")
        return self.result(subject, candidate, reference, ok, message, cand)

    @staticmethod
    def trunk_anchors(session: CheckSession, subject: Subject, candidate: Target,
                      dequantized: Target) -> dict[str, Any]:
        """The candidate's prefill rows at the points the reference's MTP trunk anchors:
        teacher-forced, the reference's trunk then computes sublayer-local from them, and the
        head reads (nearly) the candidate's hidden state instead of one a rounding flip in an
        early layer has moved (harness.checks.quantized)."""
        from harness.checks.quantized import anchor_rows

        cand = session.captures(candidate, subject.checkpoint, subject.tokens, "prefill",
                                subject.decode_steps)
        ref = session.mtp_model(dequantized, subject.checkpoint)
        trunk = getattr(ref, "trunk", None) or ref.model  # Ling 3.0's, or our Ling-2.6 model
        return anchor_rows(trunk, len(subject.tokens), cand)[0]


class SlopesCheck(Check):
    """Which GLA decay the candidate applies, read where exposed and fitted black-box, against
    the convention the checkpoint was published with (Ling-2.6; Ling 3.0's KDA learns its
    decay)."""

    name = "slopes"
    per_case = True
    needs_reference_weights = True

    def applies(self, subject: Subject) -> bool:
        return super().applies(subject) and subject.has_slopes

    def judge(self, session: CheckSession, subject: Subject, candidate: Target,
              reference: Target) -> CheckResult:
        from harness.checks.slope_diagnostics import diagnose

        convention = subject.convention
        if convention is None or not subject.has_slopes:
            return CheckResult(self.name, subject, candidate, reference, Status.SKIPPED,
                               "no GLA decay slopes in this family")
        dequantized = self.dequantized(subject, candidate, reference)
        verdict = diagnose(candidate.label, session.model(candidate, subject.checkpoint),
                           session.slope_references(subject.checkpoint, dequantized),
                           expected=convention.slope)
        verdict.backend = f"{candidate.label} on {subject.name}"
        session.slope_verdicts.append(verdict)
        ok = verdict.verdict == convention.slope and verdict.agree is not False
        if ok:
            message = f"{verdict.backend}: applies {verdict.verdict!r}, as the checkpoint expects"
        else:
            message = (f"{convention.mismatch(verdict.backend, verdict.verdict)}; "
                       f"{'; '.join(verdict.notes)}".rstrip("; "))
        return self.result(subject, candidate, reference, ok, message, verdict)


# The one place check (mode) names are known and validated; in the order runs report them.
CHECKS: dict[str, type[Check]] = {
    c.name: c for c in (PrefillCheck, DecodeCheck, GreedyCheck, MtpCheck, SlopesCheck)
}


def check_named(name: str) -> Check:
    """The check called ``name`` (InputError naming the known ones otherwise)."""
    if name not in CHECKS:
        raise InputError(f"unknown mode {name!r}; known: {', '.join(CHECKS)}")
    return CHECKS[name]()


def parse_modes(text: str, option: str = "--modes") -> list[str]:
    """``--modes``: at least one known check, each once."""
    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not modes:
        raise InputError(f"{option}: no mode given in {text!r}; known: {', '.join(CHECKS)}")
    for m in modes:
        if m not in CHECKS:
            raise InputError(f"{option}: unknown mode {m!r}; known: {', '.join(CHECKS)}")
    return modes


def plan(subjects: Sequence[Subject], candidates: Sequence[Target],
         modes: Sequence[str]) -> Iterator[tuple[Subject, Target, str]]:
    """(subject, candidate, check) in run order: prompt, candidate, then the checks in
    ``modes`` order; per-case checks on the first prompt only, where the model has what they
    check. Both front ends run exactly this plan."""
    checks = {m: check_named(m) for m in modes}
    for subject in subjects:
        for cand in candidates:
            for mode in modes:
                if checks[mode].applies(subject):
                    yield subject, cand, mode


# ---------------------------------------------------------------------------------------------
# The session


@dataclass
class CheckSession(Runner):
    """A parity run: memoised models and captures (:class:`Runner`), the MTP heads and slope
    references beside them, one verdict row per check, and the run's finishing steps."""

    mtp_models: dict[tuple[Target, Path], Any] = field(default_factory=dict)
    # (reference, checkpoint, tokens) -> the golden run (GoldenRun) standing for the reference
    golden_runs: dict[tuple[Target, Path, tuple[int, ...]], Any] = field(default_factory=dict)

    def compare(
        self,
        *,
        case: str,
        prompt: str,
        checkpoint: Path,
        tokens: Sequence[int],
        candidate: Target,
        reference: Target,
        tolerance: Tolerance,
        mode: str = "prefill",
        n_decode: int = 8,
    ) -> PairResult:
        """Compare one candidate with the reference on one prompt (the prefill or decode check,
        :class:`PairCheck`); the result is also kept."""
        if not isinstance(check := check_named(mode), PairCheck):
            raise InputError(f"mode {mode!r} is not a per-point comparison; use CheckSession.run")
        return check.compare(self, case=case, prompt=prompt, checkpoint=checkpoint,
                             tokens=tokens, candidate=candidate, reference=reference,
                             tolerance=tolerance, mode=mode, n_decode=n_decode)

    def seed_golden(self, reference: Target, checkpoint: Path, tokens: Sequence[int],
                    decode_steps: int, golden: Any) -> None:
        """Let a golden run (harness.checks.golden.GoldenRun) stand for ``reference`` on this
        prompt: its prefill captures now, its MTP side when the mtp check asks; the
        reference's weights are never loaded for it."""
        self.seed(reference, checkpoint, tokens, decode_steps, golden.captures())
        self.golden_runs[(reference, Path(checkpoint), tuple(tokens))] = golden

    def recorded_mtp(self, reference: Target, checkpoint: Path, tokens: Sequence[int]) -> Any:
        """The golden run's MTP side for this prompt (RecordedReference), None when the
        reference runs live; InputError when a golden run stands for it without one."""
        golden = self.golden_runs.get((reference, Path(checkpoint), tuple(tokens)))
        return None if golden is None else golden.mtp()

    def note(self, *findings: str) -> None:
        """Keep findings once each, in the order they were first seen."""
        self.findings.extend(f for f in dict.fromkeys(findings) if f not in self.findings)

    def run(self, check: str, subject: Subject, candidate: Target, reference: Target,
            *, record: bool = True) -> CheckResult:
        """Run one check; its verdict row is recorded unless the front end records its own
        (pytest's xfail handling). InputError (bad input) propagates."""
        if subject.convention is not None:
            self.note(subject.convention.note)  # the run records the convention it checked
        result = check_named(check).run(self, subject, candidate, reference)
        if record:
            self.verdict.add(result.verdict_row())
        return result

    def skip(self, check: str, subject: Subject, candidate: Target, reference: Target,
             reason: str) -> CheckResult:
        """A check that could not run (its backend is missing here): recorded as skipped."""
        result = CheckResult(check, subject, candidate, reference, Status.SKIPPED, reason)
        self.verdict.add(result.verdict_row())
        return result

    def mtp_model(self, target: Target, checkpoint: Path) -> Any:
        """``target`` with its MTP head, loaded once per session; the float64 reference of a
        Ling-2.6 checkpoint reuses the session's loaded reference instead of a second load."""
        from harness.checks.mtp import load_mtp_model

        key = (target, Path(checkpoint))
        if key not in self.mtp_models:
            loaded = self.models.get(key) if target.backend == "torch" else None
            if loaded is not None and _is_reference(loaded):
                from references.mtp_session import ReferenceMtpModel

                self.mtp_models[key] = ReferenceMtpModel(loaded, target.label)  # type: ignore
            else:
                self.loaded.append(target.label)
                self.mtp_models[key] = load_mtp_model(target, checkpoint)
        return self.mtp_models[key]

    def slope_references(self, checkpoint: Path, base: Target | None = None
                         ) -> dict[str, LoadedModel]:
        """The float64 reference under each GLA slope formula, loaded through the session: the
        one on the run's own convention is the run's reference, never loaded twice.  ``base``:
        another reference to vary (a quantized port's, on its own weights)."""
        from harness.checks.slope_convention import chosen
        from harness.checks.slope_diagnostics import FORMULAS

        base = base or Target.parse(REFERENCE)
        base = Target(base.backend, base.dtype,  # each formula names its own slope
                      tuple((k, v) for k, v in base.extra if k != "slope_formula"))
        return {f: self.model(chosen(f, "slopes check").target(base), checkpoint)
                for f in FORMULAS}

    def release(self, checkpoint: Path | None = None, target: Target | None = None) -> None:
        """Free loaded models and MTP heads (of one checkpoint and/or target, else all)."""
        for key in [k for k in self.mtp_models
                    if (target is None or k[0] == target)
                    and (checkpoint is None or k[1] == checkpoint)]:
            model = self.mtp_models.pop(key)
            close = getattr(model, "close", None)
            if callable(close):
                close()
        super().release(checkpoint, target)

    # -- finishing ------------------------------------------------------------------------

    def order(self, modes: Sequence[str]) -> None:
        """One order for results and verdicts whatever ran them (serial, xdist workers or the
        CLI): case, prompt, candidate, then the checks in ``modes`` order."""
        rank = {m: i for i, m in enumerate(modes)}

        def key(case: str, prompt: str, candidate: str, mode: str) -> tuple:
            return case, prompt, candidate, rank.get(mode, len(rank)), mode

        self.results.sort(key=lambda r: key(r.case, r.prompt, r.candidate, r.mode))
        self.verdict.checks.sort(key=lambda c: key(c.case, c.prompt, c.candidate, c.check))
        self.mtp_runs.sort(key=lambda r: (r.case, r.prompt, r.backend))
        self.slope_verdicts.sort(key=lambda v: v.backend)
        self.findings.sort()

    def gather_findings(self, families: Sequence[str] = ()) -> None:
        """What the loaded ports and the families' normalisation had to say."""
        from harness.backends.llamacpp_backend import model_findings

        self.note(*model_findings(self.models.values()))
        for family in sorted(set(families)):
            self.note(*family_findings(family))

    def gate(self, baseline: Path) -> Any:
        """Regressions of this run against ``baseline`` (a DataFrame; empty when none)."""
        import pandas as pd

        from harness.checks.compare import results_frame
        from harness.checks.gate import gate, load_baseline

        tables = {"parity": results_frame(self.results), "verdicts": self.verdict.frame()}
        if self.mtp_runs:
            from harness.checks.mtp import mtp_frame

            tables["mtp"] = mtp_frame(self.mtp_runs)
        try:
            return gate(load_baseline(Path(baseline)), tables)
        except InputError as e:  # an empty run or a malformed baseline: the gate cannot pass
            return pd.DataFrame([{"table": "*", "key": "*", "metric": "gate",
                                  "baseline": math.nan, "current": math.nan,
                                  "allowed": "a gateable run", "reason": str(e)}])

    def summary(self, gate: Any = None) -> dict[str, Any]:
        """``summary.json``: the verdict, every pair's figures, the findings (and the gate)."""
        from harness.report.summary import summary_json

        out = {**summary_json(self.results, self.verdict), "findings": self.findings}
        if gate is not None:
            out["gate"] = {"baseline": gate.baseline, "passed": gate.passed,
                           "regressions": len(gate.regressions)}
        return out

    def conclude(self, *, modes: Sequence[str] = tuple(CHECKS), families: Sequence[str] = (),
                 gate_baseline: Path | None = None) -> Any:
        """Gather findings, order the run and apply the gate (its GateSummary, or None)."""
        from harness.report.page import GateSummary

        self.gather_findings(families)
        self.order(modes)
        if gate_baseline is None:
            return None
        return GateSummary(baseline=str(gate_baseline), regressions=self.gate(gate_baseline))

    def finish(self, out_dir: Path | None = None, *, reports_root: Path | None = None,
               title: str = "bailing-parity", name: str | None = None,
               gate_baseline: Path | None = None, modes: Sequence[str] = tuple(CHECKS),
               families: Sequence[str] = (), summary_extra: Mapping[str, Any] | None = None
               ) -> SessionOutcome:
        """:meth:`conclude`, then write the run folder: ``out_dir`` (new or empty), else a new
        folder under ``reports_root``; neither: nothing is written."""
        gate = self.conclude(modes=modes, families=families, gate_baseline=gate_baseline)
        summary = {**self.summary(gate), **(summary_extra or {})}
        folder = None
        if out_dir is not None or reports_root is not None:
            folder = self.write(out_dir, reports_root=reports_root or Path("reports"),
                                title=title, name=name, summary=summary, gate=gate)
        code = self.verdict.exit_code
        if gate is not None and not gate.passed:
            code = max(code, 1)
        return SessionOutcome(code, folder, gate, summary)

    def sections(self) -> list[Any]:
        """The report's sections beside the parity table: MTP and GLA slopes."""
        sections = []
        if self.mtp_runs:
            from harness.checks.mtp import mtp_section

            sections.append(mtp_section(self.mtp_runs))
        if self.slope_verdicts:
            from harness.checks.slope_diagnostics import slope_section

            sections.append(slope_section(self.slope_verdicts))
        return sections

    def write(self, out_dir: Path | None, *, reports_root: Path, title: str, name: str | None,
              summary: dict[str, Any], gate: Any = None) -> Path:
        from harness.report.environment import environment
        from harness.report.run_folder import write_run

        def save_mtp_table(folder: Path) -> None:
            if self.mtp_runs:
                from harness.checks.mtp import mtp_frame, save_mtp

                save_mtp(mtp_frame(self.mtp_runs), folder)

        return write_run(self.results, reports_root, title=title, findings=self.findings,
                         environment=environment(), name=name, sections=self.sections(),
                         out=out_dir, verdict=self.verdict, summary=summary,
                         extra=save_mtp_table, gate=gate)


@dataclass
class SessionOutcome:
    """What :meth:`CheckSession.finish` did: the exit code, the folder, the gate, the summary."""

    exit_code: int
    folder: Path | None
    gate: Any
    summary: dict[str, Any]


def _is_reference(model: object) -> bool:
    """A loaded Ling-2.6 float64 reference (its MTP head needs no second load)."""
    from references.model import BailingHybridReference

    return isinstance(model, BailingHybridReference)


def family_findings(family: str) -> list[str]:
    """What had to be normalised for a family's checkpoints to load in every backend."""
    if family != "ling3":
        return []
    from references.ling3.normalize import normalisation_findings

    return [f"Ling 3.0 checkpoint normalised: {f}" for f in normalisation_findings()]
