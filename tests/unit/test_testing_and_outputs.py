"""Agents forwarding to outputs, and the test harness moving time by hand."""

from datetime import timedelta
from typing import Any

import asyncflow as af
from asyncflow.testing import CaptureSink, TestRun, wait_for


async def test_an_async_generator_agent_sends_what_it_yields_to_its_sinks_keyed_by_the_event() -> None:
    app = af.App("gen")
    words = app.topic("words")
    lengths = app.topic("lengths")
    audit = app.sink(CaptureSink("audit"))

    @app.agent(words, sink=[lengths, audit])
    async def measure(stream: af.Stream[str]) -> Any:
        async for w in stream:
            yield len(w)

    async with TestRun(app) as run:
        await run.send("words", "hello", key="a")
        await run.send("words", "hi", key="b")
        await run.finish()
        assert run.outputs("lengths") == [5, 2]
        assert [(r.key, r.value) for r in audit.sink.records] == [("a", 5), ("b", 2)]
        assert run.broker.committed("gen", "words", 0) == 2


async def test_processing_time_windows_fire_when_the_manual_clock_moves() -> None:
    clock = af.ManualClock(wall_ms=1_000_000)
    app = af.App("ptime", watermark_interval=0.01)
    clicks = app.topic("clicks")
    out = app.sink(CaptureSink("out"))

    @app.agent(clicks)
    async def count(stream: af.Stream[str]) -> None:
        windows = stream.window(af.ProcessingTumbling(timedelta(seconds=10)), aggregate=af.Count())
        async for w in windows:
            await out.send(w.key, (w.start_ms, w.value))

    async with TestRun(app, clock=clock) as run:
        for _ in range(3):
            await run.send("clicks", "x", key="page")
        await wait_for(lambda: app.metrics.get("events_in") == 3)
        await run.advance(0.001)  # a tick at the same wall time: the window is still open
        assert out.sink.values == []
        await run.advance(10)
        await wait_for(lambda: len(out.sink.values) == 1)
        assert out.sink.values == [(1_000_000, 3)]
        await run.stop()


async def test_sending_outside_a_running_app_is_a_clear_error() -> None:
    app = af.App("idle")
    topic = app.topic("t")
    try:
        await topic.send(None, 1)
    except af.ConfigError as exc:
        assert "the app 'idle' is not running" in str(exc)
    else:
        raise AssertionError("send outside a running app must fail")
