"""A per-item loop over a lane's columns: no event per record unless someone asks for it.

``async for value in stream`` over a chain of ``map`` and ``filter`` steps (or
none) asks its lane for columns, as ``stream.batches()`` does, and runs each
value through the chain as it gets to it. ``stream.current`` is made from the
slice's columns only when it is read. What must hold is what held with
events: the same values with the same keys, times, headers and positions, the
chain run value by value in step with the body, failures dead-lettered or
retried in order, and a slice left halfway through continued by whatever
reads the stream next.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncflow as af
from asyncflow.memory import MemoryBroker
from asyncflow.testing import CaptureSink, TestRun, reason_of


def produce(broker: MemoryBroker, docs: list[dict[str, Any]], partitions: int = 1) -> None:
    broker.create_topic("in", partitions=partitions)
    for d in docs:
        headers = (("n", str(d["n"]).encode()),) if d["n"] % 2 else ()
        broker.produce("in", orjson.dumps(d), d["k"].encode(), headers, d["t"])
    broker.end("in")


def docs_of(ns: list[int]) -> list[dict[str, Any]]:
    return [{"k": f"s{n % 3}", "n": n, "t": 1_000 + i} for i, n in enumerate(ns)]


@settings(max_examples=25, deadline=None)
@given(
    ns=st.lists(st.integers(0, 20), max_size=60),
    fetch_max=st.integers(1, 9),
    lanes=st.integers(1, 3),
)
async def test_each_value_comes_with_its_own_event_as_a_plain_computation_says(
    ns: list[int], fetch_max: int, lanes: int
) -> None:
    broker = MemoryBroker()
    docs = docs_of(ns)
    produce(broker, docs, partitions=2)
    app = af.App("items-columns", broker=broker, fetch_max=fetch_max)
    numbers = app.topic("in", partitions=2)
    out = app.sink(CaptureSink("out"))

    @app.agent(numbers, concurrency=lanes)
    async def keep(stream: af.Stream[dict[str, Any]]) -> None:
        async for v in stream.map(lambda d: d["n"] * 10).filter(lambda v: v % 3 != 0):
            ev = stream.current
            assert ev is not None
            await out.send(None, (ev.key, v, ev.time, tuple(ev.headers), ev.partition.partition,
                                  ev.offset))

    async with TestRun(app, broker=broker) as run:
        await run.finish()
    # an independent computation over what the broker holds, partition by partition
    expected = sorted(
        (r.key.decode(), n * 10, r.timestamp, tuple(r.headers), p, r.offset)
        for p, part in enumerate(broker.topic("in").partitions)
        for r in part
        if r.key is not None and r.value is not None
        and (n := orjson.loads(r.value)["n"]) * 10 % 3 != 0
    )
    assert sorted(out.sink.values) == expected
    assert len(expected) == sum(1 for n in ns if n * 10 % 3)


async def test_a_lane_read_one_item_at_a_time_gets_columns_from_its_first_batch() -> None:
    broker = MemoryBroker()
    produce(broker, docs_of(list(range(40))))
    app = af.App("items-ask", broker=broker, fetch_max=4, lane_capacity=4)
    numbers = app.topic("in")
    seen: list[tuple[int, bool]] = []

    @app.agent(numbers)
    async def look(stream: af.Stream[dict[str, Any]]) -> None:
        async for v in stream.map(lambda d: d["n"]):
            seen.append((v, stream._cols is not None))

    async with TestRun(app, broker=broker) as run:
        await run.finish()
    assert [v for v, _ in seen] == list(range(40))
    # columns from the first batch on, those queued before the agent started included
    assert all(cols for _, cols in seen)


async def test_the_chain_runs_in_step_with_the_body_not_ahead_of_it() -> None:
    broker = MemoryBroker()
    produce(broker, docs_of(list(range(8))))
    app = af.App("items-in-step", broker=broker, fetch_max=4)
    numbers = app.topic("in")
    trace: list[str] = []

    def mapped(d: dict[str, Any]) -> int:
        trace.append(f"map {d['n']}")
        return int(d["n"])

    @app.agent(numbers)
    async def body(stream: af.Stream[dict[str, Any]]) -> None:
        async for v in stream.map(mapped):
            trace.append(f"body {v}")

    async with TestRun(app, broker=broker) as run:
        await run.finish()
    assert trace == [f"{step} {n}" for n in range(8) for step in ("map", "body")]


async def test_a_step_failing_on_a_value_of_a_slice_dead_letters_that_record_and_goes_on() -> None:
    broker = MemoryBroker()
    ns = [4, 5, 0, 6, 0, 3, 2, 1]
    produce(broker, docs_of(ns))
    app = af.App("items-step-fails", broker=broker, fetch_max=3)
    numbers = app.topic("in")
    out = app.sink(CaptureSink("out"))

    @app.agent(numbers, on_error="dead_letter")
    async def invert(stream: af.Stream[dict[str, Any]]) -> None:
        async for v in stream.map(lambda d: 60 // d["n"]):
            await out.send(None, (stream.current.offset, v))

    async with TestRun(app, broker=broker) as run:
        await run.finish()
        dead = run.dead_letters()
    assert out.sink.values == [(i, 60 // n) for i, n in enumerate(ns) if n]
    assert [orjson.loads(d.value)["n"] for d in dead] == [0, 0]
    assert all("ZeroDivisionError" in reason_of(d) for d in dead)


async def test_a_body_failing_on_a_value_of_a_slice_is_retried_on_that_value_then_goes_on() -> None:
    broker = MemoryBroker()
    produce(broker, docs_of(list(range(10))))
    app = af.App("items-retry", broker=broker, fetch_max=5)
    numbers = app.topic("in")
    out = app.sink(CaptureSink("out"))
    failures = {3: 2, 7: 1}  # value -> how many times the body fails on it

    @app.agent(numbers, on_error=af.Retry(times=3, backoff=0.0, then="stop"))
    async def flaky(stream: af.Stream[dict[str, Any]]) -> None:
        async for v in stream.map(lambda d: d["n"]):
            if failures.get(v):
                failures[v] -= 1
                raise ConnectionError(f"down on {v}")
            ev = stream.current
            assert ev is not None
            await out.send(None, (v, ev.offset))

    async with TestRun(app, broker=broker) as run:
        await run.finish()
        dead = run.dead_letters()
    assert out.sink.values == [(n, n) for n in range(10)]  # in order, each once
    assert dead == []


async def test_an_event_the_body_pushes_back_comes_again_before_the_rest_of_its_slice() -> None:
    broker = MemoryBroker()
    produce(broker, docs_of(list(range(12))))
    app = af.App("items-push-back", broker=broker, fetch_max=6)
    numbers = app.topic("in")
    seen: list[int] = []
    again = {4, 8}  # values the body asks for once more

    @app.agent(numbers)
    async def twice(stream: af.Stream[dict[str, Any]]) -> None:
        async for v in stream.map(lambda d: d["n"]).filter(lambda n: n != 9):
            seen.append(v)
            if v in again:
                again.discard(v)
                ev = stream.current
                assert ev is not None
                stream.push_back(ev)  # its value as read: the chain runs on it again

    async with TestRun(app, broker=broker) as run:
        await run.finish()
    assert seen == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 8, 10, 11]


async def test_a_slice_left_halfway_by_the_loop_is_read_on_by_the_batch_api_in_order() -> None:
    broker = MemoryBroker()
    produce(broker, docs_of(list(range(20))))
    app = af.App("items-then-batches", broker=broker, fetch_max=8)
    numbers = app.topic("in")
    got: list[tuple[str, int]] = []

    @app.agent(numbers)
    async def two_readers(stream: af.Stream[dict[str, Any]]) -> None:
        kept = stream.map(lambda d: d["n"])
        async for v in kept:
            got.append(("item", v))
            if v == 10:  # in the middle of the lane's second slice, which came as columns
                break
        async for batch in kept.batches():
            got.extend(("batch", v) for v in batch)

    async with TestRun(app, broker=broker) as run:
        await run.finish()
    assert [v for _, v in got] == list(range(20))  # nothing lost, nothing twice
    assert got[10] == ("item", 10) and got[11] == ("batch", 11)


async def test_a_slice_left_halfway_is_read_on_as_events_and_current_stays_the_last_item() -> None:
    broker = MemoryBroker()
    produce(broker, docs_of(list(range(12))))
    app = af.App("items-then-events", broker=broker, fetch_max=6)
    numbers = app.topic("in")
    got: list[int] = []
    current_after_break: list[int] = []

    @app.agent(numbers)
    async def two_readers(stream: af.Stream[dict[str, Any]]) -> None:
        async for d in stream:
            got.append(d["n"])
            if d["n"] == 8:
                break
        async for ev in stream.events():
            if not current_after_break:
                current_after_break.append(ev.offset)
            got.append(ev.value["n"])

    async with TestRun(app, broker=broker) as run:
        await run.finish()
    assert got == list(range(12))
    assert current_after_break == [9]


async def test_keyed_state_in_a_per_item_loop_over_columns_is_kept_per_key() -> None:
    broker = MemoryBroker()
    ns = list(range(30))
    produce(broker, docs_of(ns), partitions=2)
    app = af.App("items-state", broker=broker, fetch_max=4)
    numbers = app.topic("in", partitions=2)
    totals = app.table("totals", default=0)
    out = app.sink(CaptureSink("out"))

    @app.agent(numbers, concurrency=2)
    async def add(stream: af.Stream[dict[str, Any]]) -> None:
        state = stream.state(totals)
        async for d in stream.filter(lambda d: d["n"] % 4 != 0):
            state.set(state.get() + d["n"])
            await out.send(stream.current.key, state.get())

    async with TestRun(app, broker=broker) as run:
        await run.finish()
        table = run.table("totals")
    expected: dict[str, int] = {}
    for n in ns:
        if n % 4:
            expected[f"s{n % 3}"] = expected.get(f"s{n % 3}", 0) + n
    assert table == expected
    last: dict[str, int] = {}
    for r in out.sink.records:  # each key's running total, in order: its last is the total
        last[r.key] = r.value
    assert last == expected
