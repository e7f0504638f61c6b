"""Ling-2.6 (BailingMoeV2_5) as remote code: the project's own model in the shape of the
``trust_remote_code`` file a checkpoint ships, for the ``hf_remote`` backend's tests.

Written from the architecture doc's formulas, not from the authors' file: module names follow the
checkpoint's tensor names, the GLA decay is computed from ``layer_idx`` (a per-layer factor times
ALiBi-style head slopes), every step runs in the model's dtype.  Tests derive variants by
replacing the lines marked ``# SLOPE`` (the decay convention), ``# ROUTE`` (the routing
scores) and ``# LOGITS`` (the router's precision) in a copy of this file.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_ling26_remote import Ling26RemoteConfig


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class GroupRMSNorm(nn.Module):
    def __init__(self, size, groups, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.groups, self.eps = groups, eps

    def forward(self, x):
        g = x.reshape(*x.shape[:-1], self.groups, -1)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.reshape(x.shape)


def rotate(x, positions, dim, base, interleaved):
    """RoPE on the first ``dim`` channels: pairs (2i, 2i+1) or (i, i + dim/2)."""
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = positions.to(torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    rot, rest = x[..., :dim], x[..., dim:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), -1).flatten(-2)
    else:
        a, b = rot[..., : dim // 2], rot[..., dim // 2 :]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), -1)
    return torch.cat((out, rest), -1)


def head_slopes(n):
    def power_of_two(m):
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
        return [start ** (i + 1) for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    p = 2 ** math.floor(math.log2(n))
    return power_of_two(p) + power_of_two(2 * p)[0::2][: n - p]


class LinearAttention(nn.Module):
    """Simple GLA with a fixed per-head decay, QK-norm, partial half-split RoPE, GroupRMSNorm and
    a sigmoid output gate."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        h, n, d = config.hidden_size, config.num_attention_heads, config.head_dim
        self.query_key_value = nn.Linear(h, 3 * n * d, bias=False)
        self.query_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.key_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.g_proj = nn.Linear(h, n * d, bias=False)
        self.g_norm = GroupRMSNorm(n * d, config.group_norm_size, config.rms_norm_eps)
        self.dense = nn.Linear(n * d, h, bias=False)

    def log_decay(self):
        n_layers = self.config.num_hidden_layers
        denom = max(1, n_layers - 1)
        factor = 1 - self.layer_idx / denom + 1e-5  # SLOPE
        return -torch.tensor(head_slopes(self.config.num_attention_heads)) * factor

    def forward(self, x):
        cfg = self.config
        b, t, _ = x.shape
        n, d = cfg.num_attention_heads, cfg.head_dim
        q, k, v = self.query_key_value(x).view(b, t, 3 * n, d).split(n, dim=2)
        q, k = self.query_layernorm(q), self.key_layernorm(k)
        pos = torch.arange(t)
        rdim = int(d * cfg.partial_rotary_factor)
        q = rotate(q.transpose(1, 2), pos, rdim, cfg.rope_theta, False)  # [B, H, T, D]
        k = rotate(k.transpose(1, 2), pos, rdim, cfg.rope_theta, False)
        v = v.transpose(1, 2)
        lam = self.log_decay().to(x.dtype).exp()[None, :, None, None]
        state = x.new_zeros(b, n, d, d)
        outs = []
        for i in range(t):
            state = lam * state + k[:, :, i, :, None] * v[:, :, i, None, :]
            outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, i] * d**-0.5, state))
        o = torch.stack(outs, dim=2).transpose(1, 2).reshape(b, t, n * d)
        return self.dense(self.g_norm(o) * torch.sigmoid(self.g_proj(x)))


class MLAttention(nn.Module):
    """Multi-head latent attention with a q-LoRA (or plain q_proj) and interleaved RoPE."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        h, n = config.hidden_size, config.num_attention_heads
        self.qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(h, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(config.q_lora_rank, n * self.qk, bias=False)
        else:
            self.q_proj = nn.Linear(h, n * self.qk, bias=False)
        c = config.kv_lora_rank
        self.kv_a_proj_with_mqa = nn.Linear(h, c + config.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c, 1e-6)
        self.kv_b_proj = nn.Linear(
            c, n * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        self.dense = nn.Linear(n * config.v_head_dim, h, bias=False)

    def forward(self, x):
        cfg = self.config
        b, t, _ = x.shape
        n, nope, rope, dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                             cfg.qk_rope_head_dim, cfg.v_head_dim)
        if cfg.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(b, t, n, self.qk).transpose(1, 2).split([nope, rope], -1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, rope], -1)
        c = self.kv_a_layernorm(c)
        k_nope, v = self.kv_b_proj(c).view(b, t, n, nope + dv).transpose(1, 2).split([nope, dv], -1)
        pos = torch.arange(t)
        q_pe = rotate(q_pe, pos, rope, cfg.rope_theta, True)
        k_pe = rotate(k_pe[:, None], pos, rope, cfg.rope_theta, True)
        scores = (q_nope @ k_nope.transpose(-1, -2) + q_pe @ k_pe.transpose(-1, -2)) * self.qk**-0.5
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return self.dense((p @ v).transpose(1, 2).reshape(b, t, n * dv))


class MLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Sigmoid router with a selection-only expert bias and a group limit; returns
    (expert ids, routing weights, router logits)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, x):
        cfg = self.config
        logits = F.linear(x, self.weight)  # LOGITS
        probs = torch.sigmoid(logits)
        scores = probs + self.expert_bias  # ROUTE
        groups = scores.view(*scores.shape[:-1], cfg.n_group, -1)
        best = groups.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices
        keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter(-1, best, True)
        scores = groups.masked_fill(~keep[..., None], float("-inf")).view_as(scores)
        ids = scores.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = probs.gather(-1, ids)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * cfg.routed_scaling_factor, logits


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = Gate(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.num_experts))
        self.shared_experts = MLP(
            config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)

    def forward(self, x):
        ids, weights, _ = self.gate(x)
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():
            hit = (ids == e).to(x.dtype) * weights  # [B, T, k]
            out = out + hit.sum(-1, keepdim=True) * self.experts[e](x)
        return out + self.shared_experts(x)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx, mla):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.attention = MLAttention(config) if mla else LinearAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(h, eps)
        moe = layer_idx >= config.first_k_dense_replace
        self.mlp = MoE(config) if moe else MLP(h, config.intermediate_size)

    def forward(self, x):
        h = x + self.attention(self.input_layernorm(x))
        return h + self.mlp(self.post_attention_layernorm(h))


class MTPLayer(DecoderLayer):
    """The NextN layer's weights (loaded, not run: this model drafts nothing)."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx, mla=True)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.enorm, self.hnorm = RMSNorm(h, eps), RMSNorm(h, eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.final_layernorm = RMSNorm(h, eps)


def is_mla(config, layer):
    g, n = config.layer_group_size, config.num_hidden_layers
    return (layer + 1) % g == 0 or layer >= (n // g) * g


class Ling26RemotePreTrainedModel(PreTrainedModel):
    config_class = Ling26RemoteConfig
    base_model_prefix = "model"

    def _init_weights(self, module):
        pass  # every weight comes from the checkpoint


class Ling26RemoteModel(Ling26RemotePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        n = config.num_hidden_layers
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(config, i, is_mla(config, i)) for i in range(n)]
            + [MTPLayer(config, n + i) for i in range(config.num_nextn_predict_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids):
        x = self.word_embeddings(input_ids)
        for layer in self.layers[: self.config.num_hidden_layers]:
            x = layer(x)
        return self.norm(x)


class Ling26RemoteForCausalLM(Ling26RemotePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = Ling26RemoteModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, **kwargs):
        return CausalLMOutputWithPast(logits=self.lm_head(self.model(input_ids)))
