"""KinesisSource against a real moto server on loopback."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from adapters._aws import AwsCredentialsError
from adapters.kinesis import SHARD_END, CheckpointStore, KinesisSource, Shard, StreamNotFound
from tests.integration.aws.kinesis_util import (
    Consumed,
    Recorder,
    consume,
    create_stream,
    drain,
    hash_key_of_shard,
    put_values,
    wait_for,
)
from tests.integration.aws.moto import CREDENTIALS, REGION, start_moto

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(120)]


def make_source(endpoint: str, stream: str, app: str, **kwargs: Any) -> KinesisSource:
    options: dict[str, Any] = {
        "app_name": app,
        "endpoint_url": endpoint,
        "region": REGION,
        "poll_interval": 0.05,
        "min_read_interval": 0.0,
        "shard_refresh_interval": 0.2,
        "backoff_base": 0.001,
        "backoff_cap": 0.01,
        **CREDENTIALS,
    }
    options.update(kwargs)
    return KinesisSource(stream, **options)


def error(code: str, operation: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": 400}},
        operation,
    )


async def stored_checkpoints(aws: Callable[[str], Any], source: KinesisSource) -> dict[str, str]:
    store = CheckpointStore(
        aws("dynamodb"),
        source.checkpoint_table,
        source.stream,
        source.app_name,
        backoff=source._backoff,
        endpoint="moto",
    )
    return await store.load()


@pytest.mark.slow
async def test_twenty_thousand_records_over_four_shards_are_read_once_each_in_shard_order(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    stream = unique("big")
    await create_stream(aws("kinesis"), stream, 4)
    placed = await put_values(aws("kinesis"), stream, range(20_000))
    assert len(placed) == 4
    recorder = Recorder()
    source = make_source(moto_endpoint, stream, unique("app"))
    await source.start(recorder)
    try:
        got = await consume(source, lambda c: len(c.values) >= 20_000)
        await drain(source, got, 0.3)
    finally:
        await source.stop()
    assert sorted(got.values) == list(range(20_000))  # each exactly once
    for shard_id, sequence_numbers in placed.items():
        assert got.offsets(shard_id) == sequence_numbers  # per-shard order
    assert recorder.assigned() == sorted(placed)
    record = got.batches[0].records[0]
    assert record.key is not None and record.key.startswith(b"key-")
    assert record.timestamp is not None and record.timestamp > 1_600_000_000_000


async def test_restarted_source_resumes_after_its_checkpoint_without_loss(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    stream, app = unique("resume"), unique("app")
    await create_stream(aws("kinesis"), stream, 2)
    placed = await put_values(aws("kinesis"), stream, range(4_000))
    first = make_source(moto_endpoint, stream, app, max_records=100)
    await first.start(Recorder())
    try:
        seen = await consume(first, lambda c: len(c.values) >= 1_500, commit=False)
        # The core finished only part of what it read: commit the middle of the read range.
        committed = {}
        for shard_id in placed:
            offsets = seen.offsets(shard_id)
            if offsets:
                committed[shard_id] = offsets[len(offsets) // 2]
        await first.commit({Shard(stream, s): o for s, o in committed.items()})
    finally:
        await first.stop()  # a crash: everything read after the commit is unacknowledged
    assert await stored_checkpoints(aws, first) == {s: str(o) for s, o in committed.items()}

    remaining = sum(n > committed.get(s, 0) for s, ns in placed.items() for n in ns)
    second = make_source(moto_endpoint, stream, app, max_records=100)
    await second.start(Recorder())
    try:
        again = await consume(second, lambda c: len(c.values) >= remaining)
        await drain(second, again, 0.3)
    finally:
        await second.stop()
    for shard_id, sequence_numbers in placed.items():
        after = [n for n in sequence_numbers if n > committed.get(shard_id, 0)]
        assert again.offsets(shard_id) == after  # from just after the checkpoint, in order
    values = set(seen.values) | set(again.values)
    assert values == set(range(4_000))  # no loss
    duplicates = set(seen.values) & set(again.values)
    assert duplicates  # only what was read after the checkpoint is read twice


async def test_split_shard_is_followed_parent_before_children(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    kinesis = aws("kinesis")
    stream = unique("split")
    [parent] = await create_stream(kinesis, stream, 1)
    await put_values(kinesis, stream, range(500))
    await kinesis.split_shard(
        StreamName=stream, ShardToSplit=parent, NewStartingHashKey=str(2**127)
    )
    await put_values(kinesis, stream, range(500, 1_000))
    listing = (await kinesis.list_shards(StreamName=stream))["Shards"]
    children = sorted(s["ShardId"] for s in listing if s.get("ParentShardId") == parent)
    assert len(children) == 2
    recorder = Recorder()
    source = make_source(moto_endpoint, stream, unique("app"))
    await source.start(recorder)
    try:
        got = await consume(source, lambda c: len(c.values) >= 1_000)
        await wait_for(lambda: ("revoked", [parent]) in recorder.events)
        await drain(source, got, 0.3)
        checkpoints = await stored_checkpoints(aws, source)
    finally:
        await source.stop()
    # moto 5.2.5 keeps routing writes to the closed parent (children stay empty, see the
    # report), so all 1,000 values come from the parent; what this shows on moto is the
    # lineage: the parent's end is found from EndingSequenceNumber although moto still
    # returns a NextShardIterator, the children are assigned only after it, and the
    # parent is checkpointed SHARD_END and revoked.
    assert sorted(got.values) == list(range(1_000))
    assert got.offsets(parent) == sorted(got.offsets(parent))
    # children only after the parent's end (the parent's revocation may come before or after)
    assigned = [e for e in recorder.events if e[0] == "assigned"]
    assert assigned == [("assigned", [parent]), ("assigned", children)]
    assert ("revoked", [parent]) in recorder.events
    assert checkpoints[parent] == SHARD_END
    assert source.assigned == [Shard(stream, c) for c in children]


async def test_closed_parent_with_records_is_read_to_its_end_before_any_child(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    # Real data in three moto shards, presented as lineage s0 -> (s1, s2) with s0 closed at
    # its last record: moto still returns a NextShardIterator there, so the end must come
    # from EndingSequenceNumber (TESTING.md).
    kinesis = aws("kinesis")
    stream = unique("lineage")
    s0, s1, s2 = await create_stream(kinesis, stream, 3)
    placed = await put_values(
        kinesis, stream, range(1_500), hash_key=lambda i: hash_key_of_shard(i % 3, 3)
    )
    parent_end = str(placed[s0][-1])

    class Lineage:
        def __init__(self, client: Any) -> None:
            self.client = client

        def __getattr__(self, name: str) -> Any:
            return getattr(self.client, name)

        async def list_shards(self, **kwargs: Any) -> dict[str, Any]:
            page = dict(await self.client.list_shards(**kwargs))
            for s in page["Shards"]:
                if s["ShardId"] == s0:
                    s["SequenceNumberRange"]["EndingSequenceNumber"] = parent_end
                else:
                    s["ParentShardId"] = s0
            return page

    recorder = Recorder()
    source = make_source(
        moto_endpoint,
        stream,
        unique("app"),
        max_records=100,
        _wrap_client=lambda service, c: Lineage(c) if service == "kinesis" else c,
    )
    await source.start(recorder)
    try:
        got = await consume(source, lambda c: len(c.values) >= 1_500)
        await wait_for(lambda: ("revoked", [s0]) in recorder.events)
        checkpoints = await stored_checkpoints(aws, source)
    finally:
        await source.stop()
    order = got.shard_sequence()
    last_parent = max(i for i, s in enumerate(order) if s == s0)
    first_child = min(i for i, s in enumerate(order) if s != s0)
    assert last_parent < first_child
    assert order.count(s0) == 500
    assert sorted(got.values) == list(range(1_500))
    assigned = [e for e in recorder.events if e[0] == "assigned"]
    assert assigned == [("assigned", [s0]), ("assigned", [s1, s2])]
    assert checkpoints[s0] == SHARD_END


async def test_expired_iterators_are_renewed_and_throttling_backs_off(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    stream = unique("expire")
    await create_stream(aws("kinesis"), stream, 2)
    placed = await put_values(aws("kinesis"), stream, range(2_000))

    class Flaky:
        def __init__(self, client: Any) -> None:
            self.client = client
            self.calls = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.client, name)

        async def get_records(self, **kwargs: Any) -> dict[str, Any]:
            self.calls += 1
            if self.calls in (3, 8, 9):
                raise error("ExpiredIteratorException", "GetRecords")
            if self.calls in (5, 6):
                raise error("ProvisionedThroughputExceededException", "GetRecords")
            return dict(await self.client.get_records(**kwargs))

    source = make_source(
        moto_endpoint,
        stream,
        unique("app"),
        max_records=100,
        _wrap_client=lambda service, c: Flaky(c) if service == "kinesis" else c,
    )
    await source.start(Recorder())
    try:
        got = await consume(source, lambda c: len(c.values) >= 2_000)
        await drain(source, got, 0.2)
    finally:
        await source.stop()
    assert Counter(got.values) == Counter(range(2_000))
    for shard_id, sequence_numbers in placed.items():
        assert got.offsets(shard_id) == sequence_numbers
    assert source.stats.iterators_renewed == 3
    assert source.stats.throttled == 2


async def test_paused_shard_is_held_back_until_resumed(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    stream = unique("pause")
    a, b = await create_stream(aws("kinesis"), stream, 2)
    placed = await put_values(aws("kinesis"), stream, range(1_000))
    source = make_source(moto_endpoint, stream, unique("app"), max_records=50)
    await source.start(Recorder())
    try:
        source.pause([Shard(stream, a)])
        got = await consume(source, lambda c: len(c.offsets(b)) >= len(placed[b]))
        assert len(got.offsets(a)) < len(placed[a])
        held_back = len(got.offsets(a))
        await drain(source, got, 0.2)
        assert len(got.offsets(a)) == held_back  # nothing of the paused shard meanwhile
        source.resume([Shard(stream, a)])
        await consume(source, lambda c: len(c.values) >= 1_000, into=got)
    finally:
        await source.stop()
    assert got.offsets(a) == placed[a]


async def test_latest_skips_records_written_before_start(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    stream = unique("latest")
    await create_stream(aws("kinesis"), stream, 2)
    await put_values(aws("kinesis"), stream, range(100))
    source = make_source(moto_endpoint, stream, unique("app"), iterator="LATEST")
    await source.start(Recorder())
    try:
        got = Consumed()
        await drain(source, got, 0.3)  # iterators are taken before these records arrive
        await put_values(aws("kinesis"), stream, range(100, 200))
        await consume(source, lambda c: len(c.values) >= 100, into=got)
    finally:
        await source.stop()
    assert sorted(got.values) == list(range(100, 200))


async def test_shard_listing_is_paginated(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    stream = unique("pages")
    shards = await create_stream(aws("kinesis"), stream, 5)
    recorder = Recorder()
    source = make_source(moto_endpoint, stream, unique("app"), list_shards_page_size=2)
    await source.start(recorder)
    await source.stop()
    assert recorder.assigned() == sorted(shards)


async def test_missing_stream_gives_a_clear_error(
    moto_endpoint: str, unique: Callable[[str], str]
) -> None:
    stream = unique("absent")
    source = make_source(moto_endpoint, stream, unique("app"))
    with pytest.raises(StreamNotFound) as info:
        await source.start(Recorder())
    assert repr(stream) in str(info.value)
    assert f"aws kinesis create-stream --stream-name {stream}" in str(info.value)


async def test_rejected_credentials_give_a_clear_error(unique: Callable[[str], str]) -> None:
    server = start_moto(auth=True)  # checks credentials: unknown keys get InvalidClientTokenId
    try:
        source = make_source(server.endpoint_url, unique("s"), unique("app"), max_retries=1)
        with pytest.raises(
            AwsCredentialsError, match=r"kinesis at .* rejected the AWS credentials"
        ):
            await source.start(Recorder())
    finally:
        server.stop()
