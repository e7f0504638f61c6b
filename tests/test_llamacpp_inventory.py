"""GGUF inventory: clean on a converted Ling 3.0; every kind of damage named; the fork's map.

The GGUFs come from the port's own converter (``test_llamacpp_convert``'s checkpoints); damaged
copies are written with ``inventory.rewrite_gguf``.  Loading damaged GGUFs (the port failing on
them) is in ``test_llamacpp_backend``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.core.errors import InputError
from harness.llamacpp.convert import convert
from harness.llamacpp.inventory import (
    expected_from_metadata,
    inventory,
    map_checkpoint,
    metadata_variables,
    read_gguf,
    render,
    rewrite_gguf,
)
from harness.llamacpp.tensor_maps import (
    BAILINGMOE3,
    LJ_BAILING_HYBRID,
    OURS_BAILING_HYBRID,
    PORT_MAP_KEY,
    PORT_MAPS,
    evaluate,
    layer_kinds,
    map_for_arch,
    map_for_gguf,
)
from tests.test_llamacpp_convert import need_converter, write_raw_ling3

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, f32 GGUF) of a raw transformers Ling 3.0, through the port's converter."""
    need_converter()
    root = tmp_path_factory.mktemp("inv")
    ckpt = write_raw_ling3(root / "ckpt", seed=1)
    return ckpt, convert(ckpt, "f32", cache=root / "cache").require()


def test_a_converted_checkpoint_is_fully_accounted_for(converted) -> None:
    ckpt, gguf = converted
    inv = inventory(gguf, ckpt)
    assert inv.port == "bailingmoe3" and inv.ok, render(inv)
    assert render(inv) == []
    # 6 layers: 8 experts x 3 per MoE layer collapse into 3 stacked GGUF tensors each.
    assert inv.n_checkpoint_tensors > inv.n_tensors
    assert not inv.notes


def test_a_missing_tensor_is_named_with_its_source(converted, tmp_path: Path) -> None:
    ckpt, gguf = converted
    bad = rewrite_gguf(gguf, tmp_path / "bad.gguf", drop_tensors=["blk.2.attn_k_b.weight"])
    inv = inventory(bad, ckpt)
    assert inv.missing == ["blk.2.attn_k_b.weight (from model.layers.2.attention.kv_b_proj.weight)"]
    assert any("tensors missing from the GGUF" in f for f in render(inv))


def test_missing_and_wrong_metadata_are_named(converted, tmp_path: Path) -> None:
    ckpt, gguf = converted
    bad = rewrite_gguf(
        gguf,
        tmp_path / "bad.gguf",
        drop_keys=["bailingmoe3.expert_gating_func", "bailingmoe3.expert_group_count"],
        set_keys={"bailingmoe3.expert_weights_scale": 1.0},
    )
    inv = inventory(bad, ckpt)
    assert inv.missing_keys == ["bailingmoe3.expert_gating_func"]
    text = "\n".join(inv.metadata_mismatches)
    assert "expert_group_count absent but config.json has num_expert_group=4" in text
    assert "routes without the group limit" in text
    assert "expert_weights_scale=1.0 but config.json has routed_scaling_factor=2.5" in text


def test_unexpected_tensors_and_bad_shapes_are_named(converted, tmp_path: Path) -> None:
    ckpt, gguf = converted
    bad = rewrite_gguf(
        gguf,
        tmp_path / "bad.gguf",
        add_tensors={"blk.0.stray.weight": np.zeros((2, 3))},
        set_keys={"bailingmoe3.expert_feed_forward_length": 48},
    )
    inv = inventory(bad, ckpt)
    assert inv.unexpected == ["blk.0.stray.weight"]
    assert any(s.startswith("blk.1.ffn_gate_exps.weight: ne [64, 32, 8]")
               for s in inv.shape_mismatches)


def test_checkpoint_tensors_without_a_rule_are_unmapped(converted) -> None:
    _, gguf = converted
    shapes = {"model.layers.1.attention.mystery.weight": (4, 4),
              "model.layers.2.attention.f_proj.weight": (64, 64)}
    meta, _ = read_gguf(gguf)
    m = map_checkpoint(BAILINGMOE3, shapes, layer_kinds(BAILINGMOE3, meta),
                       metadata_variables(BAILINGMOE3, meta))
    assert m.unmapped == [
        "model.layers.1.attention.mystery.weight (no rule in bailingmoe3)",
        "model.layers.2.attention.f_proj.weight (mapped only on kda layers; the GGUF makes "
        "layer 2 mla+moe)",
    ]


def test_not_a_gguf_is_an_input_error(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"not a gguf")
    with pytest.raises(InputError, match="not a readable GGUF"):
        inventory(p)


def _ling26_flash_meta() -> dict:
    """Metadata of the fork's Ling-2.6-flash GGUF (ling26-architecture.md §5.2)."""
    a = "bailing_hybrid"
    kv = [1 if (i + 1) % 8 == 0 else 0 for i in range(32)] + [32]
    return {
        "general.architecture": a, f"{a}.block_count": 33, f"{a}.nextn_predict_layers": 1,
        f"{a}.leading_dense_block_count": 1, f"{a}.attention.head_count_kv": kv,
        f"{a}.embedding_length": 4096, f"{a}.vocab_size": 157184, f"{a}.feed_forward_length": 9216,
        f"{a}.expert_feed_forward_length": 1024, f"{a}.expert_shared_feed_forward_length": 1024,
        f"{a}.expert_count": 256, f"{a}.attention.head_count": 32,
        f"{a}.attention.q_lora_rank": 1536, f"{a}.attention.kv_lora_rank": 512,
        f"{a}.rope.dimension_count": 64, f"{a}.attention.key_length": 128,
        f"{a}.attention.value_length": 128, f"{a}.attention.key_length_mla": 192,
        f"{a}.attention.value_length_mla": 128,
    }


def test_fork_map_reproduces_the_published_ling26_layout() -> None:
    """540 tensors (22 MTP) with the doc's shapes, every Ling-2.6-flash HF tensor accounted for."""
    from references.checkpoint_spec import expected_tensors
    from references.config import config_from_dict
    from tests.tiny_checkpoint import tiny_config

    flash = tiny_config(
        hidden_size=4096, num_hidden_layers=32, layer_group_size=8, num_attention_heads=32,
        num_key_value_heads=32, head_dim=128, group_norm_size=4, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        num_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
        moe_intermediate_size=1024, intermediate_size=9216, vocab_size=157184,
    )
    cfg = config_from_dict(flash, Path("config.json"))
    shapes = {s.name: s.shape for s in expected_tensors(cfg)}
    meta = _ling26_flash_meta()
    port = map_for_arch("bailing_hybrid")
    assert port is LJ_BAILING_HYBRID
    variables = metadata_variables(port, meta)
    m = map_checkpoint(port, shapes, layer_kinds(port, meta), variables)
    assert m.unmapped == []
    expected = expected_from_metadata(port, meta)
    assert set(m.sources) == set(expected)
    assert len(expected) == 540
    assert sum(1 for n in expected if n.startswith("blk.32.")) == 22
    ne = {n: tuple(evaluate(e, variables) for e in exprs) for n, (exprs, _) in expected.items()}
    # A few rows of the doc's §5.3 table (ggml ne order).
    assert ne["blk.0.attn_qkv.weight"] == (4096, 12288)
    assert ne["blk.7.attn_k_b.weight"] == (128, 512, 32)
    assert ne["blk.7.attn_v_b.weight"] == (512, 128, 32)
    assert ne["blk.1.ffn_down_exps.weight"] == (1024, 4096, 256)
    assert ne["blk.32.nextn.eh_proj.weight"] == (8192, 4096)
    # Element counts agree with the HF tensors group by group (stacking and the kv_b split).
    for names, _hf, n_hf in m.groups:
        assert sum(int(np.prod(ne[n])) for n in names) == n_hf, names


def test_a_bailing_hybrid_gguf_with_an_mla_rope_key_is_ours_else_the_forks() -> None:
    meta = _ling26_flash_meta()
    assert map_for_gguf(meta) is LJ_BAILING_HYBRID
    meta["bailing_hybrid.rope.dimension_count_mla"] = 32
    assert map_for_gguf(meta) is OURS_BAILING_HYBRID


def test_maps_are_consistent() -> None:
    for name, port in PORT_MAPS.items():
        assert port.name == name and map_for_arch(port.arch).arch == port.arch
        named = {"general.architecture": port.arch, PORT_MAP_KEY: name}
        assert map_for_gguf(named) is port
    assert evaluate("kv_lora_rank+n_rot", {"kv_lora_rank": 512, "n_rot": 64}) == 576
    with pytest.raises(ValueError):
        evaluate("__import__('os')", {})
