"""WindowedStream on a stand-in stream: results, late events, errors, partitions, state, end of input."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Sequence
from datetime import timedelta
from typing import Any

import pytest

from asyncflow.event import Event, Watermark
from asyncflow.metrics import Metrics
from asyncflow.windows import (
    Count,
    Hopping,
    Mean,
    ProcessingTumbling,
    Sum,
    Tumbling,
    WindowedStream,
    WindowResult,
    fold,
)

S = timedelta(seconds=1)

Item = Event[Any] | Watermark | Callable[[], None]


class Lane:
    """A lane without state: nothing is restored, nothing registered."""

    index = 0
    lanes = 1


class FakeStream:
    """The part of the lead's Stream that WindowedStream uses."""

    def __init__(self, items: Sequence[Item], *, bounded: bool = True) -> None:
        self._items = deque(items)
        self._bounded = bounded  # a bounded input ends with a final watermark, as the runtime's
        self._lane = Lane()
        self.metrics = Metrics()
        self.dead: list[tuple[Event[Any], str]] = []
        self.current: Event[Any] | None = None
        self._held: Event[Any] | None = None
        self._window_key: Any = None
        self.ended = False  # the final watermark was handed out

    async def _next_events(self, *, columns: bool = False) -> tuple[list[Event[Any]], None] | Watermark:
        """One event a slice, so a test can act between two events (as events, not columns)."""
        while self._items:
            item = self._items.popleft()
            if isinstance(item, Watermark):
                return item
            if isinstance(item, Event):
                return [item], None
            item()  # a step of the test between two items
        if self._bounded:
            self._bounded = False
            self.ended = True
            return Watermark(None, 0, final=True)
        raise StopAsyncIteration

    async def dead_letter(self, event: Event[Any], reason: str) -> None:
        self.dead.append((event, reason))


class FakeSink:
    """Keeps what it is sent, with the stream's current event at the time."""

    def __init__(self, stream: FakeStream, *, fail: bool = False) -> None:
        self.stream = stream
        self.fail = fail
        self.sent: list[Any] = []
        self.currents: list[Event[Any] | None] = []

    async def send(self, key: Any, value: Any) -> None:
        self.currents.append(self.stream.current)
        if self.fail:
            raise RuntimeError("sink down")
        self.sent.append((key, value))


def events(partition: Any, specs: list[tuple[str, int | None, Any]]) -> list[Event[Any]]:
    """Events read from one partition, at offsets 0, 1, ..."""
    return [
        Event(key, value, time=t, partition=partition, offset=i)
        for i, (key, t, value) in enumerate(specs)
    ]


def summary(r: WindowResult) -> tuple[Any, int, int, Any]:
    return (r.key, r.start_ms, r.end_ms, r.value)


@pytest.mark.asyncio
async def test_results_come_out_as_watermarks_pass() -> None:
    e0, e1, e2 = events("p0", [("k", 1_000, 1), ("k", 2_000, 2), ("k", 6_000, 4)])
    stream = FakeStream([e0, Watermark(1_000, 0), e1, e2, Watermark(6_000, 0)])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Sum())

    first = await windows.__anext__()
    assert summary(first) == ("k", 0, 5_000, 3)
    assert first.start.isoformat() == "1970-01-01T00:00:00+00:00"
    assert first.final and stream._window_key == "k"
    assert not stream.ended  # fired by the watermark at 6 s, before the input ended

    second = await windows.__anext__()  # the end of input flushes [5 s, 10 s)
    assert summary(second) == ("k", 5_000, 10_000, 4)
    assert stream.ended
    with pytest.raises(StopAsyncIteration):
        await windows.__anext__()
    assert stream.dead == []


@pytest.mark.asyncio
async def test_a_window_comes_out_at_the_watermark_of_its_max_timestamp() -> None:
    log: list[Any] = []
    stream = FakeStream([
        *events("p0", [("k", 1_000, 1)]),
        Watermark(4_998, 0),
        lambda: log.append("read past 4_998"),
        Watermark(4_999, 0),
        lambda: log.append("read past 4_999"),
    ])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())
    async for r in windows:
        log.append(summary(r))
    assert log == ["read past 4_998", ("k", 0, 5_000, 1), "read past 4_999"]


@pytest.mark.asyncio
async def test_a_hopping_event_is_in_each_of_its_windows_and_each_fires_at_its_watermark() -> None:
    log: list[Any] = []
    stream = FakeStream([
        *events("p0", [("k", 7_000, 1)]),
        Watermark(9_999, 0),
        lambda: log.append("read past 9_999"),
        Watermark(14_999, 0),
        lambda: log.append("read past 14_999"),
    ])
    windows = WindowedStream(stream, Hopping(10 * S, 5 * S), aggregate=Count())
    async for w in windows:
        log.append((w.start_ms, w.end_ms, w.value))
    assert log == [(0, 10_000, 1), "read past 9_999", (5_000, 15_000, 1), "read past 14_999"]


@pytest.mark.asyncio
async def test_with_lateness_a_window_refires_for_late_events_then_is_purged_silently() -> None:
    e0, e1, e2, e3 = events(
        "p0", [("k", 1_000, 1), ("k", 3_000, 2), ("k", 4_000, 7), ("k", 20_000, 5)]
    )
    stream = FakeStream([
        e0, Watermark(5_000, 0),  # fires [0, 5 s); open until 15 s
        e1, Watermark(15_000, 0),  # a late firing, then [0, 5 s) is purged without a result
        e2, e3, Watermark(30_000, 0),  # e2 is too late now
    ])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Sum(), lateness=10 * S)
    got = [(summary(r), r.final) async for r in windows]
    assert got == [
        (("k", 0, 5_000, 1), True),
        (("k", 0, 5_000, 3), True),
        (("k", 20_000, 25_000, 5), True),
    ]
    [(event, reason)] = stream.dead
    assert event is e2 and reason.startswith("late event: every window of event time")
    assert stream.metrics.get("late_events") == 1


@pytest.mark.asyncio
async def test_a_late_event_goes_to_the_late_sink_and_is_counted() -> None:
    e0, e1 = events("p0", [("k", 10_000, 1), ("k", 1_000, 99)])
    stream = FakeStream([e0, Watermark(10_000, 0), e1])
    late = FakeSink(stream)
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Sum(), late=late)
    assert [summary(r) async for r in windows] == [("k", 10_000, 15_000, 1)]
    assert late.sent == [("k", 99)]
    assert late.currents == [e1]  # sent as the stream's current event
    assert stream.metrics.get("late_events") == 1
    assert stream.dead == []


@pytest.mark.asyncio
async def test_a_late_event_goes_to_the_dead_letter_output_by_default() -> None:
    stream = FakeStream([Event("k", 1, time=10_000), Watermark(10_000, 0), Event("k", 2, time=0)])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())
    assert [r.value async for r in windows] == [1]
    [(event, reason)] = stream.dead
    assert event.value == 2 and reason.startswith("late event: every window of event time")
    assert stream.metrics.get("late_events") == 1


@pytest.mark.asyncio
async def test_an_event_without_event_time_goes_to_the_dead_letter_output() -> None:
    stream = FakeStream([Event("k", 1, time=None), Event("k", 2, time=5)])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())
    assert [r.value async for r in windows] == [1]
    assert [(e.value, reason) for e, reason in stream.dead] == [(1, "no event time")]


@pytest.mark.asyncio
async def test_an_error_in_an_aggregate_goes_to_the_error_policy_with_the_event_as_current() -> None:
    def add(acc: int, value: Any) -> int:
        if value == "bad":
            raise ValueError("not a number")
        return acc + int(value)

    good, bad, after = events("p0", [("k", 1_000, 1), ("k", 2_000, "bad"), ("k", 3_000, 2)])
    stream = FakeStream([good, bad, after, Watermark(5_000, 0)])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=fold(int, add))
    with pytest.raises(ValueError, match="not a number"):
        await windows.__anext__()
    assert stream.current is bad and stream._held is bad  # what the agent's policy handles
    # the policy dead-letters it and the body goes on: the window has the other events
    assert [summary(r) async for r in windows] == [("k", 0, 5_000, 3)]


@pytest.mark.asyncio
async def test_an_error_in_the_late_sink_comes_out_with_the_late_event_as_current() -> None:
    e0, e1 = events("p0", [("k", 10_000, 1), ("k", 1_000, 99)])
    stream = FakeStream([e0, Watermark(10_000, 0), e1])
    windows = WindowedStream(
        stream, Tumbling(5 * S), aggregate=Sum(), late=FakeSink(stream, fail=True)
    )
    with pytest.raises(RuntimeError, match="sink down"):
        await windows.__anext__()
    assert stream.current is e1
    assert [summary(r) async for r in windows] == [("k", 10_000, 15_000, 1)]


@pytest.mark.asyncio
async def test_a_final_watermark_flushes_open_windows_before_the_input_ends() -> None:
    items: list[Event[Any] | Watermark] = [
        Event("a", 1, time=100),
        Event("b", 1, time=7_000),
        Watermark(7_000, 0, final=True),
    ]
    windows = WindowedStream(FakeStream(items), Tumbling(5 * S), aggregate=Count())
    assert [summary(r) async for r in windows] == [("a", 0, 5_000, 1), ("b", 5_000, 10_000, 1)]


@pytest.mark.asyncio
async def test_a_quiet_source_still_emits_with_system_wait() -> None:
    items: list[Event[Any] | Watermark] = [Event("k", 1, time=3_000), Watermark(3_000, 0)]
    items += [Watermark(3_000, wall) for wall in range(1_000, 60_000, 1_000)]
    stream = FakeStream(items)
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Count(), system_wait=5 * S)
    result = await windows.__anext__()
    assert summary(result) == ("k", 0, 5_000, 1)
    assert len(stream._items) > 40  # emitted from the wall clock, long before the input ended


@pytest.mark.asyncio
async def test_processing_time_windows_follow_the_wall_clock_of_watermarks() -> None:
    items: list[Event[Any] | Watermark] = [
        Watermark(None, wall=10_200),
        Event("k", 1),
        Event("k", 2),
        Watermark(None, wall=10_900),
        Event("k", 3),
        Watermark(None, wall=11_000),
        Event("k", 4),
    ]
    stream = FakeStream(items)
    windows = WindowedStream(stream, ProcessingTumbling(1 * S), aggregate=Count())
    assert [summary(r) async for r in windows] == [
        ("k", 10_000, 11_000, 3),
        ("k", 11_000, 12_000, 1),
    ]
    assert stream.dead == []


@pytest.mark.asyncio
async def test_updates_mode_yields_every_change_then_the_final_result() -> None:
    stream = FakeStream([*events("p0", [("k", 1_000, 1), ("k", 2_000, 2)]), Watermark(5_000, 0)])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Sum(), emit="updates")
    seen = [(r.value, r.final) async for r in windows]
    assert seen == [(1, False), (3, False), (3, True)]


# -- partitions: one operator each, following its own watermark -------------------------


@pytest.mark.asyncio
async def test_each_partitions_windows_follow_that_partitions_watermark() -> None:
    log: list[Any] = []
    [a] = events("p0", [("a", 1_000, 1)])
    [b] = events("p1", [("b", 1_000, 1)])
    stream = FakeStream([
        a, b,
        Watermark(2_000, 0, marks={"p0": 6_000, "p1": 2_000}),  # p0 is past 5 s, p1 is not
        lambda: log.append("p1 at 2 s"),
        Watermark(5_000, 0, marks={"p0": 6_000, "p1": 5_000}),
        lambda: log.append("p1 at 5 s"),
    ])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())
    async for r in windows:
        log.append(summary(r))
    assert log == [("a", 0, 5_000, 1), "p1 at 2 s", ("b", 0, 5_000, 1), "p1 at 5 s"]


@pytest.mark.asyncio
async def test_an_event_is_late_by_the_watermark_of_its_own_partition() -> None:
    [a0, a1] = events("p0", [("a", 7_000, 1), ("a", 1_000, 2)])
    [b0, b1] = events("p1", [("b", 1_000, 3), ("b", 2_000, 4)])
    marks: dict[Hashable, int | None] = {"p0": 7_000, "p1": 1_000}
    stream = FakeStream([a0, b0, Watermark(1_000, 0, marks=marks), a1, b1])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Sum())
    assert sorted([summary(r) async for r in windows]) == [
        ("a", 5_000, 10_000, 1),
        ("b", 0, 5_000, 7),  # b1 is not late: p1 is only at 1 s
    ]
    assert [e for e, _ in stream.dead] == [a1]  # p0 is at 7 s: [0, 5 s) has closed there


@pytest.mark.asyncio
async def test_a_partition_with_nothing_read_yet_is_not_moved_by_the_frontier_of_the_others() -> None:
    # a worker far ahead on p0 takes p1 over; p1's mark is None until its backlog is read,
    # and the watermark's time (the worker's frontier, carried over) says nothing about it
    [a] = events("p0", [("a", 60_000, 1)])
    [b0, b1] = events("p1", [("b", 1_000, 1), ("b", 2_000, 1)])
    stream = FakeStream([
        a, b0,  # p1's operator exists (a restored partition has one before its first event)
        Watermark(60_000, 0, marks={"p0": 60_000, "p1": None}),
        b1,
        Watermark(60_000, 0, marks={"p0": 60_000, "p1": 2_000}),
    ])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())
    got = sorted([summary(r) async for r in windows])
    assert stream.dead == []
    assert got == [("a", 60_000, 65_000, 1), ("b", 0, 5_000, 2)]


@pytest.mark.asyncio
async def test_drop_partitions_forgets_windows_of_revoked_partitions_only() -> None:
    [a0, b0] = events("p0", [("a", 1_000, 1), ("b", 1_000, 1)])
    [b1] = events("p1", [("b", 2_000, 1)])  # b: one event of each (re-keyed in the lane)
    stream = FakeStream([a0, b0, b1, Watermark(2_000, 0)])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())
    stream._items.extend([lambda: windows.drop_partitions({"p0"}), Watermark(5_000, 0)])
    # p0's windows went with the partition (its next owner restores them); p1's stay
    assert [(r.key, r.value) async for r in windows] == [("b", 1)]
    assert windows.operator.open_windows == 0


# -- state -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_export_encodes_the_changed_windows_of_each_partition_once() -> None:
    [a] = events("p0", [("a", 1_000, 1)])
    [b, c] = events("p1", [("b", 1_000, 1), ("c", 6_000, 1)])
    exports: list[Any] = []
    stream = FakeStream([a, b, c, Watermark(1_000, 0)], bounded=False)
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())

    def checkpoint() -> None:
        exports.append((windows.dirty, windows.export()))

    stream._items.extend([
        checkpoint,
        checkpoint,  # nothing changed since
        Watermark(5_000, 0, marks={"p0": 1_000, "p1": 5_000}),  # b's window fires and is purged
        checkpoint,
    ])
    assert [summary(r) async for r in windows] == [("b", 0, 5_000, 1)]
    first, second, third = exports
    assert first[0] is True
    assert {p: sorted(entries) for p, entries in first[1].items()} == {
        "p0": [(b'[0,"a"]', b"[[5000,1]]")],  # [lane, key] -> the key's open windows
        "p1": [(b'[0,"b"]', b"[[5000,1]]"), (b'[0,"c"]', b"[[10000,1]]")],
    }
    assert second == (False, {})
    assert third == (True, {"p1": [(b'[0,"b"]', None)]})  # the purged window: a tombstone


async def test_windowed_stream_works_on_the_real_stream_of_asyncflow_testing() -> None:
    from asyncflow.testing import stream_of

    stream = stream_of(
        [{"value": v} for v in (1.0, 3.0, 10.0, 5.0)],
        keys=["a", "a", "b", "a"],
        times=[0, 4_000, 1_000, 6_000],
    )
    windows = stream.window(Tumbling(5 * S), aggregate={"avg": Mean("value"), "n": Count()})
    got = [(w.key, w.start_ms, w.value) async for w in windows]
    assert got == [
        ("a", 0, {"avg": 2.0, "n": 2}),
        ("b", 0, {"avg": 10.0, "n": 1}),
        ("a", 5_000, {"avg": 5.0, "n": 1}),
    ]


async def test_leaving_the_loop_keeps_the_next_results_for_the_next_loop() -> None:
    stream = FakeStream(events("p0", [("a", 1_000, 1), ("b", 1_000, 1)]) + [Watermark(5_000, 0)])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())
    async for r in windows:
        assert r.key == "a"
        break
    assert [r.key async for r in windows] == ["b"]


async def test_closing_drops_the_results_not_handed_out() -> None:
    stream = FakeStream(events("p0", [("a", 1_000, 1), ("b", 1_000, 1)]) + [Watermark(5_000, 0)])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())
    async for _ in windows:
        break  # handled "a" only
    windows.close()
    assert [r async for r in windows] == []  # "b" fired, but is not handed out after close


async def test_a_lane_closed_without_a_final_watermark_keeps_open_windows_in_state() -> None:
    stream = FakeStream(events("p", [("k", 1_000, 1), ("k", 2_000, 1)]), bounded=False)
    ws = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())
    assert [r async for r in ws] == []  # a stop, not the end of a bounded input: nothing fires
    assert ws.operator.open_windows == 1
    assert ws.export() == {"p": [(b'[0,"k"]', b"[[5000,2]]")]}  # for the next run to resume
