"""The GLA slope convention as a property of the checkpoint (issue 15).

Ling-2.6's GLA decay has two layer factors in the wild: ``corrected`` f(l) = 1 - l/(L-1) + 1e-5
(mlx-lm, vLLM, SGLang, the llama.cpp forks) and ``hf_off_by_one`` f(l) + 1/(L-1) (the authors'
original remote code).  Which one is right depends on what the checkpoint was trained and
published with, so the run takes it as data: chosen (``--slope``, a case's ``slope`` field),
detected (``--slope auto``: the slopes diagnostic run on the checkpoint's own modeling code
through the ``hf-remote`` backend), or defaulted to ``corrected`` with a visible note.  The
reference computes with it, the slopes check compares each port with it, and the run records it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.backends.targets import Target
from harness.core.errors import InputError
from references.variant import DEFAULT_SLOPE, SLOPE_CONVENTIONS, SlopeFormula

CHOICES: tuple[str, ...] = (*SLOPE_CONVENTIONS, "auto")
DEFAULT_NOTE = (
    "GLA slope convention: corrected, the default for Ling-2.6-flash (mlx-lm, vLLM, SGLang); the "
    "authors' original remote code applies hf_off_by_one, so a checkpoint published with it "
    "needs --slope hf_off_by_one (or a case's slope field, or --slope auto)"
)


@dataclass(frozen=True)
class SlopeConvention:
    """The convention a run checks against, where it came from, and the run's note on it."""

    slope: SlopeFormula
    source: str  # "default", "case <name>", "--slope", "auto (hf-remote)"
    note: str

    def to_json(self) -> dict[str, str]:
        return {"slope": self.slope, "source": self.source, "note": self.note}

    def target(self, target: Target) -> Target:
        """``target`` computing with this convention: our torch reference (any dtype) is told
        the checkpoint's convention unless the target names a slope or a mutation itself; other
        backends apply what their code applies, which is what is under test."""
        extra = dict(target.extra)
        if (target.backend != "torch" or self.slope == DEFAULT_SLOPE
                or "slope_formula" in extra or "variant" in extra):
            return target
        extra["slope_formula"] = self.slope
        return replace(target, extra=tuple(sorted(extra.items())))

    def mismatch(self, port: str, applied: str) -> str:
        """The slopes check's failure message: both conventions named."""
        return (f"{port}: the port applies {applied!r}; this checkpoint expects {self.slope!r} "
                f"(its GLA decay differs from the convention from {self.source})")


def check_choice(value: object, where: str) -> str:
    """A ``--slope`` value or case field, refused with the allowed values if unknown."""
    if value not in CHOICES:
        raise InputError(f"{where}: slope {value!r}; expected one of {', '.join(CHOICES)}")
    return str(value)


def chosen(slope: str | None, source: str) -> SlopeConvention:
    """A convention given by the user (``None``: the default, with its note)."""
    if slope is None:
        return SlopeConvention(DEFAULT_SLOPE, "default", DEFAULT_NOTE)
    if slope not in SLOPE_CONVENTIONS:
        raise InputError(f"{source}: slope {slope!r}; expected one of "
                         f"{', '.join(SLOPE_CONVENTIONS)}")
    return SlopeConvention(slope, source,  # type: ignore[arg-type]
                           f"GLA slope convention: {slope} (from {source})")


def resolve(choice: str | None, checkpoint: Path, source: str = "--slope") -> SlopeConvention:
    """``--slope corrected|hf_off_by_one|auto`` (or none) for ``checkpoint``."""
    if choice == "auto":
        return detect(checkpoint)
    if choice is not None:
        check_choice(choice, source)
    return chosen(choice, source)


def detect(checkpoint: Path, probe_length: int = 64) -> SlopeConvention:
    """The convention of the checkpoint's own modeling code: the slopes diagnostic run on it
    through ``hf-remote`` (a port like any other)."""
    from harness.backends.base import BackendOptions
    from harness.backends.hf_remote import HfRemoteBackend, remote_code_of
    from harness.checks.slope_diagnostics import diagnose, reference_pair
    from harness.core.errors import PortFailure

    checkpoint = Path(checkpoint)
    modeling = remote_code_of(checkpoint)
    if modeling is None:
        raise InputError(f"{checkpoint / 'config.json'}: --slope auto needs the checkpoint's own "
                         "modeling code (an auto_map entry and its file); choose --slope "
                         "corrected or hf_off_by_one")
    backend = HfRemoteBackend()
    avail = backend.availability()
    if not avail.ok:
        raise InputError(f"--slope auto: hf-remote cannot run here ({avail.reason})")
    try:
        loaded = backend.load(checkpoint, BackendOptions(dtype="float32"))
        try:
            verdict = diagnose("hf-remote", loaded, reference_pair(checkpoint),
                               probe_length=probe_length)
        finally:
            close = getattr(loaded, "close", None)
            if callable(close):
                close()
    except PortFailure as e:
        raise InputError(f"--slope auto: the checkpoint's own code failed ({e})") from None
    if verdict.verdict not in SLOPE_CONVENTIONS:
        factors = ", ".join(f"l={d.layer}: f={d.factor:.5f}" for d in verdict.black_box)
        raise InputError(f"--slope auto: the checkpoint's own code ({modeling}) applies neither "
                         f"convention (fitted {factors}); choose --slope explicitly")
    slope: SlopeFormula = verdict.verdict  # type: ignore[assignment]
    return SlopeConvention(
        slope, "auto (hf-remote)",
        f"GLA slope convention: {slope}, detected by running the slopes diagnostic on the "
        f"checkpoint's own modeling code ({modeling}) through hf-remote")


def case_convention(case: Any) -> SlopeConvention:
    """A case's convention: its ``slope`` field, else the default with its note."""
    slope = getattr(case, "slope", None)
    return chosen(slope, f"case {case.name}") if slope else chosen(None, "default")
