"""The out-of-process llama.cpp worker: ``python -m harness.llamacpp.worker``.

A port under test can abort (GGML_ASSERT), segfault or spin inside llama.cpp, and any of those
would take the test process down with it, so llama.cpp only ever runs in this child.  The
parent (:mod:`harness.llamacpp.client`) turns a dead or silent child into a ``PortFailure``.

Protocol: one JSON object per line on stdin, one JSON reply per line on a private copy of the
original stdout (fd 1 itself is pointed at stderr, so a stray ``printf`` in C code cannot corrupt
the channel).  Arrays travel as ``.npz`` files written into ``workdir`` (given by the parent);
the reply names the file and maps the npz keys back to tensor names.

Requests (``op``):

- ``load``: ``{"model": path, "params": {...ContextParams...}}`` -> model facts.
- ``feed``: ``{"tokens": [...], "wanted": [...]}`` -> npz with the wanted tensors (keyed by
  llama.cpp name, last occurrence per graph) and ``logits`` for every fed position, plus
  ``graph_names``: every node name the graph offered (for name maps and debugging).
- ``reset``: clear the KV cache and recurrent state; the next feed starts at position 0.
- ``_sleep`` / ``_crash``: test hooks that simulate a hang and a native crash.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

_KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}
_LOG_DEBUG, _LOG_CONT = 1, 5  # enum ggml_log_level


THREADS_ENV = "BAILING_PARITY_THREADS"  # the default thread count, when set

class WorkerError(Exception):
    """A request failed in a way the worker survived (bad file, decode error); sent as a reply."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class Engine:
    """One llama.cpp model + context driven through llama-cpp-python's low-level API."""

    def __init__(self, workdir: Path) -> None:
        import llama_cpp

        from harness.llamacpp.ggml_ctypes import ggml

        self.ll = llama_cpp
        self.workdir = workdir
        self.model: Any = None
        self.ctx: Any = None
        self.n_past = 0
        self.n_vocab = 0
        self.n_ubatch = 0
        self.wanted: frozenset[str] = frozenset()
        self.graph: dict[str, np.ndarray] = {}
        self.unreadable: dict[str, str] = {}  # wanted names of a type read_tensor cannot convert
        self.graph_names: dict[str, None] = {}  # ordered set of every node name offered
        self.cb_error: BaseException | None = None
        self._seq = 0
        llama_cpp.llama_backend_init()
        self._log = llama_cpp.llama_log_callback(self._log_callback)  # kept alive, as _cb
        self._log_debug = os.environ.get("BAILING_PARITY_LLAMA_LOG") == "debug"
        self._last_level = 0
        llama_cpp.llama_log_set(self._log, None)
        self.ggml = ggml()
        # Kept on self: ctypes frees the thunk when the Python object dies, and llama.cpp would
        # then call freed memory.
        self._cb = llama_cpp.ggml_backend_sched_eval_callback(self._eval_callback)

    # --- callbacks --------------------------------------------------------------------------
    def _log_callback(self, level: int, text: bytes | None, _user: int | None) -> None:
        """llama.cpp/ggml log -> fd 2, DEBUG dropped so the parent's stderr tail shows the error.

        (GGML_ASSERT bypasses the logger and reaches stderr directly.)  Set
        ``BAILING_PARITY_LLAMA_LOG=debug`` to keep the per-tensor load chatter.
        """
        if level != _LOG_CONT:
            self._last_level = level
        if text and (self._log_debug or self._last_level != _LOG_DEBUG):
            os.write(2, text)

    def _eval_callback(self, t: int | None, ask: bool, _user: int | None) -> bool:
        """Ask phase: say yes only for wanted names.  Observe phase: copy the tensor out.

        An exception must not escape into C (ctypes would print it and return False, silently
        cancelling the graph), so it is stored and re-raised after ``llama_decode``.
        """
        try:
            if t is None:
                return True
            name = self.ggml.name(t)
            if ask:
                self.graph_names[name] = None
                return name in self.wanted
            if name in self.wanted:
                try:
                    self.graph[name] = self.ggml.read_tensor(t)[1]  # a repeat: last one wins
                except TypeError as e:  # e.g. a quantised weight view: report, keep computing
                    self.unreadable[name] = str(e)
            return True
        except BaseException as e:  # re-raised by feed(); must not unwind into C
            self.cb_error = e
            return False

    # --- requests ---------------------------------------------------------------------------
    def load(self, model: str, params: dict[str, Any]) -> dict[str, Any]:
        """Load the GGUF and create a context with the given (recorded) parameters."""
        ll = self.ll
        if self.model is not None:
            raise WorkerError("a model is already loaded in this worker", "protocol")
        path = Path(model)
        if not path.is_file():
            raise WorkerError(f"GGUF file not found: {path}", "input")
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = int(params.get("n_gpu_layers", 0))
        mp.load_mtp = bool(params.get("load_mtp", False))
        mp.check_tensors = bool(params.get("check_tensors", True))
        self.model = ll.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise WorkerError(f"llama.cpp could not load {path} (see its log below)", "load")

        cp = self.context_params(params)
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise WorkerError("llama_init_from_model failed (see its log below)", "load")

        vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(vocab)
        self.n_ubatch = ll.llama_n_ubatch(self.ctx)
        return {
            "arch": self._meta("general.architecture"),
            "n_layer": ll.llama_model_n_layer(self.model),
            "n_layer_nextn": ll.llama_model_n_layer_nextn(self.model),
            "n_embd": ll.llama_model_n_embd(self.model),
            "n_head": ll.llama_model_n_head(self.model),
            "n_vocab": self.n_vocab,
            "n_ctx": ll.llama_n_ctx(self.ctx),
            "n_batch": ll.llama_n_batch(self.ctx),
            "n_ubatch": self.n_ubatch,
            "n_threads": int(cp.n_threads),
            "type_k": params.get("type_k", "f32"),
            "type_v": params.get("type_v", "f32"),
            "flash_attn": bool(params.get("flash_attn", False)),
            "llama_cpp_version": getattr(self.ll, "__version__", "?"),
            "ggml_lib": str(self.ggml.path),
        }

    def _meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self.ll.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else ""

    def feed(self, tokens: Sequence[int], wanted: Sequence[str]) -> dict[str, Any]:
        """Decode ``tokens`` after everything fed before, logits on for every position.

        Each ``llama_decode`` gets at most ``n_ubatch`` tokens, so that one decode is one graph
        and "last occurrence per name" is well defined; captures of successive graphs are
        concatenated along their outermost non-trivial (token) axis by the parent.
        """
        ll = self.ll
        if self.ctx is None:
            raise WorkerError("feed before load", "protocol")
        tokens = [int(x) for x in tokens]
        if not tokens:
            raise WorkerError("feed needs at least one token", "input")
        bad = [x for x in tokens if not 0 <= x < self.n_vocab]
        if bad:
            raise WorkerError(f"token ids out of range [0, {self.n_vocab}): {bad[:5]}", "input")
        n_ctx = ll.llama_n_ctx(self.ctx)
        if self.n_past + len(tokens) > n_ctx:
            raise WorkerError(
                f"{self.n_past} + {len(tokens)} tokens exceed the context n_ctx={n_ctx}", "input"
            )
        self.wanted = frozenset(wanted)
        self.graph_names = {}
        self.unreadable = {}
        chunks: list[dict[str, np.ndarray]] = []
        logits = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        for start in range(0, len(tokens), self.n_ubatch):
            part = tokens[start : start + self.n_ubatch]
            self.graph, self.cb_error = {}, None
            rc = self.decode(part)
            if self.cb_error is not None:
                err = "".join(traceback.format_exception(self.cb_error))
                raise WorkerError(f"eval callback failed:\n{err}", "callback")
            if rc != 0:
                raise WorkerError(f"llama_decode returned {rc} at position {self.n_past}", "decode")
            for i in range(len(part)):
                ptr = ll.llama_get_logits_ith(self.ctx, i)
                if not ptr:
                    raise WorkerError(f"no logits for batch row {i}", "decode")
                logits[start + i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
            self.n_past += len(part)
            chunks.append(self.graph)
        return self._write(chunks, logits)

    def context_params(self, params: dict[str, Any]) -> Any:
        """``llama_context_params`` from a :class:`ContextParams` record: one sequence, the
        parity-first defaults, this engine's eval callback (every context it makes captures)."""
        ll = self.ll
        # default: every core, or the share the parent was given (pytest-xdist workers)
        n_threads = int(params.get("n_threads") or os.environ.get(THREADS_ENV)
                        or os.cpu_count() or 1)
        cp = ll.llama_context_default_params()
        cp.n_ctx = int(params.get("n_ctx", 512))
        cp.n_batch = int(params.get("n_batch", cp.n_ctx))
        cp.n_ubatch = int(params.get("n_ubatch", cp.n_batch))
        cp.n_seq_max = 1
        cp.n_rs_seq = int(params.get("n_rs_seq", 0))
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.type_k = _KV_TYPES[params.get("type_k", "f32")]
        cp.type_v = _KV_TYPES[params.get("type_v", "f32")]
        cp.flash_attn_type = (
            ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if params.get("flash_attn", False)
            else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cp.embeddings = False
        cp.no_perf = True
        cp.cb_eval = self._cb
        cp.cb_eval_user_data = None
        return cp

    def decode(self, tokens: Sequence[int]) -> int:
        """``llama_decode`` of one batch at positions n_past.., sequence 0, logits for every
        row; the return code (n_past is the caller's to advance)."""
        ll = self.ll
        batch = ll.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, tok in enumerate(tokens):
                batch.token[i] = tok
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = len(tokens)
            return int(ll.llama_decode(self.ctx, batch))
        finally:
            ll.llama_batch_free(batch)

    def _write(self, chunks: list[dict[str, np.ndarray]], logits: np.ndarray) -> dict[str, Any]:
        """Save one npz: the logits and, per name, one array per graph (keys listed in order)."""
        self._seq += 1
        path = self.workdir / f"feed-{os.getpid()}-{self._seq}.npz"
        arrays: dict[str, np.ndarray] = {"logits": logits}
        keys: dict[str, list[str]] = {}
        for chunk in chunks:
            for name, arr in chunk.items():
                key = f"t{len(arrays)}"
                arrays[key] = arr
                keys.setdefault(name, []).append(key)
        np.savez(path, **arrays)
        return {
            "npz": str(path),
            "keys": keys,
            "n_graphs": len(chunks),
            "graph_names": list(self.graph_names),
            "unreadable": self.unreadable,
            "n_past": self.n_past,
        }

    def reset(self) -> dict[str, Any]:
        """Forget the sequence: KV cache and recurrent state cleared, position back to 0."""
        if self.ctx is not None:
            self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)
        self.n_past = 0
        return {"n_past": 0}

    def close(self) -> None:
        if self.ctx is not None:
            self.ll.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            self.ll.llama_model_free(self.model)
            self.model = None


def _crash(how: str) -> None:
    """Test hook: die the way a broken port does."""
    sys.stderr.write(f"worker: simulated crash ({how})\n")
    sys.stderr.flush()
    if how == "segv":
        ctypes.string_at(0)
    os.abort()


class _Closable(Protocol):
    def close(self) -> None: ...


E = TypeVar("E", bound=_Closable)


def serve_requests(
    inp: Any,
    out: Any,
    make_engine: Callable[[], E],
    handle: Callable[[E, str, dict[str, Any]], dict[str, Any]],
) -> None:
    """The protocol loop every worker child shares: one JSON request per line, one JSON reply per
    request, until EOF or ``{"op": "close"}``.  ``_sleep`` and ``_crash`` are test hooks (a hang,
    an abort or a segfault, as a broken port does); the engine is made on the first real request
    and ``handle(engine, op, request)`` answers it.  A WorkerError or any other exception becomes
    an error reply: the child survives, the parent decides what it means."""
    engine: E | None = None

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    for line in inp:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "close":
                reply({"ok": True})
                break
            if op == "_sleep":
                time.sleep(float(req.get("seconds", 3600)))
                reply({"ok": True})
                continue
            if op == "_crash":
                _crash(str(req.get("how", "abort")))
            if engine is None:
                engine = make_engine()
            reply({"ok": True, **handle(engine, str(op), req)})
        except WorkerError as e:
            reply({"ok": False, "kind": e.kind, "error": str(e)})
        except Exception as e:
            reply(
                {"ok": False, "kind": "exception", "error": "".join(traceback.format_exception(e))}
            )
    if engine is not None:
        engine.close()


def _handle(engine: Engine, op: str, req: dict[str, Any]) -> dict[str, Any]:
    if op == "load":
        return engine.load(req["model"], req.get("params", {}))
    if op == "feed":
        return engine.feed(req["tokens"], req.get("wanted", []))
    if op == "reset":
        return engine.reset()
    raise WorkerError(f"unknown op {op!r}", "protocol")


def serve(inp: Any, out: Any, workdir: Path) -> None:
    """Answer capture requests (load, feed, reset) until EOF or close."""
    serve_requests(inp, out, lambda: Engine(workdir), _handle)


def run_child(serve_fn: Callable[[Any, Any, Path], None]) -> int:
    """A child's entry point: the protocol on a private copy of fd 1, and fd 1 itself redirected
    to stderr, so whatever llama.cpp or Python prints cannot corrupt the protocol.

    The child never outlives the harness: it is killed when its parent dies (SIGKILL
    included), and it ends when its stdin closes; Ctrl-C is the parent's to handle.
    """
    from harness.core import lifecycle

    lifecycle.die_with_parent()
    lifecycle.ignore_terminal_interrupts()
    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve_fn(sys.stdin, proto, workdir)
    return 0


def main() -> int:
    return run_child(serve)


if __name__ == "__main__":
    raise SystemExit(main())
