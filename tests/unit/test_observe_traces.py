"""OpenTelemetry spans per batch read and per sink write; an input's ``traceparent`` carried to its outputs."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import asyncflow as af
from asyncflow.observe.traces import configure_traces, traceparent_of, tracer_for
from asyncflow.testing import TestRun, wait_for

INPUT_TRACE = "0af7651916cd43dd8448eb211c80319c"
INPUT_PARENT = f"00-{INPUT_TRACE}-b7ad6b7169203331-01"


def _app(name: str) -> af.App:
    app = af.App(name)
    rides, out = app.topic("rides"), app.topic("out")

    @app.agent(rides)
    async def forward(stream: af.Stream[Any]) -> None:
        async for v in stream:
            await out.send(None, v)

    return app


async def test_batches_read_and_written_are_spans_linked_to_the_records_trace_context() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = _app("traced")
    configure_traces(app, provider)
    async with TestRun(app) as run:
        await run.send("rides", {"n": 1}, headers=[("traceparent", INPUT_PARENT.encode())])
        await wait_for(lambda: len(run.outputs("out")) == 1)
        await run.send("rides", {"n": 2})  # no trace context of its own
        await wait_for(lambda: len(run.outputs("out")) == 2)
        await run.finish()
    spans = exporter.get_finished_spans()
    reads = [s for s in spans if s.name == "asyncflow.read rides"]
    assert [format(link.context.trace_id, "032x") for s in reads for link in s.links] \
        == [INPUT_TRACE]
    writes = [s for s in spans if s.name.startswith("asyncflow.write")]
    linked = {format(link.context.trace_id, "032x") for s in writes for link in s.links}
    assert INPUT_TRACE in linked
    first, second = (traceparent_of(r.headers) for r in run.broker.records("out"))
    assert first == INPUT_PARENT  # carried from the input
    own = {format(s.context.trace_id, "032x") for s in writes}
    assert second is not None and second.split("-")[1] in own  # the write span's


async def test_without_a_tracer_provider_no_header_is_added_and_no_tracer_is_made() -> None:
    app = _app("untraced")
    assert tracer_for(app) is None
    async with TestRun(app) as run:
        await run.send("rides", {"n": 1})
        await wait_for(lambda: len(run.outputs("out")) == 1)
        await run.finish()
    assert traceparent_of(run.broker.records("out")[0].headers) is None


async def test_an_output_carries_the_traceparent_of_the_input_event_it_was_sent_for() -> None:
    provider = TracerProvider()
    app = _app("carried")
    configure_traces(app, provider)
    other = "00-11111111111111111111111111111111-2222222222222222-01"
    async with TestRun(app) as run:
        await run.send("rides", {"n": 1}, headers=[("traceparent", INPUT_PARENT.encode())])
        await run.send("rides", {"n": 2}, headers=[("traceparent", other.encode())])
        await wait_for(lambda: len(run.outputs("out")) == 2)
        await run.finish()
    carried = [traceparent_of(r.headers) for r in run.broker.records("out")]
    assert carried == [INPUT_PARENT, other]
