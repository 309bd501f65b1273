"""Lane slices as columns: one partition's decoded records for one lane, without an event each.

When every record of a fetched batch goes to the same lane (one lane, or a
partition whose keys all hash to one lane), the dispatcher hands the lane a
``LaneSlice``: the decoded keys, values and event times side by side, and the
raw records they came from (for offsets and headers). Consumers that work a
slice at a time read the columns directly (window operators,
``stream.batches()``); anything that needs the events themselves gets them
from ``events()``, made once, when first asked for.

Example:
    >>> from asyncflow.protocols import Record
    >>> s = LaneSlice("p0", ["a", "b"], [1, 2], [10, 20], [Record(5, b"a", b"1"), Record(6, b"b", b"2")])
    >>> len(s), s.first_offset, s.events()[1]
    (2, 5, Event(key='b', value=2, time=20, partition='p0', offset=6))
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Any

from asyncflow.event import Event
from asyncflow.protocols import RawRecord


class LaneSlice:
    """One partition's records for one lane: ``keys``, ``values``, ``times`` and their ``records``.

    The columns line up: ``keys[i]``, ``values[i]`` and ``times[i]`` (epoch
    ms or ``None``) are what ``records[i]`` decoded to. ``events()`` makes the
    ``Event`` of each (once: the same objects on every call); ``event(i)``
    one of them without making the others.

    Example:
        >>> from asyncflow.protocols import Record
        >>> s = LaneSlice(0, ["k"], [{"v": 1}], [None], [Record(3, b"k", b"{}")])
        >>> s.event(0).offset, s.events() is s.events()
        (3, True)
    """

    __slots__ = ("_events", "keys", "partition", "records", "times", "values")

    def __init__(
        self,
        partition: Hashable,
        keys: Sequence[Any],
        values: list[Any],
        times: Sequence[int | None],
        records: Sequence[RawRecord],
    ) -> None:
        self.partition = partition
        self.keys = keys
        self.values = values
        self.times = times
        self.records = records
        self._events: list[Event[Any]] | None = None

    def __len__(self) -> int:
        return len(self.values)

    @property
    def first_offset(self) -> int:
        """The offset of the slice's first record."""
        return self.records[0].offset

    def events(self) -> list[Event[Any]]:
        """The slice as events, in order (made on the first call, then the same list)."""
        events = self._events
        if events is None:
            p = self.partition
            events = self._events = [
                Event(key, value, t, rec.headers, p, rec.offset)
                for key, value, t, rec in zip(self.keys, self.values, self.times, self.records,
                                              strict=True)
            ]
        return events

    def event(self, i: int) -> Event[Any]:
        """The ``i``-th record as an event (from ``events()`` once they are made)."""
        events = self._events
        if events is not None:
            return events[i]
        rec = self.records[i]
        return Event(self.keys[i], self.values[i], self.times[i], rec.headers, self.partition,
                     rec.offset)

    def take(self, kept: Sequence[int]) -> LaneSlice:
        """The records at the indices ``kept`` (in their order), as a slice of their own.

        Example:
            >>> from asyncflow.protocols import Record
            >>> s = LaneSlice(0, "ab", [1, 2], [0, 0], [Record(0, None, b""), Record(1, None, b"")])
            >>> s.take([1]).values
            [2]
        """
        keys, values, times, records = self.keys, self.values, self.times, self.records
        return LaneSlice(
            self.partition,
            [keys[i] for i in kept],
            [values[i] for i in kept],
            [times[i] for i in kept],
            [records[i] for i in kept],
        )

    def __getitem__(self, i: int) -> Event[Any]:
        return self.events()[i]

    def __iter__(self) -> Iterator[Event[Any]]:
        return iter(self.events())

    def __repr__(self) -> str:
        return f"LaneSlice(partition={self.partition!r}, records={len(self)})"
