"""The envelope of one record on its way through the worker.

An ``Event`` carries the decoded value with its key, event time (epoch
milliseconds), headers and source position. What is committed when is not
the event's business: checkpoints decide it (``asyncflow.checkpoint``).

A ``Watermark`` travels through the lane queues in order with the events: per
source partition, the event time that partition has reached (``marks``), and
the wall-clock time it was sent at. Windows of a key follow the watermark of
the partition the key's events come from, so a replay or a takeover sees the
same event time as the first run did.

Example:
    >>> ev = Event("sensor-1", {"t": 20.5}, time=1_700_000_000_000)
    >>> ev.key, ev.time
    ('sensor-1', 1700000000000)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Generic, TypeVar

import msgspec

T = TypeVar("T")


class Event(msgspec.Struct, Generic[T], eq=False):
    """One decoded record: key, value, event time (ms), headers and source position.

    One is made per record read, so it is a C struct (``msgspec.Struct``,
    built in about a third of a Python class's time). Events compare by
    identity. The garbage collector still tracks them (``gc=False`` measured
    faster but let a Kafka worker's memory climb from 160 to 400 MB: events
    held in the lanes are what makes the young generation fill and collect).

    Example:
        >>> Event("k", 1, time=5, partition="p0", offset=3).offset
        3
    """

    key: Any
    value: T
    time: int | None = None
    headers: Sequence[tuple[str, bytes]] = ()
    partition: Hashable = None
    offset: int = -1

    def __repr__(self) -> str:
        return (
            f"Event(key={self.key!r}, value={self.value!r}, time={self.time}, "
            f"partition={self.partition!r}, offset={self.offset})"
        )


class Watermark:
    """In-band progress marker: per partition, the event time reached (``marks``).

    ``time`` is the smallest mark (``None`` while no partition has an event
    time yet): what a window over events of no particular partition uses.
    ``wall`` is the wall-clock time (epoch ms) when the marker was sent, so
    system-time waits work even when a source is quiet. ``final`` marks the end
    of a bounded input: open windows flush.

    Example:
        >>> w = Watermark(10_000, wall=0, marks={"p0": 10_000, "p1": 12_000})
        >>> w.time, w.of("p1"), w.of("p9")
        (10000, 12000, 10000)
    """

    __slots__ = ("final", "marks", "time", "wall")

    def __init__(
        self,
        time: int | None,
        wall: int,
        final: bool = False,
        marks: dict[Hashable, int | None] | None = None,
    ) -> None:
        self.time = time
        self.wall = wall
        self.final = final
        self.marks = marks

    def of(self, partition: Hashable) -> int | None:
        """The event time partition ``partition`` has reached.

        A partition in ``marks`` has its own mark, ``None`` while nothing has
        been read from it: the progress of other partitions, or a frontier the
        worker reached before the partition was assigned to it, says nothing
        about the backlog it may have. A partition without a mark (a source
        that has no partitions) goes by ``time``.

        Example:
            >>> w = Watermark(9_000, wall=0, marks={"p0": 9_000, "new": None})
            >>> w.of("p0"), w.of("new"), Watermark(9_000, wall=0).of(None)
            (9000, None, 9000)
        """
        marks = self.marks
        if marks is None or partition not in marks:
            return self.time
        return marks[partition]

    def __repr__(self) -> str:
        return f"Watermark(time={self.time}, wall={self.wall}, final={self.final}, marks={self.marks})"
