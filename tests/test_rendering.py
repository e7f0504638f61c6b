"""Output as data, rendering in one place: checks and perf modules return typed sections, and
only the report's Jinja templates (autoescaping on) write HTML, with one number formatter."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from harness.checks.mtp import MtpRun, mtp_section
from harness.report.format import MISSING, fmt_number
from harness.report.page import Section, render_section

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "harness"
REPORT = HARNESS / "report"

_TAGS = (
    "a|b|body|br|code|details|div|em|h[1-6]|head|html|i|li|ol|p|pre|script|section|span|"
    "strong|style|summary|svg|table|tbody|td|th|thead|tr|u|ul"
)
# An opening, closing or self-closing HTML tag: <td>, </tr>, <span class="x">, <br/>.
HTML_TAG = re.compile(rf"</?(?:{_TAGS})(?:\s[^<>]*)?/?>", re.IGNORECASE)


def html_in_string_literals(source: str) -> list[tuple[int, str]]:
    """(line, tag) for each HTML tag in a string literal of ``source`` (f-string parts included,
    docstrings too: a section documented as HTML is a section built as HTML)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [(node.lineno, m.group(0)) for m in HTML_TAG.finditer(node.value)]
    return found


def modules_outside_the_report() -> list[Path]:
    return sorted(p for p in HARNESS.rglob("*.py") if REPORT not in p.parents)


def test_no_module_outside_the_report_writes_html() -> None:
    modules = modules_outside_the_report()
    assert len(modules) > 20  # the walk found the harness
    offenders = {
        str(p.relative_to(ROOT)): hits
        for p in modules
        if (hits := html_in_string_literals(p.read_text("utf-8")))
    }
    assert offenders == {}


def test_the_detector_flags_a_module_that_builds_html(tmp_path: Path) -> None:
    """Mutation: a synthetic check module with the old string-built section is caught, in a
    plain literal and in an f-string, while angle brackets that are not tags pass."""
    synthetic = (
        "def section(rows):\n"
        "    body = ''.join(f'<tr><td>{r}</td></tr>' for r in rows)\n"
        "    return '<table class=\"mtp\">' + body + '</table>'\n"
        "PATH = 'reports/<time>/<name>.parquet'  # placeholders, not tags\n"
    )
    hits = [tag for _, tag in html_in_string_literals(synthetic)]
    assert sorted(hits) == sorted(["<tr>", "<td>", "</td>", "</tr>", '<table class="mtp">',
                                   "</table>"])
    assert html_in_string_literals("X = 'a < b > c; <stem>-<layer>'\n") == []


def test_one_formatter_shows_what_is_not_there_as_a_dash() -> None:
    assert [fmt_number(v, ".2e") for v in (None, math.nan, pd.NA)] == [MISSING] * 3
    assert fmt_number(1234.5, ",.0f") == "1,234" and fmt_number(0.125, ".2f") == "0.12"
    assert fmt_number(7.0, "d") == "7" and fmt_number(True, "") == "True"


def test_a_section_is_data_rendered_by_its_template_with_escaping() -> None:
    run = MtpRun("case<1>", "p", "<script>x</script>", None, error="crash & burn")
    section = mtp_section([run])
    assert isinstance(section, Section) and section.runs == (run,)
    html = render_section(section)
    assert "<td>case&lt;1&gt;</td>" in html and "&lt;script&gt;x&lt;/script&gt;" in html
    assert '<td colspan="11">crash &amp; burn</td>' in html and "<script>" not in html


@pytest.mark.parametrize("name", ["mtp", "slopes", "throughput", "mtp_speed"])
def test_every_section_has_its_partial(name: str) -> None:
    assert (REPORT / "templates" / "sections" / f"{name}.html.j2").is_file()
