"""The dead-letter output: what could not be decoded, handled or written, with the reason.

Three kinds of record end here, each with the reason in the header
``asyncflow.reason``:

- an input record that could not be decoded (``raw``): its key and value as
  read, its topic, partition and offset in headers;
- an event an agent failed on, or a late one (``event``): its value encoded
  with its topic's codec, its position in headers;
- an output record a sink refused for what it is (``rejected``: too large, a
  value the service cannot store): its key and value as bytes (JSON where
  they were Python values), the sink's name in ``asyncflow.sink`` and the
  destination topic, if any, in ``asyncflow.topic``.

A dead letter that the dead-letter sink refuses in turn (too large for it as
well) is written again without its value, its size and the refusal in the
header ``asyncflow.value_dropped``; one refused even then is counted
(``dead_letters_dropped``) and logged, the only loss there is, and said so.

Example:
    >>> import asyncio
    >>> from asyncflow.protocols import SinkRecord
    >>> from asyncflow.testing import CaptureSink
    >>> from asyncflow.writer import SinkWriter
    >>> async def demo():
    ...     sink = CaptureSink("dead")
    ...     dead = DeadLetters(SinkWriter(sink), None, {}, Metrics())
    ...     table = SinkWriter(CaptureSink("dynamodb:t"))
    ...     dead.rejected(table, SinkRecord("k", {"v": 1}), "no key attribute")
    ...     await dead.writer._write_buffered()
    ...     return sink.records[0].value, dict(sink.records[0].headers)["asyncflow.reason"]
    >>> asyncio.run(demo())
    (b'{"v": 1}', b'sink dynamodb:t refused the record: no key attribute')
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from asyncflow.channels import Channel
from asyncflow.event import Event
from asyncflow.metrics import Metrics
from asyncflow.protocols import RawRecord, SinkRecord
from asyncflow.writer import SinkWriter

log = logging.getLogger("asyncflow.worker")

LOGGED_FIRST = 10
"""Dead letters logged one by one; after these, one line per thousand."""


class DeadLetters:
    """Writes dead letters to the app's dead-letter output (a topic or a sink).

    ``writer`` is that output's writer (the producer when it is a topic named
    ``topic``); ``codecs`` are the app's channels, to encode an event's value
    as its topic does.
    """

    def __init__(
        self,
        writer: SinkWriter,
        topic: str | None,
        codecs: dict[str, Channel[Any]],
        metrics: Metrics,
    ) -> None:
        self.metrics = metrics
        self.writer = writer
        self.topic = topic
        self.channels = codecs
        self.count = 0
        self.refused = 0
        """Output records the sinks refused (each became a dead letter, or was dropped)."""
        self.recent: deque[RecentDeadLetter] = deque(maxlen=RECENT_KEPT)
        """The latest dead letters (at most ``RECENT_KEPT``), newest last, for the web view."""

    def _observe(
        self, reason: str, topic: str, partition: Hashable, offset: int | None,
        otherwise: str = "other",
    ) -> None:
        kind = reason_class(reason, otherwise)
        self.metrics.incr_labeled("dead_letters", (kind,))
        self.recent.append(RecentDeadLetter(time.time(), kind, reason[:REASON_SHOWN], topic,
                                            str(getattr(partition, "partition", partition)),
                                            offset))

    def _headers(self, reason: str, topic: str, partition: Hashable, offset: int) -> list[tuple[str, bytes]]:
        return [
            ("asyncflow.reason", reason.encode()),
            ("asyncflow.topic", topic.encode()),
            ("asyncflow.partition", str(getattr(partition, "partition", partition)).encode()),
            ("asyncflow.offset", str(offset).encode()),
        ]

    def _counted(self, what: str, reason: str) -> None:
        self.count += 1
        self.metrics.incr("dead_letters")
        if self.count <= LOGGED_FIRST or self.count % 1000 == 0:
            log.warning("dead letter #%d %s: %s", self.count, what, reason)

    def raw(self, topic: str, partition: Hashable, rec: RawRecord, reason: str) -> None:
        """A record that could not be decoded (called by the dispatcher)."""
        self._counted(f"from {topic} {partition}@{rec.offset}", reason)
        self._observe(reason, topic, partition, rec.offset, "decode")
        headers = self._headers(reason, topic, partition, rec.offset)
        self.writer.add(SinkRecord(rec.key, rec.value, topic=self.topic, headers=headers))

    async def event(self, event: Event[Any], reason: str, channel: str) -> None:
        """An event an agent failed on, or a late one (``Stream.dead_letter`` counts it)."""
        self.count += 1
        self._observe(reason, channel, event.partition, event.offset)
        ch = self.channels.get(channel)
        try:
            value = ch.codec.encode(event.value) if ch is not None else repr(event.value).encode()
        except Exception:  # noqa: BLE001 - a dead letter must not fail on encoding
            value = repr(event.value).encode()
        key = event.key if isinstance(event.key, bytes) or event.key is None else str(event.key).encode()
        headers = self._headers(reason, channel, event.partition, event.offset)
        await self.writer.send(SinkRecord(key, value, topic=self.topic, headers=headers))

    def rejected(self, writer: SinkWriter, record: SinkRecord, reason: str) -> None:
        """An output record ``writer``'s sink refused for what it is (never waits).

        A dead letter refused by the dead-letter output itself goes again
        without its value; refused once more, it is dropped and counted.
        """
        self.refused += 1
        sink = writer.name
        if self._is_dead_letter(writer, record):
            self._refused_dead_letter(record, reason)
            return
        why = f"sink {sink} refused the record: {reason}"
        self._counted(f"from sink {sink}", why)
        self._observe(why, record.topic or sink, "-", None)
        headers = [("asyncflow.reason", why.encode()), ("asyncflow.sink", sink.encode())]
        if record.topic is not None:
            headers.append(("asyncflow.topic", record.topic.encode()))
        headers.extend(h for h in record.headers if not h[0].startswith("asyncflow."))
        self.writer.add(
            SinkRecord(_as_bytes(record.key), _as_bytes(record.value), topic=self.topic,
                       headers=headers)
        )

    def _is_dead_letter(self, writer: SinkWriter, record: SinkRecord) -> bool:
        if writer is not self.writer:
            return False
        # the dead-letter writer may be the producer, which writes outputs too
        return self.topic is None or record.topic == self.topic

    def _refused_dead_letter(self, record: SinkRecord, reason: str) -> None:
        dropped = any(name == "asyncflow.value_dropped" for name, _ in record.headers)
        if dropped or (record.value is None and record.key is None):
            self.metrics.incr("dead_letters_dropped")
            log.error("the dead-letter output %s refused a dead letter even without its value "
                      "(%s); it is dropped: %s", self.writer.name, reason,
                      _header(record, "asyncflow.reason"))
            return
        size = len(record.value) if isinstance(record.value, bytes | bytearray) else 0
        headers = [*record.headers, ("asyncflow.value_dropped",
                                     f"{size} bytes; the dead-letter output refused it: {reason}"
                                     .encode())]
        self.writer.add(SinkRecord(record.key if isinstance(record.key, bytes) and
                                   len(record.key) <= 1024 else None,
                                   None, topic=record.topic, headers=headers))


RECENT_KEPT = 20
"""How many of the latest dead letters the web view can show."""
REASON_SHOWN = 300
"""Characters of a reason kept for the web view."""

REASON_CLASSES = ("decode", "event_time_ahead", "no_event_time", "late", "agent_error",
                  "sink_rejected", "other")
"""The values of the ``reason`` label of ``asyncflow_dead_letters_total`` (a bounded set)."""


def reason_class(reason: str, otherwise: str = "other") -> str:
    """The bounded class of a dead letter's free-text reason (a metrics label).

    A reason none of the known ones starts like is ``otherwise``: ``decode``
    for an input record the dispatcher could not decode, ``other`` for an
    event sent to the dead letters with a reason of the app's own.

    Example:
        >>> reason_class("late event: every window of event time ... has closed")
        'late'
        >>> reason_class("agent parse raised ValueError: bad")
        'agent_error'
        >>> reason_class("sink out refused the record: MESSAGE_SIZE_TOO_LARGE")
        'sink_rejected'
        >>> reason_class("JSONDecodeError: Expecting value", otherwise="decode")
        'decode'
        >>> reason_class("the app's own reason")
        'other'
    """
    if reason.startswith("late event"):
        return "late"
    if reason.startswith("agent "):
        return "agent_error"
    if reason.startswith("sink "):
        return "sink_rejected"
    if reason.startswith("event time "):
        return "event_time_ahead"
    if reason == "no event time":
        return "no_event_time"
    return otherwise if otherwise in REASON_CLASSES else "other"


@dataclass(slots=True, frozen=True)
class RecentDeadLetter:
    """One dead letter as the web view shows it (no value: values may hold personal data).

    Example:
        >>> RecentDeadLetter(0.0, "decode", "bad JSON", "rides", "0", 7).reason_class
        'decode'
    """

    at: float
    reason_class: str
    reason: str
    topic: str
    partition: str
    offset: int | None


def _as_bytes(value: Any) -> bytes | None:
    """Bytes as they are; other values as JSON (NaN and infinities kept), else their repr."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    try:
        from asyncflow.records import to_builtins

        return json.dumps(to_builtins(value), default=str).encode()
    except Exception:  # noqa: BLE001 - a dead letter must not fail on encoding
        return repr(value).encode()


def _header(record: SinkRecord, name: str) -> str:
    for key, value in record.headers:
        if key == name:
            return value.decode(errors="replace")
    return "-"
