"""Values decoded in the lane: when nothing routes on a value, the lane decodes it, just before use.

A topic whose keys and event times come from the records themselves, read
by one agent whose lanes take columns, reaches its lanes as the records'
bytes (``asyncflow.raw_values``); the lane decodes a slice as it takes it
from its queue. What must hold is what held when the
dispatcher decoded: the same outputs, each step run once per record, and each
record that does not decode a dead letter with the same reason, while the
rest of its slice goes on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncflow as af
from asyncflow.channels import Channel, Output
from asyncflow.clock import ManualClock
from asyncflow.codecs import JsonCodec
from asyncflow.dispatch import Dispatcher, Route
from asyncflow.lanes import LaneQueue
from asyncflow.memory import MemoryBroker
from asyncflow.metrics import Metrics
from asyncflow.protocols import RawBatch, Record, TopicPartition
from asyncflow.raw_values import decode_reason
from asyncflow.slices import LaneSlice
from asyncflow.testing import CaptureSink, TestRun, reason_of
from asyncflow.watermarks import PartitionWatermarks

P0 = TopicPartition("t", 0)


class NoSource:
    def pause(self, partitions: Any) -> None: ...
    def resume(self, partitions: Any) -> None: ...


def dispatcher(channel: Channel[Any], lanes: list[LaneQueue],
               dead: list[tuple[int, str]]) -> Dispatcher:
    return Dispatcher(
        NoSource(),  # type: ignore[arg-type]
        {"t": Route(channel, [lanes])},
        PartitionWatermarks(None),
        ManualClock(),
        Metrics(),
        lambda topic, partition, rec, reason: dead.append((rec.offset, reason)),
    )


def raw_records(values: list[bytes | None]) -> list[Record]:
    return [Record(i, b"k", v, 1_000 + i) for i, v in enumerate(values)]


def test_values_nothing_routes_on_reach_a_lane_as_read_and_are_decoded_on_the_first_read() -> None:
    lane = LaneQueue(100)
    lane.takes_columns = True
    dead: list[tuple[int, str]] = []
    dispatcher(Channel("t"), [lane], dead).dispatch(
        RawBatch("t", P0, raw_records([b'{"n": 1}', b"{bad", None, b'{"n": 4}'])))
    (item,) = lane._items
    assert type(item) is LaneSlice and item.raw_values == [b'{"n": 1}', b"{bad", None, b'{"n": 4}']
    assert dead == []  # nothing is decoded, so nothing is found wrong, before the lane reads
    assert item.values == [{"n": 1}, {"n": 4}]
    assert item.offsets == [0, 3] and item.times == [1_000, 1_003] and list(item.keys) == ["k", "k"]
    assert [reason.split(":")[0] for _, reason in dead] == [
        "malformed JSON", "record has no value (tombstone)"]
    assert [o for o, _ in dead] == [1, 2]


def test_a_topic_that_routes_or_times_by_value_or_a_lane_that_takes_events_is_decoded_at_once() -> None:
    for channel, takes_columns in ((Channel("t", key=lambda v: v["n"]), True),
                                   (Channel("t", time="n"), True),
                                   (Channel("t"), False)):
        lane = LaneQueue(100)
        lane.takes_columns = takes_columns
        dead: list[tuple[int, str]] = []
        dispatcher(channel, [lane], dead).dispatch(
            RawBatch("t", P0, raw_records([b'{"n": 1}', b"{bad"])))
        (item,) = lane._items
        assert (item.raw_values if type(item) is LaneSlice else None) is None
        assert [o for o, _ in dead] == [1]  # the dispatcher found it


def test_a_record_that_does_not_decode_counts_its_broker_time_whichever_decodes_it() -> None:
    # the poison (offset 2) is the batch's latest record: the partition has read that far
    # whether the lane decodes the values or the dispatcher does, record by record
    for takes_columns, poison in ((True, b"{bad"), (False, b"{bad"), (True, None),
                                  (False, None)):
        lane = LaneQueue(100)
        lane.takes_columns = takes_columns
        dead: list[tuple[int, str]] = []
        d = dispatcher(Channel("t"), [lane], dead)
        d.watermarks.assign(P0)
        d.dispatch(RawBatch("t", P0, raw_records([b'{"n": 1}', b'{"n": 2}', poison])))
        assert d.watermarks.frontier(P0) == 1_002, (takes_columns, poison)


def test_a_revoke_takes_back_raw_values_without_decoding_them() -> None:
    lane = LaneQueue(100)
    lane.takes_columns = True
    dead: list[tuple[int, str]] = []
    d = dispatcher(Channel("t"), [lane], dead)
    d.dispatch(RawBatch("t", P0, raw_records([b"{bad", b"1"])))
    assert d.take_back([P0]) == 2 and lane.size == 0
    assert dead == []  # the partition's next owner reads them, and writes their dead letters


def test_a_record_type_decoded_in_the_lane_gives_the_dispatchers_reasons() -> None:
    class Reading(af.Record):
        id: str
        value: float

    raws: list[bytes | None] = [b'{"id": "a", "value": 1.5}', b'{"id": 3, "value": 1}',
                                b'{"id": "b"}', b'{"id": "c", "value": "x"}', b"[1]"]
    lane = LaneQueue(100)
    lane.takes_columns = True
    dead: list[tuple[int, str]] = []
    dispatcher(Channel("t", value_type=Reading), [lane], dead).dispatch(
        RawBatch("t", P0, raw_records(raws)))
    (item,) = lane._items
    assert item.values == [Reading(id="a", value=1.5)]
    expected = []
    for i, raw in enumerate(raws[1:], start=1):
        try:
            JsonCodec(Reading).decode(raw)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the reason is what is compared
            expected.append((i, decode_reason(exc)))
    assert dead == expected


DOC = st.one_of(
    st.integers(-20, 20).map(lambda n: orjson.dumps({"n": n})),
    st.sampled_from([b"{bad", b"", None, b'{"n": "x"}']),  # the last decodes; its map raises
)


Loop = Callable[[af.Stream[Any], af.Stream[dict[str, Any]], Output], Awaitable[None]]


def check_each_step_runs_once_per_record_around_poison(
    rows: list[tuple[int, bytes | None]], fetch: int, loop: Loop
) -> None:
    """``loop(chained, stream, out)`` over ``rows`` against a plain computation.

    ``chained`` is the stream through ``map(triple).filter(even)``, each of
    its values ``(n * 3, the row's index)``; ``loop`` sends the ``n * 3`` to
    ``out``. Poison, tombstones and a map that raises are dead letters each.
    """
    import asyncio

    broker = MemoryBroker()
    broker.create_topic("in", 2)
    for i, (key, value) in enumerate(rows):
        if value not in (b"{bad", b"", None):
            value = orjson.dumps({**orjson.loads(value), "i": i})  # where it came from
        broker.produce("in", value, b"k%d" % key, (), 1_000 + i)
    broker.end("in")
    app = af.App("in-lane", broker=broker, fetch_max=fetch)
    out = app.sink(CaptureSink("out"))
    mapped: Counter[Any] = Counter()

    def triple(d: dict[str, Any]) -> tuple[int, int]:
        mapped[d["n"]] += 1
        return int(d["n"]) * 3, d["i"]  # raises on "x": that event is a dead letter too

    @app.agent(app.topic("in"), concurrency=2, on_error="dead_letter")
    async def tripled(stream: af.Stream[dict[str, Any]]) -> None:
        await loop(stream.map(triple).filter(lambda v: v[0] % 2 == 0), stream, out)

    async def run() -> list[Any]:
        async with TestRun(app, broker=broker) as r:
            await r.finish()
            return r.dead_letters()

    dead = asyncio.run(run())
    good = [orjson.loads(v)["n"] for _, v in rows
            if v not in (b"{bad", b"", None, b'{"n": "x"}')]
    # an independent computation: the same map and filter over what decodes
    assert sorted(out.sink.values) == sorted(n * 3 for n in good if n * 3 % 2 == 0)
    assert mapped == Counter(good) + Counter("x" for _, v in rows if v == b'{"n": "x"}')
    reasons = Counter(reason_of(d).split(":")[0] for d in dead)
    assert reasons == Counter(
        {"malformed JSON": sum(v in (b"{bad", b"") for _, v in rows),
         "record has no value (tombstone)": sum(v is None for _, v in rows),
         "agent tripled raised ValueError": sum(v == b'{"n": "x"}' for _, v in rows)}
    ) - Counter()


async def in_batches(chained: af.Stream[Any], stream: af.Stream[Any], out: Output) -> None:
    async for batch in chained.batches():
        await out.send_values([n for n, _ in batch])


async def item_by_item(chained: af.Stream[Any], stream: af.Stream[Any], out: Output) -> None:
    async for n, i in chained:
        ev = stream.current  # the event of the very record the value came from
        assert ev is not None and ev.value["i"] == i and ev.time == 1_000 + i
        await out.send(None, n)


@pytest.mark.parametrize("loop", [in_batches, item_by_item])
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), DOC), max_size=60), st.integers(1, 9))
def test_batches_and_a_per_item_loop_over_values_decoded_in_the_lane_run_each_step_once_around_poison(
    loop: Loop, rows: list[tuple[int, bytes | None]], fetch: int
) -> None:
    check_each_step_runs_once_per_record_around_poison(rows, fetch, loop)


async def test_the_current_event_of_a_batch_decoded_in_the_lane_is_its_last_kept_record() -> None:
    broker = MemoryBroker()
    broker.create_topic("in", 1)
    for n in range(5):
        broker.produce("in", orjson.dumps({"n": n}), b"k", (), 1_000 + n)
    broker.end("in")
    app = af.App("current", broker=broker)
    seen: list[tuple[Any, int]] = []

    @app.agent(app.topic("in"))
    async def last(stream: af.Stream[dict[str, Any]]) -> None:
        async for batch in stream.filter(lambda d: d["n"] < 3).batches():
            ev = stream.current
            assert ev is not None
            seen.append((ev.value, ev.offset))
            assert batch[-1] == ev.value

    async with TestRun(app, broker=broker) as run:
        await run.finish()
    assert seen == [({"n": 2}, 2)]


def one_partition(values: list[bytes | None]) -> MemoryBroker:
    """A topic ``in`` of one partition: ``values`` under key ``k``, a second apart."""
    broker = MemoryBroker()
    broker.create_topic("in", 1)
    for i, v in enumerate(values):
        broker.produce("in", v, b"k", (), 1_000 * i)
    broker.end("in")
    return broker


async def test_a_per_item_loop_and_a_window_over_values_decoded_in_the_lane_skip_poison() -> None:
    values: list[bytes | None] = [b'{"n": 1}', b"{bad", b'{"n": 2}', None, b'{"n": 3}']
    broker = one_partition(values)
    app = af.App("others", broker=broker)
    items = app.sink(CaptureSink("items"))

    @app.agent(app.topic("in"))
    async def each(stream: af.Stream[dict[str, Any]]) -> None:
        async for d in stream.map(lambda d: d["n"]):
            assert stream.current is not None
            await items.send(None, (d, stream.current.offset))

    async with TestRun(app, broker=broker) as run:
        await run.finish()
        dead = run.dead_letters()
    assert items.sink.values == [(1, 0), (2, 2), (3, 4)]
    assert sorted(reason_of(d).split(":")[0] for d in dead) == [
        "malformed JSON", "record has no value (tombstone)"]

    broker = one_partition(values)
    app = af.App("window", broker=broker)
    sums = app.sink(CaptureSink("sums"))

    @app.agent(app.topic("in"))
    async def total(stream: af.Stream[dict[str, Any]]) -> None:
        from datetime import timedelta

        from asyncflow.windows import Sum, Tumbling

        async for w in stream.window(Tumbling(timedelta(seconds=10)), aggregate=Sum("n")):
            await sums.send(w.key, w.value)

    async with TestRun(app, broker=broker) as run:
        await run.finish()
        assert len(run.dead_letters()) == 2
    assert sums.sink.values == [6]


async def test_what_a_per_item_loop_left_of_a_slice_goes_on_to_the_next_reader() -> None:
    values: list[bytes | None] = [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}', b"{bad", b'{"n": 5}']
    broker = one_partition(values)
    app = af.App("rest", broker=broker)
    seen: list[tuple[str, Any, int]] = []

    @app.agent(app.topic("in"))
    async def two_loops(stream: af.Stream[dict[str, Any]]) -> None:
        async for d in stream:
            assert stream.current is not None and stream.current.value is d
            seen.append(("item", d["n"], stream.current.offset))
            if d["n"] == 2:
                break
        async for batch in stream.batches():  # the rest of the slice, poison in it
            seen.extend(("batch", d["n"], -1) for d in batch)

    async with TestRun(app, broker=broker) as run:
        await run.finish()
        dead = run.dead_letters()
    assert seen == [("item", 1, 0), ("item", 2, 1), ("batch", 3, -1), ("batch", 5, -1)]
    assert [reason_of(d).split(":")[0] for d in dead] == ["malformed JSON"]
