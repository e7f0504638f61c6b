"""The llama.cpp name maps, checked against the names upstream graphs really emit.

A tiny random ``bailingmoe3`` (Ling 3.0) GGUF runs through the worker; every mapped name must be
offered by the graph, and every point listed as missing must really be unnamed, so an upstream
rename (or a new name worth mapping) fails here instead of silently dropping captures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.core.capture_points import all_points, parse
from harness.llamacpp.known_ports import port_for_arch
from harness.llamacpp.names import PORTS, to_canonical, wanted_names
from tests.llamacpp_testing import require_llamacpp

TOKENS = [1, 5, 9, 2, 33, 17, 60, 4, 8, 21, 3, 42]


@pytest.fixture(scope="module")
def bm3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_llamacpp()
    from tests.llamacpp_testing import write_tiny_bailingmoe3

    return write_tiny_bailingmoe3(tmp_path_factory.mktemp("gguf") / "tiny-bm3.gguf")


@pytest.fixture(scope="module")
def bm3_run(bm3_path: Path) -> dict:
    """One-shot forward capturing every canonical point, plus a prefill+steps run."""
    require_llamacpp()
    from harness.llamacpp.client import WorkerClient
    from tests.llamacpp_testing import TinyBailingMoe3

    cfg = TinyBailingMoe3()
    port = PORTS["bailingmoe3"]
    canonical = all_points(cfg.n_layer)
    raw_names = wanted_names(port, canonical)
    with WorkerClient(timeout=300) as w:
        info = w.load(bm3_path)
        one = w.feed(TOKENS, raw_names)
        w.reset()
        steps = [w.feed(TOKENS[:4], raw_names)] + [w.feed([t], raw_names) for t in TOKENS[4:]]
    return {"cfg": cfg, "info": info, "one": one, "steps": steps, "canonical": canonical}


def test_arch_lookup() -> None:
    assert port_for_arch("bailingmoe3") is PORTS["bailingmoe3"]
    with pytest.raises(KeyError, match="known"):
        port_for_arch("bailingmoe2_5")


def test_every_mapped_name_exists_and_missing_ones_are_unnamed(bm3_run: dict) -> None:
    cfg, one = bm3_run["cfg"], bm3_run["one"]
    assert bm3_run["info"]["arch"] == "bailingmoe3"
    offered = set(one.graph_names)
    port = PORTS["bailingmoe3"]
    for stem, candidates in port.layer.items():
        for il in range(cfg.n_layer):
            if stem.startswith("ffn_moe") and il < cfg.n_dense_lead:
                continue
            present = [c for c in candidates if f"{c}-{il}" in offered]
            assert present, f"{stem}-{il}: none of {candidates} offered by the graph"
    assert {"result_norm", "result_output"} <= offered
    for il in range(cfg.n_layer):
        kind = "kda_out" if il in cfg.kda_layers else "mla_out"
        assert f"{kind}-{il}" in offered
        for stem in ("ffn_inp", "ffn_norm", "ffn_out", "ffn_down", "kv_cmpr"):
            assert f"{stem}-{il}" not in offered, f"{stem}-{il} is named now: extend the map"


def test_canonical_captures_have_rows_and_sorted_router_ids(bm3_run: dict) -> None:
    cfg, one = bm3_run["cfg"], bm3_run["one"]
    T = len(TOKENS)
    caps = to_canonical(PORTS["bailingmoe3"], one.tensors, bm3_run["canonical"], T)
    for il in range(cfg.n_layer):
        for stem in ("attn_norm", "attn_out", "l_out"):
            assert caps[f"{stem}-{il}"].shape == (T, cfg.n_embd)
        assert f"ffn_inp-{il}" not in caps  # not capturable upstream: left out
    for il in range(cfg.n_dense_lead, cfg.n_layer):
        ids, weights = caps[f"ffn_moe_topk-{il}"], caps[f"ffn_moe_weights-{il}"]
        assert caps[f"ffn_moe_logits-{il}"].shape == (T, cfg.n_expert)
        assert ids.shape == weights.shape == (T, cfg.n_expert_used)
        assert ids.dtype == np.int64 and (np.diff(ids, axis=1) > 0).all()
        # norm_topk_prob + routed scale 2.5 in the fixture: each row sums to the scale.
        np.testing.assert_allclose(weights.sum(axis=1), 2.5, rtol=1e-5)
    assert caps["result_output"].shape == (T, cfg.n_vocab)
    np.testing.assert_array_equal(caps["result_output"], one.logits.astype(np.float64))
    for name, arr in caps.items():
        assert arr.dtype == (np.int64 if parse(name)[0].kind.value == "index" else np.float64)


def test_hybrid_cache_prefill_then_steps_matches_one_shot(bm3_run: dict) -> None:
    """MLA KV cache and KDA recurrent state both carry over between feeds."""
    one, steps = bm3_run["one"], bm3_run["steps"]
    np.testing.assert_allclose(
        np.concatenate([s.logits for s in steps]), one.logits, rtol=1e-4, atol=1e-5
    )
    for name in ("kda_out-1", "mla_out-2", "l_out-2"):
        stepped = np.concatenate([s.tensors[name].reshape(len(s.logits), -1) for s in steps])
        np.testing.assert_allclose(
            stepped, one.tensors[name].reshape(len(TOKENS), -1), rtol=1e-4, atol=1e-5
        )


def test_to_canonical_sorts_ids_and_aligns_weights_without_llamacpp() -> None:
    port = PORTS["bailingmoe3"]
    raw = {
        "ffn_moe_topk-3": np.array([[[[5, 1]], [[0, 7]]]], dtype=np.int32).reshape(1, 1, 2, 2),
        "ffn_moe_weights_scaled-3": np.array([0.9, 0.1, 0.3, 0.7], np.float32).reshape(1, 2, 2, 1),
        "ffn_moe_weights-3": np.zeros((1, 2, 2, 1), np.float32),  # not the preferred one
    }
    out = to_canonical(port, raw, ["ffn_moe_weights-3"], n_tokens=2)
    assert set(out) == {"ffn_moe_weights-3"}  # ids fetched for alignment, not returned
    np.testing.assert_allclose(out["ffn_moe_weights-3"], [[0.1, 0.9], [0.3, 0.7]], rtol=1e-6)
    assert "ffn_moe_topk-3" in wanted_names(port, ["ffn_moe_weights-3"])
    del raw["ffn_moe_topk-3"]
    assert to_canonical(port, raw, ["ffn_moe_weights-3"], n_tokens=2) == {}
