"""The Kafka source on a real broker: ordering, commits, pause/resume, rebalances, broker restarts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Collection

import pytest
import pytest_asyncio

from adapters import kafka_source
from adapters.kafka import KafkaBroker, KafkaSource
from asyncflow.protocols import Partition, Source, TopicPartition, TopicSpec
from tests.integration.kafka import eos_workers
from tests.integration.kafka.broker import (
    TEST_OPTIONS,
    committed,
    consume,
    create_topic,
    produce,
    start_tansu,
    unique_name,
    wait_for,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

broker = eos_workers.broker  # every test taking ``broker`` runs with both clients
client = eos_workers.client


class FakeCore:
    """Stands in for the core: remembers what it read and commits its done positions on revoke."""

    def __init__(self, name: str = "core", revoke_delay: float = 0.0) -> None:
        self.name = name
        self.source: Source | None = None
        self.assigned: set[Partition] = set()
        self.read: dict[Partition, list[int]] = {}
        self.events: list[tuple[str, float, frozenset[Partition]]] = []
        self.committed_in_revoke: dict[Partition, int] = {}
        self.revoke_delay = revoke_delay

    async def on_assigned(self, partitions: Collection[Partition]) -> None:
        self.assigned = set(partitions)
        self.events.append(("assigned", time.monotonic(), frozenset(partitions)))

    async def on_revoked(self, partitions: Collection[Partition]) -> None:
        self.events.append(("revoking", time.monotonic(), frozenset(partitions)))
        await asyncio.sleep(self.revoke_delay)  # stands for draining the lanes
        done = {p: self.read[p][-1] for p in partitions if self.read.get(p)}
        assert self.source is not None
        await self.source.commit(done)
        self.committed_in_revoke.update(done)
        self.assigned -= set(partitions)
        self.events.append(("revoked", time.monotonic(), frozenset(partitions)))

    def count(self) -> int:
        return sum(len(v) for v in self.read.values())

    async def fetch_once(self, timeout: float = 0.2) -> int:
        assert self.source is not None
        n = 0
        for batch in await self.source.fetch(timeout):
            assert batch.partition in self.assigned, "a record of a partition the core does not own"
            self.read.setdefault(batch.partition, []).extend(r.offset for r in batch.records)
            n += len(batch.records)
        return n


@contextlib.asynccontextmanager
async def running(
    broker: KafkaBroker, topic: str, group: str, core: FakeCore
) -> AsyncIterator[KafkaSource]:
    source = broker.source([TopicSpec(topic, partitions=4)], group)
    core.source = source
    await source.start(core)
    try:
        yield source
    finally:
        await source.stop()


@contextlib.asynccontextmanager
async def pumping(*cores: FakeCore) -> AsyncIterator[None]:
    """Keep every core fetching in the background, as the core's reader does."""

    async def pump(core: FakeCore) -> None:
        while True:
            await core.fetch_once(0.1)

    tasks = [asyncio.create_task(pump(c)) for c in cores]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def read_until(core: FakeCore, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while core.count() < count:
        assert time.monotonic() < deadline, f"{core.name} read {core.count()} of {count} records"
        await core.fetch_once()


def per_partition(topic: str, n: int, start: int = 0) -> list[tuple[bytes | None, bytes, int]]:
    return [(None, f"{p}:{i}".encode(), p) for p in range(4) for i in range(start, start + n)]


async def test_source_satisfies_the_source_protocol(broker: KafkaBroker) -> None:
    assert isinstance(broker.source([TopicSpec("x")], "g"), Source)


async def test_source_reads_everything_in_per_partition_order(
    broker: KafkaBroker, kafka_bootstrap: str, topic4: str
) -> None:
    await produce(kafka_bootstrap, topic4, per_partition(topic4, 250))
    core = FakeCore()
    async with running(broker, topic4, unique_name("g"), core):
        await read_until(core, 1000)
    assert set(core.read) == {TopicPartition(topic4, p) for p in range(4)}
    for offsets in core.read.values():
        assert offsets == list(range(250))


async def test_committed_positions_are_where_a_new_member_of_the_group_starts(
    broker: KafkaBroker, kafka_bootstrap: str, topic4: str
) -> None:
    await produce(kafka_bootstrap, topic4, per_partition(topic4, 25))
    group = unique_name("g")
    first = FakeCore("first")
    async with running(broker, topic4, group, first) as source:
        await read_until(first, 100)
        await source.commit({TopicPartition(topic4, p): 9 for p in range(4)})
    assert await committed(kafka_bootstrap, group, topic4, 4) == {p: 10 for p in range(4)}
    second = FakeCore("second")
    async with running(broker, topic4, group, second):
        await read_until(second, 60)
    assert second.read == {TopicPartition(topic4, p): list(range(10, 25)) for p in range(4)}


async def test_pause_stops_a_partition_and_resume_restarts_it(
    broker: KafkaBroker, kafka_bootstrap: str, topic4: str
) -> None:
    await produce(kafka_bootstrap, topic4, per_partition(topic4, 50))
    core = FakeCore()
    paused = TopicPartition(topic4, 0)
    async with running(broker, topic4, unique_name("g"), core) as source:
        await wait_for(lambda: len(core.assigned) == 4, message="assignment")
        # not a check: the client fetches ahead of the core meanwhile, and what it holds of
        # the paused partition (librdkafka's poll hand-over, aiokafka's fetcher) waits too
        await asyncio.sleep(1.0)
        source.pause([paused])
        await read_until(core, 150)
        for _ in range(3):  # the other partitions are exhausted: nothing may come now
            await core.fetch_once(0.2)
        assert paused not in core.read
        assert core.count() == 150
        source.resume([paused])
        await read_until(core, 200)
        for _ in range(3):
            await core.fetch_once(0.2)
    assert core.read[paused] == list(range(50))  # each once, in order
    assert core.count() == 200


async def test_a_partition_paused_when_its_member_gave_it_up_is_read_once_assigned_back(
    broker: KafkaBroker, kafka_bootstrap: str, topic4: str
) -> None:
    """The core pauses a partition for its full lanes and forgets why when it is revoked."""
    await produce(kafka_bootstrap, topic4, per_partition(topic4, 20))
    group = unique_name("g")
    a, b = FakeCore("a"), FakeCore("b")
    all_partitions = {TopicPartition(topic4, p) for p in range(4)}
    paused = TopicPartition(topic4, 0)
    async with running(broker, topic4, group, a) as source_a:
        await wait_for(lambda: a.assigned == all_partitions, 30, message="assignment")
        source_a.pause([paused])  # never resumed by the core: it is revoked below
        await read_until(a, 60)
        async with pumping(a):
            async with running(broker, topic4, group, b) as source_b, pumping(b):
                await wait_for(
                    lambda: len(a.assigned) == 2 and len(b.assigned) == 2, 30, message="split"
                )
                await source_b.commit({p: b.read[p][-1] for p in b.assigned if b.read.get(p)})
            await wait_for(lambda: a.assigned == all_partitions, 30, message="all back to a")
            await produce(kafka_bootstrap, topic4, per_partition(topic4, 5, start=20))
            # every partition reads on, the one paused before the rebalances too
            await wait_for(
                lambda: all((a.read.get(p) or [-1])[-1] == 24 for p in all_partitions), 30,
                message="every partition read to its end",
            )


@pytest_asyncio.fixture
async def aiokafka_broker(kafka_url: str) -> AsyncIterator[KafkaBroker]:
    b = KafkaBroker(kafka_url, dict(TEST_OPTIONS))
    try:
        yield b
    finally:
        await b.close()


async def test_a_held_partition_keeps_what_aiokafka_prefetched_for_it(
    aiokafka_broker: KafkaBroker, kafka_bootstrap: str, topic4: str
) -> None:
    # aiokafka's own pause drops a paused partition's prefetched records (fetched again
    # on resume): a full lane holds its partitions in the source instead
    await produce(kafka_bootstrap, topic4, per_partition(topic4, 30))
    core = FakeCore()
    everything = [TopicPartition(topic4, p) for p in range(4)]
    async with running(aiokafka_broker, topic4, unique_name("g"), core) as source:
        await wait_for(lambda: len(core.assigned) == 4, message="assignment")
        source.pause(everything)
        for _ in range(3):
            assert await core.fetch_once(0.2) == 0
        assert not source._consumer.paused()  # held here, not in the client
        source.resume(everything)
        await read_until(core, 120)
    assert all(core.read[p] == list(range(30)) for p in everything)


async def test_partitions_held_for_long_are_paused_in_the_client_and_the_source_keeps_polling(
    aiokafka_broker: KafkaBroker, kafka_bootstrap: str, topic4: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kafka_source, "HOLD_AT_CLIENT_AFTER", 0.3)
    await produce(kafka_bootstrap, topic4, per_partition(topic4, 20))
    core = FakeCore()
    everything = [TopicPartition(topic4, p) for p in range(4)]
    async with running(aiokafka_broker, topic4, unique_name("g"), core) as source:
        await wait_for(lambda: len(core.assigned) == 4, message="assignment")
        source.pause(everything)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # nothing comes, but fetch goes on polling
            assert await core.fetch_once(0.1) == 0
        assert len(source._consumer.paused()) == 4
        source.resume(everything[:2])
        await read_until(core, 40)
        assert set(core.read) == set(everything[:2])
        source.resume(everything[2:])
        await read_until(core, 80)
        assert not source._consumer.paused()
    assert all(core.read[p] == list(range(20)) for p in everything)


async def test_two_members_split_partitions_and_the_survivor_takes_all(
    broker: KafkaBroker, kafka_bootstrap: str, topic4: str
) -> None:
    await produce(kafka_bootstrap, topic4, per_partition(topic4, 40))
    group = unique_name("g")
    a, b = FakeCore("a", revoke_delay=0.5), FakeCore("b")
    all_partitions = {TopicPartition(topic4, p) for p in range(4)}
    async with running(broker, topic4, group, a) as source_a:
        await read_until(a, 160)
        async with running(broker, topic4, group, b), pumping(b):
            async with pumping(a):
                await wait_for(
                    lambda: len(a.assigned) == 2 and len(b.assigned) == 2, 30, message="split"
                )
                assert a.assigned | b.assigned == all_partitions
                # a released its partitions only after its revoke callback (drain + commit) returned
                revoked_at = next(t for kind, t, _ in a.events if kind == "revoked")
                b_assigned_at = next(t for kind, t, ps in b.events if kind == "assigned" and ps)
                assert revoked_at < b_assigned_at
                assert a.committed_in_revoke == {p: 39 for p in all_partitions}
                assert await committed(kafka_bootstrap, group, topic4, 4) == {
                    p: 40 for p in range(4)
                }
                # nobody re-reads what a committed inside its revoke callback
                await produce(kafka_bootstrap, topic4, per_partition(topic4, 5, start=40))
                await wait_for(lambda: a.count() + b.count() == 180, message="new records")
            for core in (a, b):
                for p in core.assigned:
                    assert core.read[p][-5:] == [40, 41, 42, 43, 44]
            assert b.count() == 10
            await source_a.commit({p: a.read[p][-1] for p in a.assigned})
            await source_a.stop()
            await wait_for(lambda: b.assigned == all_partitions, 30, message="survivor")
            await produce(kafka_bootstrap, topic4, per_partition(topic4, 5, start=45))
            await wait_for(lambda: b.count() == 30, message="survivor reads")
    for p in all_partitions:
        assert b.read[p][-5:] == [45, 46, 47, 48, 49]


async def test_records_taken_before_a_revoke_are_not_handed_over_after_it(
    aiokafka_broker: KafkaBroker, kafka_bootstrap: str, topic4: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fetch task resumes a turn of the event loop (or more) after aiokafka gave it the
    records; a revoke may begin in between. Those records belong to the old assignment:
    aiokafka reads them again from the committed offsets for the new one, so handing them
    over too would apply them twice (a running total one event too high)."""
    n = 50
    await produce(kafka_bootstrap, topic4, per_partition(topic4, n))
    group = unique_name("g")
    a, b = FakeCore("a"), FakeCore("b")
    everything = [TopicPartition(topic4, p) for p in range(4)]

    def reads(tp: TopicPartition) -> list[int]:
        return a.read.get(tp, []) + b.read.get(tp, [])

    async with running(aiokafka_broker, topic4, group, a) as source_a:
        await wait_for(lambda: len(a.assigned) == 4, message="assignment")
        drain = source_a._drain
        held: list[int] = []

        async def late_drain(*args: object) -> tuple[dict[object, list[object]], int]:
            got = await drain(*args)  # type: ignore[arg-type]
            if got[0] and not held:  # the first records taken: resume after a revoke began
                held.append(sum(len(r) for r in got[0].values()))
                await wait_for(lambda: any(k == "revoking" for k, _, _ in a.events), 30,
                               message="a revoke")
            return got  # type: ignore[return-value]

        monkeypatch.setattr(source_a, "_drain", late_drain)
        async with pumping(a):
            await wait_for(lambda: bool(held), message="a fetch taking records")
            async with running(aiokafka_broker, topic4, group, b), pumping(b):
                await wait_for(lambda: all(n - 1 in reads(tp) for tp in everything), 30,
                               message="every partition read to its end")
                await asyncio.sleep(0.5)  # a duplicate would come right after
    assert held[0] > 0
    for tp in everything:
        assert reads(tp) == list(range(n)), (tp, a.read.get(tp), b.read.get(tp))


async def test_records_come_as_aiokafka_decoded_them_with_every_field_a_plain_consumer_sees(
    aiokafka_broker: KafkaBroker, kafka_bootstrap: str, topic4: str
) -> None:
    """The source skips aiokafka's ConsumerRecord copy (hand_over_decoded_records): what it
    hands over must still say what a plain aiokafka consumer reads (offset, key, value,
    timestamp, headers), keyed and keyless, with and without headers."""
    items = [(f"k{i % 7}".encode() if i % 3 else None, f"v{i}".encode(), i % 4)
             for i in range(40)]
    await produce(kafka_bootstrap, topic4, items[:20])
    await produce(kafka_bootstrap, topic4, items[20:], headers=[("trace", b"t-1"), ("n", b"")])
    plain = await consume(kafka_bootstrap, topic4, 40)
    expected = {(r.partition, r.offset): (r.key, r.value, r.timestamp, list(r.headers))
                for r in plain}
    core = FakeCore()
    got: dict[tuple[int, int], tuple[object, ...]] = {}
    kinds: set[str] = set()
    async with running(aiokafka_broker, topic4, unique_name("g"), core) as source:
        await wait_for(lambda: len(core.assigned) == 4, message="assignment")
        deadline = time.monotonic() + 20
        while len(got) < 40:
            assert time.monotonic() < deadline, f"read {len(got)} of 40 records"
            for batch in await source.fetch(0.2):
                assert isinstance(batch.partition, TopicPartition)
                for r in batch.records:
                    kinds.add(type(r).__name__)
                    got[(batch.partition.partition, r.offset)] = (
                        r.key, r.value, r.timestamp, list(r.headers))
    assert got == expected
    assert "ConsumerRecord" not in kinds  # the copy was skipped


async def test_commit_skips_partitions_this_member_does_not_own(
    broker: KafkaBroker, kafka_bootstrap: str, topic4: str
) -> None:
    other = await create_topic(kafka_bootstrap, partitions=1)
    await produce(kafka_bootstrap, topic4, per_partition(topic4, 1))
    group = unique_name("g")
    core = FakeCore()
    async with running(broker, topic4, group, core) as source:
        await read_until(core, 4)
        await source.commit({TopicPartition(topic4, 0): 0, TopicPartition(other, 0): 5})
    assert (await committed(kafka_bootstrap, group, topic4, 4))[0] == 1


async def test_fetch_survives_a_broker_restart_and_catches_up(client: str) -> None:
    with start_tansu() as tansu:
        topic = await create_topic(tansu.bootstrap, partitions=2)
        await produce(tansu.bootstrap, topic, [(None, b"before", p) for p in range(2)])
        options = dict(TEST_OPTIONS, request_timeout_ms="3000", retry_backoff_ms="50",
                       client=client)
        broker = KafkaBroker(tansu.url, options)
        core = FakeCore()
        source = broker.source([TopicSpec(topic, partitions=2)], unique_name("g"))
        core.source = source
        await source.start(core)
        try:
            await read_until(core, 2)
            core.read.clear()
            await asyncio.to_thread(tansu.restart)  # memory storage: topic and group are gone
            await create_topic(tansu.bootstrap, partitions=2, name=topic)
            await produce(tansu.bootstrap, topic, [(None, b"after", p) for p in range(2)] * 3)

            def caught_up() -> bool:  # the last record of each partition arrived
                return len(core.read) == 2 and all(2 in offsets for offsets in core.read.values())

            async with pumping(core):  # fetch must not raise while the broker is away
                await wait_for(caught_up, 45, message="every record after the restart")
        finally:
            await source.stop()
            await broker.close()


async def test_a_failing_partition_listener_is_reported_by_fetch(
    broker: KafkaBroker, kafka_bootstrap: str, topic4: str
) -> None:
    class Broken(FakeCore):
        async def on_assigned(self, partitions: Collection[Partition]) -> None:
            raise RuntimeError("lane setup failed")

    core = Broken()
    async with running(broker, topic4, unique_name("g"), core) as source:
        with pytest.raises(RuntimeError, match="lane setup failed"):
            for _ in range(100):
                await source.fetch(0.2)


class FlakyConsumer:
    """A consumer whose getmany fails the way a lost connection does, then recovers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[object, list[object]]:
        from aiokafka.errors import KafkaConnectionError, RequestTimedOutError

        self.calls += 1
        if self.calls <= self.failures:
            raise (KafkaConnectionError if self.calls % 2 else RequestTimedOutError)("gone")
        return {}


async def test_transient_fetch_errors_are_retried_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from adapters.kafka import KafkaSettings

    caplog.set_level(logging.INFO, logger="asyncflow.kafka")
    source = KafkaSource(KafkaSettings.parse("kafka://127.0.0.1:1"), ["t"], "g")
    flaky = FlakyConsumer(failures=3)
    source._consumer = flaky
    source._ready.set()
    for _ in range(4):
        assert await source.fetch(0.05) == []
    assert flaky.calls == 4
    assert "retrying" in caplog.text and "recovered" in caplog.text
    assert source._failures == 0


async def test_non_retriable_fetch_errors_stop_the_worker_with_a_clear_error() -> None:
    from aiokafka.errors import TopicAuthorizationFailedError

    from adapters.kafka import KafkaSettings, KafkaSourceError

    class Denied:
        async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> None:
            raise TopicAuthorizationFailedError("rides")

    source = KafkaSource(KafkaSettings.parse("kafka://127.0.0.1:1"), ["rides"], "g")
    source._consumer = Denied()
    source._ready.set()
    with pytest.raises(KafkaSourceError, match="reading rides .* TopicAuthorizationFailedError"):
        await source.fetch(0.05)
