"""Test helpers for llama.cpp: tiny GGUF files written directly with ``gguf.GGUFWriter`` (no
converter, no tokenizer), and :func:`require_llamacpp` (skip, or fail under CI's flag).

The worker's plumbing (callback capture, logits, cache continuity, crash handling) is tested on
a 2-layer random **llama**-architecture model: llama.cpp's most stable graph, so a failure
points at the harness rather than at a port.  ``tokenizer.ggml.model = "no_vocab"`` plus
``llama.vocab_size`` makes llama.cpp create dummy tokens, so no tokenizer data is needed.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from harness.llamacpp.build import missing_llamacpp


@dataclass(frozen=True)
class TinyLlama:
    """Shape of the tiny model; defaults mirror transformers' LlamaModelTester scale."""

    n_vocab: int = 64
    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 48
    n_ctx: int = 256
    rms_eps: float = 1e-5
    rope_base: float = 10000.0
    std: float = 0.2


def tensor_shapes(cfg: TinyLlama) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape (GGUFWriter reverses it into ggml's ``ne``)."""
    hd = cfg.n_embd // cfg.n_head
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (cfg.n_vocab, cfg.n_embd),
        "output_norm.weight": (cfg.n_embd,),
        "output.weight": (cfg.n_vocab, cfg.n_embd),
    }
    for i in range(cfg.n_layer):
        b = f"blk.{i}"
        shapes |= {
            f"{b}.attn_norm.weight": (cfg.n_embd,),
            f"{b}.attn_q.weight": (cfg.n_head * hd, cfg.n_embd),
            f"{b}.attn_k.weight": (cfg.n_head_kv * hd, cfg.n_embd),
            f"{b}.attn_v.weight": (cfg.n_head_kv * hd, cfg.n_embd),
            f"{b}.attn_output.weight": (cfg.n_embd, cfg.n_head * hd),
            f"{b}.ffn_norm.weight": (cfg.n_embd,),
            f"{b}.ffn_gate.weight": (cfg.n_ff, cfg.n_embd),
            f"{b}.ffn_up.weight": (cfg.n_ff, cfg.n_embd),
            f"{b}.ffn_down.weight": (cfg.n_embd, cfg.n_ff),
        }
    return shapes


def write_tiny_llama(
    path: Path, cfg: TinyLlama = TinyLlama(), *, seed: int = 0, drop: Collection[str] = ()
) -> Path:
    """Write a random f32 llama GGUF; ``drop`` omits tensors (to provoke a load failure)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_vocab_size(cfg.n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("no_vocab")
    return _write_random_tensors(w, path, tensor_shapes(cfg), drop, rng, cfg.std)


def _write_random_tensors(w, path: Path, shapes: dict[str, tuple[int, ...]],
                          drop: Collection[str], rng: np.random.Generator, std: float) -> Path:
    """Random f32 tensors (norms near 1, which keeps activations well scaled; KDA's ``ssm_a``
    negative), then the file written and closed."""
    for name, shape in shapes.items():
        if name in drop:
            continue
        if name.endswith("norm.weight"):
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".ssm_a"):
            arr = -np.abs(rng.standard_normal(shape)) - 0.5
        else:
            arr = std * rng.standard_normal(shape)
        w.add_tensor(name, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass(frozen=True)
class TinyBailingMoe3:
    """A tiny Ling 3.0 (``bailingmoe3``) GGUF: MLA + KDA layers, one dense lead layer, MoE after.

    The geometry copies llama.cpp's own ``tests/test-llama-archs.cpp`` fixture for this arch
    (n_embd 128, one head, MLA 192/128 with kv_lora 512 and rope 64, KDA head_dim 128), which
    upstream keeps loading; ``kda_layers`` picks the linear-attention layers.
    """

    n_vocab: int = 64
    n_embd: int = 128
    n_layer: int = 3
    kda_layers: tuple[int, ...] = (1,)
    n_head: int = 1
    n_ff: int = 192
    n_ff_exp: int = 192
    n_ff_shexp: int = 96
    n_expert: int = 4
    n_expert_used: int = 2
    n_dense_lead: int = 1
    q_lora_rank: int = 512
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_head_dim: int = 192  # nope 128 + rope 64
    v_head_dim: int = 128
    kda_head_dim: int = 128
    d_conv: int = 4
    kda_gate_lower_bound: float = -5.0  # llama.cpp GGML_ASSERTs < 0 at load
    n_ctx: int = 256
    rms_eps: float = 1e-6
    std: float = 0.05


def bailingmoe3_tensor_shapes(cfg: TinyBailingMoe3) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape, from ``llama_model_bailingmoe3::load_arch_tensors``."""
    e, h = cfg.n_embd, cfg.n_head
    d_inner = cfg.kda_head_dim * h
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (cfg.n_vocab, e),
        "output_norm.weight": (e,),
        "output.weight": (cfg.n_vocab, e),
    }
    for i in range(cfg.n_layer):
        b = f"blk.{i}"
        shapes[f"{b}.attn_norm.weight"] = (e,)
        if i in cfg.kda_layers:
            for x in "qkv":
                shapes[f"{b}.ssm_conv1d_{x}.weight"] = (1, d_inner, 1, cfg.d_conv)
                shapes[f"{b}.attn_{x}.weight"] = (d_inner, e)
            shapes |= {
                f"{b}.ssm_f_a.weight": (d_inner, e),
                f"{b}.ssm_beta.weight": (h, e),
                f"{b}.ssm_a": (h, 1),
                f"{b}.ssm_dt.bias": (d_inner,),
                f"{b}.ssm_g_a.weight": (d_inner, e),
                f"{b}.ssm_norm.weight": (cfg.kda_head_dim,),
                f"{b}.attn_output.weight": (e, d_inner),
            }
        else:
            shapes |= {
                f"{b}.attn_q_a.weight": (cfg.q_lora_rank, e),
                f"{b}.attn_q_a_norm.weight": (cfg.q_lora_rank,),
                f"{b}.attn_q_b.weight": (h * cfg.qk_head_dim, cfg.q_lora_rank),
                f"{b}.attn_kv_a_mqa.weight": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, e),
                f"{b}.attn_kv_a_norm.weight": (cfg.kv_lora_rank,),
                f"{b}.attn_k_b.weight": (
                    h,
                    cfg.kv_lora_rank,
                    cfg.qk_head_dim - cfg.qk_rope_head_dim,
                ),
                f"{b}.attn_v_b.weight": (h, cfg.v_head_dim, cfg.kv_lora_rank),
                f"{b}.attn_gate.weight": (h, e),
                f"{b}.attn_output.weight": (e, h * cfg.v_head_dim),
            }
        shapes[f"{b}.ffn_norm.weight"] = (e,)
        if i < cfg.n_dense_lead:
            shapes |= {
                f"{b}.ffn_gate.weight": (cfg.n_ff, e),
                f"{b}.ffn_up.weight": (cfg.n_ff, e),
                f"{b}.ffn_down.weight": (e, cfg.n_ff),
            }
        else:
            x, f = cfg.n_expert, cfg.n_ff_exp
            shapes |= {
                f"{b}.ffn_gate_inp.weight": (x, e),
                f"{b}.exp_probs_b.bias": (x,),
                f"{b}.ffn_gate_exps.weight": (x, f, e),
                f"{b}.ffn_up_exps.weight": (x, f, e),
                f"{b}.ffn_down_exps.weight": (x, e, f),
                f"{b}.ffn_gate_shexp.weight": (cfg.n_ff_shexp, e),
                f"{b}.ffn_up_shexp.weight": (cfg.n_ff_shexp, e),
                f"{b}.ffn_down_shexp.weight": (e, cfg.n_ff_shexp),
            }
    return shapes


def write_tiny_bailingmoe3(
    path: Path,
    cfg: TinyBailingMoe3 = TinyBailingMoe3(),
    *,
    seed: int = 0,
    drop: Collection[str] = (),
) -> Path:
    """Write a random f32 ``bailingmoe3`` GGUF with the keys its loader requires."""
    import gguf

    arch = "bailingmoe3"
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    heads = [0 if i in cfg.kda_layers else cfg.n_head for i in range(cfg.n_layer)]
    w.add_name("tiny-random-bailingmoe3")
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_array(f"{arch}.attention.head_count", heads)
    w.add_array(f"{arch}.attention.head_count_kv", heads)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_uint32(f"{arch}.attention.key_length", cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_uint32(f"{arch}.attention.value_length", cfg.kv_lora_rank)
    w.add_uint32(f"{arch}.attention.key_length_mla", cfg.qk_head_dim)
    w.add_uint32(f"{arch}.attention.value_length_mla", cfg.v_head_dim)
    w.add_uint32(f"{arch}.attention.q_lora_rank", cfg.q_lora_rank)
    w.add_uint32(f"{arch}.attention.kv_lora_rank", cfg.kv_lora_rank)
    w.add_uint32(f"{arch}.rope.dimension_count", cfg.qk_rope_head_dim)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_uint32(f"{arch}.ssm.conv_kernel", cfg.d_conv)
    w.add_uint32(f"{arch}.kda.head_dim", cfg.kda_head_dim)
    w.add_bool(f"{arch}.kda.safe_gate", True)
    w.add_float32(f"{arch}.kda.gate_lower_bound", cfg.kda_gate_lower_bound)
    w.add_uint32(f"{arch}.expert_count", cfg.n_expert)
    w.add_uint32(f"{arch}.expert_used_count", cfg.n_expert_used)
    w.add_uint32(f"{arch}.expert_shared_count", 1)
    w.add_uint32(f"{arch}.expert_feed_forward_length", cfg.n_ff_exp)
    w.add_uint32(f"{arch}.expert_shared_feed_forward_length", cfg.n_ff_shexp)
    w.add_uint32(f"{arch}.leading_dense_block_count", cfg.n_dense_lead)
    w.add_float32(f"{arch}.expert_weights_scale", 2.5)
    w.add_bool(f"{arch}.expert_weights_norm", True)
    w.add_uint32(f"{arch}.expert_gating_func", 2)  # sigmoid
    w.add_uint32(f"{arch}.vocab_size", cfg.n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("no_vocab")
    return _write_random_tensors(w, path, bailingmoe3_tensor_shapes(cfg), drop, rng, cfg.std)


REQUIRE_ENV = "BAILING_PARITY_REQUIRE_LLAMACPP"


def require_llamacpp() -> None:
    """Skip the calling test when llama.cpp is absent, or fail it if ``$REQUIRE_ENV=1``.

    CI that installs the backend sets the variable, so a broken install cannot pass as skips.
    """
    reason = missing_llamacpp()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    pytest.skip(reason)
