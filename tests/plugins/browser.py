"""Fixture: a real headless browser, Debian's ``chromium`` driven through its ``chromedriver``.

Nothing is downloaded: both are the apt packages (``apt-get install chromium chromium-driver``,
which .ci/run does), and because Selenium is given the driver's path it never starts Selenium
Manager to look for one. A missing browser FAILS the test that asked for it, never skips it.

Tests take ``browser`` (a Selenium ``WebDriver`` on a fresh profile, quit afterwards) and wait for
the page as for anything else, with ``tests.helpers.waiting.wait_until``. When a test fails, the
browser's console and the page's text are printed with the test's report. A test that changed a
file of the repository (one git tracks, such as the README's screenshots in docs/) fails: tests
write only to temporary folders, and the screenshots are made by their own command,
``python -m outbox.web.screenshots docs/``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from outbox.web.screenshots import CHROMEDRIVER, CHROMIUM, HEADLESS_CHROMIUM_FLAGS
from tests.helpers.waiting import WAIT_SECONDS

#: The repository whose tracked files a browser test must leave alone.
REPO = Path(__file__).resolve().parents[2]
#: The screenshot command's headless flags (why each: outbox/web/screenshots.py), and a window
#: the dashboard's layout is tested at.
CHROMIUM_FLAGS = (*HEADLESS_CHROMIUM_FLAGS, "--window-size=1280,900")

_REPORT = pytest.StashKey[dict[str, pytest.TestReport]]()


class BrowserMissing(RuntimeError):
    """Debian's chromium or chromedriver is not installed."""


def find_browser(chromium: Path = CHROMIUM, chromedriver: Path = CHROMEDRIVER) -> tuple[Path, Path]:
    """The browser and its driver, or :class:`BrowserMissing` saying how to install them."""
    missing = [str(path) for path in (chromium, chromedriver) if not os.access(path, os.X_OK)]
    if missing:
        raise BrowserMissing(
            f"{' and '.join(missing)} not found: the browser tests need Debian's chromium and its "
            "driver (apt-get install chromium chromium-driver; .ci/run installs them). "
            "They never download a browser."
        )
    return chromium, chromedriver


def chromium_options(chromium: Path, profile: Path) -> Options:
    options = Options()
    options.binary_location = str(chromium)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    # Keep the console (console.log, uncaught errors, failed loads) for failure reports.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return options


def tracked_files(repo: Path) -> dict[str, tuple[int, int]]:
    """(modification time in ns, size) of every file git tracks in ``repo``; empty outside a git
    checkout (an unpacked sdist has nothing to protect)."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(repo), "ls-files", "-z"], capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    stats = {}
    for name in filter(None, listed.decode("utf-8", "surrogateescape").split("\0")):
        with contextlib.suppress(OSError):
            stat = (repo / name).stat()
            stats[name] = (stat.st_mtime_ns, stat.st_size)
    return stats


def changed_files(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> list[str]:
    """The tracked files written, created or removed between two :func:`tracked_files`."""
    return sorted(
        name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    item.stash.setdefault(_REPORT, {})[report.when] = report
    return report


@pytest.fixture
def browser(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebDriver]:
    """Headless chromium on a fresh profile; quit after the test."""
    try:
        chromium, chromedriver = find_browser(CHROMIUM, CHROMEDRIVER)
    except BrowserMissing as exc:
        missing = str(exc)
    else:
        missing = ""
    if missing:
        pytest.fail(missing, pytrace=False)
    workdir = tmp_path_factory.mktemp("chromium")
    driver_log = workdir / "chromedriver.log"
    service = Service(str(chromedriver), log_output=str(driver_log))
    try:
        driver = webdriver.Chrome(
            service=service, options=chromium_options(chromium, workdir / "profile")
        )
    except WebDriverException as exc:
        failure = (
            f"chromium did not start: {exc.msg}\n--- chromedriver log ---\n{_tail(driver_log)}"
        )
    else:
        failure = ""
    if failure:
        pytest.fail(failure, pytrace=False)
    driver.set_page_load_timeout(WAIT_SECONDS)  # a page load is a wait like any other
    before = tracked_files(REPO)
    try:
        yield driver
    finally:
        call = request.node.stash.get(_REPORT, {}).get("call")
        if call is not None and call.failed:
            _print_post_mortem(driver)
        driver.quit()
    changed = changed_files(before, tracked_files(REPO))
    if changed:
        pytest.fail(
            f"the test changed files of the repository: {', '.join(changed)}. Tests write only "
            "to temporary folders; the README's screenshots are made by "
            "python -m outbox.web.screenshots docs/",
            pytrace=False,
        )


def _print_post_mortem(driver: WebDriver) -> None:
    """What the page showed and logged, for the report of a failed test."""
    try:
        console = driver.get_log("browser")
        print(f"--- browser at {driver.current_url} ---")
        for entry in console:
            print(f"console {entry['level']}: {entry['message']}")
        print("--- page text ---")
        print(driver.find_element("tag name", "body").text)
    except WebDriverException as exc:
        print(f"(the browser could not be inspected: {exc.msg})")


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text if len(text) <= limit else "..." + text[-limit:]
