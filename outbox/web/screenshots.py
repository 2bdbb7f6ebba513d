"""The README's screenshots of the dashboard: ``python -m outbox.web.screenshots docs/``.

Seeds a plausible last hour into a SQLite database of its own, in a temporary folder, serves it
with ``outbox web --write`` started in that folder (so the page names the database
``sqlite:///outbox.db``, never a temporary path), drives Debian's headless chromium through it and
saves ``dashboard.png`` and ``dashboard-dead.png`` into the folder given. Before saving, it checks
that the page shows what was seeded (every bar of the chart is the count ``outbox.admin`` gives
for its minute) and nothing of the machine it ran on: a screenshot of a broken page is not saved.

The tests never write these files (they write only to temporary folders); this command is how
they are made. It needs selenium (in the ``dev`` extra) and ``apt-get install chromium
chromium-driver``. Exit 0 when the files are written, 1 when a check failed, 2 when something it
needs is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from .. import admin, migrate
from ..database import create_engine
from ..enqueue import OutboxEvent, enqueue_many
from ..schema import EVENT_COLUMNS, dead_table, outbox_table, published_table

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: Headless, as root in a container, and silent: no first-run UI, no background requests (the
#: machine reaches only package registries), no QUIC, no component updates or sync. The browser
#: tests (tests/plugins/browser.py) start chromium with these too: one list, so the screenshots
#: and the tests run the same browser.
HEADLESS_CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # /dev/shm is small in containers; a browser that runs out of it crashes.
    "--disable-dev-shm-usage",
)
#: No scrollbars in the README's images.
CHROMIUM_FLAGS = (*HEADLESS_CHROMIUM_FLAGS, "--hide-scrollbars")
WINDOW = (1280, 1000)
#: What the page calls the database: the relative URL ``outbox web`` is started with.
DATABASE_URL = "sqlite:///outbox.db"
SHOTS = ("dashboard.png", "dashboard-dead.png")
#: Generous: nothing here races a timer, a wait only fails when something is broken.
WAIT_SECONDS = 30.0


class ScreenshotError(RuntimeError):
    """The page did not show what was seeded (or nothing showed at all)."""


class ToolMissing(ScreenshotError):
    """Something the command needs is not installed (selenium, chromium, chromedriver)."""


def seed_an_hour(engine: sa.Engine, table: sa.Table, now: dt.datetime) -> dict[str, int]:
    """A plausible last hour: a wave of orders, retries in a bad patch, a few refusals, some
    events still waiting; returns the totals the chart must show (published, retried, dead)."""
    plan: list[dict[str, Any]] = []
    for minute in range(4, 58):  # whole minutes well inside the window, whatever the second
        at = now - dt.timedelta(minutes=minute, seconds=20)
        wave = 18 + 12 * math.sin(minute / 7) + (25 if 20 <= minute <= 24 else 0)
        for n in range(int(wave)):
            retried = 20 <= minute <= 24 and n % 4 == 0
            plan.append({"status": "published", "published_at": at, "error_at": retried})
        if minute in (21, 22, 23, 40):
            plan.append({"status": "dead", "published_at": None, "error_at": True, "at": at})
    for _ in range(7):
        plan.append({"status": "pending", "published_at": None, "error_at": False})
    events = [
        OutboxEvent(
            "orders" if i % 3 else "invoices",
            "order-created" if i % 5 else "order-shipped",
            {"order": 1000 + i, "total": round(12.5 + i % 40 * 3.25, 2)},
        )
        for i in range(len(plan))
    ]
    with engine.begin() as conn:
        enqueue_many(conn, events, table=table)
        ids = list(conn.execute(sa.select(table.c.id).order_by(table.c.id)).scalars())
        conn.execute(
            sa.update(table)
            .where(table.c.id == sa.bindparam("row_id"))
            .values(
                created_at=sa.bindparam("new_created_at"),
                queued_at=sa.bindparam("new_created_at"),
                next_attempt_at=sa.bindparam("new_created_at"),
                attempts=sa.bindparam("new_attempts"),
                failures=sa.bindparam("new_failures"),
                published_at=sa.bindparam("new_published_at"),
                acknowledgement_id=sa.bindparam("new_ack"),
                last_error_status=sa.bindparam("new_error_status"),
                last_error_code=sa.bindparam("new_error_code"),
                last_error_message=sa.bindparam("new_error_message"),
                last_error_at=sa.bindparam("new_error_at"),
            ),
            [_row_values(row_id, step, now) for row_id, step in zip(ids, plan, strict=True)],
        )
        for status, target in (("published", published_table(table)), ("dead", dead_table(table))):
            moved = [i for i, step in zip(ids, plan, strict=True) if step["status"] == status]
            rows = sa.select(*(table.c[c] for c in EVENT_COLUMNS)).where(table.c.id.in_(moved))
            conn.execute(sa.insert(target).from_select(EVENT_COLUMNS, rows))
            conn.execute(sa.delete(table).where(table.c.id.in_(moved)))
    return {
        "published": sum(step["status"] == "published" for step in plan),
        "retried": sum(step["status"] == "published" and step["error_at"] for step in plan),
        "dead": sum(step["status"] == "dead" for step in plan),
    }


def _row_values(row_id: int, step: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    error_at = step.get("at", step["published_at"]) if step["error_at"] else None
    dead = step["status"] == "dead"
    created = (step.get("at") or step["published_at"] or now) - dt.timedelta(seconds=3)
    failed = error_at is not None
    return {
        "row_id": row_id,
        "new_created_at": created,
        "new_attempts": 0 if step["status"] == "pending" else 1 + failed,
        "new_failures": int(dead),
        "new_published_at": step["published_at"],
        "new_ack": f"ack-{row_id}" if step["published_at"] else None,
        "new_error_status": (413 if dead else 503) if failed else None,
        "new_error_code": ("payload_too_large" if dead else "backpressure") if failed else None,
        "new_error_message": (
            ("Event payload size exceeds limit" if dead else "try again later") if failed else None
        ),
        "new_error_at": error_at,
    }


@contextlib.contextmanager
def dashboard(folder: Path) -> Iterator[str]:
    """``outbox web --write`` for ``folder/outbox.db``, started in ``folder`` with the database
    named by its relative URL and an environment without any outbox or Sockudo setting; its URL.
    Stopped on the way out."""
    port = _free_port()
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OUTBOX_", "SOCKUDO_"))
    }
    outbox = [sys.executable, "-m", "outbox", "--database-url", DATABASE_URL, "web", "--write"]
    log = folder / "web.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [*outbox, "--port", str(port)],
            cwd=folder,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_health(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ScreenshotError(f"outbox web exited ({process.returncode}): {log.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz", timeout=2.0, trust_env=False).status_code == 200:
                return
        time.sleep(0.1)
    raise ScreenshotError(f"outbox web did not answer within {WAIT_SECONDS:.0f} s")


def check_tools(chromium: Path = CHROMIUM, chromedriver: Path = CHROMEDRIVER) -> None:
    """Raise :class:`ToolMissing`, saying how to install it, when selenium, chromium or
    chromedriver is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        raise ToolMissing(
            "the screenshots need selenium: pip install -e '.[dev]' (or pip install selenium)"
        ) from None
    missing = [str(p) for p in (chromium, chromedriver) if not os.access(p, os.X_OK)]
    if missing:
        raise ToolMissing(
            f"{' and '.join(missing)} not found: apt-get install chromium chromium-driver"
        )


@contextlib.contextmanager
def chromium(chromium: Path = CHROMIUM, chromedriver: Path = CHROMEDRIVER) -> Iterator[Any]:
    """Debian's headless chromium on a fresh profile (a Selenium ``WebDriver``); quit after."""
    check_tools(chromium, chromedriver)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="outbox-chromium-") as profile:
        options = Options()
        options.binary_location = str(chromium)
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(str(chromedriver)), options=options)
        try:
            driver.set_window_size(*WINDOW)
            driver.set_page_load_timeout(WAIT_SECONDS)
            yield driver
        finally:
            driver.quit()


def capture(
    driver: Any,
    url: str,
    engine: sa.Engine,
    table: sa.Table,
    totals: dict[str, int],
    out: Path,
    hidden: Sequence[str] = (),
) -> list[Path]:
    """Save the README's screenshots of the dashboard at ``url`` into ``out``, once the page
    shows the seeded ``totals`` (checked against ``outbox.admin``) and none of ``hidden`` (the
    temporary folder, for one): :class:`ScreenshotError` otherwise, and nothing is saved."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    def wait(condition: Any, what: str) -> Any:
        try:
            return WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.05).until(condition)
        except Exception as exc:  # selenium's TimeoutException, or the page's own error
            raise ScreenshotError(f"timed out waiting for {what}") from exc

    driver.get(url)
    wait(lambda d: d.execute_script("return document.body.dataset.updates"), "the chart")
    drawn = driver.execute_script(
        "const d = document.getElementById('throughput').dataset;"
        "return {published: d.published, retried: d.retried, dead: d.dead};"
    )
    if drawn != {name: str(count) for name, count in totals.items()}:
        raise ScreenshotError(f"the chart shows {drawn}, not the seeded {totals}")
    bars = driver.execute_script(
        "return [...document.querySelectorAll('#throughput g.bucket')]"
        ".map(g => [g.dataset.start, g.querySelector('title').textContent]);"
    )
    since = dt.datetime.fromisoformat(bars[0][0])
    with engine.connect() as conn:
        buckets = admin.throughput(conn, table, since, 60, since + dt.timedelta(minutes=60))
    expected = [f"{b.published} published, {b.retried} retried, {b.dead} dead" for b in buckets]
    if [title.split(" UTC: ")[1] for _, title in bars] != expected:
        raise ScreenshotError("a bar of the chart is not the count outbox.admin gives")
    _check_shown(driver, hidden)
    out.mkdir(parents=True, exist_ok=True)
    saved = [out / SHOTS[0]]
    driver.save_screenshot(str(saved[0]))

    driver.get(f"{url}/?error=413")
    first = wait(lambda d: d.find_elements(By.CSS_SELECTOR, "tbody.event"), "the dead list")[0]
    first.find_element(By.CSS_SELECTOR, "input[name=ids]").click()
    first.find_element(By.TAG_NAME, "summary").click()
    driver.execute_script(
        "document.getElementById('dead-heading').scrollIntoView({block: 'start'});"
    )
    if driver.find_element(By.ID, "matched").text != str(totals["dead"]):
        raise ScreenshotError("the dead list does not count the seeded dead events")
    _check_shown(driver, hidden)
    saved.append(out / SHOTS[1])
    driver.save_screenshot(str(saved[1]))
    return saved


def _check_shown(driver: Any, hidden: Sequence[str]) -> None:
    from selenium.webdriver.common.by import By

    label = driver.find_element(By.CSS_SELECTOR, "header .database").text
    if label != DATABASE_URL:
        raise ScreenshotError(f"the page names the database {label!r}, not {DATABASE_URL!r}")
    source = driver.page_source
    for text in hidden:
        if text and text in source:
            raise ScreenshotError(f"the page shows {text!r}")


def take(
    out: Path, chromium_path: Path = CHROMIUM, chromedriver: Path = CHROMEDRIVER
) -> list[Path]:
    """Everything the command does: a seeded database in a temporary folder, the dashboard
    served for it, the screenshots saved into ``out``; the folder is removed afterwards."""
    check_tools(chromium_path, chromedriver)  # before any work
    with tempfile.TemporaryDirectory(prefix="outbox-screenshots-") as work:
        folder = Path(work)
        table = outbox_table()
        engine = create_engine(f"sqlite:///{folder / 'outbox.db'}")
        try:
            migrate.upgrade(engine)
            totals = seed_an_hour(engine, table, dt.datetime.now(dt.UTC))
            with dashboard(folder) as url, chromium(chromium_path, chromedriver) as driver:
                hidden = [str(folder), tempfile.gettempdir() + os.sep]
                return capture(driver, url, engine, table, totals, out, hidden)
        finally:
            engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m outbox.web.screenshots",
        description="Make the README's screenshots of the dashboard (docs/dashboard*.png) from a "
        "seeded database of its own, in Debian's headless chromium.",
    )
    parser.add_argument("directory", type=Path, help="where to save them (the README's: docs/)")
    parser.add_argument("--chromium", type=Path, default=CHROMIUM)
    parser.add_argument("--chromedriver", type=Path, default=CHROMEDRIVER)
    args = parser.parse_args(argv)
    try:
        saved = take(args.directory, args.chromium, args.chromedriver)
    except ScreenshotError as exc:
        print(f"screenshots: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ToolMissing) else 1
    for path in saved:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
