"""The GLA slope convention is a property of the checkpoint (issue 15): chosen by a case's
``slope`` field or ``--slope``, defaulted to ``corrected`` with a visible note, recorded in the
run; the reference computes with it, and the slopes check passes a port applying it and fails
one applying the other, naming both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.backends.targets import Target, get_backend
from harness.checks.cases import CASES_DIR, load_case
from harness.checks.slope_convention import DEFAULT_NOTE, case_convention, chosen, resolve
from harness.checks.slope_diagnostics import diagnose, reference_pair
from harness.cli.main import main
from harness.core.errors import InputError
from tests.tiny_checkpoint import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HF_CASE = "flash-mini-hf-slope"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_a_case_without_a_slope_field_defaults_to_corrected_with_a_note():
    convention = case_convention(load_case(CASES_DIR / "flash-mini.toml"))
    assert (convention.slope, convention.source, convention.note) == (
        "corrected", "default", DEFAULT_NOTE)
    assert "the authors' original remote code applies hf_off_by_one" in DEFAULT_NOTE


def test_the_hf_slope_case_is_flash_mini_published_with_the_off_by_one_decay():
    hf, mini = load_case(CASES_DIR / f"{HF_CASE}.toml"), load_case(CASES_DIR / "flash-mini.toml")
    assert hf.slope == "hf_off_by_one" and mini.slope is None
    assert {k: v for k, v in hf.config.items() if k != "num_nextn_predict_layers"} == {
        k: v for k, v in mini.config.items() if k != "num_nextn_predict_layers"}
    assert case_convention(hf).note == (
        f"GLA slope convention: hf_off_by_one (from case {HF_CASE})")


@pytest.mark.parametrize(("text", "message"), [
    ('slope = "auto"', "slope 'auto'; expected one of corrected, hf_off_by_one"),
    ('slope = "sideways"', "slope 'sideways'; expected one of corrected, hf_off_by_one"),
])
def test_a_case_slope_that_is_not_a_convention_is_refused(tmp_path, text, message):
    source = (CASES_DIR / "flash-mini.toml").read_text()
    path = tmp_path / "bad.toml"
    path.write_text(source.replace("decode_steps = 16", f"decode_steps = 16\n{text}"))
    with pytest.raises(InputError) as e:
        load_case(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_a_ling3_case_has_no_slope_to_declare(tmp_path):
    source = (CASES_DIR / "ling3-plain.toml").read_text()
    path = tmp_path / "l3.toml"
    path.write_text('slope = "corrected"\n' + source)
    with pytest.raises(InputError, match=r"only Ling-2\.6 cases have a GLA slope convention"):
        load_case(path)


def test_only_our_torch_reference_is_told_the_convention():
    hf = chosen("hf_off_by_one", "--slope")
    assert hf.target(Target.parse("torch-float64")).label == (
        "torch-float64,slope_formula=hf_off_by_one")
    assert hf.target(Target.parse("torch")).label == "torch-float32,slope_formula=hf_off_by_one"
    for spec in ("mlx", "llamacpp", "hf_remote", "torch:slope_formula=corrected",
                 "torch:variant=slope_off_by_one"):
        assert hf.target(Target.parse(spec)) == Target.parse(spec)  # under test as they are
    assert chosen(None, "default").target(Target.parse("torch")) == Target.parse("torch")


def test_the_slopes_check_compares_with_the_checkpoints_convention(tiny):
    convention = chosen("hf_off_by_one", "--slope")
    refs = reference_pair(tiny)
    applied = {}
    for spec in ("torch", "torch:slope_formula=corrected"):
        target = convention.target(Target.parse(spec))
        port = get_backend("torch").load(tiny, target.options())
        applied[spec] = diagnose(spec, port, refs, probe_length=16, expected=convention.slope)
    assert applied["torch"].verdict == "hf_off_by_one"  # matches: the check passes
    wrong = applied["torch:slope_formula=corrected"]
    assert wrong.verdict == "corrected"
    assert convention.mismatch("torch-float32 on x", wrong.verdict) == (
        "torch-float32 on x: the port applies 'corrected'; this checkpoint expects "
        "'hf_off_by_one' (its GLA decay differs from the convention from --slope)")


@pytest.mark.slow
def test_the_suite_checks_the_hf_case_against_its_convention_and_records_it(tmp_path):
    reports = tmp_path / "reports"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "cases", "--cases", HF_CASE, "--backends",
         "torch,torch:slope_formula=corrected", "--modes", "prefill,slopes", "--report-dir",
         str(reports), "-q", "-p", "no:cacheprovider", "-rA"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    right = "torch-float32,slope_formula=hf_off_by_one-vs-torch-float64,slope_formula=hf_off_by_one"
    wrong = "torch-float32,slope_formula=corrected-vs-torch-float64,slope_formula=hf_off_by_one"
    assert f"PASSED cases/{HF_CASE}.toml::short::{right}::prefill" in out
    assert f"PASSED cases/{HF_CASE}.toml::short::{right}::slopes" in out
    assert f"FAILED cases/{HF_CASE}.toml::short::{wrong}::prefill" in out
    assert "first divergence at gla_out-0" in out
    assert (f"torch-float32,slope_formula=corrected on {HF_CASE}: the port applies 'corrected'; "
            "this checkpoint expects 'hf_off_by_one'") in out
    assert proc.returncode == 1
    (run,) = list(reports.iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert f"GLA slope convention: hf_off_by_one (from case {HF_CASE})" in summary["findings"]


def parity(tiny: Path, out: Path, *args: str) -> tuple[int, dict]:
    code = main(["parity", "--checkpoint", str(tiny), "--out", str(out), *args])
    return code, json.loads((out / "summary.json").read_text())


def test_parity_without_slope_uses_corrected_and_says_so(tiny, tmp_path):
    code, summary = parity(tiny, tmp_path / "run", "--backends", "torch")
    assert code == 0
    assert summary["slope_convention"] == {"slope": "corrected", "source": "default",
                                           "note": DEFAULT_NOTE}
    assert DEFAULT_NOTE in summary["findings"]
    assert list(summary["pairs"]) == ["torch-float32 vs torch-float64"]


def test_parity_with_slope_computes_the_reference_with_it(tiny, tmp_path):
    code, summary = parity(tiny, tmp_path / "run", "--backends",
                           "torch,torch:slope_formula=corrected", "--slope", "hf_off_by_one")
    assert code == 1
    assert summary["slope_convention"]["slope"] == "hf_off_by_one"
    ref = "torch-float64,slope_formula=hf_off_by_one"
    ok = summary["pairs"][f"torch-float32,slope_formula=hf_off_by_one vs {ref}"]
    wrong = summary["pairs"][f"torch-float32,slope_formula=corrected vs {ref}"]
    assert ok["passed"] is True and ok["first_divergence"] is None
    assert wrong["passed"] is False and wrong["first_divergence"] == "gla_out-0"


def test_slope_auto_needs_the_checkpoints_own_code(tiny, tmp_path, capsys):
    code = main(["parity", "--checkpoint", str(tiny), "--out", str(tmp_path / "r"),
                 "--backends", "torch", "--slope", "auto"])
    assert code == 2
    assert "--slope auto needs the checkpoint's own modeling code" in capsys.readouterr().err
    with pytest.raises(InputError, match="needs the checkpoint's own modeling code"):
        resolve("auto", tiny)


def test_slopes_command_passes_the_expected_convention_and_fails_the_other(tiny, tmp_path,
                                                                           capsys):
    common = ["slopes", "--checkpoint", str(tiny), "--probe-length", "16", "--lengths", "16",
              "--backends", "torch:slope_formula=hf_off_by_one"]
    assert main([*common, "--slope", "hf_off_by_one", "--out", str(tmp_path / "a")]) == 0
    saved = json.loads((tmp_path / "a" / "slopes.json").read_text())
    assert saved["slope_convention"]["slope"] == "hf_off_by_one"
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "b")]) == 1
    assert ("torch-float32,slope_formula=hf_off_by_one: the port applies 'hf_off_by_one'; this "
            "checkpoint expects 'corrected' (its GLA decay differs from the convention from "
            "default)") in capsys.readouterr().out


def test_a_known_failure_may_name_one_check_of_a_backend():
    case = load_case(CASES_DIR / f"{HF_CASE}.toml")
    assert case.known_failure("mlx", "greedy") == (
        "mlx-lm applies the corrected GLA decay; this checkpoint expects hf_off_by_one")
    assert case.known_failure("torch", "prefill") is None
    from dataclasses import replace

    one = replace(case, known_failures={"mlx:slopes": "why"})
    assert one.known_failure("mlx", "slopes") == "why"
    assert one.known_failure("mlx", "prefill") is None
