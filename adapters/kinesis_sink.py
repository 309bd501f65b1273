"""Kinesis sink: ``PutRecords`` in requests of up to 500 records / 5 MiB, failed records retried.

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
from asyncflow.protocols import SinkRecord

from ._aws import AwsOptions, Backoff, call_with_retry, endpoint_of, open_client, plain_converter
from .kinesis_stream import check_stream

log = logging.getLogger("adapters.kinesis")

MAX_RECORDS_PER_REQUEST = 500
"""Records per ``PutRecords`` request (a Kinesis limit)."""

MAX_REQUEST_BYTES = 5 * 1024 * 1024
"""Data plus partition keys per ``PutRecords`` request (a Kinesis limit)."""


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

    Example:
        >>> KinesisSinkStats().records_retried
        0
    """

    records_written: int = 0
    requests: int = 0
    records_retried: int = 0


class KinesisSink:
    """Write output records to a Kinesis stream with ``PutRecords``.

    The partition key is ``SinkRecord.key`` (a str; bytes are decoded, other
    values use ``str``; records without a key are spread round-robin over keys
    ``"0"``..``"15"``). The data is the value if it is bytes, else its JSON. Only
    the records the service reports as failed (``ErrorCode``) are sent again,
    with exponential backoff and full jitter, up to ``max_retries`` times; then
    ``SinkError``. A retried record can land after a later record of the same
    key (as with any ``PutRecords`` client); use one record per key per batch
    where order matters. ``_wrap_client(service, client)`` is a testing hook.

    Example:
        >>> sink = KinesisSink("alerts", endpoint_url="http://127.0.0.1:5000",
        ...                    region="us-east-1", linger=0.1)
        >>> sink.linger
        0.1
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
        if key is None:
            return next(self._spread)
        text = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if not 1 <= len(text) <= 256:
            raise SinkError(f"{self.name}: a partition key must have 1 to 256 characters: {key!r}")
        return text

    def _entries(self, records: Sequence[SinkRecord]) -> list[dict[str, Any]]:
        out = []
        for rec in records:
            data = encode_value(rec.value, self._convert)
            key = self._partition_key(rec.key)
            if len(data) + len(key.encode()) > self.max_record_bytes:
                raise SinkError(
                    f"{self.name}: a record of key {rec.key!r} is {len(data)} bytes, over the "
                    f"{self.max_record_bytes}-byte Kinesis record limit"
                )
            out.append({"PartitionKey": key, "Data": data})
        return out

    def _requests(self, entries: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        request: list[dict[str, Any]] = []
        size = 0
        for entry in entries:
            n = len(entry["Data"]) + len(entry["PartitionKey"].encode())
            if request and (
                len(request) == MAX_RECORDS_PER_REQUEST or size + n > self.max_request_bytes
            ):
                yield request
                request, size = [], 0
            request.append(entry)
            size += n
        if request:
            yield request

    async def write(self, records: Sequence[SinkRecord]) -> None:
        """Put every record; return when all are stored, else raise ``SinkError``."""
        if self._client is None:
            raise SinkError(f"{self.name}: write() before start()")
        for request in self._requests(self._entries(records)):
            await self._put(request)

    async def _put(self, entries: list[dict[str, Any]]) -> None:
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
                    Records=entries,
                )
            except SinkError:
                raise
            except AsyncflowError as exc:
                raise SinkError(f"{self.name}: {exc}") from exc
            except Exception as exc:
                raise SinkError(f"{self.name}: PutRecords failed: {exc}") from exc
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
