"""The streamed reference (weights read from the files when a forward needs them) computes what the
in-memory reference computes, on every Ling-2.6 case, prefill and decode, and reads each byte of
the checkpoint at most once per forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.checks.cases import SMALL_PARAMETERS, load_cases, materialize, parameter_count
from harness.core import capture_points
from harness.core.metrics import nmse
from references.model import BailingHybridReference, ReferenceOptions
from references.weights import choose_load, in_memory_bytes

# every small Ling-2.6 case (the realistic-width one streams: tests/test_flash_widths_case.py)
CASES = [c for c in load_cases()
         if c.family == "ling26" and parameter_count(c) < SMALL_PARAMETERS]
IDENTICAL = 1e-28  # float64 NMSE bound for "identical captures"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: on a shared 2-core machine torch's thread pool makes them ~25x
    slower (measured 5.8 s vs 0.21 s per flash-mini forward), so run them single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _models(case, **options) -> tuple[BailingHybridReference, BailingHybridReference]:
    ckpt = materialize(case)
    return (
        BailingHybridReference.from_checkpoint(ckpt, ReferenceOptions(load="memory", **options)),
        BailingHybridReference.from_checkpoint(ckpt, ReferenceOptions(load="streamed", **options)),
    )


def _points(model: BailingHybridReference) -> list[str]:
    return capture_points.all_points(model.n_layers, mtp=model.mtp is not None)


def _worst(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[str, float]:
    assert sorted(a) == sorted(b)
    scores = {k: nmse(a[k], b[k]) for k in a}
    return max(scores.items(), key=lambda kv: kv[1])


def _decode(model: BailingHybridReference, tokens, steps: int) -> list[dict[str, np.ndarray]]:
    """The prompt in one feed, then ``steps`` tokens one feed each (the prompt's tail)."""
    session = model.start(_points(model))
    head, tail = tokens[: len(tokens) - steps], tokens[len(tokens) - steps :]
    return [session.feed(head)] + [session.feed([t]) for t in tail]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_streamed_prefill_captures_equal_the_in_memory_ones(case):
    memory, streamed = _models(case)
    assert (memory.load_mode, streamed.load_mode) == ("memory", "streamed")
    for prompt in case.prompts:
        a = memory.start(_points(memory)).feed(list(prompt.tokens))
        b = streamed.start(_points(streamed)).feed(list(prompt.tokens))
        point, worst = _worst(b, a)
        assert worst <= IDENTICAL, f"{case.name}/{prompt.name}: {point} NMSE {worst:.3g}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_streamed_decode_steps_equal_the_in_memory_ones(case):
    memory, streamed = _models(case)
    tokens = list(case.prompts[0].tokens)
    steps = min(case.decode_steps, len(tokens) - 1)
    for i, (a, b) in enumerate(zip(_decode(memory, tokens, steps),
                                   _decode(streamed, tokens, steps), strict=True)):
        point, worst = _worst(b, a)
        assert worst <= IDENTICAL, f"{case.name} feed {i}: {point} NMSE {worst:.3g}"


def _flash_mini():
    return next(c for c in CASES if c.name == "flash-mini")


def _read_twice(log) -> list[str]:
    """Tensors some part of which the log shows read twice (overlapping row and column ranges)."""
    by_name: dict[str, list] = {}
    for r in log:
        by_name.setdefault(r.name, []).append((r.rows, r.cols))
    twice = []
    for name, ranges in by_name.items():
        for i, (ra, ca) in enumerate(ranges):
            if any(ra[0] < rb[1] and rb[0] < ra[1] and ca[0] < cb[1] and cb[0] < ca[1]
                   for rb, cb in ranges[i + 1 :]):
                twice.append(name)
                break
    return twice


def _experts_read_but_not_routed(model, caps) -> dict[int, set[int]]:
    names = {r.name for r in model.weight_reads.log}
    extra = {}
    for layer in range(1, model.n_layers):
        routed = set(caps[f"ffn_moe_topk-{layer}"].ravel().tolist())
        read = {int(n.split(".")[5]) for n in names
                if n.startswith(f"model.layers.{layer}.mlp.experts.")}
        assert routed <= read, f"layer {layer}: routed {sorted(routed - read)} never read"
        if read - routed:
            extra[layer] = read - routed
    return extra


def _streamed_prefill(tokens, points=None):
    _, streamed = _models(_flash_mini())
    caps = streamed.start(points or _points(streamed)).feed(tokens)
    return streamed, caps


def test_a_streamed_forward_reads_no_byte_twice():
    streamed, _ = _streamed_prefill(list(_flash_mini().prompts[-1].tokens))
    assert _read_twice(streamed.weight_reads.log) == []
    assert streamed.weight_reads.bytes_read <= sum(
        p.stat().st_size for p in materialize(_flash_mini()).glob("*.safetensors"))


def test_reading_lm_head_once_per_head_would_be_caught(monkeypatch):
    """Mutation: the trunk and the MTP head each take their own pass over lm_head."""
    real = BailingHybridReference.logits_many

    def per_head(self, hidden):
        return [real(self, [h])[0] for h in hidden]

    monkeypatch.setattr(BailingHybridReference, "logits_many", per_head)
    streamed, _ = _streamed_prefill(list(_flash_mini().prompts[-1].tokens))
    assert _read_twice(streamed.weight_reads.log) == ["lm_head.weight"]


def test_a_streamed_forward_reads_only_the_routed_experts_and_the_prompts_rows():
    tokens = [1, 17, 42]
    streamed, caps = _streamed_prefill(tokens)
    assert _experts_read_but_not_routed(streamed, caps) == {}
    rows = sorted(r.rows[0] for r in streamed.weight_reads.log
                  if r.name == "model.word_embeddings.weight")
    assert rows == sorted(set(tokens))  # the MTP head's rows (tokens 1..) are not read again


def test_reading_every_expert_would_be_caught(monkeypatch):
    """Mutation: an MoE that loads all its experts, routed or not."""
    import references.model as model_mod

    real = model_mod.moe_forward

    def greedy(x, w, cfg, variant):
        for e in range(len(w.experts)):
            w.experts[e](x[:0])
        return real(x, w, cfg, variant)

    monkeypatch.setattr(model_mod, "moe_forward", greedy)
    streamed, caps = _streamed_prefill([1, 17, 42])
    assert _experts_read_but_not_routed(streamed, caps) != {}


def test_decode_reads_the_weights_again_every_step():
    """Streamed holds nothing between forwards: a step reads as much as any one-token forward."""
    case = _flash_mini()
    _, streamed = _models(case)
    session = streamed.start()
    log = streamed.weight_reads.log
    session.feed([1, 2, 3])
    first = len(log)
    session.feed([4])
    assert len(log) > first
    assert all(r.name != "model.word_embeddings.weight" or r.rows == (4, 5) for r in log[first:])


def test_blocked_lm_head_and_dense_layer_match_the_whole_matrices(monkeypatch):
    """Past BLOCK_BYTES, lm_head runs in vocabulary blocks, the GLA projections in row blocks and
    the dense SwiGLU in intermediate blocks; all agree with the whole matrices (float64)."""
    import references.model as model_mod

    case = _flash_mini()
    memory, _ = _models(case)
    monkeypatch.setattr(model_mod, "BLOCK_BYTES", 8 * 64 * 40)  # 40 rows of lm_head, 13 of 96
    streamed = BailingHybridReference.from_checkpoint(materialize(case),
                                                      ReferenceOptions(load="streamed"))
    tokens = list(case.prompts[0].tokens)
    a = memory.start(_points(memory)).feed(tokens)
    b = streamed.start(_points(streamed)).feed(tokens)
    point, worst = _worst(b, a)
    assert worst <= IDENTICAL, f"{point} NMSE {worst:.3g}"
    lm_reads = [r for r in streamed.weight_reads.log if r.name == "lm_head.weight"]
    assert len(lm_reads) == -(-512 // 40)  # ceil(vocab / rows per block), one pass
    def blocks(name):
        return len([r for r in streamed.weight_reads.log if r.name == name])

    assert blocks("model.layers.0.mlp.down_proj.weight") == -(-96 // 13)
    assert blocks("model.layers.0.attention.query_key_value.weight") == -(-192 // 40)


def test_a_streamed_gla_layer_is_still_a_gla_layer_to_its_users():
    """harness.checks.slope_diagnostics reads blocks[l].attention as GLAWeights (q/k norms, qkv)."""
    from references.model import GLAWeights

    memory, streamed = _models(_flash_mini())
    a, b = memory.blocks[0].attention, streamed.blocks[0].attention
    assert isinstance(b, GLAWeights)
    for field in ("qkv", "q_norm", "k_norm", "g_proj", "g_norm", "dense", "log_decay"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_the_blocked_paths_would_catch_a_dropped_block(monkeypatch):
    """Mutation: a dense SwiGLU that skips its last intermediate block differs visibly."""
    import references.model as model_mod

    case = _flash_mini()
    memory, _ = _models(case)
    monkeypatch.setattr(model_mod, "BLOCK_BYTES", 8 * 64 * 40)
    real_range = range

    def short_range(*args):
        r = real_range(*args)
        return r[:-1] if len(args) == 3 and args[1] == 96 else r

    monkeypatch.setattr(model_mod, "range", short_range, raising=False)
    streamed = BailingHybridReference.from_checkpoint(materialize(case),
                                                      ReferenceOptions(load="streamed"))
    tokens = list(case.prompts[0].tokens)
    a = memory.start(["ffn_out-0"]).feed(tokens)
    b = streamed.start(["ffn_out-0"]).feed(tokens)
    assert nmse(b["ffn_out-0"], a["ffn_out-0"]) > 1e-6


# In-memory float32 weights are views of the file mapping at the file's (unaligned) offsets and
# BLAS takes another path for them: float32 rounding-level differences (measured 1.5e-15 on
# mtp_result_output, 0 elsewhere), four decades under the float32 tolerance (1e-8).
SAME_FOR = {"float32": 1e-12, "bfloat16": 0.0}


@pytest.mark.parametrize("dtype", sorted(SAME_FOR))
def test_the_candidate_dtypes_stream_too(dtype):
    case = _flash_mini()
    memory, streamed = _models(case, dtype=dtype)
    tokens = list(case.prompts[0].tokens)
    a = memory.start(_points(memory)).feed(tokens)
    b = streamed.start(_points(streamed)).feed(tokens)
    point, worst = _worst(b, a)
    assert worst <= SAME_FOR[dtype], f"{dtype}: {point} NMSE {worst:.3g}"


def test_auto_keeps_small_checkpoints_in_memory_and_streams_big_ones():
    gib = 2**30
    assert choose_load("auto", 10_000_000, torch.float64, ram=64 * gib) == "memory"
    # Ling-2.6-flash: 104e9 parameters; float64 + the float32 read copy = 1.25 TB
    assert choose_load("auto", 104_000_000_000, torch.float64, ram=512 * gib) == "streamed"
    # the boundary: a quarter of RAM
    n = (16 * gib) // 12
    assert in_memory_bytes(n, torch.float64) <= 16 * gib
    assert choose_load("auto", n, torch.float64, ram=64 * gib) == "memory"
    assert choose_load("auto", n + 1, torch.float64, ram=64 * gib) == "streamed"
    assert choose_load("memory", 104_000_000_000, torch.float64, ram=gib) == "memory"
    assert choose_load("streamed", 10, torch.float64, ram=64 * gib) == "streamed"


def test_auto_picks_memory_for_every_parity_case():
    for case in CASES:
        model = BailingHybridReference.from_checkpoint(materialize(case))
        assert model.load_mode == "memory", case.name


def test_the_torch_backend_takes_a_load_option():
    from harness.backends.base import BackendOptions
    from harness.backends.torch_backend import reference_options
    from harness.core.errors import InputError

    opts = reference_options(BackendOptions(dtype="float64", extra={"load": "streamed"}))
    assert opts.load == "streamed"
    with pytest.raises(InputError, match="load="):
        reference_options(BackendOptions(dtype="float64", extra={"load": "disk"}))


def test_a_wrong_shape_is_refused_by_the_streamed_load_before_any_read(tmp_path):
    from harness.core.errors import InputError
    from tests.tiny_checkpoint import write_tiny_checkpoint

    name = "model.layers.3.mlp.experts.5.up_proj.weight"
    write_tiny_checkpoint(tmp_path, replace={name: np.zeros((16, 31), np.float32)})
    with pytest.raises(InputError, match=f"{name} has shape \\(16, 31\\)"):
        BailingHybridReference.from_checkpoint(tmp_path, ReferenceOptions(load="streamed"))


def test_a_non_finite_weight_is_named_when_the_streamed_forward_reads_it(tmp_path):
    from harness.core.errors import InputError
    from tests.tiny_checkpoint import write_tiny_checkpoint

    bad = np.ones((32,), np.float32)
    bad[3] = np.nan
    name = "model.layers.1.input_layernorm.weight"
    write_tiny_checkpoint(tmp_path, replace={name: bad})
    model = BailingHybridReference.from_checkpoint(tmp_path, ReferenceOptions(load="streamed"))
    with pytest.raises(InputError, match=name.replace(".", "\\.") + ".*NaN"):
        model.start().feed([1, 2, 3])


def test_speculative_mtp_decoding_runs_streamed_and_drafts_what_memory_drafts():
    from harness.checks.mtp import speculative_greedy
    from references.mtp_session import ReferenceMtpModel

    memory, streamed = _models(_flash_mini())
    prompt = list(_flash_mini().prompts[0].tokens)
    a = speculative_greedy(ReferenceMtpModel(memory), prompt, 6)
    b = speculative_greedy(ReferenceMtpModel(streamed), prompt, 6)
    assert b.tokens == a.tokens and len(a.draft_steps) > 0
    assert [(s.drafts, s.accepted) for s in b.steps] == [(s.drafts, s.accepted) for s in a.steps]
    for sa, sb in zip(a.steps, b.steps, strict=True):
        assert np.array_equal(sa.draft_logits, sb.draft_logits)
