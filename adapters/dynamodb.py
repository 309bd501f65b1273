"""DynamoDB sink: upserts output records as items, in ``BatchWriteItem`` chunks of 25.

Values become DynamoDB attributes exactly: a float is stored as the decimal of
its shortest ``repr`` (``0.1`` is stored as ``0.1`` and reads back as the same
float), datetimes as ISO-8601 strings, dicts and lists as maps and lists.

**Refused, not retried.** A record that can never be stored comes back from
``write`` as ``Rejected(record, reason)`` and the core sends it to the
dead-letter output; the other records of the batch are written. Checked here,
before any request: a value that is not a mapping (dict, dataclass, record);
no key field and no ``SinkRecord.key``; no sort key; NaN, infinities, numbers
outside DynamoDB's range, empty sets and values of unknown types (the reason
names the field); a key attribute that is not a string, number or bytes.
Refused by the service (``ValidationException``, e.g. an item over 400 KB, an
empty string as a key, a key of another type than the table's): DynamoDB
refuses the whole ``BatchWriteItem`` then, so the sink writes that chunk's
items one by one with ``PutItem`` and refuses only those the service refuses,
with its message.

**Retried, then raised.** Throttling, ``UnprocessedItems``, 5xx answers and
dropped connections are retried with backoff; after ``max_retries`` the write
raises ``SinkError`` (the worker stops without committing the batch).

Example:
    >>> sink = DynamoDBSink("example", key="id", region="us-east-1")
    >>> (sink.max_batch, sink.linger)
    (1000, 5.0)
    >>> to_attribute({"average": 0.1, "n": 3}, "value")
    {'M': {'average': {'N': '0.1'}, 'n': {'N': '3'}}}

    A batch with one value DynamoDB cannot store (``_wrap_client`` puts a
    stand-in for the service in place of the client; nothing is sent):

    >>> class Table:
    ...     items = []
    ...     async def describe_table(self, TableName):
    ...         return {"Table": {"KeySchema": [{"AttributeName": "id", "KeyType": "HASH"}]}}
    ...     async def batch_write_item(self, RequestItems):
    ...         self.items += [r["PutRequest"]["Item"] for r in RequestItems["example"]]
    ...         return {}
    >>> table = Table()
    >>> sink = DynamoDBSink("example", region="us-east-1", endpoint_url="http://127.0.0.1:9",
    ...                     _wrap_client=lambda service, client: table)
    >>> async def demo():
    ...     await sink.start()
    ...     try:
    ...         return await sink.write([SinkRecord("a", {"mean": 1.5}),
    ...                                  SinkRecord("b", {"mean": float("nan")})])
    ...     finally:
    ...         await sink.stop()
    >>> [(r.record.key, r.reason) for r in asyncio.run(demo())]
    [('b', "field 'mean': NaN is not a number DynamoDB can store; filter or replace NaN/inf first (id='b')")]
    >>> table.items
    [{'mean': {'N': '1.5'}, 'id': {'S': 'a'}}]
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError

from asyncflow.errors import AsyncflowError, ConfigError, SinkError, redact_url
from asyncflow.protocols import Rejected, SinkRecord

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

    ``items_written`` counts items stored, ``items_rejected`` records refused
    (returned as ``Rejected``), ``requests`` every ``BatchWriteItem`` and
    ``PutItem`` sent, ``batches_split`` chunks the service refused as a whole
    and that were written item by item to find the culprits.

    Example:
        >>> DynamoDBSinkStats().items_rejected
        0
    """

    items_written: int = 0
    requests: int = 0
    unprocessed_retried: int = 0
    duplicates_collapsed: int = 0
    items_rejected: int = 0
    batches_split: int = 0


class _Refused(Exception):
    """A record that cannot become an item (internal; it becomes a ``Rejected``)."""


@dataclasses.dataclass(slots=True)
class _Key:
    """The writes of one key within a batch, in order: the last one is written.

    The others stand by: if the service refuses the last one, the one before
    is written instead (as if the refused record had not been sent).
    """

    writes: list[tuple[int, SinkRecord, dict[str, Any]]]

    @property
    def item(self) -> dict[str, Any]:
        return self.writes[-1][2]


class DynamoDBSink:
    """Upsert output records into a DynamoDB table, keyed by ``key`` (+ ``sort_key``).

    Each record's value (a dict, a dataclass or an asyncflow record) becomes one
    item; the key attribute comes from the value or, when the value lacks it,
    from ``SinkRecord.key``. Within a batch the last write of a key wins.
    ``write`` returns when every item is stored, except the records it returns
    as ``Rejected`` (refused for what they are; see the module docstring for
    which). Throttling and ``UnprocessedItems`` are retried with exponential
    backoff and full jitter, ``max_retries`` times, then ``SinkError`` is raised.

    A refused record is treated as if it had not been sent: when several
    records of a batch have the same key and the last one is refused, the one
    before it is written instead (a value refused here never takes part in
    the collapse; one the service refuses is replaced by the previous write
    of its key). Earlier writes of a key whose last write is stored were
    superseded, as without refusals, and are neither written nor returned.

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

    async def write(self, records: Sequence[SinkRecord]) -> list[Rejected]:
        """Store every record; return the ones refused for good (``Rejected``, in input order).

        Everything not returned is durable when this returns; what cannot be
        written for a transient reason raises ``SinkError`` after bounded retries.
        """
        if self._client is None:
            raise SinkError(f"{self.name}: write() before start()")
        rejected: list[tuple[int, Rejected]] = []
        keys = self._collapse(records, rejected)
        chunks = [keys[i : i + BATCH_LIMIT] for i in range(0, len(keys), BATCH_LIMIT)]
        if chunks:
            it: Iterator[list[_Key]] = iter(chunks)
            try:
                async with asyncio.TaskGroup() as tg:
                    for _ in range(min(self.concurrency, len(chunks))):
                        tg.create_task(self._write_chunks(it, rejected))
            except BaseExceptionGroup as group:
                exc = first_error(group)
                if isinstance(exc, SinkError):
                    raise exc from None
                if isinstance(exc, AsyncflowError):
                    raise SinkError(f"{self.name}: {exc}") from exc
                raise SinkError(f"{self.name}: write failed: {describe(exc)}") from exc
        self.stats.items_rejected += len(rejected)
        rejected.sort(key=lambda r: r[0])
        return [r for _, r in rejected]

    def _collapse(
        self, records: Sequence[SinkRecord], rejected: list[tuple[int, Rejected]]
    ) -> list[_Key]:
        by_key: dict[tuple[Any, ...], _Key] = {}
        converted = 0
        for index, rec in enumerate(records):
            try:
                item = self._item(rec)
            except _Refused as exc:
                rejected.append((index, Rejected(rec, str(exc))))
                continue
            converted += 1
            ident = tuple(_identity(item[a]) for a in self._key_attrs)
            known = by_key.get(ident)
            if known is None:
                by_key[ident] = _Key([(index, rec, item)])
            else:
                known.writes.append((index, rec, item))
        self.stats.duplicates_collapsed += converted - len(by_key)
        return list(by_key.values())

    def _item(self, rec: SinkRecord) -> dict[str, Any]:
        """The item of ``rec``, or ``_Refused`` with the reason (naming the field)."""
        value = self._convert(rec.value)
        if not isinstance(value, Mapping):
            raise _Refused(
                f"the value is a {type(value).__name__}, not a dict, dataclass or record "
                f"(key {rec.key!r}); an item needs named fields"
            )
        fields = dict(value)
        if self.key not in fields or fields[self.key] is None:
            if rec.key is None:
                raise _Refused(
                    f"field {self.key!r}: missing, and the record has no key; "
                    f"send it with a key or add the field"
                )
            fields[self.key] = rec.key
        where = f"{self.key}={fields[self.key]!r}"
        if self.sort_key is not None and fields.get(self.sort_key) is None:
            raise _Refused(f"field {self.sort_key!r}: the sort key is missing ({where})")
        try:
            item = {str(k): to_attribute(v, str(k)) for k, v in fields.items()}
        except InvalidItemValue as exc:
            raise _Refused(f"{exc} ({where})") from None
        for attr in self._key_attrs:
            kind = next(iter(item[attr]))
            if kind not in ("S", "N", "B"):
                raise _Refused(
                    f"field {attr!r}: a key attribute must be a string, number or bytes, "
                    f"got {fields[attr]!r} ({where})"
                )
        return item

    async def _write_chunks(
        self, chunks: Iterator[list[_Key]], rejected: list[tuple[int, Rejected]]
    ) -> None:
        for chunk in chunks:
            if not await self._write_chunk([k.item for k in chunk]):
                self.stats.batches_split += 1
                for key in chunk:
                    await self._put_key(key, rejected)

    async def _write_chunk(self, items: list[dict[str, Any]]) -> bool:
        """Write ``items`` with ``BatchWriteItem``; ``False`` if the service refused the batch.

        DynamoDB validates a whole batch before writing any of it, so a
        ``ValidationException`` names no item and writes none (moto may have
        written the items before the bad one; writing them again is harmless).
        """
        pending: dict[str, Any] = {self.table: [{"PutRequest": {"Item": i}} for i in items]}
        attempt = 0
        while True:
            try:
                response = await self._call(
                    self._client.batch_write_item, "BatchWriteItem", RequestItems=pending
                )
            except _ServiceRefused:
                return False
            sent = len(pending[self.table])
            unprocessed = (response.get("UnprocessedItems") or {}).get(self.table) or []
            self.stats.items_written += sent - len(unprocessed)
            if not unprocessed:
                return True
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

    async def _put_key(self, key: _Key, rejected: list[tuple[int, Rejected]]) -> None:
        """``PutItem`` the last write of ``key``; if refused, the one before, and so on."""
        for index, rec, item in reversed(key.writes):
            try:
                await self._call(self._client.put_item, "PutItem", TableName=self.table, Item=item)
            except _ServiceRefused as exc:
                where = ", ".join(f"{a}={_shown(item[a])}" for a in self._key_attrs)
                rejected.append((index, Rejected(rec, f"DynamoDB refused the item ({where}): {exc}")))
                continue
            self.stats.items_written += 1
            return

    async def _call(self, fn: Callable[..., Any], op: str, **kwargs: Any) -> Any:
        """One request with retries; ``_ServiceRefused`` for a ``ValidationException``."""
        try:
            response = await call_with_retry(
                fn,
                backoff=self._backoff,
                service="dynamodb",
                endpoint=self._endpoint,
                what=f"{op} on {self.table!r}",
                fail=SinkError,
                **kwargs,
            )
        except SinkError:
            raise
        except AsyncflowError as exc:
            raise SinkError(f"{self.name}: {exc}") from exc
        except Exception as exc:
            if error_code(exc) == "ValidationException":
                self.stats.requests += 1
                raise _ServiceRefused(_message(exc)) from exc
            raise SinkError(self._explain(exc, op)) from exc
        self.stats.requests += 1
        return response

    def _explain(self, exc: BaseException, op: str) -> str:
        if error_code(exc) == "ResourceNotFoundException":
            return str(self._missing())
        return f"{self.name}: {op} failed: {describe(exc)}"

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


class _ServiceRefused(Exception):
    """DynamoDB answered ``ValidationException`` (internal): the request can never succeed."""


def _message(exc: BaseException) -> str:
    """The service's message of a ``ClientError`` (its first line), else ``describe``."""
    if isinstance(exc, ClientError):
        lines = str(exc.response.get("Error", {}).get("Message", "")).strip().splitlines()
        if lines:
            return lines[0]
    return describe(exc)


def _identity(attr: Mapping[str, Any]) -> tuple[str, Any]:
    """What DynamoDB compares keys by: ``N`` by value (``1`` and ``1.0`` are one key)."""
    ((kind, raw),) = attr.items()
    return (kind, Decimal(raw) if kind == "N" else raw)


def _shown(attr: Mapping[str, Any]) -> str:
    """A key attribute for a message: its value (a number bare), shortened to 100 characters."""
    ((kind, raw),) = attr.items()
    text = str(raw) if kind == "N" else repr(raw)
    return text if len(text) <= 100 else text[:97] + "..."


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
