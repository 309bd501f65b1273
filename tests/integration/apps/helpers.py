"""What the end-to-end tests of the apps share: workers as subprocesses, and readers of outputs.

- ``Workers.start("apps.rides:app", ASYNCFLOW_BROKER=...)`` runs
  ``asyncflow worker apps.rides:app`` from the project root with that
  environment (the apps' docstrings give the same commands); ``Worker.wait_until``
  polls its output, ``Worker.terminate`` sends SIGTERM and returns the exit code.
- ``TopicReader`` reads a Kafka topic from the start of every partition, without a
  group; ``read_all`` returns exactly what a topic holds (it marks the end of each
  partition and reads up to the marks: end offsets are not exact on Tansu).
- ``KinesisReader`` reads every shard of a stream from ``TRIM_HORIZON``;
  ``scan`` reads a whole DynamoDB table.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlencode

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

from adapters.dynamodb import item_from_dynamodb
from tests.integration.kafka.broker import TEST_OPTIONS, produce

ROOT = Path(__file__).resolve().parents[3]
ASYNCFLOW = Path(sys.executable).with_name("asyncflow")

APP_VARIABLE_PREFIXES = ("ASYNCFLOW_", "SENSOR_", "IP_", "RIDES_", "WIKI_", "KINESIS_", "STATUS_")
"""Settings of the apps: a worker gets only those a test gives it, never the caller's."""


def kafka_app_url(bootstrap: str) -> str:
    """``ASYNCFLOW_BROKER`` for the test broker: its address plus the test options.

    Example:
        >>> kafka_app_url("127.0.0.1:9092")  # doctest: +ELLIPSIS
        'kafka://127.0.0.1:9092?enable_idempotence=false&session_timeout_ms=3000&...'
    """
    return f"kafka://{bootstrap}?{urlencode(dict(TEST_OPTIONS))}"


class Worker:
    """One ``asyncflow worker module:app`` subprocess, its output in files."""

    def __init__(self, spec: str, env: dict[str, str], log_dir: Path) -> None:
        self.spec = spec
        name = f"{spec.replace(':', '.')}-{uuid.uuid4().hex[:6]}"
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [str(ASYNCFLOW), "worker", spec],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def describe(self, lines: int = 25) -> str:
        """The exit code and the end of the worker's log, for failure messages."""
        state = self.process.poll()
        tail = "\n".join(self.stderr().splitlines()[-lines:])
        return f"worker {self.spec} ({'running' if state is None else f'exit {state}'}):\n{tail}"

    async def wait_until(
        self, condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
    ) -> None:
        """Poll ``condition`` while the worker runs; fail if it exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"{what}: the worker exited first\n{self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not reached in {timeout}s\n{self.describe()}")
            await asyncio.sleep(0.05)

    async def terminate(self, timeout: float = 30.0) -> int:
        """Send SIGTERM and return the exit code once the worker has exited."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no exit within {timeout}s of SIGTERM\n{self.describe()}")
            await asyncio.sleep(0.05)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class Workers:
    """Start workers with a clean environment; ``kill_all`` at the end of a test."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Worker] = []

    def start(self, spec: str, **settings: str) -> Worker:
        """``asyncflow worker spec`` with this process's environment minus app settings, plus ``settings``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(APP_VARIABLE_PREFIXES)}
        env.pop("AWS_ENDPOINT_URL", None)
        env.update(settings)
        env["PYTHONUNBUFFERED"] = "1"
        worker = Worker(spec, env, self.log_dir)
        self.started.append(worker)
        return worker

    def kill_all(self) -> None:
        for worker in self.started:
            worker.kill()


async def topic_partitions(bootstrap: str, topic: str, timeout: float = 30.0) -> list[int]:
    """The partitions of ``topic``, waiting for it to exist (a worker creates its topics).

    Asks for the metadata of all topics, which creates nothing on the broker
    (a request naming the topic could create it on Tansu).
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            for described in await admin.describe_topics():
                if described["topic"] == topic and described["partitions"]:
                    return sorted(p["partition"] for p in described["partitions"])
            if time.monotonic() > deadline:
                raise AssertionError(f"topic {topic} did not appear within {timeout}s")
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


class TopicReader:
    """Every record of a Kafka topic, from the start of each partition (no consumer group).

    ``async with TopicReader(bootstrap, topic) as reader: await reader.read_until(done)``
    reads until ``done(reader.records)``; the topic may be created after the reader is.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.records: list[ConsumerRecord] = []
        self.partitions: list[int] = []
        self._consumer: Any = None

    async def __aenter__(self) -> Self:
        self.partitions = await topic_partitions(self.bootstrap, self.topic)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        self._consumer = consumer
        try:
            tps = [TopicPartition(self.topic, p) for p in self.partitions]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
        except BaseException:
            await consumer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def read_until(
        self,
        done: Callable[[list[ConsumerRecord]], bool],
        timeout: float = 30.0,
        worker: Worker | None = None,
    ) -> list[ConsumerRecord]:
        """Read until ``done(records)``; fail after ``timeout`` (with ``worker``'s log)."""
        deadline = time.monotonic() + timeout
        while not done(self.records):
            if time.monotonic() > deadline:
                log = f"\n{worker.describe()}" if worker is not None else ""
                raise AssertionError(
                    f"read {len(self.records)} records of {self.topic} in {timeout}s{log}"
                )
            for records in (await self._consumer.getmany(timeout_ms=100)).values():
                self.records.extend(records)
        return self.records


END_MARK = b"asyncflow-test-end:"


async def read_all(bootstrap: str, topic: str, timeout: float = 30.0) -> list[ConsumerRecord]:
    """Exactly the records ``topic`` holds now: an end mark goes to every partition, and
    each partition is read up to its mark. Marks (of this and earlier calls) are left out."""
    mark = END_MARK + uuid.uuid4().hex.encode()
    async with TopicReader(bootstrap, topic) as reader:
        await produce(bootstrap, topic, [(None, mark, p) for p in reader.partitions])
        await reader.read_until(
            lambda records: sum(r.value == mark for r in records) == len(reader.partitions),
            timeout,
        )
        return [r for r in reader.records if not (r.value or b"").startswith(END_MARK)]


def header(record: ConsumerRecord, name: str) -> str | None:
    """A header of a Kafka record as text (``None`` when absent)."""
    for key, value in record.headers or ():
        if key == name:
            return bytes(value).decode()
    return None


async def require_absent_topics(bootstrap: str, names: Iterable[str]) -> None:
    """Skip when the broker already holds an app's fixed topics (an earlier run on a
    broker given by ``ASYNCFLOW_TEST_KAFKA``): the tests count every record in them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = {t["topic"] for t in await admin.describe_topics()}
    finally:
        await admin.close()
    left = sorted(set(names) & existing)
    if left:
        pytest.skip(f"the Kafka broker already has the app's topics {left}: use a fresh broker")


async def scan(dynamodb: Any, table: str) -> list[dict[str, Any]]:
    """Every item of a DynamoDB table, as plain values."""
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"TableName": table}
    while True:
        page = await dynamodb.scan(**kwargs)
        items.extend(item_from_dynamodb(i) for i in page["Items"])
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


class KinesisReader:
    """Reads every shard of a Kinesis stream from ``TRIM_HORIZON``; ``poll`` gets what is new."""

    def __init__(self, kinesis: Any, stream: str) -> None:
        self.kinesis = kinesis
        self.stream = stream
        self.records: list[dict[str, Any]] = []
        self._iterators: dict[str, str | None] = {}

    async def poll(self) -> int:
        """Read each shard up to its end now; returns how many records were new."""
        if not self._iterators:
            shards = (await self.kinesis.list_shards(StreamName=self.stream))["Shards"]
            for shard in shards:
                it = await self.kinesis.get_shard_iterator(
                    StreamName=self.stream,
                    ShardId=shard["ShardId"],
                    ShardIteratorType="TRIM_HORIZON",
                )
                self._iterators[shard["ShardId"]] = it["ShardIterator"]
        before = len(self.records)
        for shard_id, iterator in self._iterators.items():
            while iterator is not None:
                page = await self.kinesis.get_records(ShardIterator=iterator, Limit=10_000)
                self.records.extend(page["Records"])
                iterator = page.get("NextShardIterator")
                if not page["Records"]:
                    break
            self._iterators[shard_id] = iterator
        return len(self.records) - before

    async def read_until(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout: float, worker: Worker
    ) -> list[dict[str, Any]]:
        """Poll until ``done(records)``; fail after ``timeout`` with the worker's log."""
        deadline = time.monotonic() + timeout
        while True:
            await self.poll()
            if done(self.records):
                return self.records
            if worker.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"read {len(self.records)} records of {self.stream}\n{worker.describe()}"
                )
            await asyncio.sleep(0.1)
