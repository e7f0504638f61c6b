"""Speculative MTP decoding through llama.cpp: a :class:`harness.checks.mtp.MtpModel` in a child
process.

:func:`harness.backends.llamacpp_mtp.load_llamacpp_mtp` converts and inventories the checkpoint as
the llama.cpp backend does, then starts ``python -m harness.llamacpp.mtp`` (this module) with two
contexts on one model: the trunk (``embeddings_nextn`` on: the post-norm hidden h_t of every
position) and the MTP head (``ctx_type = LLAMA_CONTEXT_TYPE_MTP``, ``ctx_other`` = trunk).  The
child is driven the way upstream's ``draft-mtp`` (``common/speculative.cpp``) drives them (also
by :meth:`LlamaCppMtpModel.capture_calls`, which captures the mtp_* points per MTP batch):

- MTP entry t is token x_{t+1} with h_t attached (``llama_batch_ext_set_embd_token``), placed at
  the token's position t+1 (a uniform shift; RoPE scores are unchanged);
- ``draft(next_token)`` commits every fed position whose next token is now known in one MTP
  batch (only the last row outputs logits), after trimming the MTP KV cache back to the
  committed entries (``llama_memory_seq_rm``: the chained entries of the previous step go);
- ``draft_chain(token)`` adds one entry at the next position, reusing a hidden of the head's own
  last row: ``mtp_chain=nextn`` (default) takes ``llama_get_embeddings_nextn_ith`` as
  upstream's draft-mtp does (for this port: *after* the MTP block's final_layernorm);
  ``mtp_chain=l_out`` takes the block output before that norm (the ``mtp_l_out`` capture), which
  is what the reference (``references/mtp_session.py``) and vLLM chain on.

Undo, two ways (option ``mtp_rollback``):

- ``state`` (default): ``snapshot()`` copies the trunk sequence (``llama_state_seq_get_data``: MLA
  latent cells + recurrent states) into the child's memory and ``restore()`` clears the sequence
  and writes it back (``llama_state_seq_set_data``): bit-exact, a memcpy of the sequence's state
  per verification step, for any build.  Snapshots are freed in the child when their Python object
  is collected.
- ``seq_rm`` (llama-server's way): the trunk context gets ``n_rs_seq`` rollback planes
  (``mtp_rs_seq``, default 8; upstream ``bailingmoe3`` and our port keep per-token recurrent states
  for them) and nothing is copied.  ``restore()`` waits for the next ``feed``, which must be a
  prefix of the batch fed after the snapshot (the verified token and its accepted drafts): the
  child drops the rest in place (``llama_memory_seq_rm``) and the prefix keeps the logits and
  hiddens that batch computed.  A build whose architecture has no rollback planes is refused.

The MTP cache needs no copy either way: entries after the snapshot are trimmed at the next draft.

Everything that talks to llama.cpp runs in the child; an abort, segfault or hang there is a
:class:`harness.core.errors.PortFailure` (:class:`harness.llamacpp.client.WorkerClient`).
"""

from __future__ import annotations

import ctypes
import os
import traceback
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.errors import InputError
from harness.llamacpp.client import WorkerClient
from harness.llamacpp.known_ports import port_for_arch
from harness.llamacpp.names import mtp_to_canonical, mtp_wanted
from harness.llamacpp.worker import Engine, WorkerError, run_child, serve_requests

# staging API of src/llama-ext.h: declared without extern "C", so exported C++-mangled
_SYM_SET_NEXTN = "_Z26llama_set_embeddings_nextnP13llama_contextbb"
_SYM_GET_NEXTN_ITH = "_Z30llama_get_embeddings_nextn_ithP13llama_contexti"


# ============================================================================================
# Parent side


class MtpWorkerClient(WorkerClient):
    """A :class:`WorkerClient` whose child is this module's MTP server (same protocol and
    failure handling: crash, hang or error reply -> PortFailure)."""

    def __init__(
        self,
        *,
        timeout: float = 300.0,
        load_timeout: float = 900.0,
        env: dict[str, str] | None = None,
        site: Path | None = None,
        label: str = "llama.cpp MTP",
    ) -> None:
        super().__init__(timeout=timeout, load_timeout=load_timeout, env=env, site=site,
                         label=label, module="harness.llamacpp.mtp")
        self._seq = 0

    @property
    def workdir(self) -> Path:
        return self._workdir

    def input_file(self, **arrays: np.ndarray) -> str:
        """Write arrays for the child into the shared work dir (the child deletes the file)."""
        self._seq += 1
        path = self._workdir / f"in-{self._seq}.npz"
        np.savez(path, **arrays)
        return str(path)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    p = Path(path)
    try:
        with np.load(p) as npz:
            return {k: npz[k] for k in npz.files}
    finally:
        p.unlink(missing_ok=True)


class LlamaCppMtpModel:
    """The trunk and MTP contexts in a child; one live session at a time (start() resets)."""

    def __init__(
        self,
        client: MtpWorkerClient,
        info: dict[str, Any],
        gguf: Path,
        chain: str,
        label: str,
        findings: list[str],
    ) -> None:
        self.client = client
        self.info = info
        self.gguf = gguf
        self.chain_hidden = chain
        self.label = label
        self.findings = findings
        self.vocab_size = int(info["n_vocab"])
        self.n_embd = int(info["n_embd"])
        self.rs_seq = int(info.get("n_rs_seq") or 0)  # > 0: undo by in-place rollback
        self._generation = 0
        self._drops: list[int] = []  # snapshot ids collected in the parent, freed in the child
        self.snapshot_bytes = 0  # size of the last trunk snapshot (the cost of one undo point)
        self.snapshots_held = 0  # trunk snapshots the child held after the last save
        weakref.finalize(self, client.close)

    def request(self, req: dict[str, Any], doing: str) -> dict[str, Any]:
        if self._drops:  # the list object stays: finalizers hold its append
            req["drop"] = list(self._drops)
            self._drops.clear()
        return self.client.request(req, doing=doing)

    def start(self) -> LlamaCppMtpSession:
        self.request({"op": "reset"}, "resetting both contexts")
        self._generation += 1
        return LlamaCppMtpSession(self, self._generation)

    def describe(self) -> dict[str, Any]:
        return {"gguf": str(self.gguf), "mtp_chain": self.chain_hidden, **self.info}

    def capture(self, tokens: Sequence[int]) -> dict[str, np.ndarray]:
        """Teacher forcing: the trunk on ``tokens``, then the MTP entries of positions 0..T-2 in
        one batch; the canonical mtp_* points this port's graph names (its name map's ``mtp``
        table), ``mtp_result_output`` and the trunk's ``result_output``."""
        return self.capture_calls(tokens)[0]

    def capture_calls(
        self, prompt: Sequence[int], decode: Sequence[int] = ()
    ) -> list[dict[str, np.ndarray]]:
        """As serving runs the head: one MTP batch for the prompt's positions 0..T-2 (with the
        trunk's ``result_output``), then per ``decode`` token one entry for the position it
        completes, the trunk fed that token after it.  Canonical captures per MTP call; starts
        a new session and leaves a fresh one."""
        prompt = [int(t) for t in prompt]
        if len(prompt) < 2:
            raise InputError("MTP capture needs a prompt of at least two tokens")
        try:
            port = port_for_arch(str(self.info["arch"]))
        except KeyError as e:
            raise InputError(str(e)) from None
        layer = int(self.info["n_layer"])
        wanted = sorted(mtp_wanted(port, layer))
        session = self.start()

        def call(tokens: list[int], hidden: np.ndarray, pos0: int) -> dict[str, np.ndarray]:
            path = self.client.input_file(hidden=np.ascontiguousarray(hidden, dtype=np.float32))
            req = {"op": "mtp", "tokens": tokens, "hidden": path, "pos0": pos0, "keep": None,
                   "wanted": wanted, "all_rows": True}
            out = _read_npz(self.request(req, f"MTP capture at position {pos0 - 1}")["npz"])
            raw = {k.removeprefix("cap__"): v for k, v in out.items() if k.startswith("cap__")}
            caps = mtp_to_canonical(port, raw, layer, len(tokens))
            caps["mtp_result_output"] = out["logits"].astype(np.float64)
            return caps

        trunk_logits = session.feed(prompt)
        assert session._pending is not None
        calls = [call(prompt[1:], session._pending[:-1], 1)]  # entry t at token position t+1
        calls[0]["result_output"] = trunk_logits
        for i, tok in enumerate(int(t) for t in decode):
            calls.append(call([tok], session._pending[-1:], len(prompt) + i))
            session.feed([tok])
        self.start()  # the capture's positions are not a speculative session's
        return calls

    def close(self) -> None:
        self.client.close()


class _Snapshot:
    """An undo point: a trunk state held by the child, plus the parent's bookkeeping."""

    def __init__(
        self,
        sid: int,
        tokens: tuple[int, ...],
        pending: np.ndarray | None,
        mtp_done: int,
        chain: tuple[np.ndarray, tuple[int, ...]] | None,
    ) -> None:
        self.sid, self.tokens, self.pending = sid, tokens, pending
        self.mtp_done, self.chain = mtp_done, chain


class LlamaCppMtpSession:
    """One sequence: positions, the trunk hiddens the head still needs, the chaining state."""

    def __init__(self, model: LlamaCppMtpModel, generation: int) -> None:
        self._m = model
        self._generation = generation
        self._tokens: list[int] = []
        self._pending: np.ndarray | None = None  # [n, n_embd] hiddens of mtp_done..len-1
        self._mtp_done = 0  # positions committed to the MTP cache
        self._chain: tuple[np.ndarray, tuple[int, ...]] | None = None
        # mtp_rollback=seq_rm: the last trunk batch (start, tokens, logits, hiddens) and an undo
        # that waits for the feed of the batch's kept prefix (see restore)
        self._last: tuple[int, list[int], np.ndarray, np.ndarray] | None = None
        self._undo: _Snapshot | None = None

    def _check(self) -> None:
        if self._generation != self._m._generation:
            raise RuntimeError("this llama.cpp MTP session was superseded by a later start()")

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        self._check()
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("feed needs at least one token")
        if self._undo is not None:
            return self._keep_prefix(tokens)
        start = len(self._tokens)
        r = self._m.request(
            {"op": "feed", "tokens": tokens},
            f"decoding {len(tokens)} trunk token(s) at position {len(self._tokens)}",
        )
        out = _read_npz(r["npz"])
        hidden = out["hidden"]
        self._tokens += tokens
        self._pending = hidden if self._pending is None else np.concatenate([self._pending, hidden])
        logits = out["logits"].astype(np.float64)
        self._last = (start, tokens, logits, hidden)
        return logits

    def _keep_prefix(self, tokens: list[int]) -> np.ndarray:
        """After a deferred restore: ``tokens`` must be a prefix of the batch fed after the
        snapshot (the verified token and its accepted drafts); the child drops the rest in place
        and the prefix's logits and hiddens are the ones that batch computed, as llama-server
        keeps them."""
        snap, self._undo = self._undo, None
        assert snap is not None
        start = len(snap.tokens)
        last = self._last
        if last is None or last[0] != start or last[1][: len(tokens)] != tokens:
            raise RuntimeError(
                "mtp_rollback=seq_rm: after restore() the next feed must be a prefix of the batch "
                "fed after the snapshot (llama-server's pattern); use mtp_rollback=state otherwise"
            )
        self._m.request(
            {"op": "rollback", "keep_to": start + len(tokens)},
            f"rolling back {len(last[1]) - len(tokens)} trunk token(s) to position "
            f"{start + len(tokens)}",
        )
        n = len(tokens)
        hidden = last[3][:n]
        self._tokens += tokens
        self._pending = hidden if self._pending is None else np.concatenate([self._pending, hidden])
        self._last = (start, tokens, last[2][:n], hidden)
        return last[2][:n]

    def _head(
        self, ids: list[int], hidden: np.ndarray, pos0: int, keep: int | None, doing: str
    ) -> tuple[np.ndarray, np.ndarray]:
        m = self._m
        path = m.client.input_file(hidden=np.ascontiguousarray(hidden, dtype=np.float32))
        r = m.request(
            {"op": "mtp", "tokens": ids, "hidden": path, "pos0": pos0, "keep": keep}, doing
        )
        out = _read_npz(r["npz"])
        return out["logits"].astype(np.float64), out["chain"]

    def draft(self, next_token: int) -> np.ndarray:
        self._check()
        if not self._tokens:
            raise ValueError("draft needs at least one fed token")
        start, stop = self._mtp_done, len(self._tokens)
        if self._pending is None or len(self._pending) != stop - start:
            raise ValueError("draft needs tokens fed since the last draft")
        known = (*self._tokens, int(next_token))
        ids = list(known[start + 1 : stop + 1])
        # entry t sits at token position t+1: keep entries 0..start-1, i.e. positions <= start
        logits, chain = self._head(
            ids,
            self._pending,
            start + 1,
            start + 1,
            f"MTP draft for positions {start}..{stop - 1}",
        )
        self._pending, self._mtp_done = None, stop
        self._chain = (chain, known)
        return logits

    def draft_chain(self, token: int) -> np.ndarray:
        self._check()
        if self._chain is None:
            raise ValueError("draft_chain needs a draft() first")
        hidden, known = self._chain
        known = (*known, int(token))
        position = len(known) - 2
        logits, chain = self._head(
            [int(token)],
            hidden[None, :],
            position + 1,
            None,
            f"chained MTP draft at position {position}",
        )
        self._chain = (chain, known)
        return logits

    def snapshot(self) -> _Snapshot:
        self._check()
        m = self._m
        if m.rs_seq:  # undo rolls back in place: nothing to copy
            return _Snapshot(0, tuple(self._tokens), self._pending, self._mtp_done, self._chain)
        r = m.request({"op": "save"}, f"saving the trunk state at position {len(self._tokens)}")
        m.snapshot_bytes, m.snapshots_held = int(r["bytes"]), int(r["held"])
        snap = _Snapshot(
            int(r["id"]), tuple(self._tokens), self._pending, self._mtp_done, self._chain
        )
        weakref.finalize(snap, m._drops.append, snap.sid)
        return snap

    def restore(self, snap: _Snapshot) -> None:
        self._check()
        if self._m.rs_seq:
            self._undo = snap  # carried out by the next feed (_keep_prefix)
        else:
            self._restore_copy(snap)
        self._tokens = list(snap.tokens)
        self._pending = snap.pending
        self._mtp_done = snap.mtp_done
        self._chain = snap.chain

    def _restore_copy(self, snap: _Snapshot) -> None:
        self._m.request(
            {"op": "restore", "id": snap.sid},
            f"restoring the trunk state of position {len(snap.tokens)}",
        )


# ============================================================================================
# Child side: python -m harness.llamacpp.mtp WORKDIR (protocol of harness.llamacpp.worker)


class MtpEngine:
    """The trunk context (from :class:`harness.llamacpp.worker.Engine`) plus an MTP context."""

    def __init__(self, workdir: Path) -> None:
        self.base = Engine(workdir)
        self.ll = self.base.ll
        self.workdir = workdir
        self.ctx_mtp: Any = None
        self.n_embd = 0
        self.chain = "nextn"
        self.states: dict[int, tuple[Any, int, int]] = {}  # id -> (buffer, size, n_past)
        self.rs_seq = 0  # the trunk's rollback planes (0: undo copies the sequence state)
        self._next_id = 0
        self._seq = 0

    def _sym(self, name: str, argtypes: list[Any], restype: Any) -> Any:
        try:
            f = getattr(self.ll.llama_cpp._lib, name)
        except AttributeError:
            raise WorkerError(
                f"libllama lacks {name} (the MTP staging API of src/llama-ext.h)", "load"
            ) from None
        f.argtypes, f.restype = argtypes, restype
        return f

    def load(self, model: str, params: dict[str, Any], chain: str) -> dict[str, Any]:
        ll, base = self.ll, self.base
        if not hasattr(ll, "LLAMA_CONTEXT_TYPE_MTP"):
            raise WorkerError("this llama_cpp has no LLAMA_CONTEXT_TYPE_MTP", "load")
        self.chain = chain
        self.set_nextn = self._sym(
            _SYM_SET_NEXTN, [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool], None
        )
        self.get_nextn_ith = self._sym(
            _SYM_GET_NEXTN_ITH, [ctypes.c_void_p, ctypes.c_int32], ctypes.POINTER(ctypes.c_float)
        )
        info = base.load(model, params)
        self.rs_seq = int(ll.llama_n_rs_seq(base.ctx)) if hasattr(ll, "llama_n_rs_seq") else 0
        if int(params.get("n_rs_seq", 0)) and not self.rs_seq:
            raise WorkerError(
                f"n_rs_seq={params['n_rs_seq']} was clamped to 0: this build's "
                f"{info.get('arch')} has no recurrent rollback snapshots", "load"
            )
        if not info.get("n_layer_nextn"):
            return info
        self.n_embd = int(info["n_embd"])
        cp = base.context_params(params)  # the trunk's sizes, threads, KV types, callback
        cp.ctx_type = ll.LLAMA_CONTEXT_TYPE_MTP
        cp.n_rs_seq = 0  # the head's memory is attention only
        cp.ctx_other = base.ctx
        self.ctx_mtp = ll.llama_init_from_model(base.model, cp)
        if not self.ctx_mtp:
            raise WorkerError("creating the MTP context failed (see its log below)", "load")
        self.set_nextn(base.ctx, True, False)  # h_t of every trunk row
        self.set_nextn(self.ctx_mtp, True, True)
        return {**info, "mtp_chain": chain, "n_rs_seq": self.rs_seq}

    def _out(self, **arrays: np.ndarray) -> dict[str, Any]:
        self._seq += 1
        path = self.workdir / f"mtp-{os.getpid()}-{self._seq}.npz"
        np.savez(path, **arrays)
        return {"npz": str(path)}

    def _decode_error(self) -> None:
        if self.base.cb_error is not None:
            err = "".join(traceback.format_exception(self.base.cb_error))
            raise WorkerError(f"eval callback failed:\n{err}", "callback")

    def feed(self, tokens: list[int]) -> dict[str, Any]:
        """Trunk: logits and the nextn hidden of every fed row."""
        ll, base = self.ll, self.base
        self._require()
        bad = [x for x in tokens if not 0 <= x < base.n_vocab]
        if not tokens or bad:
            raise WorkerError(f"bad trunk tokens (empty or out of range): {bad[:5]}", "input")
        if base.n_past + len(tokens) > ll.llama_n_ctx(base.ctx):
            raise WorkerError(f"{base.n_past} + {len(tokens)} tokens exceed n_ctx", "input")
        base.wanted = frozenset()
        logits = np.empty((len(tokens), base.n_vocab), dtype=np.float32)
        hidden = np.empty((len(tokens), self.n_embd), dtype=np.float32)
        for start in range(0, len(tokens), base.n_ubatch):
            part = tokens[start : start + base.n_ubatch]
            base.cb_error = None
            rc = base.decode(part)
            self._decode_error()
            if rc != 0:
                raise WorkerError(f"trunk llama_decode returned {rc} at {base.n_past}", "decode")
            for i in range(len(part)):
                logits[start + i] = np.ctypeslib.as_array(
                    ll.llama_get_logits_ith(base.ctx, i), shape=(base.n_vocab,)
                )
                h = self.get_nextn_ith(base.ctx, i)
                if not h:
                    raise WorkerError(f"no nextn hidden for trunk row {i}", "decode")
                hidden[start + i] = np.ctypeslib.as_array(h, shape=(self.n_embd,))
            base.n_past += len(part)
        return {**self._out(logits=logits, hidden=hidden), "n_past": base.n_past}

    def mtp(
        self,
        tokens: list[int],
        hidden_path: str,
        pos0: int,
        keep: int | None,
        wanted: Sequence[str] = (),
        all_rows: bool = False,
    ) -> dict[str, Any]:
        """MTP entries (token, hidden) from position pos0; logits + chain hidden of the last.

        ``wanted``: callback names to capture (returned as ``cap__<name>``, rows of every chunk
        concatenated); ``all_rows``: logits of every entry, not only the last."""
        ll, base = self.ll, self.base
        self._require()
        with np.load(hidden_path) as npz:
            rows = np.ascontiguousarray(npz["hidden"], dtype=np.float32)
        Path(hidden_path).unlink(missing_ok=True)
        if rows.shape != (len(tokens), self.n_embd) or not tokens:
            raise WorkerError(f"MTP rows {rows.shape} for {len(tokens)} token(s)", "input")
        if wanted and not all_rows:
            raise WorkerError("MTP captures need all_rows (every entry's row is captured)", "input")
        mem = ll.llama_get_memory(self.ctx_mtp)
        if keep is not None and not ll.llama_memory_seq_rm(mem, 0, keep, -1):
            raise WorkerError(f"MTP cache: llama_memory_seq_rm(0, {keep}, -1) refused", "decode")
        base.wanted = frozenset({*wanted, *(("mtp_l_out",) if self.chain == "l_out" else ())})
        base.graph_names = {}
        logits = chain = None
        logit_rows: list[np.ndarray] = []
        captured: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(tokens), base.n_ubatch):
            part = tokens[start : start + base.n_ubatch]
            base.graph, base.cb_error = {}, None
            batch = ll.llama_batch_ext_init(self.ctx_mtp)
            last = -1
            try:
                for i, tok in enumerate(part):
                    idx = ll.llama_batch_ext_add_token(batch, 0, tok)
                    pos = (ll.llama_pos * 1)(pos0 + start + i)
                    ll.llama_batch_ext_set_pos(batch, idx, pos)
                    data = rows[start + i].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                    if not ll.llama_batch_ext_set_embd_token(
                        batch, idx, ll.llama_embd(data, 1, self.n_embd)
                    ):
                        raise WorkerError("llama_batch_ext_set_embd_token refused", "decode")
                    last = idx
                    if all_rows:
                        ll.llama_batch_ext_set_output_logits(batch, idx, True)
                ll.llama_batch_ext_set_output_logits(batch, last, True)
                rc = ll.llama_process(self.ctx_mtp, ll.LLAMA_PROCESS_TYPE_DECODE, batch)
            finally:
                ll.llama_batch_ext_free(batch)
            self._decode_error()
            if rc != 0:
                raise WorkerError(f"MTP llama_process returned {rc} at {pos0 + start}", "decode")
            logits = np.ctypeslib.as_array(
                ll.llama_get_logits_ith(self.ctx_mtp, last), shape=(base.n_vocab,)
            ).copy()
            if all_rows:
                logit_rows += [
                    np.ctypeslib.as_array(
                        ll.llama_get_logits_ith(self.ctx_mtp, i), shape=(base.n_vocab,)
                    ).copy()
                    for i in range(len(part))
                ]
            for name in wanted:  # token axis outermost: rows of this chunk, then stacked
                if name in base.graph:
                    captured.setdefault(name, []).append(base.graph[name].reshape(len(part), -1))
            if self.chain == "l_out":
                if "mtp_l_out" not in base.graph:
                    raise WorkerError(
                        "mtp_chain=l_out needs the MTP block output before its final norm, which "
                        "this graph does not name (our Ling-2.6 port names it mtp_l_out; "
                        "upstream bailingmoe3 names only h_nextn, after the norm): use "
                        "mtp_chain=nextn",
                        "decode",
                    )
                chain = base.graph["mtp_l_out"].reshape(-1, self.n_embd)[-1].copy()
            else:
                h = self.get_nextn_ith(self.ctx_mtp, last)
                if not h:
                    raise WorkerError("no nextn hidden for the MTP row", "decode")
                chain = np.ctypeslib.as_array(h, shape=(self.n_embd,)).copy()
        assert logits is not None and chain is not None
        caps = {f"cap__{n}": np.concatenate(parts, axis=0) for n, parts in captured.items()}
        if all_rows:
            logits = np.stack(logit_rows)
        return {
            **self._out(logits=logits, chain=chain, **caps),
            "graph_names": list(base.graph_names),
        }

    def save(self) -> dict[str, Any]:
        """Copy the trunk sequence (MLA cells + GLA states) into a buffer kept here."""
        ll, base = self.ll, self.base
        self._require()
        n = int(ll.llama_state_seq_get_size(base.ctx, 0))
        buf = (ctypes.c_uint8 * max(n, 1))()
        written = int(ll.llama_state_seq_get_data(base.ctx, buf, n, 0))
        if written != n:
            raise WorkerError(f"llama_state_seq_get_data wrote {written} of {n} bytes", "state")
        self._next_id += 1
        self.states[self._next_id] = (buf, n, base.n_past)
        return {"id": self._next_id, "bytes": n, "held": len(self.states)}

    def restore(self, sid: int) -> dict[str, Any]:
        ll, base = self.ll, self.base
        self._require()
        if sid not in self.states:
            raise WorkerError(f"no saved state {sid}", "protocol")
        buf, n, n_past = self.states[sid]
        mem = ll.llama_get_memory(base.ctx)
        if not ll.llama_memory_seq_rm(mem, 0, -1, -1):
            raise WorkerError("clearing the trunk sequence failed", "state")
        read = int(ll.llama_state_seq_set_data(base.ctx, buf, n, 0))
        if read != n:
            raise WorkerError(f"llama_state_seq_set_data read {read} of {n} bytes", "state")
        base.n_past = n_past
        return {"n_past": n_past}

    def rollback(self, keep_to: int) -> dict[str, Any]:
        """llama-server's undo: drop the trunk positions from ``keep_to`` on in place
        (``llama_memory_seq_rm``); recurrent layers return to a rollback plane."""
        ll, base = self.ll, self.base
        self._require()
        if not 0 < keep_to <= base.n_past:
            raise WorkerError(f"rollback to {keep_to} outside (0, {base.n_past}]", "input")
        if keep_to < base.n_past:
            mem = ll.llama_get_memory(base.ctx)
            if not ll.llama_memory_seq_rm(mem, 0, keep_to, -1):
                raise WorkerError(
                    f"llama_memory_seq_rm(0, {keep_to}, -1) refused to drop "
                    f"{base.n_past - keep_to} token(s) (n_rs_seq={self.rs_seq})", "state"
                )
            base.n_past = keep_to
        return {"n_past": base.n_past}

    def reset(self) -> dict[str, Any]:
        ll, base = self.ll, self.base
        if self.ctx_mtp is not None:
            ll.llama_memory_clear(ll.llama_get_memory(self.ctx_mtp), True)
        self.states.clear()
        return base.reset()

    def _require(self) -> None:
        if self.ctx_mtp is None:
            raise WorkerError("no model with an MTP context loaded", "protocol")

    def close(self) -> None:
        if self.ctx_mtp is not None:
            self.ll.llama_free(self.ctx_mtp)
            self.ctx_mtp = None
        self.states.clear()
        self.base.close()


def _handle(engine: MtpEngine, op: str, req: dict[str, Any]) -> dict[str, Any]:
    for sid in req.get("drop", ()):  # snapshots the parent has let go of
        engine.states.pop(int(sid), None)
    if op == "load":
        return engine.load(req["model"], req.get("params", {}), req.get("chain", "nextn"))
    if op == "feed":
        return engine.feed([int(t) for t in req["tokens"]])
    if op == "mtp":
        keep = req.get("keep")
        return engine.mtp(
            [int(t) for t in req["tokens"]],
            req["hidden"],
            int(req["pos0"]),
            None if keep is None else int(keep),
            [str(n) for n in req.get("wanted", ())],
            bool(req.get("all_rows", False)),
        )
    if op == "save":
        return engine.save()
    if op == "restore":
        return engine.restore(int(req["id"]))
    if op == "rollback":
        return engine.rollback(int(req["keep_to"]))
    if op == "reset":
        return engine.reset()
    raise WorkerError(f"unknown op {op!r}", "protocol")


def serve(inp: Any, out: Any, workdir: Path) -> None:
    """The worker protocol (:func:`harness.llamacpp.worker.serve_requests`) with the MTP ops."""
    serve_requests(inp, out, lambda: MtpEngine(workdir), _handle)


def main() -> int:
    return run_child(serve)


if __name__ == "__main__":
    raise SystemExit(main())
