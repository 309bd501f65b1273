"""asyncflow: stream processing on asyncio.

Decorator-registered async agents consume typed streams; keyed lanes keep
per-key order while running concurrently; event-time windows follow Flink's
semantics; bounded lane queues pause sources instead of growing.

``import asyncflow as af`` gives the user API (``__all__``, what ``help``
lists): the app and its declarations, typed records, streams, windows and
aggregates, state, outputs and sinks, error policies, async lookups, codecs,
clocks and errors, joins. Tests use ``asyncflow.testing``; connectors live in the
``adapters`` package. A few names the connectors and runtime exchange
(``Broker``, ``Source``, ``RawBatch``, ``TopicSpec``, ``TopicPartition``,
``Watermark``, ``Agent``...) are importable from here too, for code written
against them, but are not part of the user API: they live in
``asyncflow.protocols``, ``asyncflow.event`` and ``asyncflow.agent``.

Example:
    >>> import asyncflow as af
    >>> app = af.App("hello")
    >>> class Greeting(af.Record):
    ...     name: str
    >>> greetings = app.topic("greetings", value_type=Greeting)
    >>> @app.agent(greetings)
    ... async def greet(stream):
    ...     async for g in stream:
    ...         print("hello", g.name)
"""

from asyncflow.agent import Agent, ErrorPolicy, Retry  # noqa: F401 - Agent: not in __all__
from asyncflow.app import App
from asyncflow.async_map import AsyncMapped, Cache, InFlight
from asyncflow.channels import Channel, Output, SinkOutput, Topic
from asyncflow.clock import Clock, ManualClock, SystemClock
from asyncflow.codecs import Codec, JsonCodec, RawCodec, StrCodec
from asyncflow.console import ConsoleSink
from asyncflow.errors import (
    AgentError,
    AsyncflowError,
    BrokerUnavailable,
    ConfigError,
    DecodeError,
    SinkError,
    TopicMissing,
)
from asyncflow.event import Event, Watermark  # noqa: F401 - Watermark: not in __all__
from asyncflow.joins import IntervalJoin, Joined, JoinedStream, TableJoin, interval_join, join_table
from asyncflow.memory import MemoryBroker
from asyncflow.protocols import (  # noqa: F401 - Broker, RawBatch, Source, TopicPartition, TopicSpec: not in __all__
    Broker,
    RawBatch,
    Rejected,
    Sink,
    SinkRecord,
    Source,
    TopicPartition,
    TopicSpec,
)
from asyncflow.protocols import Record as RawRecordData  # noqa: F401
from asyncflow.records import EventTime, Record, to_builtins
from asyncflow.state import KeyedState, Table
from asyncflow.stream import Stream
from asyncflow.windows import (
    Aggregate,
    Collect,
    Count,
    First,
    Hopping,
    Last,
    Max,
    Mean,
    Min,
    ProcessingHopping,
    ProcessingTumbling,
    Session,
    Sum,
    Tumbling,
    WindowedStream,
    WindowResult,
    fold,
    reduce,
    to_epoch_ms,
)

__version__ = "0.1.0"

__all__ = [
    # the app and what it declares
    "App", "Topic", "Channel", "Output", "SinkOutput", "Table", "KeyedState",
    # typed values and events
    "Record", "EventTime", "to_builtins", "Event",
    # streams, windows and aggregates
    "Stream", "WindowedStream", "WindowResult", "Tumbling", "Hopping", "Session",
    "ProcessingTumbling", "ProcessingHopping", "to_epoch_ms",
    "Aggregate", "Count", "Sum", "Mean", "Min", "Max", "First", "Last", "Collect", "fold", "reduce",
    # joins
    "join_table", "interval_join", "TableJoin", "IntervalJoin", "JoinedStream", "Joined",
    # async lookups
    "AsyncMapped", "Cache", "InFlight",
    # error policies
    "ErrorPolicy", "Retry",
    # sinks and what they write
    "Sink", "SinkRecord", "Rejected", "ConsoleSink",
    # codecs, clocks, the embedded broker
    "Codec", "JsonCodec", "RawCodec", "StrCodec", "Clock", "SystemClock", "ManualClock",
    "MemoryBroker",
    # errors
    "AsyncflowError", "ConfigError", "DecodeError", "SinkError", "AgentError",
    "BrokerUnavailable", "TopicMissing",
    "__version__",
]
