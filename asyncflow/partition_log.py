"""One partition of a memory topic, kept by column.

A partition is four parallel lists (keys, values, timestamps, headers); a
record's offset is its position. A reader takes a range as ``RawColumns``
(list slices, no object per record) and, beside them, a view that makes a
``MemoryRecord`` only for a record someone asks for: the dispatcher's fast
path reads columns only, its slow paths (poison, restore, tracing) records.
Four pointers a record (key, value, timestamp, headers) instead of a record object each.
Keys repeat, so a partition keeps one bytes object per distinct key (up to
``KEYS_KEPT``): less memory, and the dispatcher's per-key lookups find the
very object they cached, without comparing bytes.

Example:
    >>> log = PartitionLog()
    >>> log.add(b"k", b"1", 10, ()), log.add(None, b"2", 11, ())
    (0, 1)
    >>> records, cols = log.read(0, 10)
    >>> list(cols.values), records[-1]
    ([b'1', b'2'], MemoryRecord(offset=1, key=None, value=b'2', timestamp=11, headers=()))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import msgspec

from asyncflow.protocols import RawColumns

Headers = Sequence[tuple[str, bytes]]

KEYS_KEPT = 100_000
"""Distinct keys a partition shares one object for; keys past that are stored as they come."""


class MemoryRecord(msgspec.Struct, gc=False):
    """A record of a memory topic (satisfies ``RawRecord``), made when one is asked for.

    Example:
        >>> MemoryRecord(0, b"k", b"v", 5, ()).value
        b'v'
    """

    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None
    headers: Headers


class PartitionLog(Sequence[MemoryRecord]):
    """A memory partition's records by column; ``log[i]`` makes record ``i``.

    Example:
        >>> log = PartitionLog()
        >>> log.add(b"a", b"x", 1, [("h", b"1")])
        0
        >>> len(log), log[0].headers, [r.offset for r in log]
        (1, (('h', b'1'),), [0])
    """

    __slots__ = ("_headed", "_keys_seen", "headers", "keys", "timestamps", "values")

    def __init__(self) -> None:
        self.keys: list[bytes | None] = []
        self.values: list[bytes | None] = []
        self.timestamps: list[int | None] = []
        self.headers: list[Headers] = []
        self._headed = 0  # how many records have headers: none in the usual case
        self._keys_seen: dict[bytes, bytes] = {}  # each distinct key, the one object kept

    def add(self, key: bytes | None, value: bytes | None, timestamp: int | None,
            headers: Headers) -> int:
        """Append a record; returns its offset."""
        headers = headers if type(headers) is tuple else tuple(headers)
        if type(key) is bytes:  # (anything else is kept as it came)
            seen = self._keys_seen
            kept = seen.get(key)
            if kept is not None:
                key = kept
            elif len(seen) < KEYS_KEPT:
                seen[key] = key
        self.keys.append(key)
        self.values.append(value)
        self.timestamps.append(timestamp)
        self.headers.append(headers)
        if headers:
            self._headed += 1
        return len(self.values) - 1

    def read(self, start: int, stop: int) -> tuple[Sequence[MemoryRecord], RawColumns]:
        """Records ``start`` up to ``stop`` (clipped to the end): a lazy view and their columns."""
        stop = min(stop, len(self.values))
        start = min(start, stop)
        headers = self.headers[start:stop] if self._headed else None
        cols = RawColumns(range(start, stop), self.keys[start:stop], self.values[start:stop],
                          self.timestamps[start:stop],
                          headers if headers is not None and any(headers) else None)
        return _Range(self, start, stop), cols

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, i: int) -> MemoryRecord: ...
    @overload
    def __getitem__(self, i: slice) -> list[MemoryRecord]: ...
    def __getitem__(self, i: int | slice) -> MemoryRecord | list[MemoryRecord]:
        return self._get(0, len(self.values), i)

    def _get(self, start: int, n: int, i: int | slice) -> MemoryRecord | list[MemoryRecord]:
        """Item ``i`` (an index or a slice) of the ``n`` records from offset ``start`` on."""
        if isinstance(i, slice):
            return [self._record(start + j) for j in range(*i.indices(n))]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} is not among the {n} from offset {start}")
        return self._record(start + i)

    def __iter__(self) -> Iterator[MemoryRecord]:
        return self._records(0, len(self.values))

    def _record(self, i: int) -> MemoryRecord:
        return MemoryRecord(i, self.keys[i], self.values[i], self.timestamps[i], self.headers[i])

    def _records(self, start: int, stop: int) -> Iterator[MemoryRecord]:
        for i, k, v, t, h in zip(range(start, stop), self.keys[start:stop],
                                 self.values[start:stop], self.timestamps[start:stop],
                                 self.headers[start:stop], strict=True):
            yield MemoryRecord(i, k, v, t, h)


class _Range(Sequence[MemoryRecord]):
    """Records ``start`` up to ``stop`` of a log, each made when asked for."""

    __slots__ = ("_log", "_start", "_stop")

    def __init__(self, log: PartitionLog, start: int, stop: int) -> None:
        self._log, self._start, self._stop = log, start, stop

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, i: int) -> MemoryRecord: ...
    @overload
    def __getitem__(self, i: slice) -> list[MemoryRecord]: ...
    def __getitem__(self, i: int | slice) -> MemoryRecord | list[MemoryRecord]:
        return self._log._get(self._start, self._stop - self._start, i)

    def __iter__(self) -> Iterator[MemoryRecord]:
        return self._log._records(self._start, self._stop)

    def __repr__(self) -> str:
        return f"<records {self._start} to {self._stop - 1}>"
