"""Sessions: ``nox -s parity`` (the main job) and ``nox -s tests`` (harness tests + parity)."""

from __future__ import annotations

import nox

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
# Every backend is installed by the session itself, so a backend that cannot run is a failure.
PARITY_ARGS = ["--require-backends", "--report-dir", "reports", "-p", "no:cacheprovider"]


def install(session: nox.Session) -> None:
    session.install("-e", ".[mlx,dev]")


@nox.session(python=PYTHON)
def parity(session: nox.Session) -> None:
    """Run every case through torch and mlx against the float64 reference; write the report."""
    install(session)
    session.run("pytest", "cases", *PARITY_ARGS, *session.posargs)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The harness's own tests (mutations included), then the parity suite."""
    install(session)
    session.run("ruff", "check", "harness", "references", "tests", "conftest.py", "noxfile.py")
    session.run("pytest", "tests", "cases", *PARITY_ARGS, *session.posargs)
