"""Per-port GGUF layouts as data: HF tensor name -> GGUF name(s), GGUF shape from metadata.

A port's GGUF is its own statement of the model; the inventory (:mod:`.inventory`) checks it
against the checkpoint through these maps, so that a tensor the converter dropped, renamed or
shaped differently is named before any number is compared.

Shapes are ggml ``ne`` (innermost first, as ``GGUFReader`` reports them and as the loader's
``create_tensor`` calls spell them), written as expressions over metadata variables (see
``VARIABLES``).  A rule applies to the layers whose kinds contain ``when`` (``kda``, ``gla``,
``mla``, ``dense``, ``moe``, ``mtp``); layer kinds come from the GGUF's own metadata
(``head_count_kv`` per layer: 0 = linear attention, else MLA; ``leading_dense_block_count``;
the last ``nextn_predict_layers`` blocks are MTP), so a port that classifies a layer differently
shows up as missing/unexpected tensors.

Ports:

- ``bailingmoe3``: upstream llama.cpp's Ling 3.0 (``src/models/bailingmoe3.cpp`` at the vendored
  commit ``0c1e57098``; its ``load_arch_tensors`` and ``load_arch_hparams``).
- ``ljubomirj-bailing_hybrid``: the known Ling-2.6-flash fork (ljubomirj/llama.cpp, branch
  LJ-Ling-2.6-flash-r2), from ``/work/shared/docs/ling26-architecture.md`` §5.2-5.3 (not built
  here: upstream has no Ling-2.6, so this map serves GGUFs made by that fork's converter).
- ``ours-bailing_hybrid``: our port (``ports/llamacpp``), the fork's layout plus
  ``rope.dimension_count_mla`` (MLA rotary dims, written when they differ from the GLA ones).
  Our conversion names the map in the GGUF (``bailing_parity.port_map``); a GGUF carrying
  ``rope.dimension_count_mla`` is ours too.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

# Variable -> GGUF key suffix (after "<arch>.") it is read from, in order of preference.
VARIABLES: dict[str, tuple[str, ...]] = {
    "n_embd": ("embedding_length",),
    "n_vocab": ("vocab_size",),  # falls back to len(tokenizer.ggml.tokens)
    "n_ff": ("feed_forward_length",),
    "n_ff_exp": ("expert_feed_forward_length",),
    "n_ff_shexp": ("expert_shared_feed_forward_length",),
    "n_expert": ("expert_count",),
    "n_head": ("attention.head_count",),
    "q_lora_rank": ("attention.q_lora_rank",),
    "kv_lora_rank": ("attention.kv_lora_rank",),
    "n_rot": ("rope.dimension_count",),
    # MLA rotary dims: our port writes them apart only when they differ from the GLA ones
    "n_rot_mla": ("rope.dimension_count_mla", "rope.dimension_count"),
    "key_length": ("attention.key_length",),
    "value_length": ("attention.value_length",),
    "key_length_mla": ("attention.key_length_mla",),
    "value_length_mla": ("attention.value_length_mla",),
    "kda_head_dim": ("kda.head_dim",),
    "d_conv": ("ssm.conv_kernel",),
}


@dataclass(frozen=True)
class TensorRule:
    """HF tensor(s) -> GGUF tensor(s); several HF tensors may feed one (stacked experts) and one
    may feed several (MLA ``kv_b_proj`` -> ``attn_k_b`` + ``attn_v_b``)."""

    hf: str  # name after "model.layers.{L}." for layer rules (``{E}`` = expert index), else full
    gguf: tuple[str, ...]  # names after "blk.{L}." for layer rules, else full
    ne: tuple[tuple[str, ...], ...]  # per GGUF name: ne dims as metadata expressions
    when: str = ""  # layer kind this rule needs ("" = every layer)
    optional: bool = False  # the loader accepts its absence (e.g. output.weight when tied)

    def __post_init__(self) -> None:
        if len(self.gguf) != len(self.ne):
            raise ValueError(f"rule {self.hf}: {len(self.gguf)} names but {len(self.ne)} shapes")


def rule(
    hf: str, gguf: str | tuple[str, ...], *ne: tuple[str, ...], when: str = "", optional=False
) -> TensorRule:
    """Short constructor: ``rule(hf, gguf, ne)`` or ``rule(hf, (g1, g2), ne1, ne2)``."""
    names = (gguf,) if isinstance(gguf, str) else gguf
    return TensorRule(hf, names, tuple(ne), when, optional)


@dataclass(frozen=True)
class PortTensorMap:
    """One port's GGUF layout."""

    name: str
    arch: str  # general.architecture
    global_rules: tuple[TensorRule, ...]
    layer_rules: tuple[TensorRule, ...]
    linear_kind: str  # the layer kind of a head_count_kv == 0 layer ("kda" or "gla")
    required_keys: tuple[str, ...]  # GGUF keys (suffix after "<arch>.") the loader requires
    # GGUF key suffix -> config.json keys that must agree with it (first present wins)
    config_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    mtp_kinds: tuple[str, ...] = ("mla", "moe", "mtp")
    note: str = ""
    # GGUF key suffixes only this port writes (tells it from another port of the same arch)
    marker_keys: tuple[str, ...] = ()


_EMB = ("n_embd",)
_COMMON_LAYER: tuple[TensorRule, ...] = (
    rule("input_layernorm.weight", "attn_norm.weight", _EMB),
    rule("post_attention_layernorm.weight", "ffn_norm.weight", _EMB),
    # MLA (q-LoRA or plain q), KV latent, absorbed k_b / v_b split of kv_b_proj
    rule("attention.q_a_proj.weight", "attn_q_a.weight", ("n_embd", "q_lora_rank"), when="mla"),
    rule("attention.q_a_layernorm.weight", "attn_q_a_norm.weight", ("q_lora_rank",), when="mla"),
    rule(
        "attention.q_b_proj.weight",
        "attn_q_b.weight",
        ("q_lora_rank", "n_head*key_length_mla"),
        when="mla",
    ),
    rule("attention.q_proj.weight", "attn_q.weight", ("n_embd", "n_head*key_length_mla"),
         when="mla"),
    rule(
        "attention.kv_a_proj_with_mqa.weight",
        "attn_kv_a_mqa.weight",
        ("n_embd", "kv_lora_rank+n_rot_mla"),
        when="mla",
    ),
    rule("attention.kv_a_layernorm.weight", "attn_kv_a_norm.weight", ("kv_lora_rank",),
         when="mla"),
    rule(
        "attention.kv_b_proj.weight",
        ("attn_k_b.weight", "attn_v_b.weight"),
        ("key_length_mla-n_rot_mla", "kv_lora_rank", "n_head"),
        ("kv_lora_rank", "value_length_mla", "n_head"),
        when="mla",
    ),
    # dense lead layers
    rule("mlp.gate_proj.weight", "ffn_gate.weight", ("n_embd", "n_ff"), when="dense"),
    rule("mlp.up_proj.weight", "ffn_up.weight", ("n_embd", "n_ff"), when="dense"),
    rule("mlp.down_proj.weight", "ffn_down.weight", ("n_ff", "n_embd"), when="dense"),
    # MoE: router, expert bias, stacked experts, shared expert
    rule("mlp.gate.weight", "ffn_gate_inp.weight", ("n_embd", "n_expert"), when="moe"),
    rule("mlp.gate.expert_bias", "exp_probs_b.bias", ("n_expert",), when="moe"),
    rule("mlp.experts.{E}.gate_proj.weight", "ffn_gate_exps.weight",
         ("n_embd", "n_ff_exp", "n_expert"), when="moe"),
    rule("mlp.experts.{E}.up_proj.weight", "ffn_up_exps.weight",
         ("n_embd", "n_ff_exp", "n_expert"), when="moe"),
    rule("mlp.experts.{E}.down_proj.weight", "ffn_down_exps.weight",
         ("n_ff_exp", "n_embd", "n_expert"), when="moe"),
    rule("mlp.shared_experts.gate_proj.weight", "ffn_gate_shexp.weight",
         ("n_embd", "n_ff_shexp"), when="moe"),
    rule("mlp.shared_experts.up_proj.weight", "ffn_up_shexp.weight",
         ("n_embd", "n_ff_shexp"), when="moe"),
    rule("mlp.shared_experts.down_proj.weight", "ffn_down_shexp.weight",
         ("n_ff_shexp", "n_embd"), when="moe"),
    # MTP block extras
    rule("eh_proj.weight", "nextn.eh_proj.weight", ("2*n_embd", "n_embd"), when="mtp"),
    rule("enorm.weight", "nextn.enorm.weight", _EMB, when="mtp"),
    rule("hnorm.weight", "nextn.hnorm.weight", _EMB, when="mtp"),
    rule("final_layernorm.weight", "layer_output_norm.weight", _EMB, when="mtp"),
)

_GLOBAL: tuple[TensorRule, ...] = (
    rule("model.word_embeddings.weight", "token_embd.weight", ("n_embd", "n_vocab")),
    rule("model.norm.weight", "output_norm.weight", _EMB),
    rule("lm_head.weight", "output.weight", ("n_embd", "n_vocab"), optional=True),
)

_KDA_INNER = "n_head*kda_head_dim"
BAILINGMOE3 = PortTensorMap(
    name="bailingmoe3",
    arch="bailingmoe3",
    global_rules=_GLOBAL,
    layer_rules=(
        *_COMMON_LAYER,
        # KDA (Kimi delta attention) layers
        rule("attention.q_proj.weight", "attn_q.weight", ("n_embd", _KDA_INNER), when="kda"),
        rule("attention.k_proj.weight", "attn_k.weight", ("n_embd", _KDA_INNER), when="kda"),
        rule("attention.v_proj.weight", "attn_v.weight", ("n_embd", _KDA_INNER), when="kda"),
        rule("attention.q_conv1d.weight", "ssm_conv1d_q.weight", ("d_conv", "1", _KDA_INNER, "1"),
             when="kda"),
        rule("attention.k_conv1d.weight", "ssm_conv1d_k.weight", ("d_conv", "1", _KDA_INNER, "1"),
             when="kda"),
        rule("attention.v_conv1d.weight", "ssm_conv1d_v.weight", ("d_conv", "1", _KDA_INNER, "1"),
             when="kda"),
        rule("attention.f_proj.weight", "ssm_f_a.weight", ("n_embd", _KDA_INNER), when="kda"),
        rule("attention.b_proj.weight", "ssm_beta.weight", ("n_embd", "n_head"), when="kda"),
        rule("attention.A_log", "ssm_a", ("1", "n_head"), when="kda"),
        rule("attention.dt_bias", "ssm_dt.bias", (_KDA_INNER,), when="kda"),
        rule("attention.g_proj.weight", "ssm_g_a.weight", ("n_embd", _KDA_INNER), when="kda"),
        rule("attention.o_norm.weight", "ssm_norm.weight", ("kda_head_dim",), when="kda"),
        rule("attention.o_proj.weight", "attn_output.weight", (_KDA_INNER, "n_embd"), when="kda"),
        rule("attention.dense.weight", "attn_output.weight", (_KDA_INNER, "n_embd"), when="kda"),
        # MLA head-wise output gate and output projection
        rule("attention.g_proj.weight", "attn_gate.weight", ("n_embd", "n_head"), when="mla"),
        rule("attention.dense.weight", "attn_output.weight", ("n_head*value_length_mla", "n_embd"),
             when="mla"),
    ),
    linear_kind="kda",
    required_keys=(
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.layer_norm_rms_epsilon",
        "attention.key_length_mla",
        "attention.value_length_mla",
        "attention.kv_lora_rank",
        "rope.dimension_count",
        "ssm.conv_kernel",
        "kda.head_dim",
        "kda.gate_lower_bound",
        "expert_count",
        "expert_used_count",
        "expert_feed_forward_length",
        "expert_shared_count",
        "leading_dense_block_count",
        "expert_gating_func",
    ),
    config_keys={
        "embedding_length": ("hidden_size",),
        "attention.head_count": ("num_attention_heads",),
        "expert_count": ("num_experts", "num_local_experts"),
        "expert_used_count": ("num_experts_per_tok", "num_experts_per_token"),
        "expert_group_count": ("n_group", "num_expert_group"),
        "expert_group_used_count": ("topk_group",),
        "leading_dense_block_count": ("first_k_dense_replace",),
        "expert_weights_scale": ("routed_scaling_factor",),
        "expert_weights_norm": ("norm_topk_prob", "moe_renormalize"),
        "attention.kv_lora_rank": ("kv_lora_rank",),
        "attention.q_lora_rank": ("q_lora_rank",),
        "rope.dimension_count": ("qk_rope_head_dim",),
        "attention.layer_norm_rms_epsilon": ("rms_norm_eps",),
        "kda.gate_lower_bound": ("kda_lower_bound",),
    },
    note="upstream llama.cpp 0c1e57098 (src/models/bailingmoe3.cpp)",
)

LJ_BAILING_HYBRID = PortTensorMap(
    name="ljubomirj-bailing_hybrid",
    arch="bailing_hybrid",
    global_rules=_GLOBAL,
    layer_rules=(
        *_COMMON_LAYER,
        # GLA ("lightning") layers: fused QKV, q/k norms, gate, group-norm weight, output
        rule("attention.query_key_value.weight", "attn_qkv.weight", ("n_embd", "3*n_embd"),
             when="gla"),
        rule("attention.query_layernorm.weight", "attn_q_norm.weight", ("key_length",),
             when="gla"),
        rule("attention.key_layernorm.weight", "attn_k_norm.weight", ("key_length",), when="gla"),
        rule("attention.g_proj.weight", "attn_gate.weight", ("n_embd", "n_embd"), when="gla"),
        rule("attention.g_norm.weight", "layer_output_norm.weight", _EMB, when="gla"),
        rule("attention.dense.weight", "attn_output.weight", ("n_embd", "n_embd"), when="gla"),
        rule("attention.dense.weight", "attn_output.weight", ("n_head*value_length_mla", "n_embd"),
             when="mla"),
    ),
    linear_kind="gla",
    required_keys=(
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.layer_norm_rms_epsilon",
        "attention.key_length_mla",
        "attention.value_length_mla",
        "attention.q_lora_rank",
        "attention.kv_lora_rank",
        "rope.dimension_count",
        "rope.freq_base",
        "leading_dense_block_count",
        "expert_count",
        "expert_used_count",
        "expert_feed_forward_length",
        "expert_shared_count",
        "expert_gating_func",
    ),
    config_keys={
        "embedding_length": ("hidden_size",),
        "attention.head_count": ("num_attention_heads",),
        "expert_count": ("num_experts",),
        "expert_used_count": ("num_experts_per_tok",),
        "expert_group_count": ("n_group",),
        "expert_group_used_count": ("topk_group",),
        "leading_dense_block_count": ("first_k_dense_replace",),
        "expert_weights_scale": ("routed_scaling_factor",),
        "attention.group_norm_groups": ("group_norm_size",),
        "rope.freq_base": ("rope_theta",),
        "attention.kv_lora_rank": ("kv_lora_rank",),
        "attention.q_lora_rank": ("q_lora_rank",),
        "attention.layer_norm_rms_epsilon": ("rms_norm_eps",),
    },
    note="ljubomirj/llama.cpp LJ-Ling-2.6-flash-r2, per ling26-architecture.md §5 (not built here)",
)

# Our Ling-2.6 port (ports/llamacpp): the fork's layout, plus rope.dimension_count_mla when the
# MLA rotary dims differ from the GLA ones and a GLA width n_head*key_length that need not be the
# hidden size; q_lora_rank is written only when the config has one.
_GLA_WIDTH = "n_head*key_length"
OURS_BAILING_HYBRID = replace(
    LJ_BAILING_HYBRID,
    name="ours-bailing_hybrid",
    layer_rules=(
        *_COMMON_LAYER,
        rule("attention.query_key_value.weight", "attn_qkv.weight", ("n_embd", f"3*{_GLA_WIDTH}"),
             when="gla"),
        rule("attention.query_layernorm.weight", "attn_q_norm.weight", ("key_length",),
             when="gla"),
        rule("attention.key_layernorm.weight", "attn_k_norm.weight", ("key_length",), when="gla"),
        rule("attention.g_proj.weight", "attn_gate.weight", ("n_embd", _GLA_WIDTH), when="gla"),
        rule("attention.g_norm.weight", "layer_output_norm.weight", (_GLA_WIDTH,), when="gla"),
        rule("attention.dense.weight", "attn_output.weight", (_GLA_WIDTH, "n_embd"), when="gla"),
        rule("attention.dense.weight", "attn_output.weight", ("n_head*value_length_mla", "n_embd"),
             when="mla"),
    ),
    required_keys=tuple(k for k in LJ_BAILING_HYBRID.required_keys
                        if k != "attention.q_lora_rank"),
    marker_keys=("rope.dimension_count_mla",),
    note="our Ling-2.6 port (ports/llamacpp/patches) on llama.cpp 0c1e57098",
)

PORT_MAPS: dict[str, PortTensorMap] = {
    m.name: m for m in (BAILINGMOE3, LJ_BAILING_HYBRID, OURS_BAILING_HYBRID)
}
# Written by the harness's conversion: the name of the map of the converter that ran.
PORT_MAP_KEY = "bailing_parity.port_map"


def map_for_arch(arch: str) -> PortTensorMap | None:
    """The first tensor map registered for a GGUF's ``general.architecture`` (None when no port
    is known); :func:`map_for_gguf` tells ports of the same architecture apart."""
    return next((m for m in PORT_MAPS.values() if m.arch == arch), None)


def map_for_gguf(meta: Mapping[str, Any]) -> PortTensorMap | None:
    """The tensor map of the port that wrote a GGUF: the one our conversion named
    (``PORT_MAP_KEY``), else the first of its architecture whose marker keys it carries, else
    the first registered for its architecture."""
    arch = str(meta.get("general.architecture", ""))
    named = PORT_MAPS.get(str(meta.get(PORT_MAP_KEY, "")))
    if named is not None and named.arch == arch:
        return named
    same = [m for m in PORT_MAPS.values() if m.arch == arch]
    marked = [m for m in same if any(f"{arch}.{k}" in meta for k in m.marker_keys)]
    return (marked or same or [None])[0]


# --- helpers -----------------------------------------------------------------------------------
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def evaluate(expr: str, variables: Mapping[str, int]) -> int:
    """Value of a shape expression (``+ - *``, names, ints); KeyError names a missing variable."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return int(variables[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported shape expression {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


def hf_pattern(r: TensorRule) -> re.Pattern[str]:
    """The regex a rule matches HF names with (groups ``L`` and ``E``)."""
    return re.compile("^" + re.escape(r.hf).replace(re.escape("{E}"), r"(?P<E>\d+)") + "$")


_LAYER_PREFIX = re.compile(r"^model\.layers\.(?P<L>\d+)\.(?P<rest>.+)$")


def split_layer(name: str) -> tuple[int | None, str]:
    """``model.layers.3.mlp.gate.weight`` -> ``(3, "mlp.gate.weight")``; globals -> (None, name)."""
    m = _LAYER_PREFIX.match(name)
    return (int(m["L"]), m["rest"]) if m else (None, name)


def layer_kinds(port: PortTensorMap, meta: Mapping[str, Any]) -> list[frozenset[str]]:
    """Per GGUF block, its kinds, read from the GGUF's own metadata (see module doc)."""
    a = port.arch
    n_all = int(meta.get(f"{a}.block_count", 0))
    nextn = int(meta.get(f"{a}.nextn_predict_layers", 0) or 0)
    lead = int(meta.get(f"{a}.leading_dense_block_count", 0) or 0)
    kv = meta.get(f"{a}.attention.head_count_kv")
    kv_list = list(kv) if isinstance(kv, list | tuple) else [kv] * n_all
    kinds = []
    for il in range(n_all):
        if il >= n_all - nextn:
            kinds.append(frozenset(port.mtp_kinds))
            continue
        attn = port.linear_kind if kv_list[il] == 0 else "mla"
        kinds.append(frozenset({attn, "dense" if il < lead else "moe"}))
    return kinds
