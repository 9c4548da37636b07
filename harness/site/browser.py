"""Headless Chromium for the leaderboard site: open a page from disk, collect its script errors, and take
the screenshots that go beside the boards. Playwright's Python client drives the system's Chromium
(Debian's ``chromium`` package), so no browser is downloaded.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from harness.errors import ConfigError

# Flags that keep Chromium off the network and away from a desktop session (CI runs as root, no display).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def chromium_path() -> str:
    """The system Chromium, or a ConfigError saying how to install it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise ConfigError("no Chromium found on PATH (looked for chromium, chromium-browser, google-chrome); "
                      "install it (Debian: apt-get install -y chromium)")


@contextmanager
def open_browser() -> Iterator[object]:
    """A headless Chromium (Playwright ``Browser``) with a fresh profile, closed on exit."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ConfigError("screenshots need Playwright's Python client: pip install -e '.[test]' "
                          "(or pip install playwright)") from None
    exe = chromium_path()
    profile = tempfile.mkdtemp(prefix="harness-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(profile, executable_path=exe, headless=True,
                                                            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900})
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def screenshots(out_dir: Path, board: str | None = None) -> list[Path]:
    """Photograph one board's page, its summary, per-task table and first Pareto plot, into
    ``<out_dir>/<board>-summary.png``, ``-table.png`` and ``-pareto.png``; every board when ``board`` is None."""
    out_dir = Path(out_dir).resolve()
    pages = [out_dir / f"{board}.html"] if board else sorted(p for p in out_dir.glob("*.html") if p.name != "index.html")
    missing = [p for p in pages if not p.is_file()]
    if missing or not pages:
        raise ConfigError(f"no board page {missing[0] if missing else out_dir / '*.html'}: write the site first "
                          "(python -m harness leaderboard)")
    written = []
    with open_browser() as context:
        page = context.new_page()
        page.set_viewport_size({"width": 2600, "height": 1000})  # the whole table, not a scrolled part of it
        for html in pages:
            page.goto(html.as_uri())
            page.wait_for_load_state("load")
            # the whole table in the picture, not the part its scrolling box shows
            # (and the header once at its top: a sticky header would be drawn where the page happened to scroll)
            page.add_style_tag(content="body { max-width: none } .table-wrap { overflow: visible } "
                                       "thead th { position: static !important }")
            summary = out_dir / f"{html.stem}-summary.png"
            page.locator("#summary").screenshot(path=str(summary))
            written.append(summary)
            table = out_dir / f"{html.stem}-table.png"
            page.locator("#rows").screenshot(path=str(table))
            written.append(table)
            plot = page.locator("figure.pareto-figure").first
            if plot.count():
                dest = out_dir / f"{html.stem}-pareto.png"
                plot.screenshot(path=str(dest))
                written.append(dest)
    return written
