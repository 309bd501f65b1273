"""Commits that fail are retried, and the stop says what it could not commit.

A source's ``commit`` raises ``CommitFailed`` when the broker cannot take it for
now (unreachable, no answer in time): nothing of that commit counts as done, the
next checkpoint commits the same positions whether or not new records came in,
and so does the last one at stop. A stop that still cannot commit leaves one
ERROR line naming the partitions and ``Runtime.unfinished`` (the CLI exits 1).
The Kafka source's side (which errors become ``CommitFailed``) is at the end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition as KafkaTP
from aiokafka.errors import (
    CommitFailedError,
    KafkaConnectionError,
    NodeNotReadyError,
    TopicAuthorizationFailedError,
)

import asyncflow as af
from adapters.kafka_config import KafkaSettings
from adapters.kafka_source import KafkaSource, KafkaSourceError
from asyncflow.checkpoint import CommitFailed
from asyncflow.memory import MemoryBroker, MemorySource
from asyncflow.protocols import Partition, TopicPartition, TopicSpec
from asyncflow.runtime import Runtime
from asyncflow.testing import TestRun, wait_for


class FlakySource(MemorySource):
    """A memory-broker source whose commits fail (``CommitFailed``) while ``failing`` is set."""

    failing = True
    attempts: list[dict[Partition, int]]

    async def commit(self, positions: Mapping[Partition, int]) -> None:
        self.attempts.append(dict(positions))
        if self.failing:
            raise CommitFailed("committing offsets of group g got no answer (test)")
        await super().commit(positions)


class FlakyBroker(MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.made: list[FlakySource] = []

    def source(self, topics: Sequence[TopicSpec], group_id: str) -> FlakySource:
        source = FlakySource(self, [t.name for t in topics], group_id)
        source.attempts = []
        self.made.append(source)
        return source


def counting_app(name: str, **settings: Any) -> tuple[af.App, list[int]]:
    app = af.App(name, **settings)
    numbers = app.topic("numbers", partitions=2)
    seen: list[int] = []

    @app.agent(numbers)
    async def count(stream: af.Stream[int]) -> None:
        async for n in stream:
            seen.append(n)

    return app, seen


def committed(broker: MemoryBroker, group: str) -> list[int | None]:
    return [broker.committed(group, "numbers", p) for p in range(2)]


def committed_total(broker: MemoryBroker, group: str) -> int:
    """Records the group's commits cover, over both partitions."""
    return sum(c or 0 for c in committed(broker, group))


async def test_a_failed_commit_is_committed_by_the_next_checkpoint_without_new_records() -> None:
    broker = FlakyBroker()
    app, seen = counting_app("retry", commit_interval=0.02)
    async with TestRun(app, broker=broker) as run:
        for i in range(10):
            await run.send("numbers", i, key=f"k{i}")
        await wait_for(lambda: len(seen) == 10)
        source = broker.made[0]
        await wait_for(lambda: len(source.attempts) >= 3)  # one failed, then retried, ...
        assert committed(broker, "retry") == [None, None]
        attempts = len(source.attempts)
        source.failing = False  # the broker answers again; no record is sent meanwhile
        await wait_for(lambda: committed_total(broker, "retry") == 10)
        assert source.attempts[attempts - 1] == source.attempts[attempts]  # the same positions
        await run.stop()
    assert committed_total(broker, "retry") == 10


async def test_the_checkpoint_at_stop_commits_what_earlier_commits_could_not() -> None:
    broker = FlakyBroker()
    app, seen = counting_app("last", commit_interval=0.02)
    async with TestRun(app, broker=broker) as run:
        for i in range(10):
            await run.send("numbers", i, key=f"k{i}")
        await wait_for(lambda: len(seen) == 10)
        await wait_for(lambda: len(broker.made[0].attempts) >= 2)
        runtime = app._runtime
        broker.made[0].failing = False
        app.stop()  # the commit loop may not get another turn: the stop's checkpoint commits
        await run.wait_stopped()
    assert committed_total(broker, "last") == 10
    assert isinstance(runtime, Runtime) and runtime.unfinished is None


async def test_a_stop_that_cannot_commit_says_once_which_partitions_are_replayed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "asyncflow")
    broker = FlakyBroker()
    app, seen = counting_app("never", commit_interval=0.02, shutdown_timeout=1.0)
    async with TestRun(app, broker=broker) as run:
        for i in range(10):
            await run.send("numbers", i, key=f"k{i}")
        await wait_for(lambda: len(seen) == 10)
        await wait_for(lambda: len(broker.made[0].attempts) >= 5)
        runtime = app._runtime
        await run.stop()
    assert committed(broker, "never") == [None, None]
    assert isinstance(runtime, Runtime) and runtime.unfinished is not None
    stop_lines = [r for r in caplog.records if "stopped without committing" in r.getMessage()]
    assert [r.levelno for r in stop_lines] == [logging.ERROR]
    line = stop_lines[0].getMessage()
    assert "numbers[0]" in line and "numbers[1]" in line and "nothing committed" in line
    assert "got no answer (test)" in line  # why
    assert "read and processed again when the worker restarts" in line
    failures = [r for r in caplog.records if "not committed" in r.getMessage()
                and r.levelno == logging.WARNING]
    assert len(failures) == 1  # the first failed commit warns; the next ones are debug


async def test_a_clean_stop_leaves_nothing_unfinished() -> None:
    broker = MemoryBroker()
    app, seen = counting_app("clean")
    async with TestRun(app, broker=broker) as run:
        for i in range(4):
            await run.send("numbers", i, key=f"k{i}")
        await wait_for(lambda: len(seen) == 4)
        runtime = app._runtime
        await run.stop()
    assert isinstance(runtime, Runtime) and runtime.unfinished is None
    assert committed_total(broker, "clean") == 4


# -- the Kafka source: which commit errors are CommitFailed ------------------------


class FakeConsumer:
    """Just enough of ``AIOKafkaConsumer`` for ``KafkaSource.commit``."""

    def __init__(self, error: BaseException | None = None, hang: bool = False) -> None:
        self.error = error
        self.hang = hang
        self.commits: list[dict[KafkaTP, int]] = []

    def assignment(self) -> set[KafkaTP]:
        return {KafkaTP("t", 0)}

    async def commit(self, offsets: dict[KafkaTP, int]) -> None:
        if self.hang:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error
        self.commits.append(offsets)


def source_with(consumer: FakeConsumer, request_timeout_ms: int = 40_000) -> KafkaSource:
    settings = KafkaSettings.parse(f"kafka://127.0.0.1:1?request_timeout_ms={request_timeout_ms}")
    source = KafkaSource(settings, ["t"], "g")
    source._consumer = consumer
    return source


@pytest.mark.parametrize(
    "error",
    [KafkaConnectionError("Connection at 127.0.0.1:1 closed"), NodeNotReadyError("node 1")],
    ids=["connection-lost", "node-not-ready"],
)
async def test_a_kafka_commit_the_broker_could_not_take_raises_commit_failed(
    error: BaseException,
) -> None:
    with pytest.raises(CommitFailed, match="committing offsets of group g on kafka://"):
        await source_with(FakeConsumer(error)).commit({TopicPartition("t", 0): 41})


async def test_a_kafka_commit_without_an_answer_within_request_timeout_raises_commit_failed() -> (
    None
):
    with pytest.raises(CommitFailed, match="no answer within request_timeout_ms=50"):
        await source_with(FakeConsumer(hang=True), 50).commit({TopicPartition("t", 0): 41})


async def test_a_kafka_commit_refused_because_the_partitions_moved_is_a_warning_not_a_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "asyncflow.kafka")
    await source_with(FakeConsumer(CommitFailedError("rebalanced"))).commit(
        {TopicPartition("t", 0): 41}
    )
    assert any("was refused" in r.getMessage() for r in caplog.records)


async def test_a_kafka_commit_that_may_never_succeed_stops_the_worker() -> None:
    with pytest.raises(KafkaSourceError, match="TopicAuthorizationFailedError"):
        await source_with(FakeConsumer(TopicAuthorizationFailedError())).commit(
            {TopicPartition("t", 0): 41}
        )


async def test_a_kafka_commit_stores_the_offset_after_the_last_done_record() -> None:
    consumer = FakeConsumer()
    await source_with(consumer).commit({TopicPartition("t", 0): 41})
    assert consumer.commits == [{KafkaTP("t", 0): 42}]
