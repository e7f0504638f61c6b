"""The out-of-process llama.cpp worker on a tiny random llama GGUF (no converter involved).

Needs the harness's llama-cpp-python build (``python -m harness.llamacpp.build --install``) and
the ``gguf`` package.  Without them these tests skip, unless ``BAILING_PARITY_REQUIRE_LLAMACPP=1``
(CI with the backend installed), where a missing build is a failure, not a skip.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from harness.core.errors import InputError, PortFailure
from harness.llamacpp.client import ContextParams, WorkerClient, squeeze_to
from tests.llamacpp_testing import (
    TinyBailingMoe3,
    TinyLlama,
    require_llamacpp,
    write_tiny_bailingmoe3,
    write_tiny_llama,
)

CFG = TinyLlama()
TOKENS = [1, 5, 9, 2, 33, 17, 60, 4, 8, 21, 3, 42]
TRUNK = ("l_out-0", "l_out-1", "result_norm", "result_output")


@pytest.fixture(autouse=True)
def _need_llamacpp() -> None:
    require_llamacpp()


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_llamacpp()
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", CFG)


def _rows(arr: np.ndarray) -> np.ndarray:
    return squeeze_to(arr, 2)


def test_trunk_captures_have_token_rows(gguf_path: Path) -> None:
    with WorkerClient(timeout=120) as w:
        info = w.load(gguf_path)
        assert (info["arch"], info["n_layer"], info["n_vocab"]) == ("llama", 2, CFG.n_vocab)
        out = w.feed(TOKENS, TRUNK)
    assert set(out.tensors) == set(TRUNK)
    T = len(TOKENS)
    for name in ("l_out-0", "l_out-1", "result_norm"):
        assert _rows(out.tensors[name]).shape == (T, CFG.n_embd), name
    assert _rows(out.tensors["result_output"]).shape == (T, CFG.n_vocab)
    # Every position's logits were requested, so the last layer kept all rows.
    assert out.logits.shape == (T, CFG.n_vocab)
    assert all(np.isfinite(a).all() for a in out.tensors.values())
    # The graph offers more names than were asked for; unwanted ones are not copied.
    assert {"attn_norm-0", "ffn_inp-1", "kqv_out-1"} <= set(out.graph_names)


def test_callback_logits_equal_llama_get_logits_ith(gguf_path: Path) -> None:
    with WorkerClient(timeout=120) as w:
        w.load(gguf_path)
        out = w.feed(TOKENS, ["result_output"])
    np.testing.assert_array_equal(_rows(out.tensors["result_output"]), out.logits)


def test_prefill_then_steps_matches_one_shot(gguf_path: Path) -> None:
    """KV-cache continuity across feeds (f32 KV) and ``reset`` starting a fresh sequence."""
    with WorkerClient(timeout=120) as w:
        w.load(gguf_path, ContextParams(type_k="f32", type_v="f32"))
        one = w.feed(TOKENS, ["l_out-1"])
        w.reset()
        parts = [w.feed(TOKENS[:5], ["l_out-1"])]
        parts += [w.feed([t], ["l_out-1"]) for t in TOKENS[5:]]
        assert parts[-1].n_past == len(TOKENS)
        w.reset()
        again = w.feed(TOKENS, ["l_out-1"])
    step_logits = np.concatenate([p.logits for p in parts])
    step_h = np.concatenate([_rows(p.tensors["l_out-1"]) for p in parts])
    np.testing.assert_allclose(step_logits, one.logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(step_h, _rows(one.tensors["l_out-1"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(again.logits, one.logits)


def test_feed_longer_than_ubatch_is_split_and_concatenated(gguf_path: Path) -> None:
    with WorkerClient(timeout=120) as w:
        w.load(gguf_path, ContextParams(n_ubatch=5))
        split = w.feed(TOKENS, ["l_out-0", "result_output"])
    with WorkerClient(timeout=120) as w:
        w.load(gguf_path)
        whole = w.feed(TOKENS, ["l_out-0", "result_output"])
    assert (split.n_graphs, whole.n_graphs) == (3, 1)
    for name in ("l_out-0", "result_output"):
        np.testing.assert_allclose(
            _rows(split.tensors[name]), _rows(whole.tensors[name]), rtol=1e-4, atol=1e-5
        )
    np.testing.assert_array_equal(_rows(split.tensors["result_output"]), split.logits)


@pytest.mark.parametrize("kv_type", ["f16", "bf16"])
def test_half_precision_and_strided_views_are_read_correctly(gguf_path: Path, kv_type: str) -> None:
    """The KV-cache view holds K rounded to f16/bf16; a permuted view reads through its strides."""
    names = ["Kcur-0", "cache_k_l0 (view)", "Qcur-0 (view)", "Qcur-0 (view) (permuted)"]
    with WorkerClient(timeout=120) as w:
        w.load(gguf_path, ContextParams(n_ctx=64, type_k=kv_type, type_v=kv_type))
        t = w.feed(TOKENS, names).tensors
    T = len(TOKENS)
    k = t["Kcur-0"].reshape(T, -1)
    cache = t["cache_k_l0 (view)"]
    cached = cache.reshape(cache.shape[1], -1)[:T]
    assert cached.dtype == np.float32
    if kv_type == "f16":
        np.testing.assert_array_equal(cached, k.astype(np.float16).astype(np.float32))
    else:
        np.testing.assert_allclose(cached, k, rtol=2.0**-8, atol=0)
        assert not np.array_equal(cached, k)  # really rounded, not an f32 copy
    q, qp = t["Qcur-0 (view)"], t["Qcur-0 (view) (permuted)"]
    np.testing.assert_array_equal(qp, q.transpose(0, 2, 1, 3))


def test_missing_tensor_is_a_port_failure_with_the_reason(tmp_path: Path) -> None:
    bad = write_tiny_llama(tmp_path / "broken.gguf", CFG, drop={"blk.1.ffn_down.weight"})
    with WorkerClient(timeout=120) as w:
        with pytest.raises(PortFailure, match=r"blk\.1\.ffn_down\.weight") as e:
            w.load(bad)
        assert "loading broken.gguf" in str(e.value)
        assert w.alive  # a clean load error leaves the worker usable


def test_missing_file_and_bad_tokens_are_input_errors(gguf_path: Path, tmp_path: Path) -> None:
    with WorkerClient(timeout=120) as w:
        with pytest.raises(InputError, match="not found"):
            w.load(tmp_path / "nope.gguf")
        w.load(gguf_path)
        with pytest.raises(InputError, match="out of range"):
            w.feed([CFG.n_vocab + 3])
        with pytest.raises(InputError, match="exceed the context"):
            w.feed([1] * 600)  # default n_ctx 512
        assert w.feed([1, 2]).n_past == 2  # refused requests left the sequence untouched


def test_hang_becomes_port_failure_and_the_worker_is_killed() -> None:
    with WorkerClient(timeout=1.0) as w:
        t0 = time.monotonic()
        with pytest.raises(PortFailure, match=r"hung \(no reply within 1 s"):
            w.request({"op": "_sleep", "seconds": 60}, doing="a test-only sleep")
        assert time.monotonic() - t0 < 10
        assert not w.alive


@pytest.mark.parametrize(("how", "signame"), [("abort", "SIGABRT"), ("segv", "SIGSEGV")])
def test_native_crash_becomes_port_failure_with_signal_and_stderr(how: str, signame: str) -> None:
    with WorkerClient(timeout=60) as w:
        with pytest.raises(PortFailure) as e:
            w.request({"op": "_crash", "how": how}, doing="a test-only crash")
        msg = str(e.value)
        assert signame in msg and "a test-only crash" in msg
        assert f"simulated crash ({how})" in msg  # the stderr tail is attached
        with pytest.raises(PortFailure, match="is not running"):
            w.reset()


def test_real_ggml_assert_in_llamacpp_becomes_port_failure(tmp_path: Path) -> None:
    """bailingmoe3's loader GGML_ASSERTs a negative KDA gate bound: the child aborts, we don't."""
    bad = write_tiny_bailingmoe3(
        tmp_path / "assert.gguf", TinyBailingMoe3(kda_gate_lower_bound=1.0)
    )
    with WorkerClient(timeout=120) as w, pytest.raises(PortFailure) as e:
        w.load(bad)
    msg = str(e.value)
    assert "SIGABRT" in msg and "loading assert.gguf" in msg
    assert "GGML_ASSERT(hparams.kda_gate_lower_bound < 0.0f)" in msg
