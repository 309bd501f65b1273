"""Per-key window state for one lane: pure bookkeeping, no I/O, no asyncio.

The semantics are Flink's ``WindowOperator`` with its ``EventTimeTrigger``:

- **Watermark.** ``on_watermark(frontier, wall)`` gives the event-time frontier
  (the largest event time every source partition has reached); the watermark is
  ``frontier - wait``, as with Flink SQL's ``WATERMARK FOR ts AS ts - INTERVAL
  'wait' SECOND`` (Flink's DataStream ``BoundedOutOfOrderness`` generator
  subtracts one more millisecond; with the SQL convention our results are the
  same as Flink's SQL window results). It never goes backwards.
- **Firing.** A window ``[start, end)`` fires once the watermark reaches its max
  timestamp ``end - 1``, and is purged once the watermark reaches
  ``end - 1 + lateness`` (Flink's ``cleanupTime``); with ``lateness == 0`` both
  happen together. On each watermark step results come out in window-end order.
- **Late data.** An event is added to each of its windows that is not late
  (``end - 1 + lateness > watermark``, Flink's ``isWindowLate``). If such a
  window has already fired, the event re-fires it at once with the updated
  value (Flink's late firing). An event none of whose windows accepts it is a
  late event: it goes to ``late`` and ``on_event`` returns ``False``.
- **Sessions** merge like Flink's ``MergingWindowSet``: the event's window
  ``[t, t + gap)`` merges with every open session of its key that it overlaps
  or touches. A merged window that is already past its max timestamp fires at once.
  (The session engine is in ``asyncflow.windows.sessions``; the records and the
  state every engine shares are in ``asyncflow.windows._base``.)
- **System-time wait.** With ``system_wait``, a source that goes quiet still
  gets its windows out: once the frontier has not moved for ``system_wait`` of
  wall time, the watermark moves on with the wall clock from where it stood
  (``frontier - wait + quiet_time - system_wait``). While events keep coming
  (the frontier advancing within ``system_wait``) results are exactly those of
  event time alone. An event delayed by more than that in wall time may be late.
- **Processing time** (``ProcessingTumbling``/``ProcessingHopping``): an event is
  assigned by the wall time it arrives at (``on_event``'s ``time_ms``, never
  earlier than the last wall time seen) and a window fires, and is purged, once
  the wall clock of ``on_watermark`` reaches its end.

**State.** ``dirty`` collects the keys whose windows changed (an event added,
a window purged); ``export`` returns each such key's open windows (or ``None``
when it has none left) and ``load`` puts them back into a new operator, after
``on_watermark`` with the restored frontier: a window the watermark has passed
is known to have fired and is not fired again. That is how window state is
checkpointed and restored (``asyncflow.windows.windowed``).

The caller drains ``results`` and ``late`` (reads and clears them) after each
call.

Example:
    >>> from datetime import timedelta
    >>> from asyncflow.windows import Tumbling, Count
    >>> op = WindowOperator(Tumbling(timedelta(seconds=5)), Count())
    >>> op.on_event("a", 1_000, "x"), op.on_event("a", 4_000, "y")
    (True, True)
    >>> op.on_watermark(4_998, wall_ms=0); op.results
    []
    >>> op.on_watermark(4_999, wall_ms=0)
    >>> [(r.key, r.start_ms, r.end_ms, r.value) for r in op.results]
    [('a', 0, 5000, 2)]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import timedelta
from heapq import heappop, heappush
from typing import Any, Literal, Self, cast

from asyncflow.windows._base import (
    LateEvent,
    WindowResult,
    _OperatorBase,
    check_assigner,
)
from asyncflow.windows.aggregates import Aggregate
from asyncflow.windows.assigners import MAX_TIME, MIN_TIME, WindowAssigner
from asyncflow.windows.sessions import _SessionEngine

__all__ = ["LateEvent", "WindowOperator", "WindowResult"]


class WindowOperator(_OperatorBase):
    """Window state of one lane and partition: events and watermarks in; results and late events out.

    ``WindowOperator(assigner, ...)`` builds the variant for the assigner
    (aligned, processing-time or session windows). See the module docstring
    for the semantics.

    Example:
        >>> from datetime import timedelta
        >>> from asyncflow.windows import Session, Sum
        >>> op = WindowOperator(Session(timedelta(seconds=2)), Sum())
        >>> for t in (0, 3_000, 1_500):  # 1_500 bridges the first two sessions
        ...     _ = op.on_event("k", t, 1)
        >>> op.flush_all()
        >>> [(r.start_ms, r.end_ms, r.value) for r in op.results]
        [(0, 5000, 3)]
    """

    __slots__ = ()  # the shared ones are _OperatorBase's

    def __new__(cls, assigner: WindowAssigner, *args: Any, **kwargs: Any) -> Self:
        impl: type[WindowOperator] = cls
        if cls is WindowOperator:
            check_assigner(assigner)
            if assigner.is_merging:
                impl = _SessionOperator
            elif not assigner.is_event_time:
                impl = _ProcessingOperator
            elif assigner.step_ms == assigner.size_ms:
                impl = _TumblingOperator
            else:
                impl = _AlignedOperator
        return cast(Self, object.__new__(impl))

    def __init__(
        self,
        assigner: WindowAssigner,
        aggregate: Aggregate[Any, Any] | Mapping[str, Aggregate[Any, Any]],
        *,
        wait: timedelta = timedelta(0),
        lateness: timedelta = timedelta(0),
        emit: Literal["final", "updates"] = "final",
        system_wait: timedelta | None = None,
    ) -> None:
        # The public signature; _OperatorBase checks and stores the arguments.
        super().__init__(
            assigner, aggregate, wait=wait, lateness=lateness, emit=emit, system_wait=system_wait
        )

    @property
    def watermark(self) -> int | None:
        """The current watermark (epoch ms), ``None`` before the first one.

        Example:
            >>> from datetime import timedelta
            >>> from asyncflow.windows import Tumbling, Count
            >>> op = WindowOperator(Tumbling(timedelta(seconds=1)), Count(), wait=timedelta(seconds=2))
            >>> op.on_watermark(10_000, wall_ms=0); op.watermark
            8000
        """
        return None if self._wm == MIN_TIME else self._wm

    @property
    def open_windows(self) -> int:
        """How many (key, window) states are held (fired or not, until purged)."""
        raise NotImplementedError

    def on_event(self, key: Any, time_ms: int, value: Any) -> bool:
        """Add one event to its windows; ``False`` (and an entry in ``late``) if it is late.

        ``time_ms`` is the event time in epoch ms (for processing-time windows:
        the wall time it arrived at). Results may be emitted at once (late
        firing, ``emit="updates"``).

        Example:
            >>> from datetime import timedelta
            >>> from asyncflow.windows import Tumbling, Count
            >>> op = WindowOperator(Tumbling(timedelta(seconds=1)), Count())
            >>> op.on_watermark(5_000, wall_ms=0)
            >>> op.on_event("k", 4_500, None), op.late
            (False, [LateEvent(key='k', time_ms=4500, value=None)])
        """
        raise NotImplementedError

    def on_slice(self, events: Sequence[Any], values: Sequence[Any] | None, start: int) -> int:
        """Add ``events[start:]`` (their ``time``, ``key``, and ``values[i]`` or ``value``).

        Stops before the first event it does not take, and returns its index
        (``len(events)`` when it took them all): one of another partition than
        ``events[start]``, one without an event time, or one that is late
        (``on_event`` handles it one at a time). If the aggregate raises,
        ``failed_at`` is the index of the event it raised on, and nothing of
        that event is stored.

        Example:
            >>> from datetime import timedelta
            >>> from asyncflow.event import Event
            >>> from asyncflow.windows import Tumbling, Count
            >>> op = WindowOperator(Tumbling(timedelta(seconds=5)), Count())
            >>> op.on_watermark(10_000, wall_ms=0)
            >>> op.on_slice([Event("k", 1, 11_000), Event("k", 1, 12_000), Event("k", 1, 1_000)], None, 0)
            2
        """
        n = len(events)
        if start >= n:
            return n
        partition = events[start].partition
        stop = start + 1
        while stop < n and events[stop].partition is partition:
            stop += 1
        run = events[start:stop]  # the run of one partition: its columns go to on_columns
        try:
            took = self.on_columns(
                [ev.key for ev in run],
                [ev.time for ev in run],
                [ev.value for ev in run] if values is None else values[start:stop],
                0,
            )
        except BaseException:
            self.failed_at += start
            raise
        return start + took

    def on_columns(
        self,
        keys: Sequence[Any],
        times: Sequence[int | None],
        values: Sequence[Any],
        start: int,
    ) -> int:
        """``on_slice`` for one partition's events given as columns (``asyncflow.slices``).

        ``keys[i]``, ``times[i]`` and ``values[i]`` are the ``i``-th event's;
        adds them from ``start``, stops before the first without an event time
        or late, and returns its index (``len(values)`` when it took them all).
        If the aggregate raises, ``failed_at`` is the index of the event it
        raised on.

        Example:
            >>> from datetime import timedelta
            >>> from asyncflow.windows import Tumbling, Count
            >>> op = WindowOperator(Tumbling(timedelta(seconds=5)), Count())
            >>> op.on_watermark(10_000, wall_ms=0)
            >>> op.on_columns(["k", "k", "k"], [11_000, 12_000, 1_000], [1, 1, 1], 0)
            2
        """
        n = len(values)
        on_event = self.on_event
        i = start
        try:
            for i in range(start, n):
                t = times[i]
                if t is None:
                    return i
                if not on_event(keys[i], t, values[i]):
                    self.late.pop()  # the caller handles it one at a time
                    return i
        except BaseException:
            self.failed_at = i
            raise
        return n

    def on_watermark(self, time_ms: int | None, wall_ms: int) -> None:
        """Advance to the event-time frontier ``time_ms`` (``None``: not known yet) at ``wall_ms``.

        Fires and purges the windows the new watermark passes, in window-end
        order (examples: the module and class docstrings).
        """
        self._wall = max(self._wall, wall_ms)
        if self.assigner.is_event_time:
            if time_ms is not None and (self._frontier is None or time_ms > self._frontier):
                self._frontier = time_ms
                self._frontier_wall = wall_ms
            if self._frontier is None:
                return
            target = self._frontier - self._wait
            if self._system_wait is not None:
                quiet = self._wall - self._frontier_wall - self._system_wait
                if quiet > 0:
                    target += quiet
        else:
            # A wall-clock window fires once the clock reaches its end.
            target = self._wall - 1
        if target > self._wm:
            self._wm = target
            self._advance(target)

    def flush_all(self) -> None:
        """End of a bounded input: fire and purge every open window (Flink's final watermark).

        Events that arrive afterwards are late (example: the class docstring).
        """
        self._wm = MAX_TIME
        self._advance(MAX_TIME)

    def export(self) -> list[tuple[Any, list[list[Any]] | None]]:
        """Each key changed since the last export, with its open windows (``None``: none left).

        A window is ``[end, accumulator]`` for aligned windows and ``[start,
        end, accumulator]`` for sessions. Clears ``dirty``.

        Example:
            >>> from datetime import timedelta
            >>> from asyncflow.windows import Tumbling, Count
            >>> op = WindowOperator(Tumbling(timedelta(seconds=5)), Count())
            >>> _ = op.on_event("a", 1_000, None)
            >>> op.export()
            [('a', [[5000, 1]])]
            >>> op.on_watermark(4_999, wall_ms=0); op.export()
            [('a', None)]
        """
        raise NotImplementedError

    def load(self, key: Any, windows: list[list[Any]]) -> None:
        """Put a key's windows back (from ``export``), after ``on_watermark`` of the restored frontier.

        Windows the watermark has passed count as fired: they are purged in
        time but not fired again.

        Example:
            >>> from datetime import timedelta
            >>> from asyncflow.windows import Tumbling, Count
            >>> op = WindowOperator(Tumbling(timedelta(seconds=5)), Count())
            >>> op.load("a", [[5000, 2]]); _ = op.on_event("a", 4_000, None)
            >>> op.flush_all(); [(r.key, r.value) for r in op.results]
            [('a', 3)]
        """
        raise NotImplementedError

    def _advance(self, wm: int) -> None:
        raise NotImplementedError


class _AlignedOperator(WindowOperator):
    """Tumbling and hopping windows: state is ``{end: {key: accumulator}}``."""

    __slots__ = ("_fire", "_panes", "_purge", "_shape", "_size")

    def __init__(self, assigner: WindowAssigner, *args: Any, **kwargs: Any) -> None:
        super().__init__(assigner, *args, **kwargs)
        self._size = assigner.size_ms
        self._panes: dict[int, defaultdict[Any, Any]] = {}
        # What on_event needs, loaded in one go (attribute loads dominate the hot path).
        self._shape = (
            assigner.size_ms,
            assigner.step_ms,
            assigner.offset_ms,
            self._lateness,
            self._panes,
            self._add,
            self._updates,
            self.dirty,
            self._create,
        )
        self._fire: list[int] = []  # ends of windows that have not fired
        self._purge: list[int] = []  # ends of windows that fired and wait for purge

    @property
    def open_windows(self) -> int:
        return sum(len(bucket) for bucket in self._panes.values())

    def on_event(self, key: Any, time_ms: int, value: Any) -> bool:
        size, step, offset, lateness, panes, add, updates, dirty, create = self._shape
        wm = self._wm
        start = time_ms - (time_ms - offset) % step  # the latest window's start
        # Windows starting at or before `stop` are late or do not hold the event.
        lowest = time_ms - size
        stop = wm + 1 - size - lateness
        if stop < lowest:  # not max(): a call costs more on this path
            stop = lowest
        if start <= stop:
            return self._not_added(key, time_ms, value, start <= lowest)
        fired = wm + 1  # windows ending at or before this have fired
        dirty.add(key)
        while True:  # once for tumbling windows; from the latest window back for hopping ones
            end = start + size
            bucket = panes.get(end)
            if bucket is None:
                bucket = self._open(end)
            acc = bucket.get(key, _NONE)  # nothing is stored if the aggregate raises
            bucket[key] = acc = add(create() if acc is _NONE else acc, value, time_ms)
            if end <= fired or updates:
                self.results.append(WindowResult(key, start, end, self._result(acc), end <= fired))
            start -= step
            if start <= stop:
                return True

    def _not_added(self, key: Any, time_ms: int, value: Any, between_windows: bool) -> bool:
        # An event between hopping windows (step > size) belongs to none; like Flink, it
        # counts as late only if it is itself late.
        if between_windows and time_ms + self._lateness > self._wm:
            return True
        self.late.append(LateEvent(key, time_ms, value))
        return False

    def _open(self, end: int) -> defaultdict[Any, Any]:
        bucket: defaultdict[Any, Any] = defaultdict(self._create)
        self._panes[end] = bucket
        heappush(self._fire if end - 1 > self._wm else self._purge, end)
        return bucket

    def _advance(self, wm: int) -> None:
        fire, purge, panes = self._fire, self._purge, self._panes
        lateness, size, result, results = self._lateness, self._size, self._result, self.results
        dirty = self.dirty
        while fire and fire[0] - 1 <= wm:
            end = heappop(fire)
            bucket = panes[end]
            start = end - size
            for key, acc in bucket.items():
                results.append(WindowResult(key, start, end, result(acc), True))
            if end - 1 + lateness <= wm:  # fire and purge together
                del panes[end]
                dirty.update(bucket)
            else:
                heappush(purge, end)
        while purge and purge[0] - 1 + lateness <= wm:
            end = heappop(purge)
            dirty.update(panes.pop(end))

    def export(self) -> list[tuple[Any, list[list[Any]] | None]]:
        dirty = self.dirty
        if not dirty:
            return []
        panes = self._panes
        out: list[tuple[Any, list[list[Any]] | None]] = []
        if len(panes) == 1:
            (end, bucket), = panes.items()
            for key in dirty:
                acc = bucket.get(key, _NONE)
                out.append((key, None if acc is _NONE else [[end, acc]]))
        else:
            for key in dirty:
                windows = [[end, bucket[key]] for end, bucket in panes.items() if key in bucket]
                out.append((key, windows or None))
        dirty.clear()
        return out

    def load(self, key: Any, windows: list[list[Any]]) -> None:
        loaded = self.aggregate.loaded
        for end, acc in windows:
            end = int(end)
            bucket = self._panes.get(end)
            if bucket is None:
                bucket = self._open(end)
            bucket[key] = loaded(acc)


_NONE: Any = object()


class _TumblingOperator(_AlignedOperator):
    """Event-time tumbling windows: ``_AlignedOperator.on_event`` for exactly one window.

    The most common case, so it gets the loop body without the loop.
    """

    __slots__ = ()

    def on_event(self, key: Any, time_ms: int, value: Any) -> bool:
        size, _, offset, lateness, panes, add, updates, dirty, create = self._shape
        wm = self._wm
        end = time_ms - (time_ms - offset) % size + size
        if end - 1 + lateness <= wm:
            return self._not_added(key, time_ms, value, False)
        bucket = panes.get(end)
        if bucket is None:
            bucket = self._open(end)
        dirty.add(key)
        acc = bucket.get(key, _NONE)  # nothing is stored if the aggregate raises
        bucket[key] = acc = add(create() if acc is _NONE else acc, value, time_ms)
        if end <= wm + 1 or updates:
            self.results.append(
                WindowResult(key, end - size, end, self._result(acc), end <= wm + 1)
            )
        return True

    def on_columns(
        self,
        keys: Sequence[Any],
        times: Sequence[int | None],
        values: Sequence[Any],
        start: int,
    ) -> int:
        size, _, offset, lateness, panes, add, updates, dirty, create = self._shape
        n = len(values)
        if start >= n:
            return n
        wm = self._wm
        results = self.results
        result = self._result
        late_end = wm + 1 - lateness  # a window ending at or before this is closed
        fired = wm + 1  # a window ending at or before this has fired
        last_end = None
        bucket: Any = None
        i = start
        try:
            for i in range(start, n):
                t = times[i]
                if t is None:
                    return i
                end = t - (t - offset) % size + size
                if end != last_end:  # events in time order mostly share their window
                    if end <= late_end:
                        return i  # late: on_event says so
                    bucket = panes.get(end)
                    if bucket is None:
                        bucket = self._open(end)
                    last_end = end
                key = keys[i]
                acc = bucket.get(key, _NONE)  # nothing is stored if the aggregate raises
                bucket[key] = acc = add(create() if acc is _NONE else acc, values[i], t)
                dirty.add(key)
                if end <= fired or updates:
                    results.append(WindowResult(key, end - size, end, result(acc), end <= fired))
        except BaseException:
            self.failed_at = i
            raise
        return n


class _ProcessingOperator(_AlignedOperator):
    """Aligned windows over arrival wall time."""

    __slots__ = ()

    def on_event(self, key: Any, time_ms: int, value: Any) -> bool:
        # Never assign to a wall time the clock has already left: that window may have fired.
        return super().on_event(key, max(time_ms, self._wall), value)


class _SessionOperator(_SessionEngine, WindowOperator):
    """Session windows: the engine of ``asyncflow.windows.sessions`` as a ``WindowOperator``."""

    __slots__ = ()
