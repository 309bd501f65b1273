"""Per-shard checkpoints of a Kinesis source, in a DynamoDB table (like the KCL's lease table).

The source now writes this table through ``kinesis_lease_table.LeaseTable``
(the same rows, with lease attributes, every write conditional on the lease);
``CheckpointStore`` reads the checkpoints of any row (tools, tests, rows of
earlier versions) and its ``save`` is the unconditional write of earlier
versions, for tools only: a running source must never be bypassed with it.

One item per (stream, shard): hash key ``stream``, range key ``shard_id``,
attribute ``checkpoint`` (the sequence number of the last processed record, or
``SHARD_END``), plus ``app`` and ``updated_at`` for people reading the table.
The table is created (on demand billing) when missing, if allowed.

Example:
    >>> CheckpointStore.default_table("sensors")
    'sensors-kinesis-checkpoints'
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from asyncflow.errors import AsyncflowError, ConfigError

from ._aws import Backoff, call_with_retry, first_error
from .dynamodb import ensure_table


class CheckpointError(AsyncflowError):
    """Checkpoints could not be read or written after retries.

    Example:
        >>> isinstance(CheckpointError("x"), AsyncflowError)
        True
    """


class ShardTable:
    """The DynamoDB table of one app's shards of one stream (rows keyed by stream and shard id).

    What ``CheckpointStore`` (checkpoints) and ``LeaseTable`` (the same rows
    with leases) share: the client, the name, creating or checking the table,
    and calls retried with backoff.

    Example:
        >>> ShardTable.default_table("sessions")
        'sessions-kinesis-checkpoints'
    """

    kind = "checkpoint"
    """What the table is called in messages."""

    def __init__(
        self,
        client: Any,
        table: str,
        stream: str,
        app_name: str,
        *,
        backoff: Backoff,
        endpoint: str,
    ) -> None:
        self.client = client
        self.table = table
        self.stream = stream
        self.app_name = app_name
        self._backoff = backoff
        self._endpoint = endpoint

    @staticmethod
    def default_table(app_name: str) -> str:
        """The checkpoint table name used when none is given."""
        return f"{app_name}-kinesis-checkpoints"

    async def ensure(self, *, create: bool) -> None:
        """Check the table exists (create it if ``create``)."""

        def missing() -> Exception:
            return ConfigError(
                f"the Kinesis {self.kind} table {self.table!r} does not exist at {self._endpoint}; "
                f"create it (hash key 'stream' S, range key 'shard_id' S) or pass "
                f"create_checkpoint_table=True"
            )

        await ensure_table(
            self.client,
            self.table,
            [("stream", "S"), ("shard_id", "S")],
            create=create,
            backoff=self._backoff,
            endpoint=self._endpoint,
            on_missing=missing,
        )

    async def _call(self, op: str, what: str | None = None, **kwargs: Any) -> Any:
        return await call_with_retry(
            getattr(self.client, op),
            backoff=self._backoff,
            service="dynamodb",
            endpoint=self._endpoint,
            what=f"{what or op} in {self.kind} table {self.table!r}",
            fail=CheckpointError,
            **kwargs,
        )

    async def _rows(self) -> list[dict[str, Any]]:
        """Every row of this stream, read consistently, page after page."""
        rows: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "#s = :s",
            "ExpressionAttributeNames": {"#s": "stream"},
            "ExpressionAttributeValues": {":s": {"S": self.stream}},
            "ConsistentRead": True,
        }
        while True:
            page = await self._call("query", "Query", **kwargs)
            rows += page.get("Items", [])
            last = page.get("LastEvaluatedKey")
            if not last:
                return rows
            kwargs["ExclusiveStartKey"] = last



class CheckpointStore(ShardTable):
    """Reads and writes shard checkpoints for one app and stream.

    Example:
        >>> async def demo(dynamodb_client: Any) -> None:
        ...     store = CheckpointStore(dynamodb_client, "app-ckpt", "clicks", "app",
        ...                             backoff=Backoff(), endpoint="http://127.0.0.1:5000")
        ...     await store.ensure(create=True)
        ...     await store.save({"shardId-000000000000": "49590338271490256608559692538361571095921575989136588898"})
        ...     print(await store.load())
    """

    async def load(self) -> dict[str, str]:
        """Every stored checkpoint of the stream: shard id to sequence number or ``SHARD_END``."""
        return {
            item["shard_id"]["S"]: item["checkpoint"]["S"]
            for item in await self._rows()
            if "checkpoint" in item  # a lease row of a shard never checkpointed has none
        }

    async def save(self, checkpoints: Mapping[str, str]) -> None:
        """Store checkpoints (shard id to sequence number or ``SHARD_END``), concurrently."""
        if not checkpoints:
            return
        now = datetime.now(UTC).isoformat()
        try:
            async with asyncio.TaskGroup() as tg:
                for shard_id, checkpoint in checkpoints.items():
                    item = {
                        "stream": {"S": self.stream},
                        "shard_id": {"S": shard_id},
                        "checkpoint": {"S": checkpoint},
                        "app": {"S": self.app_name},
                        "updated_at": {"S": now},
                    }
                    tg.create_task(self._call("put_item", TableName=self.table, Item=item))
        except BaseExceptionGroup as group:
            exc = first_error(group)
            if isinstance(exc, AsyncflowError):
                raise exc from None
            raise CheckpointError(
                f"could not write Kinesis checkpoints to {self.table!r}: {exc}"
            ) from exc
