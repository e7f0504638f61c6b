"""The MLX backend's MTP head on Ling 3.0 (mlx-lm's ``bailing_moe_v3`` trunk, the head assembled by
``harness.backends.mlx_mtp`` from its ``BailingDecoderLayer``) speculates exactly as the float64
reference does.

On ``ling3-mtp-agree`` (weights shaped so acceptance lies strictly between 0 and 1) MLX in float32
must draft the reference's tokens, accept the same ones, leave the greedy output unchanged and
produce draft logits within the float32 tolerance.  Its session must roll back exactly: the KDA
layers keep their state in mlx-lm's ``ArraysCache``, the MLA layers and the head in ``KVCache``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from harness.backends.mlx_backend import MlxBackend
from harness.backends.targets import Target
from harness.checks.cases import CASES_DIR, load_case, materialize
from harness.checks.mtp import MtpPrompt, MtpRunner, load_mtp_model
from harness.core.errors import InputError

pytest.importorskip("transformers.models.bailing_hybrid")  # the Ling 3.0 reference trunk
pytestmark = pytest.mark.skipif(
    not MlxBackend().availability().ok, reason=MlxBackend().availability().reason
)

STEPS = 32
MLX = Target.parse("mlx-float32")
DRAFT_NMSE = 1e-8  # the float32 parity tolerance; measured ~1e-13


@pytest.fixture(scope="module")
def agree():
    case = load_case(CASES_DIR / "ling3-mtp-agree.toml")
    return case, materialize(case)


@pytest.fixture(scope="module")
def mlx(agree):
    return load_mtp_model(MLX, agree[1])


@pytest.fixture(scope="module")
def runner():
    return MtpRunner(steps=STEPS)


def _run(runner: MtpRunner, agree, prompt: str):
    case, ckpt = agree
    tokens = next(p.tokens for p in case.prompts if p.name == prompt)
    ref, cand = runner.run(ckpt, MtpPrompt(case.name, prompt, tokens), [MLX])
    return ref, cand


@pytest.mark.parametrize("prompt", ["random-64", "random-96"])
def test_mlx_speculation_equals_the_reference_step_for_step(runner, agree, prompt):
    ref, cand = _run(runner, agree, prompt)
    assert cand.backend == "mlx-float32" and not cand.error
    assert 0 < ref.result.acceptance_rate < 1  # a real figure, so equality means something
    assert cand.result.trace() == ref.result.trace()  # same drafts, same verdicts, every step
    assert cand.drafts_match_reference and cand.greedy_unchanged
    assert cand.result.num_accepted_tokens == ref.result.num_accepted_tokens
    assert cand.draft_top1 == 1.0
    assert cand.draft_nmse_max < DRAFT_NMSE
    assert cand.ok


def test_chained_drafts_reuse_the_one_mtp_layer_as_the_reference_does(agree):
    """chain 3: ``draft_chain`` feeds the head its own output and rolls its KV cache back."""
    ref, cand = _run(MtpRunner(steps=STEPS, chain=3), agree, "random-64")
    assert cand.result.trace() == ref.result.trace()
    assert cand.greedy_unchanged and cand.draft_nmse_max < DRAFT_NMSE
    assert sum(cand.result.accepted_per_pos[1:]) > 0  # chained positions were accepted too


def test_restore_returns_the_session_to_the_snapshot_bit_for_bit(mlx, agree):
    """feed, snapshot, feed more and draft, restore, repeat: identical logits, and identical to a
    session that never went past the snapshot."""
    assert {type(c).__name__ for c in mlx.loaded.model.make_cache()} == {"ArraysCache", "KVCache"}
    tokens = list(agree[0].prompts[0].tokens)
    head, more, nxt, chained = tokens[:40], tokens[40:48], tokens[48], tokens[49]

    def go_on(session) -> list[np.ndarray]:
        return [session.feed(more), session.draft(nxt), session.draft_chain(chained)]

    session = mlx.start()
    session.feed(head)
    snap = session.snapshot()
    first = go_on(session)
    session.restore(snap)
    again = go_on(session)
    fresh = mlx.start()
    fresh.feed(head)
    never = go_on(fresh)
    for a, b, c in zip(first, again, never, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_restore_after_a_draft_undoes_the_heads_cache_too(mlx, agree):
    """A rejected step: snapshot after drafting, feed the drafts, restore, feed fewer tokens and
    draft again -- as a session that only ever fed those."""
    tokens = list(agree[0].prompts[1].tokens)
    session = mlx.start()
    session.feed(tokens[:30])
    session.draft(tokens[30])
    snap = session.snapshot()
    session.feed(tokens[30:34])
    session.restore(snap)
    logits = session.feed(tokens[30:32])
    draft = session.draft(tokens[32])
    fresh = mlx.start()
    fresh.feed(tokens[:30])
    fresh.draft(tokens[30])
    np.testing.assert_array_equal(logits, fresh.feed(tokens[30:32]))
    np.testing.assert_array_equal(draft, fresh.draft(tokens[32]))


def test_a_checkpoint_without_an_mtp_layer_is_an_input_error_naming_config_json(agree, tmp_path):
    ckpt = tmp_path / "no-mtp"
    shutil.copytree(agree[1], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(InputError, match=r"config\.json: num_nextn_predict_layers is 0"):
        load_mtp_model(MLX, ckpt)


def test_a_missing_mtp_tensor_is_an_input_error_naming_it(agree, tmp_path):
    import mlx.core as mx

    ckpt = tmp_path / "no-enorm"
    shutil.copytree(agree[1], ckpt)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    layer = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    name = f"model.layers.{layer}.enorm.weight"
    shard = ckpt / index["weight_map"].pop(name)
    tensors = {k: v for k, v in mx.load(str(shard)).items() if k != name}
    mx.save_safetensors(str(shard), tensors, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError, match=rf"missing MTP tensor\(s\) {name}"):
        load_mtp_model(MLX, ckpt)
