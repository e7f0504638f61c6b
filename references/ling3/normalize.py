"""What changes in a transformers-written Ling 3.0 checkpoint so every implementation loads it.

transformers' ``save_pretrained`` writes ``BailingHybridForCausalLM`` checkpoints that neither
mlx-lm's ``bailing_moe_v3`` nor llama.cpp's converter reads as the same model (see
``/work/shared/docs/ling3-crosscheck.md``).  The synthetic writer fixes them here, in ONE visible
place: each rule below is a table row carrying the finding it documents, and
:func:`normalisation_findings` lists them all for the report.

Upstream (Ant's published checkpoints) is the layout mlx-lm and llama.cpp's converter were written
against: ``attention.dense`` on MLA layers, ``attention.o_proj`` on KDA layers, per-expert
``mlp.experts.{e}.*`` tensors, ``mlp.gate.expert_bias``, ``{q,k,v}_conv1d`` and the MTP layer as
``model.layers.{L}`` with ``eh_proj``/``enorm``/``hnorm``/``final_layernorm``.  transformers loads
that layout through its conversion mapping and maps most of it back on save; where the reverse
mapping is lossy (KDA ``o_proj``) or a key is renamed through the config's ``attribute_map``, the
upstream form is restored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from references.ling3.config import ARCHITECTURE, FULL, LINEAR, Ling3Config

# ---------------------------------------------------------------------------------------------
# The tables


@dataclass(frozen=True)
class TensorRename:
    """Rename ``model.layers.{i}.<old>`` to ``<new>`` on layers of ``layer_type``."""

    layer_type: str  # LINEAR (KDA) or FULL (MLA)
    old: str
    new: str
    finding: str


TENSOR_RENAMES: tuple[TensorRename, ...] = (
    TensorRename(
        LINEAR, "attention.dense.weight", "attention.o_proj.weight",
        "mlx-lm expects attention.o_proj on KDA layers where transformers writes attention.dense "
        "(upstream: o_proj on KDA, dense on MLA; transformers' save reverses its load-time "
        "rename dense->o_proj on every layer, so KDA's o_proj comes out as dense; llama.cpp's "
        "converter accepts both names)",
    ),
)


Fix = Callable[[dict[str, Any], Ling3Config], bool]


@dataclass(frozen=True)
class ConfigRule:
    """One config.json fix: ``fix(config_dict, cfg)`` edits in place and says if it changed."""

    key: str
    finding: str
    fix: Fix


def _rename(old: str, new: str) -> Fix:
    def fix(d: dict[str, Any], cfg: Ling3Config) -> bool:
        if old not in d:
            return False
        d[new] = d.pop(old)
        return True

    return fix


def _set(value: Callable[[Ling3Config], Any], key: str) -> Fix:
    def fix(d: dict[str, Any], cfg: Ling3Config) -> bool:
        want = value(cfg)
        changed = d.get(key) != want
        d[key] = want
        return changed

    return fix


def _drop(*keys: str) -> Fix:
    def fix(d: dict[str, Any], cfg: Ling3Config) -> bool:
        return bool([d.pop(k) for k in keys if k in d])

    return fix


def _restore_head_dim(d: dict[str, Any], cfg: Ling3Config) -> bool:
    derived = ("linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim", "qk_head_dim")
    changed = _set(lambda c: c.head_dim, "head_dim")(d, cfg)
    return _drop(*derived)(d, cfg) or changed


def _pin_layer_types(d: dict[str, Any], cfg: Ling3Config) -> bool:
    """Pin the upstream pattern; "changed" when transformers alone would derive another one."""
    want = cfg.upstream_layer_types()
    changed = d.get("layer_types") != want or want != cfg.transformers_layer_types()
    d["layer_types"] = want
    return changed


CONFIG_RULES: tuple[ConfigRule, ...] = (
    ConfigRule(
        "architectures",
        "transformers writes architectures ['BailingHybridForCausalLM']; mlx-lm maps only "
        "(bailing_hybrid, BailingMoeV3ForCausalLM) to bailing_moe_v3 and anything else to the "
        "Ling-2.6 module, llama.cpp's converter refuses the name: written as "
        "['BailingMoeV3ForCausalLM']",
        _set(lambda cfg: [ARCHITECTURE], "architectures"),
    ),
    ConfigRule(
        "head_dim",
        "transformers writes head_dim = qk_rope_head_dim (its RoPE dim) and the KDA head dim as "
        "linear_head_dim; mlx-lm and llama.cpp read head_dim as the KDA head dim (shape mismatch "
        "on load): head_dim "
        "restored, linear_head_dim/linear_num_heads/linear_conv_kernel_dim/qk_head_dim dropped",
        _restore_head_dim,
    ),
    ConfigRule(
        "n_group",
        "transformers writes n_group as num_expert_group (config attribute_map); mlx-lm then "
        "silently routes with its default n_group=8 and llama.cpp's converter writes no expert "
        "group count (ungrouped routing): written as n_group",
        _rename("num_expert_group", "n_group"),
    ),
    ConfigRule(
        "num_experts_per_tok",
        "transformers writes num_experts_per_tok as num_experts_per_token; mlx-lm then silently "
        "routes to its default 8 experts (llama.cpp accepts both): written as num_experts_per_tok",
        _rename("num_experts_per_token", "num_experts_per_tok"),
    ),
    ConfigRule(
        "norm_topk_prob",
        "transformers writes norm_topk_prob as moe_renormalize; llama.cpp's converter reads "
        "hparams['norm_topk_prob'] (KeyError): written as norm_topk_prob",
        _rename("moe_renormalize", "norm_topk_prob"),
    ),
    ConfigRule(
        "max_position_embeddings",
        "transformers writes max_position_embeddings as model_max_length; mlx-lm's ModelArgs "
        "reads max_position_embeddings: written as max_position_embeddings",
        _rename("model_max_length", "max_position_embeddings"),
    ),
    ConfigRule(
        "moe_shared_expert_intermediate_size",
        "transformers writes no moe_shared_expert_intermediate_size (it sizes the shared expert "
        "moe_intermediate_size x num_shared_experts); mlx-lm defaults it to 512 (shape mismatch "
        "on load) and llama.cpp's converter needs it: written = moe_intermediate_size",
        _set(lambda cfg: cfg.moe_intermediate_size, "moe_shared_expert_intermediate_size"),
    ),
    ConfigRule(
        "score_function",
        "transformers writes no score_function (its router is always sigmoid); without it "
        "llama.cpp's converter writes no expert_gating_func and llama.cpp refuses the GGUF: "
        "written as 'sigmoid'",
        _set(lambda cfg: "sigmoid", "score_function"),
    ),
    ConfigRule(
        "no_kda_lora",
        "transformers writes no no_kda_lora (its KDA forget gate is a plain f_proj); llama.cpp's "
        "converter refuses a config without no_kda_lora=true: written as true",
        _set(lambda cfg: True, "no_kda_lora"),
    ),
    ConfigRule(
        "gated_attention_proj_granularity_type",
        "transformers writes no gated_attention_proj_granularity_type (its MLA gate g_proj is "
        "head-wise, [heads, hidden]); llama.cpp's converter requires 'head_wise': written",
        _set(lambda cfg: "head_wise", "gated_attention_proj_granularity_type"),
    ),
    ConfigRule(
        "layer_types",
        "transformers derives layer_types without the tail clause (MLA iff (l+1) % G == 0), so "
        "with num_hidden_layers % layer_group_size != 0 it builds the tail layers as KDA where "
        "mlx-lm and llama.cpp's converter build MLA (l >= floor(L/G)*G); the writer builds and "
        "writes the upstream pattern explicitly (mlx-lm and llama.cpp ignore layer_types)",
        _pin_layer_types,
    ),
)

MTP_FINDING = (
    "transformers has no MTP code (config num_mtp_layers -> num_nextn_predict_layers only marks "
    "model.layers.{L}.* as ignorable) and save_pretrained writes no MTP tensors; the writer adds "
    "the MTP layer in the upstream/llama.cpp naming (eh_proj, enorm, hnorm, final_layernorm, MLA "
    "attention.dense, per-expert MoE) in its own shard; transformers and mlx-lm (sanitize) drop "
    "it on load, so the MTP head that drafts is the harness's own (references/ling3/mtp.py on "
    "transformers' trunk; in MLX, built from mlx-lm's layer classes)"
)


def normalisation_findings() -> list[str]:
    """Every normalisation the Ling 3.0 writer applies, as a sentence for the report."""
    return (
        [r.finding for r in CONFIG_RULES] + [r.finding for r in TENSOR_RENAMES] + [MTP_FINDING]
    )


# ---------------------------------------------------------------------------------------------
# Applying them


def normalise_config(written: dict[str, Any], cfg: Ling3Config) -> tuple[dict[str, Any], list[str]]:
    """The upstream-style config.json from transformers' one, and the findings that applied."""
    out = dict(written)
    applied = [rule.finding for rule in CONFIG_RULES if rule.fix(out, cfg)]
    return out, applied


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def tensor_renames(names: list[str], cfg: Ling3Config) -> dict[str, str]:
    """``old -> new`` for every trunk tensor the table renames (MTP layers are never touched)."""
    out: dict[str, str] = {}
    for name in names:
        m = _LAYER_RE.match(name)
        if m is None or int(m[1]) >= cfg.num_hidden_layers:
            continue
        layer = int(m[1])
        kind = FULL if cfg.is_mla(layer) else LINEAR
        for rule in TENSOR_RENAMES:
            if rule.layer_type == kind and m[2] == rule.old:
                out[name] = f"model.layers.{layer}.{rule.new}"
    return out


def normalise_tensors(out_dir: Path, cfg: Ling3Config) -> list[str]:
    """Apply :data:`TENSOR_RENAMES` to every shard and the index; the findings that applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = out_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map: dict[str, str] = index["weight_map"]
    renames = tensor_renames(list(weight_map), cfg)
    for fname in sorted({weight_map[n] for n in renames}):
        with safe_open(str(out_dir / fname), "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {renames.get(k, k): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        save_file(tensors, str(out_dir / fname), metadata=metadata)
    index["weight_map"] = {renames.get(k, k): v for k, v in weight_map.items()}
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    applied = {
        rule.finding
        for rule in TENSOR_RENAMES
        for old in renames
        if old.endswith("." + rule.old)
    }
    return [r.finding for r in TENSOR_RENAMES if r.finding in applied]
