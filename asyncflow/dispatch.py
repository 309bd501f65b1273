"""The dispatcher: decode raw batches, route events to lanes, pause what is full.

For each raw batch from a source partition the dispatcher decodes every record
with its channel's codec (a record that fails goes to the dead-letter output
with its raw bytes, position and reason), hashes each key to a lane of every
agent and appends the events to those lanes' queues: one list per lane, no
await. An event time further ahead than ``max_time_ahead`` of both the
partition's event time and the wall clock is a dead letter too: one bad clock
must not stall a partition's windows for good.

The dispatcher works on a batch's columns (offsets, keys, values, times,
headers side by side): a source that keeps its records so (the memory broker)
hands them as ``RawBatch.columns``, any other batch is read into columns once
(``RawColumns.of``). Record objects are read only on the slow paths (poison,
a restore's skip, repartition markers, tracing).

Values nothing routes on (one agent reads the topic, keys and event times
come from the records themselves, the lanes take columns) are not decoded
here: the lanes get them as read and decode a slice when they take it from
their queue (``asyncflow.raw_values``); their poison is a dead letter when
the lane reaches it.

For checkpoints it keeps, per partition, the *cut*: the offset up to which
every record read is in a lane queue (``cut``). Records the restored state
already reflects (a replay after a crash) are dropped before decoding.

A lane without room gets nothing more from that partition: the part is parked,
the partition is paused at the source, and both resume when the lane drains.
The partition's event time counts towards the watermark only once all its
events are in their lanes, so a watermark never overtakes an event read
before it. Watermarks go into every lane in order with the data.

Example (the dispatcher's routing rule):
    >>> lane_of("sensor-7", lanes=8) == lane_of("sensor-7", lanes=8)
    True
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Collection, Hashable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from itertools import repeat
from typing import Any, cast

from asyncflow.channels import Channel
from asyncflow.clock import Clock
from asyncflow.event import Event, Watermark
from asyncflow.keys import (  # noqa: F401 - lane_of: the routing rule, re-exported
    HashCache,
    KeyOfRawCache,
    LaneCache,
    RawKeyCache,
    key_hash,
    lane_of,
)
from asyncflow.lanes import LaneQueue, positions
from asyncflow.metrics import Metrics
from asyncflow.observe.traces import read_span
from asyncflow.protocols import RawBatch, RawColumns, RawRecord, Source
from asyncflow.raw_values import (
    DeadLetterRaw,
    ValueDecoder,
    can_decode_in_lane,
    decode_reason,
    decode_value,
)
from asyncflow.repartition import KeySpread, RepartitionMarks
from asyncflow.slices import Headers, LaneSlice
from asyncflow.watermarks import PartitionWatermarks
from asyncflow.writer import SinkWriter

log = logging.getLogger("asyncflow.dispatch")

READ_LOG_MAX = 4096
"""Batches remembered per partition for the processing-latency histogram (older ones go)."""


Part = list[Event[Any]] | LaneSlice
"""What a lane gets of a batch: its events, or its columns (a lane that takes them)."""


class Route:
    """One channel and the lane queues of every agent that consumes it.

    ``marks`` reads the watermark markers of a repartition topic (its event
    time comes from them, not from its records); ``spread`` watches, for a
    channel keyed by its values, for one key on two partitions.
    """

    __slots__ = ("agents", "channel", "consumers", "hashes", "in_keys", "key_of_raw", "lanes",
                 "marks", "raw_keys", "spread")

    def __init__(
        self,
        channel: Channel[Any],
        consumers: list[list[LaneQueue]],
        agents: Sequence[str] = (),
    ) -> None:
        self.channel = channel
        self.consumers = consumers
        self.agents = list(agents) or [f"agent-{i}" for i in range(len(consumers))]
        """The agents' names, one per entry of ``consumers`` (metrics labels)."""
        self.in_keys = [(channel.name, a) for a in self.agents]
        """The ``(topic, agent)`` label values of ``events_in`` (made once)."""
        self.raw_keys = RawKeyCache(channel.key_codec.decode)  # record keys: decoded once
        self.key_of_raw = KeyOfRawCache(self.raw_keys)
        self.hashes = HashCache()  # keys from the channel's key function: hashed once
        self.lanes: LaneCache | None = None
        """With one agent reading the channel: each key's lane (raw keys, or the key function's)."""
        if len(consumers) == 1:
            raw_keys = self.raw_keys
            self.lanes = LaneCache(
                key_hash if channel.key_fn is not None else lambda raw: raw_keys[raw][1],
                len(consumers[0]),
            )
        app = channel._app
        idle = app.idle_timeout if app is not None else None
        repartitioned = channel.repartitioned_from is not None
        self.marks = RepartitionMarks(idle) if repartitioned else None
        watch = channel.key_fn is not None and not repartitioned and not channel.repartitioned_into
        self.spread = KeySpread(channel.name, "key function") if watch else None


class Dispatcher:
    """Feeds one source's batches into lanes, with backpressure, watermarks and cuts.

    A lane gets its part of a batch as a ``LaneSlice`` unless its consumer
    has said it works on events (``LaneQueue.takes_columns`` is ``False``: a
    chain with ``key_by``, ``stateful_map`` or async steps); then, and for a
    topic read by two agents, it gets events. A lane whose consumer has not
    asked yet gets columns, which any consumer reads.
    """

    def __init__(
        self,
        source: Source,
        routes: dict[str, Route],
        watermarks: PartitionWatermarks,
        clock: Clock,
        metrics: Metrics,
        dead_letter: DeadLetterRaw,
        *,
        max_time_ahead_ms: int | None = None,
        dead_letters_out: SinkWriter | None = None,
    ) -> None:
        self.source = source
        self.routes = routes
        self.watermarks = watermarks
        self.clock = clock
        self.metrics = metrics
        self.max_time_ahead_ms = max_time_ahead_ms
        self._dead_letter = dead_letter
        self._parked: dict[LaneQueue, deque[tuple[Hashable, Part]]] = {}
        self._blocked: dict[Hashable, set[LaneQueue]] = {}
        self._pending_time: dict[Hashable, int] = {}
        self._read_to: dict[Hashable, int] = {}
        self._dropped_from: dict[Hashable, int] = {}
        self._skip_to: dict[Hashable, int] = {}
        self._closed: set[Hashable] = set()
        self._all_lanes = [q for r in routes.values() for c in r.consumers for q in c]
        self.tracer: Any = None
        """An OpenTelemetry tracer (``asyncflow.observe.traces``) or ``None``: no spans."""
        self.read_log: dict[Hashable, deque[tuple[int, float, int]]] = {}
        """Per partition, one ``(last offset, monotonic time read, records)`` per batch not yet
        committed: the checkpointer turns them into the processing-latency histogram."""
        for q in self._all_lanes:
            q.on_room = self._on_room
        self._in_lane: dict[str, ValueDecoder] = {
            name: ValueDecoder(r.channel, dead_letter, dead_letters_out)
            for name, r in routes.items()
            if len(r.consumers) == 1 and r.lanes is not None and can_decode_in_lane(r.channel)
        }
        """Per route whose values nothing routes on (one agent, keys and times from the
        records): what its lanes decode its values with, in the lane (``raw_values``)."""

    @property
    def lanes(self) -> list[LaneQueue]:
        """Every lane queue this dispatcher feeds."""
        return self._all_lanes

    @property
    def read_to(self) -> dict[Hashable, int]:
        """Per partition, the last offset read (for lag and progress)."""
        return dict(self._read_to)

    @property
    def paused(self) -> frozenset[Hashable]:
        """Partitions paused because a lane is full."""
        return frozenset(self._blocked)

    def dispatch(self, batch: RawBatch) -> None:
        """Decode one raw batch and hand its events to their lanes (never blocks)."""
        records = batch.records
        if not records:
            return
        partition = batch.partition
        if partition in self._closed:
            return  # read just before a revoke: the partition's next owner replays it
        route = self.routes.get(batch.topic)
        if route is None:
            raise KeyError(f"no agent reads {batch.topic!r}; the source returned it anyway")
        self._read_to[partition] = records[-1].offset
        read_log = self.read_log.get(partition)
        if read_log is None:
            read_log = self.read_log[partition] = deque(maxlen=READ_LOG_MAX)
        read_log.append((records[-1].offset, time.monotonic(), len(records)))
        if self.tracer is not None:
            read_span(self.tracer, batch.topic, partition, records)
        cols = batch.columns  # the records by column, if the source keeps them so
        marks = route.marks
        marked: int | None = None
        if marks is not None:  # a repartition topic: its markers say how far event time is
            # (markers the restored state has read past still say it: taken before the skip)
            data, marked = marks.take(partition, records, self.clock.wall_ms(),
                                      None if cols is None else cols.keys)
            if data is not records:
                records, cols = data, None
        skip = self._skip_to.get(partition)
        if skip is not None and records:
            if records[-1].offset <= skip:
                records = ()
            else:
                records, cols = [r for r in records if r.offset > skip], None
                del self._skip_to[partition]
        if not records:
            if marked is not None:
                self._advance(partition, marked, self._blocked.get(partition))
            return
        ch = route.channel
        consumers = route.consumers
        limit = self._time_limit(partition)
        parts: list[list[list[Event[Any]]]] = [[[] for _ in c] for c in consumers]
        columns: list[tuple[int, LaneSlice]] = []  # (lane, its records) handed as columns
        max_time: int | None = None
        if cols is None:
            cols = RawColumns.of(records)
        decoder = self._in_lane.get(batch.topic)
        if decoder is not None and not all(q.takes_columns is not False for q in consumers[0]):
            decoder = None  # a lane that takes events gets them decoded
        fast = self._decode_all(route, cols, decoder is not None)
        if fast is not None:
            values, keys, key_of, where, times = fast
            try:
                max_time = max(cast("list[int]", times))
            except TypeError:  # some records have no event time
                known = [t for t in times if t is not None]
                max_time = max(known) if known else None
            if route.spread is not None:
                route.spread.observe(partition, keys[0] if key_of is None else key_of[keys[0]])
        if fast is None or (limit is not None and max_time is not None and max_time > limit):
            # poison in the batch, or an event time too far ahead: record by record
            max_time = self._decode_each(ch, partition, records, limit, parts, consumers)
        elif len(consumers) == 1:  # the common case: one agent reads the topic
            lane_parts = parts[0]
            lane = where[0]  # where[i]: record i's lane
            spread = where.count(lane) != len(where)  # the batch's keys go to several lanes
            queues = consumers[0]
            offsets, headers = cols.offsets, cols.headers
            if (all(q.takes_columns is not False for q in queues) if spread
                    else queues[lane].takes_columns is not False):
                columns = (
                    _split_columns(partition, len(lane_parts), where, keys, values, times,
                                   offsets, headers, key_of, decoder)
                    if spread
                    else [(lane, LaneSlice(partition, keys, values, times, offsets, headers,
                                           key_of, decoder))]
                )
            else:  # the consumers take events: their keys decoded now
                if key_of is not None:
                    keys = list(map(key_of.__getitem__, keys))
                if spread:
                    appends = [part.append for part in lane_parts]
                    for value, key, i, t, h, offset in zip(values, keys, where, times,
                                                           _headers_of(cols), offsets,
                                                           strict=True):
                        appends[i](Event(key, value, t, h, partition, offset))
                else:  # all to one lane
                    lane_parts[lane] = [
                        Event(key, value, t, h, partition, offset)
                        for value, key, t, h, offset in zip(values, keys, times,
                                                            _headers_of(cols), offsets,
                                                            strict=True)
                    ]
        else:
            for value, key, h, t, hs, offset in zip(values, keys, where, times, _headers_of(cols),
                                                    cols.offsets, strict=True):
                ev = Event(key, value, t, hs, partition, offset)
                for parts_c in parts:
                    parts_c[h % len(parts_c)].append(ev)
        self.metrics.incr("events_in", len(records))
        incr_labeled = self.metrics.incr_labeled
        for labels in route.in_keys:
            incr_labeled("events_in", labels, len(records))
        blocked = self._blocked.get(partition)
        handed = cast("list[list[Part]]", parts)
        for lane, lane_slice in columns:
            handed[0][lane] = lane_slice
        for handed_c, lanes in zip(handed, consumers, strict=True):
            for part, q in zip(handed_c, lanes, strict=True):
                if not part:
                    continue
                if q in self._parked or not q.has_room(len(part)):
                    self._parked.setdefault(q, deque()).append((partition, part))
                    if blocked is None:
                        blocked = self._blocked[partition] = set()
                        self.source.pause([partition])
                        self.metrics.incr("partition_pauses")
                    blocked.add(q)
                else:
                    q.put(part)
        if marks is not None:
            max_time = marked
        if max_time is not None:
            self._advance(partition, max_time, blocked)

    def _advance(self, partition: Hashable, t: int, blocked: set[LaneQueue] | None) -> None:
        """The partition has reached event time ``t`` (held while it waits for a full lane)."""
        if blocked:
            prev = self._pending_time.get(partition)
            self._pending_time[partition] = t if prev is None else max(prev, t)
        else:
            self.watermarks.observe(partition, t, self.clock.wall_ms())

    def _decode_all(
        self, route: Route, cols: RawColumns, in_lane: bool = False
    ) -> tuple[
        list[Any], Sequence[Any], KeyOfRawCache | None, list[int], Sequence[int | None]
    ] | None:
        """Decode a batch one step at a time: values, keys, ``key_of``, where each goes, times.

        With ``in_lane`` the values stay raw (the lane decodes them: nothing
        here needs them). Where a record goes is its lane when one agent reads the route
        (``Route.lanes``), else its key's hash. Keys taken from the records'
        own keys come raw when one agent reads the route (``key_of[raw]``
        decodes one: a lane that never reads them costs no lookup); finding
        their lanes has decoded each, so a key that does not decode has failed
        the batch here already. ``None`` if any record fails: the batch then
        goes through ``_decode_each``, which finds the poison. Keys repeat in a
        stream, so they are decoded, hashed and given a lane once
        (``RawKeyCache``, ``KeyOfRawCache``, ``HashCache``, ``LaneCache``).
        """
        ch = route.channel
        decode_many = getattr(ch.codec, "decode_many", None)
        if decode_many is None:
            return None
        try:
            values = cast("list[Any]", cols.values) if in_lane else decode_many(cols.values)
            key_fn = ch.key_fn
            lanes = route.lanes
            key_of: KeyOfRawCache | None = None
            keys: Sequence[Any]
            if key_fn is not None:
                keys = list(map(key_fn, values))
                where = list(map((route.hashes if lanes is None else lanes).__getitem__, keys))
            elif lanes is not None:
                keys, key_of = cols.keys, route.key_of_raw
                where = list(map(lanes.__getitem__, keys))
            else:
                keys = list(map(route.key_of_raw.__getitem__, cols.keys))
                raw_keys = route.raw_keys
                where = [raw_keys[r][1] for r in cols.keys]
            time_fn = ch.time_ms
            if time_fn is not None:
                times: Sequence[int | None] = list(map(time_fn, values))
            else:
                times = cols.timestamps
        except Exception:  # noqa: BLE001 - some record is poison: find it record by record
            return None
        return values, keys, key_of, where, times

    def _decode_each(
        self,
        ch: Channel[Any],
        partition: Hashable,
        records: Sequence[RawRecord],
        limit: int | None,
        parts: list[list[list[Event[Any]]]],
        consumers: list[list[LaneQueue]],
    ) -> int | None:
        """Decode record by record, each failure a dead letter with its reason; the max time.

        A record whose value or key does not decode still counts its broker
        timestamp (when the topic's event time is that) toward the partition's
        event time, as it does when a lane decodes a slice's values: the log has
        passed it either way, whichever path its batch took.
        """
        decode = ch.codec.decode
        key_fn = ch.key_fn
        key_decode = ch.key_codec.decode
        time_fn = ch.time_ms
        max_time: int | None = None
        for rec in records:
            try:
                value = decode_value(decode, rec.value)
                if key_fn is not None:
                    key = key_fn(value)
                else:
                    kb = rec.key
                    key = None if kb is None else key_decode(kb)
                t = time_fn(value) if time_fn is not None else rec.timestamp
                h = key_hash(key)  # an unhashable key is this record's problem too
            except Exception as exc:  # noqa: BLE001 - any failure is this record's, not ours
                self._dead_letter(ch.name, partition, rec, decode_reason(exc))
                t = rec.timestamp if time_fn is None else None
                if (t is not None and (limit is None or t <= limit)
                        and (max_time is None or t > max_time)):
                    max_time = t
                continue
            if t is not None and limit is not None and t > limit:
                self.metrics.incr("future_events")
                self._dead_letter(ch.name, partition, rec, self._future_reason(ch, t, limit))
                continue
            ev = Event(key, value, t, rec.headers, partition, rec.offset)
            if t is not None and (max_time is None or t > max_time):
                max_time = t
            for parts_c, lanes in zip(parts, consumers, strict=True):
                parts_c[h % len(lanes)].append(ev)
        return max_time

    def _time_limit(self, partition: Hashable) -> int | None:
        ahead = self.max_time_ahead_ms
        if ahead is None:
            return None
        base = max(self.clock.wall_ms(), time.time_ns() // 1_000_000)  # a test clock may lag
        frontier = self.watermarks.frontier(partition)
        if frontier is not None and frontier > base:
            base = frontier
        return base + ahead

    def _future_reason(self, ch: Channel[Any], t: int, limit: int) -> str:
        ahead = self.max_time_ahead_ms or 0
        return (
            f"event time {_iso(t)} in field {ch.time_field!r} is more than "
            f"{timedelta(milliseconds=ahead)} ahead of the partition's event time and the "
            f"wall clock (limit {_iso(limit)}); raise max_time_ahead "
            "(ASYNCFLOW_MAX_TIME_AHEAD) if such times are real"
        )

    def _on_room(self, q: LaneQueue) -> None:
        parked = self._parked.get(q)
        if not parked:
            return
        while parked and q.has_room(len(parked[0][1])):
            partition, part = parked.popleft()
            q.put(part)
            if not any(p == partition for p, _ in parked):
                waiting = self._blocked.get(partition)
                if waiting is not None:
                    waiting.discard(q)
                    if not waiting:
                        self._unblock(partition)
        if not parked:
            del self._parked[q]

    def _unblock(self, partition: Hashable) -> None:
        del self._blocked[partition]
        self.source.resume([partition])
        t = self._pending_time.pop(partition, None)
        if t is not None:
            self.watermarks.observe(partition, t, self.clock.wall_ms())

    @property
    def has_parked(self) -> bool:
        """Whether events wait for room in a full lane."""
        return bool(self._parked)

    def broadcast_watermark(self, final: bool = False) -> dict[Hashable, int | None]:
        """Send the current watermark (with the wall time) into every lane; returns its marks.

        ``final`` marks the end of a bounded input; send it only once nothing is parked.
        """
        wall = self.clock.wall_ms()
        watermarks = self.watermarks
        for p in self._blocked:  # paused for backpressure is not idle: keep holding the mark
            watermarks.observe(p, None, wall)
        marks = watermarks.marks(wall)
        mark = Watermark(watermarks.current(wall), wall, final=final, marks=marks)
        for q in self._all_lanes:
            q.put_watermark(mark)
        return marks

    def cut(self) -> dict[Hashable, int]:
        """Per partition, the offset up to which every record read is in a lane queue.

        Records parked for a full lane, or taken back from the lanes
        (``take_back``), and everything after them, are beyond the cut.
        """
        cut = dict(self._read_to)
        for parked in self._parked.values():
            for p, part in parked:
                first = (part.first_offset if type(part) is LaneSlice else part[0].offset) - 1
                if first < cut.get(p, first + 1):
                    cut[p] = first
        for p, first in self._dropped_from.items():
            if p in cut and first - 1 < cut[p]:
                cut[p] = first - 1
        return {p: o for p, o in cut.items() if o >= 0}

    def take_back(self, partitions: Collection[Hashable] | None = None) -> int:
        """Take the events no lane has started out of the queues and the parked parts.

        For a revoke (``partitions``) or a stop (all): they are beyond the cut
        from now on, so they are replayed by whoever reads the partition next.
        Returns how many there were.
        """
        def gone(p: Hashable) -> bool:
            return partitions is None or p in partitions

        dropped: list[tuple[Hashable, int]] = []  # (partition, offset): nothing decoded for it
        for q in self._all_lanes:
            dropped.extend(q.drop_partitions(gone))
        for q, parked in list(self._parked.items()):
            keep: deque[tuple[Hashable, Part]] = deque()
            for p, part in parked:
                if gone(p):
                    dropped.extend(positions(part))
                else:
                    keep.append((p, part))
            if keep:
                self._parked[q] = keep
            else:
                del self._parked[q]
        for p in list(self._blocked):
            if gone(p):
                del self._blocked[p]
                self._pending_time.pop(p, None)
        for p, offset in dropped:
            first = self._dropped_from.get(p)
            if first is None or offset < first:
                self._dropped_from[p] = offset
        if partitions is not None:
            self._closed.update(partitions)
        return len(dropped)

    def assign(
        self, partition: Hashable, *, skip_to: int | None = None, frontier: int | None = None
    ) -> None:
        """Start reading a partition whose state is restored (``skip_to``: offsets it reflects)."""
        self._closed.discard(partition)
        self._read_to.pop(partition, None)
        self._dropped_from.pop(partition, None)
        self.watermarks.restore(partition, frontier)
        if skip_to is not None:
            self._skip_to[partition] = skip_to

    def forget(self, partitions: Collection[Hashable]) -> None:
        """Partitions given up after their last checkpoint: no more reads, cuts or watermarks."""
        for p in partitions:
            self._closed.add(p)
            self._read_to.pop(p, None)
            self._dropped_from.pop(p, None)
            self._skip_to.pop(p, None)
            self._blocked.pop(p, None)
            self._pending_time.pop(p, None)
            self.read_log.pop(p, None)
            self.watermarks.revoke(p)
            for route in self.routes.values():
                if route.marks is not None:
                    route.marks.forget(p)

    def close_lanes(self) -> None:
        """End of input: lanes finish once they have drained."""
        for q in self._all_lanes:
            q.close()


def _headers_of(cols: RawColumns) -> Iterable[Headers]:
    """The batch's headers column, ``()`` for each record when none has any."""
    return repeat((), len(cols.values)) if cols.headers is None else cols.headers


def _split_columns(
    partition: Hashable,
    n: int,
    lanes_of: list[int],
    keys: Sequence[Any],
    values: list[Any],
    times: Sequence[int | None],
    offsets: Sequence[int],
    headers: Sequence[Headers] | None,
    key_of: KeyOfRawCache | None = None,
    decoder: ValueDecoder | None = None,
) -> list[tuple[int, LaneSlice]]:
    """A batch's columns split by lane (``lanes_of[i]`` is record ``i``'s), order kept.

    ``key_of``: the keys are raw, and each slice decodes its own when read;
    ``decoder``: the values are raw, and each slice decodes its own likewise.
    """
    ks: list[list[Any]] = [[] for _ in range(n)]
    vs: list[list[Any]] = [[] for _ in range(n)]
    ts: list[list[int | None]] = [[] for _ in range(n)]
    os: list[list[int]] = [[] for _ in range(n)]
    for i, key, value, t, offset in zip(lanes_of, keys, values, times, offsets, strict=True):
        ks[i].append(key)
        vs[i].append(value)
        ts[i].append(t)
        os[i].append(offset)
    hs: list[list[Headers]] | None = None
    if headers is not None:
        hs = [[] for _ in range(n)]
        for i, h in zip(lanes_of, headers, strict=True):
            hs[i].append(h)
    return [
        (i, LaneSlice(partition, ks[i], vs[i], ts[i], os[i], None if hs is None else hs[i],
                      key_of, decoder))
        for i in range(n)
        if vs[i]
    ]



def _iso(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat()
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms since the epoch"
