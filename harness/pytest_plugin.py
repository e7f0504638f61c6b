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
from harness.errors import InputError, PortFailure
from harness.runner import MODES, Runner
from harness.summary import print_summary
from harness.targets import REFERENCE, Target, parse_targets

RUNNER_KEY = pytest.StashKey[Runner]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bailing-parity", "reference-vs-port parity")
    group.addoption("--backends", default="torch,mlx",
                    help="candidates to compare with the reference, e.g. 'torch,mlx' or "
                         "'mlx-float32,torch-bfloat16' (default: torch,mlx in float32)")
    group.addoption("--reference", default=REFERENCE,
                    help=f"the reference target (default {REFERENCE})")
    group.addoption("--cases", default="", help="comma-separated case names (default: all)")
    group.addoption("--modes", default=",".join(MODES),
                    help="checks per pair: prefill (one forward), decode (prefill + steps)")
    group.addoption("--mlx-model-module", default=None,
                    help="put this MLX port module (shaped like mlx-lm's bailing_hybrid.py) "
                         "under test instead of mlx-lm's own")
    group.addoption("--report-dir", default=None,
                    help="write tables and the HTML report into a new run folder under DIR")
    group.addoption("--require-backends", action="store_true",
                    help="fail (do not skip) when a chosen backend cannot run here; CI sets it")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RUNNER_KEY] = Runner()


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
        candidates = parse_targets(config.getoption("--backends"), extra)
        reference = Target.parse(config.getoption("--reference"))
        modes = [m for m in config.getoption("--modes").split(",") if m]
        for prompt in case.prompts:
            for cand in candidates:
                for mode in modes:
                    name = f"{prompt.name}::{cand.label}-vs-{reference.label}::{mode}"
                    yield ParityItem.from_parent(
                        self, name=name, case=case, prompt=prompt.name, candidate=cand,
                        reference=reference, mode=mode,
                    )


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

    def runtest(self) -> None:
        runner = self.config.stash[RUNNER_KEY]
        for target in (self.reference, self.candidate):
            ok, reason = runner.availability(target)
            if not ok:
                if self.config.getoption("--require-backends"):
                    raise ParityFailure(f"backend {target.label} cannot run here: {reason}")
                runner.findings.append(f"{target.label} skipped: {reason}")
                pytest.skip(f"{target.label}: {reason}")
        tokens = next(p.tokens for p in self.case.prompts if p.name == self.prompt)
        try:
            result = runner.compare(
                case=self.case.name, prompt=self.prompt, checkpoint=materialize(self.case),
                tokens=tokens, candidate=self.candidate, reference=self.reference,
                tolerance=self.case.tolerance(self.candidate.dtype), mode=self.mode,
                n_decode=self.case.decode_steps,
            )
        except PortFailure as e:
            runner.findings.append(f"{self.case.name}/{self.prompt} {self.mode}: {e}")
            raise ParityFailure(f"port failure: {e}") from None
        except InputError as e:
            raise ParityFailure(f"bad input: {e}") from None
        if not result.passed:
            why = explain_divergence(result.first_divergence) if result.first_divergence else ""
            raise ParityFailure(f"{result.summary_line()}\n  {why}".rstrip())

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ParityFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"{self.case.name}::{self.name}"


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    runner = config.stash.get(RUNNER_KEY, None)
    if runner is None or not runner.results:
        return
    print_summary(runner.results, runner.findings, write=terminalreporter.write)
    root = config.getoption("--report-dir")
    if root:
        from harness.reporting import write_run

        out = write_run(
            runner.results, Path(root), title="bailing-parity: parity suite",
            findings=runner.findings, environment=environment(),
        )
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
