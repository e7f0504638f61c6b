"""The regression gate cannot pass a failing run (issue 13): failures count whatever the baseline
holds, lost coverage counts, a vacuous comparison is refused, and bad input is exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from harness.checks.gate import gate, load_baseline, save_baseline
from harness.cli.main import main
from harness.core.errors import InputError

STORED_BASELINE = Path(__file__).resolve().parent.parent / "baselines" / "parity.json"
REF = "torch-float64"


def _parity(candidate: str = "torch-float32", case: str = "c", passed: bool = True,
            points: tuple[str, ...] = ("attn_out-0", "l_out-0", "result_output"),
            mode: str = "prefill") -> pd.DataFrame:
    return pd.DataFrame([
        {"case": case, "prompt": "p", "candidate": candidate, "reference": REF, "mode": mode,
         "point": pt, "nmse": 1e-12 if passed else 1e-3, "passed": passed, "top1": math.nan,
         "index_agreement": math.nan, "threshold": "nmse <= 1e-08", "note": ""}
        for pt in points])


def _verdicts(*rows: tuple[str, str, str]) -> pd.DataFrame:
    """Verdict rows from (candidate, check, status) on case c, prompt p."""
    return pd.DataFrame([{"case": "c", "prompt": "p", "candidate": cand, "reference": REF,
                          "check": check, "status": status, "detail": f"{status} detail"}
                         for cand, check, status in rows])


def _mtp(backend: str, error: str = "") -> pd.DataFrame:
    return pd.DataFrame([{"case": "c", "prompt": "p", "backend": backend,
                          "acceptance_rate": 0.5, "num_draft_tokens": 10,
                          "draft_nmse_max": 1e-13, "draft_top1": 1.0, "error": error}])


def _write_run(folder: Path, tables: dict[str, pd.DataFrame]) -> Path:
    folder.mkdir(parents=True)
    for name, df in tables.items():
        df.to_parquet(folder / f"{name}.parquet")
    return folder


@pytest.fixture
def baseline_file(tmp_path: Path) -> Path:
    """A baseline of one passing torch-float32 pair with its verdict."""
    return save_baseline({"parity": _parity(),
                          "verdicts": _verdicts(("torch-float32", "prefill", "passed"))},
                         tmp_path / "baseline.json")


def _gate_cli(run: Path, baseline: Path, *extra: str) -> int:
    return main(["gate", str(run), "--baseline", str(baseline), *extra])


# Rule 1: a failing pair is a regression whether or not the baseline has it.

def test_a_failing_pair_the_baseline_lacks_is_one_regression_at_its_first_failing_point():
    base = {"parity": _parity()}
    run = {"parity": pd.concat([_parity(), _parity("mlx-float32", passed=False)])}
    found = gate(base, run)
    assert list(found["key"]) == ["c/p/mlx-float32/torch-float64/prefill/attn_out-0"]
    assert found["reason"].iloc[0].startswith("fails its tolerance at 3 point(s), first at "
                                              "attn_out-0")


def test_a_crashed_port_with_no_parity_rows_is_a_regression():
    base = {"parity": _parity()}
    run = {"parity": _parity(),
           "verdicts": _verdicts(("torch-float32", "prefill", "passed"),
                                 ("mlx-float32", "prefill", "error"))}
    found = gate(base, run)
    assert list(found["key"]) == ["c/p/mlx-float32/torch-float64/prefill"]
    assert found["reason"].iloc[0] == "the prefill check error: error detail"


def test_a_failed_check_without_parity_rows_is_a_regression():
    base = {"parity": _parity()}
    run = {"parity": _parity(), "verdicts": _verdicts(("torch-float32", "greedy", "failed"))}
    assert list(gate(base, run)["metric"]) == ["status"]


def test_a_failing_pair_and_its_failed_verdict_are_one_regression():
    run = {"parity": _parity(passed=False),
           "verdicts": _verdicts(("torch-float32", "prefill", "failed"))}
    found = gate({"parity": _parity()}, run)
    assert list(found["table"]) == ["parity"]


def test_a_known_port_failure_is_not_a_regression():
    run = {"parity": pd.concat([_parity(), _parity("llamacpp-float32", passed=False)]),
           "verdicts": _verdicts(("llamacpp-float32", "prefill", "xfailed"))}
    assert gate({"parity": _parity()}, run).empty


def test_an_mtp_row_whose_check_failed_is_a_regression_though_its_metrics_held():
    base = {"mtp": _mtp("mlx-float32")}
    run = {"mtp": _mtp("mlx-float32"), "verdicts": _verdicts(("mlx-float32", "mtp", "failed"))}
    found = gate(base, run)
    assert list(zip(found["table"], found["key"], strict=True)) == [("mtp", "c/p/mlx-float32")]
    assert found["reason"].iloc[0] == "the mtp check failed: failed detail"


def test_a_crashed_mtp_row_is_a_regression_in_a_run_without_verdicts():
    base = {"mtp": _mtp("mlx-float32")}
    found = gate(base, {"mtp": _mtp("mlx-float32", error="PortFailure: worker died")})
    assert list(found["reason"]) == ["the mtp check crashed: PortFailure: worker died"]


# Rule 2: whatever the baseline has that the run lacks is a regression, summarised.

def test_a_candidate_missing_from_the_run_is_one_row_with_its_count():
    base = {"parity": pd.concat([_parity(), _parity("llamacpp-float32"),
                                 _parity("llamacpp-float32", case="d")])}
    found = gate(base, {"parity": _parity()})
    assert list(found["reason"]) == ["candidate llamacpp-float32 missing from the run (6 points)"]


def test_a_lost_point_of_a_pair_the_run_has_is_named_by_its_key():
    found = gate({"parity": _parity()}, {"parity": _parity(points=("attn_out-0", "l_out-0"))})
    assert list(found["key"]) == ["c/p/torch-float32/torch-float64/prefill/result_output"]


def test_a_baseline_check_now_skipped_is_a_regression():
    base = {"verdicts": _verdicts(("mlx-float32", "decode", "passed"),
                                  ("torch-float32", "decode", "passed"))}
    run = {"parity": _parity(mode="decode"),
           "verdicts": _verdicts(("mlx-float32", "decode", "skipped"),
                                 ("torch-float32", "decode", "passed"))}
    found = gate(base, run)
    assert list(found["reason"]) == ["candidate mlx-float32 skipped in the run (1 checks)"]


def test_a_baseline_check_missing_from_the_run_is_a_regression():
    base = {"verdicts": _verdicts(("torch-float32", "prefill", "passed"),
                                  ("torch-float32", "decode", "passed"))}
    run = {"verdicts": _verdicts(("torch-float32", "prefill", "passed"))}
    assert list(gate(base, run)["reason"]) == ["check decode missing from the run (1 checks)"]


def test_a_check_skipped_in_the_baseline_may_stay_skipped():
    base = {"parity": _parity(), "verdicts": _verdicts(("torch-float32", "prefill", "passed"),
                                                       ("mlx-float32", "prefill", "skipped"))}
    assert gate(base, dict(base)).empty


def test_an_old_baseline_without_verdicts_gates_a_run_with_verdicts():
    run = {"parity": _parity(), "verdicts": _verdicts(("torch-float32", "prefill", "passed"))}
    assert gate({"parity": _parity()}, run).empty


# Rule 3: a gate over nothing is refused.

def test_a_run_with_only_empty_tables_compared_nothing():
    with pytest.raises(InputError, match="the run compared nothing"):
        gate({"parity": _parity()}, {"parity": _parity().iloc[:0]})


def test_a_run_whose_every_check_was_skipped_compared_nothing():
    with pytest.raises(InputError, match="the run compared nothing"):
        gate({"parity": _parity()}, {"verdicts": _verdicts(("mlx-float32", "prefill",
                                                             "skipped"))})


def test_an_empty_run_folder_is_exit_2(tmp_path, baseline_file, capsys):
    run = _write_run(tmp_path / "run", {"parity": _parity().iloc[:0]})
    assert _gate_cli(run, baseline_file) == 2
    assert "the run compared nothing" in capsys.readouterr().err


def test_an_empty_baseline_is_exit_2_naming_the_file(tmp_path, capsys):
    path = tmp_path / "empty.json"
    path.write_text('{"version": 1, "tables": {"parity": []}}')
    run = _write_run(tmp_path / "run", {"parity": _parity()})
    assert _gate_cli(run, path) == 2
    assert f"{path}: an empty baseline" in capsys.readouterr().err


# Rule 4: --update-baseline never enshrines a failing or empty run unless forced.

def test_update_baseline_refuses_a_failing_run_and_names_the_failure(tmp_path, capsys):
    run = _write_run(tmp_path / "run", {"parity": _parity(passed=False)})
    path = tmp_path / "baseline.json"
    assert _gate_cli(run, path, "--update-baseline") == 2
    err = capsys.readouterr().err
    assert "refusing to write a baseline from a failing run, 1 failure(s): " \
           "c/p/torch-float32/torch-float64/prefill/attn_out-0" in err
    assert not path.exists()


def test_update_baseline_refuses_a_crashed_port(tmp_path, baseline_file):
    before = baseline_file.read_text()
    run = _write_run(tmp_path / "run", {
        "parity": _parity(), "verdicts": _verdicts(("mlx-float32", "decode", "error"))})
    assert _gate_cli(run, baseline_file, "--update-baseline") == 2
    assert baseline_file.read_text() == before


def test_update_baseline_with_force_writes_a_failing_run(tmp_path):
    run = _write_run(tmp_path / "run", {"parity": _parity(passed=False)})
    path = tmp_path / "baseline.json"
    assert _gate_cli(run, path, "--update-baseline", "--force") == 0
    assert not load_baseline(path)["parity"]["passed"].any()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_update_baseline_refuses_an_empty_run_even_forced(tmp_path):
    run = _write_run(tmp_path / "run", {"parity": _parity().iloc[:0]})
    path = tmp_path / "baseline.json"
    assert _gate_cli(run, path, "--update-baseline", "--force") == 2
    assert not path.exists()


# Rule 5: a malformed baseline or run table is exit 2 naming the key, never a traceback.

MALFORMED = {
    "tables-a-list": ('{"version": 1, "tables": []}', '"tables" must be an object'),
    "table-an-object": ('{"version": 1, "tables": {"parity": {}}}',
                        "tables.parity must be a list of row objects"),
    "row-not-an-object": ('{"version": 1, "tables": {"parity": [1]}}',
                          "tables.parity[0] is not an object"),
    "key-column-missing": ('{"version": 1, "tables": {"parity": [{"case": "c", "prompt": "p", '
                           '"candidate": "x", "reference": "y", "mode": "prefill", '
                           '"passed": true}]}}', "tables.parity: no column(s) ['point']"),
    "wrong-version": ('{"version": 2, "tables": {}}', '"version" is 2'),
    "invalid-json": ('{"version": 1, "tables": {', "not valid JSON"),
    "not-utf8": (b"\xff\xfe{}", "cannot be read"),
    "nmse-not-a-number": ('{"version": 1, "tables": {"parity": [{"case": "c", "prompt": "p", '
                          '"candidate": "x", "reference": "y", "mode": "prefill", "point": "a",'
                          ' "passed": true, "nmse": "small"}]}}', "column 'nmse' must hold"),
}


@pytest.mark.parametrize("content, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_baseline_is_exit_2_naming_the_key(tmp_path, capsys, content, message):
    path = tmp_path / "baseline.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    run = _write_run(tmp_path / "run", {"parity": _parity()})
    assert _gate_cli(run, path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and message in err


def test_a_baseline_path_that_is_a_folder_is_exit_2(tmp_path, capsys):
    run = _write_run(tmp_path / "run", {"parity": _parity()})
    assert _gate_cli(run, tmp_path) == 2
    assert f"{tmp_path}: is a folder, not a baseline file" in capsys.readouterr().err


def test_a_run_table_without_a_key_column_is_exit_2_naming_the_file(tmp_path, baseline_file,
                                                                     capsys):
    run = _write_run(tmp_path / "run", {"parity": _parity().drop(columns="point")})
    assert _gate_cli(run, baseline_file) == 2
    assert f"{run / 'parity.parquet'}: no column(s) ['point']" in capsys.readouterr().err


def test_a_verdict_with_an_unknown_status_is_exit_2(tmp_path, baseline_file, capsys):
    run = _write_run(tmp_path / "run", {
        "parity": _parity(), "verdicts": _verdicts(("torch-float32", "prefill", "ok"))})
    assert _gate_cli(run, baseline_file) == 2
    assert "unknown status(es) ['ok']" in capsys.readouterr().err


# Rule 6: exit codes, and the stored baseline against itself.

def test_gate_exit_code_is_1_for_a_failing_pair_outside_the_baseline(tmp_path, baseline_file,
                                                                     capsys):
    run = _write_run(tmp_path / "run", {
        "parity": pd.concat([_parity(), _parity("mlx-float32", passed=False)]),
        "verdicts": _verdicts(("torch-float32", "prefill", "passed"),
                              ("mlx-float32", "prefill", "failed"))})
    assert _gate_cli(run, baseline_file) == 1
    assert "gate: FAIL (1 regression(s)" in capsys.readouterr().out


def test_the_stored_baseline_loads_with_its_tables():
    tables = load_baseline(STORED_BASELINE)
    assert {"parity", "mtp"} <= set(tables) and all(not df.empty for df in tables.values())


def test_a_run_made_of_the_stored_baselines_own_tables_passes(tmp_path, capsys):
    run = _write_run(tmp_path / "run", load_baseline(STORED_BASELINE))
    assert _gate_cli(run, STORED_BASELINE) == 0
    assert "gate: PASS" in capsys.readouterr().out


def test_a_baseline_written_from_a_run_with_verdicts_keeps_their_status(tmp_path):
    tables = {"parity": _parity(), "verdicts": _verdicts(("torch-float32", "prefill", "passed"),
                                                         ("mlx-float32", "prefill", "skipped"))}
    path = save_baseline(tables, tmp_path / "b.json")
    rows = json.loads(path.read_text())["tables"]["verdicts"]
    assert [r["status"] for r in rows] == ["passed", "skipped"] and "detail" not in rows[0]
