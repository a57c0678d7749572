"""Browser fixtures: Debian's chromium driven by Playwright for Python, one browser per module.

The tests skip (with the reason) where playwright or chromium is missing; CI installs both.
`playwright install` (its own browser download) is not used: the system chromium is launched.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "web"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def _chromium() -> str | None:
    found = os.environ.get("IMAGEGEN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return found if found and os.access(found, os.X_OK) else None


# Module scope, not session: while Playwright's sync API is running it owns an asyncio loop in this
# thread, so tests elsewhere that call asyncio.run() must not run while the browser is open.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install the 'test' extra)"
    )
    executable = _chromium()
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install chromium, or set IMAGEGEN_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class PageProbe:
    """A page plus what it said: console errors, uncaught exceptions, and every request it sent."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.requests: list[Any] = []
        page.on(
            "console",
            lambda message: (
                message.type in ("error", "warning") and self.errors.append(f"console {message.type}: {message.text}")
            ),
        )
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("request", lambda request: self.requests.append(request))

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        # The whole page, by growing the viewport to it and back. Chromium's own full_page shot
        # restores the scroll position late, so a click right after it could land where its target
        # used to be.
        viewport = self.page.viewport_size
        scrolled = self.page.evaluate("[scrollX, scrollY]")
        self.page.evaluate("window.scrollTo(0, 0)")
        height = self.page.evaluate("document.documentElement.scrollHeight")
        self.page.set_viewport_size({"width": viewport["width"], "height": max(height, viewport["height"])})
        self.page.screenshot(path=str(path))
        self.page.set_viewport_size(viewport)
        self.page.evaluate("([x, y]) => window.scrollTo(x, y)", scrolled)
        return path

    def record_texts(self, selector: str) -> None:
        """Keep every text the matching elements ever show (progress can pass faster than a poll)."""
        self.page.evaluate(
            """(selector) => {
                window.__seen = [];
                new MutationObserver((records) => {
                    for (const record of records) {
                        const target = record.target.nodeType === 1 ? record.target : record.target.parentElement;
                        if (target && target.matches(selector)) {
                            // Setting textContent inserts a new Text node: its data is the text shown then.
                            for (const added of record.addedNodes) window.__seen.push(added.textContent);
                            continue;
                        }
                        for (const added of record.addedNodes) {
                            if (added.nodeType !== 1) continue;
                            for (const node of added.querySelectorAll(selector)) window.__seen.push(node.textContent);
                        }
                    }
                }).observe(document.body, {subtree: true, childList: true, characterData: true});
            }""",
            selector,
        )

    def seen_texts(self) -> list[str]:
        return self.page.evaluate("window.__seen")

    def assert_clean(self) -> None:
        """No console error, no uncaught exception, and nothing fetched from anywhere but the
        service (no CDN: the page works offline)."""
        assert self.errors == [], self.errors
        origin = "/".join(self.page.url.split("/")[:3]) + "/"
        elsewhere = [r.url for r in self.requests if not r.url.startswith((origin, "blob:", "data:"))]
        assert elsewhere == [], elsewhere


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    """open_page(url, viewport=...) -> PageProbe on a fresh browser context (its own session storage)."""
    contexts: list[Any] = []

    def open_(url: str, *, viewport: dict[str, int] | None = None, **options: Any) -> PageProbe:
        context = browser.new_context(viewport=viewport or {"width": 1280, "height": 900}, **options)
        context.set_default_timeout(15_000)
        contexts.append(context)
        probe = PageProbe(context.new_page())
        probe.page.goto(url)
        return probe

    yield open_
    for context in contexts:
        context.close()
