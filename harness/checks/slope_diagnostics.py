"""Which GLA decay a backend uses, per layer and head: ``corrected``, ``hf_off_by_one`` or neither.

Ling-2.6's GLA decay is g_h(l) = -b_h f(l) with two layer factors in the wild (doc §2.4):
corrected f(l) = 1 - l/(L-1) + 1e-5 and HF-R's original f'(l) = f(l) + 1/(L-1).  Both give coherent
text, so only a measurement tells which one a port ships.  Two independent paths:

* **exposed** -- read the decay the port stores (mlx-lm's ``LinearAttention._slope``, the
  reference's ``GLAWeights.log_decay``, or a backend's own ``log_decays()`` hook, e.g. a llama.cpp
  ``g_slope`` capture);
* **black box** -- capture the port's ``attn_norm-N`` and ``gla_out-N`` on a probe prompt, recompute
  layer N's recurrence in float64 from the port's *own* ``attn_norm-N`` (so upstream layers cannot
  confound it) under each formula, and fit each head's log-decay by a 1-D search (heads are
  independent in GLA).

The verdict names the formula whose recurrence reproduces the port, else ``neither`` with the
fitted values.  How much the choice matters is measured as the logits NMSE between formulas
against context length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from harness.backends.base import LoadedModel, forward
from harness.core.metrics import nmse
from references.gla import gla_chunked
from references.model import BailingHybridReference, GLAWeights, ReferenceOptions
from references.ops import layer_factor, linear, log_decay, rms_norm, rope, slopes
from references.variant import Variant

FORMULAS: tuple[str, ...] = ("corrected", "hf_off_by_one")
NEITHER = "neither"
# A formula "reproduces" a port when the recurrence it implies matches the port's gla_out within
# the float32 parity tolerance; exposed values must agree to float32 rounding.
MATCH_NMSE = 1e-8
MATCH_RELATIVE = 1e-5
DEFAULT_PROBE_LENGTH = 128
DEFAULT_LENGTHS: tuple[int, ...] = (16, 64, 256, 1024)


@dataclass(frozen=True)
class LayerDecay:
    """One GLA layer's decay as one path sees it."""

    layer: int
    verdict: str  # a formula name or "neither"
    log_decay: np.ndarray  # [H] g_h: read (exposed) or fitted (black box)
    factor: float  # least-squares layer factor f with g_h ~ -b_h f
    # exposed: max relative deviation from each formula; black box: NMSE of gla_out under each
    # formula and under the fitted decays ("fit")
    error: dict[str, float]


@dataclass
class SlopeVerdict:
    """A backend's decay diagnosis on one checkpoint."""

    backend: str
    n_layers: int
    n_heads: int
    exposed: list[LayerDecay] | None
    black_box: list[LayerDecay]
    # T -> NMSE of this backend's logits against the reference on the checkpoint's convention
    growth: dict[int, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """The exposed verdict where the port exposes its decay, else the black-box one."""
        return _overall(self.exposed if self.exposed is not None else self.black_box)

    @property
    def black_box_verdict(self) -> str:
        return _overall(self.black_box)

    @property
    def agree(self) -> bool | None:
        """Whether both paths name the same formula per layer (None without an exposed path)."""
        if self.exposed is None:
            return None
        by_layer = {d.layer: d.verdict for d in self.exposed}
        return bool(self.black_box) and all(
            by_layer.get(d.layer) == d.verdict for d in self.black_box
        )


def _overall(layers: Sequence[LayerDecay]) -> str:
    verdicts = {d.verdict for d in layers}
    return verdicts.pop() if len(verdicts) == 1 else NEITHER


# --------------------------------------------------------------------------------------------
# Formulas


def formula_decays(n_heads: int, layer: int, n_layers: int) -> dict[str, np.ndarray]:
    """g_h(l) under each formula, float64 [H]."""
    return {f: log_decay(n_heads, layer, n_layers, f).numpy() for f in FORMULAS}  # type: ignore[arg-type]


def fitted_factor(g: np.ndarray, n_heads: int) -> float:
    """Least-squares f in g_h = -b_h f over the heads."""
    b = np.asarray(slopes(n_heads))
    return float(np.dot(b, -np.asarray(g)) / np.dot(b, b))


def _layer_from_values(layer: int, g: np.ndarray, n_layers: int) -> LayerDecay:
    h = g.shape[0]
    error = {}
    for name, expected in formula_decays(h, layer, n_layers).items():
        error[name] = float(np.max(np.abs(g - expected)) / np.max(np.abs(expected)))
    best = min(error, key=error.__getitem__)
    verdict = best if error[best] <= MATCH_RELATIVE else NEITHER
    return LayerDecay(layer, verdict, g, fitted_factor(g, h), error)


# --------------------------------------------------------------------------------------------
# Exposed path


def exposed_log_decays(loaded: Any) -> dict[int, np.ndarray] | None:
    """{layer: g [H]} as the port stores it, or None if it exposes nothing.

    A backend may offer ``log_decays() -> {layer: array}`` (e.g. llama.cpp from a ``g_slope``
    capture); mlx-lm keeps ``LinearAttention._slope``; the reference keeps ``log_decay``.
    """
    hook = getattr(loaded, "log_decays", None)
    if callable(hook):
        return {int(k): np.asarray(v, dtype=np.float64) for k, v in hook().items()}
    if isinstance(loaded, BailingHybridReference):
        return {
            i: b.attention.log_decay.to(torch.float64).cpu().numpy()
            for i, b in enumerate(loaded.blocks)
            if isinstance(b.attention, GLAWeights)
        }
    layers = getattr(loaded, "layers", None)
    if layers is None:
        return None
    out = {}
    for i, layer in enumerate(layers):
        attention = layer.get("attention") if hasattr(layer, "get") else None
        slope = getattr(attention, "_slope", None)
        if slope is not None:
            out[i] = np.array(slope.astype(_mx_float32()), copy=True).astype(np.float64).ravel()
    return out or None


def _mx_float32() -> Any:
    import mlx.core as mx

    return mx.float32


def diagnose_exposed(loaded: Any, n_layers: int) -> list[LayerDecay] | None:
    """Per-layer verdicts from the stored decays (None if the port exposes none)."""
    values = exposed_log_decays(loaded)
    if values is None:
        return None
    return [_layer_from_values(layer, g, n_layers) for layer, g in sorted(values.items())]


# --------------------------------------------------------------------------------------------
# Black-box path


def _gla_qkv(
    ref: BailingHybridReference, layer: int, a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s q, k, v [H, T, D] from its input ``a`` (the reference's GLA steps 1-3)."""
    cfg, variant = ref.config, ref.options.variant
    w = ref.blocks[layer].attention
    assert isinstance(w, GLAWeights)
    t, n_heads, d = a.shape[0], cfg.num_attention_heads, cfg.head_dim
    # as the layer applies it (a quantized port's input rounded like its matmul rounds it)
    qkv = linear(a, w.qkv).view(t, 3 * n_heads, d).transpose(0, 1)
    q, k, v = qkv.split(n_heads, dim=0)
    if cfg.use_qk_norm:
        q, k = rms_norm(q, w.q_norm, ref.eps), rms_norm(k, w.k_norm, ref.eps)
    positions = torch.arange(t)
    q = rope(q, positions, cfg.gla_rope_dim, cfg.rope_theta, variant.gla_rope)
    k = rope(k, positions, cfg.gla_rope_dim, cfg.rope_theta, variant.gla_rope)
    return q, k, v


class _LayerProbe:
    """Layer N's recurrence from the port's own input, for any per-head decay vector."""

    def __init__(
        self, ref: BailingHybridReference, layer: int, attn_norm: np.ndarray, gla_out: np.ndarray
    ) -> None:
        a = torch.from_numpy(np.asarray(attn_norm, dtype=np.float64))
        self.q, self.k, self.v = _gla_qkv(ref, layer, a)
        self.scale = ref.config.head_dim**-0.5
        t, h = a.shape[0], ref.config.num_attention_heads
        self.target = np.asarray(gla_out, dtype=np.float64).reshape(t, h, -1).transpose(1, 0, 2)

    def output(self, g: np.ndarray) -> np.ndarray:
        o, _ = gla_chunked(self.q, self.k, self.v, torch.from_numpy(g), self.scale)
        return o.numpy()  # [H, T, D]

    def head_sse(self, g: np.ndarray) -> np.ndarray:
        return np.sum((self.output(g) - self.target) ** 2, axis=(1, 2))

    def nmse(self, g: np.ndarray) -> float:
        return nmse(self.target, self.output(g))


def fit_log_decays(probe: _LayerProbe, seeds: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Per-head g minimising the port-vs-recurrence error: a log-spaced grid over -g in
    [1e-6, 20] (plus ``seeds``), then golden-section refinement, all heads at once."""
    h = probe.q.shape[0]
    grid = list(np.linspace(math.log(1e-6), math.log(20.0), 57))
    xs = [np.full(h, x) for x in grid] + [np.log(-np.asarray(s)) for s in seeds]
    errs = np.stack([probe.head_sse(-np.exp(x)) for x in xs])  # [n, H]
    best = np.argmin(errs, axis=0)
    x_best = np.array([xs[i][j] for j, i in enumerate(best)])
    step = grid[1] - grid[0]
    lo, hi = x_best - step, x_best + step
    ratio = (math.sqrt(5) - 1) / 2
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fd = probe.head_sse(-np.exp(c)), probe.head_sse(-np.exp(d))
    for _ in range(48):
        left = fc < fd
        hi = np.where(left, d, hi)
        lo = np.where(left, lo, c)
        new_c, new_d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        c, d = np.where(left, new_c, d), np.where(left, c, new_d)
        fc, fd = (
            np.where(left, probe.head_sse(-np.exp(c)), fd),
            np.where(left, fc, probe.head_sse(-np.exp(d))),
        )
    x_fit = (lo + hi) / 2
    # Keep the grid/seed point if refinement did not beat it (a flat or noisy head).
    refined_better = probe.head_sse(-np.exp(x_fit)) <= probe.head_sse(-np.exp(x_best))
    return -np.exp(np.where(refined_better, x_fit, x_best))


def gla_layers(ref: BailingHybridReference) -> list[int]:
    return [i for i, b in enumerate(ref.blocks) if isinstance(b.attention, GLAWeights)]


def diagnose_black_box(
    port: LoadedModel, ref: BailingHybridReference, probe_tokens: Sequence[int]
) -> tuple[list[LayerDecay], list[str]]:
    """Per-layer verdicts from the port's captured ``attn_norm-N`` / ``gla_out-N``."""
    layers = gla_layers(ref)
    names = [f"{p}-{i}" for i in layers for p in ("attn_norm", "gla_out")]
    caps = forward(port, list(probe_tokens), names)
    cfg = ref.config
    out, notes = [], []
    for layer in layers:
        if f"gla_out-{layer}" not in caps or f"attn_norm-{layer}" not in caps:
            notes.append(f"layer {layer}: the port captured no attn_norm/gla_out; not diagnosed")
            continue
        probe = _LayerProbe(ref, layer, caps[f"attn_norm-{layer}"], caps[f"gla_out-{layer}"])
        expected = formula_decays(cfg.num_attention_heads, layer, cfg.num_hidden_layers)
        error = {name: probe.nmse(g) for name, g in expected.items()}
        fitted = fit_log_decays(probe, seeds=list(expected.values()))
        error["fit"] = probe.nmse(fitted)
        best = min(FORMULAS, key=error.__getitem__)
        verdict = best if error[best] <= MATCH_NMSE else NEITHER
        out.append(
            LayerDecay(
                layer, verdict, fitted, fitted_factor(fitted, cfg.num_attention_heads), error
            )
        )
    return out, notes


# --------------------------------------------------------------------------------------------
# Context growth


def probe_tokens(length: int, vocab_size: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab_size, length).tolist()


def reference_pair(checkpoint: Path) -> dict[str, BailingHybridReference]:
    """The float64 reference under each formula."""
    return {
        f: BailingHybridReference.from_checkpoint(
            Path(checkpoint),
            ReferenceOptions(variant=Variant(slope_formula=f)),  # type: ignore[arg-type]
        )
        for f in FORMULAS
    }


def formula_growth(
    refs: dict[str, BailingHybridReference], lengths: Sequence[int]
) -> dict[int, float]:
    """T -> NMSE of the off-by-one reference's logits against the corrected one's, over all T
    rows: how far the slope choice alone moves the output as the context grows."""
    vocab = refs["corrected"].config.vocab_size
    out = {}
    for t in lengths:
        tokens = probe_tokens(t, vocab, seed=t)
        logits = {f: forward(m, tokens)["result_output"] for f, m in refs.items()}
        out[int(t)] = nmse(logits["hf_off_by_one"], logits["corrected"])
    return out


def port_growth(
    port: LoadedModel, expected: BailingHybridReference, lengths: Sequence[int]
) -> dict[int, float]:
    """T -> NMSE of the port's logits against the float64 reference on the checkpoint's
    convention (``expected``)."""
    vocab = expected.config.vocab_size
    out = {}
    for t in lengths:
        tokens = probe_tokens(t, vocab, seed=t)
        out[int(t)] = nmse(
            forward(port, tokens)["result_output"], forward(expected, tokens)["result_output"]
        )
    return out


def diagnose(
    label: str,
    port: LoadedModel,
    refs: dict[str, BailingHybridReference],
    *,
    probe_length: int = DEFAULT_PROBE_LENGTH,
    lengths: Sequence[int] = (),
    expected: str = "corrected",
) -> SlopeVerdict:
    """Both paths for one loaded backend, plus its logits error against context length (against
    the reference on the checkpoint's convention, ``expected``)."""
    ref = refs["corrected"]  # q, k, v do not depend on the decay: either reference serves
    cfg = ref.config
    tokens = probe_tokens(probe_length, cfg.vocab_size)
    black_box, notes = diagnose_black_box(port, ref, tokens)
    verdict = SlopeVerdict(
        backend=label,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        exposed=diagnose_exposed(port, cfg.num_hidden_layers),
        black_box=black_box,
        notes=notes,
    )
    if lengths:
        verdict.growth = port_growth(port, refs[expected], lengths)
    if verdict.exposed is not None and verdict.agree is False:
        verdict.notes.append("exposed and black-box verdicts disagree")
    return verdict


# --------------------------------------------------------------------------------------------
# Report section (data; rendered by harness/report/templates/sections/slopes.html.j2)


@dataclass(frozen=True)
class SlopeBackendRow:
    """One backend's verdicts: overall, per path (``exposed`` None: not exposed), agreement."""

    backend: str
    verdict: str
    exposed: str | None
    black_box: str
    agree: bool | None
    notes: tuple[str, ...]


@dataclass(frozen=True)
class SlopeLayerRow:
    """One GLA layer as one path sees it: both formulas' factors, the fitted one, the errors."""

    backend: str
    layer: int
    path: str  # "exposed" or "black box"
    verdict: str
    f_corrected: float
    f_off_by_one: float
    factor: float
    err_corrected: float
    err_off_by_one: float
    err_fit: float
    log_decay: tuple[float, ...]


@dataclass(frozen=True)
class GrowthRow:
    """Logits NMSE against context length, one value per :attr:`SlopeSection.lengths`."""

    label: str
    nmse: tuple[float, ...]


@dataclass(frozen=True)
class SlopeSection:
    """Verdict per backend, per-layer figures and the context-growth table."""

    backends: tuple[SlopeBackendRow, ...]
    layers: tuple[SlopeLayerRow, ...]
    lengths: tuple[int, ...]
    growth: tuple[GrowthRow, ...]
    title: str = "GLA decay (slopes)"
    template: ClassVar[str] = "slopes.html.j2"


def _layer_row(v: SlopeVerdict, path: str, d: LayerDecay) -> SlopeLayerRow:
    return SlopeLayerRow(
        backend=v.backend, layer=d.layer, path=path, verdict=d.verdict,
        f_corrected=layer_factor(d.layer, v.n_layers, "corrected"),
        f_off_by_one=layer_factor(d.layer, v.n_layers, "hf_off_by_one"),
        factor=d.factor, err_corrected=d.error["corrected"],
        err_off_by_one=d.error["hf_off_by_one"], err_fit=d.error.get("fit", math.nan),
        log_decay=tuple(float(x) for x in d.log_decay),
    )


def slope_section(
    verdicts: Sequence[SlopeVerdict], formula_nmse: dict[int, float] | None = None
) -> SlopeSection:
    """Verdict per backend, per-layer figures (expected and fitted factors, errors, fitted g),
    and the context-growth table."""
    backends = tuple(
        SlopeBackendRow(v.backend, v.verdict,
                        _overall(v.exposed) if v.exposed is not None else None,
                        v.black_box_verdict, v.agree, tuple(v.notes))
        for v in verdicts
    )
    layers = tuple(
        _layer_row(v, path, d)
        for v in verdicts
        for path, decays in (("exposed", v.exposed or []), ("black box", v.black_box))
        for d in decays
    )
    lengths = tuple(sorted({t for v in verdicts for t in v.growth} | set(formula_nmse or {})))
    growth = []
    if lengths and formula_nmse:
        growth.append(GrowthRow("reference: off-by-one vs corrected",
                                tuple(formula_nmse.get(t, math.nan) for t in lengths)))
    growth += [GrowthRow(f"{v.backend} vs corrected reference",
                         tuple(v.growth.get(t, math.nan) for t in lengths))
               for v in verdicts if lengths and v.growth]
    return SlopeSection(backends, layers, lengths, tuple(growth))
