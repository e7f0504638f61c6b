"""llama-server's undo: ``mtp_rollback=seq_rm`` rolls the trunk back in place
(``llama_memory_seq_rm``) instead of copying its sequence state, so a rejected draft costs nothing.

Recurrent layers can only do that from per-token rollback planes (``n_rs_seq``): upstream
``bailingmoe3`` keeps them for its KDA states, and our Ling-2.6 port now keeps them for its GLA
states (the last tokens of a ubatch run one ``ggml_gated_linear_attn`` per token, each state
written to its plane).  The proof is the state-copy undo: with either undo the speculative run is
the same, token for token and verdict for verdict, and speculation never changes the greedy output.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.backends.base import BackendOptions
from harness.backends.targets import Target
from harness.checks.cases import CASES_DIR, load_case, materialize
from harness.checks.mtp import load_mtp_model, plain_greedy, speculative_greedy
from harness.core.errors import InputError
from tests.llamacpp_testing import require_llamacpp

STEPS = 24
CASES = ("mtp-agree", "ling3-mtp-agree")  # our port (GLA), upstream bailingmoe3 (KDA)
_models: dict[tuple[str, str], object] = {}


def _model(case: str, rollback: str):
    require_llamacpp()
    if (case, rollback) not in _models:
        ckpt = materialize(load_case(CASES_DIR / f"{case}.toml"))
        target = Target.parse(f"llamacpp:mtp_rollback={rollback}")
        _models[case, rollback] = load_mtp_model(target, ckpt)
    return _models[case, rollback]


def _tokens(case: str) -> tuple[int, ...]:
    return load_case(CASES_DIR / f"{case}.toml").prompts[0].tokens


@pytest.mark.parametrize("chain", [1, 3])
@pytest.mark.parametrize("case", CASES)
def test_in_place_rollback_decodes_as_the_state_copy_does(case, chain):
    in_place, copy = _model(case, "seq_rm"), _model(case, "state")
    assert in_place.rs_seq > 0 and copy.rs_seq == 0
    tokens = _tokens(case)
    run = speculative_greedy(in_place, tokens, STEPS, chain)
    assert run.trace() == speculative_greedy(copy, tokens, STEPS, chain).trace()
    assert list(run.tokens) == plain_greedy(in_place, tokens, STEPS)
    assert run.num_draft_tokens > run.num_accepted_tokens > 0  # rejections were rolled back


@pytest.mark.parametrize("case", CASES)
def test_rollback_planes_leave_the_prefill_bit_identical(case):
    """The per-token split of a ubatch's last tokens is the same recurrence: same logits."""
    tokens = list(_tokens(case))
    with_planes = _model(case, "seq_rm").start().feed(tokens)
    without = _model(case, "state").start().feed(tokens)
    assert np.array_equal(with_planes, without)


def test_a_rollback_to_the_wrong_position_is_caught(monkeypatch):
    """Mutation: keep one token fewer than the accepted prefix.  The trunk then continues from
    the wrong state and speculation changes the greedy output."""
    from harness.llamacpp import mtp

    model = _model("mtp-agree", "seq_rm")
    original = mtp.LlamaCppMtpModel.request

    def off_by_one(self, req, doing):
        if req.get("op") == "rollback":
            req = {**req, "keep_to": req["keep_to"] - 1}
        return original(self, req, doing)

    monkeypatch.setattr(mtp.LlamaCppMtpModel, "request", off_by_one)
    tokens = _tokens("mtp-agree")
    run = speculative_greedy(model, tokens, STEPS)
    monkeypatch.setattr(mtp.LlamaCppMtpModel, "request", original)
    assert list(run.tokens) != plain_greedy(model, tokens, STEPS)


def test_a_bad_rollback_option_is_an_input_error():
    from harness.backends.llamacpp_mtp import load_llamacpp_mtp

    ckpt = materialize(load_case(CASES_DIR / "mtp-agree.toml"))
    with pytest.raises(InputError, match="mtp_rollback"):
        load_llamacpp_mtp(ckpt, BackendOptions(extra={"mtp_rollback": "undo"}))
    with pytest.raises(InputError, match="mtp_rs_seq"):
        load_llamacpp_mtp(ckpt, BackendOptions(extra={"mtp_rollback": "seq_rm", "mtp_rs_seq": "0"}))
