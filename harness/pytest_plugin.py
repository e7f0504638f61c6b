"""pytest plugin: every case file in ``cases/`` becomes test items (prompt x pair x check).

Registered from the root ``conftest.py``.  Options choose backends, cases and the report dir;
a failing item's message names the first divergent capture point and its metric.  With
``--require-backends`` (CI) a backend that cannot run is a failure, never a silent skip.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

import pytest

from harness.cases import CASES_DIR, Case, load_case, materialize
from harness.compare import explain_divergence
from harness.errors import ArchitectureNotSupported, InputError, PortFailure
from harness.greedy import GREEDY_STEPS, greedy_compare
from harness.runner import CASE_MODES, MODES, Runner
from harness.summary import print_summary
from harness.targets import BACKENDS, REFERENCE, Target, parse_targets

RUNNER_KEY = pytest.StashKey[Runner]()
MTP_STEPS = 16


def _mtp_keys(runner: Runner) -> set[tuple[str, str, str]]:
    return {(r.case, r.prompt, r.backend) for r in runner.mtp_runs}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bailing-parity", "reference-vs-port parity")
    group.addoption("--backends", default="torch,mlx,llamacpp",
                    help="candidates to compare with the reference, e.g. 'torch,mlx' or "
                         "'mlx-float32,llamacpp:type_k=f16' (default: torch,mlx,llamacpp, "
                         "float32)")
    group.addoption("--reference", default=REFERENCE,
                    help=f"the reference target (default {REFERENCE})")
    group.addoption("--cases", default="", help="comma-separated case names (default: all)")
    group.addoption("--modes", default=",".join((*MODES, "greedy", *CASE_MODES)),
                    help="checks per pair: prefill (one forward), decode (prefill + steps), "
                         "greedy (64 greedy tokens; at a mismatch vLLM's top-k rule decides), "
                         "mtp (draft acceptance equal to the reference's), slopes (GLA decay "
                         "verdict 'corrected')")
    group.addoption("--mlx-model-module", default=None,
                    help="put this MLX port module (shaped like mlx-lm's bailing_hybrid.py) "
                         "under test instead of mlx-lm's own")
    group.addoption("--report-dir", default=None,
                    help="write tables and the HTML report into a new run folder under DIR")
    group.addoption("--gate-baseline", default=None,
                    help="regression gate: fail the run when a parity point got worse than in "
                         "this baseline file (written by python -m harness gate "
                         "--update-baseline)")
    group.addoption("--require-backends", action="store_true",
                    help="fail (do not skip) when a chosen backend cannot run here; CI sets it")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RUNNER_KEY] = Runner()
    for name in BACKENDS:  # items are marked by backend; --strict-markers needs each registered
        config.addinivalue_line("markers", f"{name}: runs the {name} backend")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".toml" and file_path.parent.resolve() == CASES_DIR:
        return CaseFile.from_parent(parent, path=file_path)
    return None


def _case_has(case, mode: str) -> bool:
    """mtp: the case's model has an MTP layer (both families have our reference head);
    slopes: it has GLA layers with ALiBi-style decay slopes (Ling-2.6; Ling 3.0's KDA learns its
    decay)."""
    if mode == "mtp":
        return int(case.config.get("num_nextn_predict_layers") or 0) > 0
    return case.family == "ling26"


class CaseFile(pytest.File):
    """One case file: its prompts x candidate targets x modes."""

    def collect(self):
        config = self.config
        wanted = [c for c in config.getoption("--cases").split(",") if c]
        if wanted and self.path.stem not in wanted:
            return
        case = load_case(self.path)
        extra = {}
        if module := config.getoption("--mlx-model-module"):
            extra["mlx"] = {"model_module": str(Path(module).resolve())}
        candidates = parse_targets(config.getoption("--backends"), extra)
        reference = Target.parse(config.getoption("--reference"))
        modes = [m for m in config.getoption("--modes").split(",") if m]
        for i, prompt in enumerate(case.prompts):
            for cand in candidates:
                for mode in modes:
                    if mode in CASE_MODES and (i > 0 or not _case_has(case, mode)):
                        continue  # once per case, where the model has what the mode checks
                    name = f"{prompt.name}::{cand.label}-vs-{reference.label}::{mode}"
                    yield ParityItem.from_parent(
                        self, name=name, case=case, prompt=prompt.name, candidate=cand,
                        reference=reference, mode=mode,
                    )


class BackendMissing(Exception):
    """A chosen backend cannot run here under --require-backends (never an expected failure)."""


class ParityFailure(Exception):
    """A parity check failed; the message is the whole story (no traceback)."""


class ParityItem(pytest.Item):
    def __init__(self, *, case: Case, prompt: str, candidate: Target, reference: Target,
                 mode: str, **kw) -> None:
        super().__init__(**kw)
        self.case, self.prompt, self.mode = case, prompt, mode
        self.candidate, self.reference = candidate, reference
        self.add_marker(pytest.mark.parity)
        self.add_marker(getattr(pytest.mark, candidate.backend))
        if why := case.known_failures.get(candidate.backend):
            self.add_marker(pytest.mark.xfail(reason=f"known port failure: {why}", strict=True,
                                              raises=ParityFailure))

    def runtest(self) -> None:
        runner = self.config.stash[RUNNER_KEY]
        for target in (self.reference, self.candidate):
            ok, reason = runner.availability(target)
            if not ok:
                if self.config.getoption("--require-backends"):
                    raise BackendMissing(f"backend {target.label} cannot run here: {reason}")
                runner.findings.append(f"{target.label} skipped: {reason}")
                pytest.skip(f"{target.label}: {reason}")
        tokens = next(p.tokens for p in self.case.prompts if p.name == self.prompt)
        try:
            if self.mode == "greedy":
                return self._greedy(runner, tokens)
            if self.mode == "mtp":
                return self._mtp(runner, tokens)
            if self.mode == "slopes":
                return self._slopes(runner)
            result = runner.compare(
                case=self.case.name, prompt=self.prompt, checkpoint=materialize(self.case),
                tokens=tokens, candidate=self.candidate, reference=self.reference,
                tolerance=self.case.tolerance(self.candidate.dtype), mode=self.mode,
                n_decode=self.case.decode_steps,
            )
        except ArchitectureNotSupported as e:  # the port's coverage, not a missing backend
            runner.findings.append(f"{self.candidate.label} on {self.case.name}: {e}")
            pytest.skip(str(e))
        except PortFailure as e:
            runner.findings.append(f"{self.case.name}/{self.prompt} {self.mode}: {e}")
            raise ParityFailure(f"port failure: {e}") from None
        except InputError as e:
            raise ParityFailure(f"bad input: {e}") from None
        if not result.passed:
            why = explain_divergence(result.first_divergence) if result.first_divergence else ""
            raise ParityFailure(f"{result.summary_line()}\n  {why}".rstrip())

    def _greedy(self, runner: Runner, tokens) -> None:
        """vLLM's greedy rule (harness.greedy), max(decode_steps, GREEDY_STEPS) tokens."""
        checkpoint = materialize(self.case)
        cand = runner.model(self.candidate, checkpoint)
        ref = runner.model(self.reference, checkpoint)
        try:
            res = greedy_compare(cand, ref, tokens, max(self.case.decode_steps, GREEDY_STEPS))
        except (InputError, PortFailure):
            raise
        except Exception as e:
            raise PortFailure(f"{self.candidate.label} crashed in greedy decode: {e}") from e
        runner.findings.append(f"{self.case.name}/{self.prompt} {self.candidate.label}: "
                               f"{res.summary()}")
        if not res.passed:
            raise ParityFailure(res.summary())

    def _mtp(self, runner: Runner, tokens) -> None:
        """Speculative greedy decoding with the MTP head: the candidate's drafts, acceptance and
        greedy output must be the reference's (harness.mtp)."""
        from harness.mtp import MTP_BACKENDS, MtpPrompt, MtpRunner

        if self.candidate.backend not in MTP_BACKENDS:
            pytest.skip(f"no MTP driver for {self.candidate.backend} in the harness yet")
        tolerance = self.case.tolerance(self.candidate.dtype).nmse
        mtp = MtpRunner(steps=MTP_STEPS, reference=self.reference,
                        draft_tolerance=lambda target: tolerance)
        prompt = MtpPrompt(self.case.name, self.prompt, tuple(tokens))
        ref, cand = mtp.run(materialize(self.case), prompt, [self.candidate])
        runner.findings.extend(mtp.findings)
        runner.mtp_runs.extend(r for r in (ref, cand)
                               if (r.case, r.prompt, r.backend) not in _mtp_keys(runner))
        if cand.error:
            raise PortFailure(cand.error)
        if not cand.ok:
            raise ParityFailure(
                f"{self.candidate.label} MTP on {self.case.name}/{self.prompt}: greedy output "
                f"{'kept' if cand.greedy_unchanged else 'CHANGED'}, drafts "
                f"{'match' if cand.drafts_match_reference else 'DIFFER from'} the reference's "
                f"(draft NMSE max {cand.draft_nmse_max:.2e} "
                f"{'<=' if cand.draft_logits_ok else '>'} {tolerance:.0e}, "
                f"top-1 {cand.draft_top1:.1%}), first MTP divergence "
                f"{cand.mtp_first_divergence or 'not captured'}")

    def _slopes(self, runner: Runner) -> None:
        """Which GLA decay the candidate applies, read where exposed and fitted black-box."""
        from harness.slope_diagnostics import diagnose, reference_pair

        checkpoint = materialize(self.case)
        verdict = diagnose(self.candidate.label, runner.model(self.candidate, checkpoint),
                           reference_pair(checkpoint))
        verdict.backend = f"{self.candidate.label} on {self.case.name}"
        runner.slope_verdicts.append(verdict)
        if verdict.verdict != "corrected" or verdict.agree is False:
            raise ParityFailure(
                f"{self.candidate.label} on {self.case.name}: GLA decay verdict "
                f"{verdict.verdict!r} (expected 'corrected'); {'; '.join(verdict.notes)}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ParityFailure | BackendMissing):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"{self.case.name}::{self.name}"


GATE_KEY = pytest.StashKey[object]()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Collect findings and run the regression gate before the summary, so it sets the exit code."""
    config = session.config
    runner = config.stash.get(RUNNER_KEY, None)
    if runner is None or not runner.ran_anything:
        return
    from harness.backends.llamacpp_backend import model_findings

    runner.findings.extend(f for f in model_findings(runner.models.values())
                           if f not in runner.findings)
    for family in {item.case.family for item in session.items if isinstance(item, ParityItem)}:
        runner.findings.extend(f for f in family_findings(family) if f not in runner.findings)
    if baseline := config.getoption("--gate-baseline"):
        from harness.compare import results_frame
        from harness.gate import gate, load_baseline

        tables = {"parity": results_frame(runner.results)}
        if runner.mtp_runs:
            from harness.mtp import mtp_frame

            tables["mtp"] = mtp_frame(runner.mtp_runs)
        regressions = gate(load_baseline(Path(baseline)), tables)
        config.stash[GATE_KEY] = (baseline, regressions)
        if not regressions.empty and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def family_findings(family: str) -> list[str]:
    """What had to be normalised for a family's checkpoints to load in every backend."""
    if family != "ling3":
        return []
    from references.ling3.normalize import normalisation_findings

    return [f"Ling 3.0 checkpoint normalised: {f}" for f in normalisation_findings()]


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    runner = config.stash.get(RUNNER_KEY, None)
    if runner is None or not runner.ran_anything:
        return
    print_summary(runner.results, runner.findings, write=terminalreporter.write)
    sections = []
    if runner.mtp_runs:
        from harness.mtp import mtp_section

        sections.append(mtp_section(runner.mtp_runs))
    if runner.slope_verdicts:
        from harness.slope_diagnostics import slope_section

        sections.append(slope_section(runner.slope_verdicts))
    if gated := config.stash.get(GATE_KEY, None):
        from harness.gate_cli import gate_section, regressions_text

        baseline, regressions = gated
        terminalreporter.write(regressions_text(regressions, baseline))
        sections.append(gate_section(regressions, baseline))
    root = config.getoption("--report-dir")
    if root:
        from harness.reporting import write_run

        out = write_run(
            runner.results, Path(root), title="bailing-parity: parity suite",
            findings=runner.findings, environment=environment(), sections=sections,
        )
        if runner.mtp_runs:
            from harness.mtp import mtp_frame, save_mtp

            save_mtp(mtp_frame(runner.mtp_runs), out)
        terminalreporter.write_line(f"parity report: {out / 'index.html'}")


def environment() -> dict[str, str]:
    """What the run ran on: recorded in every report."""
    env = {"python": platform.python_version(), "machine": platform.platform()}
    for dist in ("torch", "mlx", "mlx-lm", "numpy", "llama-cpp-python"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = "not installed"
    return env
