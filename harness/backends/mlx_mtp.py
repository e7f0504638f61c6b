"""The MTP head for the MLX backend, built from the port's own layer classes.

mlx-lm's ``bailing_hybrid.sanitize`` drops the MTP layer (``model.layers.{L}``), so the head is
assembled here: ``enorm``/``hnorm``/``final_layernorm`` are ``nn.RMSNorm``, ``eh_proj`` an
``nn.Linear``, and the block is the port module's own ``DecoderLayer(args, layer_idx=L)`` -- by the
layer rule's tail clause it is MLA + MoE, built from the port's ``MultiLatentAttention`` and
``SparseMoeBlock``.  Its tensors are read with ``mx.load`` and converted by the port's own
``sanitize`` (experts stacked into ``switch_mlp``, ``kv_b_proj`` split into ``embed_q`` /
``unembed_out``, ``mlp.gate.weight`` renamed ``mlp.gate.gate_proj.weight``): the MTP tensors are
renamed to layer 0 for the call, which sanitize keeps.  The trunk runs through the port's
``model.model`` (post-norm hidden) and its caches, so only the head is ours.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.backends.base import BackendOptions
from harness.backends.mlx_backend import MlxBackend, MlxLoadedModel
from harness.errors import InputError, PortFailure

_HEAD_OWN = ("enorm.", "hnorm.", "eh_proj.", "final_layernorm.")


def load_mlx_mtp(checkpoint_dir: Path, options: BackendOptions, label: str = "mlx") -> MlxMtpModel:
    """The MLX backend's model (mlx-lm or the user's port) plus an MTP head from the checkpoint."""
    loaded = MlxBackend().load(Path(checkpoint_dir), options)
    if not isinstance(loaded, MlxLoadedModel):  # another family (Ling 3.0) loaded its own way
        raise InputError(f"{checkpoint_dir}: the MLX MTP head is implemented for Ling-2.6 only")
    return MlxMtpModel(loaded, Path(checkpoint_dir), label)


def _build_head(loaded: MlxLoadedModel, checkpoint_dir: Path) -> Any:
    import mlx.core as mx
    import mlx.nn as nn

    model = loaded.model
    arch = sys.modules[loaded.module]
    args = model.args
    n = int(args.num_hidden_layers)
    if not getattr(args, "num_nextn_predict_layers", 0):
        raise InputError(f"{checkpoint_dir}: num_nextn_predict_layers is 0: no MTP head to load")

    class MtpHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h, eps = args.hidden_size, args.rms_norm_eps
            self.enorm = nn.RMSNorm(h, eps=eps)
            self.hnorm = nn.RMSNorm(h, eps=eps)
            self.eh_proj = nn.Linear(2 * h, h, bias=False)
            self.final_layernorm = nn.RMSNorm(h, eps=eps)
            self.block = arch.DecoderLayer(args, layer_idx=n)

    head = MtpHead()
    if not getattr(head.block, "is_global", True):
        raise PortFailure(f"{loaded.module}: DecoderLayer(layer_idx={n}) is not MLA")
    weights = _mtp_tensors(checkpoint_dir, n)
    renamed = {f"model.layers.0.{k}": v for k, v in weights.items()}
    try:
        sanitized = model.sanitize(renamed)
    except Exception as e:
        raise PortFailure(f"{loaded.module}: sanitize failed on the MTP tensors: {e}") from e
    items = []
    for key, value in sanitized.items():
        rest = key.removeprefix("model.layers.0.")
        items.append((rest if rest.startswith(_HEAD_OWN) else f"block.{rest}", value))
    try:
        head.load_weights(items, strict=True)
    except ValueError as e:
        raise PortFailure(f"{loaded.module}: MTP tensors do not fit the port's layer: {e}") from e
    keep = getattr(model, "cast_predicate", None)
    dtype = getattr(mx, loaded.dtype)

    def cast(path: str, x: Any) -> Any:
        if not mx.issubdtype(x.dtype, mx.floating):
            return x
        if dtype != mx.float32 and keep is not None and not keep(path):
            return x
        return x.astype(dtype)

    from mlx.utils import tree_map_with_path

    head.update(tree_map_with_path(cast, head.parameters()))
    mx.eval(head.parameters())
    head.eval()
    return head


def _mtp_tensors(checkpoint_dir: Path, layer: int) -> dict[str, Any]:
    """Every ``model.layers.{layer}.*`` tensor, prefix stripped, read with ``mx.load``."""
    import mlx.core as mx

    from references.checkpoint_io import weight_files

    prefix = f"model.layers.{layer}."
    files = sorted(
        {p for name, p in weight_files(checkpoint_dir).items() if name.startswith(prefix)}
    )
    if not files:
        raise InputError(f"{checkpoint_dir}: no {prefix}* tensors: the checkpoint has no MTP layer")
    out = {}
    for f in files:
        for name, value in mx.load(str(f)).items():
            if name.startswith(prefix):
                out[name.removeprefix(prefix)] = value
    return out


class MlxMtpModel:
    """An :class:`harness.mtp.MtpModel` over mlx-lm's trunk and the head above."""

    def __init__(self, loaded: MlxLoadedModel, checkpoint_dir: Path, label: str = "mlx") -> None:
        import mlx.core as mx

        self.loaded = loaded
        self.label = label
        self.vocab_size = int(loaded.model.args.vocab_size)
        self._stream = getattr(loaded, "_stream", mx.cpu)  # the backend's device choice
        with mx.stream(self._stream):
            self.head = _build_head(loaded, checkpoint_dir)

    def start(self) -> MlxMtpSession:
        return MlxMtpSession(self)


@dataclass(frozen=True)
class _Snapshot:
    trunk: tuple[Any, ...]
    mtp_offset: int
    tokens: tuple[int, ...]
    pending: Any
    mtp_done: int
    chain: Any


class MlxMtpSession:
    """Trunk caches from ``model.make_cache()``, a ``KVCache`` for the MTP layer."""

    def __init__(self, owner: MlxMtpModel) -> None:
        from mlx_lm.models.cache import KVCache

        self._o = owner
        self._model = owner.loaded.model
        self._cache = self._model.make_cache()
        self._mtp_cache = KVCache()
        self._tokens: list[int] = []
        self._pending: Any = None  # [1, n, hidden] trunk hiddens awaiting their next token
        self._mtp_done = 0
        self._chain: Any = None  # (last MTP block output [1, 1, hidden], tokens + drafts)

    def _logits(self, hidden: Any) -> Any:
        model = self._model
        if model.args.tie_word_embeddings:
            return model.model.word_embeddings.as_linear(hidden)
        return model.lm_head(hidden)

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        import mlx.core as mx

        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("feed needs at least one token")
        with mx.stream(self._o._stream):
            hidden = self._model.model(mx.array([tokens]), cache=self._cache)  # post-norm
            logits = self._logits(hidden)
            pending = (
                hidden if self._pending is None else mx.concatenate([self._pending, hidden], axis=1)
            )
            mx.eval(logits, pending, [c.state for c in self._cache])
        self._tokens += tokens
        self._pending = pending
        return _numpy(logits)

    def _head(self, hidden: Any, ids: list[int]) -> tuple[Any, Any]:
        import mlx.core as mx
        from mlx_lm.models.base import create_attention_mask

        head, model = self._o.head, self._model
        e = head.enorm(model.model.word_embeddings(mx.array([ids])))
        u = head.eh_proj(mx.concatenate([e, head.hnorm(hidden)], axis=-1))
        mask = create_attention_mask(u, self._mtp_cache, return_array=True)
        y = head.block(u, mask, self._mtp_cache)
        logits = self._logits(head.final_layernorm(y))
        mx.eval(y, logits, self._mtp_cache.state)
        return y, logits

    def draft(self, next_token: int) -> np.ndarray:
        import mlx.core as mx

        if not self._tokens:
            raise ValueError("draft needs at least one fed token")
        c = self._mtp_cache
        c.trim(c.offset - self._mtp_done)  # drop what chained drafts added
        known = (*self._tokens, int(next_token))
        start, stop = self._mtp_done, len(self._tokens)
        with mx.stream(self._o._stream):
            y, logits = self._head(self._pending, list(known[start + 1 : stop + 1]))
        self._pending, self._mtp_done = None, stop
        self._chain = (y[:, -1:], known)
        return _numpy(logits)[-1]

    def draft_chain(self, token: int) -> np.ndarray:
        import mlx.core as mx

        if self._chain is None:
            raise ValueError("draft_chain needs a draft() first")
        hidden, known = self._chain
        known = (*known, int(token))
        with mx.stream(self._o._stream):
            y, logits = self._head(hidden, [int(token)])
        self._chain = (y, known)
        return _numpy(logits)[-1]

    def snapshot(self) -> _Snapshot:
        """KVCache offsets (rolled back by ``trim``) and the GLA state arrays, which mlx-lm
        replaces rather than writes in place."""
        trunk = tuple(
            c.offset if hasattr(c, "offset") else (list(c.cache), c.left_padding, c.lengths)
            for c in self._cache
        )
        return _Snapshot(
            trunk,
            self._mtp_cache.offset,
            tuple(self._tokens),
            self._pending,
            self._mtp_done,
            self._chain,
        )

    def restore(self, snap: _Snapshot) -> None:
        for c, saved in zip(self._cache, snap.trunk, strict=True):
            if isinstance(saved, int):
                c.trim(c.offset - saved)
            else:
                cache, c.left_padding, c.lengths = saved
                c.cache = list(cache)
        self._mtp_cache.trim(self._mtp_cache.offset - snap.mtp_offset)
        self._tokens = list(snap.tokens)
        self._pending = snap.pending
        self._mtp_done = snap.mtp_done
        self._chain = snap.chain


def _numpy(x: Any) -> np.ndarray:
    import mlx.core as mx

    return np.array(x.astype(mx.float32), copy=True).astype(np.float64)[0]
