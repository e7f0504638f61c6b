"""The one verdict of a run: exit code, ``summary.json``, terminal line and report headline.

Every front end (the CLI, the pytest plugin) records one :class:`CheckVerdict` per check it ran
or meant to run, and reads everything it prints or writes from the resulting :class:`RunVerdict`,
so "passed" can never mean two things.  A run passes only when it compared something and no
check failed or crashed; zero checks, or only skipped ones, is a failure, not a vacuous pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import pandas as pd

VERDICT_COLUMNS = ["case", "prompt", "candidate", "reference", "check", "status", "detail"]


class Status(StrEnum):
    """What happened to one check (the ``status`` column of ``verdicts.parquet``)."""

    PASSED = "passed"
    FAILED = "failed"  # compared, and out of tolerance
    ERROR = "error"  # the port crashed, hung or returned garbage: a finding about the port
    XFAILED = "xfailed"  # a known port failure listed in the case file, failing as expected
    SKIPPED = "skipped"  # not run: backend unavailable, architecture not implemented by the port


BAD = frozenset({Status.FAILED, Status.ERROR})
COMPARED = frozenset({Status.PASSED, Status.FAILED, Status.XFAILED})


@dataclass(frozen=True)
class CheckVerdict:
    """One check of one candidate against the reference on one prompt."""

    case: str
    prompt: str
    candidate: str
    reference: str
    check: str
    status: Status
    detail: str = ""


@dataclass
class RunVerdict:
    """All checks of a run; the only source of ``passed`` and of the exit code."""

    checks: list[CheckVerdict] = field(default_factory=list)

    def add(self, verdict: CheckVerdict) -> CheckVerdict:
        self.checks.append(verdict)
        return verdict

    def extend(self, verdicts: Iterable[CheckVerdict]) -> None:
        self.checks.extend(verdicts)

    def counts(self) -> Counter[Status]:
        return Counter(c.status for c in self.checks)

    @property
    def compared_anything(self) -> bool:
        return any(c.status in COMPARED for c in self.checks)

    @property
    def passed(self) -> bool:
        return self.compared_anything and not any(c.status in BAD for c in self.checks)

    @property
    def exit_code(self) -> int:
        """0 every check passed; 1 a check failed, a port broke, or nothing was compared."""
        return 0 if self.passed else 1

    def reason(self) -> str:
        """Why the run failed, in a few words ('' when it passed)."""
        if self.passed:
            return ""
        counts = self.counts()
        if not self.checks:
            return "nothing was compared (no check ran)"
        if not self.compared_anything and not counts[Status.ERROR]:
            return f"nothing was compared ({counts[Status.SKIPPED]} check(s) skipped)"
        parts = []
        if counts[Status.FAILED]:
            parts.append(f"{counts[Status.FAILED]} check(s) failed")
        if counts[Status.ERROR]:
            parts.append(f"{counts[Status.ERROR]} port failure(s)")
        return ", ".join(parts) or "nothing was compared"

    def headline(self) -> str:
        """One line: 'PASS: 12 checks passed' or 'FAIL: 1 check(s) failed (of 12; 2 skipped)'."""
        counts = self.counts()
        tally = ", ".join(f"{n} {s.value}" for s, n in sorted(counts.items()) if n)
        if self.passed:
            return f"PASS: {tally}"
        return f"FAIL: {self.reason()}" + (f" ({tally})" if tally else "")

    def frame(self) -> pd.DataFrame:
        """``verdicts.parquet``: one row per check, the table the regression gate reads."""
        rows = [{**asdict(c), "status": c.status.value} for c in self.checks]
        return pd.DataFrame(rows, columns=VERDICT_COLUMNS).astype(str)

    def to_json(self) -> dict:
        """The verdict part of ``summary.json``."""
        return {
            "passed": self.passed,
            "exit_code": self.exit_code,
            "verdict": self.headline(),
            "checks": [{**asdict(c), "status": c.status.value} for c in self.checks],
        }
