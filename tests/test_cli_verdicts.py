"""``python -m harness parity``: exit code, ``summary.json`` and report say the same thing.

Every scenario here checks the property ``summary["passed"] == (exit code == 0)``; ports that
crash, exit or return garbage are port failures (exit 1), never a pass; bad options are input
errors (exit 2) found before any compute, and a run killed while writing its report leaves no
folder that looks finished.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli.inputs import HARD_PROMPT_CAP
from harness.cli.main import main
from harness.report import run_folder as reporting
from tests.upstream_writer import write_upstream_checkpoint

MLX_MODULE = Path(__import__("mlx_lm").__file__).parent / "models" / "bailing_hybrid.py"
LOGITS_RETURN = "        return self.lm_head(out)\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_upstream_checkpoint(tmp_path_factory.mktemp("upstream") / "ling26")


def parity(*args: str) -> int:
    return main(["parity", *args])


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def assert_one_verdict(code: int, out: Path) -> dict:
    """The property: the summary's ``passed`` is exactly ``exit code == 0``; the report's
    headline says the same."""
    summary = summary_of(out)
    assert summary["passed"] == (code == 0)
    assert summary["exit_code"] == code
    headline = summary["verdict"]
    assert headline.startswith("PASS" if code == 0 else "FAIL")
    assert headline in (out / "index.html").read_text()
    return summary


def mlx_port(tmp_path: Path, old: str, new: str) -> Path:
    source = MLX_MODULE.read_text()
    assert old in source
    port = tmp_path / "my_port.py"
    port.write_text(source.replace(old, new, 1))
    return port


def test_a_correct_run_passes_everywhere(checkpoint, tmp_path):
    out = tmp_path / "run"
    code = parity("--checkpoint", str(checkpoint), "--backends", "mlx", "--out", str(out))
    assert code == 0
    summary = assert_one_verdict(code, out)
    assert [c["status"] for c in summary["checks"]] == ["passed"]
    assert (out / "verdicts.parquet").is_file()


def test_a_wrong_port_fails_everywhere(checkpoint, tmp_path):
    port = mlx_port(tmp_path, "self.layer_idx / denom", "(self.layer_idx - 1) / denom")
    out = tmp_path / "run"
    code = parity("--checkpoint", str(checkpoint), "--backends", "mlx",
                  "--mlx-model-module", str(port), "--out", str(out))
    assert code == 1
    assert assert_one_verdict(code, out)["checks"][0]["status"] == "failed"


@pytest.mark.parametrize(
    ("garbage", "said"),
    [
        ("        return None\n", "the MLX model returned NoneType"),
        ("        return mx.array(0.0)\n", "returned array of shape ()"),
        ("        raise RuntimeError('kernel exploded')\n", "RuntimeError: kernel exploded"),
    ],
    ids=["returns-None", "returns-a-scalar", "raises"],
)
def test_a_port_returning_garbage_or_crashing_is_a_port_failure(checkpoint, tmp_path, garbage,
                                                                said):
    port = mlx_port(tmp_path, LOGITS_RETURN, garbage)
    out = tmp_path / "run"
    code = parity("--checkpoint", str(checkpoint), "--backends", "mlx",
                  "--mlx-model-module", str(port), "--out", str(out))
    assert code == 1
    summary = assert_one_verdict(code, out)
    (only,) = summary["checks"]
    assert only["status"] == "error" and said in only["detail"]
    assert summary["pairs"] == {}


def test_a_port_calling_sys_exit_0_is_a_port_failure_not_a_silent_pass(checkpoint, tmp_path):
    port = tmp_path / "exits.py"
    port.write_text("import sys\nsys.exit(0)\n")
    out = tmp_path / "run"
    code = parity("--checkpoint", str(checkpoint), "--backends", "mlx",
                  "--mlx-model-module", str(port), "--out", str(out))
    assert code == 1
    summary = assert_one_verdict(code, out)
    assert "called sys.exit(0)" in summary["checks"][0]["detail"]


def test_a_port_that_cannot_run_here_compared_nothing_and_fails(checkpoint, tmp_path,
                                                              monkeypatch):
    from harness.checks.runner import Runner

    real = Runner.availability
    monkeypatch.setattr(Runner, "availability", lambda self, t: (False, "no mlx here")
                        if t.backend == "mlx" else real(self, t))
    out = tmp_path / "run"
    code = parity("--checkpoint", str(checkpoint), "--backends", "mlx", "--out", str(out))
    assert code == 1
    summary = assert_one_verdict(code, out)
    assert "nothing was compared" in summary["verdict"]


def input_error(capsys, *args: str) -> str:
    assert parity(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("modes", [",", " , ", ""])
def test_no_mode_at_all_is_bad_input(checkpoint, tmp_path, capsys, modes):
    out = tmp_path / "run"
    err = input_error(capsys, "--checkpoint", str(checkpoint), "--modes", modes,
                      "--out", str(out))
    assert "--modes: no mode given" in err
    assert not out.exists()


@pytest.mark.parametrize("steps", ["-3", "0"])
def test_decode_steps_below_one_are_bad_input(checkpoint, capsys, steps):
    err = input_error(capsys, "--checkpoint", str(checkpoint), "--decode-steps", steps)
    assert f"--decode-steps must be >= 1, got {steps}" in err


def test_decode_steps_must_leave_a_prefill(checkpoint, capsys):
    err = input_error(capsys, "--checkpoint", str(checkpoint), "--modes", "decode",
                      "--decode-steps", "64")
    assert "fewer than the prompt's 64 tokens" in err


def tokens_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps({"tokens": [i % 7 for i in range(n)]}))
    return path


def test_a_prompt_beyond_max_position_embeddings_is_refused_unless_lifted(checkpoint, tmp_path,
                                                                         capsys):
    limit = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
    prompt = tokens_file(tmp_path, limit + 1)
    err = input_error(capsys, "--checkpoint", str(checkpoint), "--prompt-tokens", str(prompt))
    assert f"max_position_embeddings = {limit}" in err and "--beyond-max-positions" in err


def test_a_prompt_beyond_the_hard_cap_is_refused_even_when_lifted(checkpoint, tmp_path, capsys):
    prompt = tokens_file(tmp_path, HARD_PROMPT_CAP + 1)
    err = input_error(capsys, "--checkpoint", str(checkpoint), "--prompt-tokens", str(prompt),
                      "--beyond-max-positions")
    assert f"hard cap of {HARD_PROMPT_CAP} tokens" in err


def test_out_pointing_at_a_file_is_refused_before_compute(checkpoint, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setattr("harness.checks.runner.Runner.model", _no_compute)
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    err = input_error(capsys, "--checkpoint", str(checkpoint), "--out", str(target))
    assert "is an existing file" in err and target.read_text() == "mine"


def test_out_under_a_file_is_refused_before_compute(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("harness.checks.runner.Runner.model", _no_compute)
    (tmp_path / "notes.txt").write_text("mine")
    err = input_error(capsys, "--checkpoint", str(checkpoint),
                      "--out", str(tmp_path / "notes.txt" / "run"))
    assert "which is a file" in err


def _no_compute(*_a, **_k):
    raise AssertionError("a model was loaded before --out was validated")


def test_a_run_killed_while_writing_its_report_leaves_no_finished_looking_folder(
    checkpoint, tmp_path, monkeypatch
):
    out = tmp_path / "run"

    def killed(*_a, **_k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(reporting, "write_report", killed)
        with pytest.raises(KeyboardInterrupt):
            parity("--checkpoint", str(checkpoint), "--backends", "mlx", "--out", str(out))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary sibling left either
    code = parity("--checkpoint", str(checkpoint), "--backends", "mlx", "--out", str(out))
    assert code == 0 and assert_one_verdict(code, out)["passed"]


def test_a_reference_that_cannot_run_is_exit_2_naming_it_not_a_traceback(checkpoint, tmp_path,
                                                                        capsys, monkeypatch):
    from references.model import BailingHybridReference

    def broken(self, *_a, **_k):
        raise RuntimeError("reference exploded")

    monkeypatch.setattr(BailingHybridReference, "start", broken)
    out = tmp_path / "run"
    err = input_error(capsys, "--checkpoint", str(checkpoint), "--backends", "mlx",
                      "--out", str(out))
    assert "the reference could not run" in err and "reference exploded" in err
    assert not out.exists()
