"""Speculative greedy decoding with the MTP (NextN) head, and its acceptance metrics.

Backend-agnostic: a backend supplies an :class:`MtpModel` whose sessions feed the trunk, draft from
the MTP head, and can undo a rejected verification.  Verification is greedy exact match, as in
mlx-lm's ``speculative_generate_step`` and llama.cpp's ``draft-mtp``, so speculation must never
change the greedy output: :func:`speculative_greedy` and :func:`plain_greedy` agree token for token
on any correct backend, and a run records it.

Metric names are vLLM's / llama-server's (parity-conventions §0 item 9): acceptance rate =
accepted / drafted tokens; mean acceptance length = 1 + accepted / num_drafts; per-position
acceptance = accepted at draft position i / num_drafts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from harness.core.errors import InputError
from harness.core.metrics import nmse

__all__ = [
    "DraftStep",
    "MtpModel",
    "MtpSession",
    "OracleDrafts",
    "SpecResult",
    "draft_agreement",
    "plain_greedy",
    "replay_drafts",
    "shared_draft_rows",
    "speculative_greedy",
]


# --------------------------------------------------------------------------------------------
# Protocol


@runtime_checkable
class MtpSession(Protocol):
    """One sequence through the trunk and the MTP head, with undo.

    MTP position t reads the trunk hidden of position t and the token at t+1, so the head can only
    run once the next token is chosen; a session keeps the hiddens it still owes the head and the
    MTP layer's own KV cache in step with the trunk.
    """

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        """Trunk: consume ``tokens`` after everything fed before; logits [T, vocab] (float64)."""
        ...

    def draft(self, next_token: int) -> np.ndarray:
        """``next_token`` follows the last fed token: commit the MTP rows of every fed position
        whose next token is now known and return the draft logits [vocab] of the last one (a
        prediction of the token after ``next_token``)."""
        ...

    def draft_chain(self, token: int) -> np.ndarray:
        """Reuse the head on its own previous output with ``token`` (the previous draft) as the
        next token: draft logits [vocab] one position further. Speculative: what it adds to the
        MTP cache is dropped by the next :meth:`draft`."""
        ...

    def snapshot(self) -> object:
        """An opaque copy of the session state (trunk caches, MTP cache, pending hiddens)."""
        ...

    def restore(self, snap: object) -> None:
        """Return to a :meth:`snapshot` (undo a verification batch with rejected drafts)."""
        ...


@runtime_checkable
class MtpModel(Protocol):
    """A checkpoint loaded with its MTP head.

    Optionally also ``capture(tokens) -> {point: array}``: the prompt teacher-forced through the
    trunk and the head, the canonical mtp_* points it can name (rows 0..T-2) plus
    ``result_output``; :func:`first_mtp_divergence` uses it to say where a head goes wrong.
    """

    label: str
    vocab_size: int

    def start(self) -> MtpSession: ...


# --------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class DraftStep:
    """One verification step: ``next_token`` (already chosen) is fed with the drafts after it."""

    position: int  # trunk position of the MTP row that drafted (the last fed position)
    next_token: int
    drafts: tuple[int, ...]  # empty: a plain step (no room left for a draft)
    accepted: int  # length of the accepted draft prefix
    draft_logits: np.ndarray  # [len(drafts), vocab]


@dataclass(frozen=True)
class SpecResult:
    """A speculative greedy run and its acceptance metrics."""

    prompt: tuple[int, ...]
    tokens: tuple[int, ...]  # the generated tokens
    steps: tuple[DraftStep, ...]
    chain: int

    @property
    def draft_steps(self) -> list[DraftStep]:
        return [s for s in self.steps if s.drafts]

    @property
    def num_drafts(self) -> int:
        return len(self.draft_steps)

    @property
    def num_draft_tokens(self) -> int:
        return sum(len(s.drafts) for s in self.steps)

    @property
    def num_accepted_tokens(self) -> int:
        return sum(s.accepted for s in self.steps)

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted tokens (NaN without drafts)."""
        n = self.num_draft_tokens
        return self.num_accepted_tokens / n if n else math.nan

    @property
    def mean_acceptance_length(self) -> float:
        """1 + accepted / num_drafts: tokens per verification step, the bonus token included."""
        n = self.num_drafts
        return 1 + self.num_accepted_tokens / n if n else math.nan

    @property
    def accepted_per_pos(self) -> list[int]:
        """How many steps accepted draft position i (vLLM's per-position counter)."""
        return [sum(s.accepted > i for s in self.steps) for i in range(self.chain)]

    @property
    def acceptance_per_pos(self) -> list[float]:
        """accepted_per_pos[i] / num_drafts (llama-server's "acc per pos")."""
        n = self.num_drafts
        return [c / n if n else math.nan for c in self.accepted_per_pos]

    def trace(self) -> list[tuple[int, tuple[int, ...], int]]:
        """(next_token, drafts, accepted) per step: equal traces mean identical decoding."""
        return [(s.next_token, s.drafts, s.accepted) for s in self.steps]


def _argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def plain_greedy(model: MtpModel, prompt: Sequence[int], n_new: int) -> list[int]:
    """Greedy decoding through the trunk only, one token per step: the ground truth."""
    _check_run(prompt, n_new, 1)
    session = model.start()
    out = [_argmax(session.feed(list(prompt))[-1])]
    while len(out) < n_new:
        out.append(_argmax(session.feed([out[-1]])[-1]))
    return out


def speculative_greedy(
    model: MtpModel, prompt: Sequence[int], n_new: int, chain: int = 1
) -> SpecResult:
    """Greedy decoding where the MTP head drafts ``chain`` tokens per step (chained reuse of the
    one MTP layer) and the trunk verifies them in one batch by exact match.

    A step feeds [next_token, d_1..d_k]; the longest prefix of drafts equal to the trunk's argmax
    is accepted, and the argmax after it is the next token (bonus or correction).  On a rejection
    the session is restored and the accepted part re-fed, so caches hold only committed tokens.
    Drafts never run past ``n_new``: when one token is left, the step is a plain one.
    """
    _check_run(prompt, n_new, chain)
    session = model.start()
    out = [_argmax(session.feed(list(prompt))[-1])]
    fed = len(prompt)
    steps: list[DraftStep] = []
    while len(out) < n_new:
        y = out[-1]
        k = min(chain, n_new - len(out) - 1)
        rows: list[np.ndarray] = []
        drafts: list[int] = []
        if k:
            rows.append(np.asarray(session.draft(y), dtype=np.float64))
            drafts.append(_argmax(rows[-1]))
            for _ in range(k - 1):
                rows.append(np.asarray(session.draft_chain(drafts[-1]), dtype=np.float64))
                drafts.append(_argmax(rows[-1]))
        snap = session.snapshot() if drafts else None
        logits = session.feed([y, *drafts])
        accepted = 0
        while accepted < len(drafts) and _argmax(logits[accepted]) == drafts[accepted]:
            accepted += 1
        if accepted < len(drafts):
            session.restore(snap)
            session.feed([y, *drafts[:accepted]])
        vocab = logits.shape[-1]
        steps.append(
            DraftStep(
                position=fed - 1,
                next_token=y,
                drafts=tuple(drafts),
                accepted=accepted,
                draft_logits=np.stack(rows) if rows else np.zeros((0, vocab)),
            )
        )
        fed += 1 + accepted
        out += [*drafts[:accepted], _argmax(logits[accepted])]
    return SpecResult(tuple(int(t) for t in prompt), tuple(out[:n_new]), tuple(steps), chain)


def _check_run(prompt: Sequence[int], n_new: int, chain: int) -> None:
    if not prompt:
        raise InputError("MTP decoding needs a non-empty prompt")
    if n_new < 1:
        raise InputError(f"MTP decoding needs at least one new token, got {n_new}")
    if chain < 1:
        raise InputError(f"chain must be >= 1, got {chain}")


def replay_drafts(reference: MtpModel, result: SpecResult) -> list[np.ndarray]:
    """The reference's draft logits for each step of ``result``, in the same contexts: the
    reference is fed exactly the tokens the run committed and drafts after the same tokens
    (chained drafts after the run's own drafts), so differences are the head's alone."""
    session = reference.start()
    session.feed(list(result.prompt))
    out = []
    for step in result.steps:
        rows = []
        if step.drafts:
            rows.append(session.draft(step.next_token))
            rows += [session.draft_chain(d) for d in step.drafts[:-1]]
        vocab = step.draft_logits.shape[-1]
        out.append(np.stack(rows).astype(np.float64) if rows else np.zeros((0, vocab)))
        session.feed([step.next_token, *step.drafts[: step.accepted]])
    return out


def draft_agreement(result: SpecResult, reference_rows: list[np.ndarray]) -> tuple[float, float]:
    """(max NMSE over steps, top-1 agreement over draft rows) of the run's draft logits against
    the reference's (NMSE normalised by the reference, as everywhere in the harness); a step's
    rows beyond the reference's (:func:`shared_draft_rows`) are not compared."""
    nmses, same, rows = [], 0, 0
    for step, ref in zip(result.steps, reference_rows, strict=True):
        if not len(ref):  # no draft, or none in a context the reference drafted in
            continue
        mine = step.draft_logits[: len(ref)]
        nmses.append(nmse(mine, ref))
        same += int(np.sum(np.argmax(mine, -1) == np.argmax(ref, -1)))
        rows += len(ref)
    if not rows:
        return math.nan, math.nan
    return max(nmses), same / rows


def shared_draft_rows(result: SpecResult, reference: SpecResult) -> list[np.ndarray]:
    """The reference run's draft rows that were drafted in the same context as ``result``'s, per
    step of ``result`` (what :func:`replay_drafts` would give, without the reference's weights:
    a golden run holds only the reference's own run).

    A step's first row shares its context while every earlier step and its next token agree; a
    chained row also needs the drafts before it to agree.  Past the first difference the rows are
    left out (a run that drafts differently fails the check anyway); on equal traces every row is
    there, and when the recorded rows are :func:`replay_drafts` of the reference's own run they
    are exactly what a live replay would give."""
    out: list[np.ndarray] = []
    same = True
    for i, step in enumerate(result.steps):
        vocab = step.draft_logits.shape[-1]
        ref = reference.steps[i] if same and i < len(reference.steps) else None
        if ref is None or ref.next_token != step.next_token:
            same = False
            out.append(np.zeros((0, vocab)))
            continue
        n = 0
        while n < min(len(step.drafts), len(ref.drafts)):
            n += 1  # row n-1 shares the context; the next one needs draft n-1 equal too
            if step.drafts[n - 1] != ref.drafts[n - 1]:
                break
        out.append(ref.draft_logits[:n])
        same = (step.drafts, step.accepted) == (ref.drafts, ref.accepted)
    return out


class OracleDrafts:
    """An :class:`MtpModel` whose drafts are the trunk's own greedy tokens (one-hot logits): a
    self-draft that every correct verifier must accept 100 % (mlx-lm's self-draft test).

    The wrapped head still runs at every draft, so its cache bookkeeping is exercised under the
    accept/reject pattern of the oracle; ``wrong_every=n`` makes every n-th draft wrong (the
    oracle token + 1), a known pattern of rejections.
    """

    def __init__(
        self, model: MtpModel, prompt: Sequence[int], n_ahead: int, wrong_every: int = 0
    ) -> None:
        self._model = model
        self.label = f"oracle({model.label})"
        self.vocab_size = model.vocab_size
        self.wrong_every = wrong_every
        self.sequence = [*prompt, *plain_greedy(model, prompt, n_ahead)]

    def start(self) -> _OracleSession:
        return _OracleSession(self, self._model.start())


class _OracleSession:
    def __init__(self, owner: OracleDrafts, inner: MtpSession) -> None:
        self._owner, self._inner = owner, inner
        self._fed = 0
        self._ahead = 0
        self._drafted = 0

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        self._fed += len(tokens)
        return self._inner.feed(tokens)

    def _one_hot(self) -> np.ndarray:
        o = self._owner
        index = self._fed + self._ahead  # the sequence index of the drafted token
        self._drafted += 1
        row = np.zeros(o.vocab_size)
        if index < len(o.sequence):
            wrong = o.wrong_every and self._drafted % o.wrong_every == 0
            row[(o.sequence[index] + int(bool(wrong))) % o.vocab_size] = 1.0
        return row

    def draft(self, next_token: int) -> np.ndarray:
        self._inner.draft(next_token)
        self._ahead = 1
        return self._one_hot()

    def draft_chain(self, token: int) -> np.ndarray:
        self._inner.draft_chain(token)
        self._ahead += 1
        return self._one_hot()

    def snapshot(self) -> object:
        return (self._inner.snapshot(), self._fed)

    def restore(self, snap: object) -> None:
        inner, self._fed = snap  # type: ignore[misc]
        self._inner.restore(inner)
