"""Bounded lane queues: batches of events (lists or ``LaneSlice`` columns) and watermarks, in order.

A lane queue is measured in events, not batches; watermarks and checkpoint
barriers travel in it too, in order with the events, and take no room. The dispatcher never blocks
on it: it asks ``has_room`` first, and when a lane is full it pauses the source
partition instead of buffering without bound. When the lane's consumer takes
the queue below its low-water mark, ``on_room`` tells the dispatcher to resume.

Example:
    >>> import asyncio
    >>> async def demo():
    ...     q = LaneQueue(maxsize=10)
    ...     q.put([1, 2, 3])
    ...     q.close()
    ...     return await q.get(), q.size
    >>> asyncio.run(demo())
    ([1, 2, 3], 0)
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from asyncflow.event import Watermark
from asyncflow.slices import LaneSlice


class LaneClosed(Exception):
    """The lane's input ended; raised by ``get`` once the queue is empty."""


class LaneQueue:
    """A single-consumer FIFO of event batches and watermarks, bounded in events.

    ``peak`` records the largest size reached, so tests can check the bound.
    """

    __slots__ = ("_items", "size", "maxsize", "low", "peak", "_getter", "_closed", "on_room",
                 "takes_columns", "reader_lets_go")

    def __init__(self, maxsize: int, on_room: Callable[[LaneQueue], None] | None = None) -> None:
        if maxsize < 1:
            raise ValueError("a lane queue needs room for at least one event")
        self._items: deque[Any] = deque()
        self.size = 0
        self.maxsize = maxsize
        self.low = maxsize // 2
        self.peak = 0
        self._getter: asyncio.Future[None] | None = None
        self._closed = False
        self.on_room = on_room
        self.takes_columns: bool | None = None
        """Whether the lane's consumer works on ``LaneSlice`` columns (``stream.batches()``,
        windows, a per-item loop over ``map``/``filter`` steps), as its stream last said:
        ``False`` once it made events of a slice, and from then on the dispatcher hands
        this lane events. ``None`` until the stream has read (the batches queued before
        the agent starts): the dispatcher hands columns, which every consumer reads."""
        self.reader_lets_go: Callable[[Callable[[Hashable], bool]], list[tuple[Hashable, int]]] \
            | None = None
        """The lane's reader (its ``Stream``): gives up what it took from the queue of the
        partitions a predicate names and has not started, and says their positions."""

    def has_room(self, n: int) -> bool:
        """Whether ``n`` more events fit (an empty queue always takes one batch)."""
        return self.size + n <= self.maxsize or self.size == 0

    def put(self, batch: list[Any] | LaneSlice) -> None:
        """Append a batch of events, or a ``LaneSlice`` (call ``has_room`` first)."""
        self._items.append(batch)
        size = self.size + len(batch)
        self.size = size
        if size > self.peak:
            self.peak = size
        self._wake()

    def put_watermark(self, mark: Watermark) -> None:
        """Append a watermark; a newer one replaces one still waiting at the tail."""
        items = self._items
        if items and type(items[-1]) is Watermark and not items[-1].final:
            items[-1] = mark
        else:
            items.append(mark)
        self._wake()

    def put_barrier(self, barrier: Any) -> None:
        """Append a checkpoint barrier (``asyncflow.checkpoint.Barrier``); it never takes room."""
        self._items.append(barrier)
        self._wake()

    @property
    def closed(self) -> bool:
        """Whether the input ended (``close`` was called)."""
        return self._closed

    def close(self) -> None:
        """No more input: ``get`` raises ``LaneClosed`` once the queue is empty."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    async def get(self) -> Any:
        """The next batch, watermark or barrier, waiting while the queue is empty."""
        items = self._items
        while not items:
            if self._closed:
                raise LaneClosed
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        item = items.popleft()
        if type(item) is list or type(item) is LaneSlice:
            size = self.size - len(item)
            self.size = size
            if size <= self.low and self.on_room is not None:
                self.on_room(self)
        return item

    async def get_within(self, timeout: float) -> Any:
        """Like ``get``, but ``None`` when nothing arrived within ``timeout`` seconds."""
        if not self._items and not self._closed:
            loop = asyncio.get_running_loop()
            self._getter = fut = loop.create_future()
            handle = loop.call_later(timeout, _resolve, fut)
            try:
                await fut
            finally:
                handle.cancel()
                self._getter = None
            if not self._items and not self._closed:
                return None
        return await self.get()

    def drop_partitions(self, gone: Callable[[Hashable], bool]) -> list[tuple[Hashable, int]]:
        """Remove the events of the partitions ``gone`` says (revoked ones) no handler started.

        The queued ones, and what the lane's reader took from the queue and has
        not handed to its agent yet (the rest of a slice it is going through):
        a partition given up is its next owner's, and what this lane would do
        with it after that is done on state it no longer has. Returns their
        ``(partition, offset)`` pairs. A queued slice is one partition's: all of
        it goes or stays, and nothing of it is decoded.
        """
        dropped: list[tuple[Hashable, int]] = []
        items = self._items
        for i, item in enumerate(items):
            if type(item) is LaneSlice:
                if item and gone(item.partition):
                    dropped += positions(item)
                    items[i] = []
            elif type(item) is list:
                keep, out = split_gone(item, gone)
                if out:
                    dropped += out
                    items[i] = keep
        self.size -= len(dropped)  # (what the reader took is counted no more)
        if self.reader_lets_go is not None:
            dropped += self.reader_lets_go(gone)
        return dropped

    def __len__(self) -> int:
        return self.size


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def split_gone(
    events: list[Any], gone: Callable[[Hashable], bool]
) -> tuple[list[Any], list[tuple[Hashable, int]]]:
    """``events`` without those of the partitions ``gone`` names, and those ones' positions.

    Example:
        >>> from asyncflow.event import Event
        >>> kept, dropped = split_gone([Event("k", 1, partition="a", offset=3),
        ...                             Event("k", 2, partition="b", offset=7)], {"b"}.__contains__)
        >>> [e.value for e in kept], dropped
        ([1], [('b', 7)])
    """
    kept: list[Any] = []
    dropped: list[tuple[Hashable, int]] = []
    for e in events:
        if gone(e.partition):
            dropped.append((e.partition, e.offset))
        else:
            kept.append(e)
    return kept, dropped


def positions(part: list[Any] | LaneSlice) -> list[tuple[Hashable, int]]:
    """The ``(partition, offset)`` of each record of a lane's part: events or a slice.

    Example:
        >>> from asyncflow.event import Event
        >>> positions([Event("k", 1, partition="p", offset=3)])
        [('p', 3)]
    """
    if type(part) is LaneSlice:
        return [(part.partition, o) for o in part.offsets]
    return [(e.partition, e.offset) for e in part]
