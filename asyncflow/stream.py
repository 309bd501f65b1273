"""Typed streams: what an agent function iterates over, one lane's worth.

``async for value in stream`` yields decoded values in order; the event behind
the current value (key, event time, headers, position) is ``stream.current``.
An event is done for this lane when the loop moves on to the next one; output
sent while handling it (``await topic.send(...)``) keeps it uncommitted until
the output is flushed. ``map``, ``filter`` and ``key_by`` apply in the lane
without extra tasks; ``batch`` groups values for efficient sinks; ``window``
aggregates over event-time windows.

The loop awaits only when its local batch is empty: the queue carries batches.

Example:
    >>> from asyncflow.testing import stream_of
    >>> async def demo():
    ...     s = stream_of([1, 2, 3, 4]).map(lambda v: v * 10).filter(lambda v: v > 10)
    ...     return [v async for v in s]
    >>> import asyncio; asyncio.run(demo())
    [20, 30, 40]
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextvars import ContextVar
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from asyncflow.acks import NO_ACK, Ack
from asyncflow.event import Event, Watermark
from asyncflow.lanes import LaneClosed, LaneQueue
from asyncflow.metrics import Metrics

if TYPE_CHECKING:
    from asyncflow.windows.windowed import WindowedStream

T = TypeVar("T")
U = TypeVar("U")

DeadLetterFn = Callable[[Event[Any], str], Awaitable[None]]


class LaneContext:
    """What output sent from a lane needs to know: the ack of the item being handled.

    Example:
        >>> LaneContext("agent", 0).current is NO_ACK
        True
    """

    __slots__ = ("agent", "index", "current", "windows")

    def __init__(self, agent: str, index: int) -> None:
        self.agent = agent
        self.index = index
        self.current: Ack = NO_ACK
        self.windows: list[Any] = []


current_lane: ContextVar[LaneContext | None] = ContextVar("asyncflow_lane", default=None)
"""The lane the running task belongs to (set once per lane task)."""


async def _no_dead_letter(event: Event[Any], reason: str) -> None:
    raise RuntimeError(f"no dead-letter output configured; dropped {event!r}: {reason}")


class _EventsAck:
    """The ack of a batch of events handed to user code at once."""

    __slots__ = ("events",)

    def __init__(self, events: list[Event[Any]]) -> None:
        self.events = events

    def retain(self) -> None:
        for e in self.events:
            e.retain()

    def release(self) -> None:
        for e in self.events:
            e.release()


_MAP, _AMAP, _FILTER, _AFILTER, _KEY = range(5)


class Stream(Generic[T]):
    """An async iterator over one lane's values, with the event behind each.

    Example:
        >>> from asyncflow.testing import stream_of
        >>> async def keys():
        ...     s = stream_of(["a", "bb"]).key_by(len)
        ...     return [(s.current.key, v) async for v in s]
        >>> import asyncio; asyncio.run(keys())
        [(1, 'a'), (2, 'bb')]
    """

    def __init__(
        self,
        queue: LaneQueue,
        lane: LaneContext,
        *,
        metrics: Metrics | None = None,
        dead_letter: DeadLetterFn = _no_dead_letter,
    ) -> None:
        self._queue = queue
        self._lane = lane
        self.metrics = metrics or Metrics()
        self._dead_letter = dead_letter
        self._buf: list[Event[Any]] = []
        self._pos = 0
        self._ops: tuple[tuple[int, Callable[[Any], Any]], ...] = ()
        self._sync_ops = True
        self._held: Event[Any] | None = None
        self._batch_events: list[Event[Any]] | None = None
        self._pushed_back: list[Event[Any]] = []
        self._windows: dict[int, WindowedStream] = {}
        self._window_calls = 0
        self.current: Event[Any] | None = None

    # -- building -----------------------------------------------------------------
    def _with(self, kind: int, fn: Callable[[Any], Any]) -> Stream[Any]:
        self._ops = (*self._ops, (kind, fn))
        self._sync_ops = all(k in (_MAP, _FILTER, _KEY) for k, _ in self._ops)
        return self

    def map(self, fn: Callable[[T], U] | Callable[[T], Awaitable[U]]) -> Stream[U]:
        """Transform each value (``fn`` may be async). Key and event time stay.

        Example:
            >>> from asyncflow.testing import stream_of
            >>> import asyncio
            >>> asyncio.run(stream_of([1]).map(str).collect())
            ['1']
        """
        return self._with(_AMAP if inspect.iscoroutinefunction(fn) else _MAP, fn)

    def filter(self, fn: Callable[[T], bool] | Callable[[T], Awaitable[bool]]) -> Stream[T]:
        """Keep the values for which ``fn`` is true; the others are done at once.

        Example:
            >>> from asyncflow.testing import stream_of
            >>> import asyncio
            >>> asyncio.run(stream_of([1, 2, 3]).filter(lambda v: v != 2).collect())
            [1, 3]
        """
        return self._with(_AFILTER if inspect.iscoroutinefunction(fn) else _FILTER, fn)

    def key_by(self, fn: Callable[[T], Hashable]) -> Stream[T]:
        """Re-key each event within the lane (for windows grouped by another field).

        The lane was chosen by the channel's key, so group only by fields that
        the channel's key determines, or give the channel this key.

        Example:
            >>> from asyncflow.testing import stream_of
            >>> import asyncio
            >>> s = stream_of([{"u": "x"}]).key_by(lambda v: v["u"])
            >>> asyncio.run(s.collect()), s.current.key
            ([{'u': 'x'}], 'x')
        """
        return self._with(_KEY, fn)

    def window(
        self,
        assigner: Any,
        *,
        aggregate: Any,
        wait: timedelta = timedelta(0),
        lateness: timedelta = timedelta(0),
        emit: Literal["final", "updates"] = "final",
        system_wait: timedelta | None = None,
        late: Any = None,
    ) -> WindowedStream:
        """Aggregate per key over event-time windows (see ``asyncflow.windows``).

        The operator survives a restart of the agent body after an error: the
        same call site gets the same window state back.

        Example:
            >>> from datetime import timedelta
            >>> import asyncflow as af
            >>> from asyncflow.testing import stream_of
            >>> s = stream_of([1.0, 3.0], times=[0, 1000])
            >>> w = s.window(af.Tumbling(timedelta(seconds=5)), aggregate=af.Mean())
            >>> async def results():
            ...     return [(r.start_ms, r.value) async for r in w]
            >>> import asyncio; asyncio.run(results())
            [(0, 2.0)]
        """
        from asyncflow.windows.windowed import WindowedStream

        slot = self._window_calls
        self._window_calls += 1
        ws = self._windows.get(slot)
        if ws is None:
            ws = WindowedStream(
                self,
                assigner,
                aggregate=aggregate,
                wait=wait,
                lateness=lateness,
                emit=emit,
                system_wait=system_wait,
                late=late,
            )
            self._windows[slot] = ws
            self._lane.windows.append(ws)
        return ws

    def batch(self, size: int, timeout: float) -> AsyncIterator[list[T]]:
        """Group values into lists of up to ``size``, waiting at most ``timeout`` s for more.

        Example:
            >>> from asyncflow.testing import stream_of
            >>> import asyncio
            >>> async def demo():
            ...     return [b async for b in stream_of(range(5)).batch(2, 0.1)]
            >>> asyncio.run(demo())
            [[0, 1], [2, 3], [4]]
        """
        return self._batches(size, timeout)

    async def _batches(self, size: int, timeout: float) -> AsyncIterator[list[T]]:
        import time

        while True:
            events: list[Event[Any]] = []
            values: list[T] = []
            deadline = time.monotonic() + timeout
            ended = False
            failed: tuple[Exception, Event[Any] | None] | None = None
            try:
                while len(values) < size:
                    left = deadline - time.monotonic()
                    item = await self._next_item(left if values else None)
                    if item is None:
                        break
                    if isinstance(item, Watermark):
                        continue
                    events.append(item)
                    values.append(item.value)
            except StopAsyncIteration:
                ended = True
            except Exception as exc:  # map/filter raised on the next event
                if not events:
                    raise
                # the batch so far goes out first; the failing event (held aside) follows
                failed = (exc, self._held)
                self._held = None
            if values:
                self._yield_batch(events)
                try:
                    yield values
                finally:
                    self._release_batch(events)
            if failed is not None:
                error, event = failed
                self._held = event
                self.current = event
                raise error
            if ended:
                return

    def _yield_batch(self, events: list[Event[Any]]) -> None:
        self._batch_events = events
        self.current = events[-1]
        self._lane.current = _EventsAck(events)

    def _release_batch(self, events: list[Event[Any]]) -> None:
        if self._batch_events is not events:
            return  # an agent error took them over (re-delivered or dead-lettered)
        self._batch_events = None
        for e in events:
            e.release()
        self._lane.current = NO_ACK

    def _take_in_flight(self) -> list[Event[Any]]:
        """The events being handled when the agent body raised; the caller now owns their refs."""
        batch = self._batch_events
        if batch is not None:
            self._batch_events = None
            self._lane.current = NO_ACK
            return batch
        held = self._held
        if held is not None:
            self._held = None
            return [held]
        return []

    # -- iterating ----------------------------------------------------------------
    def __aiter__(self) -> Stream[T]:
        return self

    async def __anext__(self) -> T:
        held = self._held
        if held is not None:
            self._held = None
            batch = held._batch
            if batch is not None:
                batch.release(held._index)
        ops = self._ops
        while True:
            buf = self._buf
            pos = self._pos
            if pos < len(buf) and not self._pushed_back:
                ev = buf[pos]
                self._pos = pos + 1
            else:
                item = await self._next_raw()
                if item is None or isinstance(item, Watermark):
                    continue
                ev = item
            value = ev.value
            if ops:
                if not self._sync_ops:
                    out = await self._apply(ev)
                    if out is None:
                        continue
                    ev = out
                    value = ev.value
                else:
                    key = ev.key
                    keep = True
                    try:
                        for kind, fn in ops:
                            if kind == _MAP:
                                value = fn(value)
                            elif kind == _FILTER:
                                if not fn(value):
                                    keep = False
                                    break
                            else:
                                key = fn(value)
                    except Exception:
                        self.current = ev  # the agent's error policy handles this event
                        self._held = ev
                        raise
                    if not keep:
                        ev.release()
                        continue
                    if key is not ev.key:
                        ev = Event(key, value, ev.time, ev.headers, ev.partition, ev.offset,
                                   ev._batch, ev._index)
            self._held = ev
            self.current = ev
            self._lane.current = ev
            result: T = value
            return result

    def events(self) -> AsyncIterator[Event[T]]:
        """Iterate the events themselves (key, value, time, headers, partition, offset).

        Example:
            >>> from asyncflow.testing import stream_of
            >>> import asyncio
            >>> async def demo():
            ...     return [e.value async for e in stream_of(["x"]).events()]
            >>> asyncio.run(demo())
            ['x']
        """
        return self._events()

    async def _events(self) -> AsyncIterator[Event[T]]:
        while True:
            try:
                await self.__anext__()
            except StopAsyncIteration:
                return
            assert self.current is not None
            yield self.current

    async def collect(self) -> list[T]:
        """Read a bounded stream to its end (tests and demos).

        Example:
            >>> from asyncflow.testing import stream_of
            >>> import asyncio
            >>> asyncio.run(stream_of("ab").collect())
            ['a', 'b']
        """
        return [v async for v in self]

    def _restart(self) -> None:
        """Forget map/filter/key_by (the agent body adds them again); keep window state."""
        self._ops = ()
        self._sync_ops = True
        self._window_calls = 0

    def push_back(self, event: Event[Any]) -> None:
        """Deliver ``event`` again as the next item (retry after an error)."""
        if self._held is event:
            self._held = None
        self._pushed_back.append(event)

    async def _next_raw(self, timeout: float | None = None) -> Event[Any] | Watermark | None:
        """The next event as read (no map/filter/key_by) or watermark; see ``_next_item``."""
        while True:
            if self._pushed_back:
                return self._pushed_back.pop()
            buf = self._buf
            pos = self._pos
            if pos < len(buf):
                self._pos = pos + 1
                return buf[pos]
            got: list[Any] | Watermark | None
            try:
                if timeout is None:
                    got = await self._queue.get()
                else:
                    got = await self._queue.get_within(max(timeout, 0.0))
            except LaneClosed:
                raise StopAsyncIteration from None
            if got is None or isinstance(got, Watermark):
                return got
            self._buf = got
            self._pos = 0

    async def _next_item(self, timeout: float | None = None) -> Event[Any] | Watermark | None:
        """The next event (after map/filter/key_by) or watermark, carrying one lane reference.

        Raises ``StopAsyncIteration`` at the end of input; returns ``None`` when
        ``timeout`` passed with nothing new. An event changed by map or key_by is
        a new ``Event`` sharing the original's ack.
        """
        held = self._held
        if held is not None:  # an event whose map/filter raised: done once handled
            self._held = None
            held.release()
        while True:
            item = await self._next_raw(timeout)
            if item is None or isinstance(item, Watermark) or not self._ops:
                return item
            out = await self._apply(item)
            if out is not None:
                return out

    async def _apply(self, ev: Event[Any]) -> Event[Any] | None:
        try:
            return await self._apply_ops(ev)
        except Exception:
            self.current = ev  # the agent's error policy names and dead-letters this event
            self._held = ev
            raise

    async def _apply_ops(self, ev: Event[Any]) -> Event[Any] | None:
        key = ev.key
        value = ev.value
        for kind, fn in self._ops:
            if kind == _MAP:
                value = fn(value)
            elif kind == _FILTER:
                if not fn(value):
                    ev.release()
                    return None
            elif kind == _KEY:
                key = fn(value)
            elif kind == _AMAP:
                value = await fn(value)
            elif not await fn(value):
                ev.release()
                return None
        if key is ev.key and value is ev.value:
            return ev
        return Event(key, value, ev.time, ev.headers, ev.partition, ev.offset, ev._batch, ev._index)

    async def dead_letter(self, event: Event[Any], reason: str) -> None:
        """Send an event to the app's dead-letter output with ``reason``."""
        self.metrics.incr("dead_letters")
        await self._dead_letter(event, reason)

    def close(self) -> None:
        """Release the event still held and the windows' last results (the lane is finishing)."""
        held = self._held
        if held is not None:
            self._held = None
            held.release()
        for ws in self._windows.values():
            ws.close()
        self._lane.current = NO_ACK
