"""Lane slices as columns: one partition's decoded records for one lane, without an event each.

When the dispatcher can, it hands a lane a ``LaneSlice`` rather than a list of
events: the decoded keys, values and event times side by side with the
records' offsets (and headers, when any record has some). Consumers read the
columns directly: window operators and ``stream.batches()`` a slice at a time,
the per-item loop a value at a time (``event(i)`` when ``stream.current`` is
read); anything that needs the events themselves gets them from ``events()``,
made once, when first asked for.

The raw records are not kept: what a lane holds is what it will use, so a
queue of slices holds no more objects than a queue of events would (fewer:
no envelope per record). Keys may come raw (the records' key bytes, with the
route's cache of decoded keys, ``key_of``): they are decoded when first read,
so a consumer that never reads them (``batches()`` over map and filter, the
per-item loop) costs no key lookup per record.

Example:
    >>> s = LaneSlice("p0", ["a", "b"], [1, 2], [10, 20], [5, 6])
    >>> len(s), s.first_offset, s.events()[1]
    (2, 5, Event(key='b', value=2, time=20, partition='p0', offset=6))
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from itertools import repeat
from typing import Any

from asyncflow.event import Event

Headers = Sequence[tuple[str, bytes]]


class LaneSlice:
    """One partition's records for one lane, as columns: keys, values, times, offsets, headers.

    The columns line up: ``keys[i]``, ``values[i]``, ``times[i]`` (epoch ms
    or ``None``) and ``offsets[i]`` are the ``i``-th record's; ``headers`` is
    a column too, or ``None`` when no record has any. ``events()`` makes the
    ``Event`` of each (once: the same objects on every call); ``event(i)``
    one of them without making the others.

    Example:
        >>> s = LaneSlice(0, ["k"], [{"v": 1}], [None], [3], [[("h", b"1")]])
        >>> s.event(0).offset, s.event(0).headers, s.events() is s.events()
        (3, [('h', b'1')], True)
    """

    __slots__ = ("_events", "_key_of", "_keys", "headers", "offsets", "partition", "times",
                 "values")

    def __init__(
        self,
        partition: Hashable,
        keys: Sequence[Any],
        values: list[Any],
        times: Sequence[int | None],
        offsets: Sequence[int],
        headers: Sequence[Headers] | None = None,
        key_of: Mapping[Any, Any] | None = None,
    ) -> None:
        self.partition = partition
        self._keys = keys
        self._key_of = key_of
        """With raw ``keys``: their decoded keys, ``key_of[raw]`` (``None``: ``keys`` are decoded)."""
        self.values = values
        self.times = times
        self.offsets = offsets
        self.headers = headers
        self._events: list[Event[Any]] | None = None

    def __len__(self) -> int:
        return len(self.values)

    @property
    def keys(self) -> Sequence[Any]:
        """The records' keys, decoded on the first read if the slice came with raw ones.

        Example:
            >>> s = LaneSlice(0, [b"a"], [1], [None], [0], key_of={b"a": "a"})
            >>> s.event(0).key, s.keys
            ('a', ['a'])
        """
        key_of = self._key_of
        if key_of is not None:
            self._keys = list(map(key_of.__getitem__, self._keys))
            self._key_of = None
        return self._keys

    @property
    def first_offset(self) -> int:
        """The offset of the slice's first record."""
        return self.offsets[0]

    def events(self) -> list[Event[Any]]:
        """The slice as events, in order (made on the first call, then the same list)."""
        events = self._events
        if events is None:
            p = self.partition
            headers = repeat((), len(self)) if self.headers is None else self.headers
            events = self._events = [
                Event(key, value, t, h, p, offset)
                for key, value, t, offset, h in zip(self.keys, self.values, self.times,
                                                    self.offsets, headers, strict=True)
            ]
        return events

    def event(self, i: int) -> Event[Any]:
        """The ``i``-th record as an event (from ``events()`` once they are made)."""
        events = self._events
        if events is not None:
            return events[i]
        headers = () if self.headers is None else self.headers[i]
        key = self._keys[i] if self._key_of is None else self._key_of[self._keys[i]]
        return Event(key, self.values[i], self.times[i], headers, self.partition,
                     self.offsets[i])

    def take(self, kept: Sequence[int]) -> LaneSlice:
        """The records at the indices ``kept`` (in their order), as a slice of their own.

        Example:
            >>> LaneSlice(0, "ab", [1, 2], [0, 0], [7, 8]).take([1]).offsets
            [8]
        """
        keys, values, times, offsets, headers = (
            self._keys, self.values, self.times, self.offsets, self.headers
        )
        return LaneSlice(
            self.partition,
            [keys[i] for i in kept],
            [values[i] for i in kept],
            [times[i] for i in kept],
            [offsets[i] for i in kept],
            None if headers is None else [headers[i] for i in kept],
            self._key_of,
        )

    def __getitem__(self, i: int) -> Event[Any]:
        return self.events()[i]

    def __iter__(self) -> Iterator[Event[Any]]:
        return iter(self.events())

    def __repr__(self) -> str:
        return f"LaneSlice(partition={self.partition!r}, records={len(self)})"
