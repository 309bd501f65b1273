"""Inputs and outputs an app declares: broker topics, external sources, sinks.

A ``Channel`` says how to read one input: its codec, how to get an event's key
and event time. A ``Topic`` is a channel on the app's broker that can also be
sent to. A ``SinkOutput`` wraps an external sink (DynamoDB, Kinesis, ...).
What agents send is flushed before the offsets of the events it came from are
committed (``asyncflow.checkpoint``).

Example:
    >>> import asyncflow as af
    >>> app = af.App("demo")
    >>> t = app.topic("numbers", key=lambda v: v["id"])
    >>> t.name, t.key_of({"id": 7})
    ('numbers', 7)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from datetime import datetime
from itertools import repeat
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from asyncflow.codecs import Codec, StrCodec, codec_for
from asyncflow.errors import ConfigError, DecodeError
from asyncflow.protocols import Sink, SinkRecord, Source, TopicSpec
from asyncflow.records import (
    MAX_TIME_MS,
    MIN_TIME_MS,
    TIME_UNITS,
    Record,
    datetime_to_ms,
    floor_ms,
    numeric_time_ms,
)
from asyncflow.writer import SinkWriter

if TYPE_CHECKING:
    from asyncflow.app import App
    from asyncflow.joins import IntervalJoin, TableJoin
    from asyncflow.state.table import Table

T = TypeVar("T")
R = TypeVar("R")


def _time_getter(
    time: str | Callable[[Any], Any] | None, value_type: Any, unit: str = "s"
) -> Callable[[Any], int] | None:
    """Build the event-time function (epoch ms) of a channel; numbers are in ``unit``."""
    if time is None:
        if isinstance(value_type, type) and issubclass(value_type, Record):
            return value_type._time_ms if value_type._time_field is not None else None
        return None
    if isinstance(time, str):
        name = time

        def by_field(value: Any) -> Any:
            return value[name] if isinstance(value, dict) else getattr(value, name)

        fn: Callable[[Any], Any] = by_field
    else:
        fn = time
        name = getattr(time, "__name__", "time function")
    per_unit = TIME_UNITS[unit]

    def to_ms(value: Any) -> int:
        t = fn(value)
        if type(t) is int or type(t) is float:
            try:
                ms = floor_ms(t * per_unit)
            except (OverflowError, ValueError):  # infinite, NaN
                return numeric_time_ms(t, name, unit)  # raises, naming the field
            if MIN_TIME_MS <= ms <= MAX_TIME_MS:
                return ms
            return numeric_time_ms(t, name, unit)  # raises, naming the field and the unit
        if isinstance(t, datetime):
            return datetime_to_ms(t)
        raise DecodeError(
            f"field {name!r}: event time must be a tz-aware datetime or epoch {unit} "
            f"(time_unit={unit!r}), got {type(t).__name__}"
        )

    return to_ms



def _time_field(time: Any, value_type: Any, getter: Any) -> str:
    """What the event time is read from, for messages about it."""
    if isinstance(time, str):
        return time
    if callable(time):
        return getattr(time, "__name__", "time function")
    if getter is not None and isinstance(value_type, type) and issubclass(value_type, Record):
        return str(value_type._time_field)
    return "record timestamp"


class Channel(Generic[T]):
    """An input stream definition: name, codec, key and event time.

    Example:
        >>> Channel("clicks").codec.decode(b'{"u": 1}')
        {'u': 1}
    """

    def __init__(
        self,
        name: str,
        *,
        value_type: type[T] | None = None,
        codec: str | Codec[Any] | None = None,
        key: Callable[[T], Hashable] | None = None,
        key_codec: Codec[Any] | None = None,
        time: str | Callable[[T], Any] | None = None,
        time_unit: str = "s",
        source: Source | None = None,
        partitions: int = 1,
        create: bool = True,
        app: App | None = None,
    ) -> None:
        if time_unit not in TIME_UNITS:
            raise ConfigError(
                f"time_unit={time_unit!r} of {name!r} is not a unit; use one of "
                f"{', '.join(repr(u) for u in TIME_UNITS)} (what a numeric time field counts)"
            )
        self.name = name
        self.value_type = value_type
        self.codec: Codec[Any] = codec_for(codec, value_type)
        self.key_fn = key
        self.key_codec: Codec[Any] = key_codec or StrCodec()
        self.time_ms = _time_getter(time, value_type, time_unit)
        self.time_field = _time_field(time, value_type, self.time_ms)
        self.source = source
        self.spec = TopicSpec(name, partitions=partitions, create=create)
        self._app = app

    repartitioned_from: str | None = None
    """For a repartition's internal topic: the input it re-keys (``repartition``)."""
    repartitioned_into: tuple[str, ...] = ()
    """The internal topics of the repartitions of this input."""
    replay_guard: Table[Any] | None = None
    """For a repartition's internal topic: the table that drops records forwarded twice."""

    def repartition(
        self,
        name: str,
        *,
        key: Callable[[T], Hashable] | None = None,
        partitions: int | None = None,
    ) -> Topic[T]:
        """Re-key this input through the internal topic ``<app>-<name>-repartition``.

        Use it when the records are not keyed by what the agents key by (the
        producers keyed them otherwise, or not at all): agents that read the
        returned topic get every event of a key on one partition, so windows
        and keyed state stay whole when several workers share the input.
        ``key`` is the new key (default: this input's ``key`` function);
        ``partitions`` the internal topic's partition count (default: this
        topic's). A forwarding agent ``<name>-repartition`` (one lane) writes
        the events; see ``asyncflow.repartition`` for what a forwarded record
        carries and how event time follows it.

        Example:
            >>> import asyncflow as af
            >>> app = af.App("sensors")
            >>> readings = app.topic("readings", partitions=4)
            >>> by_sensor = readings.repartition("by-sensor", key=lambda r: r["sensor"])
            >>> by_sensor.name, by_sensor.key_of({"sensor": "s-1"})
            ('sensors-by-sensor-repartition', 's-1')
        """
        from asyncflow.repartition import repartition

        key_fn = key if key is not None else self.key_fn
        if key_fn is None:
            raise ConfigError(
                f"repartition {name!r} of {self.name!r} needs key=: a function of the value "
                "that gives the new key (the input has no key function of its own)"
            )
        app = self._app
        if app is None:
            raise ConfigError(f"{self.name!r} belongs to no app: declare it with app.topic(...)")
        return repartition(app, self, name, key_fn, partitions=partitions)

    def join_table(self, table: Topic[R], *, name: str, **options: Any) -> TableJoin[T, R]:
        """Join each event of this topic with ``table``'s value for its key (``asyncflow.joins``).

        ``options`` are ``asyncflow.joins.join_table``'s (``how``, ``as_of``, ``wait``...).

        Example:
            >>> import asyncflow as af
            >>> app = af.App("taxi")
            >>> rides = app.topic("rides", key=lambda r: r["driver"])
            >>> drivers = app.topic("drivers", key=lambda d: d["id"])
            >>> rides.join_table(drivers, name="ride-drivers", how="left").topic.name
            'taxi-ride-drivers-join'
        """
        from asyncflow.joins import join_table

        if not isinstance(self, Topic):
            raise ConfigError(f"{self.name!r} is not a topic of the app's broker: it cannot be joined")
        return join_table(self, table, name=name, **options)

    def interval_join(self, other: Topic[R], *, name: str, **options: Any) -> IntervalJoin[T, R]:
        """Join this topic's events with ``other``'s close in time (``asyncflow.joins``).

        ``options`` are ``asyncflow.joins.interval_join``'s (``lower``, ``upper``, ``wait``...).

        Example:
            >>> import asyncflow as af
            >>> from datetime import timedelta
            >>> app = af.App("ads")
            >>> views = app.topic("views", key=lambda v: v["u"])
            >>> clicks = app.topic("clicks", key=lambda c: c["u"])
            >>> j = views.interval_join(clicks, name="vc", lower=timedelta(0),
            ...                         upper=timedelta(minutes=5))
            >>> j.upper_ms
            300000
        """
        from asyncflow.joins import interval_join

        if not isinstance(self, Topic):
            raise ConfigError(f"{self.name!r} is not a topic of the app's broker: it cannot be joined")
        return interval_join(self, other, name=name, **options)

    def key_of(self, value: T) -> Hashable:
        """The key of a value under this channel's key function."""
        if self.key_fn is None:
            raise ConfigError(f"channel {self.name!r} has no key function")
        return self.key_fn(value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Output:
    """Something agents send to: a topic or a sink.

    While the app runs, the runtime binds each output to its writer
    (``_bound``). Binding also puts a ``send`` made for that writer on the
    output itself (``_fast_send``: the same behaviour in one or two Python calls
    instead of four, since ``send`` runs once per output record); unbinding
    takes it away again.

    Example:
        >>> import asyncflow as af
        >>> from asyncflow.testing import CaptureSink
        >>> app = af.App("a")
        >>> outputs = [app.topic("alerts"), app.sink(CaptureSink("db"))]
        >>> [isinstance(o, Output) for o in outputs], [o.name for o in outputs]
        ([True, True], ['alerts', 'db'])
    """

    name: str
    _app: App | None
    _writer_bound: SinkWriter | None = None

    @property
    def _bound(self) -> SinkWriter | None:
        """The writer this output sends to while the app runs (set by the runtime)."""
        return self._writer_bound

    @_bound.setter
    def _bound(self, writer: SinkWriter | None) -> None:
        self._writer_bound = writer
        if writer is None:
            self.__dict__.pop("send", None)
        else:
            self.__dict__["send"] = self._fast_send(writer)

    def _fast_send(self, writer: SinkWriter) -> Callable[..., Awaitable[Any]]:
        """``send`` while bound to ``writer`` (subclasses make it shorter)."""
        push, record = writer.push, self._record

        def send(key: Any, value: Any, *, headers: Sequence[tuple[str, bytes]] = ()) -> Awaitable[Any]:
            return push(record(key, value, headers))

        return send

    def _writer(self) -> SinkWriter:
        raise NotImplementedError

    def _record(self, key: Any, value: Any, headers: Sequence[tuple[str, bytes]]) -> SinkRecord:
        raise NotImplementedError

    def send(
        self, key: Any, value: Any, *, headers: Sequence[tuple[str, bytes]] = ()
    ) -> Awaitable[Any]:
        """Send one record: buffered at once, durable by the next checkpoint.

        Awaiting the result waits only while the sink's buffer is full
        (backpressure), so a fast path costs no coroutine. Offsets are committed
        only after every sink has written what was sent before the checkpoint.

        Example:
            >>> import asyncflow as af, asyncio
            >>> app = af.App("t")
            >>> out = app.topic("out")
            >>> asyncio.run(out.send("k", 1))
            Traceback (most recent call last):
            ...
            asyncflow.errors.ConfigError: cannot send to 'out': the app 't' is not running
        """
        return (self._bound or self._writer()).push(self._record(key, value, headers))

    def send_many(
        self, items: Iterable[tuple[Any, Any]], *, headers: Sequence[tuple[str, bytes]] = ()
    ) -> Awaitable[Any]:
        """Send many ``(key, value)`` records at once (the batch API's output side).

        Like ``send``: buffered at once; awaiting the result waits only while the
        sink's buffer is full.

        Example:
            >>> import asyncflow as af, asyncio
            >>> app = af.App("t")
            >>> asyncio.run(app.topic("out").send_many([("k", 1), ("k", 2)]))
            Traceback (most recent call last):
            ...
            asyncflow.errors.ConfigError: cannot send to 'out': the app 't' is not running
        """
        return (self._bound or self._writer()).push_many(self._records(items, headers))

    def send_values(
        self,
        values: Iterable[Any],
        *,
        key: Callable[[Any], Any] | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> Awaitable[Any]:
        """Send many values at once, each with the key ``key(value)`` (none without ``key``).

        ``send_many`` for what a batch gives: no ``(key, value)`` pair to build
        per item. Buffered at once; awaiting the result waits only while the
        sink's buffer is full.

        Example:
            >>> import asyncflow as af, asyncio
            >>> from asyncflow.testing import CaptureSink
            >>> app = af.App("t")
            >>> out = app.sink(CaptureSink("results"))
            >>> @app.task
            ... async def produce():
            ...     await out.send_values([{"id": "a"}, {"id": "b"}], key=lambda v: v["id"])
            >>> asyncio.run(app.run(stop_when_idle=True))
            >>> [(r.key, r.value) for r in out.sink.records]
            [('a', {'id': 'a'}), ('b', {'id': 'b'})]
        """
        return (self._bound or self._writer()).push_many(self._value_records(values, key, headers))

    def _records(
        self, items: Iterable[tuple[Any, Any]], headers: Sequence[tuple[str, bytes]]
    ) -> list[SinkRecord]:
        """The records of ``send_many`` (subclasses build them without a call per item)."""
        record = self._record
        return [record(key, value, headers) for key, value in items]

    def _value_records(
        self, values: Iterable[Any], key: Callable[[Any], Any] | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> list[SinkRecord]:
        """The records of ``send_values``."""
        if key is None:
            return self._records(zip(repeat(None), values), headers)
        return self._records(((key(v), v) for v in values), headers)

    def _not_running(self) -> ConfigError:
        app = self._app.id if self._app is not None else "?"
        return ConfigError(f"cannot send to {self.name!r}: the app {app!r} is not running")


class Topic(Channel[T], Output):
    """A topic on the app's broker: an input agents consume and an output they send to.

    Example:
        >>> import asyncflow as af
        >>> af.App("a").topic("t", partitions=4).spec.partitions
        4
    """

    def _writer(self) -> SinkWriter:
        app = self._app
        runtime = app._runtime if app is not None else None
        if runtime is None:
            raise self._not_running()
        return runtime.producer

    async def end(self) -> None:
        """Mark the end of a bounded input written by this app (a replay, a data generator).

        Flushes what was sent to the topic first. On the memory broker, readers
        then drain and the worker stops once every input has ended; brokers
        without bounded topics (Kafka) ignore it.

        Example:
            >>> import asyncflow as af, asyncio
            >>> app = af.App("gen")
            >>> numbers = app.topic("numbers")
            >>> @app.task
            ... async def generate():
            ...     for n in range(3):
            ...         await numbers.send(None, n)
            ...     await numbers.end()
            >>> asyncio.run(app.run(stop_when_idle=True))
        """
        writer = self._writer()
        await writer.flush()
        app = self._app
        assert app is not None and app._runtime is not None
        end = getattr(app._runtime.broker, "end", None)
        if end is not None:
            end(self.name)

    def send_encoded(self, records: list[SinkRecord]) -> Awaitable[Any]:
        """Send records already encoded for this topic (key and value bytes, timestamps).

        For steps that forward what they read (``repartition``): the records go
        out as they are; like ``send``, awaiting waits only while the
        producer's buffer is full.

        Example:
            >>> import asyncflow as af, asyncio
            >>> app = af.App("t")
            >>> asyncio.run(app.topic("out").send_encoded([SinkRecord(b"k", b"1", "out")]))
            Traceback (most recent call last):
            ...
            asyncflow.errors.ConfigError: cannot send to 'out': the app 't' is not running
        """
        return (self._bound or self._writer()).push_many(records)

    def _record(self, key: Any, value: Any, headers: Sequence[tuple[str, bytes]]) -> SinkRecord:
        kb = None if key is None else (key if isinstance(key, bytes) else self.key_codec.encode(key))
        return SinkRecord(kb, self.codec.encode(value), topic=self.name, headers=headers)

    def _records(
        self, items: Iterable[tuple[Any, Any]], headers: Sequence[tuple[str, bytes]]
    ) -> list[SinkRecord]:
        name, encode_key, encode = self.name, self.key_codec.encode, self.codec.encode
        return [
            SinkRecord(
                None if k is None else (k if isinstance(k, bytes) else encode_key(k)),
                encode(v), name, headers,
            )
            for k, v in items
        ]

    def _value_records(
        self, values: Iterable[Any], key: Callable[[Any], Any] | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> list[SinkRecord]:
        if key is None:  # the loop in C: a third less time per record than a comprehension's
            return list(map(SinkRecord, repeat(None), map(self.codec.encode, values),
                            repeat(self.name), repeat(headers)))
        return self._records(((key(v), v) for v in values), headers)

    def _fast_send(self, writer: SinkWriter) -> Callable[..., Awaitable[Any]]:
        push, name = writer.record_sender(), self.name
        encode_key, encode = self.key_codec.encode, self.codec.encode
        text_keys = type(self.key_codec) is StrCodec  # a str key is its UTF-8: no call for it

        def send(key: Any, value: Any, *, headers: Sequence[tuple[str, bytes]] = ()) -> Awaitable[Any]:
            if key is None:
                kb = None
            elif text_keys and type(key) is str:
                kb = key.encode()
            else:
                kb = key if isinstance(key, bytes) else encode_key(key)
            return push(SinkRecord(kb, encode(value), name, headers))

        return send


class SinkOutput(Output):
    """An external sink registered with ``app.sink(...)``.

    Example:
        >>> import asyncflow as af
        >>> from asyncflow.testing import CaptureSink
        >>> af.App("a").sink(CaptureSink("results")).name
        'results'
    """

    def __init__(self, sink: Sink, app: App) -> None:
        self.sink = sink
        self.name = getattr(sink, "name", type(sink).__name__)
        self._app = app

    def _writer(self) -> SinkWriter:
        app = self._app
        runtime = app._runtime if app is not None else None
        if runtime is None:
            raise self._not_running()
        return runtime.writers[self.name]

    def _record(self, key: Any, value: Any, headers: Sequence[tuple[str, bytes]]) -> SinkRecord:
        return SinkRecord(key, value, None, headers)

    def _records(
        self, items: Iterable[tuple[Any, Any]], headers: Sequence[tuple[str, bytes]]
    ) -> list[SinkRecord]:
        return [SinkRecord(k, v, None, headers) for k, v in items]

    def _value_records(
        self, values: Iterable[Any], key: Callable[[Any], Any] | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> list[SinkRecord]:
        if key is None and not headers:
            # the loop in C: a third less time per record than a comprehension's
            return list(map(SinkRecord, repeat(None), values))
        if key is None:
            return [SinkRecord(None, v, None, headers) for v in values]
        return [SinkRecord(key(v), v, None, headers) for v in values]

    def _fast_send(self, writer: SinkWriter) -> Callable[..., Awaitable[Any]]:
        return writer.value_sender()

    def send(
        self, key: Any, value: Any, *, headers: Sequence[tuple[str, bytes]] = ()
    ) -> Awaitable[Any]:
        """Send one record to the sink (see ``Output.send``; the same, one call shorter).

        Example:
            >>> import asyncflow as af
            >>> from asyncflow.testing import CaptureSink
            >>> app = af.App("t")
            >>> out = app.sink(CaptureSink("results"))
            >>> @app.task
            ... async def produce():
            ...     await out.send("k", 1)
            >>> import asyncio; asyncio.run(app.run(stop_when_idle=True))
            >>> out.sink.values
            [1]
        """
        return (self._bound or self._writer()).push(SinkRecord(key, value, None, headers))
