"""The Ling-2.6 (`BailingMoeV2_5ForCausalLM`) config as a typed, validated object.

Parsed from an HF ``config.json``; every missing or ill-typed key becomes an
:class:`~harness.core.errors.InputError` that names the file and the key, before any weight is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from harness.core.errors import InputError
from references.disputed_keys import check_disputed

ARCHITECTURE = "BailingMoeV2_5ForCausalLM"
MODEL_TYPE = "bailing_hybrid"


@dataclass(frozen=True)
class BailingHybridConfig:
    """Hyper-parameters of Ling-2.6-flash, named as in its ``config.json``."""

    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    layer_group_size: int
    group_norm_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    routed_scaling_factor: float
    head_dim: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    partial_rotary_factor: float = 0.5
    rope_interleave: bool = True
    use_qk_norm: bool = True
    score_function: str = "sigmoid"
    norm_topk_prob: bool = True
    moe_router_enable_expert_bias: bool = True
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 4096
    use_qkv_bias: bool = False
    use_bias: bool = False
    rope_scaling: dict[str, Any] | None = None

    # ---- derived quantities (the rules of the architecture doc, in one place) ----

    def is_mla(self, layer: int) -> bool:
        """Layer-type rule with the tail clause: MLA iff (l+1) % G == 0 or l >= floor(L/G)*G."""
        g, n = self.layer_group_size, self.num_hidden_layers
        return (layer + 1) % g == 0 or layer >= (n // g) * g

    def is_moe(self, layer: int) -> bool:
        """Dense SwiGLU for the first ``first_k_dense_replace`` layers, MoE after."""
        return layer >= self.first_k_dense_replace

    @property
    def gla_rope_dim(self) -> int:
        """GLA rotates the first ``head_dim * partial_rotary_factor`` dims (half-split)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def shared_intermediate_size(self) -> int:
        """Shared-expert width (mlx-lm's rule); the checkpoint's shapes are checked against it."""
        if self.moe_shared_expert_intermediate_size:
            return self.moe_shared_expert_intermediate_size
        return self.moe_intermediate_size * self.num_shared_experts

    @property
    def mtp_layers(self) -> range:
        """Checkpoint layer indices of the MTP heads (``model.layers.{L}`` onwards)."""
        n = self.num_hidden_layers
        return range(n, n + self.num_nextn_predict_layers)


def check_key_type(path: Path, key: str, value: Any, annotation: str) -> Any:
    """One config.json value checked against its dataclass annotation (``int``, ``float``,
    ``bool``, ``str``, ``list[str]``, ``dict``, each possibly ``| None``); ints widen to float.
    Shared by every family's config so that each refuses a bad key with the same words."""
    if value is None and "None" in annotation:
        return None
    where = f"{path}: key {key!r}"
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise InputError(f"{where} must be true or false, got {value!r}")
    elif annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where} must be an integer, got {value!r}")
    elif annotation.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where} must be a number, got {value!r}")
        value = float(value)
    elif annotation.startswith("str"):
        if not isinstance(value, str):
            raise InputError(f"{where} must be a string, got {value!r}")
    elif annotation.startswith("list"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{where} must be a list of strings, got {value!r}")
        value = list(value)
    elif annotation.startswith("dict") and not isinstance(value, dict):
        raise InputError(f"{where} must be a table/object, got {value!r}")
    return value


def typed_values(cls: type, raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The keys of ``raw`` that ``cls`` (a config dataclass) declares, each type-checked; a
    missing required key is an InputError naming every one that is missing."""
    declared = fields(cls)
    missing = [f.name for f in declared if f.default is MISSING and f.name not in raw]
    if missing:
        raise InputError(f"{path}: missing required key(s) {', '.join(map(repr, missing))}")
    return {f.name: check_key_type(path, f.name, raw[f.name], str(f.type))
            for f in declared if f.name in raw}


def config_from_dict(raw: dict[str, Any], path: Path) -> BailingHybridConfig:
    """Validate a parsed config.json; errors name ``path`` and the offending key."""
    archs = raw.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if ARCHITECTURE not in archs:
        raise InputError(
            f"{path}: 'architectures' is {archs!r}; this reference implements {ARCHITECTURE} "
            f"(Ling-2.6). Ling 3.0 (BailingMoeV3ForCausalLM) shares model_type "
            f"{MODEL_TYPE!r} but is a different model."
        )
    cfg = BailingHybridConfig(**typed_values(BailingHybridConfig, raw, path))
    _check_consistency(cfg, path)
    return cfg


def _check_consistency(cfg: BailingHybridConfig, path: Path) -> None:
    def bad(msg: str) -> InputError:
        return InputError(f"{path}: {msg}")

    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                "vocab_size", "layer_group_size", "group_norm_size", "kv_lora_rank"):
        if getattr(cfg, key) <= 0:
            raise bad(f"key {key!r} must be positive, got {getattr(cfg, key)}")
    if cfg.use_qkv_bias or cfg.use_bias:
        raise bad("use_qkv_bias/use_bias = true is not supported (Ling-2.6 has no biases)")
    if cfg.score_function != "sigmoid":
        raise bad(f"score_function {cfg.score_function!r}: Ling-2.6 routes with 'sigmoid'")
    if cfg.rope_scaling not in (None, {}):
        raise bad("rope_scaling is not supported by the reference (Ling-2.6-flash has null)")
    if cfg.gla_rope_dim <= 0 or cfg.gla_rope_dim % 2 or cfg.gla_rope_dim > cfg.head_dim:
        raise bad(
            f"head_dim * partial_rotary_factor = {cfg.gla_rope_dim} must be even and in "
            f"(0, head_dim={cfg.head_dim}]"
        )
    if cfg.qk_rope_head_dim % 2:
        raise bad(f"key 'qk_rope_head_dim' must be even, got {cfg.qk_rope_head_dim}")
    width = cfg.num_attention_heads * cfg.head_dim
    if width % cfg.group_norm_size:
        raise bad(
            f"group_norm_size {cfg.group_norm_size} (the number of groups) must divide "
            f"num_attention_heads*head_dim = {width}"
        )
    if cfg.num_experts % cfg.n_group:
        raise bad(f"n_group {cfg.n_group} must divide num_experts {cfg.num_experts}")
    if not 0 < cfg.topk_group <= cfg.n_group:
        raise bad(f"topk_group {cfg.topk_group} must be in [1, n_group={cfg.n_group}]")
    per_group = cfg.num_experts // cfg.n_group
    if cfg.n_group > 1 and per_group < 2:
        raise bad("group routing scores each group by its top-2 experts: need >= 2 per group")
    if cfg.num_experts_per_tok > cfg.topk_group * per_group:
        raise bad(
            f"num_experts_per_tok {cfg.num_experts_per_tok} exceeds the experts left after "
            f"the group limit ({cfg.topk_group} groups x {per_group})"
        )
    if not math.isfinite(cfg.rms_norm_eps) or cfg.rms_norm_eps <= 0:
        raise bad(f"rms_norm_eps must be a positive number, got {cfg.rms_norm_eps}")
    check_disputed(cfg, path)  # keys implementations read differently (references.disputed_keys)


def load_config(checkpoint_dir: Path) -> BailingHybridConfig:
    """Read and validate ``checkpoint_dir/config.json``."""
    path = Path(checkpoint_dir) / "config.json"
    return config_from_dict(read_config_json(path), path)


def read_config_json(path: Path) -> dict[str, Any]:
    """A config.json as a dict; every way it can be unusable is an InputError naming the file."""
    if not path.is_file():
        raise InputError(f"{path}: not found (a checkpoint directory needs config.json)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object at the top level")
    return raw
