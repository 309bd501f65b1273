"""``stream.map_async(fn, ...)``: many lookups in flight per lane, results in order, bounded.

An enrichment call (an HTTP service, a database) takes tens of
milliseconds; awaiting one at a time caps a lane at a few dozen events per
second. ``map_async`` starts a lookup for each event as soon as it is taken,
up to ``capacity`` events per lane (and, with a shared ``InFlight`` limit, up
to a bound over every lane that uses it), and hands the results out:

- ``order="key"`` (the default): per key in the order the events came;
  different keys do not wait for each other;
- ``order="stream"``: in the order the events came;
- ``order="none"``: as they complete.

In every order a watermark keeps its place: the results of every event
before it come out before it, so windows after ``map_async`` see no event
late that was on time. ``capacity`` counts every event taken and not yet
handed out (in flight, retried, or done and waiting for its turn), so memory
is bounded (``capacity`` plus at most one lane slice taken and not started): a
full window takes no more events, the lane queue fills, and the source
partition pauses.

The result replaces the value, or ``combine(value, result)`` does (to keep
fields of the input beside what was looked up; a cache then keeps the lookup's
own result, so its key can be the looked-up field alone). Each call is timed
out after ``timeout``; failures of the types in
``retry_on`` (time-outs and ``OSError`` by default) are retried as
``retry`` says, with exponential backoff and full jitter. ``cache`` keeps
results (bounded, with a time to live) and lookups of the same cache key in
flight at once share one call. A lookup that still fails gets ``fallback(value,
error)`` as its result when given; else the event goes to the dead-letter
output with the reason (``on_failure="dead_letter"``), or the error is raised
in the agent body with the event as ``stream.current``, for the agent's error
policy (``on_failure="raise"``).

Checkpoints: a checkpoint barrier reaching the lane stops the taking of new
events; every event taken before it is looked up and handed out first, and
only then does the lane arrive at the barrier. So no checkpoint ever covers
an event whose lookup is in flight, and a checkpoint waits for the slowest
lookup taken before it: give lookups a ``timeout`` (a checkpoint gives up
after the app's checkpoint timeout, and what it would have covered is
replayed). A stop lets the lane hand out what it took, within the app's
``shutdown_timeout``; a lane cancelled then cancels its lookups in flight,
no checkpoint covers them, and their events are replayed from the last
commit.
The same call site gets the same operator back when the agent body restarts
after an error, with what it holds.

Example:
    >>> import asyncio
    >>> from asyncflow.testing import stream_of
    >>> async def double(v):
    ...     await asyncio.sleep(0.01 * (3 - v))  # the first answers last
    ...     return v * 2
    >>> async def demo():
    ...     s = stream_of([1, 2, 3], keys=["a", "b", "a"])
    ...     return [v async for v in s.map_async(double, capacity=10)]
    >>> asyncio.run(demo())
    [4, 2, 6]
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from asyncflow.event import Event, Watermark

if TYPE_CHECKING:
    from asyncflow.agent import Retry
    from asyncflow.metrics import Metrics
    from asyncflow.stream import Stream
    from asyncflow.windows.windowed import WindowedStream

T = TypeVar("T")
U = TypeVar("U")

Order = Literal["key", "stream", "none"]
ORDERS: tuple[Order, ...] = ("key", "stream", "none")


class InFlight:
    """A bound on lookups in flight shared by every lane (and agent) that is given it.

    Make one next to the app and pass it as ``map_async(..., limit=...)``:
    each lane keeps its own ``capacity`` too.

    Example:
        >>> service = InFlight(200)
        >>> service.available
        200
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            from asyncflow.errors import ConfigError

            raise ConfigError(f"InFlight({size}): the bound must be at least 1")
        self.size = size
        self.available = size
        self._freed: asyncio.Event | None = None

    def try_acquire(self) -> bool:
        """Take one place if there is one (never waits)."""
        if self.available > 0:
            self.available -= 1
            return True
        if self._freed is not None:
            self._freed.clear()
        return False

    def release(self) -> None:
        """Give a place back."""
        self.available += 1
        if self._freed is not None:
            self._freed.set()

    def freed(self) -> asyncio.Event:
        """Set whenever a place was given back since the last failed ``try_acquire``."""
        if self._freed is None:
            self._freed = asyncio.Event()
        return self._freed


@dataclass(slots=True)
class Cache:
    """Results of ``map_async`` kept for ``ttl``, at most ``size`` of them (least recently used go).

    ``key(value)`` is what identifies a lookup (default: the value itself,
    which must then be hashable). One ``Cache`` is one store: every lane (and
    agent) given the same object shares its entries and its calls in flight.

    Example:
        >>> from datetime import timedelta
        >>> Cache(size=10_000, ttl=timedelta(minutes=5)).size
        10000
    """

    size: int = 10_000
    ttl: timedelta | None = timedelta(minutes=10)
    key: Callable[[Any], Hashable] | None = None
    _store: _ResultCache | None = field(default=None, init=False, repr=False, compare=False)

    def store(self) -> _ResultCache:
        """The entries (made at first use)."""
        if self._store is None:
            self._store = _ResultCache(self)
        return self._store


class _ResultCache:
    """The LRU store behind ``Cache`` (monotonic clock)."""

    __slots__ = ("size", "ttl", "key", "_items", "calls")

    def __init__(self, spec: Cache) -> None:
        if spec.size < 1:
            from asyncflow.errors import ConfigError

            raise ConfigError(f"Cache(size={spec.size}): the size must be at least 1")
        self.size = spec.size
        self.ttl = spec.ttl.total_seconds() if spec.ttl is not None else None
        self.key = spec.key
        self._items: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self.calls: dict[Hashable, asyncio.Future[Any]] = {}
        """Cache key -> the call in flight for it (lookups of the same key share it)."""

    def get(self, key: Hashable) -> tuple[bool, Any]:
        found = self._items.get(key)
        if found is None:
            return False, None
        at, value = found
        if self.ttl is not None and time.monotonic() - at > self.ttl:
            del self._items[key]
            return False, None
        self._items.move_to_end(key)
        return True, value

    def put(self, key: Hashable, value: Any) -> None:
        items = self._items
        items[key] = (time.monotonic(), value)
        items.move_to_end(key)
        while len(items) > self.size:
            items.popitem(last=False)


class _Entry:
    """One event taken by the operator: its lookup, then its result or error."""

    __slots__ = ("event", "key", "done", "result", "error", "task", "holds_limit")

    def __init__(self, event: Event[Any]) -> None:
        self.holds_limit = False
        self.event = event
        self.key = event.key
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None


_Item = _Entry | Watermark


class AsyncMapped(Generic[U]):
    """The results of ``stream.map_async(...)``: iterate them, window them, or take them in batches.

    ``stream.current`` is the event whose result is being handled (its value
    is the result). Made by ``Stream.map_async``; see the module docstring.

    Example:
        >>> import asyncio
        >>> from asyncflow.testing import stream_of
        >>> async def square(v):
        ...     return v * v
        >>> async def demo():
        ...     mapped = stream_of([1, 2, 3]).map_async(square)
        ...     return isinstance(mapped, AsyncMapped), [b async for b in mapped.batches()]
        >>> asyncio.run(demo())
        (True, [[1, 4, 9]])
    """

    def __init__(
        self,
        stream: Stream[Any],
        fn: Callable[[Any], Awaitable[U]],
        *,
        capacity: int,
        limit: InFlight | None,
        order: Order,
        timeout: float | None,
        retry: Retry | None,
        retry_on: tuple[type[BaseException], ...],
        cache: Cache | None,
        fallback: Callable[[Any, BaseException], U] | None,
        on_failure: Literal["dead_letter", "raise"],
        combine: Callable[[Any, Any], U] | None = None,
    ) -> None:
        from asyncflow.errors import ConfigError

        if capacity < 1:
            raise ConfigError(f"map_async(capacity={capacity}): must be at least 1")
        if order not in ORDERS:
            raise ConfigError(f"map_async(order={order!r}): use one of {', '.join(ORDERS)}")
        if on_failure not in ("dead_letter", "raise"):
            raise ConfigError(f"map_async(on_failure={on_failure!r}): use 'dead_letter' or 'raise'")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"map_async(timeout={timeout!r}): must be above 0 (or None)")
        self._stream = stream
        self._fn = fn
        self.capacity = capacity
        self.limit = limit
        self.order: Order = order
        self.timeout = timeout
        self.retry = retry
        self.retry_on = retry_on
        self.fallback = fallback
        self.on_failure = on_failure
        self._cache = cache.store() if cache is not None else None
        self.combine = combine
        self._todo: deque[Event[Any] | Watermark] = deque()  # taken, lookup not started
        self._items: deque[_Item] = deque()  # started, in arrival order, watermarks in place
        self._taken = 0  # events in _todo and _items (what capacity bounds)
        self._changed = asyncio.Event()
        self._input: asyncio.Future[Any] | None = None
        self._at_barrier = False
        self._ended = False
        self._raise: tuple[BaseException, Event[Any]] | None = None
        self._out: list[Event[Any]] = []
        self._out_pos = 0

    # -- what the agent body and windows see --------------------------------------
    @property
    def metrics(self) -> Metrics:
        return self._stream.metrics

    @property
    def current(self) -> Event[Any] | None:
        return self._stream.current

    @current.setter
    def current(self, event: Event[Any] | None) -> None:
        self._stream.current = event

    @property
    def _held(self) -> Event[Any] | None:
        return self._stream._held

    @_held.setter
    def _held(self, event: Event[Any] | None) -> None:
        self._stream._held = event

    @property
    def _window_key(self) -> Any:
        return self._stream._window_key

    @_window_key.setter
    def _window_key(self, key: Any) -> None:
        self._stream._window_key = key

    @property
    def _lane(self) -> Any:
        return self._stream._lane

    @property
    def in_flight(self) -> int:
        """Events taken and not yet handed out (what ``capacity`` bounds)."""
        return self._taken

    async def dead_letter(self, event: Event[Any], reason: str) -> None:
        """Send ``event`` to the dead letters with ``reason`` (as ``Stream.dead_letter``)."""
        await self._stream.dead_letter(event, reason)

    def __aiter__(self) -> AsyncIterator[U]:
        return self

    async def __anext__(self) -> U:
        stream = self._stream
        stream._held = None
        while self._out_pos >= len(self._out):
            got = await self._next_events()
            if type(got) is Watermark:
                continue
            assert isinstance(got, tuple)
            self._out, self._out_pos = got[0], 0
        ev = self._out[self._out_pos]
        self._out_pos += 1
        stream._window_key = _no_key()
        stream._held = stream.current = ev
        result: U = ev.value
        return result

    def window(self, assigner: Any, **options: Any) -> WindowedStream:
        """Aggregate the results over event-time windows (as ``Stream.window``; same options).

        Example:
            >>> import asyncio
            >>> from datetime import timedelta
            >>> import asyncflow as af
            >>> from asyncflow.testing import stream_of
            >>> async def price(v):
            ...     return v * 10
            >>> async def demo():
            ...     s = stream_of([1, 2, 3], keys="kkk", times=[0, 1000, 6000])
            ...     w = s.map_async(price).window(af.Tumbling(timedelta(seconds=5)), aggregate=af.Sum())
            ...     return [(r.start_ms, r.value) async for r in w]
            >>> asyncio.run(demo())
            [(0, 30), (5000, 30)]
        """
        return self._stream._windowed(self, assigner, **options)

    def batches(self) -> AsyncIterator[list[U]]:
        """The results as lists: whatever is ready at once, in the order rule's order.

        Example:
            >>> import asyncio
            >>> from asyncflow.testing import stream_of
            >>> async def inc(v):
            ...     return v + 1
            >>> async def demo():
            ...     return [b async for b in stream_of([1, 2]).map_async(inc).batches()]
            >>> asyncio.run(demo())
            [[2, 3]]
        """
        return self._batches()

    async def _batches(self) -> AsyncIterator[list[U]]:
        stream = self._stream
        while True:
            stream._held = None
            try:
                got = await self._next_events()
            except StopAsyncIteration:
                return
            if type(got) is Watermark:
                continue
            assert isinstance(got, tuple)
            events = got[0]
            stream._batch_events = events
            stream.current = events[-1]
            yield [e.value for e in events]
            stream._batch_events = None

    # -- the operator ---------------------------------------------------------------
    async def _next_events(
        self, *, columns: bool = False
    ) -> tuple[list[Event[Any]], list[Any]] | Watermark:
        """The next results ready by the order rule, or the next watermark in its place.

        (Results are events: ``columns`` asks for nothing else here.)

        Raises ``StopAsyncIteration`` once the input ended and everything is
        handed out; with ``on_failure="raise"``, a failed lookup's error with
        its event as ``current``. Input is taken only here, while the agent
        body waits for this call (a step before ``map_async`` sets
        ``stream.current``); between calls a task only waits for the lane's
        next batch.
        """
        failed = self._raise
        stream = self._stream
        if failed is not None:
            self._raise = None
            error, event = failed
            stream._held = stream.current = event
            raise error
        while True:
            self._changed.clear()  # a lookup that completes from here on wakes the wait below
            ready = await self._take_ready()
            if ready is not None:
                return ready
            self._start()
            waiting = self._input
            if waiting is not None and waiting.done():
                self._input = None
                self._waited(waiting.result())
                continue
            drained = not self._items and not self._todo
            if self._ended and drained:
                raise StopAsyncIteration
            if self._at_barrier and drained:
                # everything taken before the barrier is handed out: the lane arrives now
                self._at_barrier = False
                await stream._arrive_at_barrier()
                continue
            wants_input = (not self._ended and not self._at_barrier and not self._todo
                           and self._taken < self.capacity)
            if wants_input and waiting is None:
                got = await stream._next_events(stop_at_barrier=True, wait=False)
                if got is not None:
                    self._took(got)
                    continue
                waiting = self._input = asyncio.ensure_future(self._wait_input())
            waits: list[Any] = [asyncio.ensure_future(self._changed.wait())]
            if wants_input and waiting is not None:
                waits.append(waiting)
            if self.limit is not None and self._todo:
                waits.append(asyncio.ensure_future(self.limit.freed().wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    if w is not waiting:
                        w.cancel()

    async def _wait_input(self) -> Any:
        """Wait for the lane's next batch (left in the stream's buffer), watermark or barrier."""
        try:
            return await self._stream._refill(stop_at_barrier=True)
        except StopAsyncIteration:
            return _END

    def _waited(self, got: Any) -> None:
        from asyncflow.stream import _BARRIER, _FILLED

        if got is _FILLED:
            return  # taken, through the stream's steps, at the next turn
        if got is _END:
            self._ended = True
        elif got is _BARRIER:
            self._at_barrier = True
        elif type(got) is Watermark:
            self._took(got)

    def _took(self, got: Any) -> None:
        """What the stream gave: a slice to look up, a watermark, or a barrier."""
        from asyncflow.stream import _BARRIER

        if got is _BARRIER:
            self._at_barrier = True
        elif type(got) is Watermark:
            # a watermark waits behind the events before it that are not started yet
            (self._todo if self._todo else self._items).append(got)
        else:
            events, values = got
            if values is not None:
                events = [
                    e if e.value is v else Event(e.key, v, e.time, e.headers, e.partition, e.offset)
                    for e, v in zip(events, values, strict=True)
                ]
            self._todo.extend(events)
            self._taken += len(events)

    def _start(self) -> None:
        """Start lookups for waiting events while there is room (the lane's and the limit's)."""
        todo, items, limit = self._todo, self._items, self.limit
        running = sum(1 for it in items if type(it) is _Entry)  # done ones wait for their turn
        while todo:
            head = todo[0]
            if type(head) is Watermark:
                items.append(head)
                todo.popleft()
                continue
            if running >= self.capacity:
                return
            if limit is not None and not limit.try_acquire():
                return
            todo.popleft()
            entry = _Entry(head)  # type: ignore[arg-type]  # not a watermark: checked above
            entry.holds_limit = limit is not None
            items.append(entry)
            running += 1
            entry.task = asyncio.ensure_future(self._lookup(entry))

    async def _lookup(self, entry: _Entry) -> None:
        metrics = self.metrics
        try:
            value = entry.event.value
            result = await self._result_of(value)
            entry.result = result if self.combine is None else self.combine(value, result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the failure policy decides
            metrics.incr("lookup_failures")
            if self.fallback is not None:
                try:
                    entry.result = self.fallback(entry.event.value, exc)
                except Exception as fallback_error:  # noqa: BLE001 - raised in the body
                    entry.error = fallback_error
            else:
                entry.error = exc
        finally:
            self._release(entry)
        entry.done = True
        self._changed.set()

    async def _result_of(self, value: Any) -> Any:
        cache = self._cache
        if cache is None:
            return await self._call(value)
        key = cache.key(value) if cache.key is not None else value
        hit, result = cache.get(key)
        if hit:
            self.metrics.incr("lookup_cache_hits")
            return result
        calls = cache.calls
        running = calls.get(key)
        if running is not None and running.get_loop() is not asyncio.get_running_loop():
            running = None  # left by a run on another event loop
        if running is not None:  # the same lookup is in flight: share its answer
            self.metrics.incr("lookup_cache_hits")
            return await asyncio.shield(running)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        calls[key] = future
        try:
            result = await self._call(value)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                future.set_exception(exc)
                future.exception()  # retrieved: sharers get it, nobody else must
            else:
                future.cancel()
            raise
        finally:
            if calls.get(key) is future:
                del calls[key]
        future.set_result(result)
        cache.put(key, result)
        return result

    async def _call(self, value: Any) -> Any:
        retry, timeout, metrics = self.retry, self.timeout, self.metrics
        attempt = 0
        while True:
            metrics.incr("lookups")
            try:
                if timeout is None:
                    return await self._fn(value)
                async with asyncio.timeout(timeout):
                    return await self._fn(value)
            except self.retry_on as exc:
                if isinstance(exc, TimeoutError):
                    metrics.incr("lookup_timeouts")
                attempt += 1
                if retry is None or attempt > retry.times:
                    if isinstance(exc, TimeoutError) and timeout is not None and not str(exc):
                        raise TimeoutError(f"no answer within {timeout:g}s "
                                           f"({attempt} attempt{'s' if attempt > 1 else ''})") from None
                    raise
                metrics.incr("lookup_retries")
                await asyncio.sleep(random.uniform(0, retry.delay(attempt)))

    async def _take_ready(self) -> tuple[list[Event[Any]], list[Any]] | Watermark | None:
        """Results the order rule lets out now, or the watermark at the head; ``None`` if neither.

        Failed lookups go to the dead letters here, in their turn; with
        ``on_failure="raise"`` the slice stops before one, which the next
        call raises.
        """
        items = self._items
        if not items:
            return None
        head = items[0]
        if type(head) is Watermark:
            items.popleft()
            return head
        ready: list[_Entry] = []
        if self.order == "stream":
            while items and type(items[0]) is _Entry and items[0].done:  # type: ignore[union-attr]
                ready.append(items.popleft())  # type: ignore[arg-type]
        else:
            kept: deque[_Item] = deque()
            blocked: set[Any] = set()
            by_key = self.order == "key"
            while items:
                it = items[0]
                if type(it) is Watermark:
                    break  # nothing passes a watermark
                items.popleft()
                assert isinstance(it, _Entry)
                if it.done and not (by_key and _blocked(it.key, blocked)):
                    ready.append(it)
                else:
                    kept.append(it)
                    if by_key:
                        _block(it.key, blocked)
            kept.extend(items)
            self._items = kept
        if not ready:
            return None
        self._taken -= len(ready)
        events: list[Event[Any]] = []
        values: list[Any] = []
        for i, entry in enumerate(ready):
            ev = entry.event
            error = entry.error
            if error is None:
                result = entry.result
                events.append(ev if ev.value is result else
                              Event(ev.key, result, ev.time, ev.headers, ev.partition, ev.offset))
                values.append(result)
            elif self.on_failure == "raise":
                # the rest go back to the head, in their order, for the next calls
                for later in reversed(ready[i + 1:]):
                    self._items.appendleft(later)
                self._taken += len(ready) - i - 1
                if events:
                    self._raise = (error, ev)
                    break
                self._stream._held = self._stream.current = ev
                raise error
            else:
                await self._stream.dead_letter(ev, f"lookup failed: {_describe(error)}")
        if not events:
            return await self._take_ready()
        return events, values

    def _release(self, entry: _Entry) -> None:
        if entry.holds_limit and self.limit is not None:
            entry.holds_limit = False
            self.limit.release()

    def cancel(self) -> None:
        """Cancel the lookups in flight (the lane is finishing); their events are replayed."""
        for it in self._items:
            if type(it) is _Entry and it.task is not None and not it.done:
                it.task.cancel()
                self._release(it)  # a task cancelled before it ran never gets to its finally
        if self._input is not None:
            self._input.cancel()
            self._input = None


def _blocked(key: Any, blocked: set[Any]) -> bool:
    try:
        return key in blocked
    except TypeError:  # unhashable keys keep their order among themselves
        return _UNHASHABLE in blocked


def _block(key: Any, blocked: set[Any]) -> None:
    try:
        blocked.add(key)
    except TypeError:
        blocked.add(_UNHASHABLE)


_UNHASHABLE: Any = object()
_END: Any = object()
"""What the input waiter returns at the end of the lane's input."""


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _no_key() -> Any:
    from asyncflow.stream import _NO_KEY

    return _NO_KEY
