"""Whether the Kafka cluster answers, told in one line per change instead of the clients' flood.

With the broker down, aiokafka logs every failed connection attempt of every
client (fetcher, group coordinator, metadata, producer) at ERROR, about 60
lines a second, and says nothing when it works again. ``BrokerHealth`` turns
that into one line per state change:

* **lost**: the first connection error (from a client's log record, or from
  the adapter's own calls) logs ``lost connection to the Kafka broker at URL
  (the error); retrying``, at WARNING;
* **still down**: a reminder every ``remind_every`` seconds (60) with the
  number of client errors hidden and the last one;
* **back**: once the cluster answers again, ``Kafka broker at URL reachable
  again after N s``, at INFO.

While a ``BrokerHealth`` watches (while one of its clients runs: each calls
``watch`` as it starts and ``unwatch`` as it stops), a filter on the
``aiokafka`` loggers drops their connection-error records (the first one's
text is in the *lost* line) and reports them; every other record passes.
With the ``asyncflow.kafka`` logger at DEBUG nothing is dropped.

"Back" needs proof, not silence (an idle producer logs nothing while the
broker is down): while lost, ``probe`` (a metadata request, see
``KafkaBroker``) runs every ``probe_interval`` seconds, and the state is back
once a probe, or a call that reached the broker (``ok``), succeeds with no
client connection error seen since it began. Client log records name no
cluster, so every watching ``BrokerHealth`` of the process hears every
connection error: one worker process talks to one cluster.

Example:
    >>> health = BrokerHealth("kafka://127.0.0.1:9092")
    >>> health.lost
    False
    >>> is_connection_error(KafkaConnectionError("Connection at 127.0.0.1:9092 closed"))
    True
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable

from aiokafka.errors import KafkaConnectionError, NodeNotReadyError

from asyncflow.errors import redact_text

__all__ = ["BrokerHealth", "is_connection_error"]

log = logging.getLogger("asyncflow.kafka")

CLIENT_LOGGERS = (
    "aiokafka",
    "aiokafka.admin.client",
    "aiokafka.cluster",
    "aiokafka.conn",
    "aiokafka.consumer.consumer",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.producer.producer",
    "aiokafka.producer.sender",
)
"""aiokafka's loggers (a logger's filters see only its own records, not its children's)."""

_CONNECTION_ERRORS = (KafkaConnectionError, NodeNotReadyError, ConnectionError)

_CLIENT_CANNOT_CONNECT = re.compile(
    r"KafkaConnectionError|NodeNotReadyError|Connect call failed|Connection at \S+ closed"
    r"|Unable connect to node|Connection refused|Connection reset|Broken pipe"
)
"""What aiokafka's log records say when a connection fails or breaks: these start an outage."""
_CLIENT_OUTAGE = re.compile(
    _CLIENT_CANNOT_CONNECT.pattern
    + r"|RequestTimedOutError|KafkaTimeoutError|CoordinatorNotAvailable|NotCoordinator"
    r"|Unable to update metadata|[Mm]arking (?:the )?coordinator dead|Heartbeat session expired"
    r"|Heartbeat send request failed|Error sending \w+Request|LeaveGroup request failed"
    r"|[Tt]imed out"
)
"""What else they say during one (request timeouts, a coordinator unknown, a failed metadata
update): hidden while the broker is lost, shown as they are otherwise, since one of them alone
(a slow group join) is no outage. Both checked on the lines a worker logged with Tansu
killed, cut off by a proxy and back (aiokafka 0.14)."""


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the broker could not be reached (rather than slow, or what it answered).

    Example:
        >>> from aiokafka.errors import TopicAuthorizationFailedError
        >>> is_connection_error(NodeNotReadyError()), is_connection_error(TopicAuthorizationFailedError())
        (True, False)
    """
    return isinstance(exc, _CONNECTION_ERRORS)


class BrokerHealth:
    """One cluster's reachability, and the log lines that tell its changes.

    ``failed(reason)`` and ``ok()`` are what the adapter's calls learn;
    ``watch()`` also listens to the aiokafka clients' log records. ``probe``
    is awaited while lost to learn when the cluster is back (it raises if
    not); without one, only ``ok()`` says so.
    """

    def __init__(
        self,
        url: str,
        *,
        probe: Callable[[], Awaitable[object]] | None = None,
        probe_interval: float = 1.0,
        probe_timeout: float = 5.0,
        remind_every: float = 60.0,
    ) -> None:
        self.url = url
        self.probe = probe
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.remind_every = remind_every
        self.lost = False
        """Whether the cluster is believed unreachable now."""
        self.hidden = 0
        """Client error records dropped in the current outage."""
        self.outages = 0
        """How many times the cluster was lost (since this object was made)."""
        self._since = 0.0
        self._last_error_at = 0.0
        self._last_reason = ""
        self._reminded_at = 0.0
        self._watching = False
        self._holders: set[int] = set()
        self._probing = True
        self._probe_task: asyncio.Task[None] | None = None

    def watch(self, holder: object = None) -> None:
        """Listen to the aiokafka clients' log records while ``holder`` (a running client) needs it.

        Each client that starts calls it for itself and ``unwatch`` when it
        stops: the filter is on while at least one holder runs, so a client
        made and never started (or a broker never closed) leaves nothing
        behind. Calling it again for the same holder is a no-op.
        """
        self._probing = True
        self._holders.add(id(holder))
        if not self._watching:
            self._watching = True
            _FILTER.add(self)

    def failed(self, reason: str) -> bool:
        """A connection error (``reason``, one line); ``True`` if it started an outage (and said so)."""
        now = time.monotonic()
        self._last_error_at = now
        self._last_reason = reason
        if self.lost:
            if now - self._reminded_at >= self.remind_every:
                self._reminded_at = now
                log.warning(
                    "Kafka broker at %s still unreachable after %.0fs (%d client errors hidden, "
                    "last: %s); retrying",
                    self.url, now - self._since, self.hidden, redact_text(reason),
                )
            return False
        self.lost = True
        self.outages += 1
        self.hidden = 0
        self._since = self._reminded_at = now
        log.warning(
            "lost connection to the Kafka broker at %s (%s); retrying. The Kafka client's "
            "repeats of this error are hidden until it answers again (--log-level debug shows "
            "them)",
            self.url, redact_text(reason),
        )
        self._start_probing()
        return True

    def ok(self, since: float | None = None) -> None:
        """A call reached the broker (it began at ``since``, a ``time.monotonic()``).

        Back only if no connection error was seen since the call began (another
        client may still be failing) — with ``since=None``, none in the last
        ``probe_interval`` seconds.
        """
        if not self.lost:
            return
        began = since if since is not None else time.monotonic() - self.probe_interval
        if self._last_error_at >= began:
            return
        now = time.monotonic()
        self.lost = False
        log.info(
            "Kafka broker at %s reachable again after %.1fs (%d client errors hidden)",
            self.url, now - self._since, self.hidden,
        )
        task, self._probe_task = self._probe_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def client_error(self, record: logging.LogRecord, starts_outage: bool) -> bool:
        """A client log record about the connection: ``True`` to let it through.

        While lost, it is hidden (counted) unless DEBUG is on; otherwise one
        that ``starts_outage`` starts one (its text in the *lost* line), and
        any other passes as it is.
        """
        message = record.getMessage()
        if self.lost:
            self.hidden += 1
        elif not starts_outage:
            return True
        self.failed(f"{message} (from {record.name})" if record.name != "aiokafka" else message)
        return log.isEnabledFor(logging.DEBUG)

    def _start_probing(self) -> None:
        if self.probe is None or not self._probing or self._probe_task is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._probe_task = loop.create_task(self._probe_until_back(), name="kafka-health-probe")

    async def _probe_until_back(self) -> None:
        assert self.probe is not None
        while self.lost and self._probing:
            await asyncio.sleep(self.probe_interval)
            began = time.monotonic()
            try:
                async with asyncio.timeout(self.probe_timeout):
                    await self.probe()
            except Exception as exc:  # noqa: BLE001 - any failure means: still unreachable
                log.debug("Kafka health probe of %s failed: %s", self.url, exc)
                continue
            self.ok(since=began)
        if self._probe_task is asyncio.current_task():
            self._probe_task = None

    async def stop_probing(self) -> None:
        """Probe no more until ``watch`` (before the clients a probe uses are closed)."""
        self._probing = False
        task, self._probe_task = self._probe_task, None
        if task is None or task is asyncio.current_task():
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception as exc:  # noqa: BLE001 - a probe's failure is no reason to fail here
            log.debug("the Kafka health probe ended with %s", exc)

    def unwatch(self, holder: object = None) -> None:
        """``holder`` no longer needs the clients' log records; once none does, stop listening."""
        self._holders.discard(id(holder))
        if self._watching and not self._holders:
            self._watching = False
            _FILTER.discard(self)

    async def close(self) -> None:
        """Stop probing and listening to the clients."""
        try:
            await self.stop_probing()
        finally:
            self._holders.clear()
            self.unwatch()


class _ClientErrorFilter(logging.Filter):
    """On aiokafka's loggers while a ``BrokerHealth`` watches: connection errors go to it."""

    def __init__(self) -> None:
        super().__init__("aiokafka")
        self.watchers: list[BrokerHealth] = []

    def add(self, health: BrokerHealth) -> None:
        if not self.watchers:
            for name in _client_logger_names():
                logging.getLogger(name).addFilter(self)
        self.watchers.append(health)

    def discard(self, health: BrokerHealth) -> None:
        if health in self.watchers:
            self.watchers.remove(health)
        if not self.watchers:
            for name in _client_logger_names():
                logging.getLogger(name).removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if not logging.WARNING <= record.levelno < logging.CRITICAL or not self.watchers:
            return True
        message = record.getMessage()
        if not _CLIENT_OUTAGE.search(message):
            return True
        starts = _CLIENT_CANNOT_CONNECT.search(message) is not None
        keep = False
        for health in list(self.watchers):
            keep = health.client_error(record, starts) or keep
        return keep


_FILTER = _ClientErrorFilter()


def _client_logger_names() -> list[str]:
    """aiokafka's loggers: the known ones and any other made by now."""
    names = dict.fromkeys(CLIENT_LOGGERS)
    for name in list(logging.root.manager.loggerDict):
        if name == "aiokafka" or name.startswith("aiokafka."):
            names[name] = None
    return list(names)
