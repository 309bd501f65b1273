"""Poison and event times: units stated, not guessed; what cannot be a time says so; a flood of poison is bounded."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
import pytest

import asyncflow as af
from asyncflow.errors import ConfigError
from asyncflow.memory import MemoryBroker
from asyncflow.testing import CaptureSink, TestRun, reason_of


class Reading(af.Record):
    id: str
    time: af.EventTime


def load(broker: MemoryBroker, docs: list[Any]) -> None:
    broker.create_topic("readings", 1)
    for d in docs:
        broker.produce("readings", orjson.dumps(d), b"k")
    broker.end("readings")


async def counts(broker: MemoryBroker, **topic: Any) -> tuple[list[Any], list[str]]:
    app = af.App("units", broker=broker)
    readings = app.topic("readings", **topic)
    out = app.sink(CaptureSink("out"))

    @app.agent(readings)
    async def count(stream: af.Stream[Any]) -> None:
        async for w in stream.window(af.Tumbling(timedelta(seconds=5)), aggregate=af.Count()):
            await out.send(w.key, (w.start_ms, w.value))

    async with TestRun(app, broker=broker) as run:
        await run.finish()
        dead = [reason_of(r) for r in run.dead_letters()]
    return sorted(out.sink.values), dead


async def test_a_field_in_milliseconds_is_read_as_milliseconds_when_the_topic_says_so() -> None:
    broker = MemoryBroker()
    load(broker, [{"t": 1_000}, {"t": 4_000}, {"t": 6_000}])
    assert await counts(broker, time="t", time_unit="ms") == ([(0, 2), (5000, 1)], [])


async def test_a_time_just_before_a_window_end_stays_in_that_window_as_a_batch_would_place_it() -> None:
    # 4.9998 s is before 5 s: floored to the millisecond, not rounded up into [5, 10)
    broker = MemoryBroker()
    load(broker, [{"t": 4.9998}, {"t": 5.0}, {"t": 1.001}])
    assert await counts(broker, time="t") == ([(0, 2), (5000, 1)], [])


async def test_a_record_time_just_before_a_window_end_stays_in_that_window() -> None:
    broker = MemoryBroker()
    load(broker, [{"id": "a", "time": 4.9998}, {"id": "a", "time": 5.0}])
    assert await counts(broker, value_type=Reading) == ([(0, 1), (5000, 1)], [])


async def test_milliseconds_read_as_seconds_are_dead_letters_that_name_the_field_and_the_unit() -> None:
    broker = MemoryBroker()
    load(broker, [{"t": 1_700_000_000_000}, {"t": 1_700_000_000}])
    windows, dead = await counts(broker, time="t")
    assert windows == [(1_700_000_000_000, 1)]  # the reading in seconds: 2023-11-14
    assert len(dead) == 1
    assert "field 't'" in dead[0] and "epoch seconds" in dead[0] and "time_unit='ms'" in dead[0]


@pytest.mark.parametrize(("value", "says"), [(1e20, "after the year 9999"), (-1e15, "before the year 1")])
async def test_an_event_time_field_out_of_range_is_a_dead_letter_naming_it(value: float, says: str) -> None:
    broker = MemoryBroker()
    load(broker, [{"id": "a", "time": value}, {"id": "a", "time": 1.0}])
    windows, dead = await counts(broker, value_type=Reading)
    assert windows == [(0, 1)]
    assert len(dead) == 1 and "field 'time'" in dead[0] and says in dead[0]


def test_a_time_unit_that_is_not_one_is_refused_at_declaration() -> None:
    with pytest.raises(ConfigError, match="time_unit='sec'"):
        af.App("u").topic("t", time="t", time_unit="sec")


async def test_a_flood_of_poison_waits_for_its_dead_letters_instead_of_piling_them_up() -> None:
    import asyncio

    broker = MemoryBroker()
    broker.create_topic("in", 1)
    for i in range(20_000):
        broker.produce("in", b"{not json %d" % i, b"k")
    broker.produce("in", b'{"ok": 1}', b"k")
    broker.end("in")
    dead = CaptureSink("dead", delay=0.001, max_batch=100)  # a slow dead-letter sink
    app = af.App("flood", broker=broker, dead_letter=dead, fetch_max=500)
    good = app.sink(CaptureSink("good"))

    @app.agent(app.topic("in"))
    async def keep(stream: af.Stream[Any]) -> None:
        async for v in stream:
            await good.send(None, v)

    peak = 0
    async with TestRun(app, broker=broker) as run:

        async def watch() -> None:
            nonlocal peak
            while True:
                runtime = app._runtime
                if runtime is not None and "__dead_letters__" in runtime.writers:
                    peak = max(peak, runtime.writers["__dead_letters__"].buffered)
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        await run.finish(timeout=120)
        watcher.cancel()
    assert len(dead.records) == 20_000 and good.sink.values == [{"ok": 1}]
    assert peak <= 1_000 + 500  # the writer's bound and one fetch, not the whole flood
    assert app.metrics.get("reads_held_for_outputs") > 0
