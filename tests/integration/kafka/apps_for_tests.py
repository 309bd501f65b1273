"""Small apps for the end-to-end Kafka tests, and the helpers that drive and observe them.

A worker subprocess runs ``asyncflow worker tests.integration.kafka.apps_for_tests:app``;
``app`` builds the app from ``E2E_*`` environment variables (the broker comes from
``ASYNCFLOW_BROKER`` or ``--broker``; the Tansu test options are always applied)::

    E2E_APP_ID       app id = consumer group (default "e2e")
    E2E_INPUT        input topic (JSON ``{"key": str, "seq": int}``, key = ``key``)
    E2E_OUTPUT       output topic (transform and window modes)
    E2E_PARTITIONS   partitions of both topics (4)
    E2E_CONCURRENCY  lanes (4)
    E2E_MODE         transform | slow | window | repartition | total | dedup
    E2E_LANE_RATE    transform, total: events/s per lane, 0 = unthrottled; slow: sink events/s
    E2E_COMMIT_INTERVAL  seconds between periodic commits (the app's default if unset)
    E2E_TTL          dedup: seconds a seen key is remembered (table ttl)
    E2E_CLIENT       Kafka client: aiokafka (default) | rdkafka
    E2E_GUARANTEE    processing_guarantee: at_least_once (default) | exactly_once
    E2E_TRANSACTIONAL_ID  exactly-once: the worker's transactional id (stable per worker)
    E2E_RESTORE_DELAY  seconds every changelog read of a restore waits first (0: none), so
                     a restore lasts as long as a big state's would, whatever the machine

Modes:

* ``transform``: every input event becomes one output record keyed like the input,
  carrying where it came from: ``{"key", "seq", "p", "o", "pid", "t"}`` (input
  partition and offset, the worker's pid, the wall time it was handled), so tests
  compute loss, duplicates and order exactly. A negative ``seq`` makes the agent
  raise (its event goes to the dead letters).
* ``slow``: every event goes to an external sink that writes ``E2E_LANE_RATE``
  events/s; a timer logs the lane queues, events read and written (``lanes size=...
  peak=... capacity=... events_in=... written=...``).
* ``window``: per key, 1 s tumbling event-time windows (event time = ``seq`` * 10 ms)
  collecting the ``seq`` s; each result is one output record ``{"key", "start",
  "seqs", "pid"}``. A record with ``seq`` >= ``END_SEQ`` pushes the watermark past
  every window (a sentinel, so windows close on an unbounded topic).
* ``repartition``: the input's record keys are random; ``source.repartition("by-key")``
  re-keys it by the value's ``key`` through ``<app>-by-key-repartition``, then the
  windows of ``window`` mode (their ``seqs`` sorted: the events of a window come from
  every input partition). A sentinel in every input partition closes them all.
* ``total``: a running total per key in the table ``totals`` (``stream.state``):
  event ``seq`` adds ``amount(seq)``; every update is one output record
  ``{"key", "seq", "total", "pid"}``. Records with ``seq`` >= ``END_SEQ`` are ignored.
* ``dedup``: ``stream.stateful_map`` over the table ``seen`` (``ttl`` = ``E2E_TTL``
  seconds, refreshed by every sighting); every event becomes one output record
  ``{"key", "seq", "fresh", "t", "pid"}``, ``fresh`` when its key was not seen
  within the ttl (what a deduplicating app lets through).

The event time of every mode is ``seq_time``: ``seq`` * 10 ms.

Nothing here runs at import time: the module is also imported by pytest's doctest
collection and by the tests themselves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from operator import add
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

import asyncflow as af
from adapters.kafka_sink import kafka_partition
from asyncflow.protocols import SinkRecord
from tests.integration.kafka.broker import TEST_OPTIONS

log = logging.getLogger("asyncflow.e2e")

ROOT = Path(__file__).resolve().parents[3]
END_SEQ = 1_000_000_000
"""Window mode: a record with a ``seq`` this large is a watermark sentinel, not data."""
SENTINEL = b"__e2e_end__"
"""How the values ``read_all`` writes to mark the end of each partition it reads begin."""


class Item(af.Record):
    """An input event: ``key`` and its per-key sequence number."""

    key: str
    seq: int


# -- the apps ------------------------------------------------------------------------


@dataclass
class Config:
    """What an e2e app does; ``from_env`` reads it from ``E2E_*`` variables."""

    app_id: str = "e2e"
    input: str = "e2e-in"
    output: str = "e2e-out"
    partitions: int = 4
    concurrency: int = 4
    mode: str = "transform"
    lane_rate: float = 0.0
    commit_interval: float | None = None
    ttl: float = 0.0
    client: str = "aiokafka"
    guarantee: str = "at_least_once"
    transactional_id: str | None = None
    restore_delay: float = 0.0
    broker: str | None = None  # None: ASYNCFLOW_BROKER or --broker
    extra: dict[str, Any] = field(default_factory=dict)  # more App(...) arguments, in-process

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        commit = env.get("E2E_COMMIT_INTERVAL")
        return cls(
            app_id=env.get("E2E_APP_ID", "e2e"),
            input=env.get("E2E_INPUT", "e2e-in"),
            output=env.get("E2E_OUTPUT", "e2e-out"),
            partitions=int(env.get("E2E_PARTITIONS", "4")),
            concurrency=int(env.get("E2E_CONCURRENCY", "4")),
            mode=env.get("E2E_MODE", "transform"),
            lane_rate=float(env.get("E2E_LANE_RATE", "0")),
            commit_interval=float(commit) if commit else None,
            ttl=float(env.get("E2E_TTL", "0")),
            client=env.get("E2E_CLIENT", "aiokafka"),
            guarantee=env.get("E2E_GUARANTEE", "at_least_once"),
            transactional_id=env.get("E2E_TRANSACTIONAL_ID") or None,
            restore_delay=float(env.get("E2E_RESTORE_DELAY", "0")),
        )

    def env(self) -> dict[str, str]:
        """The environment variables that make ``app()`` build this config."""
        out = {
            "E2E_APP_ID": self.app_id,
            "E2E_INPUT": self.input,
            "E2E_OUTPUT": self.output,
            "E2E_PARTITIONS": str(self.partitions),
            "E2E_CONCURRENCY": str(self.concurrency),
            "E2E_MODE": self.mode,
            "E2E_LANE_RATE": str(self.lane_rate),
        }
        if self.commit_interval is not None:
            out["E2E_COMMIT_INTERVAL"] = str(self.commit_interval)
        if self.ttl:
            out["E2E_TTL"] = str(self.ttl)
        if self.client != "aiokafka":
            out["E2E_CLIENT"] = self.client
        if self.guarantee != "at_least_once":
            out["E2E_GUARANTEE"] = self.guarantee
        if self.transactional_id:
            out["E2E_TRANSACTIONAL_ID"] = self.transactional_id
        if self.restore_delay:
            out["E2E_RESTORE_DELAY"] = str(self.restore_delay)
        return out


class SlowSink:
    """An external sink that writes ``rate`` records per second (and keeps only a count)."""

    def __init__(self, rate: float, name: str = "slow") -> None:
        self.name = name
        self.rate = rate
        self.max_batch = 100
        self.linger = 0.01
        self.written = 0

    async def start(self) -> None:
        pass

    async def write(self, records: Sequence[SinkRecord]) -> None:
        await asyncio.sleep(len(records) / self.rate)
        self.written += len(records)

    async def stop(self) -> None:
        pass


def seq_time(item: Item) -> float:
    """The event time of an input event, in epoch seconds: ``seq`` * 10 ms.

    Example:
        >>> seq_time(Item(key="k", seq=250))
        2.5
    """
    return item.seq / 100


def amount(seq: int) -> int:
    """What event ``seq`` adds to its key's running total in ``total`` mode (1 to 10).

    Example:
        >>> [amount(s) for s in (0, 9, 10)]
        [1, 10, 1]
    """
    return seq % 10 + 1


def build(cfg: Config) -> af.App:
    """The app ``cfg`` describes (see the module docstring)."""
    options = dict(TEST_OPTIONS)
    if cfg.client != "aiokafka":
        options["client"] = cfg.client
    if cfg.transactional_id:
        options["transactional_id"] = cfg.transactional_id
    extra = dict(cfg.extra)
    if cfg.guarantee != "at_least_once":
        extra.setdefault("processing_guarantee", cfg.guarantee)
    app = af.App(
        cfg.app_id,
        broker=cfg.broker,
        broker_options=options,
        commit_interval=cfg.commit_interval,
        **extra,
    )
    source = app.topic(
        cfg.input,
        value_type=Item,
        key=lambda v: v.key,
        partitions=cfg.partitions,
        time=seq_time,
    )
    pid = os.getpid()
    if cfg.mode == "transform":
        output: af.Topic[dict[str, Any]] = app.topic(cfg.output, partitions=cfg.partitions)
        every = 50
        pause = every / cfg.lane_rate if cfg.lane_rate > 0 else 0.0

        @app.agent(source, concurrency=cfg.concurrency)
        async def transform(stream: af.Stream[Item]) -> None:
            n = 0
            async for item in stream:
                if item.seq < 0:
                    raise ValueError(f"negative seq {item.seq}")
                ev = stream.current
                assert ev is not None
                p = ev.partition.partition  # type: ignore[attr-defined]
                await output.send(
                    item.key,
                    {
                        "key": item.key,
                        "seq": item.seq,
                        "p": p,
                        "o": ev.offset,
                        "pid": pid,
                        "t": time.time(),
                    },
                )
                n += 1
                if pause and n % every == 0:
                    await asyncio.sleep(pause)

    elif cfg.mode == "slow":
        slow_sink = SlowSink(cfg.lane_rate or 1000.0)
        sink = app.sink(slow_sink)
        streams: list[af.Stream[Any]] = []

        @app.agent(source, concurrency=cfg.concurrency)
        async def slow(stream: af.Stream[Item]) -> None:
            streams.append(stream)
            async for item in stream:
                await sink.send(item.key, item.seq)

        @app.timer(0.25)
        async def report_lanes() -> None:
            queues = [s._queue for s in streams]  # test-only peek at the lane queues
            if queues:
                log.info(
                    "lanes size=%d peak=%d capacity=%d events_in=%d written=%d",
                    max(q.size for q in queues),
                    max(q.peak for q in queues),
                    queues[0].maxsize,
                    app.metrics.get("events_in"),
                    slow_sink.written,
                )

    elif cfg.mode in ("window", "repartition"):
        from datetime import timedelta

        results_topic: af.Topic[dict[str, Any]] = app.topic(cfg.output, partitions=cfg.partitions)
        rekeyed = cfg.mode == "repartition"
        # repartition: the input's record keys say nothing (producers keyed them at random),
        # so it is re-keyed by the value's key first; no wait either: the watermark markers
        # hold each internal partition back to its slowest source. The events of a window
        # then come from every input partition, so its seqs are sorted.
        windowed = source.repartition("by-key", partitions=cfg.partitions) if rekeyed else source

        @app.agent(windowed, concurrency=cfg.concurrency,
                   name="rekeyed_windows" if rekeyed else "windows")
        async def windows(stream: af.Stream[Item]) -> None:
            seqs = stream.map(lambda item: item.seq)
            results = seqs.window(af.Tumbling(timedelta(seconds=1)), aggregate=af.Collect())
            async for w in results:
                kept = [s for s in w.value if s < END_SEQ]
                if kept:
                    await results_topic.send(
                        w.key,
                        {"key": w.key, "start": w.start_ms, "seqs": sorted(kept) if rekeyed
                         else kept, "pid": pid},
                    )

    elif cfg.mode == "total":
        totals = app.table("totals", default=0)
        totals_topic: af.Topic[dict[str, Any]] = app.topic(cfg.output, partitions=cfg.partitions)

        every = 50
        pause = every / cfg.lane_rate if cfg.lane_rate > 0 else 0.0

        @app.agent(source, concurrency=cfg.concurrency)
        async def running_total(stream: af.Stream[Item]) -> None:
            total = stream.state(totals)
            n = 0
            async for item in stream:
                if item.seq >= END_SEQ:
                    continue
                new = total.update(partial(add, amount(item.seq)))
                await totals_topic.send(
                    item.key, {"key": item.key, "seq": item.seq, "total": new, "pid": pid}
                )
                n += 1
                if pause and n % every == 0:
                    await asyncio.sleep(pause)

    elif cfg.mode == "dedup":
        from datetime import timedelta

        if cfg.ttl <= 0:
            raise ValueError("dedup mode needs E2E_TTL (seconds) > 0")
        seen = app.table("seen", default=False, ttl=timedelta(seconds=cfg.ttl))
        seen_topic: af.Topic[dict[str, Any]] = app.topic(cfg.output, partitions=cfg.partitions)

        @app.agent(source, concurrency=cfg.concurrency)
        async def dedup(stream: af.Stream[Item]) -> None:
            marked = stream.stateful_map(seen, lambda was, item: (True, (item, not was)))
            async for item, fresh in marked:
                await seen_topic.send(
                    item.key,
                    {"key": item.key, "seq": item.seq, "fresh": fresh, "t": time.time(), "pid": pid},
                )

    else:
        raise ValueError(f"unknown E2E_MODE {cfg.mode!r}")
    return app


def app() -> af.App:
    """The app a worker subprocess runs (``asyncflow worker ...apps_for_tests:app``)."""
    cfg = Config.from_env()
    if cfg.restore_delay:
        slow_changelog_reads(cfg.restore_delay)
    return build(cfg)


def slow_changelog_reads(delay: float) -> None:
    """Make every changelog read of this process wait ``delay`` seconds first.

    Only in a worker subprocess (``app``): a restore then takes as long as one
    of a big state would, on a fast machine too, so a test can have another
    worker join in the middle of it. The reads themselves are the broker's.
    """
    from adapters.kafka import KafkaBroker

    read = KafkaBroker.read_changelog

    async def slow_read(self: KafkaBroker, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(delay)
        return await read(self, *args, **kwargs)

    KafkaBroker.read_changelog = slow_read  # type: ignore[method-assign]


# -- helpers the tests use to feed, run and observe the apps --------------------------


def key_of(i: int, keys: int) -> str:
    """The key of input event number ``i`` (keys cycle: event ``i`` has ``seq`` ``i // keys``)."""
    return f"k{i % keys:04d}"


def sentinel_keys(partitions: int) -> list[bytes]:
    """One key per partition, for records that push each partition's event time far ahead.

    Example:
        >>> len(set(sentinel_keys(4)))
        4
    """
    found: dict[int, bytes] = {}
    i = 0
    while len(found) < partitions:
        key = f"end-{i}".encode()
        found.setdefault(kafka_partition(key, partitions), key)
        i += 1
    return [found[p] for p in range(partitions)]


def end_marks(partitions: int) -> list[tuple[bytes, bytes]]:
    """``raw`` records for ``produce_events``: one ``END_SEQ`` sentinel per partition."""
    return [
        (k, orjson.dumps({"key": k.decode(), "seq": END_SEQ})) for k in sentinel_keys(partitions)
    ]


def partition_counts(n: int, keys: int, partitions: int) -> dict[int, int]:
    """How many of ``n`` events (``keys`` keys, cycling) land in each partition."""
    per_key = {key_of(k, keys): n // keys + (1 if k < n % keys else 0) for k in range(min(n, keys))}
    out = dict.fromkeys(range(partitions), 0)
    for key, count in per_key.items():
        out[kafka_partition(key.encode(), partitions)] += count
    return out


async def produce_events(
    bootstrap: str,
    topic: str,
    n: int,
    *,
    keys: int = 1000,
    start: int = 0,
    raw: Sequence[tuple[bytes, bytes]] = (),
) -> int:
    """Write events ``start .. start+n-1`` (``{"key", "seq"}``, keyed) with the batch API.

    Records stream out in chunks (nothing like ``n`` records is held at once); each
    key's records go to one partition, in ``seq`` order. ``raw`` ``(key, value)``
    pairs are appended as they are (malformed records). Returns the records acknowledged.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=False,
        linger_ms=0,
        max_batch_size=256 * 1024,
        max_request_size=4 * 1024 * 1024,
    )
    await producer.start()
    try:
        partitions = len(await producer.partitions_for(topic))
        cache = {k: kafka_partition(key_of(k, keys).encode(), partitions) for k in range(keys)}
        batches: dict[int, Any] = {}
        pending: list[tuple[int, Any]] = []
        counts = dict.fromkeys(range(partitions), 0)
        dumps = orjson.dumps

        async def add(p: int, key: bytes, value: bytes) -> None:
            batch = batches.get(p)
            if batch is None:
                batch = batches[p] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                batch.close()
                pending.append((counts[p], await producer.send_batch(batch, topic, partition=p)))
                counts[p] = 0
                batch = batches[p] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
            counts[p] += 1

        for i in range(start, start + n):
            k = i % keys
            key = key_of(i, keys)
            await add(cache[k], key.encode(), dumps({"key": key, "seq": i // keys}))
            if len(pending) > 64:  # bound what is in flight
                done = pending[:32]
                del pending[:32]
                for _, fut in done:
                    await fut
        for key_b, value in raw:
            await add(kafka_partition(key_b, partitions), key_b, value)
        for p, batch in batches.items():
            if counts[p]:
                batch.close()
                pending.append((counts[p], await producer.send_batch(batch, topic, partition=p)))
        for _, fut in pending:
            await fut
        return n + len(raw)
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str, partitions: int, timeout: float = 60.0) -> list[Any]:
    """Every record in ``topic``, partition by partition in offset order (sentinels left out).

    Call it once nothing else writes to the topic: it appends a sentinel to each
    partition and reads each one up to its sentinel (end offsets are inexact on
    Tansu, so they are never used).
    """
    mine = SENTINEL + os.urandom(8).hex().encode()  # earlier calls left their own sentinels
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for p in range(partitions):
            await producer.send_and_wait(topic, mine, partition=p)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: dict[int, list[Any]] = {p: [] for p in range(partitions)}
        open_ = set(range(partitions))
        deadline = time.monotonic() + timeout
        while open_:
            if time.monotonic() > deadline:
                got = {p: len(v) for p, v in out.items()}
                raise AssertionError(
                    f"no sentinel in partitions {sorted(open_)} of {topic} "
                    f"after {timeout}s (read {got})"
                )
            for tp, records in (await consumer.getmany(timeout_ms=200, max_records=50_000)).items():
                if tp.partition not in open_:
                    continue
                for r in records:
                    if r.value == mine:
                        open_.discard(tp.partition)
                        consumer.pause(tp)
                        break
                    if not r.value.startswith(SENTINEL):
                        out[tp.partition].append(r)
        return [r for p in range(partitions) for r in out[p]]
    finally:
        await consumer.stop()


async def count_records(bootstrap: str, topic: str, n: int, timeout: float = 60.0) -> None:
    """Wait until ``topic`` holds at least ``n`` records (counted, not from end offsets)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        parts = None
        deadline = time.monotonic() + timeout
        while not parts:
            await consumer.topics()
            parts = consumer.partitions_for_topic(topic)
            if not parts and time.monotonic() > deadline:
                raise AssertionError(f"topic {topic} does not exist")
            if not parts:
                await asyncio.sleep(0.05)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = 0
        while seen < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic} has {seen} of {n} records after {timeout}s")
            for records in (await consumer.getmany(timeout_ms=200, max_records=50_000)).values():
                seen += len(records)
    finally:
        await consumer.stop()


def decode_outputs(records: Iterable[Any]) -> list[dict[str, Any]]:
    """Output values as dicts, each with its output partition and offset (``out_p``, ``out_o``)."""
    out = []
    for r in records:
        value = orjson.loads(r.value)
        value["out_p"] = r.partition
        value["out_o"] = r.offset
        out.append(value)
    return out


class Worker:
    """An ``asyncflow worker`` subprocess running an e2e app; output goes to a log file.

    Example:
        >>> Worker.command("mod:app", "kafka://127.0.0.1:1")[-4:]
        ['worker', 'mod:app', '--broker', 'kafka://127.0.0.1:1']
    """

    def __init__(
        self,
        spec: str = "tests.integration.kafka.apps_for_tests:app",
        broker: str | None = None,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        name: str = "worker",
    ) -> None:
        self.spec = spec
        self.broker = broker
        self.env = dict(env or {})
        self.log_path = (log_dir or Path(tempfile.gettempdir())) / f"{name}-{id(self):x}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def command(spec: str, broker: str | None) -> list[str]:
        script = Path(sys.executable).parent / "asyncflow"
        head = [str(script)] if script.exists() else [sys.executable, "-m", "asyncflow.cli"]
        return [*head, "worker", spec, *(["--broker", broker] if broker else [])]

    def start(self) -> Worker:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        if self.broker:
            env.pop("ASYNCFLOW_BROKER", None)
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                self.command(self.spec, self.broker),
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self, pattern: str) -> list[re.Match[str]]:
        rx = re.compile(pattern)
        return [m for line in self.log().splitlines() if (m := rx.search(line))]

    def wait_log_now(self, pattern: str) -> re.Match[str]:
        """The last log line matching ``pattern`` (it must be there already)."""
        found = self.lines(pattern)
        assert found, f"no /{pattern}/ in the worker log:\n{self.tail()}"
        return found[-1]

    async def wait_log(self, pattern: str, timeout: float = 30.0, count: int = 1) -> re.Match[str]:
        """Wait for the ``count``-th log line matching ``pattern``; fail if the worker exits first."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.lines(pattern)
            if len(found) >= count:
                return found[count - 1]
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"worker exited ({self.process.returncode}) before /{pattern}/:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no /{pattern}/ in the worker log in {timeout}s:\n{self.tail()}"
                )
            await asyncio.sleep(0.05)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to end (polling; the event loop stays free); its exit code."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"worker still running after {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.05)
        return code

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def rss_mb(self) -> float:
        """The worker's resident memory now (``VmRSS`` from ``/proc``)."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        kb = int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1))  # type: ignore[union-attr]
        return kb / 1024

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop_now(self) -> None:
        """Kill the process if it still runs (test teardown); the log stays for post-mortems."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class Tail:
    """Follows a topic from its start in the background, decoding every record as it comes.

    For progress only (how far the workers got, which pids wrote); exact checks
    read the topic with ``read_all`` once the writers have stopped.
    """

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.values: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Tail:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 15)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            self._ready.set()
            while True:
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    for r in records:
                        if not r.value.startswith(SENTINEL):
                            value = orjson.loads(r.value)
                            value["out_p"] = r.partition
                            self.values.append(value)
        finally:
            await consumer.stop()

    def pids(self) -> set[int]:
        return {v["pid"] for v in self.values}

    async def wait(
        self,
        predicate: Any,
        timeout: float = 60.0,
        what: str = "outputs",
        alive: Sequence[Worker] = (),
    ) -> None:
        """Wait until ``predicate(values)``; fail early if a worker in ``alive`` exits.

        A predicate with an ``explain(values)`` method has its answer in the
        failure (what is still missing).
        """
        deadline = time.monotonic() + timeout
        while not predicate(self.values):
            if self._task is not None and self._task.done():
                self._task.result()
            for w in alive:
                if w.process is not None and w.process.poll() is not None:
                    raise AssertionError(
                        f"{w.log_path.name} exited ({w.process.returncode}) while waiting for "
                        f"{what}:\n{w.tail()}"
                    )
            if time.monotonic() > deadline:
                explain = getattr(predicate, "explain", None)
                detail = f": {explain(self.values)}" if explain is not None else ""
                raise AssertionError(
                    f"{what} not reached in {timeout}s ({len(self.values)} read){detail}"
                )
            await asyncio.sleep(0.05)


def log_time(match: re.Match[str]) -> float:
    """The epoch time of a log line (``logging``'s default ``asctime``, local time, ms)."""
    line = match.string
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def assigned_partitions(worker: Worker) -> list[set[int]]:
    """Every assignment the worker logged, oldest first, as sets of partition numbers."""
    return [
        {int(n) for n in re.findall(r"partition=(\d+)", m.group(1))}
        for m in worker.lines(r"asyncflow\.worker: assigned (.*)$")
    ]
