"""Golden runs serve the ``mtp`` check: ``capture`` records the reference's side of it (its
speculative run, draft logits, plain greedy tokens and teacher-forced mtp_* captures), and
``parity --golden --modes mtp`` gives the direct run's verdicts and mtp.parquet rows without
loading the reference; a wrong variant fails against a golden run at the same first point as
against the live reference (prefill, decode and an MTP wiring mutation)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import harness.cli.main as cli_main
from harness.backends.mlx_backend import MlxBackend
from harness.checks.cases import CASES_DIR, load_case, materialize
from harness.checks.golden import MANIFEST, open_golden
from harness.checks.mtp_decoding import DraftStep, SpecResult, shared_draft_rows
from harness.checks.session import MTP_STEPS, CheckSession
from harness.cli.main import main

REFERENCE = "torch-float64"
MLX = MlxBackend().availability()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """mtp-agree's checkpoint and its first prompt (where the mtp check runs) as a file."""
    case = load_case(CASES_DIR / "mtp-agree.toml")
    root = tmp_path_factory.mktemp("mtp-golden")
    prompt = root / "prompt.json"
    prompt.write_text(json.dumps({"tokens": list(case.prompts[0].tokens)}))
    return materialize(case), prompt


@pytest.fixture(scope="module")
def golden(setup, tmp_path_factory) -> Path:
    checkpoint, prompt = setup
    out = tmp_path_factory.mktemp("golden") / "run"
    assert main(["capture", "--checkpoint", str(checkpoint), "--prompt-tokens", str(prompt),
                 "--out", str(out)]) == 0
    return out


@pytest.fixture
def sessions(monkeypatch) -> list[CheckSession]:
    """Every CheckSession ``parity`` creates (its ``loaded`` list names each loaded target)."""
    made: list[CheckSession] = []

    def recording() -> CheckSession:
        made.append(CheckSession())
        return made[-1]

    monkeypatch.setattr(cli_main, "CheckSession", recording)
    return made


def parity(checkpoint: Path, out: Path, backends: str, modes: str, *source: str) -> int:
    return main(["parity", "--checkpoint", str(checkpoint), "--backends", backends,
                 "--modes", modes, "--out", str(out), *source])


def tables(out: Path) -> tuple[dict, pd.DataFrame]:
    summary = json.loads((out / "summary.json").read_text())
    mtp = out / "mtp.parquet"
    return summary, pd.read_parquet(mtp) if mtp.is_file() else pd.DataFrame()


def test_capture_records_what_the_mtp_check_takes_from_the_reference(golden, setup):
    manifest = json.loads((golden / MANIFEST).read_text())
    mtp = manifest["mtp"]
    assert (mtp["steps"], mtp["chain"], mtp["label"]) == (MTP_STEPS, 1, REFERENCE)
    assert mtp["prompt"] == manifest["tokens"] and len(mtp["tokens"]) == MTP_STEPS
    assert mtp["plain"] == mtp["tokens"]  # speculation kept the reference's greedy output
    drafted = [t for t in mtp["trace"] if t["drafts"]]
    assert drafted and all(t["draft_logits"] for t in drafted)
    assert {p for p in mtp["captures"] if p.startswith("mtp_")} >= {"mtp_enorm", "mtp_hnorm",
                                                                     "mtp_eh_proj"}
    recorded = open_golden(golden).mtp()
    assert recorded.spec.num_drafts == len(drafted)
    assert recorded.spec.steps[0].draft_logits.shape == (1, 512)
    assert recorded.captures is not None and "mtp_result_output" in recorded.captures


@pytest.mark.skipif(not MLX.ok, reason=MLX.reason)
def test_the_mtp_check_against_a_golden_run_gives_the_direct_runs_rows_without_the_reference(
        setup, golden, tmp_path, sessions):
    checkpoint, prompt = setup
    assert parity(checkpoint, tmp_path / "direct", "mlx", "mtp", "--prompt-tokens",
                  str(prompt)) == 0
    assert parity(checkpoint, tmp_path / "golden", "mlx", "mtp", "--golden", str(golden)) == 0
    direct, via = sessions
    assert REFERENCE in direct.loaded  # the spy sees a loaded reference...
    assert via.loaded == ["mlx-float32"]  # ...and none here: the candidate alone
    (d_summary, d_rows), (g_summary, g_rows) = tables(tmp_path / "direct"), tables(
        tmp_path / "golden")
    assert g_summary["checks"] == d_summary["checks"]
    assert [c["status"] for c in g_summary["checks"]] == ["passed"]
    pd.testing.assert_frame_equal(g_rows, d_rows)  # nothing in them names the source
    rows = g_rows.set_index("backend")
    assert sorted(rows.index) == ["mlx-float32", REFERENCE]
    assert rows["drafts_match_reference"].all()
    assert rows.loc["mlx-float32", "mtp_first_divergence"] == "none"


@pytest.mark.skipif(not MLX.ok, reason=MLX.reason)
def test_a_correct_port_fails_against_a_golden_mtp_record_with_one_draft_changed(
        setup, golden, tmp_path):
    """The verdict really rests on the recorded run: one wrong draft in it fails mlx."""
    checkpoint, _ = setup
    altered = tmp_path / "altered"
    shutil.copytree(golden, altered)
    manifest = json.loads((altered / MANIFEST).read_text())
    step = next(t for t in manifest["mtp"]["trace"] if t["drafts"])
    step["drafts"][0] = (step["drafts"][0] + 1) % 512
    (altered / MANIFEST).write_text(json.dumps(manifest))
    assert parity(checkpoint, tmp_path / "out", "mlx", "mtp", "--golden", str(altered)) == 1
    _, rows = tables(tmp_path / "out")
    assert not rows.set_index("backend").loc["mlx-float32", "drafts_match_reference"]


@pytest.mark.parametrize(
    ("variant", "modes", "first_point"),
    [("slope_off_by_one", "prefill,decode", "gla_out-0"),
     ("mtp_wrong_token", "mtp", "mtp_enorm")],
    ids=["slope-prefill-decode", "mtp-wiring"],
)
def test_a_wrong_variant_fails_against_a_golden_run_where_it_fails_against_the_reference(
        setup, golden, tmp_path, sessions, variant, modes, first_point):
    checkpoint, prompt = setup
    wrong = f"{REFERENCE}:variant={variant}"
    assert parity(checkpoint, tmp_path / "direct", wrong, modes, "--prompt-tokens",
                  str(prompt)) == 1
    assert parity(checkpoint, tmp_path / "golden", wrong, modes, "--golden", str(golden)) == 1
    assert REFERENCE not in sessions[1].loaded
    (d_summary, d_rows), (g_summary, g_rows) = tables(tmp_path / "direct"), tables(
        tmp_path / "golden")
    assert [c["status"] for c in g_summary["checks"]] == ["failed"] * len(modes.split(","))
    assert [c["status"] for c in d_summary["checks"]] == ["failed"] * len(modes.split(","))
    if modes == "mtp":
        points = [r.set_index("backend").loc[wrong.replace(":", ","), "mtp_first_divergence"]
                  for r in (d_rows, g_rows)]
        assert points == [first_point, first_point]
        same = ["num_drafts", "num_accepted_tokens", "accepted_per_pos", "draft_top1",
                "drafts_match_reference", "greedy_unchanged"]
        pd.testing.assert_frame_equal(g_rows[same], d_rows[same])
    else:
        firsts = [{k: p["first_divergence"] for k, p in s["pairs"].items()}
                  for s in (d_summary, g_summary)]
        assert firsts[0] == firsts[1]
        assert set(firsts[1].values()) == {first_point} and len(firsts[1]) == 2


def test_a_golden_run_without_mtp_captures_asked_for_mtp_is_refused_naming_what_is_missing(
        setup, tmp_path, capsys, sessions):
    checkpoint, prompt = setup
    plain = tmp_path / "plain"
    assert main(["capture", "--checkpoint", str(checkpoint), "--prompt-tokens", str(prompt),
                 "--modes", "prefill,decode", "--out", str(plain)]) == 0
    assert "mtp" not in json.loads((plain / MANIFEST).read_text())
    capsys.readouterr()
    assert parity(checkpoint, tmp_path / "out", "mlx", "prefill,mtp", "--golden",
                  str(plain)) == 2
    err = capsys.readouterr().err
    assert f"{plain / MANIFEST}: holds no MTP captures" in err and "--modes mtp" in err
    assert sessions == [] and not (tmp_path / "out").exists()  # refused before any session
    # the same golden run still serves prefill and decode
    assert parity(checkpoint, tmp_path / "ok", "mlx", "prefill,decode", "--golden",
                  str(plain)) == 0


@pytest.mark.parametrize(
    ("modes", "said"),
    [("greedy", "--modes greedy: these checks run the reference itself"),
     ("mtp", "has no MTP layer")],
    ids=["greedy", "mtp-without-an-mtp-layer"],
)
def test_capture_refuses_modes_it_cannot_serve(tmp_path, capsys, modes, said):
    name = "mtp-agree" if modes == "greedy" else "flash-mini-hf-slope"  # the latter: no MTP
    case = load_case(CASES_DIR / f"{name}.toml")
    code = main(["capture", "--checkpoint", str(materialize(case)), "--modes", modes,
                 "--out", str(tmp_path / "g")])
    assert code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def _spec(*steps: tuple[int, tuple[int, ...], int]) -> SpecResult:
    """A run whose draft row i of step s holds the value 10*s + i (to tell rows apart)."""
    out = []
    for s, (next_token, drafts, accepted) in enumerate(steps):
        rows = np.array([[10.0 * s + i] * 4 for i in range(len(drafts))]).reshape(-1, 4)
        out.append(DraftStep(s, next_token, drafts, accepted, rows))
    return SpecResult((1, 2), tuple(t for t, _, _ in steps), tuple(out), 2)


def test_shared_draft_rows_stop_at_the_first_draft_in_another_context():
    ref = _spec((5, (6, 7), 2), (8, (9, 9), 0), (3, (1,), 0))
    same = shared_draft_rows(ref, ref)
    assert [len(r) for r in same] == [2, 2, 1]
    # step 1's first draft differs: its row is compared (same context), the chained one is not
    # (it followed another draft), and nothing after (the runs committed different tokens)
    other = _spec((5, (6, 7), 2), (8, (4, 9), 0), (3, (1,), 0))
    rows = shared_draft_rows(other, ref)
    assert [len(r) for r in rows] == [2, 1, 0]
    assert rows[1][0, 0] == 10.0  # the reference's own row, not the run's
    # a different next token: no shared context from that step on
    assert [len(r) for r in shared_draft_rows(_spec((5, (6, 7), 2), (2, (9, 9), 0)), ref)] == [
        2, 0]
