"""Streams and lanes: operations in the lane, checkpoint barriers, bounded queues."""

import asyncio

import pytest

import asyncflow as af
from asyncflow.checkpoint import Barrier
from asyncflow.event import Event, Watermark
from asyncflow.lanes import LaneClosed, LaneQueue
from asyncflow.stream import LaneContext, Stream
from asyncflow.testing import stream_of


async def test_map_filter_and_key_by_apply_in_order() -> None:
    s = stream_of([1, 2, 3, 4]).map(lambda v: v * 3).filter(lambda v: v % 2 == 0).key_by(str)
    out = [(s.current.key if s.current else None, v) async for v in s]
    assert out == [("6", 6), ("12", 12)]


async def test_async_map_and_filter_functions_are_awaited() -> None:
    async def double(v: int) -> int:
        return v * 2

    async def small(v: int) -> bool:
        return v < 5

    assert await stream_of([1, 2, 3]).map(double).filter(small).collect() == [2, 4]


async def test_a_lane_waits_at_a_barrier_only_after_the_events_before_it() -> None:
    q = LaneQueue(10)
    q.put([Event(None, 1), Event(None, 2)])
    barrier = Barrier(lanes=1)
    q.put_barrier(barrier)
    q.put([Event(None, 3)])
    q.close()
    s: Stream[int] = Stream(q, LaneContext("a", 0))
    assert [await s.__anext__(), await s.__anext__()] == [1, 2]
    assert not barrier.aligned.is_set()  # event 2 is being handled
    nxt = asyncio.ensure_future(s.__anext__())
    await asyncio.wait_for(barrier.aligned.wait(), 1)
    assert not nxt.done()  # the lane waits until the checkpoint took the state
    barrier.release()
    assert await nxt == 3


async def test_a_batch_ends_early_at_a_barrier() -> None:
    q = LaneQueue(10)
    q.put([Event(None, 1)])
    barrier = Barrier(lanes=1)
    q.put_barrier(barrier)
    q.put([Event(None, 2)])
    q.close()
    s: Stream[int] = Stream(q, LaneContext("a", 0))
    batches = s.batch(100, timeout=5)
    assert await batches.__anext__() == [1]  # not held back for the barrier
    assert not barrier.aligned.is_set()
    nxt = asyncio.ensure_future(batches.__anext__())
    await asyncio.wait_for(barrier.aligned.wait(), 1)
    barrier.release()
    assert await nxt == [2]


async def test_batch_groups_values_and_flushes_the_rest_at_the_end() -> None:
    assert [b async for b in stream_of(range(7)).batch(3, timeout=1)] == [[0, 1, 2], [3, 4, 5], [6]]


async def test_batch_yields_what_it_has_after_the_timeout() -> None:
    q = LaneQueue(10)
    q.put([Event(None, 1)])
    s: Stream[int] = Stream(q, LaneContext("a", 0))
    batches = s.batch(100, timeout=0.01)
    assert await batches.__anext__() == [1]


async def test_events_gives_key_time_and_position() -> None:
    s = stream_of(["a"], keys=["k"], times=[1500])
    (ev,) = [e async for e in s.events()]
    assert (ev.key, ev.value, ev.time) == ("k", "a", 1500)


async def test_lane_queue_reports_room_and_calls_back_when_drained() -> None:
    drained: list[LaneQueue] = []
    q = LaneQueue(4, on_room=drained.append)
    q.put([1, 2, 3])
    assert not q.has_room(2)
    q.put_watermark(Watermark(1, 0))
    q.put_watermark(Watermark(2, 0))  # replaces the waiting one
    assert await q.get() == [1, 2, 3]
    assert drained == [q]
    mark = await q.get()
    assert isinstance(mark, Watermark) and mark.time == 2
    q.close()
    with pytest.raises(LaneClosed):
        await q.get()


async def test_an_empty_lane_always_takes_one_batch() -> None:
    q = LaneQueue(2)
    assert q.has_room(10)


async def test_get_within_returns_none_when_nothing_arrives() -> None:
    assert await LaneQueue(1).get_within(0.001) is None


def test_window_calls_at_the_same_place_reuse_their_state() -> None:
    from datetime import timedelta

    s = stream_of([])
    w1 = s.window(af.Tumbling(timedelta(seconds=1)), aggregate=af.Count())
    s._window_calls = 0  # what a restarted agent body does
    w2 = s.window(af.Tumbling(timedelta(seconds=1)), aggregate=af.Count())
    assert w1 is w2
