"""The Ling-2.6 (`BailingMoeV2_5ForCausalLM`) trunk and MTP head, as a readable reference.

Forward (doc §2.2): x = Embed(tokens); per layer, pre-norm

    a = RMSNorm_in(x);   h = x + Attn(a)   (MLA or GLA by the layer rule)
    y = h + FFN(RMSNorm_post(h))           (dense SwiGLU for l < first_k_dense_replace, else MoE)

then logits = lm_head(RMSNorm_model(x_L)).  A :class:`ReferenceSession` keeps the decode caches
(MLA latents, GLA states, the position) so a prompt fed at once and fed token by token give the
same numbers; float64 makes that exact to rounding.  Every knob of :class:`Variant` is applied at
the single line where its math differs.

Two ways to hold the weights (``ReferenceOptions.load``), one forward code: ``memory`` converts
every tensor to the compute dtype once; ``streamed`` reads each weight from the memory-mapped
safetensors when the forward reaches it and drops it after (:mod:`references.weights`), so memory
does not grow with layers or experts: a layer's attention, then its FFN (routed experts one at a
time, only those some token was routed to), the embedding rows of the tokens fed, ``lm_head`` in
vocabulary blocks.  ``auto`` (the default) picks by size (:func:`references.weights.choose_load`).

Router-forced runs (judging a quantized port): ``start(forced_routing={layer: ids [T, k]})`` makes
those MoE layers use the candidate's expert ids instead of their own top-k, so one flipped
near-tie does not make every later point diverge; ``session.routing_margins`` says how far each
forced choice was from a tie (:func:`references.moe.routing_margins`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from harness.core import capture_points
from harness.core.errors import InputError
from references.checkpoint_io import planned_tensors, read_tensors
from references.config import BailingHybridConfig, load_config
from references.disputed_keys import check_disputed
from references.gla import gla_chunked, gla_recurrent
from references.mla import MLACache, MLADims, MLAWeights, mla_forward
from references.moe import (
    MoEWeights,
    RouterConfig,
    Routing,
    SwiGLUWeights,
    check_forced_ids,
    moe_forward,
)
from references.ops import (
    accumulation_dtype,
    group_rms_norm,
    linear,
    log_decay,
    rms_norm,
    rope,
    swiglu,
)
from references.variant import CORRECT, Variant
from references.weights import (
    BLOCK_BYTES,
    LOAD_MODES,
    LoadMode,
    MemoryWeights,
    StreamedWeights,
    WeightSource,
    choose_load,
    release_freed_memory,
    streamed_source,
)

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


# Points another model's values can stand in for (BailingHybridReference.start's anchors):
# the residual stream and the norms that feed matmuls.
ANCHOR_STEMS = ("attn_norm", "ffn_inp", "ffn_norm", "l_out")


@dataclass(frozen=True)
class ReferenceOptions:
    """How the reference computes; only ``variant`` changes the math itself."""

    dtype: Literal["float64", "float32", "bfloat16"] = "float64"
    device: str = "cpu"
    gla_impl: Literal["chunked", "recurrent"] = "chunked"
    chunk_size: int = 64
    mla_impl: Literal["naive", "absorbed"] = "naive"
    variant: Variant = CORRECT
    # How weights are held (not the math): memory, streamed from the files, or chosen by size.
    load: LoadMode = "auto"

    def __post_init__(self) -> None:
        choices = {
            "dtype": tuple(TORCH_DTYPES),
            "gla_impl": ("chunked", "recurrent"),
            "mla_impl": ("naive", "absorbed"),
            "load": LOAD_MODES,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r}; expected one of {allowed}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int):
            raise ValueError(f"chunk_size must be an integer, got {self.chunk_size!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not isinstance(self.variant, Variant):
            raise ValueError(f"variant must be a Variant, got {self.variant!r}")


def layer_is_mla(cfg: BailingHybridConfig, layer: int, variant: Variant = CORRECT) -> bool:
    """The layer rule: MLA iff (l+1) % G == 0, or (tail clause) l >= floor(L/G)*G."""
    if variant.tail_clause:
        return cfg.is_mla(layer)
    return (layer + 1) % cfg.layer_group_size == 0


@dataclass(frozen=True)
class GLAWeights:
    """One GLA layer: fused [Q|K|V] projection, QK-norms, output gate, GroupRMSNorm, dense."""

    qkv: torch.Tensor  # [3*H*D, hidden], rows [Q_all | K_all | V_all], D fastest
    q_norm: torch.Tensor  # [D]
    k_norm: torch.Tensor  # [D]
    g_proj: torch.Tensor  # [H*D, hidden]
    g_norm: torch.Tensor  # [H*D]
    dense: torch.Tensor  # [hidden, H*D]
    log_decay: torch.Tensor  # [H] g_h(l) < 0: computed, never stored in the checkpoint

    def linear(self, field: str, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, self.<field>)`` for the projections qkv, g_proj and dense."""
        return linear(x, getattr(self, field))


_GLA_TENSORS = {"qkv": "query_key_value", "q_norm": "query_layernorm",
                "k_norm": "key_layernorm", "g_proj": "g_proj", "g_norm": "g_norm",
                "dense": "dense"}


class StreamedGLAWeights(GLAWeights):
    """A streamed GLA layer: each weight is read when accessed, so the forward holds one matrix
    at a time; :meth:`linear` applies a projection in row blocks past :data:`BLOCK_BYTES`."""

    def __init__(self, model: BailingHybridReference, prefix: str, log_decay: torch.Tensor):
        object.__setattr__(self, "_m", model)
        object.__setattr__(self, "_a", prefix)
        object.__setattr__(self, "log_decay", log_decay)

    def __getattribute__(self, key: str):  # the weights are read on access
        if key in _GLA_TENSORS:
            m, a = object.__getattribute__(self, "_m"), object.__getattribute__(self, "_a")
            return m._get(f"{a}.{_GLA_TENSORS[key]}.weight")
        return object.__getattribute__(self, key)

    def linear(self, field: str, x: torch.Tensor) -> torch.Tensor:
        m, name = self._m, f"{self._a}.{_GLA_TENSORS[field]}.weight"
        rows, width = m._source.shape(name)
        step = max(1, BLOCK_BYTES // (width * _itemsize(m.dtype)))
        if step >= rows:  # the in-memory computation, to the bit
            return linear(x, m._get(name))
        return torch.cat([linear(x, m._get(name, rows=(s, min(rows, s + step))))
                          for s in range(0, rows, step)], dim=-1)


@dataclass(frozen=True)
class Block:
    """One decoder layer."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attention: MLAWeights | GLAWeights
    ffn: SwiGLUWeights | MoEWeights


class StreamedBlock:
    """A decoder layer of a streamed model: each attribute reads its weights when asked."""

    def __init__(self, model: BailingHybridReference, layer: int, *, mla: bool, moe: bool,
                 mtp: bool = False) -> None:
        self._m, self.layer, self.mla, self.moe, self.mtp = model, layer, mla, moe, mtp
        self._p = f"model.layers.{layer}"

    @property
    def input_norm(self) -> torch.Tensor:
        return self._m._get(f"{self._p}.input_layernorm.weight")

    @property
    def post_norm(self) -> torch.Tensor:
        return self._m._get(f"{self._p}.post_attention_layernorm.weight")

    @property
    def attention(self) -> MLAWeights | GLAWeights:
        m = self._m
        return m._mla_weights(self._p) if self.mla else m._gla_weights(self._p, self.layer)

    @property
    def ffn(self) -> StreamedSwiGLU | MoEWeights:
        m = self._m
        return m._moe_weights(self._p, self.mtp) if self.moe else m._swiglu(f"{self._p}.mlp")


class StreamedSwiGLU:
    """A SwiGLU read when called and dropped after; past :data:`BLOCK_BYTES` it runs in blocks
    of the intermediate axis (gate/up rows, down columns), summing the blocks' outputs."""

    def __init__(self, model: BailingHybridReference, prefix: str) -> None:
        self._m, self._prefix = model, prefix

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, p = self._m, self._prefix
        inter, hidden = m._source.shape(f"{p}.gate_proj.weight")
        step = max(1, BLOCK_BYTES // (3 * hidden * _itemsize(m.dtype)))
        if step >= 256:  # whole blocks of 256 (a port's rounded activations: activation_rounding)
            step -= step % 256
        if step >= inter:  # the in-memory computation, to the bit
            return swiglu(x, m._get(f"{p}.gate_proj.weight"), m._get(f"{p}.up_proj.weight"),
                          m._get(f"{p}.down_proj.weight"))
        out: torch.Tensor | None = None
        for s in range(0, inter, step):
            r = (s, min(inter, s + step))
            part = swiglu(x, m._get(f"{p}.gate_proj.weight", rows=r),
                          m._get(f"{p}.up_proj.weight", rows=r),
                          m._get(f"{p}.down_proj.weight", cols=r))
            out = part if out is None else out + part
        assert out is not None
        return out


class _LazyExperts(Sequence[StreamedSwiGLU]):
    """Routed experts of a streamed MoE layer: ``experts[e]`` reads expert e when called."""

    def __init__(self, model: BailingHybridReference, prefix: str, n: int) -> None:
        self._m, self._prefix, self._n = model, prefix, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, e):  # type: ignore[override]
        if isinstance(e, slice):
            return [self[i] for i in range(*e.indices(self._n))]
        if not -self._n <= e < self._n:
            raise IndexError(e)
        return StreamedSwiGLU(self._m, f"{self._prefix}.{e % self._n}")


class _LazyBlocks(Sequence[StreamedBlock]):
    """The trunk layers of a streamed model (cheap handles; weights are read on use)."""

    def __init__(self, model: BailingHybridReference) -> None:
        self._m = model

    def __len__(self) -> int:
        return self._m.n_layers

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        m = self._m
        layer = range(m.n_layers)[i]
        return StreamedBlock(m, layer, mla=m.layer_mla[layer], moe=m.config.is_moe(layer))

    def __iter__(self) -> Iterator[StreamedBlock]:
        return (self[i] for i in range(len(self)))


class StreamedMTPHead:
    """The MTP head of a streamed model; its weights are read when asked."""

    def __init__(self, model: BailingHybridReference) -> None:
        self._m = model
        self._p = f"model.layers.{model.n_layers}"
        self.block = StreamedBlock(model, model.n_layers, mla=True, moe=True, mtp=True)

    @property
    def enorm(self) -> torch.Tensor:
        return self._m._get(f"{self._p}.enorm.weight")

    @property
    def hnorm(self) -> torch.Tensor:
        return self._m._get(f"{self._p}.hnorm.weight")

    @property
    def eh_proj(self) -> torch.Tensor:
        return self._m._get(f"{self._p}.eh_proj.weight")

    @property
    def final_norm(self) -> torch.Tensor:
        return self._m._get(f"{self._p}.final_layernorm.weight")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class MTPHead:
    """The NextN head (doc §3.1): enorm/hnorm, eh_proj, an MLA+MoE block, final_layernorm."""

    enorm: torch.Tensor
    hnorm: torch.Tensor
    eh_proj: torch.Tensor  # [hidden, 2*hidden], columns [embedding | hidden]
    final_norm: torch.Tensor
    block: Block


@dataclass
class GLACache:
    """Per-layer decode cache of a GLA layer: the recurrent state [H, D, D]."""

    state: torch.Tensor | None = None


Cache = MLACache | GLACache
Namer = Callable[[str], "str | None"]

# The MTP block's capture names; its other points have no canonical name.
_MTP_NAMES = {
    "attn_out": "mtp_attn_out",
    "ffn_inp": "mtp_ffn_inp",
    "ffn_moe_topk": "mtp_ffn_moe_topk",
    "ffn_moe_weights": "mtp_ffn_moe_weights",
    "ffn_out": "mtp_ffn_out",
    "l_out": "mtp_l_out",
}


class _Recorder:
    """Collects the requested captures as float64 (ids as int64) numpy arrays."""

    def __init__(self, wanted: frozenset[str]) -> None:
        self.wanted = wanted
        self.captures: dict[str, np.ndarray] = {}

    def put(self, name: str | None, value: torch.Tensor) -> None:
        if name is None or name not in self.wanted:
            return
        as_type = torch.int64 if not value.is_floating_point() else torch.float64
        self.captures[name] = value.detach().to("cpu", as_type).numpy()


class BailingHybridReference:
    """A checkpoint loaded for reference computation; :meth:`start` opens decode sessions."""

    ANCHOR_STEMS: tuple[str, ...] = ANCHOR_STEMS  # the per-layer points :meth:`start` anchors

    def __init__(
        self,
        cfg: BailingHybridConfig,
        tensors: dict[str, np.ndarray] | WeightSource,
        options: ReferenceOptions,
    ) -> None:
        self.config = cfg
        self.options = options
        self.findings: list[str] = []  # what loading noticed, for run reports
        self.n_layers = cfg.num_hidden_layers
        self.dtype = TORCH_DTYPES[options.dtype]
        self.device = _device(options.device)
        self.eps = cfg.rms_norm_eps
        variant = options.variant
        _check_variant(cfg, variant)
        self._source: WeightSource = (
            MemoryWeights(tensors) if isinstance(tensors, dict) else tensors
        )
        self.streamed = bool(getattr(self._source, "streamed", False))
        # Called with (layers done, layers) after each trunk layer of a forward (progress).
        self.layer_done: Callable[[int, int], None] | None = None
        self.mla_dims = MLADims.from_config(cfg)
        self.router_config = RouterConfig.from_config(cfg)
        self.layer_mla = [layer_is_mla(cfg, layer, variant) for layer in range(self.n_layers)]
        self.norm = self._get("model.norm.weight")
        self._head_name = "model.word_embeddings.weight" if cfg.tie_word_embeddings else (
            "lm_head.weight"
        )
        self._rows: dict[int, torch.Tensor] = {}  # embedding rows read in this forward
        self.blocks: Sequence[Block] | Sequence[StreamedBlock]
        self.mtp: MTPHead | StreamedMTPHead | None
        if self.streamed:
            self.embed = self.lm_head = None  # read per forward: rows, vocabulary blocks
            self.blocks = _LazyBlocks(self)
            self.mtp = StreamedMTPHead(self) if self._has_mtp() else None
            return
        self.embed = self._get("model.word_embeddings.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings else self._get("lm_head.weight")
        self.blocks = [
            self._block_weights(layer, mla=self.layer_mla[layer], moe=cfg.is_moe(layer))
            for layer in range(cfg.num_hidden_layers)
        ]
        self.mtp = self._mtp_weights() if self._has_mtp() else None
        del self._source  # numpy copies are no longer needed

    @classmethod
    def from_checkpoint(
        cls, checkpoint_dir: Path, options: ReferenceOptions | None = None
    ) -> BailingHybridReference:
        """Validate config.json and every tensor (names, shapes, finiteness), then load.

        ``options.load`` says how: ``memory`` reads every tensor now; ``streamed`` checks names,
        shapes and dtypes from the files' headers and reads (and checks finiteness) during each
        forward; ``auto`` picks by size (:func:`references.weights.choose_load`).
        """
        options = options or ReferenceOptions()
        _device(options.device)
        cfg = load_config(Path(checkpoint_dir))
        _check_variant(cfg, options.variant)
        # notes on disputed keys read the one applicable way; then extra tensors ignored
        findings = check_disputed(cfg, Path(checkpoint_dir) / "config.json")
        where, shapes = planned_tensors(Path(checkpoint_dir), cfg, findings=findings)
        n_elements = sum(int(np.prod(s)) for s in shapes.values())
        mode = choose_load(options.load, n_elements, TORCH_DTYPES[options.dtype])
        if mode == "streamed":
            source: dict[str, np.ndarray] | WeightSource = streamed_source(where, shapes)
        else:
            source = read_tensors(where, shapes)
        model = cls(cfg, source, options)
        model.findings = findings
        return model

    @property
    def load_mode(self) -> str:
        """``memory`` or ``streamed``: how this model holds its weights."""
        return "streamed" if self.streamed else "memory"

    @property
    def weight_reads(self) -> StreamedWeights | None:
        """The streamed source (its ``log`` and ``bytes_read``), None in memory mode."""
        source = getattr(self, "_source", None)  # in memory the source is dropped after load
        return source if isinstance(source, StreamedWeights) else None

    def new_caches(self) -> list[Cache]:
        """Empty decode caches, one per trunk layer (MLA latents or a GLA state)."""
        return [MLACache() if mla else GLACache() for mla in self.layer_mla]

    def start(
        self,
        capture: Collection[str] = (),
        forced_routing: Mapping[int, np.ndarray | torch.Tensor] | None = None,
        anchors: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    ) -> ReferenceSession:
        """A fresh sequence recording the named points (``result_output`` always).

        ``forced_routing`` maps an MoE layer (the MTP block is layer ``n_layers``) to expert ids
        [positions, k], one row per fed position in order across feeds: that layer then uses
        these ids instead of its own selection (weights still from its own router).

        ``anchors`` maps residual-stream points (``l_out-N``, ``ffn_inp-N``) and the norms that
        feed matmuls (``attn_norm-N``, ``ffn_norm-N``, ``result_norm``) to another model's
        values [positions, hidden]: they are recorded as computed here, but what comes after
        them takes the given rows instead.  Each sublayer then computes from that model's own
        input, so a comparison sees only what the sublayer itself adds (sublayer-local parity),
        not what came in from below, amplified; and a matmul whose input is anchored rounds that
        input exactly as the other model did."""
        forced = self._check_forced_routing(forced_routing or {})
        return ReferenceSession(self, self._check_capture(capture), forced,
                                self._check_anchors(anchors or {}))

    def _check_anchors(self, anchors: Mapping[str, np.ndarray | torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
        checked = {}
        width = self.config.hidden_size
        allowed = {f"{stem}-{i}" for i in range(self.n_layers) for stem in ANCHOR_STEMS}
        allowed.add("result_norm")
        for name, rows in anchors.items():
            if name not in allowed:
                raise InputError(f"anchors: {name!r} is not a point that can be anchored "
                                 f"({', '.join(f'{s}-N' for s in ANCHOR_STEMS)} with N < "
                                 f"{self.n_layers}, or result_norm)")
            t = torch.as_tensor(np.asarray(rows, dtype=np.float64))
            if t.ndim != 2 or t.shape[1] != width:
                raise InputError(f"anchors: {name} rows have shape {tuple(t.shape)}; "
                                 f"expected [positions, hidden_size={width}]")
            checked[name] = t.to(self.device, self.dtype)
        return checked

    def moe_layers(self) -> list[int]:
        """The layers whose FFN is routed: trunk MoE layers, then the MTP block (``n_layers``)."""
        layers = [layer for layer in range(self.n_layers) if self.config.is_moe(layer)]
        return layers + ([self.n_layers] if self.mtp is not None else [])

    def _check_forced_routing(
        self, forced: Mapping[int, np.ndarray | torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        allowed = self.moe_layers()
        checked = {}
        for layer, ids in forced.items():
            if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
                raise InputError(f"forced_routing keys are layer numbers, got {layer!r}")
            if int(layer) not in allowed:
                raise InputError(
                    f"forced_routing names layer {layer}, which has no router; MoE layers are "
                    f"{allowed}"
                )
            try:
                checked[int(layer)] = check_forced_ids(
                    ids, self.config.num_experts, self.router_config.num_experts_per_tok
                ).to(self.device)
            except InputError as e:
                raise InputError(f"forced_routing layer {layer}: {e}") from None
        return checked

    # ---- loading ----

    def _get(
        self,
        name: str,
        dtype: torch.dtype | None = None,
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        return self._source.get(name, dtype or self.dtype, self.device, rows, cols)

    def _has_mtp(self) -> bool:
        n = self.config.num_hidden_layers
        return bool(self.config.num_nextn_predict_layers) and self._source.has(
            f"model.layers.{n}.eh_proj.weight"
        )

    def _block_weights(self, layer: int, *, mla: bool, moe: bool, mtp: bool = False) -> Block:
        p = f"model.layers.{layer}"
        return Block(
            input_norm=self._get(f"{p}.input_layernorm.weight"),
            post_norm=self._get(f"{p}.post_attention_layernorm.weight"),
            attention=self._mla_weights(p) if mla else self._gla_weights(p, layer),
            ffn=self._moe_weights(p, mtp) if moe else self._swiglu(f"{p}.mlp"),
        )

    def _swiglu(self, prefix: str) -> SwiGLUWeights | StreamedSwiGLU:
        if self.streamed:
            return StreamedSwiGLU(self, prefix)
        return SwiGLUWeights(
            gate=self._get(f"{prefix}.gate_proj.weight"),
            up=self._get(f"{prefix}.up_proj.weight"),
            down=self._get(f"{prefix}.down_proj.weight"),
        )

    def _mla_weights(self, p: str) -> MLAWeights:
        a = f"{p}.attention"
        if self.config.q_lora_rank:
            q = {
                "q_a_proj": self._get(f"{a}.q_a_proj.weight"),
                "q_a_norm": self._get(f"{a}.q_a_layernorm.weight"),
                "q_b_proj": self._get(f"{a}.q_b_proj.weight"),
            }
        else:
            q = {"q_proj": self._get(f"{a}.q_proj.weight")}
        return MLAWeights(
            kv_a_proj=self._get(f"{a}.kv_a_proj_with_mqa.weight"),
            kv_a_norm=self._get(f"{a}.kv_a_layernorm.weight"),
            kv_b_proj=self._get(f"{a}.kv_b_proj.weight"),
            dense=self._get(f"{a}.dense.weight"),
            **q,
        )

    def _gla_weights(self, p: str, layer: int) -> GLAWeights:
        cfg, a = self.config, f"{p}.attention"
        g = log_decay(
            cfg.num_attention_heads,
            layer,
            cfg.num_hidden_layers,
            self.options.variant.slope_formula,
        ).to(self.device, accumulation_dtype(self.dtype))
        if not self.options.variant.tail_clause and cfg.is_mla(layer):
            return self._stand_in_gla(layer, g)
        if self.streamed:
            return StreamedGLAWeights(self, a, g)
        return GLAWeights(
            qkv=self._get(f"{a}.query_key_value.weight"),
            q_norm=self._get(f"{a}.query_layernorm.weight"),
            k_norm=self._get(f"{a}.key_layernorm.weight"),
            g_proj=self._get(f"{a}.g_proj.weight"),
            g_norm=self._get(f"{a}.g_norm.weight"),
            dense=self._get(f"{a}.dense.weight"),
            log_decay=g,
        )

    def _stand_in_gla(self, layer: int, g: torch.Tensor) -> GLAWeights:
        """A variant that runs an MLA layer as GLA finds no GLA weights for it.

        It behaves like an HF-style port with a wrong layer rule: the missing weights are freshly
        initialised (seeded normal(0, 0.02), norms 1) and the MLA weights are ignored.
        """
        cfg = self.config
        warnings.warn(
            f"variant {self.options.variant.describe()} runs MLA layer {layer} as GLA: its GLA "
            "weights are not in the checkpoint and are freshly initialised",
            RuntimeWarning,
            stacklevel=3,
        )
        gen = torch.Generator().manual_seed(layer)
        width, hidden = cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size

        def linear(*shape: int) -> torch.Tensor:
            w = torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.02
            return w.to(self.device, self.dtype)

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, device=self.device, dtype=self.dtype)

        return GLAWeights(
            qkv=linear(3 * width, hidden),
            q_norm=ones(cfg.head_dim),
            k_norm=ones(cfg.head_dim),
            g_proj=linear(width, hidden),
            g_norm=ones(width),
            dense=linear(hidden, width),
            log_decay=g,
        )

    def _moe_weights(self, p: str, mtp: bool) -> MoEWeights:
        cfg = self.config
        bias_name = f"{p}.mlp.gate.expert_bias"
        has_bias = cfg.moe_router_enable_expert_bias and self._source.has(bias_name)
        if mtp and not self.options.variant.mtp_router_bias:
            has_bias = False  # a port whose MTP router ignores expert_bias (LJ)
        return MoEWeights(
            router=self._get(f"{p}.mlp.gate.weight"),
            # The bias is a float32 buffer (kept out of bfloat16, as mlx-lm does).
            expert_bias=self._get(bias_name, accumulation_dtype(self.dtype)) if has_bias else None,
            experts=(
                _LazyExperts(self, f"{p}.mlp.experts", cfg.num_experts) if self.streamed
                else tuple(self._swiglu(f"{p}.mlp.experts.{e}") for e in range(cfg.num_experts))
            ),
            shared=self._swiglu(f"{p}.mlp.shared_experts") if cfg.num_shared_experts else None,
        )

    def _mtp_weights(self) -> MTPHead:
        """The first MTP layer (``model.layers.{L}``); it is always MLA + MoE."""
        layer = self.config.num_hidden_layers
        p = f"model.layers.{layer}"
        return MTPHead(
            enorm=self._get(f"{p}.enorm.weight"),
            hnorm=self._get(f"{p}.hnorm.weight"),
            eh_proj=self._get(f"{p}.eh_proj.weight"),
            final_norm=self._get(f"{p}.final_layernorm.weight"),
            block=self._block_weights(layer, mla=True, moe=True, mtp=True),
        )

    def _check_capture(self, capture: Collection[str]) -> frozenset[str]:
        unknown = []
        for name in capture:
            try:
                _, layer = capture_points.parse(name)
            except capture_points.UnknownCapturePoint:
                unknown.append(name)
                continue
            if layer is not None and layer >= self.n_layers:
                unknown.append(name)
        if unknown:
            raise ValueError(
                f"unknown capture point(s) {sorted(unknown)} for a {self.n_layers}-layer model; "
                "see harness.core.capture_points"
            )
        return frozenset(capture) | {"result_output"}

    # ---- compute ----

    def block_forward(
        self,
        x: torch.Tensor,
        block: Block,
        cache: Cache,
        positions: torch.Tensor,
        rec: _Recorder,
        name: Namer,
        forced: torch.Tensor | None = None,
        anchor: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, Routing | None]:
        """One pre-norm decoder layer on the new tokens ``x`` [T, hidden]; updates ``cache``.
        Returns the layer's output and the MoE's routing (None for a dense FFN). ``forced``
        [T, k]: the MoE uses these expert ids (a router-forced run); ``anchor(point, value)``:
        what goes on after a residual point (ReferenceSession)."""
        a = rms_norm(x, block.input_norm, self.eps)
        rec.put(name("attn_norm"), a)
        if anchor is not None:
            a = anchor(name("attn_norm"), a)
        attention = block.attention  # a streamed block reads it now; dropped below
        if isinstance(attention, MLAWeights):
            assert isinstance(cache, MLACache)
            attn, latent = mla_forward(
                a,
                attention,
                self.mla_dims,
                cache,
                impl=self.options.mla_impl,
                rope_style=self.options.variant.mla_rope,
            )
            rec.put(name("kv_cmpr"), latent)
        else:
            assert isinstance(cache, GLACache)
            attn = self._gla(a, attention, cache, positions, rec, name)
        del attention
        rec.put(name("attn_out"), attn)
        h = x + attn
        rec.put(name("ffn_inp"), h)
        if anchor is not None:
            h = anchor(name("ffn_inp"), h)
        f = rms_norm(h, block.post_norm, self.eps)
        rec.put(name("ffn_norm"), f)
        if anchor is not None:
            f = anchor(name("ffn_norm"), f)
        ffn = block.ffn
        routing = None
        if isinstance(ffn, MoEWeights):
            # Unforced, the call is unchanged (tests wrap moe_forward with the plain signature).
            extra = {} if forced is None else {"forced_ids": forced}
            moe = moe_forward(f, ffn, self.router_config, self.options.variant, **extra)
            routing = moe.routing
            rec.put(name("ffn_moe_logits"), moe.routing.logits)
            rec.put(name("ffn_moe_topk"), moe.routing.ids)
            rec.put(name("ffn_moe_weights"), moe.routing.weights)
            if moe.shared is not None:
                rec.put(name("ffn_shexp"), moe.shared)
            out = moe.out
        else:
            out = ffn(f)
        del ffn
        rec.put(name("ffn_out"), out)
        y = h + out
        rec.put(name("l_out"), y)
        if anchor is not None:
            y = anchor(name("l_out"), y)
        return y, routing

    def _gla(
        self,
        a: torch.Tensor,
        w: GLAWeights,
        cache: GLACache,
        positions: torch.Tensor,
        rec: _Recorder,
        name: Namer,
    ) -> torch.Tensor:
        """Lightning attention (doc §2.4): QKV, QK-norm, partial RoPE, GLA, GroupRMSNorm, gate."""
        cfg, variant = self.config, self.options.variant
        t, n_heads, d = a.shape[0], cfg.num_attention_heads, cfg.head_dim
        qkv = w.linear("qkv", a).view(t, 3 * n_heads, d).transpose(0, 1)  # [3H, T, D]
        q, k, v = qkv.split(n_heads, dim=0)
        if cfg.use_qk_norm:
            q, k = rms_norm(q, w.q_norm, self.eps), rms_norm(k, w.k_norm, self.eps)
        q = rope(q, positions, cfg.gla_rope_dim, cfg.rope_theta, variant.gla_rope)
        k = rope(k, positions, cfg.gla_rope_dim, cfg.rope_theta, variant.gla_rope)
        if self.options.gla_impl == "chunked":
            o, cache.state = gla_chunked(
                q, k, v, w.log_decay, d**-0.5, cache.state, self.options.chunk_size
            )
        else:
            o, cache.state = gla_recurrent(q, k, v, w.log_decay, d**-0.5, cache.state)
        o = o.transpose(0, 1).reshape(t, n_heads * d)
        rec.put(name("gla_out"), o)
        width = n_heads * d
        groups = (
            cfg.group_norm_size
            if variant.group_norm == "groups"
            else width // cfg.group_norm_size  # wrong: group_norm_size channels per group
        )
        normed = group_rms_norm(o, groups, w.g_norm, self.eps)
        gate = w.linear("g_proj", a if variant.gate_input == "attn_norm" else o)
        rec.put(name("g_gate"), gate)
        return w.linear("dense", normed * torch.sigmoid(gate))

    def embed_rows(self, ids: Sequence[int]) -> torch.Tensor:
        """Embedding rows of ``ids`` [T, hidden]; streamed, only these rows are read, each once
        per forward (see :meth:`begin_forward`)."""
        if not self.streamed:
            return self.embed[torch.tensor(list(ids), dtype=torch.long, device=self.device)]
        name = "model.word_embeddings.weight"
        for i in dict.fromkeys(int(t) for t in ids):
            if i not in self._rows:
                self._rows[i] = self._get(name, rows=(i, i + 1))[0]
        if not ids:
            return torch.empty(0, self.config.hidden_size, dtype=self.dtype, device=self.device)
        return torch.stack([self._rows[int(t)] for t in ids])

    def begin_forward(self) -> None:
        """Forget the embedding rows read by the previous forward."""
        self._rows = {}

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return self.logits_many([normed])[0]

    def logits_many(self, hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``lm_head`` applied to each of ``hidden``; streamed, one pass over ``lm_head`` in
        vocabulary blocks of at most :data:`BLOCK_BYTES` for all of them together."""
        if not self.streamed:
            return [linear(h, self.lm_head) for h in hidden]
        vocab, width = self._source.shape(self._head_name)
        step = max(1, BLOCK_BYTES // (width * _itemsize(self.dtype)))
        if step >= vocab:  # the in-memory computation, to the bit
            w = self._get(self._head_name)
            return [linear(h, w) for h in hidden]
        parts: list[list[torch.Tensor]] = [[] for _ in hidden]
        for s in range(0, vocab, step):
            w = self._get(self._head_name, rows=(s, min(vocab, s + step)))
            for out, h in zip(parts, hidden, strict=True):
                out.append(linear(h, w))
            del w
        return [torch.cat(out, dim=-1) for out in parts]


class ReferenceSession:
    """One sequence: feeds tokens through the trunk (and the MTP head when asked) with caches.

    MTP rows: position t needs token t+1, so a ``feed`` returns MTP captures for every position
    whose next token has become known -- a position left pending by the previous feed (its next
    token is the first of this feed), this feed's positions but the last, and the last one too
    when ``next_token`` is given.  A prompt fed at once therefore yields MTP rows for positions
    0..T-2, and the same rows, in order, when fed token by token.
    """

    def __init__(
        self,
        model: BailingHybridReference,
        capture: frozenset[str],
        forced_routing: dict[int, torch.Tensor] | None = None,
        anchors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self._m = model
        self._rec_names = capture
        self._forced = forced_routing or {}
        self._anchors = anchors or {}
        # layer -> [positions run so far] margins of the forced ids (routing_margins)
        self.routing_margins: dict[int, np.ndarray] = {
            layer: np.zeros(0) for layer in self._forced
        }
        self._caches: list[Cache] = model.new_caches()
        self.position = 0
        self._mtp_on = model.mtp is not None and any(n.startswith("mtp_") for n in capture)
        self._mtp_cache = MLACache()
        self._mtp_done = 0  # positions the MTP head has processed
        self._tokens: list[int] = []
        self._pending: torch.Tensor | None = None  # trunk hidden rows awaiting their next token
        self._promised: int | None = None  # a next_token the following feed must start with

    @torch.no_grad()
    def feed(self, tokens: Sequence[int], next_token: int | None = None) -> dict[str, np.ndarray]:
        """Run ``tokens`` after everything fed before; return the captures for these tokens.

        ``next_token`` (the token that will follow, when known) only lets the MTP head produce
        its row for the last position now instead of on the next feed.
        """
        m = self._m
        tokens = self._check_tokens(tokens, next_token)
        rec = _Recorder(self._rec_names)
        t = len(tokens)
        self._check_forced_rows(t, next_token)
        positions = torch.arange(self.position, self.position + t, device=m.device)
        m.begin_forward()
        x = m.embed_rows(tokens)
        for i, (block, cache) in enumerate(zip(m.blocks, self._caches, strict=True)):
            forced = self._forced_rows(i, self.position, self.position + t)
            x, routing = m.block_forward(
                x, block, cache, positions, rec, lambda s, i=i: f"{s}-{i}", forced,
                anchor=lambda point, h: self._anchored(point, h, t),
            )
            self._note_margins(i, routing, forced)
            if m.streamed:
                release_freed_memory()  # the layer's weights, not just their Python objects
            if m.layer_done is not None:
                m.layer_done(i + 1, len(m.blocks))
        hidden = rms_norm(x, m.norm, m.eps)
        rec.put("result_norm", hidden)
        hidden = self._anchored("result_norm", hidden, t)
        self.position += t
        heads = [hidden]
        if self._mtp_on:
            mtp_hidden = hidden if m.options.variant.mtp_hidden == "post_norm" else x
            heads.append(self._feed_mtp(tokens, next_token, mtp_hidden, rec))
        # One lm_head pass for the trunk and the MTP head (streamed: one read of lm_head).
        names = ("result_output", "mtp_result_output")[: len(heads)]
        for name, logits in zip(names, m.logits_many(heads), strict=True):
            rec.put(name, logits)
        return rec.captures

    def _anchored(self, point: str, x: torch.Tensor, t: int) -> torch.Tensor:
        """What goes on after ``point``: the anchor's rows for these positions, else ``x``."""
        rows = self._anchors.get(point)
        if rows is None:
            return x
        if rows.shape[0] < self.position + t:
            raise InputError(f"anchors: {point} has {rows.shape[0]} rows, but this feed "
                             f"reaches position {self.position + t - 1}")
        return rows[self.position : self.position + t]

    def _forced_rows(self, layer: int, start: int, stop: int) -> torch.Tensor | None:
        ids = self._forced.get(layer)
        return None if ids is None else ids[start:stop]

    def _note_margins(
        self, layer: int, routing: Routing | None, forced: torch.Tensor | None
    ) -> None:
        if forced is None or routing is None:
            return
        margins = routing.margins.detach().to("cpu", torch.float64).numpy()
        self.routing_margins[layer] = np.concatenate((self.routing_margins[layer], margins))

    def _check_forced_rows(self, t: int, next_token: int | None) -> None:
        """Before anything runs: every forced layer has a row for each position this feed
        reaches (the MTP block: each MTP row it will produce)."""
        m = self._m
        for layer, ids in self._forced.items():
            if layer == m.n_layers:
                if not self._mtp_on:
                    continue
                needed = len(self._tokens) + t - (next_token is None)
            else:
                needed = self.position + t
            if ids.shape[0] < needed:
                raise InputError(
                    f"forced_routing layer {layer} has {ids.shape[0]} rows, but this feed "
                    f"runs that layer up to position {needed - 1}"
                )

    def _check_tokens(self, tokens: Sequence[int], next_token: int | None) -> list[int]:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("feed needs at least one token")
        vocab = self._m.config.vocab_size
        bad = [t for t in [*tokens, next_token] if t is not None and not 0 <= t < vocab]
        if bad:
            raise InputError(f"token ids {bad[:5]} outside the vocabulary [0, {vocab})")
        if self._mtp_on and self._promised is not None and tokens[0] != self._promised:
            raise ValueError(
                f"the previous feed promised next_token={self._promised}, but this feed starts "
                f"with {tokens[0]}: the MTP head already used the promised token"
            )
        return tokens

    def _feed_mtp(
        self, tokens: list[int], next_token: int | None, hidden: torch.Tensor, rec: _Recorder
    ) -> torch.Tensor:
        """MTP (doc §3.1) for the positions whose next token is now known; returns the rows to
        apply ``lm_head`` to (the head's final-normed output)."""
        m, variant = self._m, self._m.options.variant
        head = m.mtp
        assert head is not None
        start = self._mtp_done
        self._tokens.extend(tokens)
        self._pending = hidden if self._pending is None else torch.cat((self._pending, hidden))
        known = self._tokens if next_token is None else [*self._tokens, next_token]
        stop = len(known) - 1  # positions start..stop-1 have their next token
        rows, self._pending = self._pending[: stop - start], self._pending[stop - start :]
        self._mtp_done, self._promised = stop, next_token
        ids = [known[p + variant.mtp_token_shift] for p in range(start, stop)]
        e = rms_norm(m.embed_rows(ids), head.enorm, m.eps)
        rec.put("mtp_enorm", e)
        hn = rms_norm(rows, head.hnorm, m.eps)
        rec.put("mtp_hnorm", hn)
        pair = (e, hn) if variant.mtp_concat == "embed_first" else (hn, e)
        u = linear(torch.cat(pair, dim=-1), head.eh_proj)
        rec.put("mtp_eh_proj", u)
        positions = torch.arange(start, stop, device=m.device)
        forced = self._forced_rows(m.n_layers, start, stop)
        y, routing = m.block_forward(
            u, head.block, self._mtp_cache, positions, rec, _MTP_NAMES.get, forced
        )
        self._note_margins(m.n_layers, routing, forced)
        final = head.final_norm if variant.mtp_final_norm == "mtp_final_layernorm" else m.norm
        normed = rms_norm(y, final, m.eps)
        rec.put("mtp_result_norm", normed)
        return normed


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {name!r} is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available to torch")
    return device


def _check_variant(cfg: BailingHybridConfig, variant: Variant) -> None:
    width = cfg.num_attention_heads * cfg.head_dim
    if variant.gate_input == "attn_output" and width != cfg.hidden_size:
        raise ValueError(
            f"variant gate_input='attn_output' feeds the GLA output [T, H*D={width}] to g_proj "
            f"[H*D, hidden={cfg.hidden_size}]: the mutation needs H*D == hidden"
        )
