"""Deterministic synthetic Ling 3.0 checkpoints, made by transformers and normalised for everyone.

The weights come from transformers' own ``BailingHybridForCausalLM`` (so its module tree and
``save_pretrained`` reverse mapping define the tensor set), initialised under ``torch.manual_seed``.
transformers initialises every norm weight to 1 and the router's expert bias to 0; those are
perturbed (norms 1 + 0.1*N(0,1), biases 0.1*N(0,1)) so a port that drops one is caught.  Then
:mod:`references.ling3.normalize` turns the directory into the upstream layout that transformers,
mlx-lm and llama.cpp's converter all read.  The harness's tiny tokenizer of the config's
vocabulary, with a chat template, goes beside the weights
(:func:`references.tokenizer.write_checkpoint_tokenizer`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from references.ling3.config import Ling3Config, config_from_dict
from references.ling3.mtp import mtp_tensor_shapes
from references.ling3.normalize import normalise_config, normalise_tensors
from references.synthetic import SHAPING_KEY, Shaping
from references.tokenizer import write_checkpoint_tokenizer

# transformers' names of the trunk's residual-branch output projections (KDA/MLA o_proj, dense
# MLP and shared-expert down_proj, the stacked experts' down_proj)
TRUNK_RESIDUAL_OUTPUTS = (".o_proj.weight", ".down_proj.weight", ".experts.down_proj")

MTP_FILE = "model-mtp-layer.safetensors"


def transformers_config(config_json: dict[str, Any], cfg: Ling3Config) -> Any:
    """transformers' config for this model: only keys its schema knows, the upstream layer pattern.

    Keys transformers does not know (``score_function``, ``no_kda_lora``, ...) are left out so the
    config.json it writes shows exactly what it would write for a real model.
    """
    from transformers import BailingHybridConfig

    known = set(getattr(BailingHybridConfig, "__dataclass_fields__", {}))
    aliases = BailingHybridConfig.attribute_map
    known |= set(aliases) | set(aliases.values())
    kwargs = {k: v for k, v in config_json.items() if k in known}
    # transformers defaults num_key_value_heads to 32, not to num_attention_heads.
    kwargs["num_key_value_heads"] = cfg.num_key_value_heads or cfg.num_attention_heads
    kwargs["layer_types"] = cfg.upstream_layer_types()  # see normalize.CONFIG_RULES["layer_types"]
    # transformers defaults to one MTP layer and writes it into config.json even when the case
    # has none (no tensors then): the count is the case's.
    kwargs["num_mtp_layers"] = cfg.num_nextn_predict_layers
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # defaults lie outside tiny vocabs
        kwargs[key] = getattr(cfg, key)
    return BailingHybridConfig(**kwargs)


def build_model(config_json: dict[str, Any], seed: int, shaping: Shaping | None = None) -> Any:
    """transformers' model with the seeded init and every norm weight and bias made non-trivial,
    then shaped by ``shaping`` (None or the defaults: untouched)."""
    import torch
    from transformers import BailingHybridForCausalLM

    cfg = config_from_dict(config_json, Path("config.json"))
    hf_cfg = transformers_config(config_json, cfg)
    torch.manual_seed(seed)
    model = BailingHybridForCausalLM(hf_cfg).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(
            [*model.named_parameters(), *model.named_buffers()], key=lambda kv: kv[0]
        ):
            if name.endswith("norm.weight"):  # RMSNorm and the gated o_norm
                tensor.copy_(1.0 + 0.1 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith((".bias", "e_score_correction_bias")):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
        if shaping is not None and shaping != Shaping():
            for name, tensor in model.named_parameters():
                shaped = shaping.apply_named(
                    name, False, tensor.double().numpy(), TRUNK_RESIDUAL_OUTPUTS
                )
                tensor.copy_(torch.from_numpy(shaped))
    return model


def write_synthetic_checkpoint(config_json: dict[str, Any], seed: int, out_dir: Path) -> None:
    """Write a normalised Ling 3.0 checkpoint (>= 2 shards, index, MTP shard, tokenizer) into
    ``out_dir``."""
    out_dir = Path(out_dir)
    shaping = Shaping.from_dict(
        config_json.get(SHAPING_KEY), f"{out_dir / 'config.json'}: {SHAPING_KEY}"
    )
    config_json = {k: v for k, v in config_json.items() if k != SHAPING_KEY}
    cfg = config_from_dict(config_json, out_dir / "config.json")
    model = build_model(config_json, seed, shaping)
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    # Half the bytes per shard: even a tiny model exercises the index with >= 2 shards.
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=total // 2 + 1)
    _ensure_index(out_dir)
    config_path = out_dir / "config.json"
    written = json.loads(config_path.read_text())
    normalised, _ = normalise_config(written, cfg)
    # Upstream-only keys the case gave (tokens, flags) are kept as given.
    normalised.update({k: v for k, v in config_json.items() if k not in normalised})
    config_path.write_text(json.dumps(normalised, indent=2, sort_keys=True))
    normalise_tensors(out_dir, cfg)
    if cfg.num_nextn_predict_layers:
        _write_mtp_layer(out_dir, cfg, seed, shaping)
    write_checkpoint_tokenizer(out_dir, cfg.vocab_size)


def _ensure_index(out_dir: Path) -> None:
    """A single-file save gets an index too, so the normaliser always edits one layout."""
    index_path = out_dir / "model.safetensors.index.json"
    if index_path.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model.safetensors")}
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))


def _write_mtp_layer(out_dir: Path, cfg: Ling3Config, seed: int, shaping: Shaping) -> None:
    """The MTP layer in its own shard, listed in the index (no loader here runs it)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for name, shape in mtp_tensor_shapes(cfg).items():
        noise = torch.randn(shape, generator=gen)
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.1 * noise
        elif name.endswith("expert_bias"):
            tensors[name] = 0.1 * noise
        else:
            values = (cfg.initializer_range * noise).double().numpy()
            values = shaping.apply_named(name, True, values)
            tensors[name] = torch.from_numpy(values).float()
    save_file(tensors, str(out_dir / MTP_FILE), metadata={"format": "pt"})
    index_path = out_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update(dict.fromkeys(tensors, MTP_FILE))
    meta = index.setdefault("metadata", {})
    if "total_size" in meta:
        meta["total_size"] = int(meta["total_size"]) + sum(
            t.numel() * t.element_size() for t in tensors.values()
        )
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
