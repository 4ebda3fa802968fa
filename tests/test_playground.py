"""The playground page in a real headless Chromium (Debian's, driven by playwright): it loads, streams a
completion with highlighting, and holds a multi-turn conversation. Screenshots go to tests/artifacts/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serving import KEY, MODEL, alone, running  # noqa: F401

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
pytestmark = pytest.mark.slow


@pytest.fixture
def page(tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (scripts/install-system-deps.sh installs it)")
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=CHROMIUM, headless=True, viewport={"width": 1280, "height": 900},
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        try:
            yield context.new_page()
        finally:
            context.close()


def test_playground_streams_highlighted_code(page, served_generator):
    ARTIFACTS.mkdir(exist_ok=True)
    with running(served_generator) as srv:
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(srv.url + "/")
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_function(f"document.getElementById('model').textContent === {MODEL!r}")

        prompt = "def fibonacci(n):\n    "
        page.fill("#prompt", prompt)
        page.fill("#max_tokens", "12")
        page.fill("#temperature", "0")
        page.fill("#stop", "")
        page.click("#run")
        page.wait_for_function("document.getElementById('status').textContent.includes('tokens in')")
        [expected] = alone(served_generator, prompt, max_new_tokens=12)
        assert page.inner_text("#output") == prompt + expected.text
        assert page.inner_text("#output .tok-keyword") == "def"  # highlighted
        assert page.inner_text("#output .tok-defname") == "fibonacci"
        assert "12 tokens in" in page.inner_text("#status")
        page.screenshot(path=str(ARTIFACTS / "playground-complete.png"), full_page=True)

        page.click("#tab-chat")
        for spec in ("Assign the list [3, 1, 2] to xs.", "Sort xs."):
            page.fill("#spec", spec)
            page.click("#send")
            page.wait_for_function("document.getElementById('status').textContent.includes('tokens in')")
            page.evaluate("document.getElementById('status').textContent = ''")
        assert page.locator("#turns li").count() == 2
        assert page.inner_text("#turns li:nth-child(2) .spec") == "Sort xs."
        page.click("details summary")
        assert page.inner_text("#program").startswith("# Import libraries.\n\nimport numpy as np\n\n# Assign")
        page.screenshot(path=str(ARTIFACTS / "playground-chat.png"), full_page=True)

        page.fill("#api-key", "wrong")
        page.dispatch_event("#api-key", "change")
        page.click("#tab-complete")
        page.click("#run")
        page.wait_for_function("document.getElementById('status').classList.contains('error')")
        assert page.inner_text("#status") == "invalid API key"
        assert not errors, errors
        assert all(url.startswith(srv.url) for url in requests), "the page fetched something from outside"
