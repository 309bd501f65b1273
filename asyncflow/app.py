"""The ``App``: a registry of topics, sources, sinks, agents, timers and tasks.

Declaring things is all an app module does; ``asyncflow worker module:app``
(or ``await app.run()``) starts the runtime. Settings come from arguments,
then ``ASYNCFLOW_*`` environment variables, then defaults:

================================  ==============================  ==============  ==================
argument                          environment variable            default         allowed
================================  ==============================  ==============  ==================
``broker``                        ``ASYNCFLOW_BROKER``            ``memory://``   a broker URL
``lane_capacity`` (events)        ``ASYNCFLOW_LANE_CAPACITY``     2000            integer >= 1
``commit_interval`` (s)           ``ASYNCFLOW_COMMIT_INTERVAL``   1.0             finite >= 0.001
``idle_timeout`` (s)              ``ASYNCFLOW_IDLE_TIMEOUT``      10.0            finite >= 0
``fetch_max`` (records)           ``ASYNCFLOW_FETCH_MAX``         10000           integer >= 1
``state_dir``                     ``ASYNCFLOW_STATE_DIR``         see below       a directory
``state_store``                   ``ASYNCFLOW_STATE_STORE``       ``rocksdb``     see below
``max_time_ahead`` (s)            ``ASYNCFLOW_MAX_TIME_AHEAD``    86400 (1 day)   finite > 0, none
``drain_timeout`` (s)                                             10.0            finite >= 0
``shutdown_timeout`` (s)                                          30.0            finite > 0
``watermark_interval`` (s)                                        0.2             finite >= 0.001
``processing_guarantee``          see below                       at_least_once   see below
================================  ==============================  ==============  ==================

Every setting is checked when the ``App`` is built: a value out of range
raises ``ConfigError`` naming the setting, its variable, the value given and
what is allowed (so a worker never starts with a setting that would spin or
stall, such as ``fetch_max=0`` or a negative ``commit_interval``).

State (tables and window state) lives in a local store per (app, table,
partition) under ``state_dir`` (default ``$XDG_STATE_HOME/asyncflow``, i.e.
``~/.local/state/asyncflow``; on the memory broker, whose offsets end with the
process, a temporary directory of the run's own), ``state_store`` is
``rocksdb``, ``lmdb``, ``sqlite`` or ``memory``. ``max_time_ahead`` bounds how
far one event's time may be ahead of its partition's event time and of the
wall clock (``none`` turns the guard off); an event beyond it is a dead letter.
``processing_guarantee`` (``ASYNCFLOW_PROCESSING_GUARANTEE``) is ``at_least_once`` or
``exactly_once``: with the latter each checkpoint is one broker transaction
holding the outputs, the state's changelog records, the dead letters and the
input offsets (Kafka with ``client=rdkafka`` only; see ``docs/exactly-once.md``).

Example:
    >>> import asyncflow as af
    >>> app = af.App("orders", broker="memory://")
    >>> orders = app.topic("orders", key=lambda o: o["id"])
    >>> @app.agent(orders, concurrency=4)
    ... async def handle(stream):
    ...     async for order in stream:
    ...         pass
    >>> sorted(app.agents)
    ['handle']
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from asyncflow.agent import Agent, ErrorPolicy
from asyncflow.channels import Channel, Output, SinkOutput, Topic
from asyncflow.clock import Clock, SystemClock
from asyncflow.codecs import Codec
from asyncflow.errors import ConfigError
from asyncflow.metrics import Metrics
from asyncflow.protocols import Broker, Sink, Source
from asyncflow.state.table import Table
from asyncflow.stream import Stream

if TYPE_CHECKING:
    from asyncflow.joins import Join
    from asyncflow.runtime import Runtime

T = TypeVar("T")
V = TypeVar("V")

PROCESSING_GUARANTEES = ("at_least_once", "exactly_once")
"""What ``processing_guarantee`` may be."""
DEFAULT_STATE_STORE = "rocksdb"
"""The local store used unless ``state_store`` / ``ASYNCFLOW_STATE_STORE`` names another."""
F = TypeVar("F", bound=Callable[..., Any])

MIN_INTERVAL = 0.001
"""The shortest commit, watermark or timer interval (s): anything shorter is a busy loop."""


def _bad(name: str, env: str | None, given: object, allowed: str) -> ConfigError:
    where = f"{env}={given!r}" if isinstance(given, str) and env else f"{name}={given!r}"
    set_by = f"App({name}=...)" + (f" or {env}" if env else "")
    return ConfigError(f"{where} is not a valid {name}; allowed: {allowed} (set by {set_by})")


def _raw(name: str, env: str | None, given: object) -> object:
    """The argument if given, else the environment variable (a string), else ``None``."""
    if given is not None:
        return given
    raw = os.environ.get(env) if env else None
    return None if raw is None or raw.strip() == "" else raw


def int_setting(name: str, env: str | None, given: int | None, default: int, low: int = 1) -> int:
    """A whole-number setting: the argument, else ``env``, else ``default``; at least ``low``.

    Raises ``ConfigError`` naming the setting, the variable, the value and what is allowed.

    Example:
        >>> int_setting("fetch_max", "ASYNCFLOW_FETCH_MAX", 500, 2000)
        500
        >>> int_setting("fetch_max", None, 0, 2000)
        Traceback (most recent call last):
        ...
        asyncflow.errors.ConfigError: fetch_max=0 is not a valid fetch_max; allowed: an integer >= 1 (set by App(fetch_max=...))
    """
    raw = _raw(name, env, given)
    if raw is None:
        return default
    allowed = f"an integer >= {low}"
    value: object = raw
    if isinstance(raw, str):
        try:
            value = int(raw.strip())
        except ValueError:
            raise _bad(name, env, raw, allowed) from None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _bad(name, env, raw, allowed)
    return value


def seconds_setting(
    name: str,
    env: str | None,
    given: float | None,
    default: float,
    *,
    zero_ok: bool = False,
    at_least: float = 0.0,
) -> float:
    """A duration in seconds: the argument, else ``env``, else ``default``; finite, > 0 (or >= 0).

    ``at_least`` is a floor for the intervals of loops (a commit or watermark
    interval of a nanosecond would be a busy loop).

    Example:
        >>> seconds_setting("commit_interval", "ASYNCFLOW_COMMIT_INTERVAL", None, 1.0)
        1.0
        >>> seconds_setting("idle_timeout", None, -1, 10.0, zero_ok=True)
        Traceback (most recent call last):
        ...
        asyncflow.errors.ConfigError: idle_timeout=-1 is not a valid idle_timeout; allowed: a finite number of seconds >= 0 (set by App(idle_timeout=...))
    """
    raw = _raw(name, env, given)
    if raw is None:
        return default
    if at_least > 0:
        allowed = f"a finite number of seconds >= {at_least:g}"
    else:
        allowed = f"a finite number of seconds {'>= 0' if zero_ok else '> 0'}"
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise _bad(name, env, raw, allowed)
    try:
        value = float(raw)
    except ValueError:
        raise _bad(name, env, raw, allowed) from None
    if not math.isfinite(value) or value < at_least or (value == 0 and not zero_ok):
        raise _bad(name, env, raw, allowed)
    return value


def _max_time_ahead(given: timedelta | None | str) -> float | None:
    env = "ASYNCFLOW_MAX_TIME_AHEAD"
    allowed = "a finite number of seconds > 0, or none/off (no guard)"
    if given is None:
        return None
    if isinstance(given, timedelta):
        if given <= timedelta(0):
            raise _bad("max_time_ahead", None, given, "a positive timedelta, or None")
        return given.total_seconds()
    if given != "default":
        raise _bad("max_time_ahead", None, given, "a positive timedelta, or None")
    raw = os.environ.get(env)
    if raw is None or raw.strip() == "":
        return 86_400.0
    if raw.strip().lower() in ("none", "off"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _bad("max_time_ahead", env, raw, allowed) from None
    if not math.isfinite(value) or not value > 0:
        raise _bad("max_time_ahead", env, raw, allowed)
    return value


class Timer:
    """A coroutine function run every ``interval`` seconds."""

    __slots__ = ("fn", "interval", "name")

    def __init__(self, fn: Callable[[], Awaitable[Any]], interval: float, name: str) -> None:
        self.fn = fn
        self.interval = interval
        self.name = name


class App:
    """A stream-processing application.

    Example:
        >>> App("sensors").broker_url
        'memory://'
    """

    def __init__(
        self,
        id: str,
        *,
        broker: str | Broker | None = None,
        broker_options: dict[str, str] | None = None,
        lane_capacity: int | None = None,
        commit_interval: float | None = None,
        idle_timeout: float | None = None,
        fetch_max: int | None = None,
        dead_letter: str | Sink | None = None,
        clock: Clock | None = None,
        drain_timeout: float = 10.0,
        shutdown_timeout: float = 30.0,
        watermark_interval: float = 0.2,
        state_dir: str | None = None,
        state_store: str | None = None,
        max_time_ahead: timedelta | None | str = "default",
        processing_guarantee: str | None = None,
    ) -> None:
        if not id or not all(c.isalnum() or c in "-_." for c in id):
            raise ConfigError(f"app id {id!r} must be non-empty letters, digits, '-', '_' or '.'")
        self.id = id
        self._broker_arg = broker
        self.broker_options = dict(broker_options or {})
        self.lane_capacity = int_setting(
            "lane_capacity", "ASYNCFLOW_LANE_CAPACITY", lane_capacity, 2000
        )
        self.commit_interval = seconds_setting(
            "commit_interval",
            "ASYNCFLOW_COMMIT_INTERVAL",
            commit_interval,
            1.0,
            at_least=MIN_INTERVAL,
        )
        self.idle_timeout = seconds_setting(
            "idle_timeout", "ASYNCFLOW_IDLE_TIMEOUT", idle_timeout, 10.0, zero_ok=True
        )
        self.fetch_max = int_setting("fetch_max", "ASYNCFLOW_FETCH_MAX", fetch_max, 10_000)
        self.dead_letter_target: str | Sink = dead_letter or f"{id}-dead-letters"
        self.clock: Clock = clock or SystemClock()
        self.drain_timeout = seconds_setting(
            "drain_timeout", None, drain_timeout, 10.0, zero_ok=True
        )
        self.shutdown_timeout = seconds_setting("shutdown_timeout", None, shutdown_timeout, 30.0)
        self.watermark_interval = seconds_setting(
            "watermark_interval", None, watermark_interval, 0.2, at_least=MIN_INTERVAL
        )
        self.state_dir = state_dir or os.environ.get("ASYNCFLOW_STATE_DIR") or None
        from asyncflow.state.store import STORE_KINDS

        store = state_store or os.environ.get("ASYNCFLOW_STATE_STORE") or DEFAULT_STATE_STORE
        if store not in STORE_KINDS:
            raise ConfigError(
                f"state store {store!r} (state_store / ASYNCFLOW_STATE_STORE) is not known; "
                f"use one of: {', '.join(STORE_KINDS)}"
            )
        self.state_store = store
        guarantee = _raw("processing_guarantee", "ASYNCFLOW_PROCESSING_GUARANTEE",
                         processing_guarantee)
        if guarantee is None:
            guarantee = "at_least_once"
        if guarantee not in PROCESSING_GUARANTEES:
            raise _bad("processing_guarantee", "ASYNCFLOW_PROCESSING_GUARANTEE", guarantee,
                       " or ".join(PROCESSING_GUARANTEES))
        self.processing_guarantee = str(guarantee)
        """``exactly_once``: each checkpoint is one broker transaction (``asyncflow.checkpoint``)."""
        ahead = _max_time_ahead(max_time_ahead)
        self.max_time_ahead_ms: int | None = None if ahead is None else int(ahead * 1000)
        self.tables: dict[str, Table[Any]] = {}
        self.channels: dict[str, Channel[Any]] = {}
        self.sinks: dict[str, SinkOutput] = {}
        self.agents: dict[str, Agent] = {}
        self.timers: list[Timer] = []
        self.tasks: list[Callable[[], Coroutine[Any, Any, Any]]] = []
        self.metrics = Metrics()
        self._runtime: Runtime | None = None

    @property
    def broker_url(self) -> str:
        """The broker URL: the argument, else ``ASYNCFLOW_BROKER``, else ``memory://``."""
        arg = self._broker_arg
        if isinstance(arg, str):
            return arg
        if arg is not None:
            return arg.url
        return os.environ.get("ASYNCFLOW_BROKER") or "memory://"

    def set_broker(self, broker: str | Broker) -> None:
        """Override the broker (the CLI's ``--broker``)."""
        self._broker_arg = broker

    def topic(
        self,
        name: str,
        *,
        value_type: type[T] | None = None,
        codec: str | Codec[Any] | None = None,
        key: Callable[[T], Hashable] | None = None,
        key_codec: Codec[Any] | None = None,
        time: str | Callable[[T], Any] | None = None,
        time_unit: str = "s",
        partitions: int = 1,
        create: bool = True,
    ) -> Topic[T]:
        """Declare a topic on the app's broker (input and output).

        ``key`` computes an event's key from its value (else the record key is
        used); ``time`` gives its event time (a field name or a function returning
        a tz-aware datetime or a number since the epoch; a ``Record`` with an
        ``EventTime`` field needs nothing; else the broker's timestamp).
        ``time_unit`` is what such a number counts: ``"s"`` (default), ``"ms"``,
        ``"us"`` or ``"ns"``; a value that cannot be a time in that unit is a
        dead letter that names the field (and the unit that would fit).

        Example:
            >>> App("a").topic("t", codec="raw").codec.decode(b"x")
            b'x'
        """
        existing = self.channels.get(name)
        if isinstance(existing, Topic):
            return existing
        t: Topic[T] = Topic(
            name,
            value_type=value_type,
            codec=codec,
            key=key,
            key_codec=key_codec,
            time=time,
            time_unit=time_unit,
            partitions=partitions,
            create=create,
            app=self,
        )
        self.channels[name] = t
        return t

    def source(
        self,
        source: Source,
        *,
        name: str,
        value_type: type[T] | None = None,
        codec: str | Codec[Any] | None = None,
        key: Callable[[T], Hashable] | None = None,
        time: str | Callable[[T], Any] | None = None,
    ) -> Channel[T]:
        """Declare an input read from an external source (Kinesis, SSE, ...).

        The source must label its batches with ``name`` as their topic.

        Example:
            >>> from asyncflow.memory import MemoryBroker
            >>> from asyncflow.protocols import TopicSpec
            >>> src = MemoryBroker().source([TopicSpec("x")], "g")
            >>> App("a").source(src, name="x").name
            'x'
        """
        if name in self.channels:
            raise ConfigError(f"an input named {name!r} is already declared")
        ch: Channel[T] = Channel(
            name, value_type=value_type, codec=codec, key=key, time=time, source=source, app=self
        )
        self.channels[name] = ch
        return ch

    def table(
        self,
        name: str,
        *,
        default: V | None = None,
        value_type: type[V] | None = None,
        codec: str | Codec[Any] | None = None,
        ttl: timedelta | None = None,
    ) -> Table[V]:
        """Declare a table: keyed state agents read and write with ``stream.state(table)``.

        Its values are checkpointed with the source offsets into a local store
        and the changelog topic ``<app>-<name>-changelog``, and restored with
        their partition on whichever worker reads it next (``asyncflow.state``).

        Example:
            >>> from datetime import timedelta
            >>> App("a").table("last-seen", ttl=timedelta(days=1)).ttl_ms
            86400000
        """
        if name in self.tables:
            raise ConfigError(f"a table named {name!r} is already declared")
        table: Table[V] = Table(name, default=default, value_type=value_type, codec=codec, ttl=ttl)
        self.tables[name] = table
        return table

    def sink(self, sink: Sink) -> SinkOutput:
        """Register an external sink; agents ``await out.send(key, value)`` to it.

        Example:
            >>> from asyncflow.testing import CaptureSink
            >>> App("a").sink(CaptureSink("db")).name
            'db'
        """
        out = SinkOutput(sink, self)
        if out.name in self.sinks:
            raise ConfigError(f"a sink named {out.name!r} is already registered")
        self.sinks[out.name] = out
        return out

    def agent(
        self,
        channel: Channel[Any] | Join[Any, Any],
        *,
        concurrency: int = 1,
        sink: Output | list[Output] | None = None,
        on_error: ErrorPolicy = "dead_letter",
        name: str | None = None,
    ) -> Callable[[Callable[[Stream[Any]], Any]], Callable[[Stream[Any]], Any]]:
        """Register ``async def f(stream)`` to consume ``channel`` in ``concurrency`` lanes.

        One key always goes to the same lane, so per-key order holds while
        lanes run concurrently: on one event loop, so they overlap their awaits
        (sinks, lookups), not CPU work; more processes (workers) give that.

        Example:
            >>> app = App("a")
            >>> @app.agent(app.topic("t"), on_error="stop")
            ... async def f(stream):
            ...     async for v in stream:
            ...         pass
            >>> app.agents["f"].on_error
            'stop'
        """
        sinks = [] if sink is None else (sink if isinstance(sink, list) else [sink])
        from asyncflow.joins import Join as JoinType

        if isinstance(channel, JoinType):  # a join: its agents read its internal topic
            channel = channel.topic

        def register(fn: Callable[[Stream[Any]], Any]) -> Callable[[Stream[Any]], Any]:
            agent = Agent(
                fn, channel, concurrency=concurrency, sinks=sinks, on_error=on_error, name=name
            )
            if agent.name in self.agents:
                raise ConfigError(f"an agent named {agent.name!r} is already registered")
            self.agents[agent.name] = agent
            return fn

        return register

    def timer(self, interval: float | timedelta) -> Callable[[F], F]:
        """Run ``async def f()`` every ``interval`` while the worker runs.

        Example:
            >>> app = App("a")
            >>> @app.timer(5.0)
            ... async def tick():
            ...     pass
            >>> app.timers[0].interval
            5.0
        """
        given = interval.total_seconds() if isinstance(interval, timedelta) else interval
        try:
            seconds = seconds_setting("interval", None, given, 0.0, at_least=MIN_INTERVAL)
        except ConfigError:
            raise ConfigError(
                f"app.timer({interval!r}): the interval must be a finite number of seconds "
                f">= {MIN_INTERVAL:g} or a timedelta that long"
            ) from None

        def register(fn: F) -> F:
            self.timers.append(Timer(fn, seconds, fn.__name__))
            return fn

        return register

    def task(self, fn: F) -> F:
        """Run ``async def f()`` once when the worker starts (e.g. a data generator).

        Example:
            >>> app = App("a")
            >>> @app.task
            ... async def load():
            ...     pass
            >>> len(app.tasks)
            1
        """
        self.tasks.append(fn)
        return fn

    async def run(self, *, stop_when_idle: bool = False) -> None:
        """Run the worker until stopped (or, with ``stop_when_idle``, until bounded input ends).

        Example:
            >>> import asyncio
            >>> asyncio.run(App("empty").run(stop_when_idle=True))
        """
        from asyncflow.runtime import Runtime

        runtime = Runtime(self)
        await runtime.run(stop_when_idle=stop_when_idle)

    def stop(self) -> None:
        """Ask a running worker to drain, flush, commit and return."""
        if self._runtime is not None:
            self._runtime.request_stop()
