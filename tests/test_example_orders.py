"""The orders example end to end, in a real browser: API -> transaction -> outbox -> worker -> page.

examples/orders/app.py and ``python worker.py`` run as the processes its README starts, on a
migrated database (SQLite and PostgreSQL) and a real soketi; headless chromium opens the page and
pusher-js subscribes. What the API commits must appear on the page. A request that fails after it
enqueued rolls its transaction back, and its event must never arrive: committed events sent after
it arrive while it does not, and the outbox ends with only the committed events, all published.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from outbox.database import create_engine
from outbox.testing.soketi import SoketiServer, free_port
from outbox.testing.worker_process import WorkerProcess
from tests.helpers.waiting import wait_until
from tests.outbox_rows import EV
from tests.plugins.processes import Child, Spawn, child_environment

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "orders"


@dataclass(frozen=True)
class Shop:
    """The running example: an API client, the browser on its page, the database, the processes."""

    api: httpx.Client
    browser: WebDriver
    engine: sa.Engine
    app: Child
    worker: WorkerProcess


@pytest.fixture
def shop(
    database_url: str, soketi: SoketiServer, browser: WebDriver, spawn: Spawn, tmp_path: Path
) -> Iterator[Shop]:
    env = child_environment(OUTBOX_DATABASE_URL=database_url, SOCKUDO_URL=soketi.url)
    port = free_port()
    app = spawn("app", [sys.executable, str(EXAMPLE / "app.py"), "--port", str(port)], env, REPO)
    worker = WorkerProcess(
        database_url,
        soketi.url,
        tmp_path / "worker.log",
        command=[sys.executable, "worker.py"],
        cwd=REPO,
        env=env,
        poll_interval=0.2,
    ).start()
    url = f"http://127.0.0.1:{port}"
    app.wait_for_http(f"{url}/api/config")
    browser.get(url)
    # pusher-js has subscribed and the page has loaded the orders: from now on it misses nothing.
    wait_until(
        lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-subscribed"),
        "the page to subscribe to the orders channel",
    )
    engine = create_engine(database_url)
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=10.0) as api:
            yield Shop(api, browser, engine, app, worker)
        # Both ran throughout: a crash would explain a missing event better than the assertion.
        app.check_alive()
        worker.check_alive()
    finally:
        worker.close()
        engine.dispose()


def table(browser: WebDriver) -> dict[int, tuple[str, str, str]]:
    """The orders the page shows: id -> (customer, item, status)."""
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#orders tr')]"
        ".map(r => [...r.cells].slice(0, 4).map(c => c.textContent));"
    )
    return {int(r[0]): (r[1], r[2], r[3]) for r in rows}


def feed(browser: WebDriver) -> list[tuple[str, int]]:
    """The events the page received, sorted: (event name, order id)."""
    items = browser.execute_script(
        "return [...document.querySelectorAll('#feed li')]"
        ".map(li => [li.dataset.event, li.dataset.orderId]);"
    )
    return sorted((name, int(order_id)) for name, order_id in items)


def outbox_rows(engine: sa.Engine) -> list[tuple[str, str, str]]:
    """Every row of the outbox: (event, status, data)."""
    t = EV
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.event, t.c.status, t.c.data).order_by(t.c.id)).all()
    return [(event, str(status), data) for event, status, data in rows]


def settled(engine: sa.Engine, expected: int) -> list[tuple[str, str, str]] | None:
    """The outbox rows once ``expected`` rows exist and none is pending or in flight."""
    rows = outbox_rows(engine)
    if len(rows) >= expected and all(status in ("published", "dead") for _, status, _ in rows):
        return rows
    return None


def place(shop: Shop, customer: str, item: str, **params: Any) -> httpx.Response:
    return shop.api.post("/api/orders", json={"customer": customer, "item": item}, params=params)


@pytest.mark.browser
@pytest.mark.soketi
def test_committed_changes_appear_live_and_rolled_back_ones_never(shop: Shop) -> None:
    placed = place(shop, "Ada", "teapot")
    assert placed.status_code == 201, placed.text
    ada = placed.json()["id"]
    wait_until(
        lambda: table(shop.browser).get(ada) == ("Ada", "teapot", "placed"),
        "Ada's order on the page",
    )

    # Both fail after their event was enqueued: each transaction rolls back, the event with it.
    ghost = place(shop, "Ghost", "phantom", fail_after_enqueue="true")
    assert ghost.status_code == 500 and "rolled back" in ghost.json()["detail"]
    unshipped = shop.api.post(f"/api/orders/{ada}/ship", params={"fail_after_enqueue": "true"})
    assert unshipped.status_code == 500 and "rolled back" in unshipped.json()["detail"]

    # Committed after them: once these are on the page, the worker has drained past the others.
    grace_response = place(shop, "Grace", "kettle")
    assert grace_response.status_code == 201, grace_response.text
    grace = grace_response.json()["id"]
    shipped = shop.api.post(f"/api/orders/{ada}/ship")
    assert shipped.status_code == 200 and shipped.json()["version"] == 2, shipped.text
    expected_feed = sorted([("order-placed", ada), ("order-placed", grace), ("order-shipped", ada)])
    wait_until(
        lambda: set(expected_feed) <= set(feed(shop.browser)),
        "Grace's order and Ada's shipping on the page",
    )
    assert feed(shop.browser) == expected_feed
    assert table(shop.browser) == {
        ada: ("Ada", "teapot", "shipped"),
        grace: ("Grace", "kettle", "placed"),
    }
    page_text = shop.browser.find_element(By.TAG_NAME, "body").text
    assert "Ghost" not in page_text and "phantom" not in page_text
    # Nothing else is on its way: the outbox holds exactly the committed events, all published.
    rows = wait_until(lambda: settled(shop.engine, 3), "the worker to ack all")
    assert [(event, status) for event, status, _ in rows] == [
        ("order-placed", "published"),
        ("order-placed", "published"),
        ("order-shipped", "published"),
    ]
    assert not any("Ghost" in data for _, _, data in rows)


@pytest.mark.browser
@pytest.mark.soketi
@pytest.mark.parametrize("backend", ["sqlite"])  # the page's own controls; the API test covers both
def test_the_page_form_and_ship_button_work_and_show_a_rollback(shop: Shop) -> None:
    page = shop.browser

    def submit(customer: str, item: str, fail: bool) -> None:
        page.find_element(By.NAME, "customer").send_keys(customer)
        page.find_element(By.NAME, "item").send_keys(item)
        if page.find_element(By.ID, "fail").is_selected() != fail:
            page.find_element(By.ID, "fail").click()
        page.find_element(By.CSS_SELECTOR, "#new-order button[type=submit]").click()

    def result() -> tuple[str | None, str]:
        element = page.find_element(By.ID, "result")
        return element.get_attribute("data-ok"), element.text

    submit("Form", "mug", fail=True)
    wait_until(lambda: result()[0] == "false", "the failed request's answer")
    assert re.match(
        r"500: simulated failure after enqueue: the transaction was rolled back", result()[1]
    )
    page.find_element(By.NAME, "customer").clear()
    page.find_element(By.NAME, "item").clear()

    submit("Form", "mug", fail=False)
    wait_until(lambda: result()[0] == "true", "the committed request's answer")
    [order_id] = wait_until(lambda: list(table(page)), "the placed order on the page")
    assert table(page)[order_id] == ("Form", "mug", "placed")

    page.find_element(By.CSS_SELECTOR, f'tr[data-order-id="{order_id}"] button.ship').click()
    wait_until(lambda: table(page)[order_id][2] == "shipped", "the order shipped on the page")
    assert feed(page) == [("order-placed", order_id), ("order-shipped", order_id)]
    rows = wait_until(lambda: settled(shop.engine, 2), "the worker to ack all")
    assert [(event, status) for event, status, _ in rows] == [
        ("order-placed", "published"),
        ("order-shipped", "published"),
    ]


def test_the_vendored_pusher_js_is_the_published_file_its_readme_names() -> None:
    vendor = EXAMPLE / "static" / "vendor"
    readme = (vendor / "README.md").read_text()
    [(version, digest)] = re.findall(
        r"# Vendored: pusher-js (\S+).*?sha256\s+([0-9a-f]{64})\s+pusher\.min\.js", readme, re.S
    )
    script = (vendor / "pusher.min.js").read_bytes()
    assert hashlib.sha256(script).hexdigest() == digest
    assert f'const r="{version}"'.encode() in script  # the library's own VERSION constant
    licence = (vendor / "pusher-js.LICENCE").read_text()
    assert "Pusher" in licence and "Permission is hereby granted, free of charge" in licence
