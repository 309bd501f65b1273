"""asyncflow: stream processing on asyncio.

Decorator-registered async agents consume typed streams; keyed lanes keep
per-key order while running concurrently; event-time windows follow Flink's
semantics; bounded lane queues pause sources instead of growing.

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

from asyncflow.agent import Agent, ErrorPolicy, Retry
from asyncflow.app import App
from asyncflow.async_map import AsyncMapped, Cache, InFlight
from asyncflow.channels import Channel, Output, SinkOutput, Topic
from asyncflow.clock import Clock, ManualClock, SystemClock
from asyncflow.codecs import Codec, JsonCodec, RawCodec, StrCodec
from asyncflow.errors import (
    AgentError,
    AsyncflowError,
    BrokerUnavailable,
    ConfigError,
    DecodeError,
    SinkError,
    TopicMissing,
)
from asyncflow.event import Event, Watermark
from asyncflow.memory import MemoryBroker
from asyncflow.protocols import (
    Broker,
    RawBatch,
    Rejected,
    Sink,
    SinkRecord,
    Source,
    TopicPartition,
    TopicSpec,
)
from asyncflow.protocols import (
    Record as RawRecordData,
)
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
    "Agent", "AgentError", "Aggregate", "App", "AsyncMapped", "Cache", "InFlight", "AsyncflowError", "Broker", "BrokerUnavailable",
    "Channel", "Clock", "Codec", "Collect", "ConfigError", "Count", "DecodeError", "ErrorPolicy",
    "Event", "EventTime", "First", "Hopping", "JsonCodec", "Last", "ManualClock", "Max", "Mean",
    "MemoryBroker", "Min", "Output", "ProcessingHopping", "ProcessingTumbling", "RawBatch",
    "RawCodec", "RawRecordData", "Record", "Rejected", "Retry", "Session", "Sink", "SinkError", "SinkOutput",
    "SinkRecord", "Source", "StrCodec", "Stream", "Sum", "SystemClock", "Table", "KeyedState", "Topic", "TopicMissing",
    "TopicPartition", "TopicSpec", "Tumbling", "Watermark", "WindowResult", "WindowedStream",
    "fold", "reduce", "to_builtins", "to_epoch_ms", "__version__",
]
