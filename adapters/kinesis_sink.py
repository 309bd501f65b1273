"""Kinesis sink: ``PutRecords`` in requests of up to 500 records / 5 MiB, failed records retried.

**Refused, not retried.** A record Kinesis can never take comes back from
``write`` as ``Rejected(record, reason)`` and the core sends it to the
dead-letter output; the rest of the batch is written. Checked here, before
any request: a value that cannot be encoded as JSON, a partition key that is
not 1 to 256 characters (or not valid Unicode), data plus partition key over
``max_record_bytes`` (1 MiB, Kinesis's limit). NaN and infinities are not
refused: orjson writes them as JSON ``null``. Refused by the service: a
whole request answered with ``ValidationException`` or
``InvalidArgumentException`` names no record, so it is split in halves until
the culprits are alone in a request (the others are written). After the
checks here that happens only when they are looser than the stream's limits
(a ``max_record_bytes`` or ``max_request_bytes`` raised above them): Kinesis
validates a request before it writes any of it, so the halves write nothing
twice. (moto writes the records before a partition key it refuses; the
partition key check here keeps that from happening.)

**Retried, then raised.** The per-record ``ErrorCode`` of a ``PutRecords``
answer is ``ProvisionedThroughputExceededException`` or ``InternalFailure``
(the only two the API documents): both transient, so those records are sent
again with backoff and, after ``max_retries``, ``SinkError`` is raised, as for
throttling, 5xx answers and dropped connections of the whole request.

Example:
    >>> sink = KinesisSink("alerts", region="us-east-1")
    >>> (sink.name, sink.max_batch)
    ('kinesis:alerts', 500)
    >>> encode_value({"id": "a", "n": 1})
    b'{"id":"a","n":1}'
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from asyncflow.errors import AsyncflowError, SinkError, redact_url
from asyncflow.protocols import Rejected, SinkRecord

from ._aws import (
    AwsOptions,
    Backoff,
    call_with_retry,
    describe,
    endpoint_of,
    error_code,
    open_client,
    plain_converter,
)
from .kinesis_stream import check_stream

log = logging.getLogger("adapters.kinesis")

MAX_RECORDS_PER_REQUEST = 500
"""Records per ``PutRecords`` request (a Kinesis limit)."""

MAX_REQUEST_BYTES = 5 * 1024 * 1024
"""Data plus partition keys per ``PutRecords`` request (a Kinesis limit)."""

REFUSED_REQUEST_CODES = frozenset({"ValidationException", "InvalidArgumentException"})
"""Error codes of a ``PutRecords`` request refused for what it holds: split it to find out."""


def encode_value(value: Any, convert: Callable[[Any], Any] | None = None) -> bytes:
    """Bytes as they are; anything else as JSON (orjson), after ``convert`` if given.

    Example:
        >>> encode_value(b"raw"), encode_value("text")
        (b'raw', b'"text"')
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    try:
        return orjson.dumps(convert(value) if convert is not None else value)
    except TypeError as exc:
        raise SinkError(
            f"cannot encode a {type(value).__name__} as JSON for Kinesis: {exc}; "
            f"send bytes, a dict or a dataclass"
        ) from None


@dataclass(slots=True)
class KinesisSinkStats:
    """Counters of a ``KinesisSink``.

    ``records_rejected`` counts records returned as ``Rejected``;
    ``requests_split`` requests the service refused as a whole and that were
    split in halves to find the culprits.

    Example:
        >>> KinesisSinkStats().records_rejected
        0
    """

    records_written: int = 0
    requests: int = 0
    records_retried: int = 0
    records_rejected: int = 0
    requests_split: int = 0


class KinesisSink:
    """Write output records to a Kinesis stream with ``PutRecords``.

    The partition key is ``SinkRecord.key`` (a str; bytes are decoded, other
    values use ``str``; records without a key are spread round-robin over keys
    ``"0"``..``"15"``). The data is the value if it is bytes, else its JSON. Only
    the records the service reports as failed (``ErrorCode``) are sent again,
    with exponential backoff and full jitter, up to ``max_retries`` times; then
    ``SinkError``. A retried record can land after a later record of the same
    key (as with any ``PutRecords`` client); use one record per key per batch
    where order matters. Records that can never be put are returned as
    ``Rejected`` (see the module docstring). ``_wrap_client(service, client)``
    is a testing hook.

    Example:
        >>> sink = KinesisSink("alerts", endpoint_url="http://127.0.0.1:5000",
        ...                    region="us-east-1", linger=0.1)
        >>> sink.linger
        0.1

        A record over the size limit is refused before anything is sent (the
        stand-in for the service answers as Kinesis does):

        >>> import asyncio
        >>> class Stream:
        ...     async def describe_stream_summary(self, StreamName):
        ...         return {"StreamDescriptionSummary": {"StreamStatus": "ACTIVE"}}
        ...     async def put_records(self, StreamName, Records):
        ...         return {"Records": [{"SequenceNumber": "1", "ShardId": "s"} for _ in Records]}
        >>> sink = KinesisSink("alerts", region="us-east-1", endpoint_url="http://127.0.0.1:9",
        ...                    max_record_bytes=100, _wrap_client=lambda service, c: Stream())
        >>> async def demo():
        ...     await sink.start()
        ...     try:
        ...         return await sink.write([SinkRecord("a", {"n": 1}), SinkRecord("b", b"x" * 200)])
        ...     finally:
        ...         await sink.stop()
        >>> [(r.record.key, r.reason) for r in asyncio.run(demo())]
        [('b', 'the record is 201 bytes (data and partition key), over the 100-byte Kinesis record limit')]
        >>> sink.stats.records_written
        1
    """

    def __init__(
        self,
        stream: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_batch: int = MAX_RECORDS_PER_REQUEST,
        linger: float = 0.05,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_record_bytes: int = 1024 * 1024,
        max_retries: int = 10,
        backoff_base: float = 0.05,
        backoff_cap: float = 5.0,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        profile: str | None = None,
        name: str | None = None,
        _wrap_client: Callable[[str, Any], Any] | None = None,
    ) -> None:
        self.stream = stream
        self.name = name or f"kinesis:{stream}"
        self.max_batch = max_batch
        self.linger = linger
        self.max_request_bytes = max_request_bytes
        self.max_record_bytes = max_record_bytes
        self.stats = KinesisSinkStats()
        self._options = AwsOptions(
            endpoint_url=endpoint_url,
            region=region,
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token,
            profile=profile,
        )
        self._backoff = Backoff(backoff_base, backoff_cap, max_retries)
        self._wrap_client = _wrap_client
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._endpoint = redact_url(endpoint_url) if endpoint_url else "?"
        self._convert = plain_converter()
        self._spread = itertools.cycle([str(i) for i in range(16)])

    async def start(self) -> None:
        """Open the client and check that the stream exists (``StreamNotFound`` if not)."""
        self._stack = contextlib.AsyncExitStack()
        try:
            raw = await open_client(self._stack, "kinesis", self._options)
            self._endpoint = endpoint_of(raw)
            self._client = self._wrap_client("kinesis", raw) if self._wrap_client else raw
            await check_stream(self._client, self.stream, self._backoff)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close the client."""
        stack, self._stack = self._stack, None
        self._client = None
        if stack is not None:
            await stack.aclose()

    def _partition_key(self, key: Any) -> str:
        """The partition key of ``key``, or ``_Refused`` with the reason."""
        if key is None:
            return next(self._spread)
        text = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if not 1 <= len(text) <= 256:
            raise _Refused(
                f"a partition key must have 1 to 256 characters, this one has {len(text)}: "
                f"{_short(key)}"
            )
        return text

    def _entry(self, rec: SinkRecord) -> dict[str, Any]:
        """The ``PutRecords`` entry of ``rec``, or ``_Refused`` with the reason."""
        try:
            data = encode_value(rec.value, self._convert)
        except SinkError as exc:
            raise _Refused(str(exc)) from None
        key = self._partition_key(rec.key)
        try:
            size = len(data) + len(key.encode())
        except UnicodeEncodeError:
            raise _Refused(f"the partition key is not valid Unicode text: {_short(rec.key)}") from None
        if size > self.max_record_bytes:
            raise _Refused(
                f"the record is {size} bytes (data and partition key), over the "
                f"{self.max_record_bytes}-byte Kinesis record limit"
            )
        return {"PartitionKey": key, "Data": data}

    def _entries(
        self, records: Sequence[SinkRecord], rejected: list[tuple[int, Rejected]]
    ) -> list[_Entry]:
        out = []
        for index, rec in enumerate(records):
            try:
                out.append((index, rec, self._entry(rec)))
            except _Refused as exc:
                rejected.append((index, Rejected(rec, str(exc))))
        return out

    def _requests(self, entries: list[_Entry]) -> Iterator[list[_Entry]]:
        request: list[_Entry] = []
        size = 0
        for entry in entries:
            n = len(entry[2]["Data"]) + len(entry[2]["PartitionKey"].encode())
            if request and (
                len(request) == MAX_RECORDS_PER_REQUEST or size + n > self.max_request_bytes
            ):
                yield request
                request, size = [], 0
            request.append(entry)
            size += n
        if request:
            yield request

    async def write(self, records: Sequence[SinkRecord]) -> list[Rejected]:
        """Put every record; return the ones refused for good (``Rejected``, in input order).

        Everything not returned is stored when this returns; what cannot be
        put for a transient reason raises ``SinkError`` after bounded retries.
        """
        if self._client is None:
            raise SinkError(f"{self.name}: write() before start()")
        rejected: list[tuple[int, Rejected]] = []
        for request in self._requests(self._entries(records, rejected)):
            await self._put(request, rejected)
        self.stats.records_rejected += len(rejected)
        rejected.sort(key=lambda r: r[0])
        return [r for _, r in rejected]

    async def _put(self, entries: list[_Entry], rejected: list[tuple[int, Rejected]]) -> None:
        attempt = 0
        while True:
            try:
                response = await call_with_retry(
                    self._client.put_records,
                    backoff=self._backoff,
                    service="kinesis",
                    endpoint=self._endpoint,
                    what=f"PutRecords to {self.stream!r}",
                    fail=SinkError,
                    StreamName=self.stream,
                    Records=[e for _, _, e in entries],
                )
            except SinkError:
                raise
            except AsyncflowError as exc:
                raise SinkError(f"{self.name}: {exc}") from exc
            except Exception as exc:
                if error_code(exc) not in REFUSED_REQUEST_CODES:
                    raise SinkError(f"{self.name}: PutRecords failed: {describe(exc)}") from exc
                self.stats.requests += 1
                await self._split(entries, exc, rejected)
                return
            self.stats.requests += 1
            results = response.get("Records", [])
            failed = [e for e, r in zip(entries, results, strict=True) if r.get("ErrorCode")]
            self.stats.records_written += len(entries) - len(failed)
            if not failed:
                return
            codes = sorted({str(r["ErrorCode"]) for r in results if r.get("ErrorCode")})
            self.stats.records_retried += len(failed)
            if attempt >= self._backoff.max_retries:
                raise SinkError(
                    f"{self.name}: {len(failed)} records still failing after {attempt + 1} "
                    f"attempts ({', '.join(codes)}); add shards or slow the producer down"
                )
            log.debug(
                "%s: %d records failed (%s), retry %d", self.name, len(failed), codes, attempt
            )
            await self._backoff.sleep(attempt)
            attempt += 1
            entries = failed

    async def _split(
        self, entries: list[_Entry], exc: BaseException, rejected: list[tuple[int, Rejected]]
    ) -> None:
        """The service refused ``entries`` as a whole: a lone record is refused, else halves."""
        if len(entries) == 1:
            index, rec, _ = entries[0]
            rejected.append((index, Rejected(rec, f"Kinesis refused the record: {describe(exc)}")))
            return
        self.stats.requests_split += 1
        middle = len(entries) // 2
        await self._put(entries[:middle], rejected)
        await self._put(entries[middle:], rejected)


_Entry = tuple[int, SinkRecord, dict[str, Any]]
"""A record's index in the write, the record, and its ``PutRecords`` entry."""


class _Refused(Exception):
    """A record Kinesis cannot take (internal; it becomes a ``Rejected``)."""


def _short(key: Any) -> str:
    """A key for a message, shortened to 60 characters."""
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."
