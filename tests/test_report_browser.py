"""The report renders in a real browser: no console errors, every chart drawn, a screenshot kept.

Needs Chromium (Debian's ``chromium``; CI installs it and sets BAILING_PARITY_REQUIRE_BROWSER=1,
which turns a missing browser into a failure instead of a skip).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.browser_check import check_report, chromium_path
from harness.cases import load_case, materialize
from harness.errors import InputError
from harness.report import write_report
from harness.runner import Runner
from harness.targets import Target

CASES = Path(__file__).resolve().parent.parent / "cases"


@pytest.fixture(scope="module")
def browser() -> str:
    if not _required():
        pytest.importorskip("playwright")
    try:
        return chromium_path()
    except InputError as e:
        if _required():
            pytest.fail(str(e))
        pytest.skip(str(e))


def _required() -> bool:
    return os.environ.get("BAILING_PARITY_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    runner = Runner()
    case = load_case(CASES / "flash-mini.toml")
    prompt = case.prompts[0]
    runner.compare(case=case.name, prompt=prompt.name, checkpoint=materialize(case),
                   tokens=prompt.tokens, candidate=Target.parse("mlx-float32"),
                   reference=Target.parse("torch-float64"), tolerance=case.tolerance("float32"))
    out = tmp_path_factory.mktemp("run")
    write_report(runner.results, out, title="browser check", environment={"python": "3.11"})
    return out / "index.html"


def test_the_report_renders_with_its_charts_and_keeps_a_screenshot(browser, report):
    check = check_report(report)
    assert check.passed, check.problems
    assert len(check.charts) >= 1 and all(c["marks"] > 10 for c in check.charts)
    assert check.screenshot is not None and check.screenshot.stat().st_size > 10_000
    assert check.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_script_error_fails_the_check(browser, report, tmp_path):
    broken = tmp_path / "index.html"
    script = "<script>undefinedFn()</script></body>"
    broken.write_text(report.read_text().replace("</body>", script))
    check = check_report(broken)
    assert not check.passed and any("undefinedFn" in p for p in check.problems)


def test_a_chart_that_did_not_render_fails_the_check(browser, report, tmp_path):
    broken = tmp_path / "index.html"
    html = report.read_text()
    start = html.index("<svg")
    end = html.index("</svg>", start) + len("</svg>")
    broken.write_text(html[:start] + html[end:])
    check = check_report(broken)
    assert any("did not render" in p for p in check.problems)


def test_an_external_resource_fails_the_check(browser, report, tmp_path):
    broken = tmp_path / "index.html"
    broken.write_text(report.read_text().replace(
        "</head>", '<link rel="stylesheet" href="https://cdn.example.invalid/x.css"></head>'))
    check = check_report(broken)
    assert any("request failed" in p for p in check.problems)


def test_screenshots_never_overwrite(browser, report):
    first = check_report(report).screenshot
    second = check_report(report).screenshot
    assert first != second and first.exists() and second.exists()
