"""Our reference MTP (NextN) head for Ling 3.0: transformers' ``BailingHybridForCausalLM`` has none.

The trunk is the Ling 3.0 reference (transformers, float64, :mod:`harness.backends.
transformers_ling3`); the head on top of it is written here in plain torch from the reference's own
blocks, with the NextN math Ant uses for the whole family (ling26-architecture.md §3.1; upstream
llama.cpp's ``bailingmoe3`` ``graph_mtp`` builds the same graph):

    e = enorm(Embed(token t+1));  h = hnorm(model.norm(x_L)[t])          (post-norm trunk hidden)
    u = eh_proj [e ; h]                                                   (embedding first)
    u' = u + MLA(input_layernorm(u))      Ling 3.0's MLA: q-LoRA or q_proj, latent KV, interleaved
                                          RoPE at position t, head-wise gate sigmoid(g_proj a)
    v = u' + MoE(post_attention_layernorm(u'))   sigmoid group routing with its own expert_bias,
                                                 shared experts
    logits = lm_head(final_layernorm(v))  (the shared head; no model.norm)

The MTP layer is ``model.layers.{num_hidden_layers}`` in the upstream checkpoint layout (its own
shard).  The five MTP knobs of :class:`references.variant.Variant` apply exactly as for Ling-2.6,
so a mutant head models the wrong port it names.  Caveat, as for the trunk: transformers computes
its norms in float32, so the hidden the head reads is float32-accurate; the head itself runs in the
trunk's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.core.errors import InputError
from references.activation_rounding import declared
from references.checkpoint_io import read_tensors, weight_files
from references.ling3.config import Ling3Config, load_config
from references.mla import MLACache, MLADims, MlaImpl, MLAWeights, mla_forward
from references.model import Block, MTPHead
from references.moe import MoEWeights, RouterConfig, SwiGLUWeights, moe_forward
from references.mtp_session import DraftingSession, truncate_mla_cache
from references.ops import accumulation_dtype, linear, rms_norm
from references.variant import CORRECT, Variant, mutations

MTP_VARIANT_KEY = "variant"  # torch option naming an MTP mutation, e.g. variant=mtp_wrong_token


def mtp_tensor_shapes(cfg: Ling3Config) -> dict[str, tuple[int, ...]]:
    """The MTP layer (one MLA + MoE block plus the NextN glue) in the upstream/llama.cpp naming."""
    h, n_heads, layer = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    shapes: dict[str, tuple[int, ...]] = {}
    p = f"model.layers.{layer}."
    for norm in ("input_layernorm", "post_attention_layernorm", "enorm", "hnorm",
                 "final_layernorm"):
        shapes[f"{p}{norm}.weight"] = (h,)
    shapes[f"{p}eh_proj.weight"] = (h, 2 * h)
    a = f"{p}attention."
    if cfg.q_lora_rank:
        shapes[f"{a}q_a_proj.weight"] = (cfg.q_lora_rank, h)
        shapes[f"{a}q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        shapes[f"{a}q_b_proj.weight"] = (n_heads * cfg.qk_head_dim, cfg.q_lora_rank)
    else:
        shapes[f"{a}q_proj.weight"] = (n_heads * cfg.qk_head_dim, h)
    shapes[f"{a}kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
    shapes[f"{a}kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
    shapes[f"{a}kv_b_proj.weight"] = (
        n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank
    )
    shapes[f"{a}g_proj.weight"] = (n_heads, h)
    shapes[f"{a}dense.weight"] = (h, n_heads * cfg.v_head_dim)
    m = f"{p}mlp."
    shapes[f"{m}gate.weight"] = (cfg.num_experts, h)
    shapes[f"{m}gate.expert_bias"] = (cfg.num_experts,)
    inter, shared = cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.num_shared_experts
    for e in range(cfg.num_experts):
        shapes[f"{m}experts.{e}.gate_proj.weight"] = (inter, h)
        shapes[f"{m}experts.{e}.up_proj.weight"] = (inter, h)
        shapes[f"{m}experts.{e}.down_proj.weight"] = (h, inter)
    shapes[f"{m}shared_experts.gate_proj.weight"] = (shared, h)
    shapes[f"{m}shared_experts.up_proj.weight"] = (shared, h)
    shapes[f"{m}shared_experts.down_proj.weight"] = (h, shared)
    return shapes


def read_mtp_weights(
    checkpoint_dir: Path, cfg: Ling3Config, dtype: torch.dtype, device: str = "cpu",
    declare: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    source: Any = None,
) -> MTPHead:
    """Read and check ``model.layers.{L}.*``; a missing or ill-shaped tensor names file and name.

    ``source``: a weight source (``has``/``get`` under the checkpoint's names: a quantized port's
    own weights) read instead of the checkpoint's files; ``declare(name, tensor)`` marks how that
    port rounds the input of each weight (:mod:`references.activation_rounding`)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not cfg.num_nextn_predict_layers:
        raise InputError(
            f"{checkpoint_dir / 'config.json'}: num_nextn_predict_layers is 0: no MTP head to "
            "draft with"
        )
    shapes = mtp_tensor_shapes(cfg)
    where = weight_files(checkpoint_dir) if source is None else {
        n: getattr(source, "path", "the port's weights") for n in shapes if source.has(n)}
    missing = [n for n in shapes if n not in where]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise InputError(
            f"{checkpoint_dir if source is None else next(iter(where.values()), source)}: "
            f"missing MTP tensor(s) {', '.join(missing[:3])}{more} "
            f"(config.json has num_nextn_predict_layers = {cfg.num_nextn_predict_layers})"
        )
    arrays = read_tensors(where, shapes) if source is None else {}
    acc = accumulation_dtype(dtype)

    def get(name: str, as_dtype: torch.dtype = dtype) -> torch.Tensor:
        if source is None:
            t = torch.from_numpy(arrays[name]).to(device=device, dtype=as_dtype)
        else:
            t = source.get(name, as_dtype, torch.device(device))
            if tuple(t.shape) != shapes[name]:
                raise InputError(f"{where[name]}: {name} has shape {tuple(t.shape)}, the "
                                 f"config implies {shapes[name]}")
        return t if declare is None else declare(name, t)

    def swiglu(prefix: str) -> SwiGLUWeights:
        return SwiGLUWeights(
            gate=get(f"{prefix}.gate_proj.weight"),
            up=get(f"{prefix}.up_proj.weight"),
            down=get(f"{prefix}.down_proj.weight"),
        )

    p = f"model.layers.{cfg.num_hidden_layers}."
    m = f"{p}mlp."
    return MTPHead(  # the Ling-2.6 reference's containers: the same NextN layout
        enorm=get(f"{p}enorm.weight"),
        hnorm=get(f"{p}hnorm.weight"),
        eh_proj=get(f"{p}eh_proj.weight"),
        final_norm=get(f"{p}final_layernorm.weight"),
        block=Block(
            input_norm=get(f"{p}input_layernorm.weight"),
            post_norm=get(f"{p}post_attention_layernorm.weight"),
            attention=mla_weights(get, f"{p}attention.", cfg),  # with g_proj, the head gate
            ffn=MoEWeights(
                router=get(f"{m}gate.weight"),
                expert_bias=get(f"{m}gate.expert_bias", acc),  # float32+ as in every loader
                experts=tuple(swiglu(f"{m}experts.{e}") for e in range(cfg.num_experts)),
                shared=swiglu(f"{m}shared_experts"),
            ),
        ),
    )


def mla_weights(
    get: Callable[[str], torch.Tensor], prefix: str, cfg: Ling3Config
) -> MLAWeights:
    """One Ling 3.0 MLA block's weights (``prefix`` = ``model.layers.{i}.attention.``; upstream
    names: ``dense`` is the output projection, ``g_proj`` the head-wise gate)."""
    q = (
        {
            "q_a_proj": get(f"{prefix}q_a_proj.weight"),
            "q_a_norm": get(f"{prefix}q_a_layernorm.weight"),
            "q_b_proj": get(f"{prefix}q_b_proj.weight"),
        }
        if cfg.q_lora_rank
        else {"q_proj": get(f"{prefix}q_proj.weight")}
    )
    return MLAWeights(
        kv_a_proj=get(f"{prefix}kv_a_proj_with_mqa.weight"),
        kv_a_norm=get(f"{prefix}kv_a_layernorm.weight"),
        kv_b_proj=get(f"{prefix}kv_b_proj.weight"),
        dense=get(f"{prefix}dense.weight"),
        g_proj=get(f"{prefix}g_proj.weight"),
        **q,
    )


class Ling3MtpHead:
    """The NextN head's math (module doc) over the shared embedding and lm_head."""

    def __init__(
        self,
        cfg: Ling3Config,
        weights: MTPHead,
        *,
        embed: torch.Tensor,
        lm_head: torch.Tensor,
        trunk_norm: torch.Tensor,
        variant: Variant = CORRECT,
    ) -> None:
        self.cfg, self.w, self.variant = cfg, weights, variant
        self.embed, self.lm_head, self.trunk_norm = embed, lm_head, trunk_norm
        self.eps = cfg.rms_norm_eps
        self.dims = MLADims.from_config(cfg)
        self.router = RouterConfig.from_config(cfg)
        moe = weights.block.ffn
        assert isinstance(moe, MoEWeights) and isinstance(weights.block.attention, MLAWeights)
        self.attention: MLAWeights = weights.block.attention
        # On a port's weights that declare its rounding, MLA attends as the port does: absorbed.
        self.mla_impl: MlaImpl = ("naive" if declared(self.attention.kv_b_proj) is None
                                  else "absorbed")
        # A port whose MTP router ignores expert_bias (the known Ling-2.6 fork's mistake).
        self.moe = moe if variant.mtp_router_bias else replace(moe, expert_bias=None)

    def forward(
        self,
        hidden: torch.Tensor,
        ids: Sequence[int],
        cache: MLACache,
        record: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP rows for the next ``len(ids)`` positions (from ``cache.length``; extends the cache):
        (block outputs before the final norm, logits).  ``record`` collects the mtp_* points."""
        w, v, eps = self.w, self.variant, self.eps
        rec = record if record is not None else {}
        ids_t = torch.tensor(list(ids), dtype=torch.long, device=self.embed.device)
        e = rms_norm(self.embed[ids_t], w.enorm, eps)
        rec["mtp_enorm"] = e
        hn = rms_norm(hidden, w.hnorm, eps)
        rec["mtp_hnorm"] = hn
        pair = (e, hn) if v.mtp_concat == "embed_first" else (hn, e)
        u = linear(torch.cat(pair, dim=-1), w.eh_proj)
        rec["mtp_eh_proj"] = u
        block = w.block
        attn, _ = mla_forward(rms_norm(u, block.input_norm, eps), self.attention, self.dims, cache,
                              impl=self.mla_impl)
        rec["mtp_attn_out"] = attn
        h = u + attn
        rec["mtp_ffn_inp"] = h
        moe = moe_forward(rms_norm(h, block.post_norm, eps), self.moe, self.router)
        rec["mtp_ffn_moe_topk"] = moe.routing.ids
        rec["mtp_ffn_moe_weights"] = moe.routing.weights
        rec["mtp_ffn_out"] = moe.out
        y = h + moe.out
        rec["mtp_l_out"] = y
        final = w.final_norm if v.mtp_final_norm == "mtp_final_layernorm" else self.trunk_norm
        normed = rms_norm(y, final, eps)
        rec["mtp_result_norm"] = normed
        logits = linear(normed, self.lm_head)
        rec["mtp_result_output"] = logits
        return y, logits


class Ling3ReferenceMtpModel:
    """transformers' Ling 3.0 trunk with our MTP head, as a :class:`harness.checks.mtp.MtpModel`."""

    def __init__(self, trunk: Any, head: Ling3MtpHead, label: str = "torch-float64") -> None:
        self.trunk = trunk  # harness.backends.transformers_ling3.TransformersLing3Model
        self.head = head
        self.label = label
        self.vocab_size = head.cfg.vocab_size

    def start(self) -> Ling3MtpSession:
        return Ling3MtpSession(self)

    @torch.no_grad()
    def capture(self, tokens: Sequence[int],
                anchors: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Teacher forcing: the trunk on ``tokens``, then the head's rows for positions 0..T-2
        (the next token is known there), every mtp_* point plus the trunk's logits.
        ``anchors``: a port's trunk rows each sublayer starts from, as in a prefill."""
        tokens = [int(t) for t in tokens]
        if len(tokens) < 2:
            raise InputError("MTP capture needs at least two tokens")
        session = Ling3MtpSession(self, anchors)
        logits = session.feed(tokens)
        assert session._pending is not None
        stop = len(tokens) - 1
        record: dict[str, torch.Tensor] = {}
        ids = session._ids(tokens, 0, stop)
        self.head.forward(session._pending[:stop], ids, MLACache(), record)
        out = {k: _numpy(v) for k, v in record.items()}
        out["result_output"] = logits
        return out


class Ling3MtpSession(DraftingSession):
    """One sequence: transformers' cache for the trunk, an MLA cache for the head."""

    def __init__(self, model: Ling3ReferenceMtpModel,
                 anchors: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self._model = model
        self.token_shift = model.head.variant.mtp_token_shift
        self._last = f"l_out-{model.trunk.n_layers - 1}"
        wanted = ["result_norm"] if model.head.variant.mtp_hidden == "post_norm" else [self._last]
        self._trunk_session = (model.trunk.start(wanted) if not anchors
                               else model.trunk.start(wanted, anchors=anchors))
        self._mtp_cache = MLACache()

    def _trunk(self, tokens: list[int]) -> tuple[np.ndarray, torch.Tensor]:
        caps = self._trunk_session.feed(tokens)
        name = "result_norm" if self._model.head.variant.mtp_hidden == "post_norm" else self._last
        hidden = torch.from_numpy(caps[name]).to(self._model.head.embed)
        return caps["result_output"], hidden

    def _head(
        self, hidden: torch.Tensor, ids: list[int], start: int
    ) -> tuple[torch.Tensor, np.ndarray]:
        assert self._mtp_cache.length == start, "MTP cache out of step with the positions"
        y, logits = self._model.head.forward(hidden, ids, self._mtp_cache)
        return y, _numpy(logits)

    def _truncate_head(self, length: int) -> None:
        truncate_mla_cache(self._mtp_cache, length)

    def _save(self) -> object:
        return self._trunk_session.snapshot(), (self._mtp_cache.latent, self._mtp_cache.k_pe)

    def _load(self, state: object) -> None:
        trunk, (self._mtp_cache.latent, self._mtp_cache.k_pe) = state  # type: ignore[misc]
        self._trunk_session.restore(trunk)


def mtp_variant(extra: dict[str, str]) -> tuple[Variant, dict[str, str]]:
    """(the MTP variant named by ``variant=``, the remaining options); only MTP knobs apply to
    Ling 3.0 -- the trunk is transformers', which has no knobs."""
    extra = dict(extra)
    name = extra.pop(MTP_VARIANT_KEY, None)
    if name is None:
        return CORRECT, extra
    known = sorted(m for m in mutations() if m.startswith("mtp_"))
    if name not in known:
        raise InputError(
            f"torch (Ling 3.0): variant {name!r} does not apply; the Ling 3.0 reference takes "
            f"only the MTP mutations: {', '.join(known)}"
        )
    return mutations()[name], extra


# (checkpoint dir, options without ``variant``) -> the loaded trunk, whose ``.model`` is
# transformers' BailingHybridForCausalLM (harness.backends.transformers_ling3.load_ling3).
TrunkLoader = Callable[[Path, Any], Any]


def load_ling3_mtp(
    checkpoint_dir: Path,
    options: Any,
    label: str = "torch-float64",
    *,
    load_trunk: TrunkLoader,
) -> Ling3ReferenceMtpModel:
    """transformers' trunk in ``options.dtype`` plus our head from ``model.layers.{L}``.

    The caller passes the trunk's loader: the reference never imports a backend."""
    checkpoint_dir = Path(checkpoint_dir)
    variant, extra = mtp_variant(options.extra)
    cfg = load_config(checkpoint_dir)
    if not cfg.num_nextn_predict_layers:
        raise InputError(
            f"{checkpoint_dir / 'config.json'}: num_nextn_predict_layers is 0: no MTP head to "
            "draft with"
        )
    trunk = load_trunk(checkpoint_dir, replace(options, extra=extra))
    hf = trunk.model
    embed = hf.model.embed_tokens.weight.detach()
    # a trunk on a port's weights: the head reads them too, and rounds where the port does
    port = getattr(trunk, "port_arithmetic", None)
    weights = read_mtp_weights(checkpoint_dir, cfg, embed.dtype, str(embed.device),
                               None if port is None else port.declare,
                               source=getattr(trunk, "weights_source", None))
    head = Ling3MtpHead(
        cfg,
        weights,
        embed=embed,
        lm_head=hf.lm_head.weight,  # keeps what it declares (a port's rounding)
        trunk_norm=hf.model.norm.weight.detach(),
        variant=variant,
    )
    return Ling3ReferenceMtpModel(trunk, head, label)


def _numpy(x: torch.Tensor) -> np.ndarray:
    if not x.is_floating_point():
        return x.detach().cpu().to(torch.int64).numpy()
    return x.detach().to("cpu", torch.float64).numpy()
