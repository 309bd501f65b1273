"""Lane slices as columns: a lane that works a slice at a time gets no event per record.

A stream consumed by ``stream.batches()`` or a window tells its lane it takes
columns; from then on the dispatcher hands that lane its part of each batch as
the decoded keys, values, times and offsets side by side (a ``LaneSlice``).
A lane whose consumer has not asked gets events (a per-item loop asks too: see
``test_per_item_columns``). What must hold is
what held with events: the same values, windows, dead letters, cuts and
take-backs, whichever form a lane got.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncflow as af
from asyncflow.chain import FILTER, KEY, MAP, compile_chain, kept_indices
from asyncflow.channels import Channel
from asyncflow.clock import ManualClock
from asyncflow.dispatch import Dispatcher, Route
from asyncflow.event import Event
from asyncflow.keys import lane_of
from asyncflow.lanes import LaneQueue
from asyncflow.memory import MemoryBroker
from asyncflow.metrics import Metrics
from asyncflow.protocols import RawBatch, Record, TopicPartition
from asyncflow.slices import LaneSlice
from asyncflow.testing import CaptureSink, TestRun, reason_of
from asyncflow.watermarks import PartitionWatermarks
from asyncflow.windows import Count, Hopping, Mean, Session, Tumbling, WindowOperator


class NoSource:
    def pause(self, partitions: Any) -> None: ...
    def resume(self, partitions: Any) -> None: ...


def dispatcher(lanes: list[LaneQueue]) -> Dispatcher:
    return Dispatcher(
        NoSource(),  # type: ignore[arg-type]
        {"t": Route(Channel("t"), [lanes])},
        PartitionWatermarks(None),
        ManualClock(),
        Metrics(),
        lambda *a: None,
    )


def records(keys: list[str], first: int = 0) -> list[Record]:
    return [
        Record(first + i, k.encode(), orjson.dumps({"n": first + i}), 1_000 + i, (("h", b"1"),))
        for i, k in enumerate(keys)
    ]


def as_tuples(events: list[Event[Any]]) -> list[tuple[Any, ...]]:
    return [(e.key, e.value, e.time, tuple(e.headers), e.partition, e.offset) for e in events]


P0 = TopicPartition("t", 0)


def test_a_lane_taking_columns_gets_a_batch_as_columns_with_the_events_it_stands_for() -> None:
    lane = LaneQueue(1_000)
    lane.takes_columns = True  # what a stream consumed by batches() or windows says
    d = dispatcher([lane])
    recs = records(["a", "b", "a"], first=7)
    d.dispatch(RawBatch("t", P0, recs))
    (item,) = lane._items
    assert type(item) is LaneSlice and len(item) == 3 and lane.size == 3
    assert as_tuples(item.events()) == [
        ("a", {"n": 7}, 1_000, (("h", b"1"),), P0, 7),
        ("b", {"n": 8}, 1_001, (("h", b"1"),), P0, 8),
        ("a", {"n": 9}, 1_002, (("h", b"1"),), P0, 9),
    ]
    assert item.event(1).offset == 8 and item.events() is item.events()


def test_a_lane_whose_consumer_has_not_read_yet_gets_columns_any_consumer_reads() -> None:
    lane = LaneQueue(1_000)  # what the dispatcher fills before the agent starts
    assert lane.takes_columns is None
    d = dispatcher([lane])
    d.dispatch(RawBatch("t", P0, records(["a", "b"], first=2)))
    (item,) = lane._items
    assert type(item) is LaneSlice
    assert as_tuples(item.events()) == [
        ("a", {"n": 2}, 1_000, (("h", b"1"),), P0, 2),
        ("b", {"n": 3}, 1_001, (("h", b"1"),), P0, 3),
    ]


def test_a_lane_whose_consumer_works_on_events_gets_events() -> None:
    lane = LaneQueue(1_000)
    lane.takes_columns = False  # what a stream that made events of a slice says
    d = dispatcher([lane])
    d.dispatch(RawBatch("t", P0, records(["a", "b"], first=2)))
    (item,) = lane._items
    assert type(item) is list
    assert as_tuples(item) == [
        ("a", {"n": 2}, 1_000, (("h", b"1"),), P0, 2),
        ("b", {"n": 3}, 1_001, (("h", b"1"),), P0, 3),
    ]


async def test_a_lane_whose_consumer_made_events_of_a_slice_gets_events_from_then_on() -> None:
    from asyncflow.stream import LaneContext, Stream

    lane = LaneQueue(1_000)
    d = dispatcher([lane])
    d.dispatch(RawBatch("t", P0, records(["a", "b"], first=0)))  # queued before it reads
    stream = Stream(lane, LaneContext("t", 0)).key_by(lambda v: v["n"])  # a chain of events
    batches = stream.batches()
    first = await anext(batches)
    assert first == [{"n": 0}, {"n": 1}] and stream.current.key == 1
    assert lane.takes_columns is False
    d.dispatch(RawBatch("t", P0, records(["a", "b"], first=2)))
    (item,) = lane._items
    assert type(item) is list  # events, made once, by the dispatcher
    assert await anext(batches) == [{"n": 2}, {"n": 3}]
    await batches.aclose()


def test_a_batch_spread_over_lanes_reaches_each_as_its_events_in_order() -> None:
    lanes = [LaneQueue(1_000) for _ in range(2)]
    for q in lanes:
        q.takes_columns = False  # consumers that work on events
    d = dispatcher(lanes)
    keys = [f"k{i}" for i in range(40)]
    d.dispatch(RawBatch("t", P0, records(keys)))
    for i, q in enumerate(lanes):
        (item,) = q._items
        assert type(item) is list
        assert [e.key for e in item] == [k for k in keys if lane_of(k, 2) == i]
        assert [e.offset for e in item] == sorted(e.offset for e in item)


def test_lanes_that_work_on_columns_get_a_spread_batch_as_columns_of_their_own() -> None:
    lanes = [LaneQueue(1_000) for _ in range(2)]
    for q in lanes:
        q.takes_columns = True  # what a stream consumed by batches() or windows says
    d = dispatcher(lanes)
    keys = [f"k{i}" for i in range(40)]
    recs = records(keys)
    d.dispatch(RawBatch("t", P0, recs))
    for i, q in enumerate(lanes):
        (item,) = q._items
        assert type(item) is LaneSlice
        mine = [r for r, k in zip(recs, keys, strict=True) if lane_of(k, 2) == i]
        assert as_tuples(item.events()) == [
            (r.key.decode(), orjson.loads(r.value), r.timestamp, tuple(r.headers), P0, r.offset)
            for r in mine
            if r.key is not None and r.value is not None
        ]


async def test_a_stream_asking_for_columns_tells_its_lane() -> None:
    from asyncflow.testing import stream_of

    s = stream_of([1, 2, 3])
    assert s._queue.takes_columns is None  # not said yet
    assert [b async for b in s.batches()] == [[1, 2, 3]]
    assert s._queue.takes_columns is True


def test_columns_parked_for_a_full_lane_hold_the_cut_and_are_taken_back_whole() -> None:
    lane = LaneQueue(2)
    lane.takes_columns = True
    d = dispatcher([lane])
    d.dispatch(RawBatch("t", P0, records(["a", "a"], first=0)))  # fills the lane
    d.dispatch(RawBatch("t", P0, records(["a", "a", "a"], first=2)))  # parked: no room
    assert d.paused == {P0}
    assert d.cut() == {P0: 1}  # the parked columns (offsets 2-4) are beyond the cut
    assert d.take_back() == 5  # both slices: the queued one and the parked one
    assert d.cut() == {}
    assert lane.size == 0


def test_a_revoke_takes_queued_columns_out_of_the_lane() -> None:
    lane = LaneQueue(100)
    lane.takes_columns = True
    d = dispatcher([lane])
    d.dispatch(RawBatch("t", P0, records(["a", "b"], first=3)))
    assert d.take_back([P0]) == 2
    assert lane.size == 0
    assert d.cut() == {P0: 2}  # what came before the slice, not the slice (offsets 3 and 4)


MAP_FILTER_STEPS = st.lists(
    st.sampled_from(
        [
            (MAP, lambda v: v * 3 + 1),
            (MAP, lambda v: v // 2),
            (FILTER, lambda v: v % 3 != 0),
            (FILTER, lambda v: v > -5),
        ]
    ),
    max_size=6,
)


class Holder:
    current: Event[Any] | None = None
    _held: Event[Any] | None = None
    _failed_src: Event[Any] | None = None
    _failed_index = -1


@settings(max_examples=200, deadline=None)
@given(MAP_FILTER_STEPS, st.lists(st.integers(-50, 50), max_size=30))
def test_a_chain_over_columns_keeps_what_it_keeps_over_events(
    steps: list[Any], values: list[int]
) -> None:
    chain = compile_chain(tuple(steps))
    events = [Event("k", v, i, (), "p0", i) for i, v in enumerate(values)]
    by_events: list[Any] = []
    done: list[Event[Any]] = []
    chain.many(Holder(), events, by_events, done)
    out: list[Any] = []
    dropped: list[int] = []
    assert chain.columns is not None
    chain.columns(Holder(), values, out, dropped)
    assert out == by_events
    assert [events[i] for i in kept_indices(len(values), dropped)] == done


def test_a_chain_over_columns_says_where_a_step_raised_and_one_with_key_by_needs_events() -> None:
    chain = compile_chain(((MAP, lambda v: 10 // v),))
    holder = Holder()
    out: list[Any] = []
    dropped: list[int] = []
    try:
        assert chain.columns is not None
        chain.columns(holder, [1, 2, 0, 5], out, dropped)
    except ZeroDivisionError:
        pass
    assert out == [10, 5] and dropped == [] and holder._failed_index == 2
    assert compile_chain(((KEY, len),)).columns is None


def test_a_chain_over_columns_counts_the_dropped_values_in_the_index_where_a_step_raised() -> None:
    chain = compile_chain(((FILTER, lambda v: v != 3), (MAP, lambda v: 10 // v)))
    holder = Holder()
    out: list[Any] = [99]  # what an earlier run left: indices count from this run's values
    dropped: list[int] = []
    try:
        assert chain.columns is not None
        chain.columns(holder, [3, 1, 3, 0, 5], out, dropped)
    except ZeroDivisionError:
        pass
    assert out == [99, 10] and dropped == [0, 2] and holder._failed_index == 3
    assert kept_indices(holder._failed_index, dropped) == [1]


ASSIGNERS = [
    Tumbling(timedelta(seconds=5)),
    Hopping(timedelta(seconds=10), timedelta(seconds=5)),
    Session(timedelta(seconds=3)),
]

EVENTS = st.lists(
    st.tuples(st.sampled_from("abc"), st.integers(0, 40_000), st.one_of(st.none(), st.integers(0, 9))),
    max_size=60,
)


def through_events(op: WindowOperator, batches: list[list[tuple[str, int, Any]]]) -> Any:
    for batch in batches:
        for key, t, value in batch:
            op.on_event(key, t, value)
        op.on_watermark(max((t for _, t, _ in batch), default=None), wall_ms=0)
    op.flush_all()
    return [(r.key, r.start_ms, r.end_ms, r.value) for r in op.results], op.late


def through_columns(op: WindowOperator, batches: list[list[tuple[str, int, Any]]]) -> Any:
    for batch in batches:
        keys = [k for k, _, _ in batch]
        times = [t for _, t, _ in batch]
        values = [v for _, _, v in batch]
        i = 0
        while i < len(batch):  # where on_columns stops, the event goes alone, as the stream does
            i = op.on_columns(keys, times, values, i)
            if i < len(batch):
                op.on_event(keys[i], times[i], values[i])
                i += 1
        op.on_watermark(max(times, default=None), wall_ms=0)
    op.flush_all()
    return [(r.key, r.start_ms, r.end_ms, r.value) for r in op.results], op.late


def through_slices(op: WindowOperator, batches: list[list[tuple[str, int, Any]]]) -> Any:
    for batch in batches:
        events = [Event(k, v, t, (), "p0", i) for i, (k, t, v) in enumerate(batch)]
        i = 0
        while i < len(events):  # where on_slice stops, the event goes alone, as the stream does
            i = op.on_slice(events, None, i)
            if i < len(events):
                op.on_event(events[i].key, events[i].time, events[i].value)
                i += 1
        op.on_watermark(max((t for _, t, _ in batch), default=None), wall_ms=0)
    op.flush_all()
    return [(r.key, r.start_ms, r.end_ms, r.value) for r in op.results], op.late


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(ASSIGNERS),
    st.lists(EVENTS, max_size=5),
    st.sampled_from(["count", "mean", "mean of a field", "mean, updates"]),
)
def test_windows_fed_columns_or_slices_of_events_give_what_they_give_one_event_at_a_time(
    assigner: Any, batches: list[list[tuple[str, int, Any]]], kind: str
) -> None:
    if kind == "mean of a field":  # Mean("v") reads the field of each dict, None skipped
        batches = [[(k, t, {"v": v}) for k, t, v in batch] for batch in batches]

    def make() -> WindowOperator:
        aggregate = Count() if kind == "count" else Mean("v") if kind == "mean of a field" else Mean()
        emit = "updates" if kind == "mean, updates" else "final"
        return WindowOperator(assigner, aggregate, wait=timedelta(seconds=2),
                              lateness=timedelta(seconds=1), emit=emit)

    one_at_a_time = through_events(make(), batches)
    assert through_columns(make(), batches) == one_at_a_time
    assert through_slices(make(), batches) == one_at_a_time


def test_a_mean_fed_columns_stores_nothing_for_a_value_it_cannot_add() -> None:
    op = WindowOperator(Tumbling(timedelta(seconds=5)), Mean("v"))
    keys, times, values = ["a", "b", "a"], [0, 1, 2], [{"v": 1.0}, {"v": "x"}, {"v": 3.0}]
    try:
        op.on_columns(keys, times, values, 0)
    except TypeError:
        pass
    assert op.failed_at == 1
    assert op.on_columns(keys, times, values, 2) == 3
    op.flush_all()
    assert [(r.key, r.value) for r in op.results] == [("a", 2.0)]  # no window for "b"


def produce(broker: MemoryBroker, topic: str, docs: list[dict[str, Any]]) -> None:
    broker.create_topic(topic, 1)
    for d in docs:
        broker.produce(topic, orjson.dumps(d), str(d["k"]).encode(), (), d["t"])
    broker.end(topic)


async def run_pipeline(
    docs: list[dict[str, Any]], lanes: int, per_item: bool = False
) -> tuple[list[Any], list[Any], int]:
    """Batches (or items) through map/filter and a window beside them, with ``lanes`` lanes."""
    broker = MemoryBroker()
    produce(broker, "in", docs)
    app = af.App(f"columns-{lanes}", broker=broker, fetch_max=7)
    numbers = app.topic("in")
    out = app.sink(CaptureSink("out"))
    windows = app.sink(CaptureSink("windows"))

    @app.agent(numbers, concurrency=lanes, on_error="dead_letter")
    async def transform(stream: af.Stream[dict[str, Any]]) -> None:
        kept = stream.map(lambda d: {**d, "inv": 60 // d["n"]}).filter(lambda d: d["n"] % 3 != 1)
        if per_item:  # events, one at a time
            async for b in kept:
                await out.send(stream.current.key, (b["k"], b["t"], b["inv"]))
            return
        async for batch in kept.batches():
            await out.send_many([(stream.current.key, (b["k"], b["t"], b["inv"])) for b in batch])

    @app.agent(numbers, concurrency=lanes)
    async def count(stream: af.Stream[dict[str, Any]]) -> None:
        async for w in stream.window(Tumbling(timedelta(seconds=5)), aggregate=Mean("n")):
            await windows.send(w.key, (w.key, w.start_ms, w.value))

    async with TestRun(app, broker=broker) as run:
        await run.finish()
        dead = len(run.dead_letters())
    return sorted(out.sink.values), sorted(windows.sink.values), dead


async def test_a_pipeline_gives_the_same_outputs_whether_its_lanes_get_columns_or_events() -> None:
    docs = [{"k": f"s{i % 5}", "n": i % 13, "t": 1_000 * (i // 2)} for i in range(120)]
    one_lane = await run_pipeline(docs, lanes=1)  # columns (after the first batch: events)
    three_lanes = await run_pipeline(docs, lanes=3)  # batches spread over lanes, as columns
    one_by_one = await run_pipeline(docs, lanes=3, per_item=True)  # the same as events
    assert one_lane == three_lanes == one_by_one
    transformed, windows, dead = one_lane
    # an independent computation: the same map, filter and means by hand
    assert transformed == sorted(
        (d["k"], d["t"], 60 // d["n"]) for d in docs if d["n"] != 0 and d["n"] % 3 != 1
    )
    assert dead == sum(1 for d in docs if d["n"] == 0)  # 60 // 0 raised: each a dead letter
    sums: dict[tuple[str, int], list[int]] = {}
    for d in docs:
        acc = sums.setdefault((d["k"], d["t"] // 5_000 * 5_000), [0, 0])
        acc[0] += d["n"]
        acc[1] += 1
    assert windows == sorted((k, start, total / n) for (k, start), (total, n) in sums.items())


async def test_an_agent_that_raises_on_a_batch_of_columns_dead_letters_what_it_was_given() -> None:
    broker = MemoryBroker()
    produce(broker, "in", [{"k": "a", "n": n, "t": n} for n in range(6)])  # one slice
    app = af.App("columns-raise", broker=broker)
    numbers = app.topic("in")

    @app.agent(numbers, on_error="dead_letter")
    async def refuse(stream: af.Stream[dict[str, Any]]) -> None:
        async for batch in stream.filter(lambda d: d["n"] % 2 == 0).batches():
            raise RuntimeError(f"refused {len(batch)}")

    async with TestRun(app, broker=broker) as run:
        await run.finish()
        dead = run.dead_letters()
    assert [orjson.loads(d.value)["n"] for d in dead] == [0, 2, 4]  # the kept ones, as read
    assert all("refused 3" in reason_of(d) for d in dead)


async def test_a_late_event_inside_a_slice_of_columns_is_a_dead_letter_and_the_rest_count() -> None:
    broker = MemoryBroker()
    times = [0, 20_000, 21_000, 22_000, 1_000, 23_000]  # 1,000 comes after the watermark passed it
    produce(broker, "in", [{"k": "a", "t": t} for t in times])
    app = af.App("columns-late", broker=broker, fetch_max=3)
    readings = app.topic("in")
    out = app.sink(CaptureSink("out"))

    @app.agent(readings)
    async def count(stream: af.Stream[dict[str, Any]]) -> None:
        async for w in stream.window(Tumbling(timedelta(seconds=5)), aggregate=Count()):
            await out.send(w.key, (w.start_ms, w.value))

    async with TestRun(app, broker=broker) as run:
        await run.finish()
        dead = run.dead_letters()
    assert sorted(out.sink.values) == [(0, 1), (20_000, 4)]
    assert len(dead) == 1 and "late event" in reason_of(dead[0])


async def test_a_step_failing_mid_batch_is_not_lost_when_the_body_fails_on_the_values_before_it() -> None:
    broker = MemoryBroker()
    produce(broker, "in", [{"k": "a", "n": n, "t": n} for n in (1, 2, 0, 4, 5)])  # one slice
    app = af.App("columns-two-failures", broker=broker)
    numbers = app.topic("in")
    out = app.sink(CaptureSink("out"))
    first = True

    @app.agent(numbers, on_error="dead_letter")
    async def invert(stream: af.Stream[dict[str, Any]]) -> None:
        nonlocal first
        async for batch in stream.map(lambda d: 100 // d["n"]).batches():
            if first:  # the body fails on the values before the one the map failed on
                first = False
                raise RuntimeError("sink down")
            await out.send_many([(None, v) for v in batch])

    async with TestRun(app, broker=broker) as run:
        await run.finish()
        dead = run.dead_letters()
    assert out.sink.values == [25, 20]  # what came after the failing event
    reasons = [(orjson.loads(d.value)["n"], reason_of(d)) for d in dead]
    assert [n for n, _ in reasons] == [1, 2, 0]  # the batch the body failed on, then the map's
    assert "sink down" in reasons[0][1] and "ZeroDivisionError" in reasons[2][1]


async def test_a_lane_whose_chain_needs_events_does_not_ask_for_columns() -> None:
    from asyncflow.testing import stream_of

    s = stream_of([1, 2, 3]).key_by(lambda v: v % 2)
    assert [b async for b in s.batches()] == [[1, 2, 3]]
    assert not s._queue.takes_columns
