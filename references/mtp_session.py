"""Speculative decoding sessions over the reference: the trunk plus the MTP head as a drafter.

:class:`~references.model.ReferenceSession` computes MTP rows only for positions whose next token
is already known (teacher forcing).  A speculative decoder needs more: the draft logits for the
*last* position as soon as its next token is chosen, chained drafts that are later discarded, and
a way to undo a rejected verification.  :class:`DraftingSession` is that bookkeeping, shared by
both families; :class:`ReferenceMtpSession` runs it on the Ling-2.6 reference's own blocks
(``block_forward``, the weights, the variant knobs), so a mutant reference drafts the way the wrong
port it models would; ``references.ling3.mtp`` runs it on Ling 3.0.  Both implement
:class:`harness.checks.mtp.MtpSession`.

MTP bookkeeping (doc §3.1): MTP position t reads the trunk hidden h_t and the embedding of token
t+1; its MLA cache holds one entry per committed position, in step with the trunk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from harness.core.capture_points import MTP_POINTS
from harness.core.errors import InputError
from references.mla import MLACache
from references.model import BailingHybridReference, Cache
from references.ops import linear, rms_norm


class _Discard:
    """A recorder that keeps nothing: drafting needs no captures."""

    def put(self, name: str | None, value: torch.Tensor) -> None:
        return None


def _no_name(stem: str) -> None:
    return None


_DISCARD = _Discard()


@dataclass(frozen=True)
class _Snapshot:
    state: object  # the subclass's trunk caches and MTP cache
    tokens: tuple[int, ...]
    pending: torch.Tensor | None
    mtp_done: int
    chain: tuple[torch.Tensor, tuple[int, ...]] | None


class DraftingSession(ABC):
    """One sequence through a trunk and its MTP head, with the bookkeeping a drafter needs.

    The head can only run at position t once token t+1 is chosen, so the session keeps the trunk
    hiddens it still owes the head (``pending``) and commits them at the next :meth:`draft`; chained
    drafts extend the head's cache speculatively and are trimmed at the next :meth:`draft`.
    Subclasses supply the trunk, the head and their state.
    """

    token_shift = 1  # the head at position t reads the embedding of token t + token_shift

    def __init__(self) -> None:
        self._tokens: list[int] = []
        self._pending: torch.Tensor | None = None  # hiddens of positions mtp_done..len(tokens)-1
        self._mtp_done = 0  # positions committed to the MTP cache
        # (the last MTP block output row, the token sequence extended by drafts) while chaining
        self._chain: tuple[torch.Tensor, tuple[int, ...]] | None = None

    @abstractmethod
    def _trunk(self, tokens: list[int]) -> tuple[np.ndarray, torch.Tensor]:
        """Run the trunk on ``tokens``: (logits [T, vocab] float64, hiddens the head reads)."""

    @abstractmethod
    def _head(
        self, hidden: torch.Tensor, ids: list[int], start: int
    ) -> tuple[torch.Tensor, np.ndarray]:
        """MTP rows for positions start..start+len(ids)-1 (appended to the MTP cache):
        (block outputs before the final norm, logits [n, vocab] float64)."""

    @abstractmethod
    def _truncate_head(self, length: int) -> None:
        """Drop MTP cache entries beyond ``length`` (what chained drafts added)."""

    @abstractmethod
    def _save(self) -> object:
        """A faithful copy of the trunk caches and the MTP cache."""

    @abstractmethod
    def _load(self, state: object) -> None:
        """Return the caches to a :meth:`_save`."""

    # ---- trunk ----

    @torch.no_grad()
    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        """Run ``tokens`` through the trunk after everything fed before; logits [T, vocab]."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("feed needs at least one token")
        logits, hidden = self._trunk(tokens)
        self._tokens.extend(tokens)
        self._pending = hidden if self._pending is None else torch.cat((self._pending, hidden))
        return logits

    # ---- MTP head ----

    def _ids(self, known: Sequence[int], start: int, stop: int) -> list[int]:
        return [known[p + self.token_shift] for p in range(start, stop)]

    @torch.no_grad()
    def draft(self, next_token: int) -> np.ndarray:
        """Draft logits [vocab] for the position after ``next_token``, the token chosen to follow
        the last fed one; first commits every fed position whose next token is now known."""
        if not self._tokens:
            raise ValueError("draft needs at least one fed token")
        self._truncate_head(self._mtp_done)  # drop what chained drafts added
        known = (*self._tokens, int(next_token))
        start, stop = self._mtp_done, len(self._tokens)
        if self._pending is None or self._pending.shape[0] != stop - start:
            raise ValueError("draft needs tokens fed since the last draft")
        out, logits = self._head(self._pending, self._ids(known, start, stop), start)
        self._pending, self._mtp_done = None, stop
        self._chain = (out[-1:], known)
        return logits[-1]

    @torch.no_grad()
    def draft_chain(self, token: int) -> np.ndarray:
        """Reuse the head on its own last block output (pre-final-norm, as vLLM and llama.cpp
        chain) with ``token`` as the next token; what it adds to the MTP cache is speculative."""
        if self._chain is None:
            raise ValueError("draft_chain needs a draft() first")
        hidden, known = self._chain
        known = (*known, int(token))
        position = len(known) - 2
        out, logits = self._head(hidden, self._ids(known, position, position + 1), position)
        self._chain = (out, known)
        return logits[-1]

    # ---- undo ----

    def snapshot(self) -> _Snapshot:
        """The whole session state (caches, tokens, pending hiddens, chaining state)."""
        return _Snapshot(
            state=self._save(),
            tokens=tuple(self._tokens),
            pending=self._pending,
            mtp_done=self._mtp_done,
            chain=self._chain,
        )

    def restore(self, snap: _Snapshot) -> None:
        """Return to the state of :meth:`snapshot` (undo a rejected verification)."""
        self._load(snap.state)
        self._tokens = list(snap.tokens)
        self._pending = snap.pending
        self._mtp_done = snap.mtp_done
        self._chain = snap.chain


class ReferenceMtpModel:
    """A loaded reference with an MTP head, as a :class:`harness.checks.mtp.MtpModel`."""

    def __init__(self, model: BailingHybridReference, label: str = "torch-float64") -> None:
        if model.mtp is None:
            raise InputError(
                "the checkpoint has no MTP head (num_nextn_predict_layers = 0 or no "
                f"model.layers.{model.n_layers}.eh_proj.weight): nothing to draft with"
            )
        self.model = model
        self.label = label
        self.vocab_size = model.config.vocab_size

    def start(self) -> ReferenceMtpSession:
        return ReferenceMtpSession(self.model)

    def capture(self, tokens: Sequence[int],
                anchors: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Teacher forcing: every mtp_* point for positions 0..T-2 and the trunk's logits
        (``anchors``: a port's trunk rows each sublayer starts from, as in a prefill)."""
        names = [p.stem for p in MTP_POINTS]
        return self.model.start([*names, "result_output"], anchors=anchors).feed(list(tokens))


class ReferenceMtpSession(DraftingSession):
    """Ling-2.6: the reference's trunk caches, its MTP layer's MLA cache, its variant knobs."""

    def __init__(self, model: BailingHybridReference) -> None:
        super().__init__()
        self._m = model
        self.token_shift = model.options.variant.mtp_token_shift
        self._caches: list[Cache] = model.new_caches()
        self._mtp_cache = MLACache()

    def _trunk(self, tokens: list[int]) -> tuple[np.ndarray, torch.Tensor]:
        m = self._m
        start = len(self._tokens)
        positions = torch.arange(start, start + len(tokens), device=m.device)
        m.begin_forward()
        x = m.embed_rows(tokens)
        for block, cache in zip(m.blocks, self._caches, strict=True):
            x = m.block_forward(x, block, cache, positions, _DISCARD, _no_name)[0]  # type: ignore[arg-type]
        normed = rms_norm(x, m.norm, m.eps)
        hidden = normed if m.options.variant.mtp_hidden == "post_norm" else x
        return _numpy(m.logits(normed)), hidden

    def _head(
        self, hidden: torch.Tensor, ids: list[int], start: int
    ) -> tuple[torch.Tensor, np.ndarray]:
        m, variant = self._m, self._m.options.variant
        head = m.mtp
        assert head is not None
        e = rms_norm(m.embed_rows(ids), head.enorm, m.eps)
        hn = rms_norm(hidden, head.hnorm, m.eps)
        pair = (e, hn) if variant.mtp_concat == "embed_first" else (hn, e)
        u = linear(torch.cat(pair, dim=-1), head.eh_proj)
        positions = torch.arange(start, start + len(ids), device=m.device)
        y = m.block_forward(u, head.block, self._mtp_cache, positions, _DISCARD, _no_name)[0]  # type: ignore[arg-type]
        final = head.final_norm if variant.mtp_final_norm == "mtp_final_layernorm" else m.norm
        return y, _numpy(m.logits(rms_norm(y, final, m.eps)))

    def _truncate_head(self, length: int) -> None:
        truncate_mla_cache(self._mtp_cache, length)

    def _save(self) -> object:
        """Caches are replaced, never written in place (torch.cat and the GLA functions return
        new tensors), so keeping references is a faithful copy."""
        trunk = tuple(
            (c.latent, c.k_pe) if isinstance(c, MLACache) else c.state for c in self._caches
        )
        return trunk, (self._mtp_cache.latent, self._mtp_cache.k_pe)

    def _load(self, state: object) -> None:
        trunk, mtp = state  # type: ignore[misc]
        for cache, saved in zip(self._caches, trunk, strict=True):
            if isinstance(cache, MLACache):
                cache.latent, cache.k_pe = saved
            else:
                cache.state = saved
        self._mtp_cache.latent, self._mtp_cache.k_pe = mtp


def truncate_mla_cache(cache: MLACache, length: int) -> None:
    """Keep the first ``length`` entries of an MLA cache (tensors are replaced, not edited)."""
    if cache.length > length:
        cache.latent = cache.latent[:length] if length else None
        cache.k_pe = cache.k_pe[:length] if length else None


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()
