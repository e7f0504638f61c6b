"""Config keys the known implementations read differently (README "Disputed config keys"): a
value on which the readings diverge is refused with a message naming the key and the
disagreement; the value every reading agrees on loads; where only one reading can apply to the
checkpoint it is applied with a note.  One test per row of the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.core.errors import InputError
from references.config import config_from_dict
from references.disputed_keys import DISPUTED_KEYS, check_disputed
from tests.tiny_checkpoint import tiny_config

PATH = Path("ckpt/config.json")


def load(**overrides):
    return config_from_dict(tiny_config(**overrides), PATH)


def refused(**overrides) -> str:
    with pytest.raises(InputError) as e:
        load(**overrides)
    return str(e.value)


def test_the_table_has_one_row_per_key_checked():
    assert [k.key for k in DISPUTED_KEYS] == [
        "rope_interleave", "norm_topk_prob", "num_key_value_heads",
        "moe_shared_expert_intermediate_size", "qk_rope_head_dim"]


def test_rope_interleave_false_is_refused_naming_both_readings():
    msg = refused(rope_interleave=False)
    assert msg.startswith(f"{PATH}: key 'rope_interleave' = false")
    assert "HF-R refuses it" in msg and "mlx-lm applies half-split" in msg
    assert load(rope_interleave=True).rope_interleave is True


def test_norm_topk_prob_false_is_refused_when_more_than_one_expert_is_routed():
    msg = refused(norm_topk_prob=False)  # tiny: num_experts_per_tok = 2
    assert "key 'norm_topk_prob' = false" in msg and "HF-R normalises the top-2" in msg
    assert load(norm_topk_prob=False, num_experts_per_tok=1).norm_topk_prob is False
    assert load(norm_topk_prob=True).norm_topk_prob is True


def test_fewer_kv_heads_than_heads_is_refused():
    msg = refused(num_key_value_heads=2)  # tiny: 4 heads
    assert "key 'num_key_value_heads' = 2 != num_attention_heads = 4" in msg
    assert "HF-R repeats MLA K/V heads" in msg
    assert load(num_key_value_heads=4).num_key_value_heads == 4
    assert load(num_key_value_heads=None).num_key_value_heads is None


def test_a_shared_expert_width_other_than_hf_rs_is_refused():
    msg = refused(moe_shared_expert_intermediate_size=24)  # HF-R: 16 x 1
    assert "key 'moe_shared_expert_intermediate_size' = 24 != moe_intermediate_size" in msg
    assert "(HF-R 16, mlx-lm 24)" in msg
    assert load(moe_shared_expert_intermediate_size=16).shared_intermediate_size == 16
    assert load(num_shared_experts=2).shared_intermediate_size == 32  # key absent: both agree


def test_an_mla_rope_width_wider_than_hf_rs_is_refused():
    msg = refused(qk_rope_head_dim=6)  # HF-R: head_dim 8 x 0.5 = 4
    assert "key 'qk_rope_head_dim' = 6 > head_dim x partial_rotary_factor = 4" in msg
    assert "(HF-R 4, mlx-lm and vLLM 6)" in msg


def test_an_mla_rope_width_narrower_than_hf_rs_is_read_as_qk_rope_head_dim_with_a_note():
    cfg = load(qk_rope_head_dim=2)  # HF-R's tables (4 wide) cannot apply to a 2-dim q_pe
    assert cfg.qk_rope_head_dim == 2
    (note,) = check_disputed(cfg, PATH)
    assert note == (f"{PATH}: MLA rotary width read as qk_rope_head_dim = 2 (mlx-lm, vLLM); "
                    "HF-R's head_dim x partial_rotary_factor = 4 is wider than q_pe and cannot "
                    "apply to this checkpoint")
    assert check_disputed(load(), PATH) == []  # equal widths: nothing to say


def test_the_reference_reports_the_note_as_a_finding(tmp_path):
    from references.model import BailingHybridReference
    from tests.tiny_checkpoint import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, qk_rope_head_dim=2)
    findings = BailingHybridReference.from_checkpoint(tmp_path).findings
    assert [f for f in findings if "MLA rotary width" in f] == [
        f"{tmp_path / 'config.json'}: MLA rotary width read as qk_rope_head_dim = 2 (mlx-lm, "
        "vLLM); HF-R's head_dim x partial_rotary_factor = 4 is wider than q_pe and cannot apply "
        "to this checkpoint"]
