"""The dashboard in a real browser (Debian's headless chromium), against a real database.

``outbox web`` and ``python worker.py`` run as processes, the worker publishing to the
Sockudo-faithful test server. The page must show every state, follow a draining worker without
being reloaded, replay dead events (dry run first) until they are published, show event text that
is markup as text without running it, log a browser in with the token, list the pending rows,
delete a dead event and skip a parked key. The README's screenshots (docs/dashboard*.png) are made
by their own command, ``python -m outbox.web.screenshots docs/``, which one test runs into a
temporary folder: no test writes a file of the repository (the ``browser`` fixture checks).
"""

from __future__ import annotations

import datetime as dt
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from outbox import admin, enqueue
from outbox.testing.server import TestServer
from tests.helpers.drivers import park_in
from tests.helpers.waiting import wait_until
from tests.outbox_rows import T, add, add_dead, add_in_flight, add_published, row, set_row
from tests.plugins.browser import changed_files, tracked_files
from tests.plugins.processes import Child, Spawn, child_environment

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])  # page behaviour, not the database


def counts(page: WebDriver) -> dict[str, str]:
    """The state counts the page shows now."""
    return page.execute_script(
        "return Object.fromEntries(['pending', 'in_flight', 'published', 'dead']"
        ".map(s => [s, document.getElementById('count-' + s).textContent]));"
    )


def chart(page: WebDriver) -> dict[str, str]:
    """The chart's totals over the hour and its number of bars, as drawn."""
    return page.execute_script(
        "const d = document.getElementById('throughput').dataset;"
        "return {published: d.published, retried: d.retried, dead: d.dead, buckets: d.buckets};"
    )


def updates(page: WebDriver) -> int:
    return int(page.execute_script("return document.body.dataset.updates || '0'"))


def start_worker(spawn: Spawn, database_url: str, server: TestServer) -> Child:
    env = child_environment(
        OUTBOX_DATABASE_URL=database_url,
        SOCKUDO_URL=server.url,
        OUTBOX_POLL_INTERVAL="0.1",
        OUTBOX_BACKOFF_MIN="0.05",
        OUTBOX_BACKOFF_MAX="0.2",
    )
    return spawn("worker", [sys.executable, "worker.py"], env, REPO)


def statuses(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return admin.status(conn, T, errors=0).counts


def test_counts_and_chart_follow_a_draining_worker(
    database_url, engine, browser, serve_dashboard, spawn
):
    now = dt.datetime.now(dt.UTC)
    for n in range(3):
        add(engine, "orders", "created", {"n": n})
    add(engine, "orders", "created", {"blob": "x" * 2000})  # over this server's limit
    add_in_flight(engine)  # leased until long after the test: it stays in flight
    for _ in range(2):
        add_published(engine, published_at=now - dt.timedelta(minutes=10))
    add_dead(engine, last_error_at=now - dt.timedelta(minutes=5))
    served = serve_dashboard(database_url, "--refresh", "1")  # the shortest there is

    browser.get(served.url)
    wait_until(lambda: updates(browser) >= 1, "the first live update")
    assert counts(browser) == {"pending": "4", "in_flight": "1", "published": "2", "dead": "1"}
    assert chart(browser) == {"published": "2", "retried": "0", "dead": "1", "buckets": "60"}
    assert browser.find_element(By.ID, "oldest-pending").text.endswith(" s")
    browser.execute_script("window.sameDocument = true;")

    # The first request (the batch of four) fails before any key is taken: all four are
    # retried alone; three are published, the fourth is refused (413) and dead.
    with TestServer(max_payload_kb=1) as server:
        server.fail_next(1, status=500, stage="received")
        worker = start_worker(spawn, database_url, server)
        final = {"pending": 0, "in_flight": 1, "published": 5, "dead": 2}
        wait_until(lambda: statuses(engine) == final, "the worker to drain the outbox")
        drained = {"pending": "0", "in_flight": "1", "published": "5", "dead": "2"}
        drawn = {"published": "5", "retried": "3", "dead": "2", "buckets": "60"}
        wait_until(
            lambda: counts(browser) == drained and chart(browser) == drawn,
            "the page to show the drained outbox",
        )
        # Updated in place: the same document all along, never reloaded.
        assert browser.execute_script("return window.sameDocument") is True
        assert server.delivered_count("orders") == 3
        worker.check_alive()


def summary_requests(page: WebDriver) -> int:
    """The summary requests this document has sent so far (resource timing entries)."""
    return page.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(e => e.name.includes('/api/summary')).length;"
    )


#: What the page's script could be handed as its refresh (ms): 25 days (past a timer's 2**31 - 1
#: ms, so it fires at once), infinity, a negative and a tiny value (both fire at once), text.
ODD_REFRESH_MS = ["2160000000", "Infinity", "-5", "1", "soon"]


@sqlite_only
def test_no_refresh_the_page_is_handed_makes_it_hammer_the_server(
    database_url, browser, serve_dashboard
):
    """`outbox web` keeps --refresh within 1 to 3600 s; the script keeps whatever it is handed
    within the same bounds. Each odd value is handed to a fresh copy of the script, as if the
    server had written it into the page, and the summary requests of the next seconds counted."""
    served = serve_dashboard(database_url, "--refresh", "3600")
    window = 2.5
    for odd in ODD_REFRESH_MS:
        browser.get(served.url)
        wait_until(lambda: updates(browser) >= 1, "the page's first live update")
        browser.execute_script(
            "performance.setResourceTimingBufferSize(100000);"
            "document.body.dataset.refreshMs = arguments[0];"
            "const copy = document.createElement('script');"
            "copy.src = '/static/dashboard.js?copy';"
            "document.head.appendChild(copy);",
            odd,
        )
        time.sleep(window)
        sent = summary_requests(browser)
        # The page's first update and the copy's (it ran), then at most one a second from the
        # copy at its shortest refresh; a timer that fires at once sends hundreds.
        assert 2 <= sent <= 2 + window + 1.5, (odd, sent)


def test_replay_dead_events_from_the_page_and_see_them_published(
    database_url, engine, browser, serve_dashboard, sockudo_server, spawn
):
    first = add_dead(engine, "orders", "order-created")
    ticked = [add_dead(engine, "audit", "logged") for _ in range(2)]
    keys = {row_id: row(engine, row_id).idempotency_key for row_id in [first, *ticked]}
    served = serve_dashboard(database_url, "--write")
    worker = start_worker(spawn, database_url, sockudo_server)

    # One event, with a fresh key (the default).
    browser.get(served.url)
    browser.find_element(By.CSS_SELECTOR, f'tbody[data-row-id="{first}"] .replay-one').click()
    [dry_run] = wait_until(lambda: browser.find_elements(By.ID, "dry-run"), "dry run")
    assert dry_run.get_attribute("data-count") == "1"
    assert row(engine, first).status == "dead"  # the dry run changed nothing
    assert browser.find_element(By.CSS_SELECTOR, "input[name=key][value=fresh]").is_selected()
    browser.find_element(By.ID, "confirm-replay").click()
    [done] = wait_until(lambda: browser.find_elements(By.ID, "replayed"), "the replay")
    assert done.get_attribute("data-count") == "1"
    wait_until(lambda: row(engine, first).status == "published", "it to be published")
    browser.find_element(By.LINK_TEXT, f"follow row {first}").click()
    record = browser.find_element(By.CSS_SELECTOR, f'article.record[data-row-id="{first}"]')
    assert record.get_attribute("data-status") == "published"
    assert "queued again (replayed)" in record.text and "published (acknowledgement" in record.text
    [delivery] = sockudo_server.deliveries("orders")
    assert delivery.idempotency_key == row(engine, first).idempotency_key != keys[first]

    # The ticked ones, keeping their keys.
    browser.get(served.url)
    browser.find_element(By.ID, "tick-all").click()
    browser.find_element(By.ID, "replay-ticked").click()
    [dry_run] = wait_until(lambda: browser.find_elements(By.ID, "dry-run"), "dry run")
    assert dry_run.get_attribute("data-count") == "2"
    browser.find_element(By.CSS_SELECTOR, "input[name=key][value=keep]").click()
    browser.find_element(By.ID, "confirm-replay").click()
    [done] = wait_until(lambda: browser.find_elements(By.ID, "replayed"), "the replay")
    assert done.get_attribute("data-count") == "2"
    wait_until(
        lambda: all(row(engine, i).status == "published" for i in ticked),
        "the ticked events to be published",
    )
    assert sorted(d.idempotency_key for d in sockudo_server.deliveries("audit")) == sorted(
        keys[i] for i in ticked
    )
    browser.get(served.url)
    assert browser.find_element(By.CSS_SELECTOR, "p.empty").text == "No dead event."
    worker.check_alive()


@sqlite_only
def test_event_text_that_is_markup_is_shown_as_text_and_never_runs(
    database_url, engine, browser, serve_dashboard
):
    script = "<script>window.pwned = 'data'</script>"
    image = "<img src=x onerror=\"window.pwned = 'event'\">"
    vector = "<svg onload=\"window.pwned = 'channel'\"></svg>"
    error = "<img src=x onerror=\"window.pwned = 'error'\"><b>refused</b>"
    dead = add_dead(engine, "orders", image, data=script, last_error_message=error)
    # Channel names are checked at enqueue; a row changed behind the outbox's back is not.
    set_row(engine, dead, channel=vector, last_error_code="<i>code</i>")
    add_published(engine, data=script, acknowledgement_id=image, message_serial=vector)
    served = serve_dashboard(database_url, "--write")

    def assert_inert(page: WebDriver, svgs: int) -> None:
        assert page.execute_script("return typeof window.pwned") == "undefined"
        found = page.execute_script(
            "const main = document.querySelector('main');"
            "return [main.querySelectorAll('script, img, b, i').length,"
            " main.querySelectorAll('svg').length];"
        )
        assert found == [0, svgs], "markup from an event became elements"

    browser.get(served.url)
    event = browser.find_element(By.CSS_SELECTOR, f'tbody[data-row-id="{dead}"]')
    event.find_element(By.TAG_NAME, "summary").click()
    assert event.find_element(By.CSS_SELECTOR, "td.event-name").text == image
    assert event.find_element(By.CSS_SELECTOR, "td.channel").text == vector
    assert event.find_element(By.CSS_SELECTOR, "td.error").text == f"413 <i>code</i>: {error}"
    assert event.find_element(By.CSS_SELECTOR, "pre.payload").text == script
    assert_inert(browser, svgs=1)  # the chart alone

    browser.find_element(By.ID, "search-q").send_keys("orders\n")
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "article.record"), "hits")
    published = browser.find_element(By.CSS_SELECTOR, 'article.record[data-status="published"]')
    assert image in published.text and vector in published.text and script in published.text
    assert_inert(browser, svgs=0)

    browser.get(served.url)
    browser.find_element(By.CSS_SELECTOR, f'tbody[data-row-id="{dead}"] .replay-one').click()
    wait_until(lambda: browser.find_elements(By.ID, "dry-run"), "the dry run")
    sample = browser.find_element(By.CSS_SELECTOR, f'tr[data-row-id="{dead}"]')
    assert image in sample.text and vector in sample.text
    assert_inert(browser, svgs=0)
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


@sqlite_only
def test_a_browser_logs_in_with_the_token(database_url, engine, browser, serve_dashboard):
    token = "browser-token-" + "k" * 20
    add_dead(engine)
    served = serve_dashboard(database_url, env={"OUTBOX_WEB_TOKEN": token})
    browser.get(served.url)
    assert browser.current_url == f"{served.url}/login"
    browser.find_element(By.ID, "token").send_keys(token + "-wrong")
    browser.find_element(By.ID, "login").click()
    wait_until(lambda: browser.find_elements(By.ID, "login-refused"), "the refusal")
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "login").click()
    wait_until(lambda: browser.find_elements(By.ID, "count-dead"), "the dashboard")
    assert counts(browser)["dead"] == "1"
    wait_until(lambda: updates(browser) >= 1, "a live update with the session cookie")
    # HttpOnly: the page's scripts cannot read the session.
    assert browser.execute_script("return document.cookie") == ""
    browser.find_element(By.CSS_SELECTOR, "form.logout button").click()
    wait_until(lambda: browser.find_elements(By.ID, "token"), "the login form again")


# -- the operator's lists and actions (#21) -------------------------------------------------------


@sqlite_only
def test_list_pending_delete_a_dead_event_and_skip_a_parked_key_from_the_page(
    database_url, engine, browser, serve_dashboard
):
    """A click-through: the pending count leads to the pending rows; a dead event is deleted
    after its dry run; a parked key goes on without its dead head after a preview; a search's
    dead row is replayed from the results."""
    waiting = [add(engine, "orders", "created") for _ in range(3)]
    doomed = add_dead(engine, "audit", "logged")
    kept = add_dead(engine, "audit", "logged")
    with engine.begin() as conn:
        for n in range(3):
            enqueue(conn, "orders", "step", {"n": n}, ordering_key="order-7")
        head = conn.execute(sa.select(sa.func.max(T.c.id))).scalar_one() - 2
    set_row(engine, head, status="dead", last_error_code="payload_too_large")
    with engine.begin() as conn:
        park_in(conn, T, [head])
    served = serve_dashboard(database_url, "--write")

    # The pending count leads to the pending rows, oldest first, with what each waits for.
    browser.get(served.url)
    browser.find_element(By.ID, "card-pending").click()
    heading = wait_until(lambda: browser.find_elements(By.ID, "queue-heading"), "list")
    assert heading[0].get_attribute("data-count") == "5"
    listed = browser.find_elements(By.CSS_SELECTOR, "#queue tbody tr")
    assert [int(r.get_attribute("data-row-id")) for r in listed] == [*waiting, head + 1, head + 2]
    assert "due now" in listed[0].text
    assert "behind an earlier event of its key" in listed[3].text and "order-7" in listed[3].text

    # A dead event deleted, after its dry run.
    browser.get(served.url)
    browser.find_element(By.CSS_SELECTOR, f'tbody[data-row-id="{doomed}"] .delete-one').click()
    [dry_run] = wait_until(lambda: browser.find_elements(By.ID, "dry-run"), "dry run")
    assert dry_run.get_attribute("data-count") == "1"
    assert row(engine, doomed).status == "dead"  # the dry run changed nothing
    browser.find_element(By.ID, "confirm-delete").click()
    [done] = wait_until(lambda: browser.find_elements(By.ID, "deleted"), "deletion")
    assert done.get_attribute("data-count") == "1"
    assert statuses(engine)["dead"] == 2  # the other audit event and the parked head

    # The parked key goes on without its head, after a preview.
    browser.get(served.url)
    browser.find_element(By.CSS_SELECTOR, "#parked-keys .skip-key").click()
    [preview] = wait_until(lambda: browser.find_elements(By.ID, "skip-preview"), "it")
    assert preview.get_attribute("data-waiting") == "2" and "order-7" in preview.text
    browser.find_element(By.ID, "confirm-skip").click()
    [skipped] = wait_until(lambda: browser.find_elements(By.ID, "skipped"), "the skip")
    assert skipped.get_attribute("data-count") == "1"
    browser.get(served.url)
    assert not browser.find_elements(By.ID, "parked-keys")
    assert row(engine, head).status == "dead"  # the head stays dead

    # A search's dead row replayed from the results.
    browser.find_element(By.ID, "search-q").send_keys("audit\n")
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "tr.result"), "hits")
    browser.find_element(By.ID, "tick-all").click()
    browser.find_element(By.ID, "replay-ticked").click()
    [dry_run] = wait_until(lambda: browser.find_elements(By.ID, "dry-run"), "dry run")
    assert dry_run.get_attribute("data-count") == "1"
    browser.find_element(By.ID, "confirm-replay").click()
    wait_until(lambda: browser.find_elements(By.ID, "replayed"), "the replay")
    assert row(engine, kept).status == "pending"
    browser.find_element(By.LINK_TEXT, "back to the search").click()
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "tr.result"), "hits")
    assert [
        r.get_attribute("data-status") for r in browser.find_elements(By.CSS_SELECTOR, "tr.result")
    ] == ["pending"]
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


# -- the README's screenshots -------------------------------------------------------------------


def test_the_readme_screenshots_are_made_by_their_own_command(tmp_path):
    """`python -m outbox.web.screenshots DIR` seeds an hour, serves it and saves the README's
    screenshots into DIR, after checking the page shows what was seeded and no temporary path
    (it raises otherwise). It writes nothing else: no tracked file changes, docs/ included."""
    from outbox.web.screenshots import SHOTS

    before = tracked_files(REPO)
    shots = tmp_path / "shots"
    done = subprocess.run(
        [sys.executable, "-m", "outbox.web.screenshots", str(shots)],
        cwd=tmp_path,
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(shots / name) for name in SHOTS]
    for name in SHOTS:
        png = (shots / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, _height = struct.unpack(">II", png[16:24])
        assert width == 1280, (name, width)  # the README's width
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shots"]  # nothing else, here either
    assert changed_files(before, tracked_files(REPO)) == []


def test_the_screenshots_command_says_what_is_missing(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "outbox.web.screenshots",
            str(tmp_path / "shots"),
            "--chromium",
            str(tmp_path / "chromium"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"screenshots: error: {tmp_path / 'chromium'} not found: "
        "apt-get install chromium chromium-driver\n"
    )
    assert not (tmp_path / "shots").exists()
