"""Child process: the trunk and its MTP head (``LLAMA_CONTEXT_TYPE_MTP``), one request per run.

``python -m ports.llamacpp.mtp_worker REQUEST.json`` (llama_cpp from ``PYTHONPATH``, i.e. a site
from ``build.ensure_site``) writes the ``.npz`` named in the request.  The harness worker does not
drive MTP contexts yet, so this runs the same protocol as llama.cpp's ``draft-mtp`` speculative
driver (``common/speculative.cpp``):

- the trunk context decodes with ``embeddings_nextn`` on and yields the post-norm hidden h_t of
  every position (``llama_get_embeddings_nextn``);
- the MTP context (``ctx_type = MTP``, ``ctx_other`` = trunk) gets one entry per position t whose
  next token is known: token x_{t+1} with h_t attached (``llama_batch_ext_set_embd_token``), at
  the token's position t+1 (a uniform shift: RoPE scores are unchanged);
- first the prompt (entries t = 0..T-2), then one entry per decode step (t = T-1, T, ...), so the
  MTP KV cache carries over as in serving.

Request: ``{"model", "prompt": [...], "decode": [...], "wanted": [...], "n_ctx", "out"}``.  The
npz holds, per MTP call ``k``, ``logits_k`` and ``<name>__k`` for each wanted callback name.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    req = json.loads(Path(sys.argv[1]).read_text())
    import llama_cpp as ll

    from harness.llamacpp.ggml_ctypes import ggml

    g = ggml()
    lib = ll.llama_cpp._lib
    # staging API of src/llama-ext.h: declared without extern "C", so exported C++-mangled
    set_nextn = lib._Z26llama_set_embeddings_nextnP13llama_contextbb
    set_nextn.argtypes = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool]
    set_nextn.restype = None
    get_nextn = lib._Z26llama_get_embeddings_nextnP13llama_context
    get_nextn.argtypes = [ctypes.c_void_p]
    get_nextn.restype = ctypes.POINTER(ctypes.c_float)

    wanted = set(req["wanted"])
    captured: dict[str, np.ndarray] = {}

    def on_eval(t, ask, _ud):
        if t is None:
            return True
        name = g.name(t)
        if ask:
            return name in wanted
        if name in wanted:
            captured[name] = g.read_tensor(t)[1]
        return True

    cb = ll.ggml_backend_sched_eval_callback(on_eval)
    ll.llama_backend_init()
    mp = ll.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.load_mtp = True
    model = ll.llama_model_load_from_file(req["model"].encode(), mp)
    if not model:
        raise SystemExit("model load failed")
    n_embd = ll.llama_model_n_embd(model)
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    n_threads = os.cpu_count() or 1

    def ctx_params(mtp: bool, other=None):
        cp = ll.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = int(req["n_ctx"])
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.type_k = cp.type_v = 0  # f32
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        if mtp:
            cp.ctx_type = ll.LLAMA_CONTEXT_TYPE_MTP
            cp.n_rs_seq = 0
            cp.ctx_other = other
            cp.cb_eval = cb
            cp.cb_eval_user_data = None
        return cp

    ctx = ll.llama_init_from_model(model, ctx_params(False))
    ctx_mtp = ll.llama_init_from_model(model, ctx_params(True, ctx))
    if not ctx or not ctx_mtp:
        raise SystemExit("context creation failed")
    set_nextn(ctx, True, False)
    set_nextn(ctx_mtp, True, True)

    def trunk(tokens: list[int], pos0: int) -> np.ndarray:
        batch = ll.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, tok in enumerate(tokens):
                batch.token[i] = tok
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = len(tokens)
            if ll.llama_decode(ctx, batch) != 0:
                raise SystemExit("trunk decode failed")
        finally:
            ll.llama_batch_free(batch)
        h = get_nextn(ctx)
        return np.ctypeslib.as_array(h, shape=(len(tokens), n_embd)).copy()

    arrays: dict[str, np.ndarray] = {}
    calls = 0

    def mtp(next_tokens: list[int], hidden: np.ndarray, pos0: int) -> None:
        nonlocal calls
        captured.clear()
        batch = ll.llama_batch_ext_init(ctx_mtp)
        rows = np.ascontiguousarray(hidden, dtype=np.float32)
        try:
            for i, tok in enumerate(next_tokens):
                idx = ll.llama_batch_ext_add_token(batch, 0, tok)
                pos = (ll.llama_pos * 1)(pos0 + i)
                ll.llama_batch_ext_set_pos(batch, idx, pos)
                data = rows[i].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                embd = ll.llama_embd(data, 1, n_embd)
                if not ll.llama_batch_ext_set_embd_token(batch, idx, embd):
                    raise SystemExit("set_embd_token failed")
                ll.llama_batch_ext_set_output_logits(batch, idx, True)
            rc = ll.llama_process(ctx_mtp, ll.LLAMA_PROCESS_TYPE_DECODE, batch)
            if rc != 0:
                raise SystemExit(f"MTP decode failed: {rc}")
        finally:
            ll.llama_batch_ext_free(batch)
        logits = np.stack(
            [
                np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx_mtp, i), shape=(n_vocab,)).copy()
                for i in range(len(next_tokens))
            ]
        )
        arrays[f"logits_{calls}"] = logits
        for name, arr in captured.items():
            arrays[f"{name}__{calls}"] = arr
        calls += 1

    prompt, decode = list(req["prompt"]), list(req["decode"])
    h = trunk(prompt, 0)
    mtp(prompt[1:], h[:-1], 1)  # positions t = 0..T-2 at token positions 1..T-1
    pending, pos = h[-1], len(prompt)
    for tok in decode:
        mtp([tok], pending[None, :], pos)  # position t = pos-1: token x_pos with h_{pos-1}
        pending = trunk([tok], pos)[0]
        pos += 1
    np.savez(req["out"], **arrays)
    ll.llama_free(ctx_mtp)
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
