"""``stream.window(...)``: an agent's stream turned into an async iterator of window results.

The windowed stream pulls the lane's items (events and in-band watermarks)
through one ``WindowOperator`` per source partition and yields results one at
a time. A key's windows follow the watermark of its own partition (its events
all come from there), so a replay after a restart, or another worker taking
the partition over, sees the same event time the first run saw: nothing it
replays is late.

Window state is state like any table's (``asyncflow.state``): at each
checkpoint the keys whose windows changed are exported, encoded, as the table
``name`` (``[lane, key]`` to its open windows, or a tombstone when none are
left); when a partition is assigned its operator is rebuilt from the restored
entries and the restored event-time frontier, so open windows resume with what
they had and a window that already fired is not fired again. Memory grows
with keys times open windows, never with events.

Contract with the stream (``asyncflow.stream.Stream`` provides it):

- ``await stream._next_events(columns=True)`` returns a lane slice (events,
  or a ``LaneSlice`` of columns, and their values after the stream's
  map/filter/key_by) or a ``Watermark``, and raises
  ``StopAsyncIteration`` at the end of a bounded input. A slice is added to
  the windows in one pass. The stream handles checkpoint barriers itself, and
  is asked for more only once this windowed stream has no result left to hand
  out: every result is sent before a checkpoint takes the state that says its
  window fired.
- Late events: ``stream.metrics.incr("late_events")``, then ``late.send(key,
  value)`` when a late sink is given, else ``await stream.dead_letter(event,
  "late event: ...")``. An event without an event time goes to
  ``stream.dead_letter(event, "no event time")``.
- Processing-time windows take an event's arrival time from the wall time of
  the last watermark (the system clock before the first one).
- If an aggregate (or the late sink) raises on an event, the error comes out
  of ``__anext__`` with the event as ``stream.current`` for the agent's error
  policy.

Example:
    >>> import asyncio
    >>> from datetime import timedelta
    >>> from asyncflow.testing import stream_of
    >>> from asyncflow.windows import Count, Tumbling
    >>> stream = stream_of(["a", "b", "c"], keys=["k", "k", "k"], times=[0, 1_000, 6_000])
    >>> async def counts():
    ...     windows = WindowedStream(stream, Tumbling(timedelta(seconds=5)), aggregate=Count())
    ...     return [(w.key, w.start_ms, w.value) async for w in windows]
    >>> asyncio.run(counts())
    [('k', 0, 2), ('k', 5000, 1)]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Hashable, Mapping
from datetime import timedelta
from typing import Any, Literal, Protocol, cast

from asyncflow.clock import SystemClock
from asyncflow.event import Event, Watermark
from asyncflow.keys import lane_of
from asyncflow.metrics import Metrics
from asyncflow.slices import LaneSlice
from asyncflow.state.codec import JSON_VALUES, decode_key, encode_key
from asyncflow.windows.aggregates import Aggregate
from asyncflow.windows.assigners import WindowAssigner, from_epoch_ms
from asyncflow.windows.operator import WindowOperator, WindowResult


class WindowSource(Protocol):
    """What ``WindowedStream`` needs from the stream it windows (``Stream`` has it).

    Example:
        >>> from asyncflow.testing import stream_of
        >>> s: WindowSource = stream_of([])
    """

    current: Event[Any] | None
    """The event being handled (the agent's error policy reads it)."""

    _held: Event[Any] | None
    """An event the agent's error policy takes over."""

    _window_key: Any
    """The key of the window result being handled (a generator agent's output key)."""

    @property
    def _lane(self) -> Any: ...

    @property
    def metrics(self) -> Metrics: ...

    async def _next_events(
        self, *, columns: bool = False
    ) -> tuple[list[Event[Any]] | LaneSlice, list[Any] | None] | Watermark:
        """The next lane slice ``(events, values after map/filter)``, or a watermark.

        With ``columns``, the events may come as a ``LaneSlice`` (one partition's).
        """
        ...

    async def dead_letter(self, event: Event[Any], reason: str) -> None: ...


class LateSink(Protocol):
    """Where late events go when given as ``late=`` (an app topic or sink output fits).

    Example:
        >>> class Printer:
        ...     async def send(self, key, value):
        ...         print("late:", key, value)
        >>> sink: LateSink = Printer()
    """

    async def send(self, key: Any, value: Any) -> None: ...


class WindowedStream:
    """Window results of a stream, as an async iterator (what ``Stream.window`` returns).

    ``aggregate`` is an aggregate or a dict of them; ``wait`` is how far events
    may be out of order (the watermark is the partition's event-time frontier
    minus ``wait``); ``lateness`` keeps fired windows open for late updates;
    ``emit`` is ``"final"`` or ``"updates"``; ``system_wait`` lets a quiet
    source still close its windows (see ``asyncflow.windows.operator``);
    ``late`` receives late events (default: the dead-letter output); ``name``
    is the table the window state is checkpointed as.

    Example:
        >>> import asyncio
        >>> from datetime import timedelta
        >>> from asyncflow.testing import stream_of
        >>> from asyncflow.windows import Mean, Tumbling
        >>> stream = stream_of([20.0, 22.0], keys=["s1", "s1"], times=[1_000, 2_000])
        >>> async def averages():
        ...     windows = stream.window(Tumbling(timedelta(seconds=5)), aggregate=Mean())
        ...     return [(w.key, w.start.isoformat(), w.value) async for w in windows]
        >>> asyncio.run(averages())
        [('s1', '1970-01-01T00:00:00+00:00', 21.0)]
    """

    __slots__ = (
        "_clock",
        "_config",
        "_ended",
        "_late",
        "_lateness",
        "_ops",
        "_ready",
        "_rest",
        "_skip",
        "_stream",
        "_wall",
        "table",
    )

    def __init__(
        self,
        stream: WindowSource,
        assigner: WindowAssigner,
        *,
        aggregate: Aggregate[Any, Any] | Mapping[str, Aggregate[Any, Any]],
        wait: timedelta = timedelta(0),
        lateness: timedelta = timedelta(0),
        emit: Literal["final", "updates"] = "final",
        system_wait: timedelta | None = None,
        late: LateSink | None = None,
        name: str = "window",
    ) -> None:
        self._stream = stream
        self._config: dict[str, Any] = {
            "wait": wait, "lateness": lateness, "emit": emit, "system_wait": system_wait,
        }
        first = WindowOperator(assigner, aggregate, **self._config)  # checks the arguments now
        self._config["aggregate"] = first.aggregate
        self._config["assigner"] = assigner
        self._ops: dict[Hashable, WindowOperator] = {}
        self._ops[_UNOPENED] = first
        self._skip: dict[Hashable, int] = {}
        self._late = late
        self._lateness = lateness
        self._ready: deque[WindowResult] = deque()
        self._rest: tuple[list[Event[Any]], list[Any] | None, int] | None = None
        self._wall: int | None = None
        self._clock = SystemClock()
        self._ended = False
        self.table = name
        state = getattr(stream._lane, "state", None)
        if state is not None:
            state.register_window(self)

    @property
    def operator(self) -> WindowOperator:
        """The window state of the first partition seen (for inspection and tests)."""
        for op in self._ops.values():
            return op
        raise AssertionError("a windowed stream always has an operator")

    def _new_operator(self) -> WindowOperator:
        unopened = self._ops.pop(_UNOPENED, None)
        if unopened is not None:
            return unopened
        c = self._config
        return WindowOperator(
            c["assigner"], c["aggregate"], wait=c["wait"], lateness=c["lateness"],
            emit=c["emit"], system_wait=c["system_wait"],
        )

    async def _open(self, partition: Hashable) -> WindowOperator:
        """The operator of ``partition``, rebuilt from its restored state."""
        op = self._new_operator()
        lane = self._stream._lane
        state = getattr(lane, "state", None)
        # (raises PartitionRevoked for a partition given up: then no operator is left for it)
        shard = None if state is None else await state.window_shard(self.table, partition)
        self._ops[partition] = op
        if shard is None:
            return op
        if shard.frontier is not None:
            op.on_watermark(shard.frontier, self._arrival_wall())
            op.results.clear()
        for kb, vb in shard.lane_items(lane.index, lane.lanes, lane_of):
            _, key = decode_key(kb)
            op.load(key, JSON_VALUES.decode(vb))
        if shard.applied is not None:
            self._skip[partition] = shard.applied
        return op

    # -- state --------------------------------------------------------------------
    def export(self) -> dict[Hashable, list[tuple[bytes, bytes | None]]]:
        """Per partition, the windows changed since the last export, encoded (a checkpoint).

        Example:
            >>> from datetime import timedelta
            >>> from asyncflow.testing import stream_of
            >>> from asyncflow.windows import Count, Tumbling
            >>> ws = stream_of([]).window(Tumbling(timedelta(seconds=5)), aggregate=Count())
            >>> _ = ws.operator.on_event("k", 0, None)
            >>> ws.export()
            {None: [(b'[0,"k"]', b'[[5000,1]]')]}
        """
        lane = self._stream._lane.index
        encode = JSON_VALUES.encode
        out: dict[Hashable, list[tuple[bytes, bytes | None]]] = {}
        for p, op in self._ops.items():
            if not op.dirty:
                continue
            part = None if p is _UNOPENED else p
            out[part] = [
                (encode_key((lane, key)), None if windows is None else encode(windows))
                for key, windows in op.export()
            ]
        return out

    @property
    def dirty(self) -> bool:
        """Whether any window changed since the last export."""
        return any(op.dirty for op in self._ops.values())

    def drop_partitions(self, partitions: Collection[Hashable]) -> None:
        """Forget the windows of revoked ``partitions`` (their state went with the checkpoint).

        Example:
            >>> from datetime import timedelta
            >>> from asyncflow.testing import stream_of
            >>> from asyncflow.windows import Count, Tumbling
            >>> ws = stream_of([]).window(Tumbling(timedelta(seconds=5)), aggregate=Count())
            >>> ws.drop_partitions({"p0"})
        """
        for p in partitions:
            self._ops.pop(p, None)
            self._skip.pop(p, None)

    def close(self) -> None:
        """The loop was left or the lane is finishing (nothing to release any more).

        Example:
            >>> from datetime import timedelta
            >>> from asyncflow.testing import stream_of
            >>> from asyncflow.windows import Count, Tumbling
            >>> stream_of([]).window(Tumbling(timedelta(seconds=1)), aggregate=Count()).close()
        """
        self._ready.clear()

    # -- iterating ----------------------------------------------------------------
    def __aiter__(self) -> WindowedStream:
        return self

    async def __anext__(self) -> WindowResult:
        ready = self._ready
        stream = self._stream
        while not ready:
            rest = self._rest
            if rest is not None:  # what followed an event an aggregate raised on
                self._rest = None
                await self._add(*rest)
                continue
            if self._ended:
                raise StopAsyncIteration
            try:
                got = await stream._next_events(columns=True)
            except StopAsyncIteration:
                # the lane closed: after a final watermark the windows are flushed already; on
                # a stop (SIGTERM, rebalance) open windows stay in state and resume after it
                self._ended = True
                continue
            if type(got) is Watermark:
                await self._on_watermark(got)
                continue
            events, values = cast("tuple[list[Event[Any]] | LaneSlice, list[Any] | None]", got)
            await self._add(events, values, 0)
        result = ready.popleft()
        stream._window_key = result.key
        return result

    async def _add(
        self, events: list[Event[Any]] | LaneSlice, values: list[Any] | None, start: int
    ) -> None:
        """Add a lane slice's events (from ``start``) to their partitions' windows.

        Runs of events the operator takes as they are go through
        ``WindowOperator.on_slice`` in one call; an event it stops at (late,
        without an event time, of another partition, or already in restored
        state) is handled alone. The results go to ``_ready``. If an
        aggregate raises, the event is the stream's current one (for the
        agent's error policy) and the events after it wait in ``_rest``: the
        next ``__anext__`` adds them first. A ``LaneSlice`` goes through
        ``WindowOperator.on_columns`` (no event made per record) up to the
        first event it stops at; from there on, as events.
        """
        event_time = self._config["assigner"].is_event_time
        if isinstance(events, LaneSlice):
            if event_time:
                start = await self._add_columns(events, values, start)
                if start >= len(events):
                    return
            events = events.events()  # the rest one at a time, from the first it stopped at
        await self._add_events(events, values, start)

    async def _add_events(self, events: list[Event[Any]], values: list[Any] | None, start: int) -> None:
        """``_add`` for events in a list: runs through ``on_slice``, the others one at a time."""
        ops = self._ops
        skips = self._skip
        ready = self._ready
        stream = self._stream
        event_time = self._config["assigner"].is_event_time
        n = len(events)
        i = start
        while i < n:
            ev = events[i]
            p = ev.partition
            op = ops.get(p)
            if op is None:
                op = await self._open(p)
            if skips and p in skips:
                if ev.offset <= skips[p]:
                    i += 1
                    continue  # the restored state has this event already
                del skips[p]
            if event_time:
                try:
                    j = op.on_slice(events, values, i)
                except Exception:
                    i = op.failed_at
                    self._failed(events, values, i)
                    raise
                if op.results:
                    ready.extend(op.results)
                    op.results.clear()
                if j == n:
                    return
                i = j
                ev = events[i]
                if ev.partition is not p:
                    continue
            time_ms = ev.time if event_time else self._arrival_wall()
            i += 1
            if time_ms is None:
                await stream.dead_letter(ev, "no event time")
                continue
            value = ev.value if values is None else values[i - 1]
            try:
                added = op.on_event(ev.key, time_ms, value)
            except Exception:
                self._failed(events, values, i - 1)
                raise
            if not added:
                op.late.clear()
                await self._late_event(ev, value, time_ms, op)
            if op.results:
                ready.extend(op.results)
                op.results.clear()

    async def _add_columns(self, cols: LaneSlice, values: list[Any] | None, start: int) -> int:
        """Add a ``LaneSlice`` from ``start`` through ``WindowOperator.on_columns``.

        Returns where the operator stopped (``len(cols)`` when it took them
        all): the event there goes the way of ``_add``'s one-at-a-time path.
        """
        p = cols.partition
        op = self._ops.get(p)
        if op is None:
            op = await self._open(p)
        skips = self._skip
        n = len(cols)
        if skips and p in skips:
            skip = skips[p]
            offsets = cols.offsets
            while start < n and offsets[start] <= skip:
                start += 1  # the restored state has this event already
            if start == n:
                return n
            del skips[p]
        try:
            stopped = op.on_columns(cols.keys, cols.times, cols.values if values is None else values,
                                    start)
        except Exception:
            self._failed(cols.events(), values, op.failed_at)
            raise
        if op.results:
            self._ready.extend(op.results)
            op.results.clear()
        return stopped

    def _failed(self, events: list[Event[Any]], values: list[Any] | None, i: int) -> None:
        """An aggregate raised on ``events[i]``: it goes to the error policy, the rest waits."""
        stream = self._stream
        stream.current = stream._held = events[i]
        if i + 1 < len(events):
            self._rest = (events, values, i + 1)

    async def _on_watermark(self, mark: Watermark) -> None:
        if self._wall is None or mark.wall > self._wall:
            self._wall = mark.wall
        marks = mark.marks
        if marks:
            state = getattr(self._stream._lane, "state", None)
            for p in marks:
                if p not in self._ops and state is not None:
                    ps = state.partition(p)
                    if ps is not None and ps.assigned:
                        await self._open(p)  # restored windows fire without new events too
        ready = self._ready
        for p, op in self._ops.items():
            if mark.final:
                op.flush_all()
            else:
                op.on_watermark(mark.of(p), mark.wall)
            if op.results:
                ready.extend(op.results)
                op.results.clear()

    def _arrival_wall(self) -> int:
        return self._clock.wall_ms() if self._wall is None else self._wall

    async def _late_event(
        self, event: Event[Any], value: Any, time_ms: int, op: WindowOperator
    ) -> None:
        stream = self._stream
        stream.metrics.incr("late_events")
        if self._late is not None:
            stream.current = event
            await self._late.send(event.key, value)
            return
        wm = op.watermark
        await stream.dead_letter(
            event,
            f"late event: every window of event time {from_epoch_ms(time_ms).isoformat()} "
            f"has closed (watermark {from_epoch_ms(wm).isoformat() if wm is not None else None}, "
            f"allowed lateness {self._lateness})",
        )


class _Unopened:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<no partition yet>"


_UNOPENED: Any = _Unopened()
"""The key of the operator built in ``__init__`` before any partition was seen."""
