"""The report as a reviewer sees it in a real browser: the verdict on the first screen, a matrix
that says what summary.json says, working filters, no console errors, every heatmap drawn, and
screenshots of a passing and of a failing run kept next to them.

Needs Chromium (Debian's ``chromium``; CI installs it and sets BAILING_PARITY_REQUIRE_BROWSER=1,
which turns a missing browser into a failure instead of a skip).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.backends.targets import Target
from harness.checks.cases import load_case, materialize
from harness.checks.session import CheckSession
from harness.core.errors import InputError
from harness.core.verdict import CheckVerdict, RunVerdict, Status
from harness.report.browser_check import CHROMIUM_ARGS, VIEWPORT, check_report, chromium_path
from harness.report.page import write_report

CASES = Path(__file__).resolve().parent.parent / "cases"
REFERENCE = Target.parse("torch-float64")
MUTANT = Target.parse("torch-float64", {"variant": "slope_off_by_one"})
CRASH = ("flash-mini/short prefill: llamacpp worker died (exit -6) while prefill\n"
         "--- key lines of its stderr ---\nGGML_ASSERT(ne0 % 32 == 0) failed\n"
         "--- last 2 lines of its stderr ---\n#0 ggml_abort\n#1 ggml_mul_mat")


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


def _run(out: Path, candidates: list[Target]) -> RunVerdict:
    """flash-mini's first prompt, prefill, each candidate against the float64 reference, plus a
    greedy pass, a port failure and a skip; the report written into ``out``."""
    runner = CheckSession()
    case = load_case(CASES / "flash-mini.toml")
    prompt = case.prompts[0]
    for cand in candidates:
        runner.compare(case=case.name, prompt=prompt.name, checkpoint=materialize(case),
                       tokens=prompt.tokens, candidate=cand, reference=REFERENCE,
                       tolerance=case.tolerance("float32"))
    verdict = RunVerdict([
        CheckVerdict(r.case, r.prompt, r.candidate, r.reference, r.mode,
                     Status.PASSED if r.passed else Status.FAILED, r.summary_line())
        for r in runner.results
    ])
    verdict.extend([
        CheckVerdict(case.name, prompt.name, candidates[0].label, REFERENCE.label, "greedy",
                     Status.PASSED, "greedy: 64/64 tokens identical"),
        CheckVerdict(case.name, prompt.name, "llamacpp", REFERENCE.label, "prefill",
                     Status.ERROR, f"port failure: {CRASH.splitlines()[0]}"),
        CheckVerdict(case.name, prompt.name, "llamacpp", REFERENCE.label, "decode",
                     Status.SKIPPED, "llamacpp: libllama not built"),
    ])
    findings = [CRASH, "greedy: 64/64 tokens identical", "llamacpp skipped: libllama not built"]
    write_report(runner.results, out, title="browser check", environment={"python": "3.11"},
                 findings=findings, verdict=verdict)
    return verdict


@pytest.fixture(scope="module")
def passing(tmp_path_factory) -> tuple[Path, RunVerdict]:
    out = tmp_path_factory.mktemp("passing-run")
    return out / "index.html", _run(out, [Target.parse("mlx-float32")])


@pytest.fixture(scope="module")
def failing(tmp_path_factory) -> tuple[Path, RunVerdict]:
    """A mutation: the reference with the GLA slope off by one, as a candidate."""
    out = tmp_path_factory.mktemp("failing-run")
    return out / "index.html", _run(out, [Target.parse("mlx-float32"), MUTANT])


@pytest.fixture
def page(browser, failing) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=browser, args=CHROMIUM_ARGS)
        try:
            page = chromium.new_page(viewport=VIEWPORT)
            page.goto(failing[0].as_uri(), wait_until="load")
            yield page
        finally:
            chromium.close()


def _png_size(path: Path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


def _visible_rows(page) -> list[str]:
    return page.eval_on_selector_all(
        "table.matrix tbody tr:not([hidden])", "rows => rows.map(r => r.dataset.candidate)")


# --------------------------------------------------------------------------------------------
# What the check enforces, on a passing and on a failing run


@pytest.mark.parametrize("run", ["passing", "failing"])
def test_the_report_passes_the_check_with_the_verdict_on_the_first_screen(browser, run, request):
    index, verdict = request.getfixturevalue(run)
    check = check_report(index)
    assert check.passed, check.problems
    assert check.headline is not None and check.headline["bottom"] <= VIEWPORT["height"]
    assert check.headline["text"].splitlines()[0] == "FAIL"  # the port failure fails both runs
    assert verdict.headline() in check.headline["text"]
    assert check.first_screen == index.with_name("screenshot-first-screen.png")
    assert _png_size(check.first_screen) == (VIEWPORT["width"], VIEWPORT["height"])
    assert check.screenshot is not None
    assert check.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    compared = [c for c in verdict.checks if c.status in (Status.PASSED, Status.FAILED)
                and c.check == "prefill"]
    layers = [c for c in check.charts if c["id"].startswith("log10 NMSE per layer")]
    assert len(layers) == len(compared) and all(c["marks"] > 10 for c in layers)


def test_the_page_is_short_when_every_pair_passes(browser, passing):
    check = check_report(passing[0])
    assert check.page_height < 2 * VIEWPORT["height"], check.page_height


# --------------------------------------------------------------------------------------------
# The matrix and the filters, read in the browser


def test_the_matrix_cells_equal_the_verdict_checks(page, failing):
    _, verdict = failing
    cells = page.eval_on_selector_all("table.matrix td.cell", """cells => cells.map(td => [
        td.dataset.case, td.dataset.prompt, td.dataset.candidate, td.dataset.reference,
        td.dataset.check, td.dataset.status])""")
    keys = ("case", "prompt", "candidate", "reference", "check", "status")
    expected = [[c[k] for k in keys] for c in verdict.to_json()["checks"]]
    assert sorted(cells) == sorted(expected)


def test_a_failing_cell_shows_the_first_divergence_of_its_pair(page, failing):
    _, verdict = failing
    (mutant,) = [c for c in verdict.checks if c.status == Status.FAILED]
    text = page.inner_text(f'td.cell[data-candidate="{mutant.candidate}"][data-check="prefill"]')
    assert text == "gla_out-0"


def test_filtering_by_candidate_shows_only_its_rows(page):
    assert sorted(_visible_rows(page)) == sorted(["llamacpp", "mlx-float32", MUTANT.label])
    page.select_option("#filter-candidate", "mlx-float32")
    assert _visible_rows(page) == ["mlx-float32"]
    assert page.locator("details.pair:visible").count() == 1
    assert page.inner_text("#filter-count") == "1 of 3 rows"


def test_filtering_by_verdict_shows_only_rows_with_that_status(page):
    page.select_option("#filter-status", "error")
    assert _visible_rows(page) == ["llamacpp"]
    assert page.locator("details.pair:visible").count() == 0
    page.select_option("#filter-status", "failed")
    assert _visible_rows(page) == [MUTANT.label]
    page.select_option("#filter-status", "")
    assert len(_visible_rows(page)) == 3


def test_a_matrix_link_opens_the_collapsed_pair_it_points_to(page):
    cell = 'td.cell[data-candidate="mlx-float32"][data-check="prefill"] a'
    target = page.get_attribute(cell, "href")
    assert not page.eval_on_selector(target, "d => d.open")  # a passing pair starts collapsed
    page.click(cell)
    assert page.eval_on_selector(target, "d => d.open")


# --------------------------------------------------------------------------------------------
# What makes the check fail


def test_a_script_error_fails_the_check(browser, failing, tmp_path):
    broken = tmp_path / "index.html"
    broken.write_text(failing[0].read_text().replace("</body>",
                                                     "<script>undefinedFn()</script></body>"))
    check = check_report(broken)
    assert not check.passed and any("undefinedFn" in p for p in check.problems)


def test_a_heatmap_that_did_not_render_fails_the_check(browser, failing, tmp_path):
    broken = tmp_path / "index.html"
    html = failing[0].read_text()
    start = html.index("<tbody>", html.index('<table class="heatmap"'))
    end = html.index("</tbody>", start)
    broken.write_text(html[:start] + "<tbody>" + html[end:])
    check = check_report(broken)
    assert any("did not render" in p for p in check.problems), check.problems


def test_a_headline_below_the_first_screen_fails_the_check(browser, failing, tmp_path):
    broken = tmp_path / "index.html"
    broken.write_text(failing[0].read_text().replace(
        "<body>", '<body><div style="height: 1000px">banner</div>', 1))
    check = check_report(broken)
    assert any("below the first screen" in p for p in check.problems), check.problems


def test_an_external_resource_fails_the_check(browser, failing, tmp_path):
    broken = tmp_path / "index.html"
    broken.write_text(failing[0].read_text().replace(
        "</head>", '<link rel="stylesheet" href="https://cdn.example.invalid/x.css"></head>'))
    check = check_report(broken)
    assert any("request failed" in p for p in check.problems)


def test_screenshots_never_overwrite(browser, passing):
    first, second = check_report(passing[0]), check_report(passing[0])
    assert first.screenshot != second.screenshot and first.first_screen != second.first_screen
    assert all(p.exists() for p in (first.screenshot, second.screenshot, first.first_screen,
                                    second.first_screen))
