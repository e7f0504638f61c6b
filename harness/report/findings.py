"""Sorts the run's findings (free-text lines from many producers) into groups a reviewer reads
in order of severity: port failures first, then disagreements, notes, checkpoint
normalisations, skips, and informational lines last (collapsed in the report).

Findings are free text today, so the kind is read from the wording the producers use
(``harness.pytest_plugin.plugin``, ``harness.checks.mtp``, ``harness.llamacpp.convert``, the
backends); a line
no rule knows is a NOTE, so nothing is ever hidden.  A port failure's first line is its cause;
the llama.cpp stderr that follows it is kept apart so the report can collapse it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["Finding", "FindingGroup", "FindingKind", "classify_finding", "group_findings"]


class FindingKind(StrEnum):
    """What a finding is about; the declaration order is the order of severity in the report."""

    PORT_FAILURE = "port failure"
    DISAGREEMENT = "disagreement"
    NOTE = "note"
    NORMALISATION = "checkpoint normalisation"
    SKIP = "skipped"
    INFO = "informational"


_TITLES = {
    FindingKind.PORT_FAILURE: "Port failures",
    FindingKind.DISAGREEMENT: "Disagreements with the reference",
    FindingKind.NOTE: "Notes",
    FindingKind.NORMALISATION: "Checkpoint normalisations",
    FindingKind.SKIP: "Skipped",
    FindingKind.INFO: "Informational",
}
_SEVERITY = {
    FindingKind.PORT_FAILURE: "error",
    FindingKind.DISAGREEMENT: "error",
    FindingKind.NOTE: "warning",
    FindingKind.NORMALISATION: "info",
    FindingKind.SKIP: "info",
    FindingKind.INFO: "info",
}

# First match wins: informational and skip wording is checked before the failure words that a
# skip reason may quote ("libllama failed to load" is why a backend was skipped, not a crash).
_RULES: tuple[tuple[FindingKind, re.Pattern[str]], ...] = (
    (FindingKind.INFO, re.compile(
        r"tokens identical|acceptance (?:rate|length)|GLA decay is corrected", re.IGNORECASE)),
    (FindingKind.SKIP, re.compile(
        r"\bskipped: |\bnot run: |architecture not supported|no MTP driver|"
        r"not converted here|only logits are compared", re.IGNORECASE)),
    (FindingKind.NORMALISATION, re.compile(
        r"checkpoint normalised|\bstaged (?:a )?copy|: staged \w|left out of the staged copy",
        re.IGNORECASE)),
    (FindingKind.PORT_FAILURE, re.compile(
        r"\bworker (?:died|exited|crashed|hung|timed out|was killed)|\bcrashed\b|"
        r"\bfailed to load\b|\bforward failed\b|returned \w+ from \w+, not captures|"
        r"returned no logits|sys\.exit|GGML_ASSERT|GGML_ABORT|Segmentation fault|"
        r"\b\w+(?:Error|Exception): |MTP (?:capture )?on \S+/\S+: ", re.IGNORECASE)),
    (FindingKind.DISAGREEMENT, re.compile(
        r"\bdiffers? from\b|changed the greedy output|first mismatch|GLA decay is ",
        re.IGNORECASE)),
)
# The pytest plugin prefixes a port failure with "case/prompt mode: "; the same crash in prefill
# and decode is one finding seen in two places.
_CONTEXT = re.compile(r"^(?P<where>[\w.+-]+/[\w.+ -]+? (?:prefill|decode|greedy|mtp|slopes)): ")
_MODE_WORDS = re.compile(r"\b(?:prefill|decode|greedy decode|greedy)\b")


@dataclass
class Finding:
    """One distinct finding: the cause line, the raw text behind it, and where it was seen."""

    kind: FindingKind
    cause: str
    raw: str = ""
    seen_in: list[str] = field(default_factory=list)


@dataclass
class FindingGroup:
    """The findings of one kind, for one block of the report."""

    kind: FindingKind
    title: str
    severity: str
    findings: list[Finding]

    @property
    def collapsed(self) -> bool:
        """Informational lines (results, not findings) and checkpoint normalisations (the same
        for every run of a family) are kept but folded away."""
        return self.kind in (FindingKind.INFO, FindingKind.NORMALISATION)


def classify_finding(text: str, error_details: Iterable[str] = ()) -> FindingKind:
    """The kind of one finding line; ``error_details`` are the details of checks whose status is
    'error', so a crash whose wording no rule knows is still filed as a port failure."""
    head = text.strip().splitlines()[0] if text.strip() else ""
    for kind, pattern in _RULES:
        if pattern.search(head):
            return kind
    for detail in error_details:
        first = detail.strip().splitlines()[0].removeprefix("port failure: ") if detail else ""
        if first and (first in head or head in first):
            return FindingKind.PORT_FAILURE
    return FindingKind.NOTE


def _cause(kind: FindingKind, text: str) -> tuple[str, str, str]:
    """(where, one-line cause, raw rest): for a port failure the first line plus the first
    GGML_ASSERT/error line of its stderr, the rest kept raw."""
    lines = text.strip().splitlines() or [""]
    first, rest = lines[0], lines[1:]
    where = ""
    if m := _CONTEXT.match(first):
        where, first = m["where"], first[m.end():]
    if kind is FindingKind.PORT_FAILURE and rest:
        key = next((ln.strip() for ln in rest if not ln.startswith("---")
                    and re.search(r"GGML_ASSERT|GGML_ABORT|error|fatal", ln, re.IGNORECASE)), "")
        first = f"{first} — {key}" if key and key not in first else first
    return where, first, "\n".join(rest)


def group_findings(
    findings: Iterable[str], error_details: Iterable[str] = ()
) -> list[FindingGroup]:
    """Findings grouped by kind in order of severity, duplicates (also the same crash reported
    once per mode) merged into one entry that lists where it was seen."""
    details = list(error_details)
    merged: dict[tuple[FindingKind, str], Finding] = {}
    for text in findings:
        kind = classify_finding(str(text), details)
        where, cause, raw = _cause(kind, str(text))
        key = (kind, _MODE_WORDS.sub("*", cause))
        entry = merged.setdefault(key, Finding(kind, cause, raw))
        if where and where not in entry.seen_in:
            entry.seen_in.append(where)
        if len(raw) > len(entry.raw):
            entry.raw = raw
    return [
        FindingGroup(kind, _TITLES[kind], _SEVERITY[kind],
                     [f for (k, _), f in merged.items() if k is kind])
        for kind in FindingKind
        if any(k is kind for k, _ in merged)
    ]
