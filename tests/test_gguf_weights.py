"""A GGUF read back as the reference's weights: exact on f32 conversions, honest on quantized ones.

The self-check that makes :class:`GgufWeights` trustworthy: every Ling-2.6 case converted by our
port and every Ling 3.0 case converted by upstream's converter, read back under the checkpoint's
HF names, equals the checkpoint bit for bit (Ling 3.0's ``A_log`` aside: upstream stores
``exp(A_log)``, so it is checked to reproduce the stored value exactly instead).  A wrong inverse
(``attn_k_b`` reshaped instead of transposed) is caught by the same comparison, naming the tensor.

Slow (our patched llama.cpp build): on Q8_0 and Q4_K_M quantizations of flash-mini the weights
differ from the checkpoint by a small, type-plausible error, and the llama.cpp port running the
quantized GGUF is much closer to the float64 reference built on the dequantized weights than to
the original reference (the port still quantizes activations to 8 bits in its matmuls).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.core.errors import InputError
from harness.quant import gguf_weights as gw
from harness.quant.gguf_weights import GgufWeights
from tests.test_gguf_quantize import REQUIRE_ENV, flash_mini_f32, patched_site

ROOT = Path(__file__).resolve().parent.parent
LING26_CASES = ("flash-mini", "tail-clause", "heads-6", "rope-dims", "no-qlora", "long-context")
LING3_CASES = ("ling3-mini", "ling3-plain")
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def site() -> Path:
    return patched_site()


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    pytest.skip(reason)


def checkpoint(case: str) -> Path:
    from harness.checks.cases import load_case, materialize

    if case.startswith("ling3"):
        pytest.importorskip("transformers.models.bailing_hybrid")
    return materialize(load_case(ROOT / "cases" / f"{case}.toml"))


def converted(case: str) -> tuple[Path, Path]:
    """(checkpoint, f32 GGUF): Ling-2.6 by our port's converter, Ling 3.0 by upstream's."""
    from harness.llamacpp import build

    ckpt = checkpoint(case)
    try:
        if case.startswith("ling3"):
            from harness.llamacpp.convert import convert

            return ckpt, convert(ckpt, "f32").require()
        from ports.llamacpp import port

        return ckpt, port.converted(ckpt, "f32")
    except build.BuildError as e:
        _unavailable(f"the converter is unavailable: {e}")
        raise


def reference_tensors(ckpt: Path) -> dict[str, np.ndarray]:
    """What the reference reads: Ling-2.6 through its loader; Ling 3.0 (transformers' and our
    MTP head's weights) every tensor of the checkpoint."""
    from safetensors.numpy import load_file

    from references.checkpoint_io import read_state_dict
    from references.config import ARCHITECTURE, load_config

    if ARCHITECTURE in json.loads((ckpt / "config.json").read_text())["architectures"]:
        return read_state_dict(ckpt, load_config(ckpt))
    out: dict[str, np.ndarray] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def mismatches(weights: GgufWeights, tensors: dict[str, np.ndarray]) -> list[str]:
    """Every tensor ``weights`` does not reproduce bit for bit, with what differs."""
    bad = []
    for name, want in tensors.items():
        if not weights.has(name):
            bad.append(f"{name}: absent")
            continue
        got = weights.get(name, torch.float64, CPU).numpy()
        if got.shape != want.shape:
            bad.append(f"{name}: shape {got.shape}, checkpoint {want.shape}")
        elif name.endswith(".A_log"):
            # the GGUF holds exp(A_log) in float32: the inverse must reproduce exactly that
            stored = torch.exp(torch.from_numpy(want.astype(np.float32))).numpy()
            ulp = np.spacing(np.abs(want.astype(np.float32))).astype(np.float64)
            if not (np.exp(got).astype(np.float32) == stored).all() or (
                np.abs(got - want) > 2 * ulp
            ).any():
                bad.append(f"{name}: exp(A_log) not the stored value")
        elif not np.array_equal(got, want.astype(np.float64)):
            bad.append(f"{name}: max |diff| {np.abs(got - want).max():.3g}")
    return bad


# ---- the self-check: f32 conversions read back bit-exactly -----------------------------------


@pytest.mark.slow  # converts checkpoints (cold cache: ~100 s for all cases)
@pytest.mark.parametrize("case", LING26_CASES + LING3_CASES)
def test_an_f32_conversion_reads_back_as_the_checkpoint_bit_exactly(case: str) -> None:
    ckpt, gguf = converted(case)
    config = json.loads((ckpt / "config.json").read_text())
    weights = GgufWeights(gguf, config)
    tensors = reference_tensors(ckpt)
    assert len(tensors) > 100
    assert mismatches(weights, tensors) == []
    assert weights.streamed is True


@pytest.mark.slow  # converts checkpoints (cold cache: ~100 s for all cases)
def test_a_wrong_kv_b_inverse_is_caught_naming_the_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mutation: attn_k_b reshaped to [H, nope, kv_lora] instead of transposed."""
    ckpt, gguf = converted("flash-mini")
    weights = GgufWeights(gguf, json.loads((ckpt / "config.json").read_text()))
    tensors = reference_tensors(ckpt)

    def no_transpose(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
        n_head, kv_lora, nope = k_b.shape
        per_head = np.concatenate([k_b.reshape(n_head, nope, kv_lora), v_b], axis=1)
        return per_head.reshape(-1, kv_lora)

    monkeypatch.setitem(gw.INVERSES, "kv_b", no_transpose)
    bad = mismatches(weights, tensors)
    kv_b = sorted(n for n in tensors if n.endswith("kv_b_proj.weight"))
    assert len(kv_b) == 3  # MLA layers 3 and 7, and the MTP layer 8
    assert [b.split(":")[0] for b in bad] == kv_b


@pytest.mark.slow  # converts checkpoints (cold cache: ~100 s for all cases)
def test_row_and_column_ranges_are_the_checkpoints(tmp_path: Path) -> None:
    """The streamed reference reads lm_head in row blocks and experts by rows / columns."""
    ckpt, gguf = converted("flash-mini")
    weights = GgufWeights(gguf, json.loads((ckpt / "config.json").read_text()))
    tensors = reference_tensors(ckpt)
    for name in ("lm_head.weight", "model.layers.1.mlp.experts.5.down_proj.weight",
                 "model.layers.0.attention.query_key_value.weight"):
        want = tensors[name]
        rows = weights.get(name, torch.float64, CPU, rows=(3, 17)).numpy()
        cols = weights.get(name, torch.float64, CPU, cols=(2, 9)).numpy()
        assert np.array_equal(rows, want[3:17]) and np.array_equal(cols, want[:, 2:9])
        assert weights.shape(name) == want.shape


def test_the_kv_b_inverse_undoes_both_converters_split() -> None:
    """The converters' forward step (view per head, split [nope | v], transpose k_b) undone."""
    n_head, nope, v, kv_lora = 3, 4, 5, 6
    kv_b = np.arange(n_head * (nope + v) * kv_lora, dtype=np.float32).reshape(-1, kv_lora)
    per_head = kv_b.reshape(n_head, nope + v, kv_lora)
    k_b, v_b = per_head[:, :nope].transpose(0, 2, 1), per_head[:, nope:]
    assert np.array_equal(gw.INVERSES["kv_b"](k_b, v_b), kv_b)


@pytest.mark.slow  # converts checkpoints (cold cache: ~100 s for all cases)
def test_a_tensor_the_map_cannot_invert_is_an_input_error_naming_both(tmp_path: Path) -> None:
    from harness.llamacpp.inventory import rewrite_gguf

    ckpt, gguf = converted("flash-mini")
    config = json.loads((ckpt / "config.json").read_text())
    # attn_k_b with its axes in the wrong order: [H, nope, kv_lora] where [H, kv_lora, nope]
    bad = rewrite_gguf(gguf, tmp_path / "bad.gguf", drop_tensors=["blk.7.attn_k_b.weight"],
                       add_tensors={"blk.7.attn_k_b.weight": np.zeros((4, 16, 16), np.float32)})
    with pytest.raises(InputError, match=r"model\.layers\.7\.attention\.kv_b_proj\.weight from "
                                         r"blk\.7\.attn_k_b\.weight \+ blk\.7\.attn_v_b\.weight"):
        GgufWeights(bad, config)
    # without the config check, the same refusal comes at the read
    weights = GgufWeights(bad, {"architectures": ["Other"]})
    with pytest.raises(InputError, match=r"cannot invert model\.layers\.7\.attention\.kv_b_proj"):
        weights.get("model.layers.7.attention.kv_b_proj.weight", torch.float64, CPU)


@pytest.mark.slow  # converts checkpoints (cold cache: ~100 s for all cases)
def test_a_missing_tensor_is_named_before_anything_is_read(tmp_path: Path) -> None:
    from harness.llamacpp.inventory import rewrite_gguf

    ckpt, gguf = converted("flash-mini")
    config = json.loads((ckpt / "config.json").read_text())
    short = rewrite_gguf(gguf, tmp_path / "short.gguf", drop_tensors=["blk.0.attn_qkv.weight"])
    with pytest.raises(InputError, match=r"no GGUF tensor for "
                                         r"model\.layers\.0\.attention\.query_key_value\.weight"):
        GgufWeights(short, config)
    weights = GgufWeights(gguf, config)
    assert not weights.has("model.layers.0.attention.q_a_proj.weight")  # a GLA layer
    with pytest.raises(InputError, match=r"no GGUF tensor holds model\.layers\.0\.attention\.q_a"):
        weights.get("model.layers.0.attention.q_a_proj.weight", torch.float64, CPU)


def test_a_gguf_of_an_unmapped_architecture_is_refused(tmp_path: Path) -> None:
    from tests.test_gguf_quantize import tiny_gguf

    with pytest.raises(InputError, match="no tensor map for GGUF architecture 'llama'"):
        GgufWeights(tiny_gguf(tmp_path / "m.gguf"), {})
    with pytest.raises(InputError, match="unknown port tensor map 'nope'"):
        GgufWeights(tiny_gguf(tmp_path / "m.gguf"), {}, "nope")


# ---- slow: quantized GGUFs (llama.cpp's own quantizer) -------------------------------------

# NMSE of a dequantized weight vs the checkpoint, by ggml type: 8 bits ~3e-5, 4-6 bits ~1e-3
NMSE_RANGE = {"F32": (0.0, 0.0), "F16": (0.0, 1e-6), "Q8_0": (1e-6, 1e-4)}
LOW_BIT_RANGE = (1e-5, 2e-2)
EARLY_POINTS = ("attn_out-0", "l_out-0", "ffn_moe_logits-1")  # before any routing decision


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / max(np.sum(b**2), 1e-300))


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_dequantized_weights_carry_a_type_plausible_error(site: Path, qtype: str) -> None:
    from harness.quant.gguf_quantize import quantize

    src = flash_mini_f32()
    ckpt = checkpoint("flash-mini")
    weights = GgufWeights(quantize(src, qtype, site=site),
                          json.loads((ckpt / "config.json").read_text()))
    by_kind: dict[str, list[float]] = defaultdict(list)
    for name, want in reference_tensors(ckpt).items():
        err = nmse(weights.get(name, torch.float64, CPU).numpy(), want)
        types = weights.gguf_types(name)  # kv_b_proj: attn_k_b and attn_v_b may differ
        ranges = [NMSE_RANGE.get(t, LOW_BIT_RANGE) for t in types]
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        assert (err == 0.0 if hi == 0.0 else lo < err < hi), (name, types, err)
        by_kind[re.sub(r"\.\d+\.", ".N.", name)].append(err)
    quantized = {k: max(v) for k, v in by_kind.items() if max(v) > 0}
    print(f"\n{qtype} per-kind worst NMSE: " + ", ".join(
        f"{k.removeprefix('model.layers.N.')}={v:.1e}" for k, v in sorted(quantized.items())))
    assert len(quantized) >= 15  # every projection kind lost something; norms, router did not


def port_vs_references(site: Path, qtype: str, weights_gguf: Path | None = None) -> dict:
    """Per point: (port vs dequantized reference, dequantized vs original, port vs original),
    the port running flash-mini quantized to ``qtype``; the "dequantized" reference reads
    ``weights_gguf`` (default: that same quantized GGUF)."""
    from harness.checks.cases import load_case
    from harness.llamacpp.client import ContextParams, WorkerClient
    from harness.llamacpp.names import to_canonical, wanted_names
    from harness.quant.gguf_quantize import quantize
    from ports.llamacpp import port
    from references.config import load_config
    from references.model import BailingHybridReference, ReferenceOptions

    ckpt = checkpoint("flash-mini")
    gguf = quantize(flash_mini_f32(), qtype, site=site)
    prompt = list(load_case(ROOT / "cases" / "flash-mini.toml").prompts[1].tokens)
    points = [*EARLY_POINTS, "result_output"]
    options = ReferenceOptions(dtype="float64")
    original = BailingHybridReference.from_checkpoint(ckpt, options).start(points).feed(prompt)
    weights = GgufWeights(weights_gguf or gguf, json.loads((ckpt / "config.json").read_text()))
    dequantized = BailingHybridReference(load_config(ckpt), weights, options)
    deq = dequantized.start(points).feed(prompt)
    with WorkerClient(site=site, label=f"llama.cpp {qtype}") as w:
        w.load(gguf, ContextParams(n_ctx=128, n_batch=128, n_ubatch=128))
        out = w.feed(prompt, wanted_names(port.NAMES, points))
    got = {**to_canonical(port.NAMES, out.tensors, points, len(prompt)),
           "result_output": out.logits}
    return {p: (nmse(got[p], deq[p]), nmse(deq[p], original[p]), nmse(got[p], original[p]))
            for p in points}


def tracking_failures(report: dict, qtype: str) -> list[str]:
    """Why the dequantized reference does not explain the quantized port (empty: it does)."""
    bad = []
    for p in EARLY_POINTS:
        port_vs_deq, deq_vs_orig, port_vs_orig = report[p]
        if not port_vs_deq > 0:  # activations are quantized in the port's matmuls
            bad.append(f"{p}: port equals the dequantized reference exactly")
        # the dequantized reference explains most of the port's departure from the original
        if not port_vs_deq < port_vs_orig / 2:
            bad.append(f"{p}: port-vs-dequantized {port_vs_deq:.1e} not < half of "
                       f"port-vs-original {port_vs_orig:.1e}")
        # 4-5 bit weights: orders of magnitude; 8-bit: the port's 8-bit activations err as much
        if qtype != "Q8_0" and not port_vs_deq * 30 < deq_vs_orig:
            bad.append(f"{p}: port-vs-dequantized {port_vs_deq:.1e} not 30x below "
                       f"dequantized-vs-original {deq_vs_orig:.1e}")
    port_vs_deq, deq_vs_orig, _ = report["result_output"]
    # after 8 routed layers a few expert choices flip either way
    if qtype != "Q8_0" and not port_vs_deq * 3 < deq_vs_orig:
        bad.append(f"logits: port-vs-dequantized {port_vs_deq:.1e} not 3x below "
                   f"dequantized-vs-original {deq_vs_orig:.1e}")
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_the_port_on_a_quantized_gguf_tracks_the_dequantized_reference(
    site: Path, qtype: str
) -> None:
    report = port_vs_references(site, qtype)
    print(f"\n{qtype} (port-vs-dequantized, dequantized-vs-original, port-vs-original): "
          + ", ".join(f"{p}=({a:.1e}, {b:.1e}, {c:.1e})" for p, (a, b, c) in report.items()))
    assert tracking_failures(report, qtype) == []


@pytest.mark.slow
def test_a_reference_on_the_unquantized_weights_is_caught(site: Path) -> None:
    """Mutation: the "dequantized" reference reads the f32 GGUF, i.e. ignores quantization."""
    report = port_vs_references(site, "Q4_K_M", weights_gguf=flash_mini_f32())
    bad = tracking_failures(report, "Q4_K_M")
    assert any(b.startswith("l_out-0: port-vs-dequantized") for b in bad), bad
    assert any(b.startswith("logits:") for b in bad), bad


@pytest.mark.slow  # quantizes flash-mini (cached)
def test_a_row_or_column_range_of_a_q5_1_weight_declares_its_own_block_minima() -> None:
    """ggml's Q4_1/Q5_1 matmul adds ``m * s`` per block: a streamed read of some rows or
    columns must carry exactly those rows' and columns' minima, or its rounding is another
    weight's (Q5_K_M falls back to Q5_1 on flash-mini's 64-wide rows)."""
    from harness.backends.llamacpp_backend import candidate_gguf
    from harness.backends.targets import Target
    from references.activation_rounding import block_min, declared

    ckpt = checkpoint("flash-mini")
    gguf = candidate_gguf(Target.parse("llamacpp:quant=Q5_K_M"), ckpt)
    weights = GgufWeights(gguf, json.loads((ckpt / "config.json").read_text()),
                          activations="ggml-cpu")
    for name in ("model.layers.0.mlp.gate_proj.weight",
                 "model.layers.1.mlp.experts.5.gate_proj.weight"):
        assert weights.gguf_types(name) == ("Q5_1",), name
        whole = weights.get(name, torch.float64, CPU)
        m = block_min(whole)
        assert declared(whole) == "q8_1" and m.shape == (whole.shape[0], whole.shape[1] // 32)
        assert m.abs().sum() > 0
        rows = weights.get(name, torch.float64, CPU, rows=(3, 17))
        cols = weights.get(name, torch.float64, CPU, cols=(32, 64))
        assert torch.equal(block_min(rows), m[3:17]), name
        assert torch.equal(block_min(cols), m[:, 1:2]), name
        assert torch.equal(rows, whole[3:17]) and torch.equal(cols, whole[:, 32:64])
