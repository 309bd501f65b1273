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
no envelope per record). Values may come raw too (the records' bytes, with a
``ValueDecoder``, when nothing routed on them: ``asyncflow.raw_values``): the
first read of ``values`` decodes them, and a record that does not decode is a
dead letter then and leaves the slice. Keys may come raw (the records' key bytes, with the
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
from typing import TYPE_CHECKING, Any

from asyncflow.event import Event
from asyncflow.protocols import Record

if TYPE_CHECKING:
    from asyncflow.raw_values import ValueDecoder

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

    __slots__ = ("_decoder", "_events", "_key_of", "_keys", "_values", "headers", "offsets",
                 "partition", "times")

    def __init__(
        self,
        partition: Hashable,
        keys: Sequence[Any],
        values: Sequence[Any],
        times: Sequence[int | None],
        offsets: Sequence[int],
        headers: Sequence[Headers] | None = None,
        key_of: Mapping[Any, Any] | None = None,
        decoder: ValueDecoder | None = None,
    ) -> None:
        self.partition = partition
        self._keys = keys
        self._key_of = key_of
        """With raw ``keys``: their decoded keys, ``key_of[raw]`` (``None``: ``keys`` are decoded)."""
        self._values = values
        self._decoder = decoder
        """With raw ``values`` (the records' bytes): what decodes them (``None``: decoded)."""
        self.times = times
        self.offsets = offsets
        self.headers = headers
        self._events: list[Event[Any]] | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def values(self) -> Sequence[Any]:
        """The records' values, decoded on the first read if the slice came with raw ones.

        A record that does not decode is a dead letter then, and leaves the
        slice (all of its columns): read ``values`` before the other columns.

        Example:
            >>> from asyncflow.channels import Channel
            >>> from asyncflow.raw_values import ValueDecoder
            >>> dead = []
            >>> d = ValueDecoder(Channel("t"), lambda t, p, rec, why: dead.append(rec.offset))
            >>> s = LaneSlice(0, ["a", "b"], [b"{bad", b"2"], [None, None], [4, 5], decoder=d)
            >>> len(s), s.values, len(s), s.offsets, dead
            (2, [2], 1, [5], [4])
        """
        if self._decoder is not None:
            self._decode()
        return self._values

    @property
    def raw_values(self) -> Sequence[Any] | None:
        """The records' values as read, if they are not decoded yet (else ``None``)."""
        return self._values if self._decoder is not None else None

    @property
    def decoder(self) -> ValueDecoder | None:
        """What decodes ``raw_values`` (``None`` once they are decoded)."""
        return self._decoder

    def _decode(self) -> None:
        decoder = self._decoder
        assert decoder is not None
        raws = self._values
        try:
            self._values = decoder.decode_many(raws)
        except Exception:  # noqa: BLE001 - some record is poison: find it record by record
            self._decode_each(decoder, raws)
        self._decoder = None

    def _decode_each(self, decoder: ValueDecoder, raws: Sequence[Any]) -> None:
        """Decode record by record: each that fails is a dead letter and leaves the slice."""
        values: list[Any] = []
        good: list[int] = []
        for i, raw in enumerate(raws):
            try:
                values.append(decoder.decode_one(raw))
            except Exception as exc:  # noqa: BLE001 - this record's problem: its dead letter
                hs = () if self.headers is None else self.headers[i]
                decoder.poison(self.partition, Record(self.offsets[i], self._keys[i], raw,
                                                      self.times[i], hs), exc)
                continue
            good.append(i)
        keys, times, offsets, headers = self._keys, self.times, self.offsets, self.headers
        self._keys = [keys[i] for i in good]
        self.times = [times[i] for i in good]
        self.offsets = [offsets[i] for i in good]
        self.headers = None if headers is None else [headers[i] for i in good]
        self._values = values

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
            values = self.values  # first: records that do not decode leave the other columns
            p = self.partition
            headers = repeat((), len(self)) if self.headers is None else self.headers
            events = self._events = [
                Event(key, value, t, h, p, offset)
                for key, value, t, offset, h in zip(self.keys, values, self.times,
                                                    self.offsets, headers, strict=True)
            ]
        return events

    def event(self, i: int) -> Event[Any]:
        """The ``i``-th record as an event (from ``events()`` once they are made).

        Of a slice whose values are still raw, only that record is decoded:
        ``i`` must be one known to decode.
        """
        events = self._events
        if events is not None:
            return events[i]
        headers = () if self.headers is None else self.headers[i]
        key = self._keys[i] if self._key_of is None else self._key_of[self._keys[i]]
        decoder = self._decoder
        value = self._values[i] if decoder is None else decoder.decode_one(self._values[i])
        return Event(key, value, self.times[i], headers, self.partition, self.offsets[i])

    def take(self, kept: Sequence[int]) -> LaneSlice:
        """The records at the indices ``kept`` (in their order), as a slice of their own.

        Example:
            >>> LaneSlice(0, "ab", [1, 2], [0, 0], [7, 8]).take([1]).offsets
            [8]
        """
        values = self.values  # first: records that do not decode leave the other columns
        keys, times, offsets, headers = self._keys, self.times, self.offsets, self.headers
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
