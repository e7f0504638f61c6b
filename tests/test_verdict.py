"""The run verdict: one object decides ``passed`` and the exit code; nothing compared is a fail."""

from __future__ import annotations

import pytest

from harness.core.verdict import CheckVerdict, RunVerdict, Status


def check(status: Status, candidate: str = "mlx-float32") -> CheckVerdict:
    return CheckVerdict("case", "prompt", candidate, "torch-float64", "prefill", status, "why")


def verdict(*statuses: Status) -> RunVerdict:
    return RunVerdict([check(s) for s in statuses])


def test_a_run_of_passing_checks_passes_with_exit_0():
    v = verdict(Status.PASSED, Status.PASSED)
    assert v.passed and v.exit_code == 0
    assert v.headline() == "PASS: 2 passed"


@pytest.mark.parametrize("bad", [Status.FAILED, Status.ERROR])
def test_one_failed_or_crashed_check_fails_the_run(bad):
    v = verdict(Status.PASSED, bad)
    assert not v.passed and v.exit_code == 1
    assert v.headline().startswith("FAIL: 1 ")


def test_zero_checks_is_a_failure_not_a_vacuous_pass():
    v = RunVerdict()
    assert not v.passed and v.exit_code == 1
    assert "nothing was compared" in v.headline()


def test_a_run_where_every_check_was_skipped_compared_nothing_and_fails():
    v = verdict(Status.SKIPPED, Status.SKIPPED)
    assert not v.passed and v.exit_code == 1
    assert v.reason() == "nothing was compared (2 check(s) skipped)"


def test_known_failures_and_skips_beside_passes_keep_the_run_green():
    v = verdict(Status.PASSED, Status.XFAILED, Status.SKIPPED)
    assert v.passed and v.exit_code == 0


def test_the_frame_is_the_gates_verdicts_table():
    df = verdict(Status.PASSED, Status.ERROR).frame()
    assert list(df.columns) == ["case", "prompt", "candidate", "reference", "check", "status",
                                "detail"]
    assert df["status"].tolist() == ["passed", "error"]


def test_the_json_carries_passed_and_exit_code_from_the_same_object():
    for v in (verdict(Status.PASSED), verdict(Status.ERROR), RunVerdict()):
        j = v.to_json()
        assert j["passed"] == (j["exit_code"] == 0) == v.passed
