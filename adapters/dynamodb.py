"""DynamoDB sink: upserts output records as items, in ``BatchWriteItem`` chunks of 25.

Values become DynamoDB attributes exactly: a float is stored as the decimal of
its shortest ``repr`` (``0.1`` is stored as ``0.1`` and reads back as the same
float), datetimes as ISO-8601 strings, dicts and lists as maps and lists.
NaN, infinities and numbers outside DynamoDB's range are refused with a
``SinkError`` naming the item and the field.

Example:
    >>> sink = DynamoDBSink("example", key="id", region="us-east-1")
    >>> (sink.max_batch, sink.linger)
    (1000, 5.0)
    >>> to_attribute({"average": 0.1, "n": 3}, "value")
    {'M': {'average': {'N': '0.1'}, 'n': {'N': '3'}}}
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from asyncflow.errors import AsyncflowError, ConfigError, SinkError, redact_url
from asyncflow.protocols import SinkRecord

from ._aws import (
    AwsOptions,
    Backoff,
    call_with_retry,
    describe,
    endpoint_of,
    error_code,
    first_error,
    open_client,
    plain_converter,
)
from .dynamodb_values import InvalidItemValue, from_attribute, item_from_dynamodb, to_attribute

__all__ = [
    "BATCH_LIMIT",
    "DynamoDBSink",
    "DynamoDBSinkStats",
    "InvalidItemValue",
    "TableNotFound",
    "ensure_table",
    "from_attribute",
    "item_from_dynamodb",
    "to_attribute",
]

log = logging.getLogger("adapters.dynamodb")

BATCH_LIMIT = 25
"""Items per ``BatchWriteItem`` request (a DynamoDB limit)."""


class TableNotFound(ConfigError):
    """The DynamoDB table does not exist (and the sink may not create it).

    Example:
        >>> "create-table" in str(TableNotFound("t", "id", None, "S", "S", "http://x", "r"))
        True
    """

    def __init__(
        self,
        table: str,
        key: str,
        sort_key: str | None,
        key_type: str,
        sort_key_type: str,
        endpoint: str,
        region: str,
    ) -> None:
        attrs = f"AttributeName={key},AttributeType={key_type}"
        schema = f"AttributeName={key},KeyType=HASH"
        if sort_key:
            attrs += f" AttributeName={sort_key},AttributeType={sort_key_type}"
            schema += f" AttributeName={sort_key},KeyType=RANGE"
        super().__init__(
            f"DynamoDB table {table!r} does not exist at {endpoint} (region {region}); create it "
            f"with `aws dynamodb create-table --table-name {table} --attribute-definitions "
            f"{attrs} --key-schema {schema} --billing-mode PAY_PER_REQUEST` or pass "
            f"create_table=True (development)"
        )
        self.table = table


@dataclasses.dataclass(slots=True)
class DynamoDBSinkStats:
    """Counters of a ``DynamoDBSink`` (for metrics and tests).

    Example:
        >>> DynamoDBSinkStats().items_written
        0
    """

    items_written: int = 0
    requests: int = 0
    unprocessed_retried: int = 0
    duplicates_collapsed: int = 0


class DynamoDBSink:
    """Upsert output records into a DynamoDB table, keyed by ``key`` (+ ``sort_key``).

    Each record's value (a dict, a dataclass or an asyncflow record) becomes one
    item; the key attribute comes from the value or, when the value lacks it,
    from ``SinkRecord.key``. Within a batch the last write of a key wins.
    ``write`` returns when every item is stored; throttling and
    ``UnprocessedItems`` are retried with exponential backoff and full jitter,
    ``max_retries`` times, then ``SinkError`` is raised.

    Endpoint, region and credentials come from the options or the usual AWS
    environment (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``...).
    ``create_table=True`` creates a missing on-demand table (for development).
    ``_wrap_client`` is a testing hook: it receives the aiobotocore client once,
    at start, and returns the object the sink calls (to inject failures).

    Example:
        >>> sink = DynamoDBSink("averages", key="id", sort_key="from",
        ...                     endpoint_url="http://127.0.0.1:5000", region="us-east-1")
        >>> sink.name
        'dynamodb:averages'
    """

    def __init__(
        self,
        table: str,
        key: str = "id",
        sort_key: str | None = None,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        flush_interval: float = 5.0,
        max_batch: int = 1000,
        create_table: bool = False,
        key_type: str = "S",
        sort_key_type: str = "S",
        max_retries: int = 10,
        backoff_base: float = 0.05,
        backoff_cap: float = 5.0,
        concurrency: int = 4,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        profile: str | None = None,
        name: str | None = None,
        _wrap_client: Callable[[str, Any], Any] | None = None,
    ) -> None:
        if key_type not in ("S", "N", "B") or sort_key_type not in ("S", "N", "B"):
            raise ConfigError("key_type and sort_key_type must be 'S', 'N' or 'B'")
        if concurrency < 1 or max_batch < 1:
            raise ConfigError("concurrency and max_batch must be at least 1")
        self.table = table
        self.key = key
        self.sort_key = sort_key
        self.name = name or f"dynamodb:{table}"
        self.max_batch = max_batch
        self.linger = flush_interval
        self.create_table = create_table
        self.key_type = key_type
        self.sort_key_type = sort_key_type
        self.concurrency = concurrency
        self.stats = DynamoDBSinkStats()
        self._options = AwsOptions(
            endpoint_url=endpoint_url,
            region=region,
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token,
            profile=profile,
            max_pool_connections=max(16, concurrency * 2),
        )
        self._backoff = Backoff(backoff_base, backoff_cap, max_retries)
        self._wrap_client = _wrap_client
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._endpoint = redact_url(endpoint_url) if endpoint_url else "?"
        self._region = region or "?"
        self._convert: Callable[[Any], Any] = plain_converter()
        self._key_attrs = (key,) if sort_key is None else (key, sort_key)

    async def start(self) -> None:
        """Open the client and check the table (creating it if allowed).

        Raises ``TableNotFound``, ``AwsCredentialsError``, ``AwsUnavailable`` or
        ``ConfigError`` (key schema mismatch) with what to do.
        """
        self._stack = contextlib.AsyncExitStack()
        try:
            raw = await open_client(self._stack, "dynamodb", self._options)
            self._endpoint = endpoint_of(raw)
            self._region = str(raw.meta.region_name)
            self._client = self._wrap_client("dynamodb", raw) if self._wrap_client else raw
            await self._check_table()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close the client (``write`` has no buffer, so nothing is lost)."""
        stack, self._stack = self._stack, None
        self._client = None
        if stack is not None:
            await stack.aclose()

    async def write(self, records: Sequence[SinkRecord]) -> None:
        """Store every record; return when all are durable, else raise ``SinkError``."""
        if self._client is None:
            raise SinkError(f"{self.name}: write() before start()")
        items = self._collapse(records)
        chunks = [items[i : i + BATCH_LIMIT] for i in range(0, len(items), BATCH_LIMIT)]
        if not chunks:
            return
        it: Iterator[list[dict[str, Any]]] = iter(chunks)
        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(self.concurrency, len(chunks))):
                    tg.create_task(self._write_chunks(it))
        except BaseExceptionGroup as group:
            exc = first_error(group)
            if isinstance(exc, SinkError):
                raise exc from None
            if isinstance(exc, AsyncflowError):
                raise SinkError(f"{self.name}: {exc}") from exc
            raise SinkError(f"{self.name}: write failed: {describe(exc)}") from exc

    def _collapse(self, records: Sequence[SinkRecord]) -> list[dict[str, Any]]:
        by_key: dict[tuple[Any, ...], dict[str, Any]] = {}
        for rec in records:
            item = self._item(rec)
            ident = tuple(next(iter(item[a].items())) for a in self._key_attrs)
            by_key[ident] = item
        self.stats.duplicates_collapsed += len(records) - len(by_key)
        return list(by_key.values())

    def _item(self, rec: SinkRecord) -> dict[str, Any]:
        value = self._convert(rec.value)
        if not isinstance(value, Mapping):
            raise SinkError(
                f"{self.name}: values must be dicts, dataclasses or records, "
                f"got {type(value).__name__} (key {rec.key!r})"
            )
        fields = dict(value)
        if self.key not in fields or fields[self.key] is None:
            if rec.key is None:
                raise SinkError(
                    f"{self.name}: record has no {self.key!r} field and no key; "
                    f"send it with a key or add the field"
                )
            fields[self.key] = rec.key
        if self.sort_key is not None and fields.get(self.sort_key) is None:
            raise SinkError(f"{self.name}: record {rec.key!r} has no sort key {self.sort_key!r}")
        try:
            item = {str(k): to_attribute(v, str(k)) for k, v in fields.items()}
        except InvalidItemValue as exc:
            raise InvalidItemValue(
                exc.path, f"{exc.problem} ({self.name}, {self.key}={fields[self.key]!r})"
            ) from None
        for attr in self._key_attrs:
            kind = next(iter(item[attr]))
            if kind not in ("S", "N", "B"):
                raise SinkError(
                    f"{self.name}: key attribute {attr!r} must be a string, number or bytes, "
                    f"got {fields[attr]!r}"
                )
        return item

    async def _write_chunks(self, chunks: Iterator[list[dict[str, Any]]]) -> None:
        for chunk in chunks:
            await self._write_chunk(chunk)

    async def _write_chunk(self, items: list[dict[str, Any]]) -> None:
        pending: dict[str, Any] = {self.table: [{"PutRequest": {"Item": i}} for i in items]}
        attempt = 0
        while True:
            try:
                response = await call_with_retry(
                    self._client.batch_write_item,
                    backoff=self._backoff,
                    service="dynamodb",
                    endpoint=self._endpoint,
                    what=f"BatchWriteItem on {self.table!r}",
                    fail=SinkError,
                    RequestItems=pending,
                )
            except SinkError:
                raise
            except AsyncflowError as exc:
                raise SinkError(f"{self.name}: {exc}") from exc
            except Exception as exc:
                raise SinkError(self._explain(exc)) from exc
            self.stats.requests += 1
            sent = len(pending[self.table])
            unprocessed = (response.get("UnprocessedItems") or {}).get(self.table) or []
            self.stats.items_written += sent - len(unprocessed)
            if not unprocessed:
                return
            self.stats.unprocessed_retried += len(unprocessed)
            if attempt >= self._backoff.max_retries:
                raise SinkError(
                    f"{self.name}: {len(unprocessed)} items still unprocessed after "
                    f"{attempt + 1} attempts; the table is throttling writes: raise its write "
                    f"capacity or switch it to on-demand"
                )
            log.debug("%s: %d unprocessed items, retry %d", self.name, len(unprocessed), attempt)
            await self._backoff.sleep(attempt)
            attempt += 1
            pending = {self.table: unprocessed}

    def _explain(self, exc: BaseException) -> str:
        code = error_code(exc)
        if code == "ResourceNotFoundException":
            return str(self._missing())
        if code == "ValidationException":
            return f"{self.name}: DynamoDB refused the batch: {describe(exc)}"
        return f"{self.name}: BatchWriteItem failed: {describe(exc)}"

    def _missing(self) -> TableNotFound:
        return TableNotFound(
            self.table,
            self.key,
            self.sort_key,
            self.key_type,
            self.sort_key_type,
            self._endpoint,
            self._region,
        )

    async def _check_table(self) -> None:
        keys = [(self.key, self.key_type)]
        if self.sort_key is not None:
            keys.append((self.sort_key, self.sort_key_type))
        await ensure_table(
            self._client,
            self.table,
            keys,
            create=self.create_table,
            backoff=self._backoff,
            endpoint=self._endpoint,
            on_missing=self._missing,
        )


async def ensure_table(
    client: Any,
    table: str,
    keys: Sequence[tuple[str, str]],
    *,
    create: bool,
    backoff: Backoff,
    endpoint: str,
    on_missing: Callable[[], Exception],
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Check that ``table`` exists with key schema ``keys`` ([(name, "S"|"N"|"B")], hash first).

    A missing table is created on demand (``PAY_PER_REQUEST``) when ``create``
    is true, else ``on_missing()`` is raised. Returns the table description once
    it is ``ACTIVE``; a table keyed differently raises ``ConfigError``.

    Example:
        >>> async def demo(client: Any) -> None:
        ...     await ensure_table(client, "leases", [("stream", "S"), ("shard_id", "S")],
        ...                        create=True, backoff=Backoff(), endpoint="http://127.0.0.1:5000",
        ...                        on_missing=lambda: ConfigError("no table"))
    """

    async def call(op: str, **kwargs: Any) -> Any:
        return await call_with_retry(
            getattr(client, op),
            backoff=backoff,
            service="dynamodb",
            endpoint=endpoint,
            what=f"{op} on {table!r}",
            fail=ConfigError,
            **kwargs,
        )

    try:
        desc: dict[str, Any] = (await call("describe_table", TableName=table))["Table"]
    except Exception as exc:
        if error_code(exc) != "ResourceNotFoundException":
            raise
        if not create:
            raise on_missing() from None
        log.warning("creating missing DynamoDB table %r (on-demand) at %s", table, endpoint)
        try:
            await call(
                "create_table",
                TableName=table,
                AttributeDefinitions=[{"AttributeName": n, "AttributeType": t} for n, t in keys],
                KeySchema=[
                    {"AttributeName": n, "KeyType": "HASH" if i == 0 else "RANGE"}
                    for i, (n, _) in enumerate(keys)
                ],
                BillingMode="PAY_PER_REQUEST",
            )
        except Exception as exc2:
            if error_code(exc2) != "ResourceInUseException":  # created meanwhile by another
                raise
        desc = (await call("describe_table", TableName=table))["Table"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    attempt = 0
    while desc.get("TableStatus", "ACTIVE") != "ACTIVE":
        if loop.time() > deadline:
            raise ConfigError(f"DynamoDB table {table!r} is not ACTIVE after {timeout:.0f} s")
        await asyncio.sleep(min(2.0, 0.05 * 2**attempt))
        attempt += 1
        desc = (await call("describe_table", TableName=table))["Table"]
    schema = {k["KeyType"]: k["AttributeName"] for k in desc.get("KeySchema", [])}
    want = {"HASH": keys[0][0], **({"RANGE": keys[1][0]} if len(keys) > 1 else {})}
    if schema != want:
        raise ConfigError(
            f"DynamoDB table {table!r} is keyed by {schema}, expected {want}; use a table "
            f"with that key schema or change the key options"
        )
    return desc
