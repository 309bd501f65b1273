"""Exactly-once without a broker: settings, the transaction's place in a checkpoint, restores."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Mapping
from functools import partial
from operator import add
from typing import Any

import pytest

import asyncflow as af
from adapters.kafka import KafkaBroker
from adapters.kafka_config import KafkaSettings
from adapters.rdkafka_config import consumer_config, producer_config, reader_config, redacted
from asyncflow.checkpoint import TransactionAborted
from asyncflow.errors import ConfigError
from asyncflow.protocols import Source, TopicPartition
from asyncflow.runtime import Runtime
from asyncflow.state.restore import restore_shard
from asyncflow.state.shard import ChangelogTarget, TableShard
from asyncflow.state.store import MemoryStore


def test_processing_guarantee_is_at_least_once_or_exactly_once() -> None:
    assert af.App("a").processing_guarantee == "at_least_once"
    assert af.App("a", processing_guarantee="exactly_once").processing_guarantee == "exactly_once"
    with pytest.raises(ConfigError) as info:
        af.App("a", processing_guarantee="exactly-once")
    message = str(info.value)
    assert "\n" not in message and "processing_guarantee" in message
    assert "at_least_once or exactly_once" in message


def test_processing_guarantee_comes_from_the_environment_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ASYNCFLOW_PROCESSING_GUARANTEE", "exactly_once")
    assert af.App("a").processing_guarantee == "exactly_once"
    monkeypatch.setenv("ASYNCFLOW_PROCESSING_GUARANTEE", "twice")
    with pytest.raises(ConfigError, match="ASYNCFLOW_PROCESSING_GUARANTEE"):
        af.App("a")


def test_exactly_once_on_a_broker_without_transactions_is_one_line() -> None:
    app = af.App("a", processing_guarantee="exactly_once")
    app.topic("in")
    with pytest.raises(ConfigError) as info:
        asyncio.run(app.run(stop_when_idle=True))
    assert "exactly_once needs a broker with transactions" in str(info.value)
    assert "\n" not in str(info.value)


def test_exactly_once_with_the_aiokafka_client_says_to_use_client_rdkafka() -> None:
    app = af.App("a", processing_guarantee="exactly_once")
    with pytest.raises(ConfigError, match=r"client=rdkafka"):
        Runtime(app)._exactly_once(KafkaBroker("kafka://127.0.0.1:1"))


def test_the_client_option_picks_librdkafka_and_a_bad_one_names_the_choices() -> None:
    assert type(KafkaBroker("kafka://k:1?client=rdkafka")).__name__ == "RdKafkaBroker"
    assert type(KafkaBroker("kafka://k:1")).__name__ == "KafkaBroker"
    with pytest.raises(ConfigError) as info:
        KafkaBroker("kafka://k:1?client=java")
    assert str(info.value) == "Kafka option client='java' is not one of: aiokafka, rdkafka"


def test_librdkafka_configs_carry_sasl_ssl_and_hide_the_password() -> None:
    s = KafkaSettings.parse(
        "kafka://alice:s3cret@k:9093?client=rdkafka&security_protocol=SASL_SSL"
        "&sasl_mechanism=SCRAM-SHA-512&ssl_cafile=/ca.pem&ssl_check_hostname=false"
    )
    conf = consumer_config(s, "g", read_committed=True)
    assert conf["sasl.username"] == "alice" and conf["sasl.password"] == "s3cret"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512" and conf["ssl.ca.location"] == "/ca.pem"
    assert conf["ssl.endpoint.identification.algorithm"] == "none"
    assert conf["isolation.level"] == "read_committed"
    assert redacted(conf)["sasl.password"] == "***"
    assert "s3cret" not in repr(s)
    tx = producer_config(s, transactional_id="app-w1")
    assert tx["transactional.id"] == "app-w1" and tx["enable.idempotence"] is True
    assert tx["message.timeout.ms"] <= tx["transaction.timeout.ms"]
    assert producer_config(s)["partitioner"] == "murmur2_random"
    assert reader_config(s, read_committed=True)["isolation.level"] == "read_committed"


# -- restores trust only what the group committed ----------------------------------------


def shard_on(broker: af.MemoryBroker) -> TableShard:
    target = ChangelogTarget(broker, "app-t-changelog", 0, b"p0")  # type: ignore[arg-type]
    return TableShard("t", "p0", MemoryStore(), target)


async def two_checkpoints(broker: af.MemoryBroker) -> TableShard:
    """Checkpoint 1 covers offset 3 (k=1); checkpoint 2 covers offset 7 (k=2, j=9)."""
    broker.create_topic("app-t-changelog")
    first = shard_on(broker)
    await first.persist(first.stage([(b'"k"', b"1")], offset=3, frontier=None,
                                    checkpoint_id="w-1"))
    await first.persist(first.stage([(b'"k"', b"2"), (b'"j"', b"9")], offset=7, frontier=None,
                                    checkpoint_id="w-2"))
    return first


def test_a_restore_ignores_a_checkpoint_beyond_the_committed_offset() -> None:
    """Its transaction did not commit (a broker that shows aborted records, such as Tansu)."""
    async def main() -> None:
        broker = af.MemoryBroker()
        await two_checkpoints(broker)
        again = shard_on(broker)
        await restore_shard(again, committed=3, exactly_once=True)
        assert again.store.get(b'"k"') == b"1" and again.store.get(b'"j"') is None
        assert again.applied == 3
        # the next checkpoint rewrites what the ignored one touched
        assert again.compensation == {b'"k"': b"1", b'"j"': None}
        trusting = shard_on(broker)
        await restore_shard(trusting, committed=3)  # at-least-once trusts the last marker
        assert trusting.store.get(b'"k"') == b"2" and trusting.applied == 7

    asyncio.run(main())


def test_an_uncommitted_checkpoint_stays_ignored_when_a_committed_one_follows_it() -> None:
    """Checkpoint 2 was aborted; the next owner went on from offset 3 and committed offset 5."""
    async def main() -> None:
        broker = af.MemoryBroker()
        await two_checkpoints(broker)
        later = shard_on(broker)
        await later.persist(later.stage([(b'"k"', b"3")], offset=5, frontier=None,
                                        checkpoint_id="w-3"))
        again = shard_on(broker)
        await restore_shard(again, committed=5, exactly_once=True)
        assert again.store.get(b'"k"') == b"3" and again.applied == 5
        assert again.store.get(b'"j"') is None  # only the aborted checkpoint wrote it
        assert again.compensation == {b'"k"': b"3", b'"j"': None}

    asyncio.run(main())


def test_a_local_store_ahead_of_the_committed_offset_is_rebuilt_from_the_changelog() -> None:
    async def main() -> None:
        broker = af.MemoryBroker()
        ahead = await two_checkpoints(broker)  # its store says offset 7
        ahead.store.write([(b'"k"', b"2")], {"offset": b"7"})
        await restore_shard(ahead, committed=3, exactly_once=True)
        assert ahead.applied == 3 and ahead.store.get(b'"k"') == b"1"

    asyncio.run(main())


# -- a checkpoint is one transaction; the local stores come after it -----------------------


class FakeTransactions:
    """Records commits; sees what the local stores held at each one; can fail."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.open = False
        self.commits: list[dict[Hashable, int]] = []
        self.aborts: list[str] = []
        self.stores_at_commit: list[int | None] = []
        self.runtime: Runtime | None = None

    @property
    def pending(self) -> bool:
        return self.open

    async def commit(self, source: Source, positions: Mapping[Hashable, int]) -> None:
        assert self.runtime is not None
        shard = next(iter(self.runtime.state._parts.values())).shards["totals"]
        self.stores_at_commit.append(shard.checkpointed)
        if self.fail:
            raise TransactionAborted("committing failed (test): aborted")
        self.commits.append(dict(positions))
        self.open = False

    async def abort(self, reason: str) -> None:
        self.aborts.append(reason)
        self.open = False


class TransactionalMemory(af.MemoryBroker):
    def __init__(self, tx: FakeTransactions) -> None:
        super().__init__()
        self.tx = tx

    def exactly_once(self, app_id: str) -> FakeTransactions:
        return self.tx

    async def append_now(self, topic: str, partition: int, records: Any) -> int:
        return await self.append(topic, partition, records)


def totals_app(broker: TransactionalMemory) -> af.App:
    app = af.App("eos", broker=broker, processing_guarantee="exactly_once", state_store="memory")
    totals = app.table("totals", default=0)
    numbers: af.Topic[Any] = app.topic("numbers")
    out: af.Topic[Any] = app.topic("out")

    @app.agent(numbers)
    async def running_total(stream: af.Stream[Any]) -> None:
        total = stream.state(totals)
        async for n in stream:
            await out.send(None, total.update(partial(add, n)))

    return app


def feed(broker: af.MemoryBroker) -> None:
    broker.create_topic("numbers")
    for n in (1, 2, 3):
        broker.produce("numbers", str(n).encode())
    broker.end("numbers")


def test_a_checkpoint_commits_its_transaction_before_it_writes_the_local_stores() -> None:
    tx = FakeTransactions()
    broker = TransactionalMemory(tx)
    feed(broker)
    app = totals_app(broker)
    original = Runtime._exactly_once

    def hooked(self: Runtime, b: Any) -> Any:
        tx.runtime = self
        return original(self, b)

    Runtime._exactly_once = hooked  # type: ignore[method-assign,assignment]
    try:
        asyncio.run(app.run(stop_when_idle=True))
    finally:
        Runtime._exactly_once = original  # type: ignore[method-assign]
    assert tx.commits and tx.commits[-1] == {TopicPartition("numbers", 0): 2}
    assert tx.stores_at_commit[0] is None  # the store had nothing when the commit was made
    assert not tx.aborts
    assert app.metrics.get("dead_letters") == 0


def test_a_failed_commit_aborts_and_the_stop_says_what_is_replayed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tx = FakeTransactions(fail=True)
    broker = TransactionalMemory(tx)
    feed(broker)
    app = totals_app(broker)
    original = Runtime._exactly_once

    def hooked(self: Runtime, b: Any) -> Any:
        tx.runtime = self
        return original(self, b)

    Runtime._exactly_once = hooked  # type: ignore[method-assign,assignment]
    try:
        asyncio.run(app.run(stop_when_idle=True))
    finally:
        Runtime._exactly_once = original  # type: ignore[method-assign]
    assert tx.aborts and not tx.commits
    stops = [r.getMessage() for r in caplog.records if "stopped without committing" in r.message]
    assert len(stops) == 1 and "committing failed (test)" in stops[0]
    assert "exactly-once: what was written for them was aborted" in stops[0]
