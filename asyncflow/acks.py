"""Ack tracking: which source positions are safe to commit.

Every record read from a partition starts with one reference per agent that
consumes its topic. Whoever keeps working on the record adds references: a sink
buffering output derived from it (``retain``/``release``), a window holding it
until its result is flushed (``hold``/``unhold``). A partition's committable
position is the offset of the last record such that it and every record before
it have no references left. There is no I/O here, so all of it is testable with
plain lists.

Records are tracked in the batches they were read in: one ``AckBatch`` per
source batch with a list of reference counts, so the per-record cost is an
index and a decrement.

Example:
    >>> acks = PartitionAcks("p0")
    >>> batch = acks.open([10, 11, 12], refs=1)
    >>> batch.release(0); batch.release(2)
    >>> acks.done_position()
    10
    >>> batch.release(1)
    >>> acks.done_position()
    12
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable, Iterable
from typing import Protocol


class Ack(Protocol):
    """Something whose completion a source waits for: an event or a group of them."""

    def retain(self) -> None: ...

    def release(self) -> None: ...


class AckBatch:
    """Reference counts for the records of one source batch.

    Example:
        >>> b = PartitionAcks("p").open([0, 1], refs=2)
        >>> b.release(0); b.release(0); b.pending
        1
    """

    __slots__ = ("offsets", "counts", "pending", "owner", "_cursor")

    def __init__(self, owner: PartitionAcks, offsets: list[int], refs: int) -> None:
        self.owner = owner
        self.offsets = offsets
        self.counts = [refs] * len(offsets)
        self.pending = len(offsets) if refs else 0
        self._cursor = 0

    def retain(self, index: int) -> None:
        """Add a processing reference (a sink buffering output of this record)."""
        counts = self.counts
        c = counts[index]
        if c == 0:  # a record already done is open again (never committed past it twice)
            self.pending += 1
        counts[index] = c + 1
        self.owner.active += 1

    def release(self, index: int) -> None:
        """Drop a processing reference."""
        counts = self.counts
        c = counts[index] - 1
        counts[index] = c
        owner = self.owner
        owner.active -= 1
        if c == 0:
            self.pending -= 1
        if owner.active == 0 and owner._drained is not None:
            owner._drained.set()

    def abandon(self, index: int) -> None:
        """Give up a processing reference without finishing it (partition revoked).

        The record stays not done, so nothing at or after it is committed here.
        """
        owner = self.owner
        owner.active -= 1
        if owner.active == 0 and owner._drained is not None:
            owner._drained.set()

    def hold(self, index: int) -> None:
        """Add a window's reference: the record stays uncommitted but counts as drained."""
        self.counts[index] += 1

    def unhold(self, index: int) -> None:
        """Drop a window's reference."""
        c = self.counts[index] - 1
        self.counts[index] = c
        if c == 0:
            self.pending -= 1

    def done_prefix(self) -> int:
        """How many leading records of this batch are done (no references left)."""
        counts = self.counts
        i = self._cursor
        n = len(counts)
        while i < n and counts[i] == 0:
            i += 1
        self._cursor = i
        return i


class PartitionAcks:
    """The in-flight records of one partition, in offset order.

    ``active`` counts processing references (lanes, sinks), not window holds:
    when it is zero the partition is drained and can be handed to another worker.
    """

    __slots__ = ("partition", "_batches", "_done", "_committed", "active", "_drained")

    def __init__(self, partition: Hashable) -> None:
        self.partition = partition
        self._batches: deque[AckBatch] = deque()
        self._done: int | None = None
        self._committed: int | None = None
        self.active = 0
        self._drained: asyncio.Event | None = None

    def open(self, offsets: list[int], refs: int) -> AckBatch:
        """Track a new batch of records, each starting with ``refs`` processing references."""
        batch = AckBatch(self, offsets, refs)
        if refs and offsets:
            self.active += refs * len(offsets)
            self._batches.append(batch)
        elif offsets:
            self._done = offsets[-1]
        return batch

    def done_position(self) -> int | None:
        """Offset of the last record that, with all before it, is done; ``None`` if none is."""
        batches = self._batches
        while batches:
            head = batches[0]
            if head.pending == 0:
                self._done = head.offsets[-1]
                batches.popleft()
                continue
            k = head.done_prefix()
            if k:
                self._done = head.offsets[k - 1]
            break
        return self._done

    def to_commit(self) -> int | None:
        """The done position if it moved since the last ``mark_committed``."""
        done = self.done_position()
        if done is None or done == self._committed:
            return None
        return done

    def mark_committed(self, position: int) -> None:
        self._committed = position

    @property
    def in_flight(self) -> int:
        """Records read but not done (processing or held by windows)."""
        return sum(b.pending for b in self._batches)

    async def drained(self, timeout: float) -> bool:
        """Wait until no processing reference is left; ``False`` if ``timeout`` passed first."""
        if self.active == 0:
            return True
        self._drained = asyncio.Event()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._drained = None


class AckTracker:
    """Ack bookkeeping for every partition a worker owns.

    Example:
        >>> t = AckTracker()
        >>> b = t.partition("p").open([5], refs=1)
        >>> b.release(0)
        >>> t.positions_to_commit()
        {'p': 5}
    """

    __slots__ = ("_partitions",)

    def __init__(self) -> None:
        self._partitions: dict[Hashable, PartitionAcks] = {}

    def partition(self, partition: Hashable) -> PartitionAcks:
        acks = self._partitions.get(partition)
        if acks is None:
            acks = self._partitions[partition] = PartitionAcks(partition)
        return acks

    def get(self, partition: Hashable) -> PartitionAcks | None:
        return self._partitions.get(partition)

    def forget(self, partitions: Iterable[Hashable]) -> None:
        """Stop tracking partitions that were revoked."""
        for p in partitions:
            self._partitions.pop(p, None)

    def positions_to_commit(self) -> dict[Hashable, int]:
        """Per partition, the done position that has not been committed yet."""
        out: dict[Hashable, int] = {}
        for p, acks in self._partitions.items():
            pos = acks.to_commit()
            if pos is not None:
                out[p] = pos
        return out

    def mark_committed(self, positions: dict[Hashable, int]) -> None:
        for p, pos in positions.items():
            acks = self._partitions.get(p)
            if acks is not None:
                acks.mark_committed(pos)

    @property
    def in_flight(self) -> int:
        return sum(a.in_flight for a in self._partitions.values())


class AckGroup:
    """Many records' window holds, released together when a result is flushed.

    Starts with one reference (the lane processing the result); sinks that buffer
    the result retain it. When the last reference goes, every held record is unheld.

    Example:
        >>> acks = PartitionAcks("p"); b = acks.open([0, 1], refs=1)
        >>> b.hold(0); b.hold(1); b.release(0); b.release(1)
        >>> g = AckGroup([(b, 0), (b, 1)])
        >>> acks.done_position() is None
        True
        >>> g.release(); acks.done_position()
        1
    """

    __slots__ = ("refs", "count")

    def __init__(self, refs: list[tuple[AckBatch, int]]) -> None:
        self.refs = refs
        self.count = 1

    def retain(self) -> None:
        self.count += 1

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            for batch, index in self.refs:
                batch.unhold(index)
            self.refs = []


class _NoAck:
    """The ack of something no source waits for (timers, tests)."""

    __slots__ = ()

    def retain(self) -> None:
        pass

    def release(self) -> None:
        pass


NO_ACK: Ack = _NoAck()
"""An ack that tracks nothing."""
