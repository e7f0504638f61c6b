"""Runs prompts through targets and compares each candidate with the reference.

Loaded models and captures are memoised per (target, checkpoint, tokens, mode), so a reference
run is computed once however many candidates it is compared with.  A candidate that raises is a
finding about that port (:class:`PortFailure`), never a crash of the harness.
"""

from __future__ import annotations

import hashlib
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import capture_points
from harness.backends.base import Captures, LoadedModel, forward, stepwise
from harness.compare import PairResult, Tolerance, compare_pair
from harness.errors import InputError, PortFailure
from harness.targets import Target, get_backend

MODES = ("prefill", "decode")
# Checks run once per case and candidate rather than per prompt.
CASE_MODES = ("mtp", "slopes")


@dataclass
class Runner:
    """Memoising executor shared by the pytest plugin and the command line."""

    models: dict[tuple[Target, Path], LoadedModel] = field(default_factory=dict)
    runs: dict[tuple[Target, Path, str, str], Captures] = field(default_factory=dict)
    failures: dict[tuple[Target, Path], PortFailure] = field(default_factory=dict)
    results: list[PairResult] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    # Per-case checks beside the per-point ones (MTP acceptance, GLA slope verdicts).
    mtp_runs: list = field(default_factory=list)
    slope_verdicts: list = field(default_factory=list)

    @property
    def ran_anything(self) -> bool:
        return bool(self.results or self.mtp_runs or self.slope_verdicts or self.findings)

    def availability(self, target: Target) -> tuple[bool, str]:
        """Whether the target's backend can run here, with the reason if not."""
        try:
            avail = get_backend(target.backend).availability()
        except ImportError as e:  # the backend module itself needs a missing package
            return False, f"{target.backend}: {e}"
        return avail.ok, avail.reason

    def model(self, target: Target, checkpoint: Path) -> LoadedModel:
        key = (target, checkpoint)
        if key in self.failures:
            raise self.failures[key]
        if key not in self.models:
            try:
                self.models[key] = get_backend(target.backend).load(checkpoint, target.options())
            except (InputError, PortFailure):
                raise
            except Exception as e:  # the port could not even load the checkpoint
                failure = PortFailure(f"{target.label} failed to load {checkpoint}: {_short(e)}")
                self.failures[key] = failure
                raise failure from e
        return self.models[key]

    def captures(
        self, target: Target, checkpoint: Path, tokens: Sequence[int], mode: str, n_decode: int
    ) -> Captures:
        """Every capture point the target produces for ``tokens`` in ``mode``."""
        digest = hashlib.sha256(repr((list(tokens), n_decode)).encode()).hexdigest()
        key = (target, checkpoint, digest, mode)
        if key not in self.runs:
            model = self.model(target, checkpoint)
            names = capture_points.all_points(model.n_layers)
            try:
                if mode == "prefill":
                    caps = forward(model, tokens, names)
                else:
                    n_prefill = max(1, len(tokens) - n_decode)
                    caps = stepwise(model, tokens, n_prefill, names)
            except (InputError, PortFailure):
                raise
            except Exception as e:
                raise PortFailure(f"{target.label} crashed in {mode}: {_short(e)}") from e
            self.runs[key] = caps
        return self.runs[key]

    def compare(
        self,
        *,
        case: str,
        prompt: str,
        checkpoint: Path,
        tokens: Sequence[int],
        candidate: Target,
        reference: Target,
        tolerance: Tolerance,
        mode: str = "prefill",
        n_decode: int = 8,
    ) -> PairResult:
        """Compare one candidate with the reference on one prompt; the result is also kept."""
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        # The reference always runs a full forward: in float64 prefill and decode agree exactly
        # (a reference test proves it), so one reference run serves both candidate modes.
        ref = self.captures(reference, checkpoint, tokens, "prefill", n_decode)
        cand = self.captures(candidate, checkpoint, tokens, mode, n_decode)
        result = compare_pair(
            case, prompt, candidate.label, reference.label, cand, ref, tolerance, mode=mode
        )
        self.results.append(result)
        return result


def _short(e: BaseException) -> str:
    """The exception and the innermost frame, enough to tell where a port broke."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"
