"""Opens a report in headless Chromium the way a reviewer would, and fails on what they would see.

A report passes when the page logs no console error or page error, requests nothing that fails
(the page must be self-contained: the browser runs with networking off), the run's headline is
on the first screen of a 1300×900 window, and every chart rendered: each ``.chart`` holds an
``<svg>`` with a non-zero box and drawn marks, each ``table.heatmap`` a non-zero box and coloured
cells (collapsed details are opened first).  Two screenshots are kept next to the report: the
first screen as a reviewer sees it (``screenshot-first-screen.png``) and the full page
(``screenshot.png``).
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from harness.core.errors import InputError

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
_HEATMAPS_JS = """() => [...document.querySelectorAll('table.heatmap')].map((t, i) => {
  const box = t.getBoundingClientRect();
  return {id: t.getAttribute('aria-label') || `heatmap ${i + 1}`, width: box.width,
          height: box.height, marks: t.querySelectorAll('td[style*="background"]').length};
})"""
_HEADLINE_JS = """() => {
  const h = document.getElementById('headline');
  if (!h) return null;
  const box = h.getBoundingClientRect();
  return {top: box.top + window.scrollY, bottom: box.bottom + window.scrollY,
          text: h.innerText};
}"""
_OPEN_ALL_JS = "() => document.querySelectorAll('details').forEach(d => { d.open = true; })"
VIEWPORT = {"width": 1300, "height": 900}  # the window a reviewer sees the verdict in


@dataclass
class BrowserCheck:
    """What the browser saw."""

    problems: list[str] = field(default_factory=list)
    charts: list[dict] = field(default_factory=list)
    screenshot: Path | None = None
    first_screen: Path | None = None
    page_height: int = 0  # px at 1300 wide, details as the page opens them
    headline: dict | None = None

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
    """Load ``index_html`` in headless Chromium and check it; save the first screen and a
    full-page screenshot (``screenshot``, default ``screenshot.png`` next to the report)."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    index_html = Path(index_html).resolve()
    if not index_html.is_file():
        raise InputError(f"{index_html}: no report there")
    result = BrowserCheck()
    shot = _free_name(screenshot or index_html.with_name("screenshot.png"))
    first = _free_name(shot.with_name("screenshot-first-screen.png"))
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        except PlaywrightError as e:
            raise InputError(f"Chromium did not start: {e}") from None
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.on("console", lambda m: m.type == "error"
                    and result.problems.append(f"console error: {m.text}"))
            page.on("pageerror", lambda e: result.problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: result.problems.append(
                f"request failed: {r.url} ({r.failure})"))
            page.goto(index_html.as_uri(), wait_until="load")
            result.headline = page.evaluate(_HEADLINE_JS)
            result.page_height = int(page.evaluate("document.documentElement.scrollHeight"))
            page.screenshot(path=str(first))
            result.first_screen = first
            page.screenshot(path=str(shot), full_page=True)
            result.screenshot = shot
            page.evaluate(_OPEN_ALL_JS)
            result.charts = page.evaluate(_CHARTS_JS) + page.evaluate(_HEATMAPS_JS)
        finally:
            browser.close()
    result.problems += _layout_problems(result)
    return result


def _layout_problems(result: BrowserCheck) -> list[str]:
    """The headline must be on the first screen and every chart drawn."""
    problems = []
    if result.headline is None:
        problems.append("no #headline on the page")
    elif result.headline["bottom"] > VIEWPORT["height"]:
        problems.append(f"the headline ends at {result.headline['bottom']:.0f} px, below the "
                        f"first screen ({VIEWPORT['height']} px)")
    if not result.charts:
        problems.append("no chart on the page")
    for chart in result.charts:
        if chart["width"] <= 0 or chart["height"] <= 0 or chart["marks"] == 0:
            problems.append(f"chart {chart['id'] or '?'} did not render: {chart}")
    return problems


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("browser-check",
                              help="open a report in headless Chromium; fail on errors")
    p.add_argument("run", type=Path, help="a run folder holding index.html")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check = check_report(Path(args.run) / "index.html")
    for problem in check.problems:
        print(f"browser-check: {problem}")
    print(f"browser-check: {len(check.charts)} chart(s); page {check.page_height} px tall; "
          f"screenshots {check.first_screen} (first screen), {check.screenshot} (full page)")
    print("browser-check: PASS" if check.passed else "browser-check: FAIL")
    return 0 if check.passed else 1
