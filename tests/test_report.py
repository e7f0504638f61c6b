"""Specification of the HTML report: one self-contained, escaped file that is never overwritten."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from markupsafe import escape

from harness import report
from harness.compare import PairResult, Tolerance, compare_pair, explain_divergence
from harness.report import new_run_dir, write_report

TOL = Tolerance(nmse=1e-8)
ENV = {"python": "3.11", "torch": "2.x"}


def captures(n_layers: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    caps = {
        f"{s}-{i}": rng.normal(size=(4, 16)) for i in range(n_layers) for s in ("gla_out", "l_out")
    }
    caps["result_output"] = rng.normal(size=(4, 20))
    return caps


def sample_results() -> list[PairResult]:
    reference = captures()
    failing = {k: v.copy() for k, v in reference.items()}
    failing["gla_out-1"] = failing["gla_out-1"] + 0.01
    failing["l_out-1"] = failing["l_out-1"] + 0.01
    return [
        compare_pair(
            "flash-mini", "short", "mlx[float32]", "torch[float64]", failing, reference, TOL
        ),
        # An exact match: NMSE 0 everywhere must not break the log axis.
        compare_pair(
            "flash-mini", "short", "torch[float32]", "torch[float64]", reference, reference, TOL
        ),
        compare_pair(
            "other-case",
            "long",
            "mlx[float32]",
            "torch[float64]",
            reference,
            reference,
            TOL,
            mode="decode",
        ),
    ]


def test_writes_one_self_contained_html_file(tmp_path: Path) -> None:
    path = write_report(sample_results(), tmp_path / "run", title="Parity", environment=ENV)
    assert path == tmp_path / "run" / "index.html"
    assert [p.name for p in path.parent.iterdir()] == ["index.html"]
    html = path.read_text(encoding="utf-8")
    assert html.count('class="chart"') == 2  # one chart per case
    assert html.count("<svg") == 2
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html)
    assert "<link" not in html and "<script" not in html and "<img" not in html


def test_shows_environment_findings_and_each_pair(tmp_path: Path) -> None:
    findings = ["llama.cpp skipped: libllama not found"]
    html = write_report(
        sample_results(), tmp_path, title="Parity", environment=ENV, findings=findings
    ).read_text(encoding="utf-8")
    assert "libllama not found" in html
    assert "<th>torch</th><td>2.x</td>" in html
    assert html.count('class="pair ') == 3
    assert "FAIL" in html and "PASS" in html


def test_failing_rows_are_highlighted_and_the_first_divergence_explained(tmp_path: Path) -> None:
    html = write_report(sample_results(), tmp_path, title="P", environment=ENV).read_text("utf-8")
    assert re.search(r'<tr class="first">\s*<td>gla_out-1</td>', html)
    assert re.search(r'<tr class="fail">\s*<td>l_out-1</td>', html)
    assert str(escape(explain_divergence("gla_out-1"))) in html


def test_everything_user_supplied_is_escaped(tmp_path: Path) -> None:
    reference = captures(n_layers=1)
    result = compare_pair(
        "<b>case</b>", "p", "<script>x()</script>", "ref", reference, reference, TOL
    )
    html = write_report(
        [result], tmp_path, title="<i>t</i>", environment={"<k>": "<v>"}, findings=["<u>f</u>"]
    ).read_text("utf-8")
    assert "<script>" not in html and "<b>case</b>" not in html and "<u>f</u>" not in html
    assert "&lt;script&gt;x()&lt;/script&gt;" in html
    assert "&lt;i&gt;t&lt;/i&gt;" in html


def test_a_pair_without_per_layer_points_still_gets_a_chart(tmp_path: Path) -> None:
    logits = {"result_output": np.arange(12.0).reshape(3, 4)}
    result = compare_pair("c", "p", "a", "b", logits, logits, TOL)
    html = write_report([result], tmp_path, title="t", environment={}).read_text("utf-8")
    assert "<svg" in html
    assert "no per-layer points captured" in html


def test_refuses_to_overwrite_an_existing_report(tmp_path: Path) -> None:
    path = write_report(sample_results(), tmp_path, title="first", environment=ENV)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=re.escape(str(path))):
        write_report(sample_results(), tmp_path, title="second", environment=ENV)
    assert path.read_bytes() == before


def test_new_run_dir_is_timestamped_and_named(tmp_path: Path) -> None:
    run = new_run_dir(tmp_path / "reports", "smoke test/1")
    assert run.is_dir() and run.parent == tmp_path / "reports"
    assert re.fullmatch(r"\d{8}-\d{6}-smoke-test-1", run.name)
    assert list(run.iterdir()) == []


def test_new_run_dir_never_returns_an_existing_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "_timestamp", lambda: "20250101-120000")
    (tmp_path / "20250101-120000-x").mkdir()
    (tmp_path / "20250101-120000-x" / "index.html").write_text("old run")
    runs = [new_run_dir(tmp_path, "x") for _ in range(3)]
    assert [r.name for r in runs] == [f"20250101-120000-x-{n}" for n in (2, 3, 4)]
    assert all(list(r.iterdir()) == [] for r in runs)
    assert (tmp_path / "20250101-120000-x" / "index.html").read_text() == "old run"
