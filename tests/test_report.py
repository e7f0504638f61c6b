"""Specification of the HTML report: one self-contained, escaped file that is never overwritten."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from markupsafe import escape

from harness.checks.compare import PairResult, compare_pair
from harness.checks.mtp import MtpRun, mtp_section
from harness.checks.mtp_decoding import DraftStep, SpecResult
from harness.core.capture_points import explain_divergence
from harness.core.tolerances import Tolerance
from harness.core.verdict import CheckVerdict, RunVerdict, Status
from harness.perf.sections import throughput_section
from harness.perf.sweep import throughput_frame
from harness.report import heatmap as report_heatmap
from harness.report import page as report
from harness.report.page import (
    GateSummary,
    free_run_dir,
    render_report,
    render_section,
    write_report,
)

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
    assert html.count('<table class="heatmap"') == 3  # one heatmap per pair
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html)
    assert "<link" not in html and "<img" not in html
    assert html.count("<script") == 1 and "<script>" in html  # the filters, inline


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
    assert "<script>x()" not in html and "<b>case</b>" not in html and "<u>f</u>" not in html
    assert "&lt;script&gt;x()&lt;/script&gt;" in html
    assert "&lt;i&gt;t&lt;/i&gt;" in html


def test_a_pair_without_per_layer_points_shows_its_global_points(tmp_path: Path) -> None:
    logits = {"result_output": np.arange(12.0).reshape(3, 4)}
    result = compare_pair("c", "p", "a", "b", logits, logits, TOL)
    html = write_report([result], tmp_path, title="t", environment={}).read_text("utf-8")
    assert "no per-layer points captured" in html
    assert re.search(r'<table class="heatmap globals"><tr><td class="" style="background: '
                     rf'{report_heatmap.EXACT}" title="result_output: nmse 0 \(exact\)', html)


def test_refuses_to_overwrite_an_existing_report(tmp_path: Path) -> None:
    path = write_report(sample_results(), tmp_path, title="first", environment=ENV)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=re.escape(str(path))):
        write_report(sample_results(), tmp_path, title="second", environment=ENV)
    assert path.read_bytes() == before


def test_free_run_dir_is_timestamped_named_and_not_yet_created(tmp_path: Path) -> None:
    run = free_run_dir(tmp_path / "reports", "smoke test/1")
    assert run.parent == tmp_path / "reports" and not run.exists()
    assert re.fullmatch(r"\d{8}-\d{6}-smoke-test-1", run.name)


def test_free_run_dir_never_returns_an_existing_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "_timestamp", lambda: "20250101-120000")
    (tmp_path / "20250101-120000-x").mkdir()
    (tmp_path / "20250101-120000-x" / "index.html").write_text("old run")
    run = free_run_dir(tmp_path, "x")
    assert run.name == "20250101-120000-x-2" and not run.exists()
    assert (tmp_path / "20250101-120000-x" / "index.html").read_text() == "old run"


# --------------------------------------------------------------------------------------------
# The first screen: headline, gate, verdict matrix


class _Cells(HTMLParser):
    """The verdict matrix's cells: their data attributes and text."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, str]] = []
        self._open: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "td" and "cell" in a.get("class", "").split():
            self._open = {k.removeprefix("data-"): v for k, v in a.items()
                          if k.startswith("data-")} | {"text": "", "href": ""}
        elif tag == "a" and self._open is not None:
            self._open["href"] = a.get("href", "")

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._open is not None:
            self.cells.append(self._open)
            self._open = None


def matrix_cells(html: str) -> list[dict[str, str]]:
    parser = _Cells()
    parser.feed(html)
    return parser.cells


def run_verdict(results: list[PairResult]) -> RunVerdict:
    """The pairs' checks plus a greedy pass, a port failure, a skip and an expected failure."""
    checks = [CheckVerdict(r.case, r.prompt, r.candidate, r.reference, r.mode,
                           Status.PASSED if r.passed else Status.FAILED, "") for r in results]
    checks += [
        CheckVerdict("flash-mini", "short", "torch[float32]", "torch[float64]", "greedy",
                     Status.PASSED, "greedy: 64/64 tokens identical"),
        CheckVerdict("flash-mini", "short", "llamacpp", "torch[float64]", "prefill",
                     Status.ERROR, "port failure: llamacpp worker died while prefill"),
        CheckVerdict("flash-mini", "short", "llamacpp", "torch[float64]", "mtp",
                     Status.SKIPPED, "no MTP driver"),
        CheckVerdict("other-case", "long", "mlx[float32]", "torch[float64]", "slopes",
                     Status.XFAILED, "known port failure: hf_off_by_one"),
    ]
    return RunVerdict(checks)


def test_the_headline_is_the_first_thing_on_the_page(tmp_path: Path) -> None:
    verdict = run_verdict(sample_results())
    html = write_report(sample_results(), tmp_path, title="Parity", environment=ENV,
                        verdict=verdict).read_text("utf-8")
    body = html[html.index("<body>"):]
    assert body.index('id="headline"') < body.index('id="matrix"') < body.index('id="findings"')
    assert f'<p id="run-verdict" class="verdict-fail">{verdict.headline()}</p>' in html
    assert '<span class="chip s-failed">1 failed</span>' in html
    assert '<span class="chip s-error">1 error</span>' in html


def test_the_matrix_has_exactly_one_cell_per_check_of_the_verdict(tmp_path: Path) -> None:
    verdict = run_verdict(sample_results())
    html = render_report(sample_results(), title="P", environment=ENV, verdict=verdict)
    keys = ("case", "prompt", "candidate", "reference", "check", "status")
    cells = [tuple(c[k] for k in keys) for c in matrix_cells(html)]
    expected = [tuple(c[k] for k in keys) for c in verdict.to_json()["checks"]]
    assert sorted(cells) == sorted(expected) and len(cells) == len(expected)


def test_a_cell_holds_the_worst_nmse_or_the_failing_point_and_links_to_its_detail() -> None:
    results = sample_results()
    html = render_report(results, title="P", environment=ENV, verdict=run_verdict(results))
    cells = {(c["candidate"], c["check"]): c for c in matrix_cells(html)}
    assert cells["mlx[float32]", "prefill"]["text"] == "gla_out-1"
    assert cells["mlx[float32]", "prefill"]["href"] == "#pair-1"
    assert cells["torch[float32]", "prefill"]["text"] == "exact"
    assert cells["torch[float32]", "greedy"]["text"] == "64/64"
    assert (cells["llamacpp", "prefill"]["text"], cells["llamacpp", "prefill"]["href"]) == (
        "port failure", "#findings")
    assert cells["mlx[float32]", "slopes"]["text"] == "xfail"


def test_a_passing_cell_shows_the_worst_nmse_in_scientific_notation() -> None:
    reference = captures()
    close = {k: v * (1 + 1e-6) for k, v in reference.items()}
    result = compare_pair("c", "p", "mlx", "ref", close, reference, Tolerance(nmse=1e-8))
    (cell,) = matrix_cells(render_report([result], title="t", environment={}))
    assert cell["status"] == "passed" and cell["text"] == "1.0e-12"


def test_without_a_verdict_each_pair_is_one_check() -> None:
    html = render_report(sample_results(), title="P", environment=ENV)
    cells = [(c["case"], c["candidate"], c["check"], c["status"]) for c in matrix_cells(html)]
    assert cells == [("flash-mini", "mlx[float32]", "prefill", "failed"),
                     ("flash-mini", "torch[float32]", "prefill", "passed"),
                     ("other-case", "mlx[float32]", "decode", "passed")]
    assert '<p id="run-verdict" class="verdict-fail">FAIL: 1 check(s) failed' in html


def regressions(*rows: tuple[str, str, str, str]) -> pd.DataFrame:
    """Gate rows from (table, key, metric, reason); values as the gate writes them."""
    return pd.DataFrame(
        [{"table": t, "key": k, "metric": m, "baseline": 1e-12, "current": 1e-9,
          "allowed": "present" if m == "row" else "<= 1e-11", "reason": r} for t, k, m, r in rows],
        columns=["table", "key", "metric", "baseline", "current", "allowed", "reason"])


def test_the_gate_verdict_names_what_regressed_under_the_headline() -> None:
    gate = GateSummary("baselines/parity.json", regressions(
        ("parity", "flash-mini/short/mlx/prefill/l_out-1", "nmse", "NMSE grew 1000-fold"),
        ("verdicts", "flash-mini/short/mlx/greedy", "status", "the greedy check failed"),
        ("parity", "ling3-mini/short/mlx/prefill", "row", "pair missing from the run")))
    html = render_report(sample_results(), title="P", environment=ENV, gate=gate)
    head = html[html.index('id="headline"'):html.index('id="matrix"')]
    assert "Gate: FAIL, 3 regression(s) against <code>baselines/parity.json</code>" in head
    assert re.search(r"<strong>failing now</strong> \(1\):\s*<code>flash-mini/short/mlx/greedy"
                     r"</code> the greedy check failed", head)
    assert "<strong>missing from the run</strong> (1)" in head
    assert re.search(r"<strong>drifted beyond the baseline</strong> \(1\):\s*<code>"
                     r"flash-mini/short/mlx/prefill/l_out-1</code> NMSE grew 1000-fold", head)


def test_a_passing_gate_says_so_under_the_headline() -> None:
    gate = GateSummary("baselines/parity.json", regressions())
    html = render_report(sample_results(), title="P", environment=ENV, gate=gate)
    assert ('<p class="verdict-pass">Gate: PASS, no regression against '
            "<code>baselines/parity.json</code>.</p>") in html


# --------------------------------------------------------------------------------------------
# Below the matrix: findings, pairs


def test_failing_pairs_are_open_and_passing_pairs_collapsed() -> None:
    html = render_report(sample_results(), title="P", environment=ENV)
    opened = re.findall(r'<details class="pair s-(\w+)" id="(pair-\d)"[^>]*?( open)?>', html)
    assert opened == [("failed", "pair-1", " open"), ("passed", "pair-2", ""),
                      ("passed", "pair-3", "")]


def test_the_kld_block_is_open_only_for_a_failing_pair() -> None:
    html = render_report(sample_results(), title="P", environment=ENV)
    assert re.findall(r'<details class="kld"( open)?>', html) == [" open", "", ""]


def test_findings_are_grouped_port_failures_first_with_the_stderr_collapsed() -> None:
    crash = ("flash-mini/short prefill: llamacpp worker died (signal 6) while prefill\n"
             "--- key lines of its stderr ---\nGGML_ASSERT(n > 0) failed\n"
             "--- last 2 lines of its stderr ---\nabort\nbacktrace")
    findings = ["greedy: 64/64 tokens identical", "llamacpp skipped: libllama not found", crash,
                crash.replace("short prefill", "short decode")]
    html = render_report(sample_results(), title="P", environment=ENV, findings=findings)
    kinds = re.findall(r'<div class="group sev-\w+" data-kind="([\w ]+)">', html)
    assert kinds == ["port failure", "skipped", "informational"]
    assert ("<li>llamacpp worker died (signal 6) while prefill — GGML_ASSERT(n &gt; 0) failed "
            '<span class="muted">(in flash-mini/short prefill, flash-mini/short decode)</span>'
            ) in html
    assert re.search(r"<details><summary class=\"muted\">raw output</summary><pre>--- key lines",
                     html)
    assert re.search(r"<details><summary>Informational \(1\)</summary>\s*<ul>\s*<li>greedy: "
                     r"64/64 tokens identical", html)


def test_the_heatmap_is_layers_by_points_with_the_first_divergence_marked() -> None:
    failing = sample_results()[0]
    hm = report_heatmap.heatmap(failing.table, failing.first_divergence, TOL.nmse)
    assert hm.layers == [0, 1, 2]
    assert [stem for stem, _ in hm.rows] == ["gla_out", "l_out"]
    css = {stem: [c.css for c in cells] for stem, cells in hm.rows}
    assert css == {"gla_out": ["", "first", ""], "l_out": ["", "fail", ""]}
    assert [c.point for c in hm.globals] == ["result_output"]
    first = hm.rows[0][1][1]
    assert first.title.startswith("gla_out-1: nmse ") and "(FAIL; tolerance 1e-08)" in first.title


def test_heatmap_colours_run_from_green_below_the_tolerance_to_red_above() -> None:
    def color(nmse: float, passed: bool = True, kind: str = "dense") -> str:
        table = pd.DataFrame([{"point": "l_out-0", "kind": kind, "nmse": nmse, "passed": passed,
                               "index_agreement": 1.0 if passed else 0.5, "note": ""}])
        return report_heatmap.heatmap(table, None, tolerance=1e-8).rows[0][1][0].color

    below, at, above = color(1e-20), color(1e-8), color(1e-4, passed=False)
    assert below == "#006837" and at == "#fffebe" and above == "#a50026"  # RdYlGn_r ends, middle
    assert color(0.0) == report_heatmap.EXACT
    assert color(float("nan")) == report_heatmap.MISSING
    assert color(float("nan"), kind="index") == report_heatmap.INDEX_PASS
    assert color(float("nan"), passed=False, kind="index") == report_heatmap.INDEX_FAIL


def test_the_mtp_section_draws_acceptance_per_draft_position_as_bars() -> None:
    steps = tuple(DraftStep(i, 1, (2, 3), accepted, np.zeros((2, 4)))
                  for i, accepted in enumerate((2, 1, 0, 2)))
    run = MtpRun("c", "p", "mlx", SpecResult((1,), (1, 2), steps, chain=2), greedy_unchanged=True,
                 drafts_match_reference=True)
    html = render_section(mtp_section([run]))
    assert ('<span class="accpos" title="draft position 1: 0.75"><span style="width: 75%">'
            '</span></span><span class="accpos" title="draft position 2: 0.50">'
            '<span style="width: 50%"></span></span> <span class="mono">0.75, 0.50</span>'
            ) in html


def test_a_report_without_checks_states_no_verdict() -> None:
    html = render_report([], title="throughput", environment={},
                         sections=[throughput_section(throughput_frame([]))])
    assert '<header id="headline" class="headline none">' in html
    assert 'id="run-verdict"' not in html and "FAIL" not in html
