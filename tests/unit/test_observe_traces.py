"""OpenTelemetry spans per batch read and per sink write, and ``traceparent`` carried to outputs."""

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
        await run.finish()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    read = spans["asyncflow.read rides"]
    assert [format(link.context.trace_id, "032x") for link in read.links] == [INPUT_TRACE]
    write = next(s for name, s in spans.items() if name.startswith("asyncflow.write"))
    carried = traceparent_of(run.broker.records("out")[0].headers)
    assert carried is not None and format(write.context.trace_id, "032x") in carried


async def test_without_a_tracer_provider_no_header_is_added_and_no_tracer_is_made() -> None:
    app = _app("untraced")
    assert tracer_for(app) is None
    async with TestRun(app) as run:
        await run.send("rides", {"n": 1})
        await wait_for(lambda: len(run.outputs("out")) == 1)
        await run.finish()
    assert traceparent_of(run.broker.records("out")[0].headers) is None
