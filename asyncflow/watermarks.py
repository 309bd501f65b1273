"""The event-time frontier across the source partitions a worker reads.

Each partition has its own frontier: the largest event time read from it. The
worker's frontier is the minimum over its active partitions, so no partition's
events are behind it (bounded out-of-orderness aside, which the window
operator subtracts as ``wait``). A partition that has had no event for longer
than ``idle_timeout`` seconds of wall time is idle and left out, so a quiet
partition does not stall every window (Flink's ``withIdleness``); it takes part
again with its next event. When every partition is idle, the frontier is the
minimum over the partitions read from. The frontier never goes backwards:
events of a partition that wakes up behind it may be late.

A partition assigned but not read from yet holds the frontier back (it may have
a backlog) until it is idle; its idle time counts from the first ``current``
call after it was assigned.

Example:
    >>> wm = PartitionWatermarks(idle_timeout=5.0)
    >>> wm.assign("p0"); wm.assign("p1")
    >>> wm.observe("p0", 10_000, wall_ms=0); wm.observe("p1", 7_000, wall_ms=0)
    >>> wm.current(wall_ms=1_000)
    7000
    >>> wm.observe("p0", 20_000, wall_ms=6_000)  # p1 stays quiet...
    >>> wm.current(wall_ms=6_000)  # ...and is idle after 5 s
    20000
"""

from __future__ import annotations

from collections.abc import Hashable


class _Partition:
    __slots__ = ("last_wall", "mark", "max_time")

    def __init__(self) -> None:
        self.max_time: int | None = None
        self.last_wall: int | None = None  # wall time of the last event (or first look)
        self.mark: int | None = None  # the last per-partition mark handed out


class PartitionWatermarks:
    """Per-partition event-time frontiers and their minimum, with idle partitions left out.

    ``idle_timeout`` is in seconds (``None``: a partition never counts as idle).
    ``observe`` for a partition that is not assigned is ignored, so a batch read
    just before a revocation cannot bring the partition back.

    Example:
        >>> wm = PartitionWatermarks(idle_timeout=None)
        >>> wm.current(wall_ms=0) is None
        True
        >>> wm.assign(0); wm.observe(0, 1_500, wall_ms=0); wm.current(wall_ms=0)
        1500
    """

    __slots__ = ("_current", "_idle_ms", "_partitions")

    def __init__(self, idle_timeout: float | None) -> None:
        if idle_timeout is not None and idle_timeout < 0:
            raise ValueError(f"idle_timeout must be >= 0 seconds or None, got {idle_timeout!r}")
        self._idle_ms = None if idle_timeout is None else round(idle_timeout * 1000)
        self._partitions: dict[Hashable, _Partition] = {}
        self._current: int | None = None

    def assign(self, partition: Hashable) -> None:
        """Start tracking a partition (no effect if it is tracked already)."""
        if partition not in self._partitions:
            self._partitions[partition] = _Partition()

    def restore(self, partition: Hashable, frontier: int | None) -> None:
        """Start a partition at the frontier its restored state had reached.

        Example:
            >>> wm = PartitionWatermarks(idle_timeout=None)
            >>> wm.assign("p"); wm.restore("p", 5_000); wm.marks(wall_ms=0)
            {'p': 5000}
        """
        self.assign(partition)
        part = self._partitions[partition]
        if frontier is not None and (part.max_time is None or frontier > part.max_time):
            part.max_time = frontier
            part.mark = frontier

    def frontier(self, partition: Hashable) -> int | None:
        """The largest event time read from ``partition`` (``None``: none yet, or not assigned)."""
        part = self._partitions.get(partition)
        return None if part is None else part.max_time

    def marks(self, wall_ms: int) -> dict[Hashable, int | None]:
        """Per partition, the event time its windows may go by; never smaller than before.

        An active partition's mark is its own frontier: a key's windows follow
        the events of its own partition, so a replay or another worker sees the
        same event time. An idle partition's mark is pushed up to the minimum
        over the active ones (Flink's idleness), so its open windows still close.

        Example:
            >>> wm = PartitionWatermarks(idle_timeout=5.0)
            >>> wm.assign("a"); wm.assign("b")
            >>> wm.observe("a", 9_000, wall_ms=0); wm.observe("b", 4_000, wall_ms=0)
            >>> wm.marks(wall_ms=1_000)
            {'a': 9000, 'b': 4000}
            >>> wm.observe("a", 20_000, wall_ms=7_000)  # b is idle after 5 s
            >>> wm.marks(wall_ms=7_000)
            {'a': 20000, 'b': 20000}
        """
        idle_ms = self._idle_ms
        low: int | None = None
        held_back = False
        idle: list[_Partition] = []
        for part in self._partitions.values():
            if part.last_wall is None:
                part.last_wall = wall_ms
            if idle_ms is not None and wall_ms - part.last_wall > idle_ms:
                idle.append(part)
                continue
            t = part.max_time
            if t is None:
                held_back = True
            elif low is None or t < low:
                low = t
        out: dict[Hashable, int | None] = {}
        for p, part in self._partitions.items():
            mark = part.max_time
            if not held_back and low is not None and part in idle and (mark is None or low > mark):
                mark = low
            prev = part.mark
            if prev is not None and (mark is None or mark < prev):
                mark = prev
            part.mark = mark
            out[p] = mark
        return out

    def revoke(self, partition: Hashable) -> None:
        """Stop tracking a partition; it no longer holds the frontier back."""
        self._partitions.pop(partition, None)

    def observe(self, partition: Hashable, max_time_ms: int | None, wall_ms: int) -> None:
        """Record a batch read at ``wall_ms`` whose largest event time is ``max_time_ms``.

        ``max_time_ms=None`` (events without event time) still counts as activity.
        """
        part = self._partitions.get(partition)
        if part is None:
            return
        if max_time_ms is not None and (part.max_time is None or max_time_ms > part.max_time):
            part.max_time = max_time_ms
        part.last_wall = wall_ms

    def current(self, wall_ms: int) -> int | None:
        """The frontier at wall time ``wall_ms``: the minimum over active partitions.

        ``None`` until some partition has an event time. Never smaller than a
        value returned before.
        """
        idle_ms = self._idle_ms
        low: int | None = None  # over active partitions
        low_read: int | None = None  # over every partition read from
        held_back = False
        for part in self._partitions.values():
            if part.last_wall is None:
                part.last_wall = wall_ms
            t = part.max_time
            if t is not None and (low_read is None or t < low_read):
                low_read = t
            if idle_ms is not None and wall_ms - part.last_wall > idle_ms:
                continue
            if t is None:
                held_back = True  # active but nothing read yet: it may have older events
            elif low is None or t < low:
                low = t
        if held_back:
            return self._current
        if low is None:  # every partition is idle: what has been read is all there is
            low = low_read
        if low is not None and (self._current is None or low > self._current):
            self._current = low
        return self._current

    def peek(self) -> int | None:
        """The watermark as last computed by ``current``, changing nothing (for metrics).

        Example:
            >>> w = PartitionWatermarks(None); w.assign("p"); w.observe("p", 5, 0)
            >>> w.peek(), w.current(0), w.peek()
            (None, 5, 5)
        """
        return self._current

    @property
    def partitions(self) -> list[Hashable]:
        """The partitions tracked."""
        return list(self._partitions)
