"""The lease table in DynamoDB: one row per (stream, shard), every write conditional.

The table is the checkpoint table of earlier versions (hash key ``stream``,
range key ``shard_id``, attribute ``checkpoint``), so upgrading keeps every
checkpoint: a row written by an earlier version is a lease nobody holds. The
lease attributes follow the Kinesis Client Library's names: ``leaseOwner``
(absent when nobody holds it), ``leaseCounter`` (a number, +1 at every
write), ``checkpoint``, ``ownerSwitchesSinceCheckpoint`` and
``parentShardIds``; ours adds ``leaseHolder``, a token of the process that
wrote the row last in the owner's name (so a renewal or checkpoint that timed
out but reached the table is known as this process's own). Writes are
``UpdateItem`` calls conditional on the owner and counter this worker last
saw: a take loses to whoever wrote first, and a
renewal, a checkpoint or a release by a worker whose lease was taken fails
with ``LeaseLost``. Stop the workers of an earlier version before starting
these: their unconditional checkpoint writes would pass any lease.

Example:
    >>> LeaseTable.default_table("sensors")
    'sensors-kinesis-checkpoints'
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from asyncflow.errors import AsyncflowError

from ._aws import error_code
from .kinesis_checkpoints import ShardTable
from .kinesis_leases import Lease
from .kinesis_shards import ShardInfo


class LeaseLost(AsyncflowError):
    """A conditional write found the lease held by another worker (or changed since read).

    Example:
        >>> LeaseLost("s0").shard_id
        's0'
    """

    def __init__(self, shard_id: str) -> None:
        super().__init__(f"the lease of shard {shard_id} is held by another worker now")
        self.shard_id = shard_id


def lease_from_item(item: dict[str, Any]) -> Lease:
    """A ``Lease`` from a DynamoDB item (rows of earlier versions have only a checkpoint).

    Example:
        >>> lease_from_item({"shard_id": {"S": "s1"}, "checkpoint": {"S": "7"},
        ...                  "leaseCounter": {"N": "3"}, "parentShardIds": {"L": [{"S": "s0"}]}})
        Lease(shard_id='s1', owner=None, counter=3, checkpoint='7', parents=('s0',), owner_switches=0, holder=None)
    """
    owner = item.get("leaseOwner", {}).get("S")
    checkpoint = item.get("checkpoint", {}).get("S")
    parents = tuple(p["S"] for p in item.get("parentShardIds", {}).get("L", []))
    return Lease(
        shard_id=item["shard_id"]["S"],
        owner=owner,
        counter=int(item.get("leaseCounter", {}).get("N", "0")),
        checkpoint=checkpoint,
        parents=parents,
        owner_switches=int(item.get("ownerSwitchesSinceCheckpoint", {}).get("N", "0")),
        holder=item.get("leaseHolder", {}).get("S"),
    )


class LeaseTable(ShardTable):
    """Reads and conditionally writes the leases of one stream.

    Example:
        >>> async def demo(dynamodb_client: Any) -> None:
        ...     table = LeaseTable(dynamodb_client, "app-kinesis-checkpoints", "clicks", "app",
        ...                        backoff=Backoff(), endpoint="http://127.0.0.1:5000")
        ...     await table.ensure(create=True)
        ...     lease = await table.take(Lease("shardId-000000000000", None, 0), "worker-a")
        ...     lease = await table.renew(lease)
        ...     lease = await table.checkpoint(lease, "42")
        ...     await table.release(lease)
    """

    kind = "lease"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # this client's token, written as leaseHolder with every write in an owner's name
        self.holder = secrets.token_hex(8)

    def _key(self, shard_id: str) -> dict[str, Any]:
        return {"stream": {"S": self.stream}, "shard_id": {"S": shard_id}}

    async def load(self) -> dict[str, Lease]:
        """Every lease of the stream, read consistently: shard id to ``Lease``."""
        leases = (lease_from_item(item) for item in await self._rows())
        return {lease.shard_id: lease for lease in leases}

    async def get(self, shard_id: str) -> Lease | None:
        """The lease of one shard, read consistently; ``None`` when it has no row."""
        response = await self._call(
            "get_item",
            f"GetItem of shard {shard_id}",
            TableName=self.table,
            Key=self._key(shard_id),
            ConsistentRead=True,
        )
        item = response.get("Item")
        return None if item is None else lease_from_item(item)

    async def add_missing(self, shards: Iterable[ShardInfo], known: Iterable[str]) -> int:
        """Create a row (nobody's lease) for each listed shard not in ``known``; returns how many.

        Each put is conditional on the row not existing, so workers listing the
        same new shards at once create each row once.
        """
        have = set(known)
        created = 0
        for info in shards:
            if info.shard_id in have:
                continue
            item: dict[str, Any] = {
                **self._key(info.shard_id),
                "leaseCounter": {"N": "0"},
                "ownerSwitchesSinceCheckpoint": {"N": "0"},
                "app": {"S": self.app_name},
                "updated_at": {"S": datetime.now(UTC).isoformat()},
            }
            if info.parents:
                item["parentShardIds"] = {"L": [{"S": p} for p in info.parents]}
            try:
                await self._call(
                    "put_item",
                    f"PutItem of shard {info.shard_id}",
                    TableName=self.table,
                    Item=item,
                    ConditionExpression="attribute_not_exists(shard_id)",
                )
                created += 1
            except ClientError as exc:
                if error_code(exc) != "ConditionalCheckFailedException":
                    raise
        return created

    async def _update(
        self,
        lease: Lease,
        *,
        owner: str | None,
        checkpoint: str | None = None,
        switches: int | None = None,
        expect_owner: str | None,
        what: str,
    ) -> Lease:
        """Write ``owner`` (``None`` removes it) and counter + 1, if owner and counter are as seen."""
        names = {"#o": "leaseOwner", "#c": "leaseCounter", "#u": "updated_at", "#h": "leaseHolder"}
        values: dict[str, Any] = {
            ":next": {"N": str(lease.counter + 1)},
            ":now": {"S": datetime.now(UTC).isoformat()},
        }
        sets = ["#c = :next", "#u = :now"]
        removes: list[str] = []
        if owner is None:
            removes += ["#o", "#h"]
        else:
            sets += ["#o = :owner", "#h = :holder"]
            values[":owner"] = {"S": owner}
            values[":holder"] = {"S": self.holder}
        if checkpoint is not None:
            names["#k"] = "checkpoint"
            sets.append("#k = :ckpt")
            values[":ckpt"] = {"S": checkpoint}
        if switches is not None:
            names["#w"] = "ownerSwitchesSinceCheckpoint"
            sets.append("#w = :sw")
            values[":sw"] = {"N": str(switches)}
        if lease.counter == 0:
            counter_cond = "(attribute_not_exists(#c) OR #c = :seen)"
        else:
            counter_cond = "#c = :seen"
        values[":seen"] = {"N": str(lease.counter)}
        if expect_owner is None:
            owner_cond = "attribute_not_exists(#o)"
        else:
            owner_cond = "#o = :expect"
            values[":expect"] = {"S": expect_owner}
        expression = "SET " + ", ".join(sets)
        if removes:
            expression += " REMOVE " + ", ".join(removes)
        try:
            await self._call(
                "update_item",
                f"{what} of shard {lease.shard_id}",
                TableName=self.table,
                Key=self._key(lease.shard_id),
                UpdateExpression=expression,
                ConditionExpression=f"attribute_exists(shard_id) AND {counter_cond} AND {owner_cond}",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                raise LeaseLost(lease.shard_id) from None
            raise
        return Lease(
            lease.shard_id,
            owner,
            lease.counter + 1,
            checkpoint if checkpoint is not None else lease.checkpoint,
            lease.parents,
            switches if switches is not None else lease.owner_switches,
            self.holder if owner is not None else None,
        )

    async def take(self, lease: Lease, worker_id: str) -> Lease:
        """Take ``lease`` (expired, unowned or stolen) as last seen; ``LeaseLost`` if it moved."""
        switches = lease.owner_switches + (lease.owner != worker_id)
        return await self._update(
            lease, owner=worker_id, switches=switches, expect_owner=lease.owner, what="take"
        )

    async def renew(self, lease: Lease) -> Lease:
        """Add one to the counter of a lease this worker holds; ``LeaseLost`` if it was taken."""
        return await self._update(lease, owner=lease.owner, expect_owner=lease.owner, what="renew")

    async def checkpoint(self, lease: Lease, checkpoint: str) -> Lease:
        """Store ``checkpoint`` under a lease this worker holds; ``LeaseLost`` if it was taken."""
        return await self._update(
            lease,
            owner=lease.owner,
            checkpoint=checkpoint,
            switches=0,
            expect_owner=lease.owner,
            what="checkpoint",
        )

    async def release(self, lease: Lease) -> Lease:
        """Give a lease this worker holds up (no owner): another worker takes it at once."""
        return await self._update(lease, owner=None, expect_owner=lease.owner, what="release")
