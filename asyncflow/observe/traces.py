"""OpenTelemetry traces (the optional ``traces`` extra): a span per batch read and per sink write.

With ``opentelemetry-api`` installed and a tracer provider configured
(``opentelemetry.trace.set_tracer_provider(...)``, or ``configure_traces(app,
provider)`` for one app), the worker makes:

* ``asyncflow.read <topic>``: one span per batch a source returned (dispatched
  to the lanes), with the topic, partition, offsets and record count, and a
  *link* to the trace context of each record that carried a W3C ``traceparent``
  header (at most ``MAX_LINKS``), so a producer's trace leads into the worker;
* ``asyncflow.write <sink>``: one span per batch a sink writes, linked to the
  ``traceparent`` of each output record that has one; output records without
  one get this span's ``traceparent`` header, so on Kafka the next worker's
  read span links back to it: one event's path can be followed across workers
  from link to link.

* the input's ``traceparent``, carried: a record an agent sends while it
  handles an event that has a ``traceparent`` header (the lane's stream's
  current event) gets that header, unless it has one already, so its output
  stays in the input's trace from worker to worker.

Without the API, or with no provider configured (OpenTelemetry's default proxy),
``tracer_for`` returns ``None`` and the hot paths pay one ``is None`` check per
batch.

Example:
    >>> import asyncflow as af
    >>> tracer_for(af.App("untraced")) is None
    True
    >>> traceparent_of([("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")])
    '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

MAX_LINKS = 32
"""Links a span keeps to the records' own traces (the rest are left out)."""

TRACEPARENT = "traceparent"
"""The W3C trace-context header carried in Kafka record headers."""

_providers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

LANE_STREAM: contextvars.ContextVar[Any] = contextvars.ContextVar("asyncflow_lane_stream",
                                                                  default=None)
"""The stream of the lane whose task runs (set only when traced: ``lane_context``)."""


def lane_context(stream: Any) -> contextvars.Context:
    """A context for a lane's task in which ``LANE_STREAM`` is that lane's stream.

    Example:
        >>> ctx = lane_context("the stream")
        >>> ctx.run(LANE_STREAM.get), LANE_STREAM.get()
        ('the stream', None)
    """
    ctx = contextvars.copy_context()
    ctx.run(LANE_STREAM.set, stream)
    return ctx


def carry_traceparent(record: Any) -> None:
    """Give ``record`` the ``traceparent`` of the event its lane handles now, if it has none.

    Called by the sink writers only when traced; outside a lane, or for an
    event without the header, nothing changes.

    Example:
        >>> from types import SimpleNamespace
        >>> from asyncflow.protocols import SinkRecord
        >>> event = SimpleNamespace(headers=[("traceparent", b"00-ab-cd-01")])
        >>> record = SinkRecord(None, b"v")
        >>> lane_context(SimpleNamespace(current=event)).run(carry_traceparent, record)
        >>> record.headers
        [('traceparent', b'00-ab-cd-01')]
    """
    stream = LANE_STREAM.get()
    if stream is None:
        return
    event = getattr(stream, "current", None)
    headers = getattr(event, "headers", None)
    if not headers or traceparent_of(record.headers) is not None:
        return
    for name, value in headers:
        if name == TRACEPARENT and value:
            record.headers = [*record.headers, (TRACEPARENT, value)]
            return


def configure_traces(app: Any, provider: Any) -> None:
    """Trace ``app`` with ``provider`` (an OpenTelemetry ``TracerProvider``; ``None``: the global).

    Example:
        >>> import asyncflow as af
        >>> app = af.App("traced"); configure_traces(app, None); tracer_for(app) is None
        True
    """
    _providers[app] = provider


def tracer_for(app: Any) -> Any | None:
    """A tracer for ``app``, or ``None`` when OpenTelemetry is absent or not configured."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    provider = _providers.get(app)
    if provider is None:
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return None
    return provider.get_tracer("asyncflow")


def traceparent_of(headers: Iterable[tuple[str, bytes]] | None) -> str | None:
    """The ``traceparent`` header's value, if any."""
    if not headers:
        return None
    for name, value in headers:
        if name == TRACEPARENT and value:
            return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return None


def _links(headers_seq: Iterable[Any]) -> list[Any]:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    links = []
    for headers in headers_seq:
        parent = traceparent_of(headers)
        if parent is None:
            continue
        context = trace.get_current_span(propagator.extract({TRACEPARENT: parent})).get_span_context()
        if context.is_valid:
            links.append(trace.Link(context))
            if len(links) >= MAX_LINKS:
                break
    return links


def read_span(tracer: Any, topic: str, partition: Any, records: Sequence[Any]) -> None:
    """Record the span of one batch read and dispatched (ended at once: dispatch never waits)."""
    links = _links(getattr(r, "headers", None) for r in records)
    span = tracer.start_span(
        f"asyncflow.read {topic}", links=links,
        attributes={"messaging.destination.name": topic,
                    "messaging.destination.partition.id": str(getattr(partition, "partition",
                                                                      partition)),
                    "messaging.batch.message_count": len(records),
                    "asyncflow.offset.first": records[0].offset,
                    "asyncflow.offset.last": records[-1].offset})
    span.end()


def start_write_span(tracer: Any, sink: str, records: Sequence[Any]) -> Any:
    """Start the span of one sink write; records without a ``traceparent`` get this span's.

    Returns the span; the caller ends it once the write returns.
    """
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    span = tracer.start_span(f"asyncflow.write {sink}", links=_links(r.headers for r in records),
                             attributes={"asyncflow.sink": sink,
                                         "messaging.batch.message_count": len(records)})
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
    header = carrier.get(TRACEPARENT)
    if header is not None:
        value = header.encode()
        for r in records:
            if traceparent_of(r.headers) is None:
                r.headers = [*r.headers, (TRACEPARENT, value)]
    return span
