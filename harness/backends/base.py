"""The one protocol every backend implements.

A backend turns a checkpoint directory into a :class:`LoadedModel`; a loaded model opens
:class:`Session` objects, and a session consumes tokens, keeping whatever cache the engine keeps
(MLA latent KV, GLA state).  A full forward is one ``feed`` of every token into a fresh session; a
step-wise decode is one ``feed`` of the prompt followed by one ``feed`` per token.  Every ``feed``
returns the requested capture points for the tokens it consumed, as float64 (INDEX points as int64)
numpy arrays with the token axis first and no batch axis, keyed by canonical names from
:mod:`harness.core.capture_points`.  A backend that cannot produce a point simply leaves it out.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from harness.core.capture_points import UnknownCapturePoint, parse
from harness.core.captures import DTYPES as DTYPES  # re-exported: the protocol's vocabulary
from harness.core.captures import Captures as Captures
from harness.core.errors import InputError


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and if not, why (shown as the pytest skip reason)."""

    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class BackendOptions:
    """Options that change what a backend computes; recorded with every result."""

    dtype: str = "float32"
    device: str = "cpu"
    # Backend-specific knobs as the user wrote them (e.g. a user's MLX port module, a GLA chunk
    # size): what labels show.
    extra: dict[str, str] = field(default_factory=dict)
    # The same knobs parsed once into the backend's options dataclass
    # (harness.backends.registry); None for a caller that built only ``extra``.
    settings: Any = field(default=None, compare=False)

    def label(self) -> str:
        """A short, stable description for result tables, e.g. ``float32,chunk=64``."""
        parts = [self.dtype] + [f"{k}={v}" for k, v in sorted(self.extra.items())]
        return ",".join(parts)


@runtime_checkable
class Session(Protocol):
    """One sequence being decoded; owns the engine's caches."""

    def feed(self, tokens: Sequence[int]) -> Captures:
        """Consume ``tokens`` after everything fed before; return captures for these tokens."""
        ...


@runtime_checkable
class LoadedModel(Protocol):
    """A checkpoint loaded into one backend with fixed options."""

    n_layers: int

    def start(self, capture: Collection[str] = ()) -> Session:
        """Open a fresh session that records the named capture points (``result_output`` always)."""
        ...


@runtime_checkable
class Backend(Protocol):
    """An implementation under test (or the reference)."""

    name: str

    def availability(self) -> Availability:
        """Whether this backend's packages are importable and usable on this machine."""
        ...

    def load(self, checkpoint_dir: Path, options: BackendOptions) -> LoadedModel:
        """Load an HF-layout checkpoint directory; bad input raises ``InputError``."""
        ...


def forward(model: LoadedModel, tokens: Sequence[int], capture: Collection[str] = ()) -> Captures:
    """A full forward pass: every token in one ``feed`` of a fresh session."""
    return model.start(capture).feed(list(tokens))


def stepwise(
    model: LoadedModel, tokens: Sequence[int], n_prefill: int, capture: Collection[str] = ()
) -> Captures:
    """Prefill ``n_prefill`` tokens, then feed the rest one at a time (captures concatenated)."""
    session = model.start(capture)
    chunks = [session.feed(list(tokens[:n_prefill]))] if n_prefill else []
    chunks += [session.feed([t]) for t in tokens[n_prefill:]]
    names = set.intersection(*(set(c) for c in chunks))
    return {n: np.concatenate([c[n] for c in chunks], axis=0) for n in names}


def greedy(model: LoadedModel, prompt: Sequence[int], n_new: int) -> list[int]:
    """Greedy decoding through the session cache: the ``n_new`` argmax tokens after ``prompt``."""
    session = model.start()
    logits = session.feed(list(prompt))["result_output"]
    out: list[int] = []
    for _ in range(n_new):
        token = int(np.argmax(logits[-1]))
        out.append(token)
        if len(out) < n_new:
            logits = session.feed([token])["result_output"]
    return out


class Recorder:
    """Shared by every capture hook of one loaded model: records only the wanted names, and only
    while a ``feed`` has opened a store (hooks fire on every forward)."""

    def __init__(self) -> None:
        self.wanted: frozenset[str] = frozenset()
        self.store: dict[str, Any] | None = None

    def wants(self, name: str) -> bool:
        return self.store is not None and name in self.wanted

    def put(self, name: str, value: Any) -> None:
        if self.wants(name):
            self.store[name] = value  # type: ignore[index]


def wanted_points(capture: Collection[str]) -> frozenset[str]:
    """The canonical points a session records: ``result_output`` always, plus ``capture`` after
    checking every name against the vocabulary (an unknown name is an InputError)."""
    wanted = {"result_output"}
    for name in capture:
        try:
            parse(name)
        except UnknownCapturePoint as e:
            raise InputError(str(e)) from None
        wanted.add(name)
    return frozenset(wanted)
