"""WindowedStream on a stand-in stream: results, acks and commits, late events, end of input."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest

from asyncflow.acks import NO_ACK, Ack, AckBatch, PartitionAcks
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
)

S = timedelta(seconds=1)


class Lane:
    def __init__(self) -> None:
        self.current: Ack = NO_ACK


class FakeStream:
    """The part of the lead's Stream that WindowedStream uses."""

    def __init__(
        self,
        items: Sequence[Event[Any] | Watermark | Callable[[], None]],
        *,
        bounded: bool = True,
    ) -> None:
        self._items = deque(items)
        self._bounded = bounded  # a bounded input ends with a final watermark, as the runtime's
        self._lane = Lane()
        self.metrics = Metrics()
        self.dead: list[tuple[Event[Any], str]] = []

    async def _next_item(self, timeout: float | None = None) -> Event[Any] | Watermark | None:
        while self._items:
            item = self._items.popleft()
            if isinstance(item, Event | Watermark):
                return item
            item()  # a step of the test between two items
        if self._bounded:
            self._bounded = False
            return Watermark(None, 0, final=True)
        raise StopAsyncIteration

    async def dead_letter(self, event: Event[Any], reason: str) -> None:
        self.dead.append((event, reason))


class FakeSink:
    """Buffers what it is sent, keeping the lane's current ack until flushed."""

    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream
        self.sent: list[Any] = []
        self._acks: list[Ack] = []

    async def send(self, key: Any, value: Any) -> None:
        ack = self.stream._lane.current
        ack.retain()
        self._acks.append(ack)
        self.sent.append((key, value))

    def flush(self) -> None:
        for ack in self._acks:
            ack.release()
        self._acks.clear()


def tracked(acks: PartitionAcks, specs: list[tuple[str, int | None, Any]]) -> list[Event[Any]]:
    """Events read from one partition, each with one processing reference."""
    batch: AckBatch = acks.open(list(range(len(specs))), refs=1)
    return [
        Event(key, value, time=t, partition=acks.partition, offset=i, batch=batch, index=i)
        for i, (key, t, value) in enumerate(specs)
    ]


def summary(r: WindowResult) -> tuple[Any, int, int, Any]:
    return (r.key, r.start_ms, r.end_ms, r.value)


@pytest.mark.asyncio
async def test_results_come_out_as_watermarks_pass_and_events_commit_once_flushed() -> None:
    acks = PartitionAcks("p0")
    e0, e1, e2 = tracked(acks, [("k", 1_000, 1), ("k", 2_000, 2), ("k", 6_000, 4)])
    stream = FakeStream([e0, Watermark(1_000, 0), e1, e2, Watermark(6_000, 0)])
    sink = FakeSink(stream)
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Sum())

    first = await windows.__anext__()
    assert summary(first) == ("k", 0, 5_000, 3)
    assert first.start.isoformat() == "1970-01-01T00:00:00+00:00"
    assert acks.active == 0  # every event was released; windows hold, they do not process
    await sink.send(first.key, first.value)
    assert acks.done_position() is None  # e0 and e1 wait for the sink

    second = await windows.__anext__()  # the end of input flushes [5 s, 10 s)
    assert summary(second) == ("k", 5_000, 10_000, 4)
    assert acks.done_position() is None
    with pytest.raises(StopAsyncIteration):
        await windows.__anext__()
    assert acks.done_position() is None  # e2 is done, but e0 and e1 before it wait for the sink
    sink.flush()
    assert acks.done_position() == 2


@pytest.mark.asyncio
async def test_a_result_not_kept_by_a_sink_releases_its_events_on_the_next_step() -> None:
    acks = PartitionAcks("p0")
    [e0] = tracked(acks, [("k", 1_000, 1)])
    stream = FakeStream([e0, Watermark(5_000, 0)])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())
    assert [summary(r) async for r in windows] == [("k", 0, 5_000, 1)]
    assert acks.done_position() == 0


@pytest.mark.asyncio
async def test_a_hopping_event_is_held_by_each_window_until_all_results_are_done() -> None:
    acks = PartitionAcks("p0")
    [e0] = tracked(acks, [("k", 7_000, 1)])
    stream = FakeStream([e0, Watermark(9_999, 0), Watermark(14_999, 0)])
    sink = FakeSink(stream)
    windows = WindowedStream(stream, Hopping(10 * S, 5 * S), aggregate=Count())
    async for w in windows:
        await sink.send(w.key, (w.start_ms, w.end_ms))
        if len(sink.sent) == 1:
            sink.flush()  # the first window's result is durable; the second still holds e0
            assert acks.done_position() is None
    assert sink.sent == [("k", (0, 10_000)), ("k", (5_000, 15_000))]
    sink.flush()
    assert acks.done_position() == 0


@pytest.mark.asyncio
async def test_with_lateness_events_commit_only_after_their_last_result_is_durable() -> None:
    acks = PartitionAcks("p0")
    e0, e1 = tracked(acks, [("k", 1_000, 1), ("k", 20_000, 5)])
    stream = FakeStream([e0, Watermark(5_000, 0), Watermark(15_000, 0), e1, Watermark(30_000, 0)])
    sink = FakeSink(stream)
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Sum(), lateness=10 * S)

    early = await windows.__anext__()  # fired at 5 s, open until 15 s
    assert (summary(early), early.holds) == (("k", 0, 5_000, 1), None)
    await sink.send(early.key, early.value)
    later = await windows.__anext__()  # meanwhile [0, 5 s) was purged without a new result
    assert summary(later) == ("k", 20_000, 25_000, 5)
    assert acks.done_position() is None  # e0 waits for the sink to write its result
    sink.flush()
    assert acks.done_position() == 0
    with pytest.raises(StopAsyncIteration):
        await windows.__anext__()
    assert acks.done_position() == 1


@pytest.mark.asyncio
async def test_a_late_event_goes_to_the_late_sink_and_is_counted() -> None:
    acks = PartitionAcks("p0")
    e0, e1 = tracked(acks, [("k", 10_000, 1), ("k", 1_000, 99)])
    stream = FakeStream([e0, Watermark(10_000, 0), e1])
    late = FakeSink(stream)
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Sum(), late=late)
    assert [summary(r) async for r in windows] == [("k", 10_000, 15_000, 1)]
    assert late.sent == [("k", 99)]
    assert stream.metrics.get("late_events") == 1
    assert acks.done_position() == 0  # the late event waits for the late sink
    late.flush()
    assert acks.done_position() == 1


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
async def test_updates_mode_yields_every_change_and_holds_events_until_the_final() -> None:
    acks = PartitionAcks("p0")
    stream = FakeStream([*tracked(acks, [("k", 1_000, 1), ("k", 2_000, 2)]), Watermark(5_000, 0)])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Sum(), emit="updates")
    seen = []
    async for r in windows:
        seen.append((r.value, r.final))
        if not r.final:
            assert acks.done_position() is None
    assert seen == [(1, False), (3, False), (3, True)]
    assert acks.done_position() == 1


@pytest.mark.asyncio
async def test_drop_keys_forgets_windows_and_keeps_their_events_uncommitted() -> None:
    acks = PartitionAcks("p0")
    ea, eb = tracked(acks, [("a", 1_000, 1), ("b", 1_000, 1)])
    items: list[Event[Any] | Watermark | Callable[[], None]] = [ea, eb, Watermark(1_000, 0)]
    stream = FakeStream(items)
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())
    stream._items.extend([lambda: windows.drop_keys(lambda key: key == "a"), Watermark(5_000, 0)])
    assert [r.key async for r in windows] == ["b"]
    assert windows.operator.open_windows == 0
    assert acks.done_position() is None  # "a" stays uncommitted: the next owner replays it
    assert acks.active == 0  # yet the partition is drained and can be handed over


@pytest.mark.asyncio
async def test_drop_partitions_forgets_windows_of_revoked_partitions_only() -> None:
    p0, p1 = PartitionAcks("p0"), PartitionAcks("p1")
    [a0] = tracked(p0, [("a", 1_000, 1)])  # a: only p0's events
    [b0] = tracked(p0, [("b", 1_000, 1)])  # b: one event of each (re-keyed in the lane)
    [b1] = tracked(p1, [("b", 2_000, 1)])
    stream = FakeStream([a0, b0, b1, Watermark(2_000, 0)])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())
    stream._items.extend([lambda: windows.drop_partitions({"p0"}), Watermark(5_000, 0)])
    assert [(r.key, r.value) async for r in windows] == [("b", 2)]
    assert p1.done_position() == 0  # the mixed window emitted and released p1's event
    assert p0.done_position() is None  # a0 stays for the next owner to replay


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


async def test_leaving_the_loop_and_closing_lets_the_last_results_events_commit() -> None:
    acks = PartitionAcks("p0")
    e0, e1 = tracked(acks, [("a", 1_000, 1), ("b", 1_000, 1)])
    stream = FakeStream([e0, e1, Watermark(5_000, 0)])
    windows = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())
    async for _ in windows:
        break  # handled "a" only
    assert acks.done_position() is None
    windows.close()
    assert acks.done_position() == 0  # "b" was never handed out: it stays held


async def test_a_lane_closed_without_a_final_watermark_keeps_open_windows_held() -> None:
    acks = PartitionAcks("p")
    events = tracked(acks, [("k", 1_000, 1), ("k", 2_000, 1)])
    stream = FakeStream([*events], bounded=False)  # a stop, not the end of a bounded input
    ws = WindowedStream(stream, Tumbling(5 * S), aggregate=Count())
    assert [r async for r in ws] == []
    assert acks.done_position() is None  # both events wait, uncommitted, for the replay
