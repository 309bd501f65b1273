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
them.

Event time after a repartition: each partition of the internal topic has its
own watermark, advanced by the records it receives (as Kafka Streams' stream
time). Records of one key can come from several source partitions, which the
forwarder reads at their own pace, so they may arrive out of event-time order
by as much as those partitions are apart: give windows downstream a ``wait``
(or ``lateness``) that covers it.

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
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import orjson

from asyncflow.protocols import SinkRecord, TopicSpec

if TYPE_CHECKING:
    from asyncflow.app import App
    from asyncflow.channels import Channel, Topic
    from asyncflow.event import Event
    from asyncflow.stream import Stream

log = logging.getLogger("asyncflow.repartition")

_JSON_KEY_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS


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
    return orjson.dumps(key, option=_JSON_KEY_OPTIONS)


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
    concurrency: int = 1,
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
    app.channels[topic_name] = topic
    app.agent(source, concurrency=concurrency, sink=topic, name=agent_name)(
        forwarder(topic, key, name)
    )
    return topic


def forwarder(
    topic: Topic[Any], key: Callable[[Any], Hashable], name: str
) -> Callable[[Stream[Any]], Any]:
    """The agent function that writes a stream's events to ``topic``, keyed by ``key``.

    Whole lane slices at a time; an event whose key cannot be computed is a
    dead letter naming the repartition and the reason.

    Example:
        >>> import asyncflow as af
        >>> app = af.App("a")
        >>> fn = forwarder(app.topic("out"), key=lambda v: v, name="x")
        >>> import inspect; inspect.iscoroutinefunction(fn)
        True
    """
    encode = topic.codec.encode
    topic_name = topic.name

    async def forward(stream: Stream[Any]) -> None:
        async for events in stream.event_batches():
            records: list[SinkRecord] = []
            failed: list[tuple[Event[Any], str]] = []
            for ev in events:
                try:
                    kb = repartition_key_bytes(key(ev.value))
                    value = encode(ev.value)
                except Exception as exc:  # noqa: BLE001 - this value's problem: a dead letter
                    failed.append((ev, f"repartition {name!r}: {type(exc).__name__}: {exc}"))
                    continue
                records.append(SinkRecord(kb, value, topic_name, ev.headers, ev.time))
            if records:
                await topic.send_encoded(records)
            for ev, reason in failed:
                await stream.dead_letter(ev, reason)

    forward.__name__ = forward.__qualname__ = f"{name}-repartition"
    return forward


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
