"""The batch path: lane slices through compiled chains, windows a slice at a time, key caches.

Each lane slice (everything the dispatcher put in the lane at once) goes
through the stream's compiled map/filter/key_by chain in one call and into the
windows in one call. What must hold is what held event by event: the same
values in the same order, and an error on one event of a slice hands that
event to the error policy while the events after it are still handled, never
dropped.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import timedelta
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncflow as af
from asyncflow.chain import FILTER, KEY, MAP, SKIP, compile_chain
from asyncflow.event import Event
from asyncflow.keys import CACHE_LIMIT, HashCache, RawKeyCache, key_hash
from asyncflow.memory import MemoryBroker
from asyncflow.stream import TURN_EVERY
from asyncflow.testing import CaptureSink, TestRun, reason_of, stream_of
from asyncflow.windows import Aggregate

STEPS = st.lists(
    st.sampled_from(
        [
            (MAP, lambda v: v * 3 + 1),
            (MAP, lambda v: v // 2),
            (FILTER, lambda v: v % 3 != 0),
            (FILTER, lambda v: v > -5),
            (KEY, lambda v: v % 4),
        ]
    ),
    max_size=6,
)


def by_hand(steps: list[Any], events: list[Event[Any]]) -> list[tuple[Any, Any]]:
    """The chain's rules, one step at a time: (key, value) of what passes."""
    out = []
    for ev in events:
        key, value = ev.key, ev.value
        for kind, fn in steps:
            if kind == MAP:
                value = fn(value)
            elif kind == FILTER and not fn(value):
                break
            elif kind == KEY:
                key = fn(value)
        else:
            out.append((key, value))
    return out


class Holder:
    current: Event[Any] | None = None
    _held: Event[Any] | None = None
    _failed_src: Event[Any] | None = None


@settings(max_examples=200, deadline=None)
@given(STEPS, st.lists(st.integers(-50, 50), max_size=30))
def test_a_compiled_chain_gives_what_its_steps_give_one_at_a_time(
    steps: list[Any], values: list[int]
) -> None:
    chain = compile_chain(tuple(steps))
    events = [Event("k", v, i, (), "p0", i) for i, v in enumerate(values)]
    expected = by_hand(steps, events)
    holder = Holder()
    one = []
    for ev in events:
        holder.current = ev
        value = chain.one(holder, ev)
        if value is not SKIP:
            one.append((holder.current.key, value))
    got_values: list[Any] = []
    done: list[Event[Any]] = []
    chain.many(Holder(), events, got_values, done)
    assert one == expected
    assert list(zip([e.key for e in done], got_values, strict=True)) == expected
    assert all(e.offset == ev.offset for e, ev in zip(done, done, strict=True))


def test_a_step_that_raises_names_its_event_and_where_the_slice_stopped() -> None:
    chain = compile_chain(((MAP, lambda v: 10 // v),))
    events = [Event("k", v, None, (), "p0", i) for i, v in enumerate([1, 2, 0, 5])]
    holder = Holder()
    values: list[Any] = []
    done: list[Event[Any]] = []
    try:
        chain.many(holder, events, values, done)
    except ZeroDivisionError:
        pass
    assert values == [10, 5]
    assert holder._failed_src is events[2] and holder._held is events[2]


def produce(broker: MemoryBroker, topic: str, docs: list[dict[str, Any]], key: str = "k") -> None:
    broker.create_topic(topic, 1)
    for d in docs:
        broker.produce(topic, orjson.dumps(d), key.encode(), (), d.get("t"))
    broker.end(topic)


async def test_a_map_that_raises_mid_slice_hands_that_event_over_and_the_rest_go_on() -> None:
    broker = MemoryBroker()
    produce(broker, "numbers", [{"n": n} for n in (1, 2, 0, 4, 5)])  # one slice of five
    app = af.App("midslice")
    numbers = app.topic("numbers")
    out = app.sink(CaptureSink("out"))

    @app.agent(numbers, on_error="dead_letter")
    async def invert(stream: af.Stream[dict[str, int]]) -> None:
        async for batch in stream.map(lambda d: 100 // d["n"]).batches():
            await out.send_many([(None, v) for v in batch])

    async with TestRun(app, broker=broker) as run:
        await run.finish()
        dead = run.dead_letters()
    assert out.sink.values == [100, 50, 25, 20]
    assert len(dead) == 1 and "ZeroDivisionError" in reason_of(dead[0])


async def test_a_per_item_loop_knows_each_values_event_and_hands_over_only_the_one_a_step_raised_on(
) -> None:
    broker = MemoryBroker()
    produce(broker, "numbers", [{"n": n} for n in (1, 2, 0, 4, -1, 5, 10)])  # one slice of seven

    def invert(d: dict[str, int]) -> int:
        if d["n"] < 0:
            raise StopIteration  # a bug in a step: it must not read as the end of the slice
        return 100 // d["n"]

    app = af.App("peritem")
    numbers = app.topic("numbers")
    out = app.sink(CaptureSink("out"))

    @app.agent(numbers, on_error="dead_letter")
    async def body(stream: af.Stream[dict[str, int]]) -> None:
        async for v in stream.map(invert).filter(lambda v: v != 50):
            current = stream.current
            assert current is not None
            await out.send(None, (current.offset, v))

    async with TestRun(app, broker=broker) as run:
        await run.finish()
        dead = run.dead_letters()
    assert out.sink.values == [(0, 100), (3, 25), (5, 20), (6, 10)]
    assert [dict(r.headers)["asyncflow.offset"] for r in dead] == [b"2", b"4"]
    assert "ZeroDivisionError" in reason_of(dead[0]) and "StopIteration" in reason_of(dead[1])


class Picky(Aggregate[int, int]):
    """Counts, but refuses a value of -1."""

    def create(self) -> int:
        return 0

    def add(self, acc: int, value: Any, time_ms: int) -> int:
        if value["v"] == -1:
            raise ValueError("refused")
        return acc + 1

    def merge(self, a: int, b: int) -> int:
        return a + b

    def result(self, acc: int) -> int:
        return acc


async def test_an_aggregate_that_raises_mid_slice_loses_none_of_the_events_after_it() -> None:
    broker = MemoryBroker()
    docs = [{"v": v, "t": t} for v, t in [(1, 0), (1, 1000), (-1, 2000), (1, 3000), (1, 6000)]]
    produce(broker, "readings", docs)
    app = af.App("picky")
    readings = app.topic("readings")
    out = app.sink(CaptureSink("out"))

    @app.agent(readings, on_error="dead_letter")
    async def count(stream: af.Stream[dict[str, int]]) -> None:
        async for w in stream.window(af.Tumbling(timedelta(seconds=5)), aggregate=Picky()):
            await out.send(w.key, (w.start_ms, w.value))

    async with TestRun(app, broker=broker) as run:
        await run.finish()
        dead = run.dead_letters()
    assert sorted(out.sink.values) == [(0, 3), (5000, 1)]
    assert len(dead) == 1 and "refused" in reason_of(dead[0])


async def test_a_filter_before_a_window_counts_only_what_passes_it_in_one_slice() -> None:
    broker = MemoryBroker()
    # one slice: the watermark moves only after it, so 1000 after 9000 is not late
    docs = [{"v": v, "t": t} for v, t in [(1, 0), (0, 1000), (1, 9000), (1, 1000)]]
    produce(broker, "a", docs)
    app = af.App("filtered")
    a = app.topic("a")
    out = app.sink(CaptureSink("out"))

    @app.agent(a)
    async def count(stream: af.Stream[dict[str, int]]) -> None:
        kept = stream.filter(lambda d: d["v"] == 1)
        async for w in kept.window(af.Tumbling(timedelta(seconds=5)), aggregate=af.Count()):
            await out.send(w.key, (w.start_ms, w.value))

    async with TestRun(app, broker=broker) as run:
        await run.finish()
    assert sorted(out.sink.values) == [(0, 2), (5000, 1)]


def test_record_keys_are_decoded_once_and_only_str_bytes_and_int_keys_are_kept() -> None:
    decoded: list[bytes] = []

    def decode(raw: bytes) -> Any:
        decoded.append(raw)
        return orjson.loads(raw)

    cache = RawKeyCache(decode)
    assert cache[b'"a"'] == ("a", key_hash("a")) and cache[b'"a"'][0] == "a"
    assert cache[b"7"] == (7, 7)
    assert cache[b"1.5"] == cache[b"1.5"] == (1.5, key_hash(1.5))  # decoded each time
    assert decoded == [b'"a"', b"7", b"1.5", b"1.5"]


def test_a_key_cache_starts_over_instead_of_growing() -> None:
    cache = HashCache()
    for i in range(CACHE_LIMIT + 10):
        assert cache[f"k{i}"] == key_hash(f"k{i}")
    assert len(cache) <= CACHE_LIMIT


def test_a_none_key_goes_to_the_same_lane_in_every_process() -> None:
    code = "from asyncflow.keys import key_hash; print(key_hash(None))"
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        .stdout.strip()
        for _ in range(3)
    }
    assert runs == {"0"}


async def test_values_of_a_stream_with_no_steps_come_through_as_they_were() -> None:
    assert await stream_of([{"a": 1}, 2]).collect() == [{"a": 1}, 2]


def test_an_event_time_given_in_epoch_seconds_is_kept_in_ms_and_read_as_a_datetime() -> None:
    from datetime import UTC, datetime

    from asyncflow.records import event_time_ms

    class Reading(af.Record):
        id: str
        time: af.EventTime

    r = Reading.decode_obj({"id": "a", "time": 1.5})
    assert event_time_ms(r) == 1500
    assert r.time == datetime(1970, 1, 1, 0, 0, 1, 500000, tzinfo=UTC)
    r.time = "2024-01-01T00:00:00+00:00"
    assert event_time_ms(r) == 1_704_067_200_000
    assert Reading("b", 2) == Reading.decode_obj({"id": "b", "time": 2})


class Gate:
    """A sink whose writes wait until the test opens the gate."""

    name = "gate"
    max_batch = 100

    def __init__(self) -> None:
        import asyncio

        self.open = asyncio.Event()
        self.batches: list[list[Any]] = []

    async def start(self) -> None: ...

    async def write(self, records: Any) -> None:
        self.batches.append([r.value for r in records])
        await self.open.wait()

    async def stop(self) -> None: ...


async def test_a_sink_gets_a_thin_stream_at_once_and_a_backlog_in_one_batch() -> None:
    import asyncio

    from asyncflow.protocols import SinkRecord
    from asyncflow.writer import SinkWriter

    sink = Gate()
    writer = SinkWriter(sink)  # no linger: batches follow the load
    async with asyncio.TaskGroup() as tg:
        tg.create_task(writer.run())
        await writer.push(SinkRecord(None, 0))
        for _ in range(5):
            await asyncio.sleep(0)
        assert sink.batches == [[0]]  # written without waiting for more
        for n in range(1, 6):
            await writer.push(SinkRecord(None, n))  # while the first write is in flight
        sink.open.set()
        await writer.flush()
        writer.close()
    assert sink.batches == [[0], [1, 2, 3, 4, 5]]


class CountsBy(Aggregate[dict[int, int], int]):
    """Counts per integer id inside one window (Nexmark q5's shape): a dict with int keys."""

    def create(self) -> dict[int, int]:
        return {}

    def add(self, acc: dict[int, int], value: Any, time_ms: int) -> dict[int, int]:
        acc[value["id"]] = acc.get(value["id"], 0) + 1
        return acc

    def merge(self, a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
        return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}

    def result(self, acc: dict[int, int]) -> int:
        return max(acc, key=acc.__getitem__)


async def test_window_state_with_integer_dict_keys_is_checkpointed_and_restored() -> None:
    import asyncio

    broker = MemoryBroker()
    broker.create_topic("bids", 1)
    out: list[Any] = []

    def build() -> af.App:
        app = af.App("q5", commit_interval=0.02, broker=broker)
        bids = app.topic("bids")

        @app.agent(bids)
        async def hot(stream: af.Stream[dict[str, int]]) -> None:
            async for w in stream.window(af.Tumbling(timedelta(seconds=10)), aggregate=CountsBy()):
                out.append((w.start_ms, w.value))

        return app

    for t in (0, 1000, 2000):
        broker.produce("bids", orjson.dumps({"id": 7}), b"k", (), t)
    async with TestRun(build(), broker=broker) as run:
        await asyncio.sleep(0.2)  # checkpoints of the open window [0, 10 s)
        await run.stop()
    for t in (3000, 4000, 20000):
        broker.produce("bids", orjson.dumps({"id": 3}), b"k", (), t)
    broker.end("bids")
    async with TestRun(build(), broker=broker) as run:
        await run.finish()
    assert (0, 7) in out  # 7 three times before the restart beats 3 twice after it


async def test_a_checkpoint_that_cannot_encode_state_stops_the_worker_with_the_reason() -> None:
    import asyncio

    import pytest

    class Box:
        pass

    class Boxed(Aggregate[Box, int]):
        def create(self) -> Box:
            return Box()

        def add(self, acc: Box, value: Any, time_ms: int) -> Box:
            return acc

        def merge(self, a: Box, b: Box) -> Box:
            return a

        def result(self, acc: Box) -> int:
            return 1

    broker = MemoryBroker()
    broker.create_topic("a", 1)
    for t in (0, 1000):  # the input does not end: the window is open at the next checkpoint
        broker.produce("a", orjson.dumps({"t": t}), b"k", (), t)
    app = af.App("boxed", commit_interval=0.02, broker=broker)
    a = app.topic("a")

    @app.agent(a)
    async def w(stream: af.Stream[Any]) -> None:
        async for _ in stream.window(af.Tumbling(timedelta(seconds=60)), aggregate=Boxed()):
            pass

    with pytest.raises(BaseExceptionGroup) as caught:
        await asyncio.wait_for(app.run(), 60)  # a bound on a hang, not a timing claim
    assert "a Box cannot be kept in state" in repr(caught.value.exceptions)


async def test_a_memory_broker_serves_one_event_loop_after_another() -> None:
    import asyncio

    broker = MemoryBroker()
    produce(broker, "n", [{"n": 1}])

    async def count_once() -> int:
        seen: list[Any] = []
        app = af.App("twice", broker=broker)
        n = app.topic("n")

        @app.agent(n)
        async def count(stream: af.Stream[Any]) -> None:
            async for v in stream:
                seen.append(v)

        await app.run(stop_when_idle=True)
        return len(seen)

    first = await count_once()
    second = await asyncio.get_running_loop().run_in_executor(None, asyncio.run, count_once())
    assert (first, second) == (1, 0)  # the group committed what the first run read


async def test_a_lane_working_through_a_large_slice_gives_the_event_loop_a_turn_now_and_then() -> None:
    """The writer and the other lanes are not locked out while one lane works through a backlog."""
    app = af.App("turns")
    numbers = app.topic("numbers", partitions=1)
    ticks = 0
    seen: list[int] = []  # the ticker's count when each value was handled

    @app.agent(numbers)
    async def count(stream: af.Stream[Any]) -> None:
        async for _ in stream:
            seen.append(ticks)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    events = 5 * TURN_EVERY
    async with TestRun(app) as run:
        task = asyncio.create_task(ticker())
        await run.send_many("numbers", range(events))  # one fetch, one slice
        await run.finish()
        task.cancel()
    assert len(seen) == events
    turns = sum(1 for a, b in zip(seen, seen[1:], strict=False) if b > a)
    assert turns >= events // TURN_EVERY - 1


async def test_a_batch_agent_working_through_queued_slices_gives_the_event_loop_a_turn_now_and_then() -> None:
    """The batch API as the per-item loop: a backlog of slices does not lock the writer out."""
    broker = MemoryBroker()
    broker.create_topic("numbers", partitions=1)
    events = 5 * TURN_EVERY
    for n in range(events):
        broker.produce("numbers", str(n).encode())
    broker.end("numbers")
    app = af.App("turns", broker=broker, fetch_max=100, lane_capacity=2 * events)
    numbers = app.topic("numbers", partitions=1)
    ticks = 0
    seen: list[int] = []  # the ticker's count when each batch was handled

    @app.agent(numbers)
    async def count(stream: af.Stream[Any]) -> None:
        async for batch in stream.batches():
            seen.extend(ticks for _ in batch)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await app.run(stop_when_idle=True)
    finally:
        task.cancel()
    assert len(seen) == events
    turns = sum(1 for a, b in zip(seen, seen[1:], strict=False) if b > a)
    assert turns >= events // TURN_EVERY - 1


async def test_a_batch_being_gathered_lets_go_of_the_events_of_a_partition_given_up() -> None:
    from asyncflow.lanes import LaneQueue
    from asyncflow.stream import LaneContext, Stream
    from asyncflow.testing import wait_for

    queue = LaneQueue(100)
    stream: Stream[int] = Stream(queue, LaneContext("t", 0))
    queue.put([Event("a", 1, partition="p0", offset=0), Event("b", 2, partition="p1", offset=0)])
    got: list[list[int]] = []

    async def body() -> None:
        async for batch in stream.batch(10, 30.0):
            got.append(batch)

    task = asyncio.create_task(body())
    await wait_for(lambda: stream._gathering is not None and len(stream._gathering[0]) == 2)
    assert queue.drop_partitions(lambda p: p == "p1") == [("p1", 0)]  # p1 was revoked
    queue.put([Event("c", 3, partition="p0", offset=1)])
    queue.close()
    await task
    assert got == [[1, 3]]
