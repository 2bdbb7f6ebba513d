"""OpenTelemetry: enqueue keeps the caller's trace context on the row; the worker makes one span per
publish request, linked to every row's enqueue span; a retry is a new linked span, never a child.

Spans are collected by the SDK's in-memory exporter, from an in-process worker publishing to the
test server. The provider is the process's global one (OpenTelemetry allows setting it once).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from outbox import OutboxEvent, enqueue, enqueue_many, outbox_table
from outbox.settings import Settings
from outbox.tracing import current_traceparent
from outbox.worker import Worker
from tests.outbox_rows import EV

T = outbox_table()
EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracer_provider() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


def app_tracer() -> trace.Tracer:
    return trace.get_tracer("the-app")


def drain(engine: sa.Engine, sockudo_url: str, total: int) -> None:
    """Run a worker until ``total`` rows are published (generous deadline)."""
    settings = Settings(
        database_url=str(engine.url),
        sockudo_url=sockudo_url,
        poll_interval=0.05,
        backoff_min_seconds=0.05,
        backoff_max_seconds=0.2,
        retention_seconds=0,
    )
    worker = Worker(settings, engine=engine)

    async def run() -> None:
        task = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 60
        try:
            while published(engine) < total:
                assert time.monotonic() < deadline, "the worker did not publish everything"
                assert not task.done(), "the worker stopped"
                await asyncio.sleep(0.05)
        finally:
            worker.stop()
            await task

    asyncio.run(run())


def published(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).where(EV.c.status == "published")
        ).scalar_one()


def publish_spans(exporter: InMemorySpanExporter) -> list:
    return [s for s in exporter.get_finished_spans() if s.instrumentation_scope.name == "outbox"]


def test_one_span_per_request_linked_to_each_rows_enqueue_span(engine, sockudo_server, spans):
    enqueue_spans = {}
    for i in range(3):
        with app_tracer().start_as_current_span(f"place order {i}") as span, engine.begin() as c:
            enqueue(c, "orders", "created", {"i": i})
            enqueue_spans[i] = span.get_span_context()
    # One event enqueued with no span current: no context stored, no link.
    with engine.begin() as conn:
        enqueue(conn, "orders", "created", {"i": "untraced"})
    with engine.connect() as conn:
        stored = conn.execute(sa.select(T.c.traceparent).order_by(T.c.id)).scalars().all()
    assert stored[3] is None
    for i, context in enqueue_spans.items():
        flags = int(context.trace_flags)
        assert stored[i] == f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"

    drain(engine, sockudo_server.url, 4)
    (send,) = publish_spans(spans)  # the four rows went in one batch: one request, one span
    assert sockudo_server.request_count() == 1
    assert send.name == "send" and send.kind is SpanKind.CLIENT
    assert send.parent is None  # linked, not nested
    linked = {(link.context.trace_id, link.context.span_id) for link in send.links}
    assert linked == {(c.trace_id, c.span_id) for c in enqueue_spans.values()}
    attributes = dict(send.attributes or {})
    assert attributes["messaging.system"] == "sockudo"
    assert attributes["messaging.operation.type"] == "send"
    assert attributes["messaging.batch.message_count"] == 4
    assert attributes["outbox.endpoint"] == "batch_events"
    assert attributes["server.port"] == sockudo_server.port
    assert send.status.status_code is StatusCode.UNSET


def test_a_retry_is_a_new_span_linked_again_never_a_child(engine, sockudo_server, spans):
    with app_tracer().start_as_current_span("checkout") as span, engine.begin() as conn:
        enqueue_many(conn, [OutboxEvent("orders", "created", {"i": i}) for i in range(2)])
        checkout = span.get_span_context()
    # The batch fails once (after the server claimed its keys): each row is then sent alone.
    sockudo_server.fail_next(1, status=500, endpoints=("batch_events",))
    drain(engine, sockudo_server.url, 2)

    sent = publish_spans(spans)
    assert len(sent) == sockudo_server.request_count() == 3  # one span per request
    failed = [s for s in sent if s.attributes["outbox.endpoint"] == "batch_events"]
    alone = [s for s in sent if s.attributes["outbox.endpoint"] == "events"]
    assert len(failed) == 1 and len(alone) == 2
    assert failed[0].status.status_code is StatusCode.ERROR
    assert failed[0].attributes["error.type"] == "unavailable"
    for s in sent:
        assert s.parent is None
        assert [(link.context.trace_id, link.context.span_id) for link in s.links] == [
            (checkout.trace_id, checkout.span_id)
        ] * len(s.links)
    assert len(failed[0].links) == 2
    for s in alone:
        assert len(s.links) == 1
        assert s.attributes["messaging.destination.name"] == "orders"
        assert s.status.status_code is StatusCode.UNSET
    # Separate traces: the retries do not hang under the failed request.
    assert len({s.context.trace_id for s in sent}) == 3


def test_without_a_current_span_nothing_is_stored():
    assert current_traceparent() is None


PROBE = """
import sys
import sqlalchemy as sa
from outbox import enqueue, migrate
from outbox.database import create_engine

engine = create_engine(sys.argv[1])
migrate.upgrade(engine)
with engine.begin() as conn:
    enqueue(conn, "orders", "created", "{}")
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
"""


def test_enqueue_imports_no_opentelemetry_when_the_app_does_not(tmp_path):
    """The extra is installed here; an application that does not trace never imports it."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, url], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
