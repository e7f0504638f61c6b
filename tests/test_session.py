"""One session drives every check: ``python -m harness parity`` and the pytest suite are front
ends over :class:`harness.checks.session.CheckSession`, so on the same case they write the same
rows and numbers, every check the suite runs is reachable from the command line, and a wrong
port fails the same check in both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.checks import session as session_mod
from harness.checks.cases import CASES_DIR, load_case
from harness.checks.session import CHECKS, Check, CheckResult, parse_modes
from harness.cli.main import main
from harness.core.errors import InputError
from harness.core.verdict import Status

ROOT = Path(__file__).resolve().parents[1]
ALL_MODES = ",".join(CHECKS)
# flash-mini's prompts in order (short, random-96 and a text prompt through its tokenizer)
FLASH_PROMPTS = [p.name for p in load_case(CASES_DIR / "flash-mini.toml").prompts]
# The run's own tables and summary keys both front ends write (the CLI adds what it ran on).
TABLES = ("parity.parquet", "verdicts.parquet", "mtp.parquet")
SUMMARY_KEYS = ("passed", "exit_code", "verdict", "checks", "pairs", "findings")


def _env() -> dict[str, str]:
    """The child's environment without this pytest's (or its xdist worker's) variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTEST_XDIST"))}


def cli_run(out: Path, backends: str, modes: str) -> tuple[int, Path]:
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "parity", "--cases", "flash-mini", "--backends",
         backends, "--modes", modes, "--out", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert (out / "summary.json").is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.returncode, out


def pytest_run(root: Path, backends: str, modes: str, *select: str) -> tuple[int, Path]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "cases/flash-mini.toml", *select, "--backends",
         backends, "--modes", modes, "--report-dir", str(root), "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    runs = list(root.iterdir()) if root.is_dir() else []
    assert len(runs) == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc.returncode, runs[0]


def assert_same_run(a: Path, b: Path) -> dict:
    """Same rows and numbers in every table, the same verdict, pairs and findings."""
    for table in TABLES:
        assert (a / table).is_file() == (b / table).is_file(), table
        if (a / table).is_file():
            pd.testing.assert_frame_equal(pd.read_parquet(a / table), pd.read_parquet(b / table))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in SUMMARY_KEYS:
        assert sa[key] == sb[key], key
    return sa


@pytest.mark.slow
def test_the_cli_and_the_pytest_suite_give_identical_results_on_one_case(tmp_path):
    code_cli, cli = cli_run(tmp_path / "cli", "mlx", ALL_MODES)
    code_py, suite = pytest_run(tmp_path / "suite", "mlx", ALL_MODES, "-k", "mlx")
    summary = assert_same_run(cli, suite)
    assert code_cli == code_py == 0 and summary["passed"] is True
    ran = {(c["prompt"], c["check"]) for c in summary["checks"]}
    # per prompt: prefill, decode, greedy; per case (its first prompt): mtp, slopes
    assert {m for _, m in ran} == set(CHECKS)
    assert len(ran) == len(FLASH_PROMPTS) * 3 + 2
    assert all(c["status"] == "passed" for c in summary["checks"])


@pytest.mark.slow
def test_a_wrong_candidate_fails_the_same_checks_in_both_front_ends(tmp_path):
    """The reference with the authors' off-by-one GLA slope, as a candidate: the per-point check
    and the slopes check fail it, identically from the CLI and from pytest."""
    wrong = "torch-float64:variant=slope_off_by_one"
    code_cli, cli = cli_run(tmp_path / "cli", wrong, "prefill,slopes")
    code_py, suite = pytest_run(tmp_path / "suite", wrong, "prefill,slopes")
    summary = assert_same_run(cli, suite)
    assert code_cli == code_py == 1 and summary["passed"] is False
    status = {(c["prompt"], c["check"]): c["status"] for c in summary["checks"]}
    assert status == {**{(p, "prefill"): "failed" for p in FLASH_PROMPTS},
                      ("short", "slopes"): "failed"}
    verdicts = pd.read_parquet(cli / "verdicts.parquet")
    slopes = verdicts[verdicts["check"] == "slopes"]["detail"].iloc[0]
    assert "hf_off_by_one" in slopes, slopes


def test_every_check_is_a_cli_mode_and_nothing_else_is():
    assert parse_modes(ALL_MODES) == list(CHECKS)
    assert set(CHECKS) >= {"prefill", "decode", "greedy", "mtp", "slopes"}
    with pytest.raises(InputError, match=r"unknown mode 'nope'.*prefill, decode, greedy"):
        parse_modes("prefill,nope")
    with pytest.raises(InputError, match="no mode given"):
        parse_modes(" , ")


def test_a_check_registered_in_checks_is_run_by_the_cli(tmp_path, monkeypatch, capsys):
    """The registry is the one place modes are known: a check added there runs from the command
    line, its verdict row recorded like any other."""
    seen: list[tuple[str, str]] = []

    class Probe(Check):
        name = "probe"

        def judge(self, session, subject, candidate, reference) -> CheckResult:
            seen.append((subject.prompt, candidate.label))
            return self.result(subject, candidate, reference, True, "probe: fine", None)

    monkeypatch.setitem(session_mod.CHECKS, "probe", Probe)
    monkeypatch.setattr(session_mod.Runner, "captures", lambda *a, **k: {})  # no compute
    out = tmp_path / "run"
    code = main(["parity", "--cases", "flash-mini", "--backends", "mlx", "--modes", "probe",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr()
    assert seen == [(p, "mlx-float32") for p in FLASH_PROMPTS]
    checks = json.loads((out / "summary.json").read_text())["checks"]
    assert [(c["check"], c["status"], c["detail"]) for c in checks] == [
        ("probe", "passed", "probe: fine")] * len(FLASH_PROMPTS)


def test_a_check_that_raises_a_port_failure_is_an_error_not_a_crash(tmp_path, monkeypatch):
    from harness.core.errors import PortFailure

    class Broken(Check):
        name = "broken"

        def judge(self, session, subject, candidate, reference) -> CheckResult:
            raise PortFailure(f"{candidate.label} fell over")

    monkeypatch.setitem(session_mod.CHECKS, "broken", Broken)
    monkeypatch.setattr(session_mod.Runner, "captures", lambda *a, **k: {})
    out = tmp_path / "run"
    code = main(["parity", "--cases", "flash-mini", "--backends", "mlx", "--modes", "broken",
                 "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert code == 1 and summary["exit_code"] == 1
    assert {c["status"] for c in summary["checks"]} == {Status.ERROR.value}
    assert all("port failure: mlx-float32 fell over" in c["detail"] for c in summary["checks"])


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--modes", "prefill"], "give --checkpoint DIR or --cases NAMES"),
        (["--cases", "flash-mini", "--checkpoint", "x"], "give --checkpoint DIR or --cases"),
        (["--cases", "no-such-case"], "no case 'no-such-case'"),
        (["--cases", "flash-mini", "--modes", "bogus"], "unknown mode 'bogus'"),
    ],
)
def test_the_cli_refuses_a_run_it_cannot_plan(tmp_path, capsys, argv, said):
    assert main(["parity", *argv, "--out", str(tmp_path / "out")]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
