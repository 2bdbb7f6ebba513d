"""The ``browser`` fixture (tests/plugins/browser.py): a real chromium, or a clear failure."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By

from tests.helpers.waiting import wait_until
from tests.plugins.browser import BrowserMissing, changed_files, find_browser, tracked_files


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
        lambda: (text := browser.find_element(By.ID, "out").text) != "waiting" and text,
        "the script to run",
    )
    assert "HeadlessChrome" in agent


def _git_repo(path: Path) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    (path / "docs").mkdir()
    (path / "docs" / "shot.png").write_bytes(b"old")
    (path / "notes.txt").write_text("kept")
    subprocess.run(["git", "-C", str(path), "add", "docs/shot.png"], check=True)
    return path


def test_tracked_files_and_what_changed(tmp_path: Path) -> None:
    repo = _git_repo(tmp_path / "repo")
    before = tracked_files(repo)
    assert list(before) == ["docs/shot.png"]  # untracked files are not watched
    (repo / "notes.txt").write_text("changed")
    assert changed_files(before, tracked_files(repo)) == []
    (repo / "docs" / "shot.png").write_bytes(b"new!")
    assert changed_files(before, tracked_files(repo)) == ["docs/shot.png"]
    assert tracked_files(tmp_path / "not-a-repo") == {}


@pytest.mark.browser
def test_a_browser_test_that_writes_a_tracked_file_fails(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """As the screenshot test once did, rewriting docs/*.png on every run."""
    repo = _git_repo(tmp_path / "repo")
    pytester.makeconftest(
        f"""
        from pathlib import Path

        import pytest

        import tests.plugins.browser as plugin

        pytest_plugins = ["tests.plugins.browser"]


        @pytest.fixture(autouse=True)
        def watched(monkeypatch):
            monkeypatch.setattr(plugin, "REPO", Path({str(repo)!r}))
        """
    )
    pytester.makepyfile(
        f"""
        from pathlib import Path


        def test_screenshot(browser):
            browser.save_screenshot(str(Path({str(repo)!r}) / "docs" / "shot.png"))


        def test_elsewhere(browser, tmp_path):
            browser.save_screenshot(str(tmp_path / "shot.png"))
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*the test changed files of the repository: docs/shot.png. Tests write only to temporary*"]
    )
