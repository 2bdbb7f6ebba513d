"""Message mutations and annotations through the outbox, against the Sockudo-faithful test server.

``outbox.mutations`` writes each update, delete, append, annotation and annotation delete as an
outbox row in the caller's transaction; the worker sends it once its message has a serial, in
enqueue order per message, with the same bytes on every attempt. Each test checks both sides:
the rows (status, acknowledgement) and what the server stored (its versions and annotations,
read from its own stores or through the client's ``get_message``). SQLite and PostgreSQL;
MariaDB refuses mutations at enqueue (tested with the other MariaDB rules).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from outbox import admin, enqueue, outbox_table
from outbox.mutations import (
    append_message,
    delete_annotation,
    delete_message,
    message_ordering_key,
    publish_annotation,
    update_message,
)
from outbox.sockudo import Limits, Sockudo
from outbox.sockudo.errors import InvalidEvent
from outbox.testing.server import TestServer
from outbox.testing.server.store import Version
from outbox.testing.worker_process import WorkerProcess
from outbox.worker import Worker
from tests.outbox_rows import EV
from tests.test_worker import fast_settings, run_until

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)

T = outbox_table()
CHANNEL = "orders"
#: What mutations and annotations need on (Sockudo has them all off by default).
FEATURES = {
    "history": True,
    "versioned_messages": True,
    "annotations": True,
    "app_annotations": True,
}
ANNOTATION = {"type": "reactions:distinct.v1", "name": "like", "client_id": "u1"}


@pytest.fixture
def server() -> Iterator[TestServer]:
    """An in-process test server with history, versioned messages and annotations on."""
    with TestServer(**FEATURES) as server:
        yield server


# -- helpers ------------------------------------------------------------------------------------


def rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(EV).order_by(EV.c.id)))


def row_of(engine: sa.Engine, event_id: uuid.UUID) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(EV).where(EV.c.event_id == event_id)).one()


def status_of(engine: sa.Engine, event_id: uuid.UUID) -> str:
    return str(row_of(engine, event_id).status)


def versions(server: TestServer, serial: str, channel: str = CHANNEL) -> list[Version]:
    """Every version the server stored for a message, oldest first."""
    stores = server.app.stores
    with stores.lock:
        return list(stores.messages[(channel, serial)].versions)


def annotation_events(server: TestServer, serial: str, channel: str = CHANNEL) -> list[Any]:
    stores = server.app.stores
    with stores.lock:
        return list(stores.annotations.get((channel, serial), []))


def create(engine: sa.Engine, data: str = "v0") -> uuid.UUID:
    """One message published by the outbox (committed, not sent yet); its event id."""
    with engine.begin() as conn:
        return enqueue(conn, CHANNEL, "created", data)


async def publish_message(
    engine: sa.Engine, database_url: str, server: TestServer, data: str = "v0"
) -> tuple[uuid.UUID, str]:
    """A message published through the outbox: its event id and the serial the server gave it."""
    event_id = create(engine, data)
    await Worker(fast_settings(database_url, server.url), engine=engine).run(once=True)
    published = row_of(engine, event_id)
    assert published.status == "published" and published.message_serial
    return event_id, published.message_serial


def settled(engine: sa.Engine, *event_ids: uuid.UUID) -> Callable[[], bool]:
    """True once each of these rows left the hot table (published or dead)."""
    return lambda: all(status_of(engine, e) in ("published", "dead") for e in event_ids)


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    """The worker running in the background for the block; stopped cleanly after it."""
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=15)


async def wait_for(task: asyncio.Task[None], done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not done():
        if task.done():
            await task
            raise AssertionError("worker exited on its own")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# -- 1. one transaction: create, update, append, delete ----------------------------------------


async def test_create_update_append_delete_in_one_transaction(engine, database_url, server):
    """A message and three operations on it, all enqueued in one transaction (the operations
    name the message by the event id enqueue just returned): the server ends with the message
    as the operations left it in enqueue order, one version per operation, each applied once,
    and each row's acknowledgement is its own version's serial."""
    with engine.begin() as conn:
        message = enqueue(conn, CHANNEL, "created", "v0")
        ops = [
            update_message(conn, CHANNEL, message, name="renamed", data="v1"),
            append_message(conn, CHANNEL, message, "-more"),
            delete_message(conn, CHANNEL, message, description="gone"),
        ]
    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, message, *ops), what="all rows settled")

    created = row_of(engine, message)
    serial = created.message_serial
    assert [r.status for r in rows(engine)] == ["published"] * 4
    stored = versions(server, serial)
    assert [v.action for v in stored] == ["create", "update", "append", "delete"]
    assert [row_of(engine, op).acknowledgement_id for op in ops] == [v.serial for v in stored[1:]]
    assert all(row_of(engine, op).message_serial == serial for op in ops)
    assert [row_of(engine, op).operation for op in ops] == ["update", "append", "delete"]
    with Sockudo.from_url(server.url) as sockudo:
        latest = sockudo.get_message(CHANNEL, serial)
    assert (latest.action, latest.name, latest.data) == ("delete", "renamed", "v1-more")
    # Each applied once: one request and one broadcast per operation, nothing answered twice.
    assert server.request_count("mutation") == 3
    broadcast = [d.name for d in server.deliveries(CHANNEL)]
    assert broadcast == [
        "created",
        "sockudo:message.update",
        "sockudo:message.append",
        "sockudo:message.delete",
    ]


# -- 2. a message named by its serial -----------------------------------------------------------


async def test_mutation_by_known_message_serial(engine, database_url, server):
    """A mutation naming its message by a ``message_serial`` string (no outbox event behind it)
    is sent to that message as soon as it is claimed and acknowledged with its version."""
    _, serial = await publish_message(engine, database_url, server)
    with engine.begin() as conn:
        update = update_message(conn, CHANNEL, serial, data="by-serial")
        append = append_message(conn, CHANNEL, serial, "+tail")
    queued = row_of(engine, update)
    assert (queued.target_serial, queued.target_event_id) == (serial, None)
    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, update, append), what="mutations settled")

    stored = versions(server, serial)
    assert [v.action for v in stored] == ["create", "update", "append"]
    assert stored[-1].data == "by-serial+tail"
    for op, version in zip((update, append), stored[1:], strict=True):
        done = row_of(engine, op)
        assert (done.status, done.acknowledgement_id, done.message_serial) == (
            "published",
            version.serial,
            serial,
        )


#: Sockudo's ``INSTANCE_PROCESS_ID`` (the node part of every serial) set to a Kubernetes pod name:
#: message, version and annotation serials of 104 characters.
POD_NAME = "sockudo-realtime-gateway-production-eu-west-1-7d9f8c6b5d-x2k4q"


async def test_serials_longer_than_64_characters_are_stored_whole(engine, database_url):
    """A server whose node id is a pod name: the message's serial is stored whole, so updates,
    appends and an annotation naming the message by its event id reach it, and so do those
    naming it by that serial (accepted at enqueue), and the annotation's delete by its serial.
    Every row is published with the whole serials."""
    with TestServer(**FEATURES, node_id=POD_NAME) as server:
        message, serial = await publish_message(engine, database_url, server)
        assert len(serial) > 100 and POD_NAME in serial
        with engine.begin() as conn:
            by_event = [
                update_message(conn, CHANNEL, message, data="v1"),
                append_message(conn, CHANNEL, message, "+event"),
                publish_annotation(conn, CHANNEL, message, **ANNOTATION),
            ]
        worker = Worker(fast_settings(database_url, server.url), engine=engine)
        await run_until(worker, settled(engine, *by_event), what="the mutations by event id")
        (annotation,) = annotation_events(server, serial)
        with engine.begin() as conn:
            by_serial = [
                update_message(conn, CHANNEL, serial, name="renamed"),
                append_message(conn, CHANNEL, serial, "+serial"),
                delete_annotation(conn, CHANNEL, serial, annotation.serial),
            ]
        worker = Worker(fast_settings(database_url, server.url), engine=engine)
        await run_until(worker, settled(engine, *by_serial), what="the mutations by serial")

        stored = versions(server, serial)
        after = annotation_events(server, serial)
    assert [v.action for v in stored] == ["create", "update", "append", "update", "append"]
    assert (stored[-1].name, stored[-1].data) == ("renamed", "v1+event+serial")
    assert [e.payload["action"] for e in after] == ["annotation.create", "annotation.delete"]
    done = [row_of(engine, op) for op in (*by_event, *by_serial)]
    assert [r.status for r in done] == ["published"] * 6
    assert {r.message_serial for r in done} == {serial}
    assert [r.acknowledgement_id for r in done] == [
        stored[1].serial,
        stored[2].serial,
        annotation.serial,
        stored[3].serial,
        stored[4].serial,
        after[1].serial,
    ]
    assert all(len(r.acknowledgement_id) > 100 for r in done)


# -- 2b. one message, one ordering key, whichever way it is named ---------------------------------


async def test_operations_naming_one_message_both_ways_go_out_in_enqueue_order(
    engine, database_url, server
):
    """An update by event id, then (once published) an append by serial, an update by event id
    and an append by serial: one ordering key, so when the first append meets backpressure the
    two behind it wait for it, and the server applies the four in enqueue order. (With a key per
    name, the update by event id went ahead of the delayed append and the message ended
    ``c+b+d``.) One row per claim, one claim at a time: the order is the test's, not chance's."""
    message, serial = await publish_message(engine, database_url, server)
    settings = fast_settings(database_url, server.url, batch_size=1, in_flight=1)
    with engine.begin() as conn:
        first = update_message(conn, CHANNEL, message, data="a")
    await run_until(Worker(settings, engine=engine), settled(engine, first), what="the update")
    server.fail_next(status=503, code="backpressure", message="busy", endpoints=["mutation"])
    with engine.begin() as conn:
        ops = [
            append_message(conn, CHANNEL, serial, "+b"),
            update_message(conn, CHANNEL, message, data="c"),
            append_message(conn, CHANNEL, serial, "+d"),
        ]
    await run_until(Worker(settings, engine=engine), settled(engine, *ops), what="the three")

    stored = versions(server, serial)
    assert [(v.action, v.data) for v in stored] == [
        ("create", "v0"),
        ("update", "a"),
        ("append", "a+b"),
        ("update", "c"),
        ("append", "c+d"),
    ]
    done = [row_of(engine, op) for op in (first, *ops)]
    assert [r.acknowledgement_id for r in done] == [v.serial for v in stored[1:]]
    assert done[1].attempts == 2  # the backpressure, then the append
    assert {r.ordering_key for r in done} == {message_ordering_key(CHANNEL, message)}


async def test_a_serial_is_keyed_by_the_event_that_published_it_while_the_log_holds_it(
    engine, database_url, server
):
    """Named by serial, a message the outbox published is keyed by its event (sync and async
    callers alike); a serial no publish in the log carries on that channel (another channel's,
    one the outbox never published, one whose publish retention trimmed while a mutation's log
    row still carries it) is keyed by the serial itself."""
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from outbox.database import normalize_url
    from outbox.schema import published_table

    message, serial = await publish_message(engine, database_url, server)
    by_event = message_ordering_key(CHANNEL, message)

    def key_of(event_id: uuid.UUID) -> str:
        return str(row_of(engine, event_id).ordering_key)

    with engine.begin() as conn:
        update = update_message(conn, CHANNEL, serial, data="v1")
        elsewhere = update_message(conn, "other", serial, data="v1")
        unknown = update_message(conn, CHANNEL, "0:node:1", data="v1")
    async_engine = create_async_engine(normalize_url(database_url, asyncio=True))
    try:
        async with async_engine.begin() as conn:
            on_connection = await append_message(conn, CHANNEL, serial, "+c")
        async with AsyncSession(async_engine) as session, session.begin():
            in_session = await publish_annotation(session, CHANNEL, serial, **ANNOTATION)
    finally:
        await async_engine.dispose()
    assert [key_of(e) for e in (update, on_connection, in_session)] == [by_event] * 3
    assert key_of(elsewhere) == message_ordering_key("other", serial)
    assert key_of(unknown) == message_ordering_key(CHANNEL, "0:node:1")

    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, update), what="the update")
    log = published_table(T)
    with engine.begin() as conn:  # retention trims the publish; the update's row is newer
        conn.execute(sa.delete(log).where(log.c.event_id == message))
        carrying = sa.select(log.c.operation).where(log.c.message_serial == serial)
        assert "update" in conn.execute(carrying).scalars().all()
        trimmed = update_message(conn, CHANNEL, serial, data="v2")
    assert key_of(trimmed) == message_ordering_key(CHANNEL, serial)


def test_the_serial_lookup_reads_its_index(engine, backend):
    """Finding the event that published a serial reads the published log's serial index (not
    the whole log), its predicate proven from the lookup's own conditions."""
    from outbox.mutations import publishing_event

    seen: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    with engine.connect() as conn:
        assert publishing_event(conn, T, CHANNEL, "0:node:1") is None
    sa.event.remove(engine, "before_cursor_execute", capture)
    ((statement, parameters),) = seen
    with engine.begin() as conn:
        cursor = conn.connection.driver_connection.cursor()
        if backend == "postgresql":
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute("EXPLAIN " + statement, parameters)
        else:
            cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters)
        plan = "\n".join(str(r) for r in cursor.fetchall())
    assert "ix_outbox_events_published_message" in plan, plan


# -- 3. a lost answer: the retry is a duplicate, not a second version ---------------------------


@pytest.mark.parametrize("operation", ["update", "append"])
async def test_op_id_applied_once_when_the_answer_is_lost(engine, database_url, server, operation):
    """The server applies the operation, then the connection drops before its answer: the
    worker retries the same bytes (same ``op_id``), the server answers ``duplicate``, the row is
    published with the one version's serial, and the message has exactly one such version (an
    append's text is appended once)."""
    _, serial = await publish_message(engine, database_url, server)
    server.drop_next(stage="published", endpoints=["mutation"])
    with engine.begin() as conn:
        if operation == "update":
            op = update_message(conn, CHANNEL, serial, data="v1")
        else:
            op = append_message(conn, CHANNEL, serial, "-once")
    sent = row_of(engine, op).data
    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, op), what="the mutation settled")

    done = row_of(engine, op)
    assert done.status == "published"
    assert done.attempts == 2  # the lost answer, then the duplicate
    assert done.data == sent  # the stored body (and its op_id) never changed
    stored = versions(server, serial)
    assert [v.action for v in stored] == ["create", operation]
    assert done.acknowledgement_id == stored[1].serial
    assert stored[1].data == ("v1" if operation == "update" else "v0-once")
    assert server.request_count("mutation") == 2
    assert server.request_count("mutation", status=200) == 1  # the duplicate's answer
    assert [d.name for d in server.deliveries(CHANNEL)] == [
        "created",
        f"sockudo:message.{operation}",
    ]


# -- 4. worker processes killed mid-request -------------------------------------------------------

APPENDS = 8
KILLS = 3


def test_appends_survive_worker_kills(database_url, engine, server, tmp_path: Path):
    """A sequence of appends to one message, drained by worker processes SIGKILLed while the
    server holds an applied append's answer (0.4 s of latency after applying): each restart
    waits out the dead worker's lease, re-sends the unacknowledged append, and the server
    answers it as a duplicate. The message's text is the fragments concatenated in enqueue
    order, each once, and every row is acknowledged with its own version."""
    fragments = [f"[{i}]" for i in range(APPENDS)]
    with engine.begin() as conn:
        message = enqueue(conn, CHANNEL, "created", "v0")
        ops = [append_message(conn, CHANNEL, message, f) for f in fragments]
    server.add_latency(0.4, stage="published", endpoints=["mutation"])
    config = {
        "database_url": database_url,
        "sockudo_url": server.url,
        "poll_interval": 0.05,
        "backoff_min_seconds": 0.05,
        "backoff_max_seconds": 0.5,
        "request_timeout": 1,
        "lease_seconds": 2,
        "retention_seconds": 0,
    }

    unanswered: list[str] = []

    def applied_unanswered() -> str | None:
        """The serial of an append the server applied in the last 0.2 s (so it is still
        holding its answer) that no row is acknowledged with and no earlier kill met, if any."""
        stores = server.app.stores
        with stores.lock:
            found = [m for (c, _), m in stores.messages.items() if c == CHANNEL]
            latest = found[0].latest if found else None
        if latest is None or latest.action != "append":
            return None
        if server.now() * 1000 - latest.timestamp_ms > 200:
            return None
        seen = {r.acknowledgement_id for r in rows(engine)} | set(unanswered)
        return None if latest.serial in seen else latest.serial

    def wait(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while not (found := check()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)
        return found

    for i in range(KILLS):
        with WorkerProcess(log_path=tmp_path / f"worker-{i}.log", **config) as worker:  # type: ignore[arg-type]
            # Killed while the server holds an append it applied but has not answered yet.
            unanswered.append(wait(applied_unanswered, f"an applied append (kill {i})"))
            worker.kill()
        assert unanswered[-1] not in {r.acknowledgement_id for r in rows(engine)}
    with WorkerProcess(log_path=tmp_path / "worker-final.log", **config) as worker:  # type: ignore[arg-type]
        wait(settled(engine, message, *ops), "every append settled", timeout=60)
        assert worker.terminate() == 0

    assert len(set(unanswered)) == KILLS
    serial = row_of(engine, message).message_serial
    stored = versions(server, serial)
    assert [v.action for v in stored] == ["create"] + ["append"] * APPENDS
    assert [v.fragment for v in stored[1:]] == fragments
    assert stored[-1].data == "v0" + "".join(fragments)
    assert [row_of(engine, op).status for op in ops] == ["published"] * APPENDS
    assert [row_of(engine, op).acknowledgement_id for op in ops] == [v.serial for v in stored[1:]]
    # Each append whose answer a kill lost was sent again, and answered as a duplicate.
    retried = {r.acknowledgement_id for r in rows(engine) if r.attempts > 1}
    assert set(unanswered) <= retried


# -- 4b. a message whose publish was answered without a receipt ----------------------------------


@pytest.mark.parametrize("how", ["answer lost", "a later item refused"])
async def test_message_re_sent_alone_after_its_batch_keeps_its_mutations(
    engine, database_url, server, how
):
    """The message goes out in a batch whose answer is lost (or whose later item is refused),
    so it is sent again alone, and Sockudo answers the repeat from its idempotency cache with the
    body ``1`` (a batch item's key stores no answer): the row is published without a serial.
    The update naming it by event id still applies: the worker finds the serial in the channel's
    history by the row's ``message_id`` and keeps it on the log row for later mutations."""
    if how == "answer lost":
        server.drop_next(stage="published", endpoints=["batch_events"])
    else:
        server.fail_batch_item(1, status=400, code="invalid_input", message="bad item")
    with engine.begin() as conn:
        message = enqueue(conn, CHANNEL, "created", "v0")
        enqueue(conn, CHANNEL, "other", "x")
        first = update_message(conn, CHANNEL, message, data="v1")
    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, message, first), what="message and update settled")

    published = row_of(engine, message)
    # Once in the batch, then alone (a retry, or at once after the refused batch): the repeat
    # was answered "1".
    assert server.request_count("batch_events") == 1 and server.request_count("events") >= 1
    assert server.request_count("history") >= 1
    done = row_of(engine, first)
    assert (done.status, done.last_error_code) == ("published", None)
    serial = done.message_serial
    assert [v.action for v in versions(server, serial)] == ["create", "update"]
    assert versions(server, serial)[0].name == "created"
    # The serial found is kept with the message: the next mutation needs no lookup.
    assert published.message_serial == serial
    lookups = server.request_count("history")
    with engine.begin() as conn:
        second = append_message(conn, CHANNEL, message, "+more")
    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, second), what="the append settled")
    assert status_of(engine, second) == "published"
    assert versions(server, serial)[-1].data == "v1+more"
    assert server.request_count("history") == lookups


async def test_message_without_receipt_and_history_off(engine, database_url, server):
    """The same repeat answered ``1``, on a server whose history is off since: the lookup is
    refused 422 ``feature_disabled`` and the mutation goes dead with that reason (no pause)."""
    server.drop_next(stage="published", endpoints=["batch_events"])
    with engine.begin() as conn:
        message = enqueue(conn, CHANNEL, "created", "v0")
        enqueue(conn, CHANNEL, "other", "x")
    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, message), what="the message published")
    assert row_of(engine, message).message_serial is None
    server.set_features(history=False, app_annotations=False)
    with engine.begin() as conn:
        op = update_message(conn, CHANNEL, message, data="v1")
    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, op), what="the update settled")
    dead = row_of(engine, op)
    assert (dead.status, dead.last_error_code) == ("dead", "feature_disabled")
    assert worker.stats.pauses == 0


# -- 5. the end of a mutation: its target dead, or the feature off -------------------------------


async def test_mutation_of_a_dead_event_is_dead(engine, database_url, server):
    """The event a mutation names was refused by the server (413): the mutation is never sent
    and goes dead with ``target_dead``."""
    server.fail_next(status=413, code="payload_too_large", message="too large")
    with engine.begin() as conn:
        message = enqueue(conn, CHANNEL, "created", "v0")
        op = update_message(conn, CHANNEL, message, data="v1")
    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, message, op), what="both rows dead")

    assert row_of(engine, message).last_error_status == 413
    dead = row_of(engine, op)
    assert (dead.status, dead.last_error_code) == ("dead", "target_dead")
    assert server.request_count("mutation") == 0


async def test_feature_off_kills_the_mutation_not_the_worker(engine, database_url, server):
    """Versioned messages switched off on the server after the message was published: the
    update is refused 422 ``feature_disabled`` and goes dead with that code, and the worker does
    not pause (as it would for bad credentials): events enqueued after it keep flowing."""
    _, serial = await publish_message(engine, database_url, server)
    server.set_features(versioned_messages=False, annotations=False)
    with engine.begin() as conn:
        op = update_message(conn, CHANNEL, serial, data="v1")
    # A pause for bad credentials would last a minute: far beyond this test's waits.
    settings = fast_settings(database_url, server.url, misconfigured_retry_seconds=60)
    worker = Worker(settings, engine=engine)
    async with running(worker) as task:
        await wait_for(task, settled(engine, op), "the update settled")
        with engine.begin() as conn:
            later = [enqueue(conn, "other", "created", {"n": i}) for i in range(5)]
        await wait_for(task, settled(engine, *later), "the later events published")

    dead = row_of(engine, op)
    assert (dead.status, dead.last_error_status, dead.last_error_code) == (
        "dead",
        422,
        "feature_disabled",
    )
    assert [status_of(engine, e) for e in later] == ["published"] * 5
    assert worker.stats.pauses == 0
    assert len(versions(server, serial)) == 1


# -- 6. annotations: a lost answer is not a second annotation ----------------------------------


async def test_annotation_retry_does_not_double_count(engine, database_url, server):
    """The server stores an annotation, then the connection drops before its answer: the retry
    lists the message's annotations, finds the identical one, and acknowledges the row with its
    serial without publishing again. Then ``delete_annotation`` by that serial deletes it."""
    message, serial = await publish_message(engine, database_url, server)
    server.drop_next(stage="published", endpoints=["annotation_publish"])
    with engine.begin() as conn:
        op = publish_annotation(conn, CHANNEL, message, **ANNOTATION)
    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, op), what="the annotation settled")

    done = row_of(engine, op)
    stored = annotation_events(server, serial)
    assert len(stored) == 1
    assert (done.status, done.attempts, done.acknowledgement_id, done.message_serial) == (
        "published",
        2,
        stored[0].serial,
        serial,
    )
    assert server.request_count("annotation_publish") == 1  # the retry only looked
    assert server.request_count("annotations", status=200) >= 1

    with engine.begin() as conn:
        removal = delete_annotation(conn, CHANNEL, message, stored[0].serial)
    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, removal), what="the annotation delete settled")
    removed = row_of(engine, removal)
    after = annotation_events(server, serial)
    assert [e.payload["action"] for e in after] == ["annotation.create", "annotation.delete"]
    assert after[1].deletes == stored[0].payload["id"]
    assert (removed.status, removed.acknowledgement_id) == ("published", after[1].serial)


TOTAL = {"type": "reactions:total.v1", "name": "like"}


async def test_annotation_retry_ignores_a_field_the_server_drops(engine, database_url, server):
    """An annotation row whose body holds a field Sockudo drops (as an older version stored
    it, before enqueue refused such fields): the server stores the annotation without it, the
    answer is lost, and the retry still recognises it by what the server keeps. A ``total``
    summary counts it once."""
    message, serial = await publish_message(engine, database_url, server)
    server.drop_next(stage="published", endpoints=["annotation_publish"])
    with engine.begin() as conn:
        op = publish_annotation(conn, CHANNEL, message, **TOTAL)
        as_stored_before = json.dumps({**TOTAL, "note": "dropped by the server"})
        conn.execute(sa.update(T).where(T.c.event_id == op).values(data=as_stored_before))
    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, op), what="the annotation settled")

    (stored,) = annotation_events(server, serial)
    assert "note" not in stored.payload
    done = row_of(engine, op)
    assert (done.status, done.attempts, done.acknowledgement_id) == ("published", 2, stored.serial)
    assert server.request_count("annotation_publish") == 1  # the retry only looked


async def test_annotation_retry_does_not_take_one_with_other_fields_for_its_own(
    engine, database_url, server
):
    """The retry's lookup matches every field the server keeps, absent ones included: another
    annotation of the same type that has a name this one lacks is not taken for it. Its first
    attempt never reached the server, so the retry publishes it."""
    message, serial = await publish_message(engine, database_url, server)
    with Sockudo.from_url(server.url) as sockudo:
        sockudo.publish_annotation(CHANNEL, serial, **TOTAL)  # someone else's, named
    server.drop_next(stage="received", endpoints=["annotation_publish"])
    with engine.begin() as conn:
        op = publish_annotation(conn, CHANNEL, message, type=TOTAL["type"])
    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, op), what="the annotation settled")

    theirs, ours = annotation_events(server, serial)
    assert (theirs.payload.get("name"), ours.payload.get("name")) == ("like", None)
    done = row_of(engine, op)
    assert (done.status, done.attempts, done.acknowledgement_id) == ("published", 2, ours.serial)


# -- 7. a fresh-key replay of a dead update -------------------------------------------------------


async def test_fresh_key_replay_rewrites_op_id(engine, database_url, server):
    """An update the server applied but answered with a refusal is dead; a replay with fresh
    keys gives it a new idempotency key AND the same new ``op_id`` in its stored body, so the
    server applies it again (a kept ``op_id`` would only be answered ``duplicate``)."""
    _, serial = await publish_message(engine, database_url, server)
    server.fail_next(status=400, code="bad_request", stage="published", endpoints=["mutation"])
    with engine.begin() as conn:
        op = update_message(conn, CHANNEL, serial, data="v1")
    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, op), what="the update dead")
    dead = row_of(engine, op)
    assert dead.status == "dead"
    assert json.loads(dead.data)["op_id"] == dead.idempotency_key

    with engine.begin() as conn:
        assert admin.replay(conn, T, admin.ReplayFilter(ids=[dead.id])) == 1
    replayed = row_of(engine, op)
    body = json.loads(replayed.data)
    assert replayed.status == "pending"
    assert replayed.idempotency_key != dead.idempotency_key
    assert body == {**json.loads(dead.data), "op_id": replayed.idempotency_key}
    worker = Worker(fast_settings(database_url, server.url), engine=engine)
    await run_until(worker, settled(engine, op), what="the replayed update settled")

    done = row_of(engine, op)
    stored = versions(server, serial)
    assert [v.action for v in stored] == ["create", "update", "update"]
    assert (done.status, done.acknowledgement_id) == ("published", stored[2].serial)


# -- 8. refused at enqueue ------------------------------------------------------------------------

MESSAGE = uuid.uuid4()
BAD_CALLS: dict[str, Callable[[sa.Connection], Any]] = {
    "message-not-uuid-or-str": lambda c: update_message(c, CHANNEL, 12345, data="x"),  # type: ignore[arg-type]
    "serial-with-space": lambda c: update_message(c, CHANNEL, "abc def", data="x"),
    # Sockudo takes serials of 1 to 128 bytes (a pod name in them makes ~100).
    "serial-over-128-bytes": lambda c: update_message(c, CHANNEL, "s" * 129, data="x"),
    "annotation-serial-over-128-bytes": lambda c: delete_annotation(c, CHANNEL, MESSAGE, "a" * 129),
    "empty-append": lambda c: append_message(c, CHANNEL, MESSAGE, ""),
    "encrypted-channel": lambda c: update_message(c, "private-encrypted-x", MESSAGE, data="x"),
    "op-id-over-64-bytes": lambda c: update_message(
        c, CHANNEL, MESSAGE, data="x", idempotency_key="k" * 65
    ),
    "annotation-op-id-over-64-bytes": lambda c: publish_annotation(
        c, CHANNEL, MESSAGE, **ANNOTATION, idempotency_key="é" * 33
    ),
    # Sockudo would drop it without a word, and a retry could not recognise the annotation.
    "annotation-field-the-server-drops": lambda c: publish_annotation(
        c, CHANNEL, MESSAGE, **ANNOTATION, note="x"
    ),
    "annotation-mapping-field-the-server-drops": lambda c: publish_annotation(
        c, CHANNEL, MESSAGE, {**ANNOTATION, "extras": {"k": "v"}}
    ),
}


@pytest.mark.parametrize("call", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_input_refused_at_enqueue(engine, call):
    """Each bad call raises InvalidEvent before writing anything: the transaction around it
    commits and the outbox is still empty."""
    with engine.begin() as conn, pytest.raises(InvalidEvent):
        call(conn)
    assert rows(engine) == []


def test_a_namespace_the_app_configures_is_accepted_like_enqueue(engine):
    """``limits`` as for ``enqueue``: a namespaced channel is refused by default and accepted
    once the app's namespaces are given."""
    with engine.begin() as conn:
        with pytest.raises(InvalidEvent):
            update_message(conn, "orders:eu", "s-1", data="x")
        namespaces = Limits(namespaces=frozenset({"orders"}))
        update_message(conn, "orders:eu", "s-1", data="x", limits=namespaces)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(T)).scalar_one() == 1
