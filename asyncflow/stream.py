"""Typed streams: what an agent function iterates over, one lane's worth.

``async for value in stream`` yields decoded values in order; the event behind
the current value (key, event time, headers, position) is ``stream.current``.
An event is handled once the loop asks for the next one. ``map``, ``filter``
and ``key_by`` apply in the lane without extra tasks; ``batch`` groups values
for efficient sinks; ``window`` aggregates over event-time windows;
``state(table)`` and ``stateful_map`` keep state per key.

The loop awaits only when its local batch is empty: the queue carries batches.
Over ``map``/``filter`` steps (or none) it goes through a batch's columns
(``asyncflow.slices``) value by value, each through the steps as the loop
reaches it; ``stream.current`` is made from the columns when it is read.
A checkpoint barrier in the queue makes the loop wait, between two events,
until the checkpoint has taken the lane's state (``asyncflow.checkpoint``).

Example:
    >>> from asyncflow.testing import stream_of
    >>> async def demo():
    ...     s = stream_of([1, 2, 3, 4]).map(lambda v: v * 10).filter(lambda v: v > 10)
    ...     return [v async for v in s]
    >>> import asyncio; asyncio.run(demo())
    [20, 30, 40]
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from datetime import timedelta
from operator import length_hint
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast

from asyncflow.chain import (
    AFILTER,
    AMAP,
    FILTER,
    KEY,
    MAP,
    NO_STEPS,
    SKIP,
    STATEFUL,
    SYNC_KINDS,
    Chain,
    compile_chain,
    kept_indices,
    last_kept,
)
from asyncflow.checkpoint import Barrier
from asyncflow.event import Event, Watermark
from asyncflow.item_loop import item_loop
from asyncflow.lanes import LaneClosed, LaneQueue, split_gone
from asyncflow.metrics import Metrics
from asyncflow.slices import LaneSlice

if TYPE_CHECKING:
    from asyncflow.agent import Retry
    from asyncflow.async_map import AsyncMapped, Cache, InFlight, Order
    from asyncflow.joins import Join, JoinedStream
    from asyncflow.state.keyed import KeyedState
    from asyncflow.state.manager import StateManager
    from asyncflow.state.table import Table
    from asyncflow.windows.windowed import WindowedStream

T = TypeVar("T")
U = TypeVar("U")
V = TypeVar("V")

DeadLetterFn = Callable[[Event[Any], str], Awaitable[None]]


class LaneContext:
    """One lane of an agent: its name and index, the state it reads and writes, its windows.

    ``finished`` (given by the runtime) is called once the lane's body returned.

    Example:
        >>> LaneContext("agent", 0).id
        ('agent', 0)
    """

    __slots__ = ("agent", "finished", "id", "index", "lanes", "state", "windows")

    def __init__(
        self,
        agent: str,
        index: int,
        *,
        lanes: int = 1,
        state: StateManager | None = None,
        finished: Callable[[Hashable, bool], None] | None = None,
    ) -> None:
        self.agent = agent
        self.index = index
        self.lanes = lanes
        self.id: Hashable = (agent, index)
        if state is None:
            from asyncflow.clock import SystemClock
            from asyncflow.state.manager import StateManager

            state = StateManager(
                agent, directory=None, store="memory", broker=None, clock=SystemClock()
            )
        self.state = state
        self.finished = finished
        self.windows: list[Any] = []


TURN_EVERY = 1024
"""Values a lane hands its agent (per item or in ``batches()``) before the event loop gets a turn.

A lane runs its queued slices back to back while they last; under a backlog
that is thousands of events, and meanwhile the writer cannot hand the outputs
already made to the sink, nor another lane start. A turn every 1,024 values
lets them in (one task switch per 1,024; the per-item loop over a slice counts the values
it took, filtered or not, once per 1,024 rather than one by one).
"""


async def _no_dead_letter(event: Event[Any], reason: str) -> None:
    raise RuntimeError(f"no dead-letter output configured; dropped {event!r}: {reason}")


_NO_KEY: Any = object()
_BARRIER: Any = object()
"""What ``_next_raw(stop_at_barrier=True)`` returns when a barrier is next."""

_FILLED: Any = object()
"""What ``_refill`` returns once the lane's local batch holds new events."""

_IN_SLICE: Event[Any] = Event(None, _NO_KEY)
"""``_held`` while a per-item loop is on a value of a ``LaneSlice``: the event it holds
is ``current`` (made only if someone asks, from the slice's columns)."""


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
        self._ops: tuple[tuple[int, Callable[..., Any]], ...] = ()
        self._base_ops: tuple[tuple[int, Callable[..., Any]], ...] = ()  # kept by _restart
        self._sync_ops = True
        self._chain: Chain = NO_STEPS
        self._failed_src: Event[Any] | None = None
        self._failed_index = -1  # where Chain.columns raised
        self._failed: tuple[Exception, Event[Any] | None] | None = None
        self._held: Event[Any] | None = None
        self._batch_events: list[Event[Any]] | None = None
        self._batch_cols: tuple[LaneSlice, int, list[int]] | None = None
        """The batch being handled as columns: its slice, how many of the slice's records
        it covers (all but those after a step that raised) and the indices of those its
        filters dropped."""
        self._pushed_back: list[Event[Any]] = []
        self._barrier: Barrier | None = None
        self._window_key: Any = _NO_KEY
        self._windows: dict[int, WindowedStream] = {}
        self._window_calls = 0
        self._async_maps: dict[int, AsyncMapped[Any]] = {}
        self._async_calls = 0
        self._current: Event[Any] | None = None
        self._cols: LaneSlice | None = None
        """A lane slice the per-item loop is going through by its values (no event each)."""
        self._cit: Iterator[Any] | None = None
        """The per-item loop's iterator over ``_cols``' values, which holds its position."""
        self._cn = 0  # the length of the values ``_cit`` goes over
        self._cpos_at = 0  # ``_cpos`` while there is no ``_cit``
        self._gathering: tuple[list[Event[Any]], list[Any]] | None = None
        """The events and values ``batch(size, timeout)`` is gathering (not handed out yet)."""
        queue.reader_lets_go = self._let_go

    @property
    def _cpos(self) -> int:
        """How far into ``_cols`` the per-item loop is: its value ``_cpos - 1`` is current.

        While the loop is on a slice its list iterator knows, so the loop keeps
        no count of its own: a value costs no store. Setting it takes the slice
        from the loop (see the setter).
        """
        it = self._cit
        if it is None:
            return self._cpos_at
        return self._cn - length_hint(it)

    @_cpos.setter
    def _cpos(self, pos: int) -> None:
        it = self._cit
        if it is not None:
            # a per-item loop going through it stops before its next value (it asks
            # nothing after each value: whatever takes the slice from it comes here)
            self._cit = None
            it.__setstate__(self._cn)  # type: ignore[attr-defined]
        self._cpos_at = pos

    @property
    def current(self) -> Event[Any] | None:
        """The event being handled: its key, value, event time, headers, partition and offset.

        Made when first asked for if the lane got the event as part of a slice's
        columns (so a loop that never asks costs no ``Event`` per record).

        Example:
            >>> from asyncflow.testing import stream_of
            >>> import asyncio
            >>> async def demo():
            ...     s = stream_of(["a", "b"])
            ...     return [(v, s.current.offset) async for v in s]
            >>> asyncio.run(demo())
            [('a', 0), ('b', 1)]
        """
        ev = self._current
        if ev is None and self._cpos:
            cols = self._cols
            if cols is not None:
                ev = self._current = cols.event(self._cpos - 1)
        return ev

    @current.setter
    def current(self, event: Event[Any] | None) -> None:
        self._current = event

    # -- building -----------------------------------------------------------------
    def _with(self, kind: int, fn: Callable[..., Any]) -> Stream[Any]:
        self._ops = (*self._ops, (kind, fn))
        self._sync_ops = all(k in SYNC_KINDS for k, _ in self._ops)
        self._chain = compile_chain(self._ops) if self._sync_ops else NO_STEPS
        return self

    def _begin_with_state_step(self, table: Table[V], fn: Callable[[Any, Event[Any]], Any]) -> None:
        """A first step of every body on this lane: ``fn(keyed_state, event)`` -> value or ``None``.

        For the core's own steps (a repartition's deduplication): kept when a
        body restarts after an error, and ``None`` drops the event.
        """
        keyed = self.state(table)

        def step(value: Any) -> Any:
            ev = self.current
            assert ev is not None
            return fn(keyed, ev)

        self._base_ops = (*self._base_ops, (STATEFUL, step))
        self._restart()

    def map(self, fn: Callable[[T], U] | Callable[[T], Awaitable[U]]) -> Stream[U]:
        """Transform each value (``fn`` may be async). Key and event time stay.

        Example:
            >>> from asyncflow.testing import stream_of
            >>> import asyncio
            >>> asyncio.run(stream_of([1]).map(str).collect())
            ['1']
        """
        return self._with(AMAP if inspect.iscoroutinefunction(fn) else MAP, fn)

    def filter(self, fn: Callable[[T], bool] | Callable[[T], Awaitable[bool]]) -> Stream[T]:
        """Keep the values for which ``fn`` is true; the others are done at once.

        Example:
            >>> from asyncflow.testing import stream_of
            >>> import asyncio
            >>> asyncio.run(stream_of([1, 2, 3]).filter(lambda v: v != 2).collect())
            [1, 3]
        """
        return self._with(AFILTER if inspect.iscoroutinefunction(fn) else FILTER, fn)

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
        return self._with(KEY, fn)

    def state(self, table: Table[V]) -> KeyedState[V]:
        """The table seen through the event being handled: get/set/delete/update its key.

        Call it once, before the loop; every call on the result acts on the
        key and partition of ``stream.current``. State is checkpointed with
        the source offsets and restored with its partition on any worker (see
        ``asyncflow.state``).

        Example:
            >>> import asyncflow as af
            >>> from asyncflow.testing import stream_of
            >>> counts = af.Table("counts", default=0)
            >>> s = stream_of(["a", "b", "a"], keys=["a", "b", "a"])
            >>> async def count():
            ...     n = s.state(counts)
            ...     return [n.update(lambda c: c + 1) async for _ in s]
            >>> import asyncio; asyncio.run(count())
            [1, 1, 2]
        """
        from asyncflow.state.keyed import KeyedState

        manager = self._lane.state
        return KeyedState(self, table, lambda p: manager.table_partition(table, p))

    def stateful_map(
        self, table: Table[V], fn: Callable[[Any, T], tuple[Any, U | None]]
    ) -> Stream[U]:
        """Map each value with its key's state: ``fn(state, value) -> (new_state, output)``.

        ``state`` is the key's value in ``table`` (the table's default when it
        has none); a ``new_state`` of ``None`` deletes it; an ``output`` of
        ``None`` is dropped (so ``fn`` can filter too). The stream yields the
        outputs.

        Example: a running count per key.
            >>> import asyncflow as af
            >>> from asyncflow.testing import stream_of
            >>> counts = af.Table("counts", default=0)
            >>> s = stream_of(["x", "y", "x"], keys=["x", "y", "x"])
            >>> counted = s.stateful_map(counts, lambda n, v: (n + 1, (v, n + 1)))
            >>> import asyncio; asyncio.run(counted.collect())
            [('x', 1), ('y', 1), ('x', 2)]
        """
        keyed = self.state(table)

        def step(value: Any) -> Any:
            new_state, out = fn(keyed.get(), value)
            if new_state is None:
                keyed.delete()
            else:
                keyed.set(new_state)
            return out

        return self._with(STATEFUL, step)

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
        name: str | None = None,
    ) -> WindowedStream:
        """Aggregate per key over event-time windows (see ``asyncflow.windows``).

        ``wait`` is how far events may arrive out of order before the watermark
        passes them (Flink's bounded out-of-orderness; the watermark moves once
        per fetched batch, so ``fetch_max`` decides how far it jumps at a time);
        ``lateness`` keeps a
        fired window open that much longer for late updates (Flink's allowed
        lateness); what comes later still goes to ``late`` (default: the dead
        letters). Window state is checkpointed with the offsets and restored
        with its partition, as the table ``name`` (default ``<agent>-window<n>``
        for the agent body's n-th window; name it to keep state across changes
        to the body). The same call site gets the same windows back when the
        agent body restarts after an error.

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
        return self._windowed(self, assigner, aggregate=aggregate, wait=wait, lateness=lateness,
                              emit=emit, system_wait=system_wait, late=late, name=name)

    def _windowed(
        self,
        source: Any,
        assigner: Any,
        *,
        aggregate: Any,
        wait: timedelta = timedelta(0),
        lateness: timedelta = timedelta(0),
        emit: Literal["final", "updates"] = "final",
        system_wait: timedelta | None = None,
        late: Any = None,
        name: str | None = None,
    ) -> WindowedStream:
        """The windows of this call site over ``source`` (this stream, or what it feeds)."""
        from asyncflow.windows.windowed import WindowedStream

        slot = self._window_calls
        self._window_calls += 1
        ws = self._windows.get(slot)
        if ws is None:
            ws = WindowedStream(
                source,
                assigner,
                aggregate=aggregate,
                wait=wait,
                lateness=lateness,
                emit=emit,
                system_wait=system_wait,
                late=late,
                name=name or f"{self._lane.agent}-window{slot}",
            )
            self._windows[slot] = ws
            self._lane.windows.append(ws)
        return ws

    def joined(self, join: Join[U, V]) -> JoinedStream[U, V]:
        """The results of ``join`` on this lane (``asyncflow.joins``): ``Joined(key, left, right, time)``.

        Call it once, before the loop, in an agent that reads the join
        (``@app.agent(join)``); the same stream gets the same results back
        when the agent body restarts after an error.

        Example:
            >>> import asyncflow as af
            >>> app = af.App("taxi")
            >>> rides = app.topic("rides", key=lambda r: r["driver"], time="t")
            >>> drivers = app.topic("drivers", key=lambda d: d["id"], time="t")
            >>> ride_drivers = af.join_table(rides, drivers, name="ride-drivers", how="left")
            >>> @app.agent(ride_drivers)
            ... async def enrich(stream):
            ...     async for j in stream.joined(ride_drivers):
            ...         print(j.left, j.right)
        """
        return join.joined(self)

    def map_async(
        self,
        fn: Callable[[T], Awaitable[U]],
        *,
        capacity: int = 100,
        limit: InFlight | None = None,
        order: Order = "key",
        timeout: timedelta | float | None = None,
        retry: Retry | None = None,
        retry_on: tuple[type[BaseException], ...] = (TimeoutError, OSError),
        cache: Cache | None = None,
        fallback: Callable[[T, BaseException], U] | None = None,
        on_failure: Literal["dead_letter", "raise"] = "dead_letter",
        combine: Callable[[T, Any], U] | None = None,
    ) -> AsyncMapped[U]:
        """Look values up with ``fn`` (async), many at once, results in order per key.

        Up to ``capacity`` events of this lane are looked up at once (``limit``,
        an ``af.InFlight``, bounds them over every lane given it); ``order`` is
        ``"key"`` (per key, as they came), ``"stream"`` (as they came) or
        ``"none"`` (as they complete). Each call is cut after ``timeout``;
        failures of the types ``retry_on`` are retried as ``retry``
        (``af.Retry``: times and backoff) says; ``cache`` (``af.Cache``) keeps
        results (one ``af.Cache`` object is one store, shared by every lane
        given it); ``combine(value, result)``, when given, is what replaces the
        value (default: the result). A lookup that still fails takes ``fallback(value, error)``,
        else goes to the dead letters (``on_failure="dead_letter"``) or raises
        in the body for the agent's error policy (``"raise"``). No checkpoint
        covers an event whose lookup is in flight (see ``asyncflow.async_map``).
        Iterate the result, or call ``.window(...)`` / ``.batches()`` on it.

        Example:
            >>> import asyncio
            >>> from asyncflow.testing import stream_of
            >>> async def country(ip):
            ...     await asyncio.sleep(0.01)
            ...     return {"1.1.1.1": "AU"}.get(ip, "?")
            >>> async def demo():
            ...     s = stream_of(["1.1.1.1", "10.0.0.1"])
            ...     return [c async for c in s.map_async(country, timeout=1.0)]
            >>> asyncio.run(demo())
            ['AU', '?']
        """
        from asyncflow.async_map import AsyncMapped

        slot = self._async_calls
        self._async_calls += 1
        mapped = self._async_maps.get(slot)
        if mapped is None:
            seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
            mapped = AsyncMapped(
                self, fn, capacity=capacity, limit=limit, order=order, timeout=seconds,
                retry=retry, retry_on=retry_on, cache=cache, fallback=fallback,
                on_failure=on_failure, combine=combine,
            )
            self._async_maps[slot] = mapped
        return mapped

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

    def batches(self) -> AsyncIterator[list[T]]:
        """Iterate whole lane slices: everything queued for this lane, as one list, at once.

        The batch API: nothing waits for a batch to fill (a thin stream gives
        small batches, a backlog large ones, up to a fetch's worth), and
        map/filter/key_by/stateful_map apply per value as in the per-item
        loop. ``stream.current`` is the batch's last event. If the agent body
        raises while handling a batch, its error policy takes the whole batch.
        Send the results with ``output.send_values(batch)`` (or ``send_many`` of pairs).

        Example:
            >>> from asyncflow.testing import stream_of
            >>> import asyncio
            >>> async def demo():
            ...     return [b async for b in stream_of(range(5)).map(lambda v: v * 2).batches()]
            >>> asyncio.run(demo())
            [[0, 2, 4, 6, 8]]
        """
        return self._slices()

    def event_batches(self) -> AsyncIterator[list[Event[T]]]:
        """Iterate whole lane slices as their events (key, value, time, headers, position).

        ``batches()`` with each value's envelope: what a step needs that forwards
        events with their event time and headers (a repartition, an audit copy).
        The same guarantees as ``batches()``.

        Example:
            >>> from asyncflow.testing import stream_of
            >>> import asyncio
            >>> async def demo():
            ...     return [[e.value for e in b] async for b in stream_of("ab").event_batches()]
            >>> asyncio.run(demo())
            [['a', 'b']]
        """
        return self._event_slices()

    async def _event_slices(self) -> AsyncIterator[list[Event[T]]]:
        async for _ in self._slices():
            events = self._batch_event_list()
            self._current = events[-1]  # the batch's own last event
            yield events

    def _batch_event_list(self) -> list[Event[Any]]:
        """The events of the batch being handled (made from its columns if it came as such)."""
        cols = self._batch_cols
        if cols is not None:
            lane_slice, covered, dropped = cols
            events = lane_slice.events()
            if not dropped:
                return events[:covered]
            return [events[i] for i in kept_indices(covered, dropped)]
        batch = self._batch_events
        assert batch is not None
        return batch

    async def _slices(self) -> AsyncIterator[list[T]]:
        """What ``batches()`` runs: each lane slice through the chain, as one list of values.

        If a step raises on an event, the values before it are yielded first and
        the failure waits on the stream (``_failed``) to be raised by the next
        read: so it is not lost when the body raises on those values first.
        """
        budget = TURN_EVERY  # values until the next turn of the event loop, across slices
        while True:
            pending = self._failed
            if pending is not None:  # a step raised on an event after the last batch's values
                self._failed = None
                error, self._held = pending
                self._current = self._held
                raise error
            try:
                got = await self._next_slice(columns=True)
            except StopAsyncIteration:
                return
            values: list[T] = []
            done: list[Event[Any]] = []
            as_columns: tuple[LaneSlice, int, list[int]] | None = None  # as _batch_cols
            failed: Exception | None = None
            bad: Event[Any] | None = None
            if isinstance(got, LaneSlice) and self._takes_columns():  # no event per record
                dropped: list[int] = []
                if not self._ops:
                    values = list(got.values)
                else:
                    run = self._chain.columns
                    assert run is not None
                    try:
                        run(self, got.values, values, dropped)
                    except Exception as exc:  # noqa: BLE001 - handed to the error policy below
                        events = got.events()
                        i = self._failed_index
                        failed, bad = exc, events[i]
                        self._pushed_back.extend(reversed(events[i + 1 :]))  # delivered again
                as_columns = (got, len(got) if failed is None else self._failed_index, dropped)
            else:
                events = got.events() if isinstance(got, LaneSlice) else got
                if not self._ops:
                    values = [e.value for e in events]
                    done = events
                elif self._sync_ops:
                    try:
                        self._chain.many(self, events, values, done)
                    except Exception as exc:  # noqa: BLE001 - handed to the error policy below
                        failed, bad = exc, self._held
                        src, self._failed_src = self._failed_src, None
                        rest = events[_index_of(events, src) + 1 :]
                        self._pushed_back.extend(reversed(rest))  # delivered again next
                else:
                    for i, ev in enumerate(events):
                        try:
                            res = await self._apply_ops(ev)
                        except Exception as exc:  # noqa: BLE001 - to the error policy below
                            failed, bad = exc, ev
                            rest = events[i + 1 :]
                            self._pushed_back.extend(reversed(rest))  # delivered again next
                            break
                        if res is None:
                            continue
                        values.append(res.value)
                        done.append(res)
            if failed is not None and values:  # they go first; the next read raises the failure
                self._failed, failed = (failed, bad), None
                self._held = None
            if values:
                if as_columns is not None:
                    self._batch_cols = as_columns
                    lane_slice, covered, dropped = as_columns
                    self._current = lane_slice.event(last_kept(covered, dropped))
                else:
                    self._batch_events = done
                    self._current = done[-1]
                try:
                    yield values
                finally:
                    self._batch_cols = None
                    self._batch_events = None
                budget -= len(values)
                if budget <= 0:  # as in the per-item loop: the writer and the other lanes
                    budget = TURN_EVERY
                    await asyncio.sleep(0)
            if failed is not None:
                self._held = self._current = bad
                raise failed

    async def _next_slice(self, columns: bool = False) -> list[Event[Any]] | LaneSlice:
        """Every event the lane holds or gets next from its queue (barriers handled between).

        With ``columns``, a batch the lane got as a ``LaneSlice`` comes back as it
        is (its values decoded: ``_refill``).
        """
        while True:
            if self._pushed_back:
                events = self._pushed_back[::-1]
                self._pushed_back.clear()
                return events
            buf, pos = self._buf, self._pos
            if pos < len(buf):
                self._buf, self._pos = [], 0
                return buf[pos:] if pos else buf
            # a batch, or a watermark (which a slice does not carry)
            got = await self._refill(columns=columns)
            if type(got) is LaneSlice:
                return got

    async def _batches(self, size: int, timeout: float) -> AsyncIterator[list[T]]:
        while True:
            events: list[Event[Any]] = []
            values: list[T] = []
            self._gathering = (events, values)  # a revoke lets go of its partitions' (_let_go)
            deadline = time.monotonic() + timeout
            ended = False
            failed: tuple[Exception, Event[Any] | None] | None = None
            try:
                while len(values) < size:
                    left = deadline - time.monotonic()
                    item = await self._next_item(left if values else None, bool(values))
                    if item is None or item is _BARRIER:
                        break  # the time is up, or a checkpoint waits for this batch first
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
            self._gathering = None
            if values:
                self._batch_events = events
                self._current = events[-1]
                try:
                    yield values
                finally:
                    self._batch_events = None
            if failed is not None:
                error, event = failed
                self._held = event
                self._current = event
                raise error
            if ended:
                return

    def _take_in_flight(self) -> list[Event[Any]]:
        """The events being handled when the agent body raised (the error policy's to handle)."""
        if self._batch_cols is not None:
            events = self._batch_event_list()
            self._batch_cols = None
            return events
        batch = self._batch_events
        if batch is not None:
            self._batch_events = None
            return batch
        held = self._held
        if held is not None:
            self._held = None
            if held is _IN_SLICE:  # a value of a slice the per-item loop is going through
                held = self.current
                assert held is not None
            return [held]
        return []

    # -- iterating ----------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[T]:
        """What ``async for`` runs: a tight loop over the lane's local batch.

        Equivalent to calling ``__anext__`` until the end, without a coroutine
        per value while the batch lasts (the queue is awaited only when it is
        empty), with this stream's ``map``/``filter`` steps compiled into it
        (``asyncflow.item_loop``). Position and current event live on the
        stream, so a body that restarts after an error goes on where this loop
        stopped.
        """
        return item_loop(self._chain)(self)

    async def __anext__(self) -> T:
        self._held = None
        self._window_key = _NO_KEY
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
                    self._current = ev
                    value = self._chain.one(self, ev)
                    if value is SKIP:
                        continue
                    ev = self._current  # a new event if key_by changed the key
            self._held = ev
            self._current = ev
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
        self._ops = self._base_ops
        self._sync_ops = all(k in SYNC_KINDS for k, _ in self._ops)
        self._chain = compile_chain(self._ops) if self._ops and self._sync_ops else NO_STEPS
        self._window_calls = 0
        self._async_calls = 0

    def push_back(self, event: Event[Any]) -> None:
        """Deliver ``event`` again as the next item (retry after an error)."""
        if self._held is event:
            self._held = None
        if self._cit is not None:
            self._cpos = self._cpos  # a per-item loop stops where it is: this one comes first
        self._pushed_back.append(event)

    def _let_go(self, gone: Callable[[Hashable], bool]) -> list[tuple[Hashable, int]]:
        """Give up what this lane took of the partitions ``gone`` names and did not start.

        Their partitions were revoked or lost (``LaneQueue.drop_partitions``):
        the rest of the slice the loop is going through, the events left in the
        local batch, those pushed back, those ``batch(size, timeout)`` is
        gathering, and a failure waiting to be raised on one of them. What is
        being handled now finishes; nothing after it of those partitions is.
        Returns their ``(partition, offset)`` pairs.

        Example:
            >>> import asyncio
            >>> from asyncflow.testing import stream_of
            >>> async def demo():
            ...     s = stream_of(["a", "b", "c"])
            ...     first = await s.__anext__()
            ...     return first, s._let_go(lambda p: True)
            >>> asyncio.run(demo())
            ('a', [(None, 1), (None, 2)])
        """
        dropped: list[tuple[Hashable, int]] = []
        cols = self._cols
        if cols is not None and gone(cols.partition):
            pos = self._cpos
            if pos < len(cols):
                if self._current is None:
                    self._current = self.current  # stays current once the slice is let go
                dropped += [(cols.partition, o) for o in list(cols.offsets)[pos:]]
                self._cpos = len(cols)  # the per-item loop stops before its next value
        buf, pos = self._buf, self._pos
        if pos < len(buf):
            keep, out = split_gone(buf[pos:], gone)
            if out:
                dropped += out
                self._buf, self._pos = keep, 0  # a new list: the per-item loop takes it up
        keep, out = split_gone(self._pushed_back, gone)
        if out:
            dropped += out
            self._pushed_back[:] = keep
        failed = self._failed
        if failed is not None and failed[1] is not None and gone(failed[1].partition):
            self._failed = None
            dropped.append((failed[1].partition, failed[1].offset))
        gathering = self._gathering
        if gathering is not None and any(gone(e.partition) for e in gathering[0]):
            events, values = gathering
            kept = [i for i, e in enumerate(events) if not gone(e.partition)]
            dropped += [(e.partition, e.offset) for e in events if gone(e.partition)]
            values[:] = [values[i] for i in kept]
            events[:] = [events[i] for i in kept]
        return dropped

    async def _next_raw(
        self, timeout: float | None = None, stop_at_barrier: bool = False
    ) -> Any:
        """The next event as read (no map/filter/key_by) or watermark; see ``_next_item``.

        A checkpoint barrier is handled here: the lane waits at it until the
        checkpoint has taken the state. With ``stop_at_barrier`` (a caller that
        holds events it has not handled yet) ``_BARRIER`` comes back first, and
        the barrier is handled at the next call.
        """
        while True:
            if self._pushed_back:
                return self._pushed_back.pop()
            buf = self._buf
            pos = self._pos
            if pos < len(buf):
                self._pos = pos + 1
                return buf[pos]
            got = await self._refill(timeout, stop_at_barrier)
            if got is not _FILLED:
                return got

    async def _refill(
        self, timeout: float | None = None, stop_at_barrier: bool = False, columns: bool = False,
    ) -> Any:
        """Wait for the lane's next batch of events (then ``_FILLED``), or a watermark.

        ``None`` when ``timeout`` passed with nothing; ``_BARRIER`` with
        ``stop_at_barrier`` when a checkpoint barrier is next. Any other
        barrier is handled here: the lane waits at it until the checkpoint has
        taken the state. A batch that came as a ``LaneSlice`` is returned as it
        is with ``columns`` (the caller takes all of it); else its events fill
        the buffer. What is left of a slice the per-item loop was going through
        comes first (before any barrier: it was queued before it). A slice
        that came with raw values is decoded here, all at once (its poison a
        dead letter each, and a slice of nothing but poison skipped): one loop
        in C, before anything reads the slice, is faster on this hardware than
        decoding each value as it is used (measured both ways; see
        ``asyncflow.raw_values``).
        """
        cols = self._cols
        if cols is not None:
            rest = self._rest_of_columns(cols)
            if rest is not None:
                if columns:
                    return rest
                self._buf, self._pos = rest.events(), 0
                return _FILLED
        while True:
            barrier = self._barrier
            if barrier is not None:
                if stop_at_barrier:
                    return _BARRIER
                self._barrier = None
                await barrier.arrive(self._lane.id)
                continue
            try:
                if timeout is None:
                    got = await self._queue.get()
                else:
                    got = await self._queue.get_within(max(timeout, 0.0))
            except LaneClosed:
                raise StopAsyncIteration from None
            if type(got) is Barrier:
                self._barrier = got
                continue
            if got is None or type(got) is Watermark:
                return got
            if type(got) is LaneSlice:
                decoder = got.decoder
                if decoder is not None:
                    decoded = got.values  # its poison is a dead letter each now
                    await decoder.hold()
                    if not decoded:
                        continue  # every record was poison
                if not (columns and self._takes_columns()):
                    self._queue.takes_columns = False  # it makes events of slices: hand it events
                if columns:
                    return got
                got = got.events()
            elif columns and type(got) is list and self._takes_columns():
                self._queue.takes_columns = True  # a consumer and a chain that work on columns
            self._buf, self._pos = got, 0
            return _FILLED

    def _rest_of_columns(self, cols: LaneSlice) -> LaneSlice | None:
        """Let go of ``_cols``, the per-item loop's slice: what it has not reached, if any.

        The current event is made first if it is one of the slice's (so it stays
        ``current`` once the slice is gone).
        """
        if self._current is None:
            self._current = self.current
        pos, self._cpos = self._cpos, 0
        self._cols = None
        if pos >= len(cols):
            return None
        return cols.take(range(pos, len(cols))) if pos else cols

    async def _next_events(
        self, stop_at_barrier: bool = False, wait: bool = True, columns: bool = False
    ) -> tuple[list[Event[Any]] | LaneSlice, list[Any] | None] | Watermark | Any:
        """The lane's next slice after map/filter/key_by, or the next watermark.

        With ``stop_at_barrier``, ``_BARRIER`` comes back when a checkpoint
        barrier is next (the caller arrives with ``_arrive_at_barrier``); with
        ``wait=False``, ``None`` when nothing is buffered (the queue is not
        awaited).

        A slice is ``(events, values)``: the events that passed the chain and
        their values after it (``values`` is ``None`` when the stream has no
        steps: each event's own value). Barriers are handled here, as in
        ``_refill``. If a step raises on an event, the events before it come
        back first, the ones after it are delivered again later, and the next
        call raises the error with the failing event as ``current``.
        Raises ``StopAsyncIteration`` at the end of the input. With ``columns``,
        a batch that came as a ``LaneSlice`` comes back as one (the part of it
        the chain kept) when the chain has only ``map`` and ``filter`` steps.
        """
        self._held = None
        failed = self._failed
        if failed is not None:
            self._failed = None
            error, self._held = failed
            self._current = self._held
            raise error
        while True:
            if self._pushed_back:
                events = self._pushed_back[::-1]
                self._pushed_back.clear()
            else:
                buf, pos = self._buf, self._pos
                if pos >= len(buf):
                    if not wait and (self._cols is None or self._cpos >= len(self._cols)):
                        return _BARRIER if stop_at_barrier and self._barrier is not None else None
                    got = await self._refill(stop_at_barrier=stop_at_barrier, columns=columns)
                    if type(got) is LaneSlice:
                        through = self._columns_through_chain(got)
                        if through is None:  # the chain needs the events
                            events = got.events()
                        elif len(through[0]) == 0:
                            continue  # the filters kept nothing
                        else:
                            return through
                    elif got is _FILLED or got is None:
                        continue
                    else:
                        return cast(Watermark, got)
                else:
                    self._buf, self._pos = [], 0
                    events = buf[pos:] if pos else buf
            if not self._ops:
                return events, None
            values: list[Any] = []
            done: list[Event[Any]] = []
            if self._sync_ops:
                try:
                    self._chain.many(self, events, values, done)
                except Exception as exc:
                    src, self._failed_src = self._failed_src, None
                    self._pushed_back.extend(reversed(events[_index_of(events, src) + 1 :]))
                    if not done:
                        raise
                    self._failed = (exc, self._held)
                    self._held = None
            else:
                for i, ev in enumerate(events):
                    try:
                        res = await self._apply(ev)
                    except Exception as exc:
                        self._pushed_back.extend(reversed(events[i + 1 :]))
                        if not done:
                            raise
                        self._failed = (exc, self._held)
                        self._held = None
                        break
                    if res is not None:
                        done.append(res)
                        values.append(res.value)
            if done:
                return done, values

    def _columns_through_chain(
        self, cols: LaneSlice
    ) -> tuple[list[Event[Any]] | LaneSlice, list[Any] | None] | None:
        """A ``LaneSlice`` through the chain as columns; ``None`` if the chain needs events.

        Returns what ``_next_events`` does: the slice (or the part of it the
        filters kept) and the values after the chain; an empty slice when nothing
        passed. If a step raises, the events after it are delivered again
        later, those before it come back first, and the error is raised at
        once (nothing passed before it) or by the next call.
        """
        if not self._ops:
            return cols, None
        if not self._takes_columns():
            return None
        run = self._chain.columns
        assert run is not None
        values: list[Any] = []
        dropped: list[int] = []
        try:
            run(self, cols.values, values, dropped)
        except Exception as exc:
            events = cols.events()
            i = self._failed_index
            self._pushed_back.extend(reversed(events[i + 1 :]))
            self._current = events[i]
            if not values:
                self._held = events[i]
                raise
            self._failed = (exc, events[i])
            self._held = None
            return [events[j] for j in kept_indices(i, dropped)], values
        if not dropped:
            return cols, values
        return cols.take(kept_indices(len(cols), dropped)), values

    def _takes_columns(self) -> bool:
        """Whether the chain runs on a slice's values alone: no steps, or ``map``/``filter`` only."""
        return self._sync_ops and self._chain.columns is not None

    async def _arrive_at_barrier(self) -> None:
        """Arrive at the barrier ``_BARRIER`` announced (everything before it is handled)."""
        barrier, self._barrier = self._barrier, None
        if barrier is not None:
            await barrier.arrive(self._lane.id)

    async def _next_item(
        self, timeout: float | None = None, stop_at_barrier: bool = False
    ) -> Any:
        """The next event (after map/filter/key_by) or watermark.

        Raises ``StopAsyncIteration`` at the end of input; returns ``None`` when
        ``timeout`` passed with nothing new, and ``_BARRIER`` (with
        ``stop_at_barrier``) when a checkpoint waits. An event changed by map
        or key_by is a new ``Event`` with the same position.
        """
        self._held = None
        while True:
            item = await self._next_raw(timeout, stop_at_barrier)
            if item is None or item is _BARRIER or type(item) is Watermark or not self._ops:
                return item
            out = await self._apply(item)
            if out is not None:
                return out

    async def _apply(self, ev: Event[Any]) -> Event[Any] | None:
        try:
            return await self._apply_ops(ev)
        except Exception:
            self._current = ev  # the agent's error policy names and dead-letters this event
            self._held = ev
            raise

    async def _apply_ops(self, ev: Event[Any]) -> Event[Any] | None:
        key = ev.key
        value = ev.value
        self._current = ev
        for kind, fn in self._ops:
            if kind == MAP:
                value = fn(value)
            elif kind == FILTER:
                if not fn(value):
                    return None
            elif kind == KEY:
                key = fn(value)
                if key is not ev.key:
                    ev = self._current = Event(key, value, ev.time, ev.headers, ev.partition,
                                              ev.offset)
            elif kind == STATEFUL:
                value = fn(value)
                if value is None:
                    return None
            elif kind == AMAP:
                value = await fn(value)
            elif not await fn(value):
                return None
        if key is ev.key and value is ev.value:
            return ev
        return Event(key, value, ev.time, ev.headers, ev.partition, ev.offset)

    async def dead_letter(self, event: Event[Any], reason: str) -> None:
        """Send an event to the app's dead-letter output with ``reason``."""
        self.metrics.incr("dead_letters")
        await self._dead_letter(event, reason)

    def close(self, finished: bool = True) -> None:
        """The lane is finishing: tell the checkpoints it takes part in no more barriers.

        ``finished`` is false when the lane did not get to the end of its input
        (cancelled at shutdown, or stopped by an error): it may have been in the
        middle of an event, so no later checkpoint may cover what it held.
        """
        self._held = None
        for mapped in self._async_maps.values():
            mapped.cancel()  # lookups still in flight: their events are replayed
        clean = finished and self.input_ended
        barrier, self._barrier = self._barrier, None
        if barrier is not None and clean:
            barrier.leave(self._lane.id)
        done = self._lane.finished
        if done is not None:
            done(self._lane.id, clean)

    @property
    def output_key(self) -> Any:
        """The key of what is being handled: the window result's, else the event's.

        Example:
            >>> from asyncflow.testing import stream_of
            >>> stream_of([]).output_key is None
            True
        """
        if self._window_key is not _NO_KEY:
            return self._window_key
        ev = self.current
        return None if ev is None else ev.key

    @property
    def input_ended(self) -> bool:
        """Whether the lane's input ended and everything in it was taken."""
        cols = self._cols
        return (
            self._queue.closed
            and self._queue.size == 0
            and self._pos >= len(self._buf)
            and (cols is None or self._cpos >= len(cols))
        )


def _index_of(events: list[Event[Any]], event: Event[Any] | None) -> int:
    """Where ``event`` is in ``events`` (by identity)."""
    for i, ev in enumerate(events):
        if ev is event:
            return i
    raise ValueError("the failing event is not in its slice")
