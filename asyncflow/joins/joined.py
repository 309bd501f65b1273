"""A lane's stream of a join topic turned into an async iterator of ``Joined`` results.

``JoinedStream`` pulls the lane's slices and watermarks (the contract
``asyncflow.windows.windowed`` describes: ``stream._next_events()``, barriers
handled by the stream, more asked for only when no result is left to hand
out) through one join operator per partition of the internal topic
(``TableJoinOperator`` or ``IntervalJoinOperator``), and yields the results.

State: the operator's buffered items of each key changed since the last
checkpoint are exported, encoded (``asyncflow.joins.results.pack``), as the
table ``<name>-join`` (key ``[lane, key]``; a tombstone when a key holds
nothing), so they go to the local store and the changelog with the offsets
like any window state. When a partition is assigned, each lane's operator is
rebuilt from the restored entries of the keys it now gets (an entry a lane
wrote before the lane count changed moves to its key's new lane) and the
restored watermark, and events the restored state
already reflects (offsets at or before the one it applied) are skipped: a
restart or a takeover goes on where the last checkpoint was, and no match is
found twice for what that checkpoint covered.

``system_wait`` lets a quiet partition finish what waits for event time: once
no event came into a partition for that long (by the wall time of the
watermarks), its watermark moves past the newest event it had, so the last
events of a burst are joined without waiting for the next one (what comes
later and is older is then late). Without it, only a later event or the end
of a bounded input moves time on.

While the agent handles a result, ``stream.current`` is the event behind it
(the one whose arrival made the match; for a result the watermark released,
an event of the result's key and partition at the last offset read there), so
``stream.state(table)`` in the loop acts on the result's key.

Late events (older than the partition's watermark minus ``wait``) go to
``late`` (``late.send(key, value)``) when given, else to the dead letters
with the reason; they count in the metric ``late_events``. Events without an
event time are dead letters where the join needs one.

Example (a join operator over a hand-made stream of tagged values):
    >>> import asyncio
    >>> from asyncflow.testing import stream_of
    >>> from asyncflow.joins.interval import IntervalJoinOperator
    >>> from asyncflow.codecs import JsonCodec
    >>> s = stream_of([(0, "a"), (1, "b")], keys=["k", "k"], times=[1_000, 1_500])
    >>> joined = JoinedStream(s, lambda: IntervalJoinOperator(lower=0, upper=1_000),
    ...                       codecs=(JsonCodec(), JsonCodec()), name="demo-join")
    >>> async def demo():
    ...     return [(j.key, j.left, j.right) async for j in joined]
    >>> asyncio.run(demo())
    [('k', 'a', 'b')]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Collection, Hashable
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar, cast

from asyncflow.codecs import Codec
from asyncflow.event import Event, Watermark
from asyncflow.joins.results import Item, Joined, pack, unpack
from asyncflow.keys import lane_of
from asyncflow.state.codec import decode_key, encode_key
from asyncflow.windows.assigners import from_epoch_ms
from asyncflow.windows.windowed import WindowSource

L = TypeVar("L")
R = TypeVar("R")


class LateSink(Protocol):
    """Where late events go when given as ``late=`` (an app topic or sink output fits).

    Example:
        >>> import asyncflow as af
        >>> from asyncflow.testing import CaptureSink
        >>> sink: LateSink = af.App("a").sink(CaptureSink("late"))
    """

    def send(self, key: Any, value: Any) -> Awaitable[Any]: ...


class JoinOperator(Protocol):
    """What ``JoinedStream`` drives (both join operators have it)."""

    results: list[Joined[Any, Any]]
    dirty: set[Hashable]
    watermark: int | None
    needs_time: bool

    def on_event(
        self, side: int, key: Hashable, time: int | None, seq: int, value: Any
    ) -> bool: ...

    def on_watermark(self, watermark: int | None) -> None: ...

    def set_watermark(self, watermark: int | None) -> None: ...

    def flush_all(self) -> None: ...

    def export(self) -> list[tuple[Hashable, list[Item] | None]]: ...

    def load(self, key: Hashable, items: list[Item]) -> None: ...


class JoinedStream(Generic[L, R]):
    """``Joined`` results of one lane of a join topic, as an async iterator.

    ``new_operator`` makes a partition's operator; ``codecs`` encode the two
    sides' values in state; ``wait`` is how far events may be out of order
    (the watermark is the partition's event time minus ``wait``); ``late``
    receives late events; ``name`` is the table the state is checkpointed as.

    Example (each ride with the driver's name as of the ride's time):
        >>> import asyncio, asyncflow as af
        >>> from asyncflow.testing import TestRun
        >>> app = af.App("taxi")
        >>> rides = app.topic("rides", key=lambda r: r["driver"], time="t")
        >>> drivers = app.topic("drivers", key=lambda d: d["id"], time="t")
        >>> j = af.join_table(rides, drivers, name="rd", how="left")
        >>> out = app.topic("named")
        >>> @app.agent(j.topic)
        ... async def name_rides(stream):
        ...     joined = j.joined(stream)
        ...     assert isinstance(joined, JoinedStream)
        ...     async for r in joined:
        ...         await out.send(r.key, [r.left["ride"], r.right and r.right["name"]])
        >>> async def main():
        ...     async with TestRun(app) as run:
        ...         await run.send_many("drivers", [{"id": "d1", "name": "Ann", "t": 0}])
        ...         await run.send_many("rides", [{"driver": "d1", "ride": 7, "t": 10},
        ...                                       {"driver": "d2", "ride": 8, "t": 11}])
        ...         await run.finish()
        ...         return sorted(run.outputs("named"))
        >>> asyncio.run(main())
        [[7, 'Ann'], [8, None]]
    """

    __slots__ = (
        "_codecs",
        "_ended",
        "_moved",
        "_quiet",
        "_read",
        "_rest",
        "_seen",
        "_wall",
        "_late",
        "_new",
        "_ops",
        "_ready",
        "_skip",
        "_stream",
        "_wait",
        "table",
    )

    def __init__(
        self,
        stream: WindowSource,
        new_operator: Callable[[], JoinOperator],
        *,
        codecs: tuple[Codec[Any], Codec[Any]],
        wait: timedelta = timedelta(0),
        late: LateSink | None = None,
        name: str = "join",
        system_wait: timedelta | None = None,
    ) -> None:
        if wait < timedelta(0):
            raise ValueError(f"wait must not be negative, got {wait!r}")
        if system_wait is not None and system_wait <= timedelta(0):
            raise ValueError(f"system_wait must be positive, got {system_wait!r}")
        self._quiet = None if system_wait is None else int(system_wait.total_seconds() * 1000)
        self._seen: dict[Hashable, tuple[int, int]] = {}  # newest time, wall when it came
        self._wall = 0
        self._stream = stream
        self._new = new_operator
        self._codecs = codecs
        self._wait = int(wait.total_seconds() * 1000)
        self._late = late
        self._ops: dict[Hashable, JoinOperator] = {}
        self._skip: dict[Hashable, int] = {}
        self._ready: deque[tuple[Joined[Any, Any], Event[Any]]] = deque()
        self._read: dict[Hashable, int] = {}  # per partition, the last offset read
        self._rest: tuple[list[Event[Any]], list[Any] | None, int] | None = None
        self._moved: dict[Hashable, list[bytes]] = {}  # entries of other lanes' keys, to drop
        self._ended = False
        self.table = name
        state = getattr(stream._lane, "state", None)
        if state is not None:
            state.register_window(self)

    # -- state --------------------------------------------------------------------
    async def _open(self, partition: Hashable) -> JoinOperator:
        """The operator of ``partition``, rebuilt from its restored state."""
        op = self._new()
        lane = self._stream._lane
        state = getattr(lane, "state", None)
        # (raises PartitionRevoked for a partition given up: then no operator is left for it)
        shard = None if state is None else await state.window_shard(self.table, partition)
        self._ops[partition] = op
        if shard is None:
            return op
        if shard.frontier is not None:
            op.set_watermark(shard.frontier - self._wait)
        codecs, index, lanes = self._codecs, lane.index, lane.lanes
        moved: list[bytes] = []
        for kb, vb in shard.store.items():  # this lane's keys: where the dispatcher sends them now
            stored, key = decode_key(kb)
            if lane_of(key, lanes) != index:
                continue
            op.load(key, unpack(vb, codecs))
            if stored != index:  # written by another lane (the lane count changed): move it
                moved.append(kb)
                op.dirty.add(key)
        if moved:
            self._moved[partition] = moved
        if shard.applied is not None:
            self._skip[partition] = shard.applied
            self._read[partition] = shard.applied
        return op

    def export(self) -> dict[Hashable, list[tuple[bytes, bytes | None]]]:
        """Per partition, the keys whose buffered items changed, encoded (a checkpoint)."""
        lane = self._stream._lane.index
        codecs = self._codecs
        out: dict[Hashable, list[tuple[bytes, bytes | None]]] = {}
        for p, op in self._ops.items():
            if op.dirty:
                out[p] = [
                    (encode_key((lane, key)), None if items is None else pack(items, codecs))
                    for key, items in op.export()
                ]
        for p, moved in self._moved.items():
            out.setdefault(p, []).extend((kb, None) for kb in moved)
        self._moved = {}
        return out

    @property
    def dirty(self) -> bool:
        """Whether any key's buffered items changed since the last export."""
        return bool(self._moved) or any(op.dirty for op in self._ops.values())

    def drop_partitions(self, partitions: Collection[Hashable]) -> None:
        """Forget revoked partitions (their state went with the checkpoint)."""
        for p in partitions:
            self._ops.pop(p, None)
            self._skip.pop(p, None)
            self._read.pop(p, None)
            self._seen.pop(p, None)
            self._moved.pop(p, None)

    def operator(self, partition: Hashable) -> JoinOperator | None:
        """The operator of a partition (for inspection and tests)."""
        return self._ops.get(partition)

    # -- iterating ----------------------------------------------------------------
    def __aiter__(self) -> JoinedStream[L, R]:
        return self

    async def __anext__(self) -> Joined[L, R]:
        ready = self._ready
        stream = self._stream
        while not ready:
            rest = self._rest
            if rest is not None:  # what followed an event whose late output raised
                self._rest = None
                await self._add(*rest)
                continue
            if self._ended:
                raise StopAsyncIteration
            try:
                got = await stream._next_events()
            except StopAsyncIteration:
                self._ended = True  # a stop keeps what waits in state; the end flushed it
                continue
            if type(got) is Watermark:
                await self._on_watermark(got)
                continue
            events, values = cast("tuple[list[Event[Any]], list[Any] | None]", got)
            await self._add(events, values, 0)
        result, event = ready.popleft()
        stream._window_key = result.key
        stream.current = event
        out: Joined[L, R] = result
        return out

    async def _add(self, events: list[Event[Any]], values: list[Any] | None, start: int) -> None:
        """Add a lane slice's events (from ``start``) to their partitions' operators.

        If sending an event to the late output or the dead letters raises, that
        event is the stream's current one (for the agent's error policy) and the
        events after it wait in ``_rest``: the next ``__anext__`` adds them first.
        """
        ops, skips, ready = self._ops, self._skip, self._ready
        if self._quiet is not None and start == 0:
            seen, wall = self._seen, self._wall
            for ev in events:
                t = ev.time
                if t is not None:
                    got = seen.get(ev.partition)
                    if got is None or t >= got[0]:
                        seen[ev.partition] = (t, wall)
                    else:
                        seen[ev.partition] = (got[0], wall)
        read = self._read
        for i in range(start, len(events)):
            ev = events[i]
            p = ev.partition
            op = ops.get(p)
            if op is None:
                op = await self._open(p)
            read[p] = ev.offset
            if skips and p in skips:
                if ev.offset <= skips[p]:
                    continue  # the restored state has this event already
                del skips[p]
            side, value = ev.value if values is None else values[i]
            t = ev.time
            try:
                if t is None and op.needs_time:
                    reason = "no event time: a join by event time needs it"
                    await self._stream.dead_letter(ev, reason)
                    continue
                if not op.on_event(side, ev.key, t, ev.offset, value):
                    await self._late_event(ev, value, op)
            except Exception:
                stream = self._stream
                stream.current = stream._held = ev
                if i + 1 < len(events):
                    self._rest = (events, values, i + 1)
                raise
            if op.results:
                ready.extend((r, ev) for r in op.results)
                op.results.clear()

    async def _on_watermark(self, mark: Watermark) -> None:
        if mark.wall > self._wall:
            self._wall = mark.wall
        if mark.marks:
            state = getattr(self._stream._lane, "state", None)
            for p in mark.marks:
                if p not in self._ops and state is not None:
                    ps = state.partition(p)
                    if ps is not None and ps.assigned:
                        await self._open(p)  # restored events may be due without new ones
        wait, ready = self._wait, self._ready
        for p, op in self._ops.items():
            if mark.final:
                op.flush_all()
            else:
                t = mark.of(p)
                if t is not None:
                    op.on_watermark(t - wait)
                quiet = self._quiet
                seen = self._seen.get(p)
                if quiet is not None and seen is not None and mark.wall - seen[1] >= quiet:
                    del self._seen[p]
                    op.on_watermark(seen[0] + 1)  # quiet for system_wait: nothing older to come
            if op.results:
                at = self._read.get(p, -1)
                ready.extend((r, Event(r.key, r.left, r.time, (), p, at)) for r in op.results)
                op.results.clear()

    async def _late_event(self, event: Event[Any], value: Any, op: JoinOperator) -> None:
        stream = self._stream
        stream.metrics.incr("late_events")
        if self._late is not None:
            stream.current = event
            await self._late.send(event.key, value)
            return
        wm = op.watermark
        assert event.time is not None
        await stream.dead_letter(
            event,
            f"late event: event time {from_epoch_ms(event.time).isoformat()} is before the "
            f"join's watermark {from_epoch_ms(wm).isoformat() if wm is not None else None}",
        )
