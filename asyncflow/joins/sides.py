"""The two sides of a join, co-partitioned in one internal topic ``<app>-<name>-join``.

Both inputs of a join are forwarded, keyed by the join key, into one internal
topic, the way a repartition forwards one input (``asyncflow.repartition``):
the broker's partitioner puts every record of a key, from either side, in one
partition, so the key's state and the order in which its two sides were read
live in one place. A forwarded value is the side's encoded value behind one
byte naming the side (``L`` or ``R``; ``SidesCodec`` decodes it to ``(side,
value)``); its record timestamp is the event time; its last header is its
origin (``asyncflow.origin`` = ``L<partition>:<offset>``), so a copy a
restarted forwarder sends again is dropped downstream (the replay guard of a
repartition, table ``<name>-join-seen``).

Event time travels as in a repartition: each forwarder writes watermark
markers into every internal partition, labelled so the two inputs' partitions
are told apart (left partitions ``0..n-1``, right ones ``n..n+m-1``), and an
internal partition's event time is the least over all of them. A *table* side
does not repeat its markers on the heartbeat: a table that is quiet stops
holding event time back after the app's ``idle_timeout``.

Example:
    >>> from asyncflow.codecs import JsonCodec
    >>> codec = SidesCodec(JsonCodec(), JsonCodec())
    >>> codec.decode(b'R{"name":"Ann"}'), codec.encode((0, 5))
    ((1, {'name': 'Ann'}), b'L5')
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from asyncflow.codecs import Codec
from asyncflow.errors import DecodeError
from asyncflow.protocols import SinkRecord, TopicSpec
from asyncflow.repartition import (
    ORIGIN_HEADER,
    heartbeat_interval,
    markers,
    partition_counts,
    repartition_key_bytes,
)

if TYPE_CHECKING:
    from asyncflow.app import App
    from asyncflow.channels import Topic
    from asyncflow.stream import Stream

TAGS = (b"L", b"R")
_TAG_BYTES = (ord("L"), ord("R"))


class SidesCodec:
    """Values of an internal join topic: ``(side, value)``, each side with its own codec.

    Example:
        >>> from asyncflow.codecs import JsonCodec, StrCodec
        >>> SidesCodec(StrCodec(), JsonCodec()).decode_many([b"Lhi", b"R[1]"])
        [(0, 'hi'), (1, [1])]
    """

    __slots__ = ("codecs",)

    def __init__(self, left: Codec[Any], right: Codec[Any]) -> None:
        self.codecs = (left, right)

    def decode(self, data: bytes) -> tuple[int, Any]:
        tag = data[0] if data else -1
        if tag == _TAG_BYTES[0]:
            return 0, self.codecs[0].decode(data[1:])
        if tag == _TAG_BYTES[1]:
            return 1, self.codecs[1].decode(data[1:])
        raise DecodeError("not a record of a join topic (no side tag)")

    def decode_many(self, datas: list[bytes]) -> list[tuple[int, Any]]:
        decode = self.decode
        return [decode(d) for d in datas]

    def encode(self, value: tuple[int, Any]) -> bytes:
        side, v = value
        return TAGS[side] + self.codecs[side].encode(v)


def side_key(
    left: Callable[[Any], Hashable], right: Callable[[Any], Hashable]
) -> Callable[[tuple[int, Any]], Hashable]:
    """The key function of the internal topic: the key of whichever side a value is.

    Example:
        >>> key = side_key(lambda r: r["driver"], lambda d: d["id"])
        >>> key((0, {"driver": 7})), key((1, {"id": 7}))
        (7, 7)
    """

    def key(tagged: tuple[int, Any]) -> Hashable:
        return left(tagged[1]) if tagged[0] == 0 else right(tagged[1])

    return key


class SideForwarder:
    """The agent that forwards one side of a join into its internal topic.

    ``forward`` is the agent function (one lane, whole slices): each event is
    written keyed by the join key, with its origin header, then a watermark
    marker for each source partition the slice came from. ``where(value)``
    false leaves an event out (its time still counts in the markers): one
    topic of several kinds can be both sides of a join. ``heartbeat`` (an
    app timer, stream sides only) repeats the markers.

    Example:
        >>> import asyncflow as af, inspect
        >>> app = af.App("a")
        >>> fwd = SideForwarder(app, 0, app.topic("in"), app.topic("other"), app.topic("out"),
        ...                     key=len)
        >>> inspect.iscoroutinefunction(fwd.forward)
        True
    """

    def __init__(
        self,
        app: App,
        side: int,
        source: Topic[Any],
        other: Topic[Any],
        topic: Topic[Any],
        *,
        key: Callable[[Any], Hashable],
        where: Callable[[Any], bool] | None = None,
    ) -> None:
        self.where = where
        self.app = app
        self.side = side
        self.source = source
        self.other = other
        self.topic = topic
        self.key = key
        self.forwarded: dict[Hashable, int] = {}
        self.finished = False
        self._layout: tuple[int, int, int] | None = None  # (label base, labels, partitions)

    async def _markers(self, times: dict[Hashable, int]) -> list[SinkRecord]:
        if self._layout is None:
            mine, internal = await partition_counts(self.app, self.source.name, self.topic)
            theirs, _ = await partition_counts(self.app, self.other.name, self.topic)
            left = mine if self.side == 0 else theirs
            self._layout = (0 if self.side == 0 else left, mine + theirs, internal)
        base, labels, partitions = self._layout
        relabelled: dict[Hashable, int] = {
            base + getattr(p, "partition", 0): t for p, t in times.items()
        }
        return markers(self.topic.name, relabelled, labels, partitions)

    async def forward(self, stream: Stream[Any]) -> None:
        """The agent function (one lane)."""
        tag = TAGS[self.side]
        encode = self.source.codec.encode
        name = self.topic.name
        key = self.key
        forwarded = self.forwarded
        where = self.where
        self.finished = False
        async for events in stream.event_batches():
            records: list[SinkRecord] = []
            touched: dict[Hashable, int] = {}
            for ev in events:
                p, t = ev.partition, ev.time
                if t is not None and t > touched.get(p, t - 1):
                    touched[p] = t  # the source partition's time moves on, forwarded or not
                try:
                    if where is not None and not where(ev.value):
                        continue
                    k = key(ev.value)
                    kb = repartition_key_bytes(k)  # right-sized already
                    vb = tag + encode(ev.value)
                except Exception as exc:  # noqa: BLE001 - this value's problem: a dead letter
                    await stream.dead_letter(
                        ev, f"join {self.topic.name!r}: {type(exc).__name__}: {exc}"
                    )
                    continue
                origin = f"{tag.decode()}{getattr(p, 'partition', p)}:{ev.offset}".encode()
                records.append(
                    SinkRecord(kb, vb, name, (*ev.headers, (ORIGIN_HEADER, origin)), ev.time)
                )
            for p, t in touched.items():
                if t > forwarded.get(p, t - 1):
                    forwarded[p] = t
            if touched:
                records.extend(await self._markers({p: forwarded[p] for p in touched}))
            if records:
                await self.topic.send_encoded(records)
        self.finished = True

    async def heartbeat(self) -> None:
        """Send the markers of every source partition forwarded from again (an app timer)."""
        if self.forwarded and not self.finished:
            await self.topic.send_encoded(await self._markers(dict(self.forwarded)))


def declare_sides(
    app: App,
    name: str,
    left: Topic[Any],
    right: Topic[Any],
    *,
    left_key: Callable[[Any], Hashable],
    right_key: Callable[[Any], Hashable],
    partitions: int | None,
    right_heartbeat: bool,
    left_where: Callable[[Any], bool] | None = None,
    right_where: Callable[[Any], bool] | None = None,
) -> Topic[Any]:
    """Declare the internal topic of join ``name`` and the two forwarding agents.

    Returns the internal topic: its values are ``(side,
    value)``, keyed by the join key, timed by the forwarded event times.
    """
    from asyncflow.channels import Topic
    from asyncflow.errors import ConfigError

    topic_name = f"{app.id}-{name}-join"
    if topic_name in app.channels:
        raise ConfigError(f"a join named {name!r} is already declared in app {app.id!r}")
    topic: Topic[Any] = Topic(
        topic_name,
        codec=SidesCodec(left.codec, right.codec),
        key=side_key(left_key, right_key),
        app=app,
    )
    count = partitions if partitions is not None else left.spec.partitions
    like = left.name if partitions is None else None
    topic.spec = TopicSpec(topic_name, partitions=count, partitions_like=like)
    topic.repartitioned_from = f"{left.name}+{right.name}"
    topic.replay_guard = app.table(f"{name}-join-seen", default=None)
    for source in (left, right):
        source.repartitioned_into = (*source.repartitioned_into, topic_name)
    app.channels[topic_name] = topic
    sides = (
        (0, left, right, left_key, left_where, True),
        (1, right, left, right_key, right_where, right_heartbeat),
    )
    for side, source, other, key, where, beat in sides:
        fwd = SideForwarder(app, side, source, other, topic, key=key, where=where)
        app.agent(source, sink=topic, name=f"{name}-join-{TAGS[side].decode().lower()}")(
            fwd.forward
        )
        if beat:
            app.timer(heartbeat_interval(app.idle_timeout))(fwd.heartbeat)
    return topic
