"""pytest plugin: every case file in ``cases/`` becomes test items (prompt x pair x check).

Registered from the root ``conftest.py``.  Options choose backends, cases and the report dir;
a failing item's message names the first divergent capture point and its metric.  With
``--require-backends`` (CI) a backend that cannot run is a failure, never a silent skip.  With
``--golden DIR`` each case prompt's saved reference captures (``python -m harness capture
--cases NAMES --out DIR``) stand for the reference, which is never loaded.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from harness.backends.targets import BACKENDS, REFERENCE, Target, parse_targets
from harness.checks.cases import CASES_DIR, Case, load_case, materialize
from harness.checks.quantized import names_quantized_weights
from harness.checks.session import CHECKS, CheckResult, CheckSession, Subject, plan
from harness.checks.slope_convention import case_convention
from harness.core.errors import InputError
from harness.core.verdict import CheckVerdict, Status
from harness.pytest_plugin.bench_items import BenchGrid, BenchSession, bench_items
from harness.report.environment import environment
from harness.report.summary import print_summary

RUNNER_KEY = pytest.StashKey[CheckSession]()
BENCH_KEY = pytest.StashKey[BenchSession]()


def _mtp_keys(session: CheckSession) -> set[tuple[str, str, str]]:
    return {(r.case, r.prompt, r.backend) for r in session.mtp_runs}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bailing-parity", "reference-vs-port parity")
    group.addoption("--backends", default="torch,mlx,llamacpp",
                    help="candidates to compare with the reference, e.g. 'torch,mlx' or "
                         "'mlx-float32,llamacpp:type_k=f16' (default: torch,mlx,llamacpp, "
                         "float32)")
    group.addoption("--reference", default=REFERENCE,
                    help=f"the reference target (default {REFERENCE})")
    group.addoption("--cases", default="", help="comma-separated case names (default: all)")
    group.addoption("--modes", default=None,
                    help="checks per pair: prefill (one forward), decode (prefill + steps), "
                         "greedy (64 greedy tokens; at a mismatch vLLM's top-k rule decides), "
                         "mtp (draft acceptance equal to the reference's), slopes (GLA decay "
                         "verdict = the case's slope convention); default all (with --golden: "
                         "those a golden run serves, prefill,decode,mtp)")
    group.addoption("--golden", default=None, metavar="DIR",
                    help="judge candidates against saved reference captures instead of running "
                         "the reference: DIR/<case>/<prompt>/, written by `python -m harness "
                         "capture --cases NAMES --out DIR`; each golden run's config, weights, "
                         "prompt and reference are checked against the case, and a case prompt "
                         "without one fails its items (the reference is never loaded)")
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
    config.stash[RUNNER_KEY] = CheckSession()
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
    elif config.getoption("--golden", default=None) is not None:
        _modes(config)  # checks a golden run cannot serve: a usage error before collection
    for name in BACKENDS:  # items are marked by backend; --strict-markers needs each registered
        config.addinivalue_line("markers", f"{name}: runs the {name} backend")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".toml" and file_path.parent.resolve() == CASES_DIR:
        return CaseFile.from_parent(parent, path=file_path)
    return None


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
        modes = case_modes(case, _modes(config))
        subjects = [Subject.from_case(case, p.name) for p in case.prompts]
        planned = list(plan(subjects, candidates, modes))
        last = {cand: i for i, (_, cand, _) in enumerate(planned)}
        for i, (subject, cand, mode) in enumerate(planned):
            name = f"{subject.prompt}::{cand.label}-vs-{reference.label}::{mode}"
            yield ParityItem.from_parent(
                self, name=name, case=case, prompt=subject.prompt, candidate=cand,
                reference=reference, mode=mode, last_of_candidate=last[cand] == i,
            )


def _modes(config: pytest.Config) -> list[str]:
    """--modes, validated by the session's registry of checks (a usage error otherwise)."""
    from harness.checks.session import parse_modes

    text = config.getoption("--modes")
    golden = config.getoption("--golden") is not None
    served = [m for m in CHECKS if not CHECKS[m].needs_reference_weights]
    try:
        modes = parse_modes(text if text is not None else ",".join(served if golden else CHECKS))
    except InputError as e:
        raise pytest.UsageError(str(e)) from None
    if golden and (weighty := [m for m in modes if m not in served]):
        raise pytest.UsageError(f"--modes {','.join(weighty)}: these checks run the reference "
                                "itself; with --golden use any of " + ",".join(served))
    return modes


def case_modes(case: Case, modes: list[str]) -> list[str]:
    """The run's ``--modes`` that ``case`` runs (its ``modes`` key; InputError naming the file
    for a check name the session does not know)."""
    if unknown := sorted(set(case.modes or ()) - set(CHECKS)):
        raise InputError(f"{case.source}: modes: unknown check(s) {unknown}; known: "
                         f"{', '.join(CHECKS)}")
    return [m for m in modes if case.runs(m)]


class BackendMissing(Exception):
    """A chosen backend cannot run here under --require-backends (never an expected failure)."""


class ParityFailure(Exception):
    """A parity check failed; the message is the whole story (no traceback)."""


class ParityItem(pytest.Item):
    def __init__(self, *, case: Case, prompt: str, candidate: Target, reference: Target,
                 mode: str, last_of_candidate: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.case, self.prompt, self.mode = case, prompt, mode
        # the case's last item of this candidate: its model is freed after it
        self.last_of_candidate = last_of_candidate
        self.candidate, self.reference = candidate, reference
        self.port_failed = False
        self.result: CheckResult | None = None  # the session's, once the check ran
        self.add_marker(pytest.mark.parity)
        self.add_marker(pytest.mark.xdist_group(case.name))  # one case, one worker
        self.add_marker(getattr(pytest.mark, candidate.backend))
        if why := case.known_failure(candidate.backend, mode):
            # A wrong port fails every point-by-point check; greedy decoding of a quantized
            # one is compared with the reference on its own weights under the mutual-top-k
            # rule, where a near tie may keep a wrong port's tokens: it may pass (XPASS is no
            # failure there), and its prefill and decode items still must fail.
            strict = not (mode == "greedy" and names_quantized_weights(candidate))
            self.add_marker(pytest.mark.xfail(reason=f"known port failure: {why}",
                                              strict=strict, raises=ParityFailure))

    def runtest(self) -> None:
        """Availability (skip, or a failure under --require-backends), then the session's check;
        its result becomes pytest's outcome."""
        session = self.config.stash[RUNNER_KEY]
        subject = Subject.from_case(self.case, self.prompt)
        golden = self.config.getoption("--golden")
        if golden is not None:  # the golden run stands for the reference, whatever runs here
            try:
                seed_golden(session, Path(golden), subject, self.reference, self.candidate)
            except InputError as e:
                raise ParityFailure(f"bad input: {e}") from None
        for target in (self.candidate,) if golden is not None else (self.reference,
                                                                    self.candidate):
            ok, reason = session.availability(target)
            if not ok:
                if self.config.getoption("--require-backends"):
                    raise BackendMissing(f"backend {target.label} cannot run here: {reason}")
                session.note(f"{target.label} skipped: {reason}")
                pytest.skip(f"{target.label}: {reason}")
        try:
            self.result = session.run(self.mode, subject, self.candidate, self.reference,
                                      record=False)
        except InputError as e:
            raise ParityFailure(f"bad input: {e}") from None
        if self.result.status is Status.SKIPPED:
            pytest.skip(self.result.message)
        if self.result.status is Status.ERROR:
            self.port_failed = True
        if not self.result.passed:
            raise ParityFailure(self.result.message)

    def check_verdict(self, report: pytest.TestReport) -> CheckVerdict:
        """This item's line of the run's verdict, from pytest's final report of it."""
        if report.skipped:
            status = Status.XFAILED if hasattr(report, "wasxfail") else Status.SKIPPED
        elif report.failed:
            status = Status.ERROR if self.port_failed else Status.FAILED
        else:
            status = Status.PASSED
        result = self.result
        if result is not None and status is result.status:
            return result.verdict_row()
        detail = _first_line(report)
        return CheckVerdict(self.case.name, self.prompt, self.candidate.label,
                            self.reference.label, self.mode, status, detail)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ParityFailure | BackendMissing):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"{self.case.name}::{self.name}"


def seed_golden(session: CheckSession, root: Path, subject: Subject, reference: Target,
                candidate: Target) -> None:
    """``--golden``: the case prompt's golden run stands for the reference (opened and checked
    once per prompt); InputError naming what is missing or differs."""
    from harness.checks.golden import check_candidates, open_case_golden

    key = (reference, subject.checkpoint, tuple(subject.tokens))
    golden = session.golden_runs.get(key)
    if golden is None:
        golden = open_case_golden(root, subject.name, subject.prompt, subject.checkpoint,
                                  subject.tokens, reference)
        session.seed_golden(reference, subject.checkpoint, subject.tokens,
                            subject.decode_steps, golden)
        session.note(f"reference captures read from the golden runs under {root}; the "
                     "reference was not loaded")
    check_candidates(golden, [candidate])


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


OUTCOME_KEY = pytest.StashKey[object]()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The check session's finishing steps (findings, gate, run folder) before the summary, so
    the gate sets the exit code; an xdist worker sends its share to the controller instead."""
    config = session.config
    checks = config.stash.get(RUNNER_KEY, None)
    if checks is None:
        return
    families = {item.case.family for item in session.items if isinstance(item, ParityItem)}
    if is_xdist_worker(config):  # the controller merges, gates and writes the one run folder
        checks.gather_findings(sorted(families))
        config.workeroutput[WORKER_OUTPUT] = worker_payload(checks, config.stash.get(BENCH_KEY,
                                                                                     None))
        return
    if not checks.ran_anything:
        return
    baseline = config.getoption("--gate-baseline")
    root = config.getoption("--report-dir")
    outcome = checks.finish(
        reports_root=Path(root) if root else None, title="bailing-parity: parity suite",
        gate_baseline=Path(baseline) if baseline else None, modes=_modes(config),
        families=sorted(families))
    config.stash[OUTCOME_KEY] = outcome
    if outcome.exit_code and session.exitstatus == pytest.ExitCode.OK:
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


def worker_payload(checks: CheckSession, bench: BenchSession | None) -> str:
    """What a worker ran, pickled for execnet (which carries plain strings)."""
    state = {"results": checks.results, "mtp_runs": checks.mtp_runs,
             "slope_verdicts": checks.slope_verdicts, "findings": checks.findings,
             "checks": checks.verdict.checks,
             "bench": (bench.rounds, bench.bases) if bench is not None else None}
    return base64.b64encode(pickle.dumps(state)).decode("ascii")


def merge_payload(checks: CheckSession, bench: BenchSession | None, payload: str) -> None:
    state = pickle.loads(base64.b64decode(payload))
    checks.results.extend(state["results"])
    known = _mtp_keys(checks)
    checks.mtp_runs.extend(r for r in state["mtp_runs"]
                           if (r.case, r.prompt, r.backend) not in known)
    checks.slope_verdicts.extend(state["slope_verdicts"])
    checks.note(*state["findings"])
    checks.verdict.extend(state["checks"])
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


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """A candidate's models are freed after the case's last item of it, and the case's (the
    reference's) after its last item: one candidate in memory at a time, as the CLI runs."""
    if isinstance(item, ParityItem) and item.last_of_candidate:
        item.config.stash[RUNNER_KEY].release(materialize(item.case), target=item.candidate)
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
    from harness.perf.bench_import import to_batched_bench_markdown
    from harness.perf.sections import throughput_section
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
    checks = config.stash.get(RUNNER_KEY, None)
    outcome = config.stash.get(OUTCOME_KEY, None)
    if checks is None or outcome is None:
        return
    print_summary(checks.results, checks.findings, write=terminalreporter.write)
    if outcome.gate is not None:
        from harness.cli.gate import regressions_text

        terminalreporter.write(regressions_text(outcome.gate.regressions,
                                                outcome.gate.baseline))
    if outcome.folder is not None:
        terminalreporter.write_line(f"parity report: {outcome.folder / 'index.html'}")
    terminalreporter.write_line(f"parity verdict: {checks.verdict.headline()}")
