"""Runs prompts through targets and compares each candidate with the reference.

Loaded models and captures are memoised per (target, checkpoint, tokens, mode), so a reference
run is computed once however many candidates it is compared with.  A candidate that raises is a
finding about that port (:class:`PortFailure`), never a crash of the harness.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.backends.base import Captures, LoadedModel, forward, stepwise
from harness.backends.targets import Target, get_backend
from harness.checks.compare import PairResult
from harness.core import capture_points, lifecycle
from harness.core.errors import PortFailure, port_boundary
from harness.core.verdict import RunVerdict


@dataclass
class Runner:
    """Memoising executor: models, captures and what came of them; every front end drives it
    through :class:`harness.checks.session.CheckSession`, which extends it with the checks."""

    models: dict[tuple[Target, Path], LoadedModel] = field(default_factory=dict)
    runs: dict[tuple[Target, Path, str, str], Captures] = field(default_factory=dict)
    failures: dict[tuple[Target, Path], PortFailure] = field(default_factory=dict)
    results: list[PairResult] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    # Per-case checks beside the per-point ones (MTP acceptance, GLA slope verdicts).
    mtp_runs: list = field(default_factory=list)
    slope_verdicts: list = field(default_factory=list)
    # One verdict per check, recorded by the front end that ran it (harness.core.verdict).
    verdict: RunVerdict = field(default_factory=RunVerdict)
    # Labels of every target whose weights were loaded, in order (a golden run loads no reference).
    loaded: list[str] = field(default_factory=list)

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
            lifecycle.stage("loading")
            self.loaded.append(target.label)
            try:
                with port_boundary(target.label, f"failed to load {checkpoint}"):
                    self.models[key] = get_backend(target.backend).load(checkpoint,
                                                                        target.options())
            except PortFailure as failure:  # the port could not even load the checkpoint
                self.failures[key] = failure
                raise
        return self.models[key]

    def release(self, checkpoint: Path | None = None, target: Target | None = None) -> None:
        """Free loaded models (of one checkpoint and/or target, else all) once their captures
        are taken: their findings are kept, their worker processes closed, their weights
        dropped, so a run holds one backend in memory at a time."""
        for key in [k for k in self.models
                    if (target is None or k[0] == target)
                    and (checkpoint is None or k[1] == checkpoint)]:
            model = self.models.pop(key)
            self.findings.extend(f for f in getattr(model, "findings", ()) or ()
                                 if f not in self.findings)
            close = getattr(model, "close", None)
            if callable(close):
                close()
            del model
        gc.collect()
        with contextlib.suppress(Exception):  # MLX keeps freed buffers in its own cache
            import mlx.core as mx

            mx.clear_cache()

    @staticmethod
    def _run_key(target: Target, checkpoint: Path, tokens: Sequence[int], mode: str,
                 n_decode: int) -> tuple[Target, Path, str, str]:
        digest = hashlib.sha256(repr((list(tokens), n_decode)).encode()).hexdigest()
        return (target, checkpoint, digest, mode)

    def seed(self, target: Target, checkpoint: Path, tokens: Sequence[int], n_decode: int,
             captures: Captures) -> None:
        """Take ``target``'s prefill captures as given (a golden run's saved reference), so
        comparisons against it never load its weights."""
        checked = check_captures(target.label, "prefill", captures, len(tokens))
        self.runs[self._run_key(target, checkpoint, tokens, "prefill", n_decode)] = checked

    def captures(
        self, target: Target, checkpoint: Path, tokens: Sequence[int], mode: str, n_decode: int
    ) -> Captures:
        """Every capture point the target produces for ``tokens`` in ``mode``."""
        key = self._run_key(target, checkpoint, tokens, mode, n_decode)
        if key not in self.runs:
            model = self.model(target, checkpoint)
            names = capture_points.all_points(model.n_layers)
            with port_boundary(target.label, f"crashed in {mode}"):
                if mode == "prefill":
                    caps = forward(model, tokens, names)
                else:
                    n_prefill = max(1, len(tokens) - n_decode)
                    caps = stepwise(model, tokens, n_prefill, names)
            self.runs[key] = check_captures(target.label, mode, caps, len(tokens))
        return self.runs[key]


def check_captures(label: str, mode: str, caps: object, n_tokens: int) -> Captures:
    """A port's captures, refused as a port failure when they are not what the protocol says:
    a mapping of arrays whose logits hold one finite-or-not float row per token."""
    if not isinstance(caps, dict):
        raise PortFailure(f"{label} returned {type(caps).__name__} from {mode}, not captures")
    logits = caps.get("result_output")
    if logits is None:
        raise PortFailure(f"{label} returned no logits (result_output) in {mode}")
    arr = np.asarray(logits)
    if arr.dtype.kind not in "fc" or arr.ndim != 2 or arr.shape[0] != n_tokens or not arr.size:
        raise PortFailure(
            f"{label} returned logits of shape {arr.shape} ({arr.dtype}) in {mode}; expected "
            f"({n_tokens}, vocab) floats, one row per token")
    return caps
