"""OpenTelemetry traces (the otel extra): from the transaction that enqueued an event to the request
that published it.

* :func:`current_traceparent` is what ``enqueue`` stores on each row: the W3C ``traceparent`` of the
  span current in the caller, or None. An application that does not use OpenTelemetry has not
  imported it, and then nothing is imported here either (it could not have a current span).
* :class:`PublishSpans` makes one span per publish request (``send``, kind CLIENT, as the
  OpenTelemetry messaging conventions ask of a batch send whose messages were created elsewhere),
  with a link to every row's creating context. A retry is a new request: a new span with its own
  links, never a child of the failed one. Each span starts a trace of its own (links, not parents:
  a batch has many creators).

The worker uses whatever tracer provider the process configured (your application's, or
``opentelemetry-instrument outbox worker``); without one the API records nothing.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .sockudo.errors import request_result

if TYPE_CHECKING:
    from .drivers import ClaimedRow

#: The W3C header the context travels in (and the column that keeps it).
TRACEPARENT = "traceparent"


def current_traceparent() -> str | None:
    """The caller's current trace context as a W3C ``traceparent``, or None (no current span)."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get(TRACEPARENT)


class PublishSpans:
    """One span per publish request, linked to the rows' enqueue spans."""

    def __init__(self, server_address: str, server_port: int, version: str) -> None:
        from opentelemetry import trace

        self._trace = trace
        self._tracer = trace.get_tracer("outbox", version)
        self._server = {"server.address": server_address, "server.port": server_port}

    @contextlib.contextmanager
    def request(self, endpoint: str, rows: Sequence[ClaimedRow]) -> Iterator[None]:
        from opentelemetry.context import Context
        from opentelemetry.trace import Link, SpanKind, Status, StatusCode

        links = [Link(c) for c in (_span_context(r.traceparent) for r in rows) if c is not None]
        attributes: dict[str, Any] = {
            "messaging.system": "sockudo",
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "outbox.endpoint": endpoint,
            **self._server,
        }
        if len(rows) == 1:
            attributes["messaging.destination.name"] = rows[0].channel
            attributes["messaging.message.id"] = rows[0].idempotency_key
        else:
            attributes["messaging.batch.message_count"] = len(rows)
        with self._tracer.start_as_current_span(
            "send",
            context=Context(),  # a root: the creators are linked, none is the parent
            kind=SpanKind.CLIENT,
            links=links,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except Exception as exc:
                span.set_attribute("error.type", request_result(exc))
                span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
                raise


def _span_context(traceparent: str | None) -> Any:
    if not traceparent:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract({TRACEPARENT: traceparent})
    span_context = trace.get_current_span(context).get_span_context()
    return span_context if span_context.is_valid else None


def publish_spans(server_address: str, server_port: int, version: str) -> PublishSpans | None:
    """Spans for the worker's requests if the OpenTelemetry API is installed, else None.

    ``version`` is the package's, for the tracer: given by the worker, because the package
    itself imports this module (through enqueue, for the trace context of new rows)."""
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return None
    return PublishSpans(server_address, server_port, version)
