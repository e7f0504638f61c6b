"""Greedy-decode agreement with vLLM's rule (``tests/models/utils.py::check_logprobs_close``).

Per-layer NMSE says how close two implementations are; a greedy continuation says whether the
closeness matters to a user.  Both sides decode greedily; the first step where their tokens
differ is reported, and there vLLM's rule decides: each side's token must be in the OTHER side's
top-k at that step (a near-tie both would accept), and comparison stops, because after a
divergence the two continuations condition on different prefixes.

The candidate decodes step by step through its own session cache (its decode path is what is
under test).  The reference is teacher-forced on the candidate's tokens in one forward by default
(``reference_mode="forward"``): up to and including the first mismatch the two prefixes are
identical, so this yields exactly the reference's own greedy tokens and top-k there, in one pass
instead of ``n_steps`` sequential ones (``"decode"`` runs the reference step by step instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from harness.backends.base import LoadedModel

GREEDY_STEPS = 64
TOP_K = 5
RULES = ("identical", "mutual-top-k", "not-in-top-k")


@dataclass(frozen=True)
class GreedyResult:
    """Outcome of one greedy comparison; ``rule`` names what decided it."""

    candidate_tokens: list[int]
    reference_tokens: list[int]  # the reference's greedy tokens (up to the first mismatch)
    first_mismatch: int | None  # step index, None when every compared step agreed
    rule: str  # one of RULES
    n_steps: int
    top_k: int
    candidate_topk: list[int] = field(default_factory=list)  # at the first mismatch
    reference_topk: list[int] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.rule != "not-in-top-k"

    @property
    def agreed_steps(self) -> int:
        """Steps whose tokens agreed before the first mismatch (n_steps when none)."""
        return self.n_steps if self.first_mismatch is None else self.first_mismatch

    def summary(self) -> str:
        """One line for tables and failure messages."""
        if self.first_mismatch is None:
            return f"greedy: {self.n_steps}/{self.n_steps} tokens identical"
        i = self.first_mismatch
        c, r = self.candidate_tokens[i], self.reference_tokens[i]
        verdict = (
            "accepted: each token is in the other's top-%d (a near-tie), comparison stopped"
            if self.rule == "mutual-top-k"
            else "FAILED: a token is outside the other's top-%d"
        ) % self.top_k
        return (
            f"greedy: first mismatch at step {i}/{self.n_steps} (candidate {c}, reference {r}; "
            f"candidate top-{self.top_k} {self.candidate_topk}, reference top-{self.top_k} "
            f"{self.reference_topk}): {verdict} [rule: {self.rule}]"
        )


def _topk(logits: np.ndarray, k: int) -> list[int]:
    """Ids of the k largest logits, best first (ties broken by lower id, like argmax)."""
    order = np.lexsort((np.arange(logits.shape[-1]), -logits))
    return [int(i) for i in order[:k]]


def decode_greedy(model: LoadedModel, prompt: Sequence[int], n_steps: int) -> list[np.ndarray]:
    """Logits rows ``[n_steps, vocab]``: the one predicting each greedily chosen token."""
    session = model.start()
    logits = session.feed(list(prompt))["result_output"][-1]
    rows = [logits]
    for _ in range(n_steps - 1):
        logits = session.feed([int(np.argmax(logits))])["result_output"][-1]
        rows.append(logits)
    return rows


def greedy_compare(
    candidate_model: LoadedModel,
    reference_model: LoadedModel,
    prompt: Sequence[int],
    n_steps: int = GREEDY_STEPS,
    top_k: int = TOP_K,
    *,
    reference_mode: str = "forward",
) -> GreedyResult:
    """Decode ``n_steps`` greedy tokens after ``prompt`` on both sides and apply vLLM's rule."""
    if n_steps < 1 or top_k < 1:
        raise ValueError("n_steps and top_k must be positive")
    if reference_mode not in ("forward", "decode"):
        raise ValueError(f"reference_mode must be 'forward' or 'decode', not {reference_mode!r}")
    prompt = [int(t) for t in prompt]
    cand_rows = decode_greedy(candidate_model, prompt, n_steps)
    cand_tokens = [int(np.argmax(r)) for r in cand_rows]
    if reference_mode == "decode":
        ref_rows = decode_greedy(reference_model, prompt, n_steps)
    else:
        forced = prompt + cand_tokens[:-1]
        logits = reference_model.start().feed(forced)["result_output"]
        ref_rows = list(logits[len(prompt) - 1 :])
    ref_tokens = [int(np.argmax(r)) for r in ref_rows]
    for i, (c, r) in enumerate(zip(cand_tokens, ref_tokens, strict=True)):
        if c == r:
            continue
        c_top, r_top = _topk(cand_rows[i], top_k), _topk(ref_rows[i], top_k)
        rule = "mutual-top-k" if c in r_top and r in c_top else "not-in-top-k"
        return GreedyResult(
            cand_tokens, ref_tokens[: i + 1], i, rule, n_steps, top_k, c_top, r_top
        )
    return GreedyResult(cand_tokens, ref_tokens, None, "identical", n_steps, top_k)
