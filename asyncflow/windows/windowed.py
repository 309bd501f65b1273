"""``stream.window(...)``: an agent's stream turned into an async iterator of window results.

The windowed stream pulls the lane's raw items (events and in-band watermarks)
through a ``WindowOperator`` and yields results one at a time.

Contract with the stream (``asyncflow.stream.Stream`` provides it):

- ``await stream._next_item()`` returns an ``Event`` or a ``Watermark`` and
  raises ``StopAsyncIteration`` at the end of a bounded input. Each event carries
  one processing reference for this lane; the windowed stream calls
  ``event.hold()`` once per window the event is added to, then ``event.release()``.
- Before yielding a result it sets ``stream._lane.current`` to the result's ack,
  which sinks retain while they buffer it; on the next ``__anext__`` it releases it.
  A result emitted when its window is purged carries the window's holds
  (``AckGroup``). A result emitted while its window stays open for allowed
  lateness gets an ack of its own: the holds of windows purged later, without a
  new result, are released only once every such earlier result is done, so
  events are committed only after the last result they fed is durable.
- Late events: ``stream.metrics.incr("late_events")``, then ``late.send(key,
  value)`` when a late sink is given (``stream._lane.current`` is the event
  meanwhile, so a sink retaining it keeps it uncommitted until written), else
  ``await stream.dead_letter(event, "late event: ...")``. An event without an
  event time goes to ``stream.dead_letter(event, "no event time")``.
- ``close()`` releases the result being handled (call it when the lane
  finishes or the loop was left); ``drop_partitions(partitions)`` forgets the
  windows of revoked partitions without releasing their holds.
- Processing-time windows take an event's arrival time from the wall time of
  the last watermark (the system clock before the first one).
- If an aggregate (or the late sink) raises on an event, the error comes out of
  ``__anext__`` and the event keeps its lane reference: it is not committed,
  so it is replayed after a restart (at-least-once).

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
from collections.abc import Callable, Collection, Hashable, Mapping
from datetime import timedelta
from typing import Any, Literal, Protocol, cast

from asyncflow.acks import NO_ACK, Ack, AckBatch, AckGroup
from asyncflow.clock import SystemClock
from asyncflow.event import Event, Watermark
from asyncflow.metrics import Metrics
from asyncflow.windows.aggregates import Aggregate
from asyncflow.windows.assigners import WindowAssigner, from_epoch_ms
from asyncflow.windows.operator import WindowOperator, WindowResult

_Handle = tuple[AckBatch, int]
_Handles = list[_Handle]


class _Lane(Protocol):
    current: Ack


class WindowSource(Protocol):
    """What ``WindowedStream`` needs from the stream it windows (``Stream`` has it).

    Example:
        >>> from asyncflow.testing import stream_of
        >>> s: WindowSource = stream_of([])
    """

    current: Event[Any] | None
    """The event being handled (the agent's error policy reads it)."""

    _held: Event[Any] | None
    """An event whose processing reference the agent's error policy takes over."""

    @property
    def _lane(self) -> _Lane: ...

    @property
    def metrics(self) -> Metrics: ...

    async def _next_item(self, timeout: float | None = None) -> Event[Any] | Watermark | None:
        """The next event or watermark; ``None`` only when a ``timeout`` is given and passes."""
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


class _Gate:
    """Holds of windows purged without a result, waiting for the results emitted before them.

    ``pending`` counts: one while the gate is the current one, one per result ack
    issued through it that is not done, and one while the previous gate is not done.
    """

    __slots__ = ("holds", "next", "pending")

    def __init__(self) -> None:
        self.pending = 1
        self.holds: _Handles = []
        self.next: _Gate | None = None

    def done(self) -> None:
        gate: _Gate | None = self
        while gate is not None:
            gate.pending -= 1
            if gate.pending:
                return
            if gate.holds:
                AckGroup(gate.holds).release()
                gate.holds = []
            successor = gate.next
            gate.next = None
            gate = successor


class _ResultAck:
    """The ack of a result whose window stays open: done when every holder released it."""

    __slots__ = ("count", "gate")

    def __init__(self, gate: _Gate) -> None:
        self.count = 1
        self.gate = gate
        gate.pending += 1

    def retain(self) -> None:
        self.count += 1

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.gate.done()


class WindowedStream:
    """Window results of a stream, as an async iterator (what ``Stream.window`` returns).

    ``aggregate`` is an aggregate or a dict of them; ``wait`` is how far events
    may be out of order (the watermark is the event-time frontier minus
    ``wait``); ``lateness`` keeps fired windows open for late updates;
    ``emit`` is ``"final"`` or ``"updates"``; ``system_wait`` lets a quiet
    source still close its windows (see ``asyncflow.windows.operator``);
    ``late`` receives late events (default: the dead-letter output).

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
        "_current",
        "_ended",
        "_gate",
        "_gated",
        "_late",
        "_lateness",
        "_op",
        "_ready",
        "_stream",
        "_wall",
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
    ) -> None:
        self._stream = stream
        self._op = WindowOperator(
            assigner, aggregate, wait=wait, lateness=lateness, emit=emit, system_wait=system_wait
        )
        self._late = late
        self._lateness = lateness
        self._ready: deque[WindowResult] = deque()
        self._current: Ack | None = None
        self._gate = _Gate()
        # Only with allowed lateness can a window be purged after its last result went out.
        self._gated = lateness > timedelta(0)
        self._wall: int | None = None
        self._clock = SystemClock()
        self._ended = False

    @property
    def operator(self) -> WindowOperator:
        """The window state behind this stream (for inspection and tests)."""
        return self._op

    def drop_partitions(self, partitions: Collection[Hashable]) -> None:
        """Forget the windows holding only events of revoked ``partitions``, without emitting.

        Their holds are not released: those events stay uncommitted here, and the
        partitions' next owner replays them. A window that also holds events of
        partitions kept here stays and emits (a possible duplicate, never a loss).

        Example:
            >>> from datetime import timedelta
            >>> from asyncflow.acks import PartitionAcks
            >>> from asyncflow.event import Event
            >>> from asyncflow.testing import stream_of
            >>> from asyncflow.windows import Count, Tumbling
            >>> ws = stream_of([]).window(Tumbling(timedelta(seconds=5)), aggregate=Count())
            >>> event = Event("k", None, time=0, batch=PartitionAcks("p0").open([0], refs=1))
            >>> _ = ws.operator.on_event(event.key, event.time, event.value, event.hold)
            >>> ws.drop_partitions({"p0"}); ws.operator.open_windows
            0
        """
        gone = set(partitions)
        self._op.drop_windows(lambda h: cast(_Handle, h)[0].owner.partition in gone)

    def close(self) -> None:
        """Let go of the result being handled: the loop was left or the lane is finishing.

        Its events commit once the sinks that kept the result have written it.

        Example:
            >>> from datetime import timedelta
            >>> from asyncflow.testing import stream_of
            >>> from asyncflow.windows import Count, Tumbling
            >>> stream_of([]).window(Tumbling(timedelta(seconds=1)), aggregate=Count()).close()
        """
        if self._current is not None:
            self._current.release()
            self._current = None

    def drop_keys(self, predicate: Callable[[Any], bool]) -> None:
        """Forget the windows of the keys ``predicate`` selects, without releasing their holds."""
        self._op.drop_keys(predicate)

    def __aiter__(self) -> WindowedStream:
        return self

    async def __anext__(self) -> WindowResult:
        if self._current is not None:
            self._current.release()
            self._current = None
        ready = self._ready
        op = self._op
        stream = self._stream
        event_time = op.assigner.is_event_time
        while not ready:
            if self._ended:
                raise StopAsyncIteration
            try:
                item = await stream._next_item()
            except StopAsyncIteration:
                # the lane closed: after a final watermark the windows are flushed already;
                # on a stop (SIGTERM, rebalance) open windows keep their holds, uncommitted,
                # and are rebuilt from the replay after a restart
                self._ended = True
                continue
            if item is None:  # only with a timeout, which is not given: defensive
                continue
            if type(item) is Watermark:
                if self._wall is None or item.wall > self._wall:
                    self._wall = item.wall
                if item.final:
                    op.flush_all()
                else:
                    op.on_watermark(item.time, item.wall)
                self._collect()
                continue
            item = cast(Event[Any], item)  # type() is cheaper than isinstance() per event
            time_ms = item.time if event_time else self._arrival_wall()
            if time_ms is None:
                await stream.dead_letter(item, "no event time")
            else:
                try:
                    added = op.on_event(item.key, time_ms, item.value, item.hold)
                except Exception:
                    # an aggregate raised: the agent's error policy takes this event over
                    stream.current = item
                    stream._held = item
                    raise
                if not added:
                    op.late.clear()
                    await self._late_event(item, time_ms)
            item.release()
            if op.results:
                self._collect()
        result = ready.popleft()
        ack: Ack
        if result.holds is not None:
            ack = AckGroup(cast(_Handles, result.holds)) if result.holds else NO_ACK
        elif self._gated:
            ack = _ResultAck(self._gate)
        else:
            ack = NO_ACK
        self._current = ack
        stream._lane.current = ack
        return result

    def _arrival_wall(self) -> int:
        return self._clock.wall_ms() if self._wall is None else self._wall

    def _collect(self) -> None:
        op = self._op
        self._ready.extend(op.results)
        op.results.clear()
        if op.released:
            gate = self._gate
            for purged in op.released:
                gate.holds.extend(cast(_Handles, purged.holds))
            op.released.clear()
            # Later purges wait for this gate, which waits for the results issued through it.
            successor = self._gate = _Gate()
            successor.pending += 1
            gate.next = successor
            gate.done()

    async def _late_event(self, event: Event[Any], time_ms: int) -> None:
        stream = self._stream
        stream.metrics.incr("late_events")
        if self._late is not None:
            stream._lane.current = event
            await self._late.send(event.key, event.value)
            return
        wm = self._op.watermark
        await stream.dead_letter(
            event,
            f"late event: every window of event time {from_epoch_ms(time_ms).isoformat()} "
            f"has closed (watermark {from_epoch_ms(wm).isoformat() if wm is not None else None}, "
            f"allowed lateness {self._lateness})",
        )
