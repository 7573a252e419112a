"""A real browser for tests: Debian's chromium driven by Playwright (`.ci/run` installs both).  Where either is
missing the test skips, saying which and how to get it.  Screenshots go to outputs/screenshots/ (look at them)."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO

SHOTS = REPO / "outputs" / "screenshots"
# as root in a sandbox, and without the background calls a closed network refuses (the probe's flags)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    return path


@contextmanager
def browser():
    """A headless chromium; -> playwright Browser."""
    exe = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
