"""Declaring joins: ``join_table`` (stream–table) and ``interval_join`` (stream–stream).

A join is declared on the app, like a repartition: both inputs are forwarded
into one internal topic keyed by the join key (``asyncflow.joins.sides``),
and the declaration returns a ``Join`` whose ``topic`` is it. An agent reads
that topic, and inside the agent body ``join.joined(stream)`` is the async iterator of ``Joined``
results (call it once, before the loop; it keeps its state per partition,
checkpointed and restored like window state, see ``asyncflow.joins.joined``).

Example: rides enriched with the driver they had, as of each ride's time.

    >>> import asyncio, asyncflow as af
    >>> from asyncflow.testing import TestRun
    >>> app = af.App("taxi")
    >>> rides = app.topic("rides", key=lambda r: r["driver"], time="t")
    >>> drivers = app.topic("drivers", key=lambda d: d["id"], time="t")
    >>> ride_drivers = join_table(rides, drivers, name="ride-drivers", how="left")
    >>> out = app.topic("enriched")
    >>> @app.agent(ride_drivers.topic)
    ... async def enrich(stream):
    ...     async for j in ride_drivers.joined(stream):
    ...         await out.send(j.key, {"ride": j.left["ride"], "car": j.right and j.right["car"]})
    >>> async def main():
    ...     async with TestRun(app) as run:
    ...         await run.send_many("drivers", [{"id": 1, "car": "Prius", "t": 0},
    ...                                         {"id": 1, "car": "Leaf", "t": 100}])
    ...         await run.send_many("rides", [{"ride": "a", "driver": 1, "t": 50},
    ...                                       {"ride": "b", "driver": 1, "t": 150},
    ...                                       {"ride": "c", "driver": 2, "t": 160}])
    ...         await run.finish()
    ...         return run.outputs("enriched")
    >>> asyncio.run(main())
    [{'ride': 'a', 'car': 'Prius'}, {'ride': 'b', 'car': 'Leaf'}, {'ride': 'c', 'car': None}]
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, overload
from weakref import WeakKeyDictionary

from asyncflow.channels import Topic
from asyncflow.errors import ConfigError
from asyncflow.joins.interval import IntervalJoinOperator
from asyncflow.joins.joined import JoinedStream, JoinOperator, LateSink
from asyncflow.joins.sides import SidesCodec, declare_sides
from asyncflow.joins.temporal import AsOf, How, TableJoinOperator

if TYPE_CHECKING:
    from asyncflow.stream import Stream

L = TypeVar("L")
R = TypeVar("R")


class Join(Generic[L, R]):
    """A declared join: ``topic`` is what an agent reads, ``joined(stream)`` its results.

    Example:
        >>> import asyncflow as af
        >>> app = af.App("a")
        >>> j = interval_join(app.topic("x", key=len), app.topic("y", key=len), name="xy",
        ...                   lower=timedelta(0), upper=timedelta(seconds=1))
        >>> j.topic.name, sorted(app.agents)
        ('a-xy-join', ['xy-join-l', 'xy-join-r'])
    """

    def __init__(
        self,
        topic: Topic[Any],
        *,
        name: str,
        wait: timedelta,
        late: LateSink | None,
        system_wait: timedelta | None = None,
    ) -> None:
        self.topic = topic
        self.system_wait = system_wait
        """The internal join topic: give it to ``@app.agent(...)``."""
        self.name = name
        self.wait = wait
        self.late = late
        self._streams: WeakKeyDictionary[Any, JoinedStream[L, R]] = WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def _operator(self) -> JoinOperator:
        raise NotImplementedError

    def joined(self, stream: Stream[Any]) -> JoinedStream[L, R]:
        """This lane's join results (call once in the agent body, before the loop).

        The same stream gets the same iterator back (its state is kept when
        the agent body restarts after an error).
        """
        found = self._streams.get(stream)
        if found is None:
            codec = self.topic.codec
            assert isinstance(codec, SidesCodec)
            found = self._streams[stream] = JoinedStream(
                stream,
                self._operator,
                codecs=codec.codecs,
                wait=self.wait,
                late=self.late,
                name=f"{self.name}-join",
                system_wait=self.system_wait,
            )
        return found


class TableJoin(Join[L, R]):
    """A stream–table join (what ``join_table`` declares): results ``Joined[L, R | None]``.

    Example:
        >>> import asyncflow as af
        >>> app = af.App("a")
        >>> j = af.join_table(app.topic("rides", key=lambda r: r["d"]),
        ...                   app.topic("drivers", key=lambda d: d["id"]), name="rd")
        >>> isinstance(j, TableJoin), j.how
        (True, 'inner')
    """

    def __init__(
        self,
        topic: Topic[Any],
        *,
        name: str,
        wait: timedelta,
        late: LateSink | None,
        system_wait: timedelta | None,
        how: How,
        as_of: AsOf,
        deleted: Callable[[Any], bool] | None,
    ) -> None:
        super().__init__(topic, name=name, wait=wait, late=late, system_wait=system_wait)
        self.how = how
        self.as_of = as_of
        self.deleted = deleted

    def _operator(self) -> JoinOperator:
        return TableJoinOperator(how=self.how, as_of=self.as_of, deleted=self.deleted)


class IntervalJoin(Join[L, R]):
    """An interval join (what ``interval_join`` declares): results ``Joined[L, R]``.

    Example:
        >>> import asyncflow as af
        >>> app = af.App("a")
        >>> j = af.interval_join(app.topic("views", key=lambda v: v["u"]),
        ...                      app.topic("buys", key=lambda b: b["u"]), name="vb",
        ...                      lower=timedelta(seconds=-5), upper=timedelta(0))
        >>> isinstance(j, IntervalJoin), j.lower_ms, j.upper_ms
        (True, -5000, 0)
    """

    def __init__(
        self,
        topic: Topic[Any],
        *,
        name: str,
        wait: timedelta,
        late: LateSink | None,
        system_wait: timedelta | None,
        lower_ms: int,
        upper_ms: int,
    ) -> None:
        super().__init__(topic, name=name, wait=wait, late=late, system_wait=system_wait)
        self.lower_ms = lower_ms
        self.upper_ms = upper_ms

    def _operator(self) -> JoinOperator:
        return IntervalJoinOperator(lower=self.lower_ms, upper=self.upper_ms)


def _key_of(topic: Topic[Any], given: Callable[[Any], Hashable] | None, what: str) -> Any:
    key = given if given is not None else topic.key_fn
    if key is None:
        raise ConfigError(
            f"{what} {topic.name!r} has no key function: give the join {what}_key= "
            "(a function of the value that gives the join key), or declare the topic with key="
        )
    return key


def _app_of(left: Topic[Any], right: Topic[Any]) -> Any:
    app = left._app
    if app is None or right._app is not app:
        raise ConfigError(
            f"{left.name!r} and {right.name!r} must be topics of one app (declare them with "
            "app.topic(...))"
        )
    return app


def _ms(d: timedelta, what: str) -> int:
    if not isinstance(d, timedelta):
        raise ConfigError(f"{what} must be a timedelta, got {d!r}")
    return int(d.total_seconds() * 1000)


@overload
def join_table(
    stream: Topic[L],
    table: Topic[R],
    *,
    name: str,
    how: Literal["inner"] = "inner",
    as_of: AsOf = "event_time",
    wait: timedelta = timedelta(0),
    stream_key: Callable[[L], Hashable] | None = None,
    table_key: Callable[[R], Hashable] | None = None,
    deleted: Callable[[R], bool] | None = None,
    stream_where: Callable[[L], bool] | None = None,
    table_where: Callable[[R], bool] | None = None,
    late: LateSink | None = None,
    system_wait: timedelta | None = None,
    partitions: int | None = None,
) -> TableJoin[L, R]: ...


@overload
def join_table(
    stream: Topic[L],
    table: Topic[R],
    *,
    name: str,
    how: Literal["left"],
    as_of: AsOf = "event_time",
    wait: timedelta = timedelta(0),
    stream_key: Callable[[L], Hashable] | None = None,
    table_key: Callable[[R], Hashable] | None = None,
    deleted: Callable[[R], bool] | None = None,
    stream_where: Callable[[L], bool] | None = None,
    table_where: Callable[[R], bool] | None = None,
    late: LateSink | None = None,
    system_wait: timedelta | None = None,
    partitions: int | None = None,
) -> TableJoin[L, R | None]: ...


def join_table(
    stream: Topic[L],
    table: Topic[R],
    *,
    name: str,
    how: How = "inner",
    as_of: AsOf = "event_time",
    wait: timedelta = timedelta(0),
    stream_key: Callable[[L], Hashable] | None = None,
    table_key: Callable[[R], Hashable] | None = None,
    deleted: Callable[[R], bool] | None = None,
    stream_where: Callable[[L], bool] | None = None,
    table_where: Callable[[R], bool] | None = None,
    late: LateSink | None = None,
    system_wait: timedelta | None = None,
    partitions: int | None = None,
) -> TableJoin[L, Any]:
    """Join each event of ``stream`` with the value ``table`` has for its key.

    ``table`` is a topic of updates (a compacted topic: the last update of a
    key is its value); its values are kept per key in durable state, in the
    partition of the join topic the key lives in, so they survive restarts
    and follow a partition to another worker. ``how="inner"`` drops stream
    events whose key has no value; ``"left"`` yields them with ``right=None``
    (the results are typed ``Joined[L, R]`` and ``Joined[L, R | None]``).

    ``as_of="event_time"`` (default) joins each event with the table's value
    *at the event's time*: the latest update with an event time at or before
    it, once the watermark has passed it (``wait`` is how far either input
    may be out of order). Updates are applied in event-time order, whatever
    order they were read in, so a replay gives the same answers; a stream
    event older than the watermark is late (to ``late``, default the dead
    letters). ``as_of="latest"`` joins at once with the newest value received
    (an update older than the current one is ignored), waiting for nothing.

    ``system_wait`` lets a quiet partition join what waits without a newer
    event (see ``asyncflow.joins.joined``): for an unbounded input whose last
    events would otherwise wait for the next ones.
    ``stream_key`` / ``table_key`` give the join key (default: each topic's
    ``key`` function); ``deleted(update)`` true deletes the key's value;
    ``stream_where`` / ``table_where`` keep only the values for which they
    are true (so one topic of several kinds can be both sides); ``partitions``
    is the join topic's partition count (default the stream's). A quiet table holds the event time back only until the app's
    ``idle_timeout``. See ``asyncflow.joins`` and the docs' Joins page.

    Example:
        >>> import asyncflow as af
        >>> app = af.App("a")
        >>> j = join_table(app.topic("rides", key=lambda r: r["d"]),
        ...                app.topic("drivers", key=lambda d: d["id"]), name="rd", how="left")
        >>> j.topic.name, j.how, j.as_of
        ('a-rd-join', 'left', 'event_time')
    """
    app = _app_of(stream, table)
    if how not in ("inner", "left"):
        raise ConfigError(f"join {name!r}: how={how!r}; a table join is 'inner' or 'left'")
    if as_of not in ("event_time", "latest"):
        raise ConfigError(f"join {name!r}: as_of={as_of!r}; use 'event_time' or 'latest'")
    _ms(wait, f"join {name!r}: wait")
    topic = declare_sides(
        app,
        name,
        stream,
        table,
        left_key=_key_of(stream, stream_key, "stream"),
        right_key=_key_of(table, table_key, "table"),
        partitions=partitions,
        right_heartbeat=False,
        left_where=stream_where,
        right_where=table_where,
    )
    return TableJoin(
        topic,
        name=name,
        wait=wait,
        late=late,
        system_wait=system_wait,
        how=how,
        as_of=as_of,
        deleted=deleted,
    )


def interval_join(
    left: Topic[L],
    right: Topic[R],
    *,
    name: str,
    lower: timedelta,
    upper: timedelta,
    wait: timedelta = timedelta(0),
    left_key: Callable[[L], Hashable] | None = None,
    right_key: Callable[[R], Hashable] | None = None,
    left_where: Callable[[L], bool] | None = None,
    right_where: Callable[[R], bool] | None = None,
    late: LateSink | None = None,
    system_wait: timedelta | None = None,
    partitions: int | None = None,
) -> IntervalJoin[L, R]:
    """Join the events of two streams whose times are close: ``a.time + lower <= b.time <= a.time + upper``.

    Both bounds are inclusive, ``lower`` may be negative (``b`` before
    ``a``). Each pair of one key is yielded once, as soon as its second
    event arrives (``time``: the later of the two). Both sides are kept in
    durable state until the watermark (event time minus ``wait``) has passed
    the last time they could match; an event older than the watermark is late
    (to ``late``, default the dead letters) and is not matched.
    ``left_where`` / ``right_where`` keep only the values for which they are
    true; the other parameters are ``join_table``'s.

    Example:
        >>> import asyncflow as af
        >>> app = af.App("a")
        >>> j = interval_join(app.topic("views", key=lambda v: v["u"]),
        ...                   app.topic("clicks", key=lambda c: c["u"]), name="vc",
        ...                   lower=timedelta(0), upper=timedelta(minutes=5))
        >>> j.lower_ms, j.upper_ms
        (0, 300000)
    """
    app = _app_of(left, right)
    lo, hi = _ms(lower, f"join {name!r}: lower"), _ms(upper, f"join {name!r}: upper")
    if lo > hi:
        raise ConfigError(f"join {name!r}: lower ({lower}) must not be above upper ({upper})")
    _ms(wait, f"join {name!r}: wait")
    topic = declare_sides(
        app,
        name,
        left,
        right,
        left_key=_key_of(left, left_key, "left"),
        right_key=_key_of(right, right_key, "right"),
        partitions=partitions,
        right_heartbeat=True,
        left_where=left_where,
        right_where=right_where,
    )
    return IntervalJoin(
        topic, name=name, wait=wait, late=late, system_wait=system_wait, lower_ms=lo, upper_ms=hi
    )
