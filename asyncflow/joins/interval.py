"""The interval join of one partition, without I/O: both sides buffered, expired by time.

A left event ``a`` and a right event ``b`` of the same key match when
``a.time + lower <= b.time <= a.time + upper`` (both bounds inclusive;
``lower`` may be negative). Each event is matched on arrival against what the
other side has buffered, then buffered itself, so a pair is found exactly once:
when the second of the two arrives. The watermark expires what no event still
to come can match: a left event once ``a.time + upper`` is below it, a right
event once ``b.time - lower`` is. An event older than the watermark is late
(``on_event`` returns ``False``): its partners may be gone, so it is not
matched. Memory grows with keys times the events of one interval, never with
the whole stream.

Example:
    >>> op = IntervalJoinOperator(lower=0, upper=10_000)      # b within 10 s after a
    >>> _ = op.on_event(0, "u1", 1_000, 0, "click")
    >>> _ = op.on_event(1, "u1", 5_000, 1, "buy")
    >>> _ = op.on_event(1, "u1", 12_000, 2, "too late a buy")
    >>> [(j.left, j.right, j.time) for j in op.results]
    [('click', 'buy', 5000)]
    >>> op.on_watermark(11_500); op.size   # the click and the buy at 5 s are gone
    1
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort
from collections.abc import Hashable
from typing import Any

from asyncflow.joins.results import Item, Joined


def _order(item: list[Any]) -> tuple[int, int]:
    return item[0], item[1]


class IntervalJoinOperator:
    """One partition's interval join (see the module docstring).

    Example:
        >>> op = IntervalJoinOperator(lower=-1_000, upper=1_000)
        >>> _ = op.on_event(1, "k", 5_000, 0, "b"); _ = op.on_event(0, "k", 5_500, 1, "a")
        >>> [(j.left, j.right) for j in op.results]
        [('a', 'b')]
    """

    __slots__ = ("_heap", "dirty", "lower", "results", "sides", "upper", "watermark")

    needs_time = True

    def __init__(self, *, lower: int, upper: int) -> None:
        if lower > upper:
            raise ValueError(f"an interval join needs lower <= upper, got {lower} > {upper}")
        self.lower = lower
        self.upper = upper
        self.sides: tuple[dict[Hashable, list[list[Any]]], dict[Hashable, list[list[Any]]]] = (
            {},
            {},
        )
        """Per side, per key, the buffered events ``[time, seq, value]`` in time order."""
        self._heap: list[tuple[int, int, int, Hashable]] = []  # (expires after, seq, side, key)
        self.watermark: int | None = None
        self.results: list[Joined[Any, Any]] = []
        self.dirty: set[Hashable] = set()

    def on_event(self, side: int, key: Hashable, time: int | None, seq: int, value: Any) -> bool:
        """Match one event against the other side and buffer it; ``False`` when late."""
        assert time is not None, "an interval join takes events with a time"
        wm = self.watermark
        if wm is not None and time < wm:
            return False
        other = self.sides[1 - side].get(key)
        if other:
            if side == 0:  # partners b with time + lower <= b.time <= time + upper
                lo, hi = time + self.lower, time + self.upper
            else:  # partners a with b.time - upper <= a.time <= b.time - lower
                lo, hi = time - self.upper, time - self.lower
            start = bisect_left(other, lo, key=lambda x: x[0])
            end = bisect_right(other, hi, key=lambda x: x[0])
            out = self.results
            for t, _, v in other[start:end]:
                if side == 0:
                    out.append(Joined(key, value, v, max(time, t)))
                else:
                    out.append(Joined(key, v, value, max(time, t)))
        self._buffer(side, key, time, seq, value)
        return True

    def _buffer(self, side: int, key: Hashable, time: int, seq: int, value: Any) -> None:
        insort(self.sides[side].setdefault(key, []), [time, seq, value], key=_order)
        expires = time + self.upper if side == 0 else time - self.lower
        heapq.heappush(self._heap, (expires, seq, side, key))
        self.dirty.add(key)

    def on_watermark(self, watermark: int | None) -> None:
        """Event time has reached ``watermark``: drop what nothing to come can match."""
        if watermark is None or (self.watermark is not None and watermark <= self.watermark):
            return
        self.watermark = watermark
        heap = self._heap
        while heap and heap[0][0] < watermark:
            _, _, side, key = heapq.heappop(heap)
            buffered = self.sides[side].get(key)
            if not buffered:
                continue
            shift = self.upper if side == 0 else -self.lower
            n = 0
            while n < len(buffered) and buffered[n][0] + shift < watermark:
                n += 1
            if n:
                del buffered[:n]
                self.dirty.add(key)
            if not buffered:
                del self.sides[side][key]

    def set_watermark(self, watermark: int | None) -> None:
        """Start at a restored watermark."""
        self.watermark = watermark

    def flush_all(self) -> None:
        """The input ended: nothing is waiting to be emitted (matches come out at once)."""

    def export(self) -> list[tuple[Hashable, list[Item] | None]]:
        """The keys changed since the last export and their items (``None``: nothing left)."""
        out: list[tuple[Hashable, list[Item] | None]] = []
        for key in self.dirty:
            items: list[Item] = [(0, t, s, v) for t, s, v in self.sides[0].get(key, ())]
            items.extend((1, t, s, v) for t, s, v in self.sides[1].get(key, ()))
            out.append((key, items or None))
        self.dirty = set()
        return out

    def load(self, key: Hashable, items: list[Item]) -> None:
        """Restore a key's items (what ``export`` gave)."""
        for side, t, seq, value in items:
            assert t is not None
            self.sides[side].setdefault(key, []).append([t, seq, value])
            expires = t + self.upper if side == 0 else t - self.lower
            heapq.heappush(self._heap, (expires, seq, side, key))

    @property
    def size(self) -> int:
        """Events buffered on both sides."""
        return sum(map(len, self.sides[0].values())) + sum(map(len, self.sides[1].values()))
