"""The per-item loop compiled for a stream's steps (``asyncflow.item_loop``).

``async for value in stream`` runs a loop written for the stream's
``map``/``filter`` steps, with their calls inline. What must hold is what held
with the steps called one at a time: the same values, each with its own event
as ``stream.current``, over slices by their values and over lists of events,
and steps added while the loop runs are followed from the next slice on.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from asyncflow.chain import FILTER, MAP
from asyncflow.event import Event, Watermark
from asyncflow.lanes import LaneQueue
from asyncflow.slices import LaneSlice
from asyncflow.stream import LaneContext, Stream
from tests.unit.test_batch_path import STEPS  # map, filter and key_by steps


def by_hand(steps: list[Any], values: list[int]) -> list[tuple[int, int]]:
    """(offset, value) of what passes the steps, applied one at a time."""
    out = []
    for offset, value in enumerate(values):
        for kind, fn in steps:
            if kind == MAP:
                value = fn(value)
            elif kind == FILTER and not fn(value):
                break
        else:
            out.append((offset, value))
    return out


def stream_over(values: list[int], cuts: list[int], as_columns: bool) -> Stream[Any]:
    """One lane's stream over ``values`` in slices cut at ``cuts``: columns, or lists of events."""
    q = LaneQueue(max(len(values), 1))
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(values)}), len(values)]
    for start, stop in zip(bounds, bounds[1:], strict=False):
        offsets = list(range(start, stop))
        if not offsets:
            continue
        if as_columns:
            q.put(LaneSlice(0, [None] * len(offsets), values[start:stop], [None] * len(offsets),
                            offsets))
        else:
            q.put([Event(None, values[i], None, (), 0, i) for i in offsets])
    q.put_watermark(Watermark(None, 0, final=True))
    q.close()
    return Stream(q, LaneContext("test", 0))


def with_steps(stream: Stream[Any], steps: list[Any]) -> Stream[Any]:
    for kind, fn in steps:
        stream = stream.map(fn) if kind == MAP else stream.filter(fn) if kind == FILTER \
            else stream.key_by(fn)
    return stream


@settings(max_examples=300, deadline=None)
@given(STEPS, st.lists(st.integers(-50, 50), max_size=40), st.lists(st.integers(0, 40), max_size=4),
       st.booleans())
async def test_the_loop_gives_each_value_its_steps_give_with_its_own_event_as_current(
    steps: list[Any], values: list[int], cuts: list[int], as_columns: bool
) -> None:
    stream = with_steps(stream_over(values, cuts, as_columns), steps)
    got = []
    async for v in stream:
        current = stream.current
        assert current is not None
        got.append((current.offset, v))
    assert got == by_hand(steps, values)


async def test_steps_added_while_the_loop_runs_are_followed_from_the_next_slice() -> None:
    stream = stream_over(list(range(6)), [3], as_columns=True).map(lambda v: v + 1)
    got = []
    async for v in stream:
        got.append(v)
        if len(got) == 1:
            stream.filter(lambda v: v % 2 == 0)  # the next slice goes through it too
    assert got == [1, 2, 3, 4, 6]


async def test_a_loop_that_starts_again_after_an_error_goes_on_after_the_value_it_raised_on(
) -> None:
    def invert(v: int) -> int:
        return 60 // v

    stream = stream_over([1, 2, 0, 3, 4], [], as_columns=True)
    got: list[Any] = []
    for _ in range(2):  # as an agent body does after the error policy handled the error
        try:
            async for v in stream.map(invert):
                got.append(v)
        except ZeroDivisionError:
            failed = stream.current
            assert failed is not None
            got.append(("failed at", failed.offset))
            stream._restart()
    assert got == [60, 30, ("failed at", 2), 20, 15]
