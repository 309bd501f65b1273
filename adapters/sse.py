"""Server-Sent Events source (e.g. Wikimedia EventStreams) on aiohttp-sse-client.

One partition, ``TopicPartition(name, 0)``. Each SSE message becomes a record:
``value`` is the ``data:`` text as UTF-8 bytes, passed through unparsed (the
core dead-letters what does not decode), ``offset`` a running counter,
``timestamp`` the receive time, headers ``sse-event`` and ``sse-id``.

The connection is re-opened with exponential backoff and full jitter, sending
``Last-Event-ID`` of the last event *read*, so nothing is lost or repeated
while the process lives. ``commit`` turns the last processed offset back into
its event id (``committed_event_id``) and hands it to ``checkpoint`` (a file
path or a callable), from which a restart resumes. A connection that brings
neither events nor comments for ``silence_timeout`` seconds is dropped and
re-opened.

Example:
    >>> src = SSESource("https://stream.wikimedia.org/v2/stream/recentchange", name="wiki")
    >>> src.partition
    TopicPartition(topic='wiki', partition=0)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp.http_exceptions import LineTooLong
from aiohttp_sse_client.client import (
    READY_STATE_CONNECTING,
    EventSource,
)

from asyncflow.errors import AsyncflowError, BrokerUnavailable, ConfigError
from asyncflow.protocols import Partition, PartitionListener, RawBatch, Record, TopicPartition

log = logging.getLogger("adapters.sse")

Checkpoint = str | os.PathLike[str] | Callable[[str], Awaitable[None] | None]
"""Where committed event ids go: a file (replaced atomically and fsynced) or a callable."""

FATAL_STATUSES = frozenset({400, 401, 403, 404, 405, 406, 410, 414, 415, 451})
"""HTTP answers that retrying will not fix: the source stops with a ``ConfigError``."""


class SSEUnavailable(BrokerUnavailable):
    """The SSE server could not be reached when the source started.

    Example:
        >>> str(SSEUnavailable("http://127.0.0.1:1/s", "connection refused"))[:42]
        'cannot reach SSE server http://127.0.0.1:1'
    """

    def __init__(self, url: str, reason: str) -> None:
        AsyncflowError.__init__(
            self, f"cannot reach SSE server {url}: {reason} (is the URL right and the server up?)"
        )
        self.url = url
        self.reason = reason


class _StreamEnded(Exception):
    """The server closed the response normally."""


@dataclass(slots=True)
class SSESourceStats:
    """Counters of an ``SSESource``.

    Example:
        >>> SSESourceStats().reconnects
        0
    """

    events: int = 0
    connections: int = 0
    reconnects: int = 0
    silence_timeouts: int = 0
    undecodable_lines: int = 0


def _data_of_undecodable(line: bytes) -> bytes | None:
    """The raw value of a ``data:`` line that is not valid UTF-8 (``None`` for other fields)."""
    line = line.rstrip(b"\r\n")
    if not line.startswith(b"data"):
        return None
    rest = line[4:]
    if rest.startswith(b":"):
        rest = rest[1:]
        return rest[1:] if rest.startswith(b" ") else rest
    return b"" if not rest else None


class SSESource:
    """Read a Server-Sent Events stream as a single-partition source.

    ``reconnect_backoff=(first, cap)`` bounds the jittered wait between
    connection attempts. ``last_event_id`` (or the id stored in ``checkpoint``,
    which wins) is where a fresh source resumes. Lines longer than
    ``max_line_bytes`` stop the source with a clear error. A 4xx answer such
    as 404 stops it too; network errors and 5xx are retried forever, with a
    one-line warning each time.

    Example:
        >>> src = SSESource("http://127.0.0.1:8080/stream", checkpoint="/tmp/wiki.id",
        ...                 silence_timeout=30.0)
        >>> src.committed_event_id is None
        True
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "sse",
        headers: Mapping[str, str] | None = None,
        reconnect_backoff: tuple[float, float] = (0.5, 30.0),
        silence_timeout: float = 60.0,
        last_event_id: str | None = None,
        checkpoint: Checkpoint | None = None,
        connect_timeout: float = 10.0,
        max_buffer: int = 10_000,
        max_line_bytes: int = 1 << 21,
    ) -> None:
        first, cap = reconnect_backoff
        if not 0 < first <= cap:
            raise ConfigError("reconnect_backoff must be (first, cap) with 0 < first <= cap")
        if silence_timeout <= 0 or max_buffer < 1:
            raise ConfigError("silence_timeout must be > 0 and max_buffer >= 1")
        self.url = url
        self.topic = name
        self.partition = TopicPartition(name, 0)
        self.headers = dict(headers or {})
        self.reconnect_backoff = (first, cap)
        self.silence_timeout = silence_timeout
        self.connect_timeout = connect_timeout
        self.max_buffer = max_buffer
        self.max_line_bytes = max_line_bytes
        self.stats = SSESourceStats()
        self._checkpoint = checkpoint
        self.offsets_survive_restarts = False
        """Offsets count the records of this run (from 0): durable state must not compare them
        with an earlier run's (it then may apply the events since the last commit twice)."""
        self.positions_survive_restarts = checkpoint is not None
        """Only with a checkpoint does a restart resume where the last run stopped (and so
        may its state); without one it starts from the live stream, and so does state."""
        self._last_id: str | None = last_event_id
        self._committed_id: str | None = None
        self._next_offset = 0
        self._ids: deque[tuple[int, str]] = deque()  # (first offset with this id, id)
        self._buffer: list[Record] = []
        self._data_ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self._last_status: int | None = None

    @property
    def last_event_id(self) -> str | None:
        """Id of the last event read (what a reconnect sends as ``Last-Event-ID``)."""
        return self._last_id

    @property
    def committed_event_id(self) -> str | None:
        """Id of the last event whose processing the core committed."""
        return self._committed_id

    async def start(self, listener: PartitionListener) -> None:
        """Load the checkpoint, open the stream and assign the single partition.

        Raises ``BrokerUnavailable`` if the server cannot be reached and
        ``ConfigError`` if it refuses the request (wrong URL, 401...).
        """
        if isinstance(self._checkpoint, str | os.PathLike):
            stored = await asyncio.to_thread(read_checkpoint, Path(self._checkpoint), self._last_id)
            self._last_id = stored or self._last_id
        self._committed_id = self._last_id
        connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(connected), name=f"sse:{self.topic}")
        try:
            await connected
        except BaseException:
            await self.stop()
            raise
        await listener.on_assigned([self.partition])

    async def stop(self) -> None:
        """Close the connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def pause(self, partitions: Iterable[Partition]) -> None:
        """Stop handing out records (reading stops once ``max_buffer`` are waiting)."""
        if self.partition in set(partitions):
            self._resumed.clear()

    def resume(self, partitions: Iterable[Partition]) -> None:
        """Hand out records again."""
        if self.partition in set(partitions):
            self._resumed.set()

    async def fetch(self, timeout: float) -> list[RawBatch]:
        """Everything read since the last call, as one batch; ``[]`` after ``timeout`` s."""
        self._raise_if_failed()
        task = self._task
        if task is None:
            raise AsyncflowError("SSESource.fetch() before start()")
        wait_for = self._data_ready if self._resumed.is_set() else self._resumed
        if not (self._buffer and self._resumed.is_set()):
            waiter = asyncio.ensure_future(wait_for.wait())
            await asyncio.wait({waiter, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            self._raise_if_failed()
        if not self._resumed.is_set() or not self._buffer:
            return []
        records, self._buffer = self._buffer, []
        self._data_ready.clear()
        self._space.set()
        return [RawBatch(self.topic, self.partition, records)]

    async def commit(self, positions: Mapping[Partition, int]) -> None:
        """Record the id of the last processed event and persist it to ``checkpoint``."""
        offset = positions.get(self.partition)
        if offset is None:
            return
        committed = None
        ids = self._ids
        while ids and ids[0][0] <= offset:  # keep the head: later offsets may share its id
            committed = ids[0][1]
            if len(ids) > 1 and ids[1][0] <= offset:
                ids.popleft()
            else:
                break
        if committed is None or committed == self._committed_id:
            return
        self._committed_id = committed
        target = self._checkpoint
        if target is None:
            return
        if isinstance(target, str | os.PathLike):
            await asyncio.to_thread(write_checkpoint, Path(target), committed)
            return
        result = target(committed)
        if inspect.isawaitable(result):
            await result

    def _raise_if_failed(self) -> None:
        task = self._task
        if task is not None and task.done() and not task.cancelled():
            exc = task.exception()
            if exc is not None:
                raise exc

    async def _run(self, connected: asyncio.Future[None]) -> None:
        try:
            await self._reconnecting(connected)
        except BaseException as exc:
            if connected.done():
                raise
            if isinstance(exc, asyncio.CancelledError):
                connected.cancel()
                raise
            connected.set_exception(exc)

    async def _reconnecting(self, connected: asyncio.Future[None]) -> None:
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(self._on_request_end)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.connect_timeout, sock_read=self.silence_timeout
        )
        async with aiohttp.ClientSession(
            timeout=timeout,
            trace_configs=[trace],
            read_bufsize=max(1 << 16, self.max_line_bytes // 2),
        ) as session:
            failures = 0
            while True:
                before = self.stats.events
                try:
                    await self._connection(session, connected)
                    reason = "the server ended the stream"
                except _StreamEnded:
                    reason = "the server ended the stream"
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    reason = self._reason(exc)
                    if not connected.done():
                        connected.set_exception(
                            self._fatal(exc) or SSEUnavailable(self.url, reason)
                        )
                        return
                    fatal = self._fatal(exc)
                    if fatal is not None:
                        raise fatal from exc
                except LineTooLong:
                    raise ConfigError(
                        f"an SSE line from {self.url} is longer than max_line_bytes="
                        f"{self.max_line_bytes}; raise it"
                    ) from None
                failures = 0 if self.stats.events > before else failures + 1
                first, cap = self.reconnect_backoff
                delay = self._rng.uniform(first / 2, min(cap, first * 2 ** min(failures, 30)))
                log.warning(
                    "SSE %s: disconnected (%s) after %d events; reconnecting in %.2f s "
                    "with Last-Event-ID %s",
                    self.url,
                    reason,
                    self.stats.events - before,
                    delay,
                    self._last_id,
                )
                self.stats.reconnects += 1
                await asyncio.sleep(delay)

    async def _on_request_end(
        self, session: aiohttp.ClientSession, ctx: SimpleNamespace, params: Any
    ) -> None:
        self._last_status = int(params.response.status)

    def _reason(self, exc: BaseException) -> str:
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return f"no connection within {self.connect_timeout:g} s"
        if isinstance(exc, TimeoutError):
            self.stats.silence_timeouts += 1
            return f"no event or comment for {self.silence_timeout:g} s"
        return f"{type(exc).__name__}: {exc}".rstrip(": ")

    def _fatal(self, exc: BaseException) -> ConfigError | None:
        status = self._last_status
        if isinstance(exc, ConnectionError) and status in FATAL_STATUSES:
            return ConfigError(
                f"SSE server {self.url} answered HTTP {status}; check the URL and the headers"
            )
        if isinstance(exc, ConnectionAbortedError) and "Content-Type" in str(exc):
            return ConfigError(f"{self.url} is not an event stream: {exc}")
        return None

    async def _connection(
        self, session: aiohttp.ClientSession, connected: asyncio.Future[None]
    ) -> None:
        headers = dict(self.headers)
        if self._last_id:
            headers["Last-Event-ID"] = self._last_id
        source: Any = None

        def on_error() -> None:  # called by EventSource when the response ends
            if source is not None and source.ready_state == READY_STATE_CONNECTING:
                raise _StreamEnded  # reconnect here, with our backoff and Last-Event-ID

        self._last_status = None
        source = EventSource(
            self.url,
            session=session,
            headers=headers,
            on_error=on_error,
            reconnection_time=timedelta(0),
            max_connect_retry=0,
        )
        try:
            await source.connect()
            self.stats.connections += 1
            if not connected.done():
                connected.set_result(None)
            while True:
                try:
                    event = await source.__anext__()
                except StopAsyncIteration:
                    return
                except UnicodeDecodeError as exc:  # a line that is not UTF-8: pass it on raw
                    self.stats.undecodable_lines += 1
                    data = _data_of_undecodable(bytes(exc.object))
                    log.warning("SSE %s: a line is not UTF-8 (%s)", self.url, exc.reason)
                    if data is not None:
                        await self._add(data, "message")
                    continue
                if event.last_event_id:
                    self._last_id = event.last_event_id
                await self._add(event.data.encode(), event.type or "message")
        finally:
            await source.close()

    async def _add(self, value: bytes, kind: str) -> None:
        while len(self._buffer) >= self.max_buffer:
            self._space.clear()
            await self._space.wait()
        offset = self._next_offset
        self._next_offset += 1
        event_id = self._last_id
        headers: list[tuple[str, bytes]] = [("sse-event", kind.encode())]
        if event_id is not None:
            headers.append(("sse-id", event_id.encode()))
            if not self._ids or self._ids[-1][1] != event_id:
                self._ids.append((offset, event_id))
        self._buffer.append(Record(offset, None, value, int(time.time() * 1000), headers))
        self.stats.events += 1
        self._data_ready.set()


def read_checkpoint(path: Path, fallback: str | None = None) -> str | None:
    """The event id stored in a checkpoint file, or ``None`` (with one log line) if there is none.

    A missing file, an empty one, or one without its final newline (a write cut
    short by a crash, from before writes were atomic) is no checkpoint: the
    source then starts from ``fallback`` (its ``last_event_id``), else the live
    stream. A temporary file left by an interrupted write is ignored. A file that
    cannot be read at all is a ``ConfigError``.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> write_checkpoint(d / "wiki.id", "42")
        >>> read_checkpoint(d / "wiki.id"), read_checkpoint(d / "missing.id")
        ('42', None)
    """
    start = f"last_event_id {fallback!r}" if fallback else "the live stream"
    leftover = _temporary(path)
    if leftover.exists():
        log.warning("SSE checkpoint %s: ignoring %s left by an interrupted write", path, leftover)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        log.info("SSE checkpoint %s does not exist yet: starting from %s", path, start)
        return None
    except OSError as exc:
        raise ConfigError(
            f"cannot read the SSE checkpoint {path}: {exc.strerror or exc}; fix its permissions "
            "or remove it to start from last_event_id"
        ) from None
    text = raw.decode("utf-8", errors="replace")
    stored = text.strip()
    if not stored or not text.endswith("\n") or "\ufffd" in text:
        what = "is empty" if not stored else "is torn (no final newline or not UTF-8)"
        log.warning("SSE checkpoint %s %s, from a write cut short: starting from %s",
                    path, what, start)
        return None
    return stored


def write_checkpoint(path: Path, event_id: str) -> None:
    """Replace the checkpoint file so that a crash leaves the old id or the new one, never a torn file.

    The id goes to a temporary file in the same directory, which is flushed and
    fsynced, renamed over the old file (``os.replace`` is atomic), and then the
    directory is fsynced so the rename itself survives a power cut.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "wiki.id"
        >>> write_checkpoint(p, "a"); write_checkpoint(p, "b")
        >>> p.read_text() == "b\\n"
        True
    """
    tmp = _temporary(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(event_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename still happened
        pass
    finally:
        os.close(fd)
