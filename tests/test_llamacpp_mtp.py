"""llama.cpp's MTP head through the harness's MTP protocol (harness.llamacpp.mtp).

Our Ling-2.6 port's trunk and ``LLAMA_CONTEXT_TYPE_MTP`` context run in a child process, driven
as upstream's draft-mtp drives them; on flash-mini its drafts, verdicts and greedy output must be
the float64 reference's, oracle drafts must be accepted 100 %, and speculation must never change
the greedy output.  Undo is ``llama_state_seq_get/set_data`` of the trunk sequence (the port's GLA
layers cannot roll back), which must be bit-exact.

Needs the harness's llama-cpp-python build with our port (``python -m harness.llamacpp.build
--with-our-port --install``); without llama_cpp these tests skip, unless
``BAILING_PARITY_REQUIRE_LLAMACPP=1``.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.backends.base import BackendOptions
from harness.backends.registry import implementation
from harness.backends.targets import Target
from harness.checks.cases import load_case, materialize
from harness.checks.mtp import (
    MtpPrompt,
    MtpRunner,
    OracleDrafts,
    plain_greedy,
    replay_drafts,
    speculative_greedy,
)
from harness.core.errors import ArchitectureNotSupported, InputError, PortFailure
from harness.core.metrics import nmse
from tests.llamacpp_testing import REQUIRE_ENV, require_llamacpp

ROOT = Path(__file__).resolve().parent.parent
STEPS = 16  # as the pytest plugin's mtp mode
NMSE_MAX = 1e-8
LLAMA = Target.parse("llamacpp-float32")


@pytest.fixture(scope="module")
def case():
    return load_case(ROOT / "cases" / "flash-mini.toml")


@pytest.fixture(scope="module")
def ckpt(case) -> Path:
    return materialize(case)


@pytest.fixture(scope="module")
def prompts(case) -> dict[str, tuple[int, ...]]:
    return {p.name: tuple(p.tokens) for p in case.prompts}


@pytest.fixture(scope="module")
def runner() -> MtpRunner:
    return MtpRunner(steps=STEPS)


def _load(runner: MtpRunner, target: Target, ckpt: Path):
    require_llamacpp()
    try:
        return runner.model(target, ckpt)
    except ArchitectureNotSupported as e:  # a llama_cpp built without our port
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {e}")
        pytest.skip(f"{e} (build with python -m harness.llamacpp.build --with-our-port --install)")


@pytest.fixture(scope="module")
def llama(runner, ckpt):
    return _load(runner, LLAMA, ckpt)


@pytest.fixture(scope="module")
def reference(runner, ckpt):
    return runner.model(runner.reference, ckpt)


# --- no llama.cpp needed ------------------------------------------------------------------------


def test_registered_as_an_mtp_backend() -> None:
    for family in ("ling26", "ling3"):
        impl = implementation("llamacpp", family)
        assert impl.capabilities.mtp and impl.capabilities.mtp_captures
        assert impl.mtp_loader == "harness.backends.llamacpp_mtp:load_llamacpp_mtp"


def test_a_bad_chain_option_is_an_input_error(ckpt) -> None:
    from harness.backends.llamacpp_mtp import load_llamacpp_mtp

    with pytest.raises(InputError, match="mtp_chain"):
        load_llamacpp_mtp(ckpt, BackendOptions(extra={"mtp_chain": "post"}), "x")


# --- llama.cpp ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["short", "random-96"])
def test_drafts_acceptance_and_greedy_equal_the_reference(runner, llama, ckpt, prompts, prompt):
    ref, cand = runner.run(ckpt, MtpPrompt("flash-mini", prompt, prompts[prompt]), [LLAMA])
    assert not cand.error, cand.error
    assert cand.result.trace() == ref.result.trace()  # same drafts, same verdicts, every step
    assert cand.drafts_match_reference and cand.greedy_unchanged and cand.ok
    assert cand.result.acceptance_rate == ref.result.acceptance_rate
    assert cand.draft_top1 == 1.0 and cand.draft_nmse_max < NMSE_MAX
    print(
        f"\n{prompt}: acceptance reference {ref.result.num_accepted_tokens}/"
        f"{ref.result.num_draft_tokens}, llama.cpp {cand.result.num_accepted_tokens}/"
        f"{cand.result.num_draft_tokens}; draft NMSE max {cand.draft_nmse_max:.2e}; "
        f"trunk snapshot {llama.snapshot_bytes} B"
    )


@pytest.mark.parametrize("chain", [1, 2])
def test_oracle_drafts_are_always_accepted(llama, prompts, chain):
    prompt = prompts["short"]
    oracle = OracleDrafts(llama, prompt, STEPS + chain)
    r = speculative_greedy(oracle, prompt, STEPS, chain)
    assert r.acceptance_rate == 1.0
    assert list(r.tokens) == oracle.sequence[len(prompt) : len(prompt) + STEPS]


@pytest.mark.parametrize("chain", [1, 2])
def test_rejections_roll_back_decision_for_decision_with_the_reference(
    llama, reference, prompts, chain
):
    """Every third oracle draft wrong: restores, multi-row MTP catch-up after accepted steps and
    chained drafts all happen; the pattern, the greedy output and the (non-chained) draft logits
    are the reference's."""
    prompt = prompts["short"]
    runs = [
        speculative_greedy(OracleDrafts(m, prompt, STEPS + chain, 3), prompt, STEPS, chain)
        for m in (reference, llama)
    ]
    assert runs[1].trace() == runs[0].trace()
    assert 0 < runs[1].acceptance_rate < 1
    assert list(runs[1].tokens) == plain_greedy(reference, prompt, STEPS)
    for a, b in zip(replay_drafts(llama, runs[0]), replay_drafts(reference, runs[0]), strict=True):
        if a.size:
            assert nmse(a[:1], b[:1]) < NMSE_MAX


@pytest.mark.parametrize("chain", [1, 2])
@pytest.mark.parametrize("prompt", ["short", "random-96"])
def test_speculative_greedy_equals_plain_greedy(llama, prompts, prompt, chain):
    r = speculative_greedy(llama, prompts[prompt], STEPS, chain)
    assert list(r.tokens) == plain_greedy(llama, prompts[prompt], STEPS)


def test_snapshots_are_freed_in_the_worker(llama, prompts):
    """A snapshot collected in the parent is dropped in the child with the next request."""
    s = llama.start()
    s.feed(prompts["short"])
    held = []
    for tok in range(8):
        snap = s.snapshot()
        s.feed([tok])
        held.append(llama.snapshots_held)
        del snap
        gc.collect()
    assert max(held) <= 2, held


def test_restore_is_bit_exact(llama, prompts):
    """Trunk logits and MTP drafts after a restore equal the first pass bit for bit (the MTP
    cache's speculative entries are trimmed at the next draft)."""
    prompt = list(prompts["random-96"])
    s = llama.start()
    s.feed(prompt)
    d0 = s.draft(5)
    snap = s.snapshot()
    s.draft_chain(6)
    first = s.feed([5, 6, 7])
    after = s.draft(8)
    s.restore(snap)
    again = s.feed([5, 6, 7])
    assert np.array_equal(first, again)
    assert np.array_equal(s.draft(8), after)
    assert d0.shape == (llama.vocab_size,)


def test_chained_drafts(runner, reference, ckpt, prompts):
    """Chain 2: with ``mtp_chain=l_out`` (the head's pre-final-norm output, the reference's
    convention) every draft is the reference's; with the default ``nextn`` (what upstream's
    draft-mtp feeds back: llama_get_embeddings_nextn, after final_layernorm in our port) the
    first draft of each step still is, the chained ones may differ, and greedy output never."""
    prompt = prompts["random-96"]
    ref = speculative_greedy(reference, prompt, STEPS, 2)
    l_out = _load(runner, Target.parse("llamacpp-float32:mtp_chain=l_out"), ckpt)
    same = speculative_greedy(l_out, prompt, STEPS, 2)
    assert same.trace() == ref.trace()
    for a, b in zip(replay_drafts(l_out, ref), replay_drafts(reference, ref), strict=True):
        if a.size:
            assert nmse(a, b) < NMSE_MAX
    nextn = _load(runner, LLAMA, ckpt)
    rows = replay_drafts(nextn, ref)
    ref_rows = replay_drafts(reference, ref)
    worst = max(nmse(a[1:], b[1:]) for a, b in zip(rows, ref_rows, strict=True) if len(a) > 1)
    assert all(nmse(a[:1], b[:1]) < NMSE_MAX for a, b in zip(rows, ref_rows, strict=True) if a.size)
    r = speculative_greedy(nextn, prompt, STEPS, 2)
    assert list(r.tokens) == list(ref.tokens)
    print(f"\nchained drafts, mtp_chain=nextn vs reference: NMSE max {worst:.2e}")


def test_a_worker_crash_is_a_port_failure() -> None:
    require_llamacpp()
    from harness.llamacpp.mtp import MtpWorkerClient

    with MtpWorkerClient() as client, pytest.raises(PortFailure, match=r"SIGABRT|signal"):
        client.request({"op": "_crash"}, doing="crashing on purpose")


@pytest.mark.slow
def test_the_plugin_runs_mtp_items_for_llamacpp() -> None:
    """``pytest cases --cases flash-mini --modes mtp --backends llamacpp`` runs, no skips."""
    require_llamacpp()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "cases",
            "--cases",
            "flash-mini",
            "--modes",
            "mtp",
            "--backends",
            "llamacpp",
            "--require-backends",
            "-p",
            "no:cacheprovider",
            "-q",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "1 passed" in out and "skipped" not in out, out[-4000:]  # mtp: first prompt only
