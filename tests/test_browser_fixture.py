"""The ``browser`` fixture (tests/plugins/browser.py): a real chromium, or a clear failure."""

from __future__ import annotations

from pathlib import Path

import pytest
from selenium.webdriver.common.by import By

from tests.plugins.browser import BrowserMissing, find_browser, wait_until


def test_a_missing_browser_is_named_with_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(BrowserMissing) as missing:
        find_browser(tmp_path / "chromium", tmp_path / "chromedriver")
    message = str(missing.value)
    assert str(tmp_path / "chromium") in message and str(tmp_path / "chromedriver") in message
    assert "apt-get install chromium chromium-driver" in message


def test_a_missing_browser_fails_the_test_and_never_skips_it(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        from pathlib import Path

        import pytest

        import tests.plugins.browser as plugin

        pytest_plugins = ["tests.plugins.browser"]


        @pytest.fixture(autouse=True)
        def no_chromium(monkeypatch):
            monkeypatch.setattr(plugin, "CHROMIUM", Path("/nonexistent/chromium"))
        """
    )
    pytester.makepyfile("def test_page(browser):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*/nonexistent/chromium not found*apt-get install chromium*"])


@pytest.mark.browser
def test_the_browser_runs_the_page_script(browser, tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text(
        "<p id=out>waiting</p>"
        "<script>setTimeout(() => { out.textContent = navigator.userAgent; }, 50)</script>"
    )
    browser.get(page.as_uri())
    agent = wait_until(
        browser,
        lambda b: (text := b.find_element(By.ID, "out").text) != "waiting" and text,
        "the script to run",
    )
    assert "HeadlessChrome" in agent
