"""The MTP head for the MLX backend (Ling-2.6 and Ling 3.0), built from the loaded module's layers.

Both families' mlx-lm modules drop the MTP layer ``model.layers.{L}`` (L = num_hidden_layers):
Ling-2.6's ``bailing_hybrid.sanitize`` and Ling 3.0's ``bailing_moe_v3.sanitize``
(``_is_mtp_weight``).  So the head is assembled here: ``enorm``/``hnorm``/``final_layernorm`` are
``nn.RMSNorm``, ``eh_proj`` an ``nn.Linear``, and the block is the module's own decoder layer at
index L -- ``DecoderLayer(args, L)`` for Ling-2.6, ``BailingDecoderLayer(args, L)`` for Ling 3.0
(:class:`_Layout`) -- which by the layer rule's tail clause is MLA + MoE (Ling 3.0's MLA carries
the head-wise sigmoid gate ``g_proj``, its router the expert bias, its MoE the shared experts).
Whether there is a head is read from config.json: Ling 3.0's ModelArgs has no
``num_nextn_predict_layers``.

The tensors are read with ``mx.load`` and converted by the module's own ``sanitize`` (experts
stacked into ``switch_mlp``, ``kv_b_proj`` split into ``embed_q``/``unembed_out``, Ling-2.6's
``mlp.gate.weight`` renamed ``mlp.gate.gate_proj.weight``).  For that call they are renamed to the
last trunk layer, an index sanitize keeps and converts in both families (``bailing_moe_v3`` stacks
experts only from ``first_k_dense_replace`` on, so layer 0 would stay unstacked).  The trunk runs
through the module's ``model.model`` (post-norm hidden) and its caches (``KVCache`` for MLA,
``ArraysCache`` for the GLA/KDA state), so only the head is ours:

    u = eh_proj [enorm(Embed(t+1)) ; hnorm(hidden_t)];  logits = lm_head(final_layernorm(block(u)))

with the block at position t and its own ``KVCache``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.backends.base import BackendOptions
from harness.backends.mlx_backend import MlxBackend
from harness.backends.mlx_ling3 import MlxLing3LoadedModel
from harness.backends.mlx_model import MlxLoadedModel
from harness.core.errors import InputError, PortFailure, port_boundary

_HEAD_OWN = ("enorm.", "hnorm.", "eh_proj.", "final_layernorm.")


@dataclass(frozen=True)
class _Layout:
    """What differs between the families' MLX modules as far as the MTP block is concerned."""

    layer_class: str  # the decoder layer, constructed as ``cls(args, layer_index)``
    is_mla: Callable[[Any], bool]  # read off the attribute the layer rule sets


_LING26 = _Layout("DecoderLayer", lambda layer: bool(getattr(layer, "is_global", True)))
_LING3 = _Layout("BailingDecoderLayer", lambda layer: not getattr(layer, "is_linear", False))


def _layout(loaded: MlxLoadedModel) -> _Layout:
    """Ling 3.0 loads as :class:`MlxLing3LoadedModel` (``bailing_moe_v3`` or a port like it)."""
    return _LING3 if isinstance(loaded, MlxLing3LoadedModel) else _LING26


def load_mlx_mtp(checkpoint_dir: Path, options: BackendOptions, label: str = "mlx") -> MlxMtpModel:
    """The MLX backend's model (mlx-lm or the user's port) plus an MTP head from the checkpoint."""
    loaded = MlxBackend().load(Path(checkpoint_dir), options)
    return MlxMtpModel(loaded, Path(checkpoint_dir), label)


def _check_nextn(loaded: MlxLoadedModel, checkpoint_dir: Path) -> None:
    """config.json must announce an MTP layer; the module's ModelArgs may not keep the key."""
    path = checkpoint_dir / "config.json"
    value = loaded.config.get("num_nextn_predict_layers")
    if value is None:
        value = getattr(loaded.model.args, "num_nextn_predict_layers", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{path}: num_nextn_predict_layers must be an integer >= 0, got {value!r}")
    if value == 0:
        raise InputError(f"{path}: num_nextn_predict_layers is 0: no MTP head to load")


def _build_head(loaded: MlxLoadedModel, checkpoint_dir: Path) -> Any:
    """The head module, its tensors loaded strictly and cast as the trunk's were."""
    import mlx.core as mx
    import mlx.nn as nn

    _check_nextn(loaded, checkpoint_dir)
    model, layout = loaded.model, _layout(loaded)
    args = model.args
    n = int(args.num_hidden_layers)
    layer_class = getattr(sys.modules[loaded.module], layout.layer_class, None)
    if layer_class is None:
        raise PortFailure(f"{loaded.module}: no {layout.layer_class} class to build the MTP block")

    class MtpHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h, eps = args.hidden_size, args.rms_norm_eps
            self.enorm = nn.RMSNorm(h, eps=eps)
            self.hnorm = nn.RMSNorm(h, eps=eps)
            self.eh_proj = nn.Linear(2 * h, h, bias=False)
            self.final_layernorm = nn.RMSNorm(h, eps=eps)
            self.block = layer_class(args, n)

    block = f"{layout.layer_class}(args, {n})"
    with port_boundary(f"{loaded.module}:", f"{block} failed"):
        head = MtpHead()
    if not layout.is_mla(head.block):
        raise PortFailure(f"{loaded.module}: {block} is not MLA")
    weights = _head_weights(loaded, checkpoint_dir, n)
    try:
        head.load_weights(weights, strict=True)
    except ValueError as e:
        raise PortFailure(f"{loaded.module}: MTP tensors do not fit {block}: {e}") from e
    _cast_head(head, model, getattr(mx, loaded.dtype))
    head.eval()
    return head


def _head_weights(loaded: MlxLoadedModel, checkpoint_dir: Path, n: int) -> list[tuple[str, Any]]:
    """(head parameter path, array) for the MTP layer, converted by the module's ``sanitize``
    under the last trunk layer's name (module doc)."""
    weights = _mtp_tensors(checkpoint_dir, n)
    missing = [f"model.layers.{n}.{p}weight" for p in _HEAD_OWN if f"{p}weight" not in weights]
    if missing:
        raise InputError(f"{checkpoint_dir}: missing MTP tensor(s) {', '.join(missing)}")
    proxy = f"model.layers.{n - 1}."
    with port_boundary(f"{loaded.module}:", "sanitize failed on the MTP tensors"):
        sanitized = loaded.model.sanitize({proxy + k: v for k, v in weights.items()})
    items = []
    for key, value in sanitized.items():
        rest = key.removeprefix(proxy)
        items.append((rest if rest.startswith(_HEAD_OWN) else f"block.{rest}", value))
    return items


def _cast_head(head: Any, model: Any, dtype: Any) -> None:
    """Cast float parameters; below float32 keep what the module's ``cast_predicate`` protects."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    keep = getattr(model, "cast_predicate", None)

    def cast(path: str, x: Any) -> Any:
        if not mx.issubdtype(x.dtype, mx.floating):
            return x
        if dtype != mx.float32 and keep is not None and not keep(path):
            return x
        return x.astype(dtype)

    head.update(tree_map_with_path(cast, head.parameters()))
    mx.eval(head.parameters())


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
    """An :class:`harness.checks.mtp.MtpModel` over mlx-lm's trunk and the head above."""

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

    def capture(self, tokens: Sequence[int]) -> dict[str, np.ndarray]:
        """Teacher forcing: the trunk on ``tokens``, the head on positions 0..T-2; the glue's
        mtp_* points and the trunk's ``result_output``."""
        import mlx.core as mx

        tokens = [int(t) for t in tokens]
        if len(tokens) < 2:
            raise InputError("MTP capture needs at least two tokens")
        session = self.start()
        logits = session.feed(tokens)
        record: dict[str, Any] = {}
        with mx.stream(self._stream):
            session._head(session._pending[:, :-1], tokens[1:], record)
        out = {name: _numpy(value) for name, value in record.items()}
        out["result_output"] = logits
        return out


@dataclass(frozen=True)
class _Snapshot:
    trunk: tuple[Any, ...]
    mtp_offset: int
    tokens: tuple[int, ...]
    pending: Any
    mtp_done: int
    chain: Any


def _save_cache(c: Any) -> Any:
    """A trimmable cache (``KVCache``) rolls back by ``trim``, so its offset is enough; an
    ``ArraysCache`` (GLA/KDA conv and recurrent state) gets new arrays on every step, so keeping
    the current ones is an exact copy -- only the list and in-place-updated lengths are copied."""
    import mlx.core as mx

    if c.is_trimmable():
        return c.offset
    left, lengths = (None if x is None else mx.array(x) for x in (c.left_padding, c.lengths))
    return list(c.cache), left, lengths


def _load_cache(c: Any, saved: Any) -> None:
    """Undo what was fed since :func:`_save_cache`."""
    if isinstance(saved, int):
        c.trim(c.offset - saved)
    else:
        cache, c.left_padding, c.lengths = saved
        c.cache = list(cache)


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

    def _head(
        self, hidden: Any, ids: list[int], record: dict[str, Any] | None = None
    ) -> tuple[Any, Any]:
        """The head on ``hidden`` [1, n, h] with next tokens ``ids``; ``record`` collects the
        mtp_* points the glue exposes (the block is the module's own, so not its insides)."""
        import mlx.core as mx
        from mlx_lm.models.base import create_attention_mask

        head, model = self._o.head, self._model
        rec = record if record is not None else {}
        e = head.enorm(model.model.word_embeddings(mx.array([ids])))
        hn = head.hnorm(hidden)
        u = head.eh_proj(mx.concatenate([e, hn], axis=-1))
        mask = create_attention_mask(u, self._mtp_cache, return_array=True)
        y = head.block(u, mask, self._mtp_cache)
        normed = head.final_layernorm(y)
        logits = self._logits(normed)
        rec.update(mtp_enorm=e, mtp_hnorm=hn, mtp_eh_proj=u, mtp_l_out=y,
                   mtp_result_norm=normed, mtp_result_output=logits)
        mx.eval(y, logits, self._mtp_cache.state, *rec.values())
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
        """Trunk caches (:func:`_save_cache`), the MTP cache's offset and the session's own
        bookkeeping (all immutable or replaced, never written in place)."""
        return _Snapshot(
            tuple(_save_cache(c) for c in self._cache),
            self._mtp_cache.offset,
            tuple(self._tokens),
            self._pending,
            self._mtp_done,
            self._chain,
        )

    def restore(self, snap: _Snapshot) -> None:
        for c, saved in zip(self._cache, snap.trunk, strict=True):
            _load_cache(c, saved)
        self._mtp_cache.trim(self._mtp_cache.offset - snap.mtp_offset)
        self._tokens = list(snap.tokens)
        self._pending = snap.pending
        self._mtp_done = snap.mtp_done
        self._chain = snap.chain


def _numpy(x: Any) -> np.ndarray:
    import mlx.core as mx

    return np.array(x.astype(mx.float32), copy=True).astype(np.float64)[0]
