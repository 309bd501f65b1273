"""Broker faults on the real broker: an outage, a stop while it lasts, commits across it, every exit.

The outage tests run their own Tansu behind a ``FaultyLink`` (a TCP proxy that
Tansu advertises, see ``broker.py``): ``link.cut()`` makes the broker unreachable
as a killed one is (connections closed, new ones refused) while its topics,
offsets and groups survive; ``link.restore()`` brings it back. The exit-path
tests use the session broker, which they never touch.

Worker subprocesses run ``apps_for_tests``' transform app; ``app`` below is that
app with ``shutdown_timeout`` from ``FAULT_SHUTDOWN_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiokafka.admin import AIOKafkaAdminClient

import asyncflow as af
from adapters.kafka import KafkaBroker, KafkaSink, KafkaSource, KafkaSourceError
from adapters.kafka_health import _FILTER
from asyncflow.checkpoint import CommitFailed
from asyncflow.cli import _first_user_error
from asyncflow.errors import SinkError
from asyncflow.protocols import Partition, RawBatch, SinkRecord, TopicSpec
from tests.integration.kafka.apps_for_tests import Config, Tail, Worker, build, produce_events
from tests.integration.kafka.broker import (
    TEST_OPTIONS,
    TansuBroker,
    committed,
    create_topic,
    start_tansu,
    unique_name,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

PARTITIONS = 4
FAULT_APP = "tests.integration.kafka.test_broker_faults:app"
CLIENT_COMPLAINT = re.compile(r" (WARNING|ERROR) aiokafka")


def app() -> af.App:
    """The transform app of ``apps_for_tests`` with ``shutdown_timeout=$FAULT_SHUTDOWN_TIMEOUT``."""
    cfg = Config.from_env()
    cfg.extra = {"shutdown_timeout": float(os.environ.get("FAULT_SHUTDOWN_TIMEOUT", "30"))}
    return build(cfg)


@pytest.fixture(scope="module")
def faulty() -> Iterator[TansuBroker]:
    """A Tansu broker of this file's own, reached through a link the tests cut."""
    broker = start_tansu(proxied=True)
    try:
        yield broker
    finally:
        broker.stop()
        broker.log_path.unlink(missing_ok=True)


@pytest_asyncio.fixture
async def link_restored(faulty: TansuBroker) -> AsyncIterator[TansuBroker]:
    """The faulty broker, its link restored after the test whatever happened."""
    try:
        yield faulty
    finally:
        assert faulty.link is not None
        faulty.link.restore()


def lines_between(worker: Worker, start: int, end: int | None = None) -> list[str]:
    return worker.log().splitlines()[start:end]


def index_of(worker: Worker, pattern: str) -> int:
    for i, line in enumerate(worker.log().splitlines()):
        if re.search(pattern, line):
            return i
    raise AssertionError(f"no /{pattern}/ in the worker log:\n{worker.tail()}")


async def test_an_outage_is_one_line_when_the_broker_is_lost_and_one_when_it_is_back(
    link_restored: TansuBroker, tmp_path: Path
) -> None:
    broker, link = link_restored, link_restored.link
    assert link is not None
    src = await create_topic(broker.bootstrap, PARTITIONS, unique_name("out-in"))
    out = await create_topic(broker.bootstrap, PARTITIONS, unique_name("out-out"))
    await produce_events(broker.bootstrap, src, 200)
    cfg = Config(app_id=unique_name("outage"), input=src, output=out, partitions=PARTITIONS)
    worker = Worker(broker=broker.url, env=cfg.env(), log_dir=tmp_path, name="outage").start()
    try:
        async with Tail(broker.bootstrap, out, PARTITIONS) as tail:
            await tail.wait(lambda v: len(v) >= 200, alive=[worker])
            cut_at = len(worker.log().splitlines())
            link.cut()
            await worker.wait_log("lost connection to the Kafka broker", timeout=15)
            await asyncio.sleep(3.0)  # the outage lasts (the clients used to log ~60 lines/s)
            link.restore()
            back = await worker.wait_log(r"reachable again after ([\d.]+)s", timeout=30)
            await produce_events(broker.bootstrap, src, 200, start=200)
            await tail.wait(lambda v: len(v) >= 400, alive=[worker])  # it works again
        outage = lines_between(worker, cut_at, index_of(worker, "reachable again after") + 1)
        assert [line for line in outage if CLIENT_COMPLAINT.search(line)] == []
        lost = [line for line in outage if "lost connection" in line]
        assert len(lost) == 1
        assert f"lost connection to the Kafka broker at {broker.url} (" in lost[0]
        assert re.search(r"KafkaConnectionError|Connect call failed|NodeNotReadyError", lost[0])
        assert float(back.group(1)) >= 3.0
        assert len(worker.lines("reachable again")) == 1
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit(30) == 0
        assert "Traceback" not in worker.log()
    finally:
        worker.stop_now()


async def test_sigterm_while_the_broker_is_unreachable_exits_1_within_shutdown_timeout_saying_what_is_replayed(
    link_restored: TansuBroker, tmp_path: Path
) -> None:
    broker, link = link_restored, link_restored.link
    assert link is not None
    src = await create_topic(broker.bootstrap, PARTITIONS, unique_name("stop-in"))
    out = await create_topic(broker.bootstrap, PARTITIONS, unique_name("stop-out"))
    await produce_events(broker.bootstrap, src, 400)
    group = unique_name("stop")
    # no periodic commit: what the worker did is committed by the stop, or not at all
    cfg = Config(app_id=group, input=src, output=out, partitions=PARTITIONS, commit_interval=600)
    env = {**cfg.env(), "FAULT_SHUTDOWN_TIMEOUT": "4"}
    url = broker.url + "?request_timeout_ms=20000"  # a commit would wait longer than the stop
    worker = Worker(FAULT_APP, broker=url, env=env, log_dir=tmp_path, name="stop").start()
    try:
        async with Tail(broker.bootstrap, out, PARTITIONS) as tail:
            await tail.wait(lambda v: len(v) >= 400, alive=[worker])
        cut_at = len(worker.log().splitlines())
        link.cut()
        await worker.wait_log("lost connection to the Kafka broker", timeout=15)
        began = time.monotonic()
        worker.signal(signal.SIGTERM)
        code = await worker.wait_exit(30)  # it waited 40 s and more before
        took = time.monotonic() - began
        log = worker.log()
        assert code == 1, worker.tail()
        assert took < 4 + 6, f"the stop took {took:.1f}s with shutdown_timeout=4"
        assert "Traceback" not in log, worker.tail()
        stop_lines = worker.lines(r" ERROR asyncflow\.worker: stopped without committing (.*)")
        assert len(stop_lines) == 1, worker.tail()
        line = stop_lines[0].group(1)
        assert line.startswith(f"{PARTITIONS} partitions ({src}[0] read to ")
        assert "nothing committed" in line
        assert "the source did not answer the last commit within shutdown_timeout=4s" in line
        assert "read and processed again when the worker restarts" in line
        after = lines_between(worker, cut_at)
        assert [x for x in after if CLIENT_COMPLAINT.search(x)] == []
        assert [x for x in after if " ERROR " in x] == [stop_lines[0].string]
        link.restore()
        assert set((await committed(broker.bootstrap, group, src, PARTITIONS)).values()) == {None}
    finally:
        worker.stop_now()


async def test_a_commit_while_the_broker_is_unreachable_fails_and_succeeds_once_it_is_back(
    link_restored: TansuBroker,
) -> None:
    broker, link = link_restored, link_restored.link
    assert link is not None
    topic = await create_topic(broker.bootstrap, 2, unique_name("commit"))
    await produce_events(broker.bootstrap, topic, 20, keys=20)
    group = unique_name("commit")
    # Tansu holds a join for half the session timeout: requests must be allowed longer
    options = {**TEST_OPTIONS, "request_timeout_ms": "2500"}
    kafka = KafkaBroker(broker.url, options)
    source = kafka.source([TopicSpec(topic, partitions=2)], group)
    listener = Assignments()
    read: dict[Partition, int] = {}
    try:
        await source.start(listener)
        deadline = time.monotonic() + 30
        while sum(o + 1 for o in read.values()) < 20:
            assert time.monotonic() < deadline, f"read {read}"
            for batch in await source.fetch(0.2):
                read[batch.partition] = batch.records[-1].offset
        link.cut()
        began = time.monotonic()
        with pytest.raises(CommitFailed, match=f"committing offsets of group {group}"):
            await source.commit(read)
        assert time.monotonic() - began < 2.5 + 3  # bounded by request_timeout_ms
        link.restore()
        deadline = time.monotonic() + 30
        while True:  # the same positions, no new record
            try:
                await source.commit(read)
                break
            except CommitFailed:
                assert time.monotonic() < deadline, "the commit never succeeded after the outage"
                await asyncio.sleep(0.2)
        offsets = await committed(broker.bootstrap, group, topic, 2)
        assert len(read) == 2
        assert offsets == {p.partition: o + 1 for p, o in read.items()}  # type: ignore[attr-defined]
    finally:
        await source.stop()
        await kafka.close()


class Assignments:
    """A partition listener that only remembers what it was given."""

    def __init__(self) -> None:
        self.assigned: list[Partition] = []

    async def on_assigned(self, partitions: Sequence[Partition]) -> None:
        self.assigned.extend(partitions)

    async def on_revoked(self, partitions: Sequence[Partition]) -> None:
        pass


# -- every way out closes every client and leaves the group (session broker) ----------


class FailingSink:
    """An external sink whose writes fail (after "its retries")."""

    name = "failing"

    async def start(self) -> None:
        pass

    async def write(self, records: Sequence[SinkRecord]) -> None:
        raise SinkError("the failing sink refuses every write (test)")

    async def stop(self) -> None:
        pass


class BadFetchSource(KafkaSource):
    """A source whose reader fails as soon as it reads records (say, an authorization error)."""

    async def fetch(self, timeout: float) -> list[RawBatch]:
        batches = await super().fetch(timeout)
        if batches:
            raise KafkaSourceError("reading failed: TopicAuthorizationFailedError (test)")
        return batches


class RecordingBroker(KafkaBroker):
    """A ``KafkaBroker`` that keeps its sources and sinks, to check that they were closed."""

    def __init__(self, url: str, options: dict[str, str], bad_fetch: bool = False) -> None:
        super().__init__(url, options)
        self.bad_fetch = bad_fetch
        self.sources: list[KafkaSource] = []
        self.sinks: list[KafkaSink] = []

    def source(self, topics: Sequence[TopicSpec], group_id: str) -> KafkaSource:
        kind = BadFetchSource if self.bad_fetch else KafkaSource
        source = kind(self.settings, [t.name for t in topics], group_id, self.url, self.health)
        self.sources.append(source)
        return source

    def sink(self) -> KafkaSink:
        sink = super().sink()
        self.sinks.append(sink)
        return sink


async def group_members(bootstrap: str, group: str) -> list[Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    return list(described[0].groups[0][5])


@pytest.mark.parametrize("way_out", ["stop", "agent-error", "sink-failure", "reader-error"])
async def test_every_way_out_leaves_the_group_and_closes_every_kafka_client(
    kafka_bootstrap: str, kafka_url: str, way_out: str
) -> None:
    topic = await create_topic(kafka_bootstrap, 2, unique_name("exit"))
    group = unique_name(f"exit-{way_out}")
    # a member that does not leave stays in the group for 6 s: long after the checks below
    options = {**TEST_OPTIONS, "session_timeout_ms": "6000"}
    broker = RecordingBroker(kafka_url, options, bad_fetch=way_out == "reader-error")
    app = af.App(group, broker=broker, shutdown_timeout=5)
    numbers = app.topic(topic, partitions=2)
    failing = app.sink(FailingSink())
    seen: list[Any] = []

    @app.agent(numbers, on_error="stop")
    async def handle(stream: af.Stream[Any]) -> None:
        async for value in stream:
            seen.append(value)
            if way_out == "agent-error":
                raise ValueError("the agent fails on its first event (test)")
            if way_out == "sink-failure":
                await failing.send(None, value)

    run = asyncio.create_task(app.run())
    try:
        deadline = time.monotonic() + 30
        while not (broker.sources and broker.sources[0]._ready.is_set()):
            assert not run.done(), run.exception()
            assert time.monotonic() < deadline, "the worker never got its partitions"
            await asyncio.sleep(0.05)
        assert await group_members(kafka_bootstrap, group) != []
        await produce_events(kafka_bootstrap, topic, 1, keys=1)
        if way_out == "stop":
            while not seen:
                assert time.monotonic() < deadline, "the worker never handled the event"
                await asyncio.sleep(0.05)
            app.stop()
            await asyncio.wait_for(run, 30)
        else:
            try:
                await asyncio.wait_for(run, 30)
            except Exception as exc:  # noqa: BLE001 - what the CLI would print is checked
                assert _first_user_error(exc) is not None, repr(exc)
            else:
                pytest.fail(f"the worker did not fail ({way_out})")
        assert await group_members(kafka_bootstrap, group) == []  # it left: nobody waits
        assert [s._consumer for s in broker.sources] == [None]
        assert broker.sinks and all(s._producer is None for s in broker.sinks)
        assert broker._admin is None
        assert broker._changelog._producer is None and broker._changelog._reader is None
        assert broker.health not in _FILTER.watchers
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
