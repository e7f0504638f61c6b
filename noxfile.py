"""Sessions: ``nox -s parity`` (the main job), ``nox -s tests`` (harness tests + parity),
``nox -s bench`` (``pytest --benchmark``: throughput through pytest-benchmark) and
``nox -s gate`` (regression gate)."""

from __future__ import annotations

from pathlib import Path

import nox

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
REPORTS = Path("reports")
BASELINE = Path("baselines/parity.json")
# Every backend is installed by the session itself, so a backend that cannot run is a failure.
PARITY_ARGS = ["--backends", "torch,mlx,llamacpp", "--require-backends",
               "--report-dir", str(REPORTS), "-p", "no:cacheprovider"]


def install(session: nox.Session) -> None:
    """The project with every backend. llama-cpp-python is compiled once from its sdist with our
    Ling-2.6 port's patches (they only add an architecture) and cached as a wheel outside the
    repo (~4 min on 2 cores the first time, seconds after)."""
    session.install("-e", ".[mlx,llamacpp,dev]")
    session.run("python", "-m", "harness.llamacpp.build", "--with-our-port", "--install")
    session.env["BAILING_PARITY_REQUIRE_LLAMACPP"] = "1"


def newest_run() -> Path:
    runs = sorted(p for p in REPORTS.iterdir() if p.is_dir())
    if not runs:
        raise RuntimeError(f"no run folder under {REPORTS}")
    return runs[-1]


@nox.session(python=PYTHON)
def parity(session: nox.Session) -> None:
    """Every case through torch, mlx and llama.cpp against the float64 reference; the report."""
    install(session)
    session.run("pytest", "cases", *PARITY_ARGS, *session.posargs)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Lint, the harness's own tests (mutations included), the parity suite with the regression
    gate, and the browser check of the report it wrote."""
    install(session)
    session.env["BAILING_PARITY_REQUIRE_BROWSER"] = "1"
    session.run("ruff", "check", "harness", "references", "ports", "tests", "conftest.py",
                "noxfile.py")
    # Two xdist workers, each given its share of the cores (the plugin limits torch's and
    # llama.cpp's threads): many tests wait on child processes, so this shortens the run.
    session.run("pytest", "tests", "cases", *PARITY_ARGS, "--gate-baseline", str(BASELINE),
                "-n", "2", *session.posargs)
    session.run("python", "-m", "harness", "browser-check", str(newest_run()))


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Prefill/decode tok/s for torch, mlx and llama.cpp, float and quantized (each against its
    own roofline): ``pytest --benchmark`` (pytest-benchmark's JSON, autosave and compare; the
    sweep table and report in reports/)."""
    install(session)
    session.run("pytest", "cases", "--benchmark", "--backends",
                "torch,mlx,llamacpp,llamacpp:quant=Q4_K_M,mlx:bits=4",
                "--cases", "flash-mini", "--bench-pp", "128,512,2048", "--bench-tg", "32",
                "--report-dir", str(REPORTS), "--benchmark-autosave", "-p", "no:cacheprovider",
                *session.posargs)


@nox.session(python=PYTHON)
def gate(session: nox.Session) -> None:
    """The parity suite against the stored baseline (replace it: nox -s gate -- --update)."""
    install(session)
    if "--update" in session.posargs:
        session.run("pytest", "cases", *PARITY_ARGS)
        session.run("python", "-m", "harness", "gate", str(newest_run()),
                    "--baseline", str(BASELINE), "--update-baseline")
        return
    session.run("pytest", "cases", *PARITY_ARGS, "--gate-baseline", str(BASELINE),
                *session.posargs)
