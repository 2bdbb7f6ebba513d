"""`enqueue` and `enqueue_many`: rows written in the caller's transaction, exactly as given, and
bad input refused before any SQL runs (the caller's transaction stays usable)."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from outbox import InvalidEvent, OutboxEvent, derive_channel_key, enqueue, enqueue_many
from outbox import outbox_table as _outbox_table
from outbox.database import normalize_url
from outbox.drivers.postgresql import COPY_FROM_ROWS
from outbox.sockudo import crypto
from outbox.sockudo.validation import Limits
from tests.outbox_rows import EV

T = _outbox_table()


def all_rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(sa.select(EV).order_by(EV.c.id)).all()


@pytest.fixture
async def async_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(normalize_url(database_url, asyncio=True))
    yield engine
    await engine.dispose()


@pytest.fixture
def statements(engine: sa.Engine) -> Iterator[list[str]]:
    """Every SQL statement sent through ``engine`` while the test runs."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    yield seen
    sa.event.remove(engine, "before_cursor_execute", record)


def inserts(statements: list[str]) -> list[str]:
    return [s for s in statements if s.lstrip().upper().startswith("INSERT INTO OUTBOX_EVENTS")]


def bulk_statements(engine: sa.Engine) -> int:
    """Statements SQLAlchemy sees for a bulk enqueue: PostgreSQL's COPY goes by the driver."""
    return 0 if engine.dialect.name == "postgresql" else 1


# -- the caller's transaction -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["connection", "session"])
def test_sync_enqueue_commits_and_rolls_back_with_the_caller(engine, kind):
    def run(commit: bool, name: str) -> uuid.UUID:
        if kind == "connection":
            with engine.connect() as conn:
                event_id = enqueue(conn, "orders", name, {"n": 1})
                conn.commit() if commit else conn.rollback()
        else:
            with Session(engine) as session:
                event_id = enqueue(session, "orders", name, {"n": 1})
                session.commit() if commit else session.rollback()
        return event_id

    kept = run(True, "kept")
    dropped = run(False, "dropped")
    assert isinstance(kept, uuid.UUID) and isinstance(dropped, uuid.UUID)
    rows = all_rows(engine)
    assert [(r.event_id, r.event, r.status) for r in rows] == [(kept, "kept", "pending")]


@pytest.mark.parametrize("kind", ["connection", "session"])
async def test_async_enqueue_commits_and_rolls_back_with_the_caller(engine, async_engine, kind):
    async def run(commit: bool, name: str) -> uuid.UUID:
        if kind == "connection":
            async with async_engine.connect() as conn:
                event_id = await enqueue(conn, "orders", name, {"n": 1})
                await (conn.commit() if commit else conn.rollback())
        else:
            async with AsyncSession(async_engine) as session:
                event_id = await enqueue(session, "orders", name, {"n": 1})
                await (session.commit() if commit else session.rollback())
        return event_id

    kept = await run(True, "kept")
    dropped = await run(False, "dropped")
    assert isinstance(kept, uuid.UUID) and kept != dropped
    rows = all_rows(engine)
    assert [(r.event_id, r.event) for r in rows] == [(kept, "kept")]


async def test_async_enqueue_many(engine, async_engine):
    async with async_engine.begin() as conn:
        ids = await enqueue_many(conn, [OutboxEvent("orders", "e", i) for i in range(5)])
    assert [r.event_id for r in all_rows(engine)] == ids


def test_enqueue_is_part_of_the_business_transaction(engine):
    with engine.connect() as conn:
        conn.execute(sa.text("CREATE TABLE orders (id INTEGER PRIMARY KEY)"))
        conn.commit()
        conn.execute(sa.text("INSERT INTO orders (id) VALUES (1)"))
        enqueue(conn, "orders", "created", {"id": 1})
        conn.rollback()
        conn.execute(sa.text("INSERT INTO orders (id) VALUES (2)"))
        enqueue(conn, "orders", "created", {"id": 2})
        conn.commit()
        assert conn.execute(sa.text("SELECT id FROM orders")).scalars().all() == [2]
    assert [r.data for r in all_rows(engine)] == ['{"id":2}']


# -- what a row holds -------------------------------------------------------------------------


def test_data_str_as_is_and_other_values_as_compact_json(engine):
    with engine.begin() as conn:
        enqueue(conn, "a", "e", '{ "spaced" : 1 }')
        enqueue(conn, "a", "e", "plain text, not JSON")
        enqueue(conn, "a", "e", {"b": 1, "a": [1, 2.5, None], "text": "é ü ✓"})
        enqueue(conn, "a", "e", [1, "x"])
        enqueue(conn, "a", "e", None)
    assert [r.data for r in all_rows(engine)] == [
        '{ "spaced" : 1 }',
        "plain text, not JSON",
        '{"b":1,"a":[1,2.5,null],"text":"é ü ✓"}',
        '[1,"x"]',
        "null",
    ]


def test_optional_fields_are_stored(engine):
    with engine.begin() as conn:
        enqueue(
            conn,
            "orders",
            "created",
            "x",
            socket_id="123.456",
            info=["subscription_count", "user_count"],
            tags={"region": "eu"},
            extras={"ephemeral": True, "n": 1},
        )
    (row,) = all_rows(engine)
    assert row.socket_id == "123.456"
    assert row.info == "subscription_count,user_count"
    assert row.tags == '{"region":"eu"}'
    assert json.loads(row.extras) == {"ephemeral": True, "n": 1}
    assert row.attempts == 0 and row.status == "pending"


def test_a_row_key_is_derived_from_the_event_key_and_its_channel(engine):
    with engine.begin() as conn:
        event_id = enqueue(conn, "orders", "created", "x")
        given = enqueue(conn, "orders", "created", "x", idempotency_key="order-7-created")
    default_row, given_row = all_rows(engine)
    assert default_row.idempotency_key == derive_channel_key(str(event_id), "orders")
    assert given_row.idempotency_key == derive_channel_key("order-7-created", "orders")
    assert given_row.event_id == given


@pytest.mark.parametrize(
    ("key", "channel"),
    [("order-7-created", "orders"), ("", "a"), ("ключ-€-🚀", "private-encrypted-x"), ("k\n", "#")],
)
def test_a_derived_key_is_uuid5_of_the_key_and_channel_in_the_outbox_namespace(key, channel):
    """The derivation is a contract: rows written by every earlier release carry these keys,
    and an event enqueued again with its key must derive the same one, never a new one."""
    namespace = uuid.UUID("5b0c1a3e-8f7d-4e52-9a61-0f2d7c9b4e10")
    assert derive_channel_key(key, channel) == str(uuid.uuid5(namespace, f"{key}\n{channel}"))


@pytest.mark.parametrize("key", [None, "order-7-created"])
def test_several_channels_one_row_each_with_a_derived_key(engine, key):
    channels = ["orders", "private-orders", "presence-staff"]
    with engine.begin() as conn:
        event_id = enqueue(conn, channels, "created", {"id": 7}, idempotency_key=key)
    rows = all_rows(engine)
    base = key if key is not None else str(event_id)
    assert [r.channel for r in rows] == channels
    assert {r.event_id for r in rows} == {event_id}
    assert [r.idempotency_key for r in rows] == [derive_channel_key(base, c) for c in channels]
    assert len({r.idempotency_key for r in rows}) == 3
    assert base not in {r.idempotency_key for r in rows}
    assert {r.data for r in rows} == {'{"id":7}'}


@pytest.mark.parametrize(
    ("first", "second"),
    [(["a", "b"], "a"), ("a", ["b", "a"]), (["a", "b"], ["c", "b"])],
    ids=["list then one", "one then list", "list then list"],
)
def test_a_key_enqueued_again_for_a_channel_it_had_is_refused_however_listed(engine, first, second):
    """The row key of (event key, channel) does not depend on the list the channel came in, so
    the unique index catches the repeat instead of publishing the event twice on that channel."""
    with engine.begin() as conn:
        enqueue(conn, first, "created", "1", idempotency_key="K")
    with engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
        enqueue(conn, second, "created", "1", idempotency_key="K")


def test_encrypted_channel_rows_get_a_nonce_plain_rows_none(engine):
    with engine.begin() as conn:
        enqueue(conn, "private-encrypted-orders", "created", "secret")
        enqueue(conn, "private-encrypted-orders", "created", "secret")
        enqueue(conn, ["orders", "private-orders"], "created", "public")
    encrypted_a, encrypted_b, plain, private = all_rows(engine)
    assert isinstance(encrypted_a.encryption_nonce, bytes)
    assert len(encrypted_a.encryption_nonce) == crypto.NONCE_SIZE == 24
    assert encrypted_a.encryption_nonce != encrypted_b.encryption_nonce
    assert encrypted_a.data == "secret"  # plaintext stored; sealed at send time
    assert plain.encryption_nonce is None and private.encryption_nonce is None


# -- enqueue_many -------------------------------------------------------------------------------


def test_enqueue_many_writes_many_events_in_one_statement(engine, statements):
    events = [OutboxEvent("orders", "created", {"n": i}) for i in range(50)]
    events.append(OutboxEvent(["a", "b"], "fanout", "x", idempotency_key="fan-1"))
    with engine.begin() as conn:
        statements.clear()
        ids = enqueue_many(conn, events)
    assert len(inserts(statements)) == len(statements) == bulk_statements(engine)
    assert len(ids) == 51 and len(set(ids)) == 51
    rows = all_rows(engine)
    assert len(rows) == 52
    assert [r.event_id for r in rows[:50]] == ids[:50]
    assert [r.data for r in rows[:50]] == [f'{{"n":{i}}}' for i in range(50)]
    assert [r.idempotency_key for r in rows[50:]] == [
        derive_channel_key("fan-1", "a"),
        derive_channel_key("fan-1", "b"),
    ]


def test_enqueue_is_one_insert_statement_even_for_several_channels(engine, statements):
    with engine.begin() as conn:
        statements.clear()
        enqueue(conn, ["a", "b", "c"], "e", "x")
    assert len(inserts(statements)) == 1


def test_enqueue_many_2500_events_go_in_one_statement(engine, statements):
    with engine.begin() as conn:
        statements.clear()
        ids = enqueue_many(conn, (OutboxEvent("bulk", "e", str(i)) for i in range(2500)))
    assert len(ids) == 2500
    assert len(inserts(statements)) == len(statements) == bulk_statements(engine)
    with engine.connect() as conn:
        data = conn.execute(sa.select(T.c.data).order_by(T.c.id)).scalars().all()
    assert data == [str(i) for i in range(2500)]


BULK = [OutboxEvent("orders", "bulk", {"n": i}) for i in range(3 * COPY_FROM_ROWS)]


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
@pytest.mark.parametrize("kind", ["connection", "session", "begun connection"])
def test_bulk_enqueue_commits_and_rolls_back_with_the_caller(engine, kind, commit):
    """On PostgreSQL enough rows go by COPY; the caller's transaction still decides."""
    if kind == "session":
        with Session(engine) as session:
            ids = enqueue_many(session, BULK)
            session.commit() if commit else session.rollback()
    else:
        with engine.connect() as conn:
            if kind == "begun connection":
                conn.begin()
            ids = enqueue_many(conn, BULK)
            conn.commit() if commit else conn.rollback()
    rows = all_rows(engine)
    assert [r.event_id for r in rows] == (ids if commit else [])
    assert [r.data for r in rows] == ([f'{{"n":{i}}}' for i in range(len(BULK))] if commit else [])


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
@pytest.mark.parametrize("kind", ["connection", "session"])
async def test_async_bulk_enqueue_commits_and_rolls_back_with_the_caller(
    engine, async_engine, kind, commit
):
    if kind == "connection":
        async with async_engine.connect() as conn:
            ids = await enqueue_many(conn, BULK)
            await (conn.commit() if commit else conn.rollback())
    else:
        async with AsyncSession(async_engine) as session:
            ids = await enqueue_many(session, BULK)
            await (session.commit() if commit else session.rollback())
    assert [r.event_id for r in all_rows(engine)] == (ids if commit else [])


def test_a_duplicate_key_in_a_bulk_enqueue_is_an_integrity_error_and_nothing_is_written(engine):
    with engine.begin() as conn:
        enqueue(conn, "orders", "created", "1", idempotency_key="dup")
    events = [*BULK, OutboxEvent("orders", "created", "2", idempotency_key="dup")]
    with engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
        enqueue_many(conn, events)
    assert len(all_rows(engine)) == 1
    # In a savepoint, the caller's transaction survives the refusal and goes on.
    with engine.begin() as conn:
        with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():
            enqueue_many(conn, events)
        enqueue(conn, "orders", "after", "3")
    assert [r.event for r in all_rows(engine)] == ["created", "after"]


def test_enqueue_many_refuses_the_whole_call_for_one_bad_event(engine):
    events = [OutboxEvent("ok", "e", 1), OutboxEvent("bad channel", "e", 1)]
    with engine.connect() as conn:
        with pytest.raises(InvalidEvent) as info:
            enqueue_many(conn, events)
        conn.commit()
    assert info.value.field == "channel"
    assert str(info.value).startswith("event #1: ")
    assert all_rows(engine) == []


def test_enqueue_many_nothing_is_a_noop(engine, statements):
    with engine.begin() as conn:
        statements.clear()
        assert enqueue_many(conn, []) == []
    assert inserts(statements) == []


# -- idempotency keys are unique --------------------------------------------------------------


def test_the_same_idempotency_key_twice_is_an_integrity_error(engine):
    with engine.begin() as conn:
        enqueue(conn, "orders", "created", "1", idempotency_key="order-1")
    with engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
        enqueue(conn, "orders", "created", "again", idempotency_key="order-1")
    with engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
        enqueue_many(
            conn,
            [
                OutboxEvent("orders", "a", "1", idempotency_key="k"),
                OutboxEvent("orders", "b", "2", idempotency_key="k"),
            ],
        )
    assert [r.data for r in all_rows(engine)] == ["1"]


# -- bad input --------------------------------------------------------------------------------

ENC = "private-encrypted-orders"


def case(field: str, message: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    channel, event, data = args if args else ("orders", "created", "x")
    return (field, message, channel, event, data, kwargs)


BAD_INPUT = {
    "channel with a space": case("channel", "invalid channel name", "bad channel", "e", "x"),
    "channel with a slash": case("channel", "invalid channel name", "a/b", "e", "x"),
    "channel with non-ASCII": case("channel", "invalid channel name", "caf\u00e9", "e", "x"),
    "empty channel name": case("channel", "must not be empty", "", "e", "x"),
    "channel name too long": case("channel", "over the limit of 100", "c" * 101, "e", "x"),
    "channel NUL": case("channel", "NUL", "a\x00b", "e", "x"),
    "channel not a string": case("channel", "channel", 42, "e", "x"),
    "channel list with a non-string": case("channel", "must be a string", ["a", 7], "e", "x"),
    "channel None": case("channel", "channel", None, "e", "x"),
    "empty channel list": case("channel", "at least one channel", [], "e", "x"),
    "unknown namespace": case("channel", "namespace 'orders'", "orders:eu", "e", "x"),
    "unknown namespace after a prefix": case(
        "channel", "namespace 'room'", "private-room:1", "e", "x"
    ),
    "user-limited channel": case("channel", "user-limited", "chat#users", "e", "x"),
    "extras headers nested": case("extras", "headers", extras={"headers": {"a": {"b": 1}}}),
    "extras headers null": case("extras", "headers", extras={"headers": {"a": None}}),
    "extras ephemeral not a bool": case("extras", "ephemeral", extras={"ephemeral": "yes"}),
    "extras echo not a bool": case("extras", "echo", extras={"echo": 1}),
    "extras idempotencyKey not a string": case(
        "extras", "idempotencyKey", extras={"idempotencyKey": 5}
    ),
    "extras ai transport not strings": case("extras", "ai", extras={"ai": {"transport": {"k": 1}}}),
    "same channel twice": case("channel", "twice", ["a", "b", "a"], "e", "x"),
    "event name too long": case("event", "over the limit of 100", "a", "e" * 101, "x"),
    "event name empty": case("event", "must not be empty", "a", "", "x"),
    "event not a string": case("event", "must be a string", "a", 5, "x"),
    "event NUL": case("event", "NUL", "a", "ev\x00", "x"),
    "event lone surrogate": case("event", "lone surrogate", "a", "ev\ud800", "x"),
    "data over the limit": case(
        "data", "over the limit of 102400", "a", "e", "x" * (100 * 1024 + 1)
    ),
    "dict data over the limit": case("data", "over the limit", "a", "e", {"k": "x" * 102400}),
    "encrypted data over the limit once sealed": case(
        "data", "once encrypted", ENC, "e", "x" * 80_000
    ),
    "data not serializable": case("data", "not JSON-serializable", "a", "e", {"when": object()}),
    "data bytes": case("data", "not JSON-serializable", "a", "e", b"raw"),
    "data NaN": case("data", "not JSON-serializable", "a", "e", {"x": math.nan}),
    "data infinity": case("data", "not JSON-serializable", "a", "e", [math.inf]),
    "data str with NUL": case("data", "NUL", "a", "e", "a\x00b"),
    "data str lone surrogate": case("data", "lone surrogate", "a", "e", "a\udc80b"),
    "data dict lone surrogate": case("data", "lone surrogate", "a", "e", {"k": "\ud83d"}),
    "key over 128 bytes": case(
        "idempotency_key", "over the limit of 128", idempotency_key="k" * 129
    ),
    "key 128 bytes of multibyte": case(
        "idempotency_key", "over the limit of 128", idempotency_key="\u00e9" * 65
    ),
    "key empty": case("idempotency_key", "must not be empty", idempotency_key=""),
    "key not a string": case("idempotency_key", "must be a string", idempotency_key=12),
    "key NUL": case("idempotency_key", "NUL", idempotency_key="k\x00"),
    "socket_id not a string": case("socket_id", "must be a string", socket_id=1.5),
    "socket_id too long": case("socket_id", "longer than 64", socket_id="1" * 65),
    "tags not a mapping": case("tags", "must be a mapping", tags=["a", "b"]),
    "tags non-string value": case("tags", "strings to strings", tags={"n": 1}),
    "tags lone surrogate": case("tags", "lone surrogate", tags={"k": "\udfff"}),
    "extras not a mapping": case("extras", "must be a mapping", extras="ephemeral"),
    "extras not serializable": case("extras", "not JSON-serializable", extras={"s": {1, 2}}),
    "extras NaN": case("extras", "not JSON-serializable", extras={"x": math.nan}),
    "extras lone surrogate": case("extras", "lone surrogate", extras={"k": "\ud800"}),
    "info wrong type": case("info", "string or a list of strings", info=5),
    "info list with a non-string": case("info", "string or a list of strings", info=["a", 1]),
    "info list with NUL": case("info", "NUL", info=["user_count", "a\x00"]),
    "info empty": case("info", "must not be empty", info=""),
    "info too long": case("info", "longer than 200", info="i" * 201),
}


@pytest.mark.parametrize(
    ("field", "message", "channel", "event", "data", "kwargs"),
    list(BAD_INPUT.values()),
    ids=list(BAD_INPUT),
)
def test_bad_input_is_refused_and_the_transaction_stays_usable(
    engine, statements, field, message, channel, event, data, kwargs
):
    with engine.connect() as conn:
        before = enqueue(conn, "orders", "before", "1")
        statements.clear()
        with pytest.raises(InvalidEvent) as info:
            enqueue(conn, channel, event, data, **kwargs)
        assert statements == []  # refused before any SQL ran
        after = enqueue(conn, "orders", "after", "2")
        # On PostgreSQL a failed statement would have aborted the transaction: this would fail.
        conn.commit()
    assert info.value.field == field
    text = str(info.value)
    assert message in text
    assert "\n" not in text and len(text) < 300
    assert [(r.event_id, r.event) for r in all_rows(engine)] == [
        (before, "before"),
        (after, "after"),
    ]


def test_limits_are_inclusive(engine):
    """The edges of the catalogue above are accepted (so the cases above test the limits)."""
    with engine.begin() as conn:
        enqueue(conn, "c" * 100, "e" * 100, "x" * (100 * 1024), idempotency_key="k" * 128)
        enqueue(conn, [f"c{i}" for i in range(100)], "e", "x")
        enqueue(conn, ENC, "e", "x" * 76_000)
        enqueue(conn, "a", "e", {"k": "a\x00b"})  # JSON escapes it: stored as \\u0000
        enqueue(conn, "a", "e", "x", socket_id="1" * 64, info="i" * 200)
    rows = all_rows(engine)
    assert len(rows) == 1 + 100 + 1 + 1 + 1
    assert rows[102].data == '{"k":"a\\u0000b"}'


def test_what_the_outbox_can_send_is_accepted(engine):
    """One row per channel: more channels than one request may carry, and an encrypted channel
    beside plain ones, are fine; so are server-to-user channels, namespaces the app declares, and
    typed extras."""
    limits = Limits(namespaces=frozenset({"orders"}))
    with engine.begin() as conn:
        enqueue(conn, [f"c{i}" for i in range(150)], "e", "x")
        enqueue(conn, [ENC, "orders"], "e", "x")
        enqueue(conn, "#server-to-user-7", "e", "x")
        enqueue(conn, ["orders:eu", "private-orders:eu"], "e", "x", limits=limits)
        enqueue(
            conn,
            "a",
            "e",
            "x",
            extras={
                "headers": {"s": "v", "n": 1.5, "b": True},
                "ephemeral": False,
                "echo": None,
                "idempotencyKey": "k",
                "push": {"anything": [1, 2]},
                "ai": {"transport": {"k": "v"}},
                "vendorExtension": {"nested": {"ok": 1}},
            },
        )
    rows = all_rows(engine)
    assert len(rows) == 150 + 2 + 1 + 2 + 1
    assert [r.encryption_nonce is not None for r in rows[150:152]] == [True, False]


async def test_bad_input_on_an_async_connection_leaves_it_usable(engine, async_engine):
    async with async_engine.connect() as conn:
        with pytest.raises(InvalidEvent) as info:
            await enqueue(conn, "bad channel", "e", "x")
        await enqueue(conn, "orders", "after", "2")
        await conn.commit()
    assert info.value.field == "channel"
    assert [r.event for r in all_rows(engine)] == ["after"]


def test_not_a_database_target_is_a_type_error():
    target: Callable[[], None] = lambda: None  # noqa: E731
    with pytest.raises(TypeError, match="expected a SQLAlchemy Session"):
        enqueue(target, "orders", "e", "x")  # type: ignore[call-overload]
