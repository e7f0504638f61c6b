"""pytest plugin: every case file in ``cases/`` becomes test items (prompt x pair x check).

Registered from the root ``conftest.py``.  Options choose backends, cases and the report dir;
a failing item's message names the first divergent capture point and its metric.  With
``--require-backends`` (CI) a backend that cannot run is a failure, never a silent skip.
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import pickle
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from harness.backends.targets import BACKENDS, REFERENCE, Target, parse_targets
from harness.checks.cases import CASES_DIR, Case, load_case, materialize
from harness.checks.compare import explain_divergence
from harness.checks.greedy import GREEDY_STEPS, greedy_compare
from harness.checks.runner import CASE_MODES, MODES, Runner
from harness.checks.slope_convention import case_convention
from harness.core.errors import ArchitectureNotSupported, InputError, PortFailure, port_boundary
from harness.core.verdict import CheckVerdict, Status
from harness.pytest_plugin.bench_items import BenchGrid, BenchSession, bench_items
from harness.report.summary import print_summary

RUNNER_KEY = pytest.StashKey[Runner]()
BENCH_KEY = pytest.StashKey[BenchSession]()
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
                         "verdict = the case's slope convention)")
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
    group.addoption("--benchmark", action="store_true",
                    help="collect throughput items (prefill, decode) per case x backend x "
                         "(PP, TG) instead of parity items, timed by pytest-benchmark; the "
                         "sweep table and report go to --report-dir")
    group.addoption("--bench-pp", default="32", help="--benchmark: prompt lengths (default 32)")
    group.addoption("--bench-tg", type=int, default=4,
                    help="--benchmark: decoded tokens per decode item (default 4)")
    group.addoption("--bench-rounds", type=int, default=3,
                    help="--benchmark: timed rounds per item, after one warm-up (default 3)")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RUNNER_KEY] = Runner()
    config.pluginmanager.register(VerdictRecorder(config), "bailing-parity-verdicts")
    config.addinivalue_line("markers", "benchmark_item: a --benchmark throughput item")
    config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker")
    if is_xdist_worker(config):
        share_cores(int(config.workerinput.get("workercount", 1)))
    if getattr(config.option, "dist", "no") == "load":  # -n N alone: keep each case together
        config.option.dist = "loadgroup"
    if config.getoption("--benchmark", default=False):
        if not config.pluginmanager.hasplugin("benchmark"):
            raise pytest.UsageError("--benchmark needs pytest-benchmark (pip install "
                                    "pytest-benchmark, or the project's [dev] extra)")
        try:
            grid = BenchGrid.parse(config.getoption("--bench-pp"),
                                   config.getoption("--bench-tg"),
                                   config.getoption("--bench-rounds"))
        except InputError as e:
            raise pytest.UsageError(str(e)) from None
        config.stash[BENCH_KEY] = BenchSession(grid)
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
        # the case's GLA slope convention: our torch reference computes with it
        convention = case_convention(case)
        candidates = [convention.target(t)
                      for t in parse_targets(config.getoption("--backends"), extra)]
        reference = convention.target(Target.parse(config.getoption("--reference")))
        if bench := config.stash.get(BENCH_KEY, None):
            yield from bench_items(self, case, candidates, bench)
            return
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
        self.port_failed = False
        self.detail = ""  # what a passing check has to say (e.g. greedy agreement)
        self.add_marker(pytest.mark.parity)
        self.add_marker(pytest.mark.xdist_group(case.name))  # one case, one worker
        self.add_marker(getattr(pytest.mark, candidate.backend))
        if why := case.known_failure(candidate.backend, mode):
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
        if (note := case_convention(self.case).note) not in runner.findings:
            runner.findings.append(note)  # the run records the convention it checked against
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
            self.port_failed = True
            runner.findings.append(f"{self.case.name}/{self.prompt} {self.mode}: {e}")
            raise ParityFailure(f"port failure: {e}") from None
        except InputError as e:
            raise ParityFailure(f"bad input: {e}") from None
        if not result.passed:
            why = explain_divergence(result.first_divergence) if result.first_divergence else ""
            raise ParityFailure(f"{result.summary_line()}\n  {why}".rstrip())

    def _greedy(self, runner: Runner, tokens) -> None:
        """vLLM's greedy rule (harness.checks.greedy), max(decode_steps, GREEDY_STEPS) tokens."""
        checkpoint = materialize(self.case)
        cand = runner.model(self.candidate, checkpoint)
        ref = runner.model(self.reference, checkpoint)
        with port_boundary(self.candidate.label, "crashed in greedy decode"):
            res = greedy_compare(cand, ref, tokens, max(self.case.decode_steps, GREEDY_STEPS))
        self.detail = res.summary()  # informational: the verdict's detail, not a finding
        if not res.passed:
            raise ParityFailure(res.summary())

    def _mtp(self, runner: Runner, tokens) -> None:
        """Speculative greedy decoding with the MTP head: the candidate's drafts, acceptance and
        greedy output must be the reference's (harness.checks.mtp)."""
        from harness.checks.mtp import MTP_BACKENDS, MtpPrompt, MtpRunner

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
        """Which GLA decay the candidate applies, read where exposed and fitted black-box, against
        the convention the case's checkpoint was published with."""
        from harness.checks.slope_diagnostics import diagnose, reference_pair

        convention = case_convention(self.case)
        checkpoint = materialize(self.case)
        verdict = diagnose(self.candidate.label, runner.model(self.candidate, checkpoint),
                           reference_pair(checkpoint), expected=convention.slope)
        verdict.backend = f"{self.candidate.label} on {self.case.name}"
        runner.slope_verdicts.append(verdict)
        if verdict.verdict != convention.slope or verdict.agree is False:
            raise ParityFailure(
                f"{convention.mismatch(verdict.backend, verdict.verdict)}; "
                f"{'; '.join(verdict.notes)}".rstrip("; "))

    def check_verdict(self, report: pytest.TestReport) -> CheckVerdict:
        """This item's line of the run's verdict, from pytest's final report of it."""
        if report.skipped:
            status = Status.XFAILED if hasattr(report, "wasxfail") else Status.SKIPPED
        elif report.failed:
            status = Status.ERROR if self.port_failed else Status.FAILED
        else:
            status = Status.PASSED
        detail = self.detail if status is Status.PASSED else _first_line(report)
        return CheckVerdict(self.case.name, self.prompt, self.candidate.label,
                            self.reference.label, self.mode, status, detail)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ParityFailure | BackendMissing):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"{self.case.name}::{self.name}"


def _first_line(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):
        return str(report.wasxfail)
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return str(report.longrepr[-1])
    return (report.longreprtext or "").strip().splitlines()[0] if report.longreprtext else ""


class VerdictRecorder:
    """Records each parity item's final outcome (after xfail handling) in the run's verdict;
    a plugin object because ``pytest_runtest_logreport`` is given the report alone."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.items: dict[str, ParityItem] = {}

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.items = {i.nodeid: i for i in items if isinstance(i, ParityItem)}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        item = self.items.get(report.nodeid)
        if item is not None and (report.when == "call"
                                 or (report.when == "setup" and not report.passed)):
            self.config.stash[RUNNER_KEY].verdict.add(item.check_verdict(report))


GATE_KEY = pytest.StashKey[object]()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Collect findings and run the regression gate before the summary, so it sets the exit code."""
    config = session.config
    runner = config.stash.get(RUNNER_KEY, None)
    if runner is None:
        return
    from harness.backends.llamacpp_backend import model_findings

    runner.findings.extend(f for f in model_findings(runner.models.values())
                           if f not in runner.findings)
    for family in {item.case.family for item in session.items if isinstance(item, ParityItem)}:
        runner.findings.extend(f for f in family_findings(family) if f not in runner.findings)
    if is_xdist_worker(config):  # the controller merges, gates and writes the one run folder
        config.workeroutput[WORKER_OUTPUT] = worker_payload(runner, config.stash.get(BENCH_KEY,
                                                                                     None))
        return
    if not runner.ran_anything:
        return
    order_results(runner, [m for m in config.getoption("--modes").split(",") if m])
    if baseline := config.getoption("--gate-baseline"):
        from harness.checks.compare import results_frame
        from harness.checks.gate import gate, load_baseline

        tables = {"parity": results_frame(runner.results), "verdicts": runner.verdict.frame()}
        if runner.mtp_runs:
            from harness.checks.mtp import mtp_frame

            tables["mtp"] = mtp_frame(runner.mtp_runs)
        try:
            regressions = gate(load_baseline(Path(baseline)), tables)
        except InputError as e:  # an empty run or a malformed baseline: the gate cannot pass
            regressions = pd.DataFrame([{"table": "*", "key": "*", "metric": "gate",
                                         "baseline": math.nan, "current": math.nan,
                                         "allowed": "a gateable run", "reason": str(e)}])
        config.stash[GATE_KEY] = (baseline, regressions)
        if not regressions.empty and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---------------------------------------------------------------------------------------------
# pytest-xdist: items of one case share a worker (each model loads once); every worker's results
# come back to the controller, which gates and writes one run folder as a serial run would.

WORKER_OUTPUT = "bailing_parity"


def is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def share_cores(workers: int) -> None:
    """Give each xdist worker its share of the cores: torch's, MLX's and llama.cpp's thread
    pools each default to every core, and N workers times that oversubscribes the machine
    (measured: 4 cases took 28 s on one worker and 391 s on two with default threads)."""
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "BAILING_PARITY_THREADS"):  # the last: llama.cpp workers' default n_threads
        os.environ[var] = str(threads)  # children (llama.cpp workers, converters) inherit it
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(threads)


def worker_payload(runner: Runner, bench: BenchSession | None) -> str:
    """What a worker ran, pickled for execnet (which carries plain strings)."""
    state = {"results": runner.results, "mtp_runs": runner.mtp_runs,
             "slope_verdicts": runner.slope_verdicts, "findings": runner.findings,
             "checks": runner.verdict.checks,
             "bench": (bench.rounds, bench.bases) if bench is not None else None}
    return base64.b64encode(pickle.dumps(state)).decode("ascii")


def order_results(runner: Runner, modes: list[str]) -> None:
    """One order for results and verdicts whatever ran them (serial or across xdist workers):
    case, prompt, candidate, then the checks in --modes order."""
    rank = {m: i for i, m in enumerate(modes)}

    def key(case: str, prompt: str, candidate: str, mode: str) -> tuple:
        return case, prompt, candidate, rank.get(mode, len(rank)), mode

    runner.results.sort(key=lambda r: key(r.case, r.prompt, r.candidate, r.mode))
    runner.verdict.checks.sort(key=lambda c: key(c.case, c.prompt, c.candidate, c.check))
    runner.mtp_runs.sort(key=lambda r: (r.case, r.prompt, r.backend))
    runner.slope_verdicts.sort(key=lambda v: v.backend)
    runner.findings.sort()


def merge_payload(runner: Runner, bench: BenchSession | None, payload: str) -> None:
    state = pickle.loads(base64.b64decode(payload))
    runner.results.extend(state["results"])
    known = _mtp_keys(runner)
    runner.mtp_runs.extend(r for r in state["mtp_runs"]
                           if (r.case, r.prompt, r.backend) not in known)
    runner.slope_verdicts.extend(state["slope_verdicts"])
    runner.findings.extend(f for f in state["findings"] if f not in runner.findings)
    runner.verdict.extend(state["checks"])
    if bench is not None and state["bench"] is not None:
        rounds, bases = state["bench"]
        bench.rounds.update(rounds)
        bench.bases.update(bases)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist controller: fold a finished worker's results into this process's run."""
    payload = getattr(node, "workeroutput", {}).get(WORKER_OUTPUT)
    if payload:
        config = node.config
        merge_payload(config.stash[RUNNER_KEY], config.stash.get(BENCH_KEY, None), payload)


def family_findings(family: str) -> list[str]:
    """What had to be normalised for a family's checkpoints to load in every backend."""
    if family != "ling3":
        return []
    from references.ling3.normalize import normalisation_findings

    return [f"Ling 3.0 checkpoint normalised: {f}" for f in normalisation_findings()]


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """A case's models are freed when its last item is done: one case in memory at a time."""
    if not isinstance(item.parent, CaseFile) or (
            nextitem is not None and nextitem.parent is item.parent):
        return
    if (bench := item.config.stash.get(BENCH_KEY, None)) is not None:
        bench.release(item.parent.path.stem)
    if isinstance(item, ParityItem):
        item.config.stash[RUNNER_KEY].release(materialize(item.case))


def _bench_summary(terminalreporter, config: pytest.Config, bench: BenchSession) -> None:
    """--benchmark: the sweep's table (llama-batched-bench columns, roofline) and report."""
    from harness.checks.cases import load_case
    from harness.cli.sweep import throughput_section
    from harness.perf.bench_import import to_batched_bench_markdown
    from harness.perf.sweep import save_sweep
    from harness.report.run_folder import write_run

    cases = {case.name: case for case in
             (load_case(CASES_DIR / f"{name}.toml") for name in {k[1] for k in bench.rounds})}
    df = bench.frame(cases)
    if df.empty:
        return
    terminalreporter.write("\n" + to_batched_bench_markdown(df) + "\n")
    if root := config.getoption("--report-dir"):
        out = write_run([], Path(root), title="bailing-parity: pytest --benchmark",
                        findings=[], environment=environment(), name="benchmark",
                        sections=[throughput_section(df)],
                        extra=lambda folder: save_sweep(df, folder))
        terminalreporter.write_line(f"throughput report: {out / 'index.html'}")


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if is_xdist_worker(config):
        return
    if (bench := config.stash.get(BENCH_KEY, None)) is not None:
        _bench_summary(terminalreporter, config, bench)
    runner = config.stash.get(RUNNER_KEY, None)
    if runner is None or not runner.ran_anything:
        return
    print_summary(runner.results, runner.findings, write=terminalreporter.write)
    sections = []
    if runner.mtp_runs:
        from harness.checks.mtp import mtp_section

        sections.append(mtp_section(runner.mtp_runs))
    if runner.slope_verdicts:
        from harness.checks.slope_diagnostics import slope_section

        sections.append(slope_section(runner.slope_verdicts))
    gate_summary = None
    if gated := config.stash.get(GATE_KEY, None):
        from harness.cli.gate import regressions_text
        from harness.report.page import GateSummary

        baseline, regressions = gated
        terminalreporter.write(regressions_text(regressions, baseline))
        gate_summary = GateSummary(baseline=str(baseline), regressions=regressions)
    root = config.getoption("--report-dir")
    if root:
        from harness.cli.main import summary_json
        from harness.report.run_folder import write_run

        def save_mtp_table(folder: Path) -> None:
            if runner.mtp_runs:
                from harness.checks.mtp import mtp_frame, save_mtp

                save_mtp(mtp_frame(runner.mtp_runs), folder)

        summary = {**summary_json(runner.results, runner.verdict), "findings": runner.findings}
        if gate_summary is not None:
            summary["gate"] = {"baseline": gate_summary.baseline, "passed": gate_summary.passed,
                               "regressions": len(gate_summary.regressions)}
        out = write_run(
            runner.results, Path(root), title="bailing-parity: parity suite",
            findings=runner.findings, environment=environment(), sections=sections,
            verdict=runner.verdict, summary=summary, extra=save_mtp_table, gate=gate_summary,
        )
        terminalreporter.write_line(f"parity report: {out / 'index.html'}")
    terminalreporter.write_line(f"parity verdict: {runner.verdict.headline()}")


def environment() -> dict[str, str]:
    """What the run ran on: recorded in every report."""
    env = {"python": platform.python_version(), "machine": platform.platform()}
    for dist in ("torch", "mlx", "mlx-lm", "numpy", "llama-cpp-python"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = "not installed"
    return env
