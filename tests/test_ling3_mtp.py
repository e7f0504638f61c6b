"""Ling 3.0's MTP head: ours (transformers has none), checked against transformers' own MLA and
against upstream llama.cpp's ``bailingmoe3`` MTP context, and shown to catch every MTP mistake.

``ling3-mtp-agree`` shapes its weights so acceptance is a real figure (0 < rate < 1); on it the
reference's acceptance is stated, upstream llama.cpp must reproduce it with identical drafts and
draft logits within the float32 tolerance, and each MTP mutation of the reference must be caught
by that very comparison and named at its first MTP capture point.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from harness.backends.base import BackendOptions
from harness.backends.targets import Target
from harness.backends.transformers_ling3 import load_ling3
from harness.checks.cases import CASES_DIR, load_case, materialize
from harness.checks.compare import compare_captures, first_divergence
from harness.checks.mtp import (
    MtpPrompt,
    MtpRunner,
    OracleDrafts,
    load_mtp_model,
    plain_greedy,
    replay_drafts,
    speculative_greedy,
)
from harness.core.errors import InputError
from harness.core.metrics import nmse
from references.checkpoint_io import read_tensors, weight_files
from references.ling3.config import load_config
from references.ling3.mtp import (
    Ling3ReferenceMtpModel,
    load_ling3_mtp,
    mla_weights,
    mtp_tensor_shapes,
)
from references.mla import MLACache, MLADims, mla_forward
from references.variant import mutations
from tests.llamacpp_testing import require_llamacpp

STEPS = 32
REFERENCE = Target.parse("torch-float64")
# mutation -> the first MTP capture point it changes (as for Ling-2.6, tests/test_mtp_mutations.py)
EXPECTED = {
    "mtp_pre_norm_hidden": "mtp_hnorm",
    "mtp_trunk_norm": "mtp_result_norm",
    "mtp_router_no_bias": "mtp_ffn_moe_topk",
    "mtp_concat_swapped": "mtp_eh_proj",
    "mtp_wrong_token": "mtp_enorm",
}
# The reference's own acceptance on ling3-mtp-agree over 32 tokens (accepted, drafted), stated.
AGREE_ACCEPTANCE = {"random-64": (11, 19), "random-96": (11, 20)}


@pytest.fixture(scope="module")
def agree():
    case = load_case(CASES_DIR / "ling3-mtp-agree.toml")
    return case, materialize(case)


@pytest.fixture(scope="module")
def reference(agree) -> Ling3ReferenceMtpModel:
    model = load_mtp_model(REFERENCE, agree[1])
    assert isinstance(model, Ling3ReferenceMtpModel)
    return model


def _tokens(case, name: str) -> tuple[int, ...]:
    return next(p.tokens for p in case.prompts if p.name == name)


# ---- the head's MLA is transformers' MLA ----


def test_our_gated_mla_computes_transformers_mla_layer():
    """The head's MLA (references.mla with Ling 3.0's head-wise gate) on a trunk MLA layer's
    input reproduces transformers' output of that layer: same q-LoRA, interleaved RoPE, latent
    KV, gate and projection."""
    case = load_case(CASES_DIR / "ling3-mini.toml")
    ckpt = materialize(case)
    cfg = load_config(ckpt)
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_mla(i))
    trunk = load_ling3(ckpt, BackendOptions(dtype="float64"))
    tokens = case.prompts[1].tokens
    caps = trunk.start([f"attn_norm-{layer}", f"attn_out-{layer}"]).feed(tokens)
    prefix = f"model.layers.{layer}.attention."
    where = weight_files(ckpt)
    arrays = read_tensors(where, _shapes_of(where, prefix))
    w = mla_weights(lambda n: torch.from_numpy(arrays[n]).double(), prefix, cfg)
    a = torch.from_numpy(caps[f"attn_norm-{layer}"])
    out, _ = mla_forward(a, w, MLADims.from_config(cfg), MLACache())
    assert nmse(out.numpy(), caps[f"attn_out-{layer}"]) < 1e-12


def _shapes_of(where: dict[str, Path], prefix: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for name, path in where.items():
        if name.startswith(prefix):
            with safe_open(path, framework="numpy") as fh:
                shapes[name] = tuple(fh.get_slice(name).get_shape())
    return shapes


# ---- the reference head as a drafter ----


def test_reference_acceptance_is_stated_and_speculation_keeps_the_greedy_output(agree, reference):
    case, _ = agree
    for name, (accepted, drafted) in AGREE_ACCEPTANCE.items():
        tokens = _tokens(case, name)
        run = speculative_greedy(reference, tokens, STEPS)
        assert (run.num_accepted_tokens, run.num_draft_tokens) == (accepted, drafted)
        assert 0 < run.acceptance_rate < 1
        assert list(run.tokens) == plain_greedy(reference, tokens, STEPS)


def test_trunk_own_tokens_as_drafts_are_accepted_every_time(agree, reference):
    tokens = _tokens(agree[0], "random-64")
    run = speculative_greedy(OracleDrafts(reference, tokens, STEPS + 2), tokens, STEPS)
    assert run.num_draft_tokens > 0 and run.acceptance_rate == 1.0


def test_drafts_are_the_teacher_forced_head_rows(agree, reference):
    """Drafting (incremental, with undo after every rejection) computes the rows the head gives
    when the whole committed sequence is known up front.  Not bit-exact as for Ling-2.6: the
    trunk is transformers', whose KDA runs chunked on a prompt and recurrent per token, both in
    float32, so the hidden the head reads differs at float32 rounding (measured 5e-17)."""
    tokens = _tokens(agree[0], "random-64")
    run = speculative_greedy(reference, tokens, STEPS)
    forced = reference.capture([*tokens, *run.tokens])["mtp_result_output"]
    for step in run.steps:
        if step.drafts:
            assert nmse(step.draft_logits[0], forced[step.position]) < 1e-14


def test_chained_drafts_keep_the_greedy_output(agree, reference):
    tokens = _tokens(agree[0], "random-96")
    run = speculative_greedy(reference, tokens, 24, chain=3)
    assert list(run.tokens) == plain_greedy(reference, tokens, 24)
    assert max(len(s.drafts) for s in run.steps) == 3


# ---- mutations: named at their first MTP point ----


def test_every_mtp_mutation_is_listed():
    assert set(EXPECTED) == {m for m in mutations() if m.startswith("mtp_")}


@pytest.mark.parametrize("mutation", sorted(EXPECTED))
def test_mtp_mutation_is_named_at_its_first_mtp_point(agree, reference, mutation):
    case, ckpt = agree
    tokens = _tokens(case, "random-64")
    correct = reference.capture(tokens)
    options = BackendOptions(extra={"variant": mutation})
    mutant = load_ling3_mtp(ckpt, options, load_trunk=load_ling3).capture(tokens)
    df = compare_captures(mutant, correct, case.tolerance("float32"))
    assert first_divergence(df) == EXPECTED[mutation]
    assert df.loc[df["point"] == "result_output", "passed"].item(), "the trunk is untouched"
    assert not df.loc[df["point"] == "mtp_result_output", "passed"].item()


def test_the_unmutated_head_passes_every_mtp_point(agree, reference):
    tokens = _tokens(agree[0], "random-64")
    caps = reference.capture(tokens)
    again = load_ling3_mtp(agree[1], BackendOptions(), load_trunk=load_ling3).capture(tokens)
    df = compare_captures(again, caps, agree[0].tolerance("float32"))
    assert df["passed"].all() and len(df) == len(caps)


# ---- upstream llama.cpp's bailingmoe3 MTP context ----


@pytest.fixture(scope="module")
def llama_runs(agree):
    """One runner (llama.cpp loaded once) judging llama.cpp against the correct reference and
    against each mutant reference, on the first prompt."""
    require_llamacpp()
    case, ckpt = agree
    prompt = MtpPrompt(case.name, "random-64", _tokens(case, "random-64"))
    llama = Target.parse("llamacpp-float32")
    out = {}
    shared: dict = {}
    for name in [None, *sorted(EXPECTED)]:
        ref = REFERENCE if name is None else Target.parse(f"torch-float64:variant={name}")
        runner = MtpRunner(steps=STEPS, reference=ref)
        runner._models = shared  # load llama.cpp (and each reference) once
        out[name] = runner.run(ckpt, prompt, [llama])
    return out


def test_upstream_llamacpp_mtp_equals_our_reference_head(llama_runs):
    ref, cand = llama_runs[None]
    assert cand.error == "" and cand.ok
    assert cand.result.trace() == ref.result.trace()
    assert (cand.result.num_accepted_tokens, cand.result.num_draft_tokens) == AGREE_ACCEPTANCE[
        "random-64"
    ]
    assert cand.draft_nmse_max < 1e-10 and cand.draft_top1 == 1.0
    assert cand.mtp_first_divergence == "none"


@pytest.mark.parametrize("mutation", sorted(EXPECTED))
def test_a_wrong_reference_head_fails_the_llamacpp_mtp_check(llama_runs, mutation):
    """The check that passes llama.cpp against the right head fails it against each wrong one:
    by different drafts or, where the drafts survive, by draft logits beyond the tolerance."""
    _, cand = llama_runs[mutation]
    assert cand.error == "" and cand.greedy_unchanged
    assert not cand.ok
    assert not cand.drafts_match_reference or cand.draft_nmse_max > 1e-6


# ---- bad input ----


def test_a_missing_mtp_tensor_is_named(agree, tmp_path):
    """An MTP shard without eh_proj (and an index that agrees) is refused by name."""
    from safetensors.numpy import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(agree[1], ckpt)
    victim = next(n for n in mtp_tensor_shapes(load_config(ckpt)) if n.endswith("eh_proj.weight"))
    shard = ckpt / "model-mtp-layer.safetensors"
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][victim]
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError, match=rf"missing MTP tensor\(s\) {victim}"):
        load_ling3_mtp(ckpt, BackendOptions(), load_trunk=load_ling3)


def test_a_trunk_variant_is_refused_for_ling3(agree):
    options = BackendOptions(extra={"variant": "slope_off_by_one"})
    with pytest.raises(InputError, match="only the MTP mutations"):
        load_ling3_mtp(agree[1], options, load_trunk=load_ling3)


def test_a_checkpoint_without_mtp_layer_says_so():
    ckpt = materialize(load_case(CASES_DIR / "ling3-plain.toml"))
    with pytest.raises(InputError, match="num_nextn_predict_layers is 0"):
        load_mtp_model(REFERENCE, ckpt)


# ---- the CLI on a Ling 3.0 directory ----


def test_mtp_cli_on_a_ling3_checkpoint_passes_llamacpp_and_fails_a_wrong_head(agree, tmp_path):
    """``python -m harness mtp --checkpoint DIR`` on a Ling 3.0 directory outside the case cache:
    upstream llama.cpp passes (exit 0); a candidate whose head uses the trunk's norm fails
    (exit 1) with a finding."""
    require_llamacpp()
    from harness.cli.main import main

    ckpt = tmp_path / "ling3"
    shutil.copytree(agree[1], ckpt)
    argv = ["mtp", "--checkpoint", str(ckpt), "--steps", "16"]
    assert main([*argv, "--backends", "llamacpp", "--out", str(tmp_path / "ok")]) == 0
    wrong = "torch:variant=mtp_trunk_norm"
    assert main([*argv, "--backends", wrong, "--out", str(tmp_path / "bad")]) == 1
    report = (tmp_path / "bad" / "index.html").read_text()
    assert "draft logits differ" in report or "drafts or acceptance differ" in report


def test_upstream_chains_drafts_on_the_post_norm_hidden(agree):
    """A finding, pinned: with chained drafts upstream bailingmoe3 feeds the head its own hidden
    *after* the MTP final_layernorm (``h_nextn``), where our reference (as vLLM) chains the block
    output before it.  In the same contexts, every first draft equals the reference's; chained
    ones do not."""
    require_llamacpp()
    case, ckpt = agree
    tokens = _tokens(case, "random-64")
    llama = load_mtp_model(Target.parse("llamacpp-float32"), ckpt)
    run = speculative_greedy(llama, tokens, 24, chain=3)
    rows = replay_drafts(load_mtp_model(REFERENCE, ckpt), run)
    pairs = list(zip(run.steps, rows, strict=True))
    first = [nmse(s.draft_logits[0], r[0]) for s, r in pairs if s.drafts]
    chained = [nmse(s.draft_logits[i], r[i]) for s, r in pairs for i in range(1, len(s.drafts))]
    assert max(first) < 1e-10
    assert chained and min(chained) > 1e-6
