"""Batches by column: a source that keeps its records by column hands them so.

The memory broker keeps each partition as columns (keys, values, timestamps,
headers) and hands a fetch as ``RawColumns`` beside a view that makes a record
only when one is asked for; the dispatcher then reads no record object on its
fast path. What must hold: a batch by column reaches the lanes exactly as the
same batch by record does (keys, values, times, headers, offsets, lanes),
through poison, restores and repartition markers; and the key caches give
each record the lane ``lane_of`` gives it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncflow as af
from asyncflow.channels import Channel
from asyncflow.clock import ManualClock
from asyncflow.dispatch import Dispatcher, Route
from asyncflow.event import Event
from asyncflow.keys import KeyOfRawCache, LaneCache, RawKeyCache, key_hash, lane_of
from asyncflow.lanes import LaneQueue
from asyncflow.memory import MemoryBroker
from asyncflow.metrics import Metrics
from asyncflow.partition_log import MemoryRecord, PartitionLog
from asyncflow.protocols import RawBatch, RawColumns, SinkRecord, TopicPartition, TopicSpec
from asyncflow.repartition import MARK_HEADER, RepartitionMarks
from asyncflow.slices import LaneSlice
from asyncflow.testing import CaptureSink, TestRun
from asyncflow.watermarks import PartitionWatermarks

P0 = TopicPartition("t", 0)

RECORDS = st.lists(
    st.tuples(
        st.sampled_from([b"a", b"b", b"c", b"d", b"e", None]),
        st.integers(0, 99),
        st.sampled_from([None, 1_000, 2_000]),
        st.sampled_from([(), (("h", b"1"),)]),
    ),
    min_size=1,
    max_size=40,
)


def filled_log(rows: list[tuple[bytes | None, int, int | None, Any]]) -> PartitionLog:
    log = PartitionLog()
    for key, n, ts, headers in rows:
        log.add(key, orjson.dumps({"n": n}), ts, headers)
    return log


@settings(max_examples=60, deadline=None)
@given(rows=RECORDS, start=st.integers(0, 45), size=st.integers(1, 50))
def test_a_memory_partition_hands_a_range_by_column_and_record_by_record_alike(
    rows: list[Any], start: int, size: int
) -> None:
    log = filled_log(rows)
    records, cols = log.read(start, start + size)
    expected = [
        MemoryRecord(i, key, orjson.dumps({"n": n}), ts, headers)
        for i, (key, n, ts, headers) in enumerate(rows)
    ][start : start + size]
    assert list(records) == expected and len(records) == len(expected)
    assert [records[i] for i in range(len(records))] == expected
    if expected:
        assert records[-1] == expected[-1] and records[1:] == expected[1:]
    by_record = RawColumns.of(expected)
    assert list(cols.offsets) == list(by_record.offsets)
    assert (cols.keys, cols.values, cols.timestamps) == (
        by_record.keys, by_record.values, by_record.timestamps
    )
    assert cols.headers == by_record.headers  # None when no record of the range has any


def test_a_memory_partition_keeps_one_object_per_distinct_key_up_to_its_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncflow.partition_log as partition_log

    monkeypatch.setattr(partition_log, "KEYS_KEPT", 2)
    log = PartitionLog()
    keys = [b"key-a", b"key-b", b"key-a", b"key-c", b"key-c", b"key-b"]
    for i, k in enumerate(keys):
        log.add(bytes(bytearray(k)), str(i).encode(), i, ())  # a new object each time
    _, cols = log.read(0, 6)
    assert list(cols.keys) == keys  # what was added
    assert cols.keys[0] is cols.keys[2] and cols.keys[1] is cols.keys[5]  # shared
    assert cols.keys[3] is not cols.keys[4]  # past the limit: kept as they came
    assert [r.value for r in log] == [b"0", b"1", b"2", b"3", b"4", b"5"]


def test_a_record_outside_the_partition_or_the_range_is_an_index_error() -> None:
    log = filled_log([(b"a", 1, None, ())])
    records, _ = log.read(0, 10)
    for seq, i in ((log, 1), (log, -2), (records, 1)):
        try:
            seq[i]
        except IndexError:
            continue
        raise AssertionError(f"{seq!r}[{i}] did not raise")


class NoSource:
    def pause(self, partitions: Any) -> None: ...
    def resume(self, partitions: Any) -> None: ...


def dispatcher(lanes: list[LaneQueue], dead: list[tuple[Any, str]] | None = None,
               channel: Channel[Any] | None = None) -> Dispatcher:
    return Dispatcher(
        NoSource(),  # type: ignore[arg-type]
        {"t": Route(channel or Channel("t"), [lanes])},
        PartitionWatermarks(None),
        ManualClock(),
        Metrics(),
        lambda topic, partition, rec, reason: (dead if dead is not None else []).append(
            (rec.offset, reason)),
    )


def lane_contents(lanes: list[LaneQueue]) -> list[list[tuple[Any, ...]]]:
    """What each lane holds, as ``(key, value, time, headers, partition, offset)`` rows."""
    out = []
    for q in lanes:
        rows = []
        for item in q._items:
            events: list[Event[Any]] = item.events() if type(item) is LaneSlice else item
            rows += [(e.key, e.value, e.time, tuple(e.headers), e.partition, e.offset)
                     for e in events]
        out.append(rows)
    return out


@settings(max_examples=80, deadline=None)
@given(rows=RECORDS, n=st.integers(1, 4), columns=st.booleans(), poison=st.sets(st.integers(0, 39)))
def test_a_batch_by_column_reaches_the_lanes_as_the_same_batch_by_record(
    rows: list[Any], n: int, columns: bool, poison: set[int]
) -> None:
    log = PartitionLog()
    for i, (key, v, ts, headers) in enumerate(rows):
        log.add(key, b"{bad" if i in poison else orjson.dumps({"n": v}), ts, headers)
    records, cols = log.read(0, len(rows))
    got: list[list[tuple[Any, ...]]] = []
    dead: list[list[tuple[Any, str]]] = []
    frontiers: list[int | None] = []
    for batch in (RawBatch("t", P0, records, cols), RawBatch("t", P0, list(records))):
        lanes = [LaneQueue(10_000) for _ in range(n)]
        for q in lanes:
            q.takes_columns = columns
        dead.append([])
        d = dispatcher(lanes, dead[-1])
        d.watermarks.assign(P0)
        d.dispatch(batch)
        got.append(lane_contents(lanes))
        frontiers.append(d.watermarks.frontier(P0))
    # the partition's event time is the batch's largest, by column as by record, and
    # a record that does not decode counts too (the log has passed it)
    times = [ts for _, _, ts, _ in rows if ts is not None]
    assert frontiers[0] == frontiers[1] == (max(times) if times else None)
    # (a lane that takes columns decodes its values itself: its poison is written as it
    # reads them, lane by lane, so the dead letters are the same but not in one order)
    assert got[0] == got[1] and sorted(dead[0]) == sorted(dead[1])
    assert sorted(o for o, _ in dead[0]) == sorted(i for i in poison if i < len(rows))
    for i, lane in enumerate(got[0]):  # each record in its key's lane, in offset order
        assert all(lane_of(k, n) == i for k, *_ in lane)
        assert [r[-1] for r in lane] == sorted(r[-1] for r in lane)


def test_a_restored_partition_skips_what_its_state_reflects_in_a_batch_by_column() -> None:
    log = filled_log([(b"a", i, 1_000 + i, ()) for i in range(6)])
    lane = LaneQueue(1_000)
    lane.takes_columns = True
    d = dispatcher([lane])
    d.assign(P0, skip_to=3)
    records, cols = log.read(0, 6)
    d.dispatch(RawBatch("t", P0, records, cols))
    assert [row[-1] for row in lane_contents([lane])[0]] == [4, 5]


def test_a_repartition_batch_without_markers_is_taken_as_it_is_by_its_keys_alone() -> None:
    marks = RepartitionMarks(None)
    log = filled_log([(b"a", 1, 5, ()), (b"b", 2, 6, ())])
    records, cols = log.read(0, 2)
    assert marks.take(P0, records, 0, cols.keys) == (records, None)
    log.add(None, b"7", 7, ((MARK_HEADER, b"0/1"),))  # a marker: no key
    records, cols = log.read(0, 3)
    data, marked = marks.take(P0, records, 0, cols.keys)
    assert [r.offset for r in data] == [0, 1] and marked is not None


def test_each_raw_key_gets_the_lane_of_its_key_and_only_immutable_keys_are_kept() -> None:
    decoded: list[bytes] = []

    def decode(raw: bytes) -> Any:
        decoded.append(raw)
        return orjson.loads(raw)

    raw_keys = RawKeyCache(decode)
    keys = KeyOfRawCache(raw_keys)
    lanes = LaneCache(lambda raw: raw_keys[raw][1], 4)
    assert [keys[b'"a"'], keys[b'"a"'], keys[None]] == ["a", "a", None]
    assert lanes[b'"a"'] == lane_of("a", 4) and lanes[None] == lane_of(None, 4)
    assert keys[b"1.5"] == keys[b"1.5"] == 1.5  # kept only if immutable: decoded each time
    assert decoded == [b'"a"', b"1.5", b"1.5"]
    try:
        lanes[b'{"a": 1}']  # a dict is no key: its record goes to the dead letters
    except TypeError:
        pass
    else:
        raise AssertionError("an unhashable key got a lane")
    assert b'{"a": 1}' not in lanes and LaneCache(key_hash, 3)[7] == 7 % 3


async def test_send_values_sends_each_value_with_the_key_its_function_gives() -> None:
    app = af.App("values")
    numbers = app.topic("numbers")
    doubled = app.topic("doubled")
    keyless = app.topic("keyless")
    out = app.sink(CaptureSink("out"))

    @app.agent(numbers)
    async def double(stream: af.Stream[dict[str, int]]) -> None:
        async for batch in stream.batches():
            await out.send_values(batch)
            await doubled.send_values([v["n"] * 2 for v in batch], key=str)
            await keyless.send_values(batch, headers=[("h", b"1")])
            await keyless.send_values(v["n"] for v in batch)  # any iterable

    async with TestRun(app) as run:
        await run.send_many("numbers", [{"n": n} for n in range(5)])
        await run.finish()
        sent = run.broker.records("doubled")
        plain = run.broker.records("keyless")
    assert [(r.key, r.value) for r in out.sink.records] == [(None, {"n": n}) for n in range(5)]
    assert sorted((r.key, r.value, tuple(r.headers)) for r in plain) == sorted(
        [(None, b'{"n":%d}' % n, (("h", b"1"),)) for n in range(5)]
        + [(None, b"%d" % n, ()) for n in range(5)]
    )
    assert sorted((r.key, r.value) for r in sent) == [
        (str(n * 2).encode(), str(n * 2).encode()) for n in range(5)
    ]


def test_send_values_outside_a_running_app_says_so() -> None:
    app = af.App("t")
    try:
        asyncio.run(app.topic("out").send_values([1]))  # type: ignore[arg-type]
    except af.ConfigError as exc:
        assert "not running" in str(exc)
    else:
        raise AssertionError("sent without a running app")


async def test_a_memory_topic_keeps_what_is_appended_to_it_by_every_path() -> None:
    broker = MemoryBroker()
    await broker.ensure_topics([TopicSpec("t", partitions=1)])
    broker.produce("t", b"1", key=b"k", headers=[("h", b"x")], timestamp=5)
    broker.produce_records([SinkRecord(b"k", b"2", topic="t", timestamp=6)])
    await broker.append("t", 0, [SinkRecord(None, b"3", timestamp=7)])
    recs = broker.records("t")
    assert [(r.offset, r.key, r.value, r.headers) for r in recs] == [
        (0, b"k", b"1", (("h", b"x"),)), (1, b"k", b"2", ()), (2, None, b"3", ()),
    ]
    assert [r.timestamp for r in recs][:2] == [5, 6]
    assert [r.value for r in await broker.read_changelog("t", 0, 1, timeout=0)] == [b"2", b"3"]
    assert [type(r) for r in recs] == [MemoryRecord] * 3


def test_a_slice_with_raw_keys_decodes_them_only_when_they_are_read() -> None:
    looked_up: list[bytes | None] = []

    class KeyOf(dict[bytes | None, Any]):
        def __missing__(self, raw: bytes | None) -> Any:
            looked_up.append(raw)
            return None if raw is None else raw.decode()

    s = LaneSlice(P0, [b"a", None, b"b"], [1, 2, 3], [None] * 3, range(5, 8), key_of=KeyOf())
    assert looked_up == [] and len(s) == 3
    assert s.event(2).key == "b" and looked_up == [b"b"]  # one event: one key
    assert s.take([1, 2]).keys == [None, "b"]
    assert s.keys == ["a", None, "b"] and s.keys is s.keys  # the column, decoded once
    assert [e.offset for e in s.events()] == [5, 6, 7]
