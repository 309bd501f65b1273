"""Helpers for Kinesis tests: stream setup, a recording listener, a minimal core loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from adapters.kinesis import KinesisSource, Shard
from asyncflow.protocols import Partition, RawBatch


async def create_stream(kinesis: Any, name: str, shards: int) -> list[str]:
    """Create a stream, wait until ACTIVE (polling), return its shard ids."""
    await kinesis.create_stream(StreamName=name, ShardCount=shards)
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        desc = await kinesis.describe_stream_summary(StreamName=name)
        if desc["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
            break
        assert asyncio.get_running_loop().time() < deadline, "stream not ACTIVE"
        await asyncio.sleep(0.05)
    listing = await kinesis.list_shards(StreamName=name)
    return [s["ShardId"] for s in listing["Shards"]]


def hash_key_of_shard(index: int, shards: int) -> str:
    """An ExplicitHashKey inside shard ``index`` of a fresh stream of ``shards`` shards."""
    return str(index * (2**128 // shards) + 1)


async def put_values(
    kinesis: Any,
    stream: str,
    values: Sequence[int],
    *,
    key: Callable[[int], str] = lambda i: f"key-{i % 997}",
    hash_key: Callable[[int], str | None] = lambda i: None,
) -> dict[str, list[int]]:
    """Put ``{"i": value}`` records (500 a request); return shard id -> sequence numbers."""
    placed: dict[str, list[int]] = {}
    for start in range(0, len(values), 500):
        chunk = values[start : start + 500]
        entries = []
        for i in chunk:
            entry: dict[str, Any] = {"PartitionKey": key(i), "Data": orjson.dumps({"i": i})}
            explicit = hash_key(i)
            if explicit is not None:
                entry["ExplicitHashKey"] = explicit
            entries.append(entry)
        response = await kinesis.put_records(StreamName=stream, Records=entries)
        assert response["FailedRecordCount"] == 0
        for r in response["Records"]:
            placed.setdefault(r["ShardId"], []).append(int(r["SequenceNumber"]))
    return placed


@dataclass
class Recorder:
    """A PartitionListener that logs assignments and revocations in order."""

    events: list[tuple[str, list[str]]] = field(default_factory=list)

    async def on_assigned(self, partitions: Collection[Partition]) -> None:
        self.events.append(("assigned", sorted(p.shard_id for p in partitions)))  # type: ignore[attr-defined]

    async def on_revoked(self, partitions: Collection[Partition]) -> None:
        self.events.append(("revoked", sorted(p.shard_id for p in partitions)))  # type: ignore[attr-defined]

    async def on_lost(self, partitions: Collection[Partition]) -> None:
        self.events.append(("lost", sorted(p.shard_id for p in partitions)))  # type: ignore[attr-defined]

    def assigned(self) -> list[str]:
        return [s for kind, shards in self.events if kind == "assigned" for s in shards]


@dataclass
class Consumed:
    """What a test's core loop got from a source, in fetch order."""

    batches: list[RawBatch] = field(default_factory=list)

    @property
    def values(self) -> list[int]:
        return [orjson.loads(r.value)["i"] for b in self.batches for r in b.records]  # type: ignore[arg-type]

    def offsets(self, shard_id: str) -> list[int]:
        return [
            r.offset
            for b in self.batches
            if b.partition.shard_id == shard_id  # type: ignore[attr-defined]
            for r in b.records
        ]

    def shard_sequence(self) -> list[str]:
        """Shard id of every record, in the order the core received them."""
        return [b.partition.shard_id for b in self.batches for _ in b.records]  # type: ignore[attr-defined]


async def consume(
    source: KinesisSource,
    until: Callable[[Consumed], bool],
    *,
    timeout: float = 30.0,
    commit: bool = True,
    into: Consumed | None = None,
) -> Consumed:
    """Fetch until ``until(consumed)``; like the core, commit the last offset handed out."""
    got = into or Consumed()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not until(got):
        assert loop.time() < deadline, f"timed out after {len(got.values)} records"
        batches = await source.fetch(0.1)
        got.batches.extend(batches)
        if commit and batches:
            positions: dict[Partition, int] = {}
            for b in batches:
                positions[b.partition] = b.records[-1].offset
            await source.commit(positions)
    return got


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until true or fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def drain(source: KinesisSource, into: Consumed, seconds: float) -> None:
    """Keep fetching (and committing) for a while, to show nothing more arrives."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        batches = await source.fetch(0.05)
        into.batches.extend(batches)
        if batches:
            await source.commit({b.partition: b.records[-1].offset for b in batches})


def shard(stream: str, shard_id: str) -> Shard:
    return Shard(stream, shard_id)


async def _worker_main(endpoint: str, stream: str, app: str, worker: str, lease: float) -> None:
    """A worker process for kill tests: prints ``{"shard", "values"}`` per batch, then commits."""
    import sys

    source = KinesisSource(
        stream,
        app_name=app,
        endpoint_url=endpoint,
        region="us-east-1",
        poll_interval=0.05,
        min_read_interval=0.0,
        shard_refresh_interval=0.5,
        backoff_base=0.001,
        backoff_cap=0.01,
        lease_duration=lease,
        lease_renewal_interval=lease / 5,
        worker_id=worker,
    )
    await source.start(Recorder())
    held: list[str] = []
    while True:
        batches = await source.fetch(0.05)
        if sorted(source.held_leases) != held:
            held = sorted(source.held_leases)
            print(orjson.dumps({"held": held}).decode(), flush=True)
        for b in batches:
            values = [orjson.loads(r.value)["i"] for r in b.records]  # type: ignore[arg-type]
            line = {"shard": b.partition.shard_id, "values": values}  # type: ignore[attr-defined]
            sys.stdout.write(orjson.dumps(line).decode() + "\n")
        sys.stdout.flush()  # what it read is out before its commit: a kill loses none of it
        if batches:
            await source.commit({b.partition: b.records[-1].offset for b in batches})


if (
    __name__ == "__main__"
):  # python -m tests.integration.aws.kinesis_util ENDPOINT STREAM APP ID LEASE
    import sys

    endpoint_, stream_, app_, worker_, lease_ = sys.argv[1:6]
    asyncio.run(_worker_main(endpoint_, stream_, app_, worker_, float(lease_)))
