"""End to end: application transactions -> outbox table -> ``python worker.py`` -> soketi -> browsers.

Everything here is real except Sockudo itself (soketi 1.6.1, a Pusher-compatible server from npm,
stands in for it; see outbox.testing.soketi): the application enqueues inside its own SQLite or PostgreSQL transactions,
the worker runs as the subprocess users run, configured by environment only, and WebSocket
subscribers receive what soketi broadcasts, authorised with our own ``authenticate`` and, on the
encrypted channel, opened with plain PyNaCl and the ``shared_secret`` the authorization returned.

soketi answers REST errors with HTTP 200 and the real code in the body; the last tests prove the
worker still tells a misconfiguration (wrong secret: nothing is dead-lettered, nothing is charged)
from an event the server refuses (too large: dead with soketi's reason, its batch mates delivered).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nacl.secret
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import enqueue
from outbox.sockudo import Sockudo
from outbox.testing.pusher_ws import PusherSubscriber, ReceivedEvent
from outbox.testing.soketi import SoketiServer
from outbox.testing.worker_process import WorkerProcess
from tests.outbox_rows import EV

pytestmark = [pytest.mark.soketi]

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
MASTER_KEY_B64 = base64.b64encode(bytes(range(100, 132))).decode("ascii")

PUBLIC = "orders"
PRIVATE = "private-orders"
ENCRYPTED = "private-encrypted-payments"

#: How long any single wait may take before the test fails (never reached when things work).
WAIT = 30.0
#: Quiet period after everything arrived: a duplicate or a rolled-back event would show up here.
QUIET = 1.0


# -- helpers ------------------------------------------------------------------------------------


def compact(value: Any) -> str:
    """What a subscriber must see for non-``str`` data: compact JSON, UTF-8 kept as is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Sent:
    """One committed (channel, event): ``data`` is exactly what the subscriber must read
    (for the encrypted channel: the plaintext inside the sealed envelope)."""

    channel: str
    event: str
    data: str


def worker_env(database_url: str, sockudo_url: str, server_batch_limit: int) -> dict[str, object]:
    """The settings of ``python worker.py`` (given to it as environment variables)."""
    return {
        "database_url": database_url,
        "sockudo_url": sockudo_url,
        "encryption_master_key_base64": MASTER_KEY_B64,
        "server_batch_limit": server_batch_limit,
        "batch_size": server_batch_limit,
        "poll_interval": 0.1,
        "backoff_min_seconds": 0.1,
        "backoff_max_seconds": 1,
        "misconfigured_retry_seconds": 0.5,
        "request_timeout": 5,
        "lease_seconds": 15,
        "shutdown_timeout": 10,
    }


@contextlib.contextmanager
def running_worker(settings: Mapping[str, object], log_path: Path) -> Iterator[WorkerProcess]:
    """``python worker.py`` as users run it: settings from the environment, log in a file."""
    worker = WorkerProcess(
        command=[sys.executable, "worker.py"], cwd=REPO, log_path=log_path, **settings
    )
    try:
        yield worker.start()
    finally:
        worker.close()


async def eventually(
    check: Callable[[], T | None], what: str, worker: WorkerProcess, timeout: float = WAIT
) -> T:
    """Poll ``check`` (off the event loop, so subscribers keep reading) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(check)
        if result:
            return result
        worker.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}; worker log:\n{worker.log_text()}"
            )
        await asyncio.sleep(0.05)


async def wait_for_all(
    sub: PusherSubscriber, channel: str, count: int, worker: WorkerProcess
) -> list[ReceivedEvent]:
    """Wait for ``count`` events on ``channel``, failing at once if the worker dies meanwhile."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            return await sub.wait_for(channel, count, timeout=0.5)
        except TimeoutError as exc:
            worker.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{exc} after {WAIT} s; worker log:\n{worker.log_text()}"
                ) from None


def rows(engine: sa.Engine) -> list[sa.Row[Any]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(EV).order_by(EV.c.id)).all())


def statuses(engine: sa.Engine) -> Counter[str]:
    return Counter(r.status for r in rows(engine))


def open_sealed(event: ReceivedEvent, shared_secret: str) -> str:
    """What pusher-js does with an encrypted channel's event, with plain PyNaCl."""
    envelope = json.loads(event.data)
    assert set(envelope) == {"nonce", "ciphertext"}, event.data
    box = nacl.secret.SecretBox(base64.b64decode(shared_secret))
    plaintext = box.decrypt(
        base64.b64decode(envelope["ciphertext"]), base64.b64decode(envelope["nonce"])
    )
    return plaintext.decode("utf-8")


class Browser:
    """One WebSocket subscriber on the public, private and encrypted channels."""

    def __init__(self, server: SoketiServer, auth: Sockudo) -> None:
        self.sub = PusherSubscriber(server.ws_url())
        self.auth = auth
        self.shared_secret = ""

    async def join(self, channels: tuple[str, ...] = (PUBLIC, PRIVATE, ENCRYPTED)) -> None:
        socket_id = await self.sub.connect()
        for channel in channels:
            if channel.startswith("private-"):
                authorization = self.auth.authenticate(socket_id, channel)
                if channel.startswith("private-encrypted-"):
                    self.shared_secret = authorization["shared_secret"]
                await self.sub.subscribe(channel, authorization)
            else:
                await self.sub.subscribe(channel)

    def received(self, channel: str) -> list[tuple[str, str | None, str]]:
        """(event, channel, data) of everything received there; encrypted data opened."""
        out = []
        for event in self.sub.events[channel]:
            data = event.data
            if channel.startswith("private-encrypted-"):
                data = open_sealed(event, self.shared_secret)
            out.append((event.event, event.channel, data))
        return out


# -- the application ----------------------------------------------------------------------------


def create_app_table(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE app_orders (id INTEGER PRIMARY KEY, note TEXT)"))


def add_order(conn: sa.Connection | Session, order_id: int, note: str) -> None:
    conn.execute(
        sa.text("INSERT INTO app_orders (id, note) VALUES (:id, :note)"),
        {"id": order_id, "note": note},
    )


def run_application(engine: sa.Engine) -> tuple[list[Sent], set[str]]:
    """Commit some transactions with events and roll others back.

    Returns every committed (channel, event, data) and the event names of rolled-back events.
    """
    create_app_table(engine)
    committed: list[Sent] = []
    ghosts = {"ghost-rollback", "ghost-integrity", "ghost-exception"}

    # 1. One business change, several events on all three channels, dict data (Connection).
    with engine.begin() as conn:
        add_order(conn, 1, "first")
        created = {"id": 1, "note": "héllo ☕", "lines": [{"sku": "A-1", "qty": 2}]}
        paid = {"id": 1, "amount": 12.5, "paid": True, "coupon": None}
        charged = {"id": 1, "card": "4242", "memo": "naïve", "amount": 12.5}
        enqueue(conn, PUBLIC, "order-created", created)
        enqueue(conn, PRIVATE, "order-paid", paid)
        enqueue(conn, ENCRYPTED, "card-charged", charged)
    committed += [
        Sent(PUBLIC, "order-created", compact(created)),
        Sent(PRIVATE, "order-paid", compact(paid)),
        Sent(ENCRYPTED, "card-charged", compact(charged)),
    ]

    # 2. Rolled back explicitly: nothing of it exists.
    with engine.connect() as conn:
        tx = conn.begin()
        add_order(conn, 2, "rolled back")
        enqueue(conn, [PUBLIC, PRIVATE], "ghost-rollback", {"id": 2})
        enqueue(conn, ENCRYPTED, "ghost-rollback", {"id": 2})
        tx.rollback()

    # 3. An ORM Session: a multi-channel event with str data, and a str that looks like JSON
    #    (sent exactly as written, spaces and all).
    text = "plain text, not JSON ✓"
    raw_json = '{"kept":  "as written", "spaces": true}'
    with Session(engine) as session, session.begin():
        add_order(session, 3, "third")
        enqueue(session, [PUBLIC, PRIVATE], "status", text)
        enqueue(session, PUBLIC, "raw-json", raw_json)
        enqueue(session, ENCRYPTED, "encrypted-text", text)
    committed += [
        Sent(PUBLIC, "status", text),
        Sent(PRIVATE, "status", text),
        Sent(PUBLIC, "raw-json", raw_json),
        Sent(ENCRYPTED, "encrypted-text", text),
    ]

    # 4. The business change fails after the events were enqueued (duplicate order id): the
    #    transaction rolls back and takes the events with it.
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        enqueue(conn, [PUBLIC, PRIVATE], "ghost-integrity", {"id": 1, "again": True})
        enqueue(conn, ENCRYPTED, "ghost-integrity", {"id": 1})
        add_order(conn, 1, "duplicate")

    # 5. More events than one server batch holds, round robin over the channels, in one commit.
    channels = (PUBLIC, PRIVATE, ENCRYPTED)
    with engine.begin() as conn:
        add_order(conn, 5, "bulk")
        for n in range(26):
            channel = channels[n % 3]
            payload = {"n": n, "channel": channel, "text": "ünïcode ✓" * (n % 4)}
            enqueue(conn, channel, f"bulk-{n}", payload)
            committed.append(Sent(channel, f"bulk-{n}", compact(payload)))

    # 6. An exception in the application code rolls an ORM Session back.
    class Abort(Exception):
        pass

    with pytest.raises(Abort), Session(engine) as session, session.begin():
        add_order(session, 6, "aborted")
        enqueue(session, [PUBLIC, PRIVATE], "ghost-exception", "never")
        enqueue(session, ENCRYPTED, "ghost-exception", "never")
        raise Abort

    # 7. A last commit after the rollbacks, so they sit between committed events.
    with engine.begin() as conn:
        add_order(conn, 7, "last")
        last = {"id": 7, "last": True}
        enqueue(conn, [PUBLIC, PRIVATE], "order-created", last)
    committed += [Sent(PUBLIC, "order-created", compact(last))]
    committed += [Sent(PRIVATE, "order-created", compact(last))]

    with engine.connect() as conn:
        orders = conn.execute(sa.text("SELECT id FROM app_orders ORDER BY id")).scalars().all()
    assert orders == [1, 3, 5, 7]
    return committed, ghosts


# -- 1. everything committed reaches every subscriber exactly once ------------------------------


async def test_committed_events_reach_real_subscribers_exactly_once(
    soketi_factory: Any, engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    server: SoketiServer = soketi_factory(max_batch_size=10)  # soketi's own default
    committed, ghosts = run_application(engine)
    assert len(rows(engine)) == len(committed)  # one row per committed (event, channel)
    expected = {
        channel: Counter((s.event, s.channel, s.data) for s in committed if s.channel == channel)
        for channel in (PUBLIC, PRIVATE, ENCRYPTED)
    }

    env = worker_env(database_url, server.url, server_batch_limit=10)
    with Sockudo.from_url(server.url, encryption_master_key_base64=MASTER_KEY_B64) as auth:
        browsers = [Browser(server, auth), Browser(server, auth)]
        try:
            for browser in browsers:
                await browser.join()
            with running_worker(env, tmp_path / "worker.log") as worker:
                for browser in browsers:
                    for channel, want in expected.items():
                        await wait_for_all(browser.sub, channel, want.total(), worker)
                # One quiet period with the worker still polling: no duplicate, no ghost arrives.
                await asyncio.sleep(QUIET)
                for browser in browsers:
                    for channel, want in expected.items():
                        await browser.sub.assert_no_more(channel, want.total(), quiet_for=0)
                await eventually(
                    lambda: statuses(engine) == {"published": len(committed)},
                    "every row published",
                    worker,
                )
                worker.check_alive()
                assert worker.terminate() == 0, worker.log_text()
            log = worker.log_text()
            for browser in browsers:
                for channel, want in expected.items():
                    got = browser.received(channel)
                    assert Counter(got) == want, (channel, got)
                    assert not {event for event, _, _ in got} & ghosts
                # Only sealed envelopes on the wire for the encrypted channel.
                for event in browser.sub.events[ENCRYPTED]:
                    assert set(json.loads(event.data)) == {"nonce", "ciphertext"}
                # Nothing on any other channel, no protocol errors.
                assert set(browser.sub.events) <= {PUBLIC, PRIVATE, ENCRYPTED}
                assert browser.sub.errors == []
        finally:
            for browser in browsers:
                await browser.sub.close()

    final = rows(engine)
    assert Counter(r.status for r in final) == {"published": len(committed)}
    assert all(r.published_at is not None and r.last_error_status is None for r in final)
    assert not {r.event for r in final} & ghosts
    assert "Traceback" not in log
    # Every encrypted row was sealed under a nonce of its own.
    nonces = [r.encryption_nonce for r in final if r.channel == ENCRYPTED]
    assert all(nonces) and len(set(nonces)) == len(nonces)


# -- 2a. soketi's "HTTP 200 + code 401" is a misconfiguration, not an event failure --------------


async def test_wrong_secret_keeps_rows_pending_then_right_secret_delivers(
    soketi: SoketiServer, engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    wrong_secret = "wrong-secret-5f3a9c"
    wrong_url = soketi.url.replace(f":{soketi.secret}@", f":{wrong_secret}@")
    assert wrong_url != soketi.url
    events: list[tuple[str, str, Any]] = [(PUBLIC, f"e{n}", {"n": n}) for n in range(4)]
    events.append((PRIVATE, "p0", "private text"))
    with engine.begin() as conn:
        for channel, name, data in events:
            enqueue(conn, channel, name, data)
    sent = [
        Sent(channel, name, data if isinstance(data, str) else compact(data))
        for channel, name, data in events
    ]
    total = len(sent)

    with Sockudo.from_url(soketi.url) as auth:
        browser = Browser(soketi, auth)
        try:
            await browser.join((PUBLIC, PRIVATE))

            # A worker with the wrong secret: soketi answers 200 {"error":...,"code":401}.
            with running_worker(
                worker_env(database_url, wrong_url, 100), tmp_path / "wrong.log"
            ) as wrong:
                marker = "refused this worker's credentials"
                # Refused at least twice: it keeps retrying (slowly) without giving up on rows.
                await eventually(lambda: wrong.log_text().count(marker) >= 2, "two refusals", wrong)
                assert wrong.terminate() == 0, wrong.log_text()
            log = wrong.log_text()
            after_wrong = rows(engine)
            assert [r.status for r in after_wrong] == ["pending"] * total
            assert [r.attempts for r in after_wrong] == [0] * total  # attempts refunded
            assert all(r.last_error_status == 401 for r in after_wrong)
            assert all(
                "secret authentication failed" in (r.last_error_message or "") for r in after_wrong
            )
            # Says what is wrong, in words an operator acts on, and never shows the secret.
            assert "401" in log
            assert "The secret authentication failed" in log
            assert "SOCKUDO_URL" in log
            assert f"http://{soketi.key}:***@127.0.0.1:{soketi.port}/apps/{soketi.app_id}" in log
            assert wrong_secret not in log
            assert sum(len(v) for v in browser.sub.events.values()) == 0

            # The right secret: everything goes out, once.
            with running_worker(
                worker_env(database_url, soketi.url, 100), tmp_path / "right.log"
            ) as right:
                await wait_for_all(browser.sub, PUBLIC, 4, right)
                await wait_for_all(browser.sub, PRIVATE, 1, right)
                await browser.sub.assert_no_more(PUBLIC, 4, quiet_for=QUIET)
                await browser.sub.assert_no_more(PRIVATE, 1, quiet_for=0)
                await eventually(
                    lambda: statuses(engine) == {"published": total}, "rows published", right
                )
                assert right.terminate() == 0, right.log_text()
            assert soketi.secret not in right.log_text()
        finally:
            await browser.sub.close()

    got = Counter(browser.received(PUBLIC) + browser.received(PRIVATE))
    assert got == Counter((s.event, s.channel, s.data) for s in sent)
    final = rows(engine)
    assert [r.status for r in final] == ["published"] * total
    # The misconfigured tries cost nothing: each row was sent by the right worker only.
    assert [r.attempts for r in final] == [1] * total


# -- 2b. soketi's "HTTP 200 + code 413" dead-letters that event only ----------------------------


async def test_oversized_event_is_dead_with_soketis_reason_and_its_batch_is_delivered(
    soketi_factory: Any, engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    server: SoketiServer = soketi_factory(max_event_size_kb=1)
    big = "x" * 2048  # over soketi's 1 KB, far under the outbox's own 100 KB limit
    with engine.begin() as conn:  # one transaction: one claim, one batch
        enqueue(conn, PUBLIC, "before", {"n": 1})
        enqueue(conn, PRIVATE, "private-before", "small private")
        enqueue(conn, PUBLIC, "too-big", big)
        enqueue(conn, PUBLIC, "after", {"n": 2})
    expected_public = Counter([("before", PUBLIC, '{"n":1}'), ("after", PUBLIC, '{"n":2}')])
    expected_private = Counter([("private-before", PRIVATE, "small private")])

    with Sockudo.from_url(server.url) as auth:
        browser = Browser(server, auth)
        try:
            await browser.join((PUBLIC, PRIVATE))
            with running_worker(
                worker_env(database_url, server.url, 100), tmp_path / "worker.log"
            ) as worker:
                await wait_for_all(browser.sub, PUBLIC, 2, worker)
                await wait_for_all(browser.sub, PRIVATE, 1, worker)
                await eventually(
                    lambda: statuses(engine) == {"published": 3, "dead": 1},
                    "three published and one dead",
                    worker,
                )
                await browser.sub.assert_no_more(PUBLIC, 2, quiet_for=QUIET)
                await browser.sub.assert_no_more(PRIVATE, 1, quiet_for=0)
                assert worker.terminate() == 0, worker.log_text()
            log = worker.log_text()
        finally:
            await browser.sub.close()

    assert Counter(browser.received(PUBLIC)) == expected_public
    assert Counter(browser.received(PRIVATE)) == expected_private
    by_event = {r.event: r for r in rows(engine)}
    dead = by_event["too-big"]
    assert dead.status == "dead"
    assert dead.last_error_status == 413
    assert dead.last_error_code == "413"
    assert dead.last_error_message == "The event data should be less than 1 KB."
    assert dead.data == big  # kept as written, for replay
    for name in ("before", "private-before", "after"):
        assert by_event[name].status == "published"
        assert by_event[name].last_error_status is None
    # They were one batch: soketi refused it whole, the rows were re-sent alone at once.
    assert re.search(
        r"batch of 4: 3 published, 0 to retry, 1 dead, 0 given back; "
        r"1 batch request \(4 rows\), 4 requests alone;",
        log,
    ), log
    assert "The event data should be less than 1 KB." in log
