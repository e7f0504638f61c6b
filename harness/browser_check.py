"""Opens a report in headless Chromium the way a reviewer would, and fails on what they would see.

A report passes when the page logs no console error or page error, requests nothing that fails
(the page must be self-contained: the browser runs with networking off), and every chart
rendered: each ``.chart`` holds an ``<svg>`` with a non-zero box and drawn marks.  A full-page
screenshot is kept next to the report.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import InputError

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
_CHARTS_JS = """() => [...document.querySelectorAll('.chart')].map(div => {
  const svg = div.querySelector('svg');
  if (!svg) return {id: div.id, width: 0, height: 0, marks: 0};
  const box = svg.getBoundingClientRect();
  return {id: div.id, width: box.width, height: box.height,
          marks: svg.querySelectorAll('path, line, polyline, polygon, rect, use').length};
})"""


@dataclass
class BrowserCheck:
    """What the browser saw."""

    problems: list[str] = field(default_factory=list)
    charts: list[dict] = field(default_factory=list)
    screenshot: Path | None = None

    @property
    def passed(self) -> bool:
        return not self.problems


def chromium_path() -> str:
    """The Chromium binary (``BAILING_PARITY_CHROMIUM`` overrides); InputError if none."""
    for candidate in (os.environ.get("BAILING_PARITY_CHROMIUM"), "chromium", "chromium-browser",
                      "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    raise InputError("no Chromium found: install Debian's 'chromium' package "
                     "(apt-get install chromium) or set BAILING_PARITY_CHROMIUM")


def _free_name(path: Path) -> Path:
    """``path`` or ``path-2``, ``path-3`` ...: never an existing file."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def check_report(index_html: Path, screenshot: Path | None = None) -> BrowserCheck:
    """Load ``index_html`` in headless Chromium and check it; save a full-page screenshot."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    index_html = Path(index_html).resolve()
    if not index_html.is_file():
        raise InputError(f"{index_html}: no report there")
    result = BrowserCheck()
    shot = _free_name(screenshot or index_html.with_name("screenshot.png"))
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        except PlaywrightError as e:
            raise InputError(f"Chromium did not start: {e}") from None
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.on("console", lambda m: m.type == "error"
                    and result.problems.append(f"console error: {m.text}"))
            page.on("pageerror", lambda e: result.problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: result.problems.append(
                f"request failed: {r.url} ({r.failure})"))
            page.goto(index_html.as_uri(), wait_until="load")
            result.charts = page.evaluate(_CHARTS_JS)
            page.screenshot(path=str(shot), full_page=True)
            result.screenshot = shot
        finally:
            browser.close()
    if not result.charts:
        result.problems.append("no chart on the page")
    for chart in result.charts:
        if chart["width"] <= 0 or chart["height"] <= 0 or chart["marks"] == 0:
            result.problems.append(f"chart {chart['id'] or '?'} did not render: {chart}")
    return result


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("browser-check",
                              help="open a report in headless Chromium; fail on errors")
    p.add_argument("run", type=Path, help="a run folder holding index.html")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check = check_report(Path(args.run) / "index.html")
    for problem in check.problems:
        print(f"browser-check: {problem}")
    print(f"browser-check: {len(check.charts)} chart(s); screenshot {check.screenshot}")
    print("browser-check: PASS" if check.passed else "browser-check: FAIL")
    return 0 if check.passed else 1
