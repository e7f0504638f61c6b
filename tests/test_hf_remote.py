"""``hf_remote``: a checkpoint's own modeling code (``auto_map``) as a candidate, run through
transformers' ``trust_remote_code`` in a child process and captured by forward hooks.  Tested on
the project's own remote-code model (tests/remote_code), with each slope convention and a
mutation, against the float64 reference on the matching convention; and ``--slope auto`` reads
the convention off it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.backends.base import BackendOptions
from harness.backends.hf_remote import HfRemoteBackend, remote_code_of
from harness.backends.targets import Target
from harness.checks.cases import DEFAULT_TOLERANCES
from harness.checks.session import CheckSession
from harness.checks.slope_convention import chosen, detect
from harness.core import capture_points
from harness.core.errors import ArchitectureNotSupported, InputError
from tests.hf_remote_checkpoint import MODELING, write_remote_checkpoint
from tests.tiny_checkpoint import write_tiny_checkpoint

TOKENS = [1, 17, 42, 99, 256, 3, 511, 7, 7, 7, 128, 64, 300, 12, 0, 45]
CANDIDATE = Target.parse("hf_remote")
CORRECTED_REF = Target.parse("torch-float64")
HF_REF = chosen("hf_off_by_one", "--slope").target(CORRECTED_REF)
FLOAT32 = DEFAULT_TOLERANCES["float32"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("remote")
    return {v: write_remote_checkpoint(root / v, variant=v)
            for v in ("corrected", "hf_off_by_one", "expert_bias_dropped")}


@pytest.fixture(scope="module")
def runner():
    r = CheckSession()
    yield r
    for model in r.models.values():
        getattr(model, "close", lambda: None)()


def compare(runner: CheckSession, checkpoint: Path, reference: Target, mode: str = "prefill"):
    return runner.compare(case="remote", prompt="short", checkpoint=checkpoint, tokens=TOKENS,
                          candidate=CANDIDATE, reference=reference, tolerance=FLOAT32, mode=mode,
                          n_decode=4)


def dense_nmse(result) -> dict[str, float]:
    t = result.table
    return {p: float(x) for p, x, k in zip(t["point"], t["nmse"], t["kind"], strict=True)
            if k != "index"}


def test_own_code_with_the_corrected_slope_matches_the_reference_at_every_point(ckpts, runner):
    result = compare(runner, ckpts["corrected"], CORRECTED_REF)
    assert result.passed and result.first_divergence is None
    points = set(result.table["point"])
    trunk = set(capture_points.all_points(8)) - {f"{p}-{i}" for i in (3, 7)
                                                  for p in ("gla_out", "g_gate")}
    trunk -= {f"kv_cmpr-{i}" for i in range(8) if i not in (3, 7)}
    trunk -= {f"ffn_{p}-0" for p in ("moe_logits", "moe_topk", "moe_weights", "shexp")}
    assert points == trunk  # every trunk point of flash-mini, hooked and compared
    assert max(dense_nmse(result).values()) <= 1e-8


def test_own_code_with_the_off_by_one_slope_matches_the_off_by_one_reference(ckpts, runner):
    result = compare(runner, ckpts["hf_off_by_one"], HF_REF)
    assert result.passed and max(dense_nmse(result).values()) <= 1e-8


def test_own_code_with_the_off_by_one_slope_fails_the_corrected_reference_at_gla_out_0(
        ckpts, runner):
    result = compare(runner, ckpts["hf_off_by_one"], CORRECTED_REF)
    assert not result.passed and result.first_divergence == "gla_out-0"


def test_decode_through_a_session_matches_the_reference(ckpts, runner):
    result = compare(runner, ckpts["corrected"], CORRECTED_REF, mode="decode")
    assert result.passed and max(dense_nmse(result).values()) <= 1e-8


def test_a_dropped_expert_bias_fails_at_the_first_moe_layers_expert_ids(ckpts, runner):
    result = compare(runner, ckpts["expert_bias_dropped"], CORRECTED_REF)
    assert not result.passed and result.first_divergence == "ffn_moe_topk-1"
    assert dense_nmse(result)["ffn_moe_logits-1"] <= 1e-8  # the logits before it still agree


def test_the_run_says_what_ran_and_on_which_transformers(ckpts, runner):
    model = runner.model(CANDIDATE, ckpts["corrected"])
    from importlib.metadata import version

    have = version("transformers")
    assert model.findings == [
        "hf_remote: the checkpoint names no transformers_version; its code runs on the main "
        f"environment's transformers {have}",
        f"hf_remote: corrected/{MODELING} (Ling26RemoteForCausalLM) ran with transformers "
        f"{have} in float32; 78 modules hooked for captures"]


def test_slope_auto_reads_the_convention_off_the_checkpoints_own_code(ckpts):
    convention = detect(ckpts["hf_off_by_one"], probe_length=32)
    assert (convention.slope, convention.source) == ("hf_off_by_one", "auto (hf-remote)")
    assert convention.note == (
        "GLA slope convention: hf_off_by_one, detected by running the slopes diagnostic on the "
        f"checkpoint's own modeling code ({MODELING}) through hf-remote")


def test_a_checkpoint_without_its_own_code_is_no_hf_remote_candidate(tmp_path):
    write_tiny_checkpoint(tmp_path)
    assert remote_code_of(tmp_path) is None
    with pytest.raises(ArchitectureNotSupported, match="ships no modeling code of its own"):
        HfRemoteBackend().load(tmp_path, BackendOptions())


def test_an_auto_map_naming_a_missing_file_is_refused(tmp_path):
    write_tiny_checkpoint(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["auto_map"] = {"AutoModelForCausalLM": "modeling_gone.GoneForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InputError) as e:
        remote_code_of(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'config.json'}: auto_map names "
                            f"'modeling_gone.GoneForCausalLM' but modeling_gone.py is not in "
                            f"{tmp_path}")


def test_a_step_outside_the_runs_dtype_is_reported(tmp_path):
    ckpt = write_remote_checkpoint(tmp_path / "f32", variant="router_in_float32")
    model = HfRemoteBackend().load(ckpt, BackendOptions(dtype="float64"))
    try:
        model.start().feed(TOKENS[:4])
        assert model.findings[-1] == (
            f"hf_remote: steps inside {MODELING} that do not run in float64: Gate -> float32")
    finally:
        model.close()


@pytest.mark.slow  # fitting decays that match neither formula: 7-48 s measured
def test_slope_auto_refuses_code_that_applies_neither_convention(tmp_path):
    ckpt = write_remote_checkpoint(tmp_path / "half", variant="half_slope")
    with pytest.raises(InputError, match="applies neither convention"):
        detect(ckpt, probe_length=16)
