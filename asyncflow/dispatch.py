"""The dispatcher: decode raw batches, route events to lanes, pause what is full.

For each raw batch from a source partition the dispatcher decodes every record
with its channel's codec (a record that fails goes to the dead-letter output
with its raw bytes, position and reason), opens ack tracking for the batch
(one reference per consuming agent), hashes each key to a lane of every agent
and appends the events to those lanes' queues: one list per lane, no await.

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
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from asyncflow.acks import AckBatch, AckTracker
from asyncflow.channels import Channel
from asyncflow.clock import Clock
from asyncflow.errors import DecodeError
from asyncflow.event import Event, Watermark
from asyncflow.lanes import LaneQueue
from asyncflow.metrics import Metrics
from asyncflow.protocols import RawBatch, RawRecord, Source
from asyncflow.watermarks import PartitionWatermarks

log = logging.getLogger("asyncflow.dispatch")

DeadLetterRaw = Callable[[str, Hashable, RawRecord, str, AckBatch, int], None]


def lane_of(key: Hashable, lanes: int) -> int:
    """The lane a key goes to: the same key always to the same lane.

    Example:
        >>> 0 <= lane_of(("a", 1), 16) < 16
        True
    """
    return hash(key) % lanes


class Route:
    """One channel and the lane queues of every agent that consumes it."""

    __slots__ = ("channel", "consumers")

    def __init__(self, channel: Channel[Any], consumers: list[list[LaneQueue]]) -> None:
        self.channel = channel
        self.consumers = consumers


class Dispatcher:
    """Feeds one source's batches into lanes, with backpressure and watermarks."""

    def __init__(
        self,
        source: Source,
        routes: dict[str, Route],
        tracker: AckTracker,
        watermarks: PartitionWatermarks,
        clock: Clock,
        metrics: Metrics,
        dead_letter: DeadLetterRaw,
    ) -> None:
        self.source = source
        self.routes = routes
        self.tracker = tracker
        self.watermarks = watermarks
        self.clock = clock
        self.metrics = metrics
        self._dead_letter = dead_letter
        self._parked: dict[LaneQueue, deque[tuple[Hashable, list[Event[Any]]]]] = {}
        self._blocked: dict[Hashable, set[LaneQueue]] = {}
        self._pending_time: dict[Hashable, int] = {}
        self._all_lanes = [q for r in routes.values() for c in r.consumers for q in c]
        for q in self._all_lanes:
            q.on_room = self._on_room

    @property
    def lanes(self) -> list[LaneQueue]:
        """Every lane queue this dispatcher feeds."""
        return self._all_lanes

    @property
    def paused(self) -> frozenset[Hashable]:
        """Partitions paused because a lane is full."""
        return frozenset(self._blocked)

    def dispatch(self, batch: RawBatch) -> None:
        """Decode one raw batch and hand its events to their lanes (never blocks)."""
        records = batch.records
        if not records:
            return
        route = self.routes.get(batch.topic)
        if route is None:
            raise KeyError(f"no agent reads {batch.topic!r}; the source returned it anyway")
        ch = route.channel
        partition = batch.partition
        consumers = route.consumers
        acks = self.tracker.partition(partition).open(
            [r.offset for r in records], refs=len(consumers)
        )
        decode = ch.codec.decode
        key_fn = ch.key_fn
        key_decode = ch.key_codec.decode
        time_fn = ch.time_ms
        parts: list[list[list[Event[Any]]]] = [[[] for _ in c] for c in consumers]
        single = parts[0] if len(consumers) == 1 else None
        n_single = len(consumers[0])
        max_time: int | None = None
        for i, rec in enumerate(records):
            try:
                raw = rec.value
                if raw is None:
                    raise DecodeError("record has no value (tombstone)")
                value = decode(raw)
                if key_fn is not None:
                    key = key_fn(value)
                else:
                    kb = rec.key
                    key = None if kb is None else key_decode(kb)
                t = time_fn(value) if time_fn is not None else rec.timestamp
                h = hash(key)  # an unhashable key is this record's problem too
            except Exception as exc:  # noqa: BLE001 - any failure is this record's, not ours
                self._dead_letter(ch.name, partition, rec, _reason(exc), acks, i)
                for _ in consumers:
                    acks.release(i)
                continue
            ev = Event(key, value, t, rec.headers, partition, rec.offset, acks, i)
            if t is not None and (max_time is None or t > max_time):
                max_time = t
            if single is not None:
                single[h % n_single if n_single > 1 else 0].append(ev)
            else:
                for parts_c, lanes in zip(parts, consumers, strict=True):
                    parts_c[h % len(lanes)].append(ev)
        self.metrics.incr("events_in", len(records))
        blocked = self._blocked.get(partition)
        for parts_c, lanes in zip(parts, consumers, strict=True):
            for part, q in zip(parts_c, lanes, strict=True):
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
        if max_time is not None:
            if blocked:
                prev = self._pending_time.get(partition)
                self._pending_time[partition] = max_time if prev is None else max(prev, max_time)
            else:
                self.watermarks.observe(partition, max_time, self.clock.wall_ms())

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

    def broadcast_watermark(self, final: bool = False) -> None:
        """Send the current watermark (with the wall time) into every lane.

        ``final`` marks the end of a bounded input; send it only once nothing is parked.
        """
        wall = self.clock.wall_ms()
        for p in self._blocked:  # paused for backpressure is not idle: keep holding the mark
            self.watermarks.observe(p, None, wall)
        mark = Watermark(self.watermarks.current(wall), wall, final=final)
        for q in self._all_lanes:
            q.put_watermark(mark)

    def revoke(self, partitions: Sequence[Hashable]) -> None:
        """Forget parked events and watermark state of partitions given up."""
        gone = set(partitions)
        for q, parked in list(self._parked.items()):
            for p, part in parked:
                if p in gone:
                    for ev in part:  # never delivered: uncommitted, but no longer in flight
                        ev.abandon()
            keep = deque((p, part) for p, part in parked if p not in gone)
            if keep:
                self._parked[q] = keep
            else:
                del self._parked[q]
        for p in gone:
            self._blocked.pop(p, None)
            self._pending_time.pop(p, None)
            self.watermarks.revoke(p)

    def abandon_parked(self) -> int:
        """Stopping: parked parts stay undelivered and uncommitted; returns their events."""
        n = 0
        for parked in self._parked.values():
            for _, part in parked:
                for ev in part:
                    ev.abandon()
                n += len(part)
        self._parked.clear()
        self._blocked.clear()
        self._pending_time.clear()
        return n

    def assign(self, partitions: Sequence[Hashable]) -> None:
        for p in partitions:
            self.watermarks.assign(p)

    def close_lanes(self) -> None:
        """End of input: lanes finish once they have drained."""
        for q in self._all_lanes:
            q.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DecodeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"

