"""Repartitioning: re-key a stream through an internal topic, so one key lives on one worker.

Windows and keyed state are kept per partition. When an agent keys events by
a field of the value (``key=lambda r: r.sensor_id``) but the producers keyed
the records by something else (or by nothing), the events of one key arrive
on several partitions, and with several workers each worker sees part of each
key: every window is computed twice from halves. ``topic.repartition(...)``
fixes that the way Kafka Streams' ``repartition`` and Quix Streams'
``group_by`` do: a forwarding agent (``<name>-repartition``) writes every
event to the internal topic ``<app>-<name>-repartition``, keyed by the new
key, so the broker's partitioner puts every record of a key in one partition;
agents read that topic instead.

What a forwarded record carries: the value, encoded again with the source's
codec; the new key (``repartition_key_bytes``: text as UTF-8, other values as
JSON); the event's headers; and its event time as the record's timestamp, so
the downstream event time is the upstream one whatever the source read it
from. A value whose key function raises (or returns ``None``) is a dead letter
with the reason, and the forwarder goes on.

Delivery: the source's offsets are committed only once the forwarded records
are durable in the internal topic (the usual checkpoint: outputs flushed,
then offsets), so a crash duplicates forwarded records at worst, never loses
them. Each forwarded record carries its origin (header ``asyncflow.origin`` =
``<source partition>:<source offset>``, the last header), and the agents that
read the internal topic drop a copy whose origin their key has applied
already (``drop_replayed``, with the table ``<name>-repartition-seen``): windows
and state downstream count every source event once across crashes.

Event time after a repartition: the records of one internal partition come
from every source partition, each read at its own pace (by other workers,
too), so their event times are interleaved out of order. The watermark
travels with them, as Flink's does between operators: after each slice the
forwarder writes a marker into every partition of the internal topic (a record
without a key; header ``asyncflow.watermark`` = ``<source partition>/<source
partition count>``, value = the largest event time forwarded from that source
partition), and each internal partition's event time is the smallest over the
source partitions' markers (``RepartitionMarks``; a source partition with no
marker for ``idle_timeout`` is left out, like an idle partition). So a window
downstream closes only once every source partition has been forwarded past
it, and no event of it is late for being read later than another partition.
The forwarder also re-sends its markers on a heartbeat (``heartbeat_interval``),
so a worker that takes an internal partition over, reading on past the
markers its previous owner saw, soon knows how far every source partition is.

``KeySpread`` notices the mistake a repartition fixes: one key seen on two
partitions of a topic whose keys come from its values.

Example:
    >>> import asyncflow as af, asyncio
    >>> app = af.App("shop", broker="memory://")
    >>> orders = app.topic("orders", partitions=2)       # records keyed at random
    >>> by_user = orders.repartition("by-user", key=lambda o: o["user"])
    >>> by_user.name, by_user.spec.partitions_like
    ('shop-by-user-repartition', 'orders')
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from asyncflow.codecs import RIGHT_SIZED
from asyncflow.protocols import RawRecord, SinkRecord, TopicSpec
from asyncflow.watermarks import PartitionWatermarks

if TYPE_CHECKING:
    from asyncflow.app import App
    from asyncflow.channels import Channel, Topic
    from asyncflow.event import Event
    from asyncflow.state.keyed import KeyedState
    from asyncflow.stream import Stream

log = logging.getLogger("asyncflow.repartition")

_JSON_KEY_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS | RIGHT_SIZED
MARK_HEADER = "asyncflow.watermark"
"""The header of a watermark marker in a repartition topic: ``<source>/<source count>``."""
ORIGIN_HEADER = "asyncflow.origin"
"""The last header of a forwarded record: ``<source partition>:<source offset>``."""


def repartition_key_bytes(key: Any) -> bytes:
    """The record key a repartition writes for ``key``: what the partitioner hashes.

    Text is its UTF-8 bytes (what another client keying by the same string
    writes), bytes stay as they are, anything else is its JSON (a tuple as a
    list, a dict with sorted keys), so equal keys always give equal bytes.

    Example:
        >>> repartition_key_bytes("s-1"), repartition_key_bytes(7), repartition_key_bytes(("a", 2))
        (b's-1', b'7', b'["a",2]')
    """
    if type(key) is str:
        return key.encode()
    if type(key) is bytes:
        return key
    if key is None:
        raise ValueError("the repartition key is None: every event needs a key to be routed by")
    # right-sized: orjson's own result keeps a ~4 KB allocation alive behind it, per record
    return orjson.dumps(key, option=_JSON_KEY_OPTIONS)[:-1]


def internal_topic_name(app_id: str, name: str) -> str:
    """The internal topic of repartition ``name`` of app ``app_id``.

    Example:
        >>> internal_topic_name("sensors", "by-sensor")
        'sensors-by-sensor-repartition'
    """
    return f"{app_id}-{name}-repartition"


def repartition(
    app: App,
    source: Channel[Any],
    name: str,
    key: Callable[[Any], Hashable],
    *,
    partitions: int | None = None,
) -> Topic[Any]:
    """Declare the internal topic and the forwarding agent of ``source.repartition(...)``.

    Returns the internal topic: its events are ``source``'s values, keyed by
    ``key``, with ``source``'s event time. ``partitions`` defaults to the
    source topic's partition count (the count it has on the broker when it
    exists there); a source that is not a broker topic needs it given.

    Example:
        >>> import asyncflow as af
        >>> app = af.App("a")
        >>> t = repartition(app, app.topic("in", partitions=3), "by-x", key=lambda v: v["x"])
        >>> t.key_of({"x": 1}), sorted(app.agents)
        (1, ['by-x-repartition'])
    """
    from asyncflow.channels import Topic
    from asyncflow.errors import ConfigError

    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(
            f"repartition name {name!r} is not usable in a topic name; "
            "use letters, digits, '-', '_' or '.'"
        )
    if not callable(key):
        raise ConfigError(f"repartition {name!r}: key= must be a function of the value")
    if partitions is not None and (type(partitions) is not int or partitions < 1):
        raise ConfigError(
            f"repartition {name!r}: partitions={partitions!r} is not allowed; "
            "give a whole number of at least 1 (or leave it out for the source's count)"
        )
    if partitions is None and not isinstance(source, Topic):
        raise ConfigError(
            f"repartition {name!r} of the external source {source.name!r} needs partitions=N: "
            "how many partitions its internal topic gets"
        )
    topic_name = internal_topic_name(app.id, name)
    agent_name = f"{name}-repartition"
    if topic_name in app.channels or agent_name in app.agents:
        raise ConfigError(f"a repartition named {name!r} is already declared in app {app.id!r}")
    topic: Topic[Any] = Topic(
        topic_name,
        value_type=source.value_type,
        codec=source.codec,
        key=key,
        key_codec=source.key_codec,
        app=app,
    )
    # the value passes through unchanged, so its event time is read the same way; a
    # source timed by record timestamps gets them from the forwarded records
    topic.time_ms = source.time_ms
    topic.time_field = source.time_field
    like = source.name if partitions is None else None
    count = partitions if partitions is not None else source.spec.partitions
    topic.spec = TopicSpec(topic_name, partitions=count, partitions_like=like)
    topic.repartitioned_from = source.name
    # per key, the last source offset applied from each source partition: what drops the
    # records a restarted forwarder sends again (checkpointed with the readers' offsets)
    topic.replay_guard = app.table(f"{name}-repartition-seen", default=None)
    source.repartitioned_into = (*source.repartitioned_into, topic_name)
    app.channels[topic_name] = topic
    # one lane: the markers of a source partition must follow all of its forwarded events
    fwd = Forwarder(app, source.name, topic, key, name)
    forward = fwd.forward
    app.agent(source, sink=topic, name=agent_name)(forward)
    heartbeat = fwd.heartbeat
    app.timer(heartbeat_interval(app.idle_timeout))(heartbeat)
    return topic


def heartbeat_interval(idle_timeout: float | None) -> float:
    """Seconds between marker heartbeats: a quarter of the idle timeout, within 0.2–2 s.

    Example:
        >>> heartbeat_interval(10.0), heartbeat_interval(0.1), heartbeat_interval(None)
        (2.0, 0.2, 2.0)
    """
    if idle_timeout is None:
        return 2.0
    return min(2.0, max(0.2, idle_timeout / 4))


class Forwarder:
    """The forwarding agent of a repartition, and the heartbeat of its watermark markers.

    ``forward`` is the agent function: whole lane slices at a time, each event
    written to ``topic`` keyed by ``key`` with its origin header; an event
    whose key cannot be computed is a dead letter naming the repartition and
    the reason. After each slice, a marker for every source partition the
    slice came from goes to every partition of ``topic`` (``markers``).
    ``heartbeat`` (an app timer) sends the markers of every source partition
    again: a worker that takes an internal partition over reads on from the
    committed offset, past the markers its previous owner had seen, and learns
    from the next heartbeat how far each source partition is.

    Example:
        >>> import asyncflow as af
        >>> app = af.App("a")
        >>> fwd = Forwarder(app, "in", app.topic("out"), key=lambda v: v, name="x")
        >>> import inspect; inspect.iscoroutinefunction(fwd.forward)
        True
    """

    def __init__(
        self,
        app: App,
        source: str,
        topic: Topic[Any],
        key: Callable[[Any], Hashable],
        name: str,
    ) -> None:
        self.app = app
        self.source = source
        self.topic = topic
        self.key = key
        self.name = name
        self.forwarded: dict[Hashable, int] = {}  # per source partition, the largest time sent
        self.finished = False  # the lane has read its input to the end
        self._counts: tuple[int, int] | None = None  # (source partitions, internal partitions)

    async def _markers(self, times: dict[Hashable, int]) -> list[SinkRecord]:
        if self._counts is None:
            self._counts = await partition_counts(self.app, self.source, self.topic)
        return markers(self.topic.name, times, *self._counts)

    async def forward(self, stream: Stream[Any]) -> None:
        """The agent function (one lane)."""
        encode = self.topic.codec.encode
        topic_name = self.topic.name
        key_bytes = repartition_key_bytes
        key = self.key
        forwarded = self.forwarded
        self.finished = False
        async for events in stream.event_batches():
            failed: list[tuple[Event[Any], str]] = []
            try:  # the whole slice in a few passes; record by record if a value fails
                values = [ev.value for ev in events]
                keys = [key_bytes(key(v)) for v in values]
                encoded = [encode(v) for v in values]
                records = [
                    SinkRecord(kb, vb, topic_name, (*ev.headers, origin(ev)), ev.time)
                    for kb, vb, ev in zip(keys, encoded, events, strict=True)
                ]
            except Exception:  # noqa: BLE001 - some value's problem: found one by one below
                records = []
                for ev in events:
                    try:
                        kb, vb = key_bytes(key(ev.value)), encode(ev.value)
                    except Exception as exc:  # noqa: BLE001 - this value's: a dead letter
                        reason = f"repartition {self.name!r}: {type(exc).__name__}: {exc}"
                        failed.append((ev, reason))
                        continue
                    records.append(
                        SinkRecord(kb, vb, topic_name, (*ev.headers, origin(ev)), ev.time)
                    )
            touched: dict[Hashable, int] = {}  # per source partition, the slice's largest time
            for ev in events:
                t = ev.time
                if t is not None:
                    p = ev.partition
                    if t > touched.get(p, t - 1):
                        touched[p] = t
            for p, t in touched.items():
                if t > forwarded.get(p, t - 1):
                    forwarded[p] = t
            if touched:
                records.extend(await self._markers({p: forwarded[p] for p in touched}))
            if records:
                await self.topic.send_encoded(records)
            for ev, reason in failed:
                await stream.dead_letter(ev, reason)
        self.finished = True

    async def heartbeat(self) -> None:
        """Send the markers of every source partition forwarded from again (an app timer)."""
        if self.forwarded and not self.finished:
            await self.topic.send_encoded(await self._markers(dict(self.forwarded)))


def origin(ev: Event[Any]) -> tuple[str, bytes]:
    """The header saying where a forwarded event was read: source partition and offset.

    Example:
        >>> from asyncflow.event import Event
        >>> from asyncflow.protocols import TopicPartition
        >>> origin(Event("k", 1, partition=TopicPartition("in", 2), offset=41))
        ('asyncflow.origin', b'2:41')
    """
    p = ev.partition
    return ORIGIN_HEADER, f"{getattr(p, 'partition', p)}:{ev.offset}".encode()


def drop_replayed(seen: KeyedState[dict[str, int] | None], ev: Event[Any]) -> Any:
    """The event's value, or ``None`` when its key has had this source record already.

    A forwarder that restarts (a crash, a rebalance) forwards again what it
    had forwarded since its last commit. Records of one key from one source
    partition reach the internal partition in source order, so one whose
    source offset is not above the last one applied for its key and source
    partition (kept in ``seen``, checkpointed like any state) is such a copy:
    dropped, so windows and state downstream count every source event once.

    Example:
        >>> class Seen:
        ...     value = None
        ...     def get(self): return self.value
        ...     def set(self, v): self.value = v
        >>> from asyncflow.event import Event
        >>> seen = Seen()
        >>> def read(offset):
        ...     headers = (("asyncflow.origin", f"0:{offset}".encode()),)
        ...     return drop_replayed(seen, Event("k", offset, headers=headers))
        >>> [read(5), read(6), read(5), read(7)]
        [5, 6, None, 7]
    """
    headers = ev.headers
    if not headers:
        return ev.value
    name, raw = headers[-1]
    if name != ORIGIN_HEADER:
        return ev.value
    src, _, at = raw.partition(b":")
    try:
        offset = int(at)
    except ValueError:
        return ev.value
    source = src.decode()
    marks = seen.get()
    if marks is None:
        seen.set({source: offset})
        return ev.value
    last = marks.get(source)
    if last is not None and offset <= last:
        return None
    # in place: a replayed event (one the restored state reflects) never gets here, since
    # its origin is at or below its key's mark, so the cached value only ever moves on
    marks[source] = offset
    seen.set(marks)
    return ev.value


def markers(
    topic: str, times: dict[Hashable, int], sources: int, partitions: int
) -> list[SinkRecord]:
    """Watermark markers: for each source partition in ``times``, one into each of ``partitions``.

    ``sources`` is how many partitions the source has (0 when it cannot be
    known, as for a stream of shards): the internal partitions wait for that
    many before their event time moves.

    Example:
        >>> from asyncflow.protocols import TopicPartition
        >>> [(m.partition, m.value, m.headers) for m in markers("t", {TopicPartition("in", 1): 70}, 2, 2)]
        [(0, b'70', (('asyncflow.watermark', b'1/2'),)), (1, b'70', (('asyncflow.watermark', b'1/2'),))]
    """
    out: list[SinkRecord] = []
    for p, t in times.items():
        number = getattr(p, "partition", p)
        headers = ((MARK_HEADER, f"{number}/{sources}".encode()),)
        value = str(t).encode()
        out.extend(SinkRecord(None, value, topic, headers, t, d) for d in range(partitions))
    return out


async def partition_counts(app: App, source: str, topic: Topic[Any]) -> tuple[int, int]:
    """How many partitions the source and the internal topic have on the broker.

    A source that is not a broker topic (shards of a stream) counts 0: unknown.

    Example:
        >>> import asyncflow as af, asyncio
        >>> app = af.App("a")
        >>> t = app.topic("in", partitions=3).repartition("r", key=len)
        >>> asyncio.run(partition_counts(app, "in", t))  # not running: as declared
        (3, 3)
    """
    runtime = app._runtime
    listed: dict[str, int] = {}
    broker = runtime.broker if runtime is not None else None
    if broker is not None:
        listed = await broker.list_topics()
    declared = app.channels.get(source)
    from asyncflow.channels import Topic as BrokerTopic

    default = declared.spec.partitions if isinstance(declared, BrokerTopic) else 0
    return listed.get(source, default), listed.get(topic.name, topic.spec.partitions)


class RepartitionMarks:
    """The event time of each internal partition: the least over its source partitions' markers.

    ``take`` sorts a batch of one internal partition into its data records and
    its markers, applies the markers and returns the partition's event time:
    the smallest largest-forwarded time over the source partitions, a source
    partition without a marker for ``idle_timeout`` seconds left out (its
    events are not waited for while it is quiet).

    Example:
        >>> from types import SimpleNamespace as Rec
        >>> def mark(src, t):
        ...     return Rec(key=None, value=str(t).encode(), headers=((MARK_HEADER, src),))
        >>> marks = RepartitionMarks(idle_timeout=10.0)
        >>> data, t = marks.take("p0", [Rec(key=b"k", value=b"1"), mark(b"0/2", 500)], wall_ms=0)
        >>> len(data), t   # source partition 1 has not said how far it is
        (1, None)
        >>> marks.take("p0", [mark(b"1/2", 300)], wall_ms=10)[1]
        300
    """

    __slots__ = ("_idle_timeout", "_of", "_sized")

    def __init__(self, idle_timeout: float | None) -> None:
        self._idle_timeout = idle_timeout
        self._of: dict[Hashable, PartitionWatermarks] = {}
        self._sized: set[Hashable] = set()  # partitions told how many sources there are

    def take(
        self, partition: Hashable, records: Sequence[RawRecord], wall_ms: int,
        keys: Sequence[bytes | None] | None = None,
    ) -> tuple[Sequence[RawRecord], int | None]:
        """The batch's data records, and the partition's event time after its markers.

        ``records`` itself when the batch holds no marker (a marker has no key:
        ``keys``, the records' keys if the caller has them as a column, tells so
        without reading a record).
        """
        if None not in keys if keys is not None else all(r.key is not None for r in records):
            return records, None
        sources = self._of.get(partition)
        if sources is None:
            sources = self._of[partition] = PartitionWatermarks(self._idle_timeout)
        data: list[RawRecord] = []
        for r in records:
            header = r.headers[0] if r.key is None and r.headers else None
            if header is None or header[0] != MARK_HEADER:
                data.append(r)
                continue
            src, _, of = header[1].partition(b"/")
            try:
                count, t = int(of or 0), int(r.value or b"")
            except ValueError:
                continue  # not a marker this version wrote: nothing to learn from it
            if count and partition not in self._sized:
                self._sized.add(partition)
                for n in range(count):  # a source not heard from yet holds the time back
                    sources.assign(str(n).encode())
            sources.assign(src)
            sources.observe(src, t, wall_ms)
        return data, sources.current(wall_ms)

    def forget(self, partition: Hashable) -> None:
        """The partition was revoked: its next owner learns the markers again."""
        self._of.pop(partition, None)
        self._sized.discard(partition)


class KeySpread:
    """Notices one key arriving on two partitions of a topic whose keys come from its values.

    Windows and keyed state are per partition, so such a key is split across
    workers as soon as there are several (one worker reading every partition
    hides it). ``observe`` is called with a sample of keys (the first of each
    fetched batch); the first key seen on a second partition logs one warning
    that says what to do. At most ``limit`` keys are remembered.

    Example:
        >>> spread = KeySpread("readings", "sensor_id")
        >>> spread.observe("p0", "s-1"); spread.observe("p0", "s-1"); spread.split
        False
        >>> spread.observe("p1", "s-1"); spread.split
        True
    """

    __slots__ = ("_key_name", "_limit", "_seen", "split", "topic")

    def __init__(self, topic: str, key_name: str = "key", limit: int = 10_000) -> None:
        self.topic = topic
        self.split = False
        self._key_name = key_name
        self._limit = limit
        self._seen: dict[Hashable, Hashable] = {}

    def observe(self, partition: Hashable, key: Hashable) -> None:
        """One event of ``key`` arrived on ``partition``."""
        if self.split:
            return
        seen = self._seen
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key is the dispatcher's to refuse
            return
        if first is None:
            if len(seen) < self._limit:
                seen[key] = partition
        elif first != partition:
            self.split = True
            log.warning(
                "topic %r: key %r arrives on two partitions (%s and %s): its records are not "
                "keyed by the %s the agents key by, so with several workers its windows and "
                "state are split between them; re-key it with .repartition(name, key=...) on "
                "that topic and let the agents read the topic it returns",
                self.topic,
                key,
                _partition_name(first),
                _partition_name(partition),
                self._key_name,
            )


def _partition_name(partition: Hashable) -> str:
    number = getattr(partition, "partition", None)
    return f"partition {number}" if number is not None else repr(partition)
