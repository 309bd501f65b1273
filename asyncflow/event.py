"""The envelope of one record on its way through the worker.

An ``Event`` carries the decoded value with its key, event time (epoch
milliseconds), headers and source position, and the reference that tells the
ack tracker when its processing is done.

A ``Watermark`` travels through the lane queues in order with the events: it
says that event time has reached ``time`` (every source partition has seen
events up to it), and carries the wall-clock time it was sent at.

Example:
    >>> ev = Event("sensor-1", {"t": 20.5}, time=1_700_000_000_000)
    >>> ev.key, ev.time
    ('sensor-1', 1700000000000)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Generic, TypeVar

from asyncflow.acks import AckBatch

T = TypeVar("T")


class Event(Generic[T]):
    """One decoded record: key, value, event time (ms), headers and position.

    ``retain``/``release`` and ``hold``/``unhold`` adjust the record's ack
    references (see ``asyncflow.acks``); an event built by hand tracks nothing.

    Example:
        >>> Event("k", 1).release()  # untracked: a no-op
    """

    __slots__ = ("key", "value", "time", "headers", "partition", "offset", "_batch", "_index")

    def __init__(
        self,
        key: Any,
        value: T,
        time: int | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: Hashable = None,
        offset: int = -1,
        batch: AckBatch | None = None,
        index: int = 0,
    ) -> None:
        self.key = key
        self.value = value
        self.time = time
        self.headers = headers
        self.partition = partition
        self.offset = offset
        self._batch = batch
        self._index = index

    def retain(self) -> None:
        """Add a processing reference (the event is not done until it is released)."""
        if self._batch is not None:
            self._batch.retain(self._index)

    def release(self) -> None:
        """Drop a processing reference."""
        if self._batch is not None:
            self._batch.release(self._index)

    def abandon(self) -> None:
        """Drop a processing reference without finishing: the event stays uncommitted."""
        if self._batch is not None:
            self._batch.abandon(self._index)

    def hold(self) -> tuple[AckBatch, int] | None:
        """Keep the event uncommitted while a window holds it; returns the handle to unhold."""
        if self._batch is None:
            return None
        self._batch.hold(self._index)
        return (self._batch, self._index)

    def __repr__(self) -> str:
        return (
            f"Event(key={self.key!r}, value={self.value!r}, time={self.time}, "
            f"partition={self.partition!r}, offset={self.offset})"
        )


class Watermark:
    """In-band progress marker: every event with ``time`` below this has been read.

    ``time`` is ``None`` while no partition has produced an event time yet.
    ``wall`` is the wall-clock time (epoch ms) when the marker was sent, so
    system-time waits work even when a source is quiet. ``final`` marks the end
    of a bounded input: open windows flush.

    Example:
        >>> Watermark(10_000, wall=0).time
        10000
    """

    __slots__ = ("time", "wall", "final")

    def __init__(self, time: int | None, wall: int, final: bool = False) -> None:
        self.time = time
        self.wall = wall
        self.final = final

    def __repr__(self) -> str:
        return f"Watermark(time={self.time}, wall={self.wall}, final={self.final})"
