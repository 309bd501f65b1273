"""Run apps and agents in tests: feed events, move time, collect outputs. No broker needed.

``TestRun`` starts an app on a fresh memory broker; ``send`` produces to its
topics, ``finish`` ends every input and waits for the worker to drain and stop,
and ``outputs`` / ``dead_letters`` read what it wrote. ``CaptureSink`` stands
in for an external sink (it keeps records; ``asyncflow.ConsoleSink`` prints
them). ``stream_of`` builds a bounded one-lane stream for testing stream
operations directly. See the documentation's "Testing" page.

Example:
    >>> import asyncio, asyncflow as af
    >>> app = af.App("double")
    >>> numbers, doubled = app.topic("numbers"), app.topic("doubled")
    >>> @app.agent(numbers)
    ... async def double(stream):
    ...     async for n in stream:
    ...         await doubled.send(None, n * 2)
    >>> async def check():
    ...     async with TestRun(app) as run:
    ...         await run.send("numbers", 21)
    ...         await run.finish()
    ...         return run.outputs("doubled")
    >>> asyncio.run(check())
    [42]
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from asyncflow.app import App
from asyncflow.clock import ManualClock
from asyncflow.errors import SinkError
from asyncflow.event import Event, Watermark
from asyncflow.lanes import LaneQueue
from asyncflow.memory import MemoryBroker
from asyncflow.partition_log import MemoryRecord
from asyncflow.protocols import Rejected, SinkRecord
from asyncflow.stream import LaneContext, Stream


def stream_of(
    values: Iterable[Any],
    *,
    keys: Iterable[Any] | None = None,
    times: Iterable[int] | None = None,
) -> Stream[Any]:
    """A bounded single-lane stream over ``values`` (event times in epoch ms).

    Example:
        >>> import asyncio
        >>> asyncio.run(stream_of([1, 2]).collect())
        [1, 2]
    """
    vals = list(values)
    ks = list(keys) if keys is not None else [None] * len(vals)
    ts = list(times) if times is not None else [None] * len(vals)
    events = [Event(k, v, t, offset=i) for i, (k, v, t) in enumerate(zip(ks, vals, ts, strict=True))]
    q = LaneQueue(max(len(events), 1))
    if events:
        q.put(events)
    q.put_watermark(Watermark(max((t for t in ts if t is not None), default=None), 0, final=True))
    q.close()
    return Stream(q, LaneContext("test", 0))


class CaptureSink:
    """A sink that keeps what it is given; can be slowed down, made to fail or to refuse records.

    ``refuse(record)`` returns a reason to refuse the record for what it is
    (it comes back from ``write`` as ``Rejected`` and goes to the dead
    letters), or ``None`` to keep it.

    Example:
        >>> import asyncio
        >>> s = CaptureSink("out", refuse=lambda r: "negative" if r.value < 0 else None)
        >>> asyncio.run(s.write([SinkRecord("k", 1), SinkRecord("k", -1)]))
        [Rejected(record=SinkRecord(key='k', value=-1, topic=None, headers=(), timestamp=None, partition=None), reason='negative')]
        >>> s.values
        [1]
    """

    def __init__(
        self,
        name: str = "capture",
        *,
        delay: float = 0.0,
        fail_times: int = 0,
        max_batch: int = 500,
        linger: float = 0.01,
        refuse: Callable[[SinkRecord], str | None] | None = None,
    ) -> None:
        self.name = name
        self.refuse = refuse
        self.delay = delay
        self.fail_times = fail_times
        self.max_batch = max_batch
        self.linger = linger
        self.records: list[SinkRecord] = []
        self.writes = 0

    async def start(self) -> None:
        """Nothing to open."""

    async def write(self, records: Sequence[SinkRecord]) -> list[Rejected] | None:
        """Keep ``records`` (after ``delay``), except the ones ``refuse`` names a reason for."""
        if self.fail_times > 0:
            self.fail_times -= 1
            raise SinkError(f"{self.name}: injected failure")
        if self.delay:
            await asyncio.sleep(self.delay)
        self.writes += 1
        if self.refuse is None:
            self.records.extend(records)
            return None
        refused = []
        for r in records:
            reason = self.refuse(r)
            if reason is None:
                self.records.append(r)
            else:
                refused.append(Rejected(r, reason))
        return refused

    async def stop(self) -> None:
        """Nothing to close; the records stay readable."""

    @property
    def values(self) -> list[Any]:
        """The values of the records kept, in the order they were written."""
        return [r.value for r in self.records]


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.005
) -> None:
    """Wait until ``predicate()`` is true, failing after ``timeout`` seconds.

    Example:
        >>> import asyncio
        >>> asyncio.run(wait_for(lambda: True))
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


class TestRun:
    """An app running on a memory broker inside a test.

    Example:
        >>> import asyncio
        >>> async def run_empty():
        ...     async with TestRun(App("e")) as run:
        ...         await run.finish()
        >>> asyncio.run(run_empty())
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        app: App,
        *,
        broker: MemoryBroker | None = None,
        clock: ManualClock | None = None,
    ) -> None:
        self.app = app
        self.broker = broker or MemoryBroker()
        if clock is not None:
            app.clock = clock
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TestRun:
        self.app.set_broker(self.broker)
        self._task = asyncio.create_task(self.app.run(stop_when_idle=True))
        await wait_for(lambda: self.app._runtime is not None or self._task is None or self._task.done())
        if self._task.done():
            self._task.result()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None and not self._task.done():
            self.app.stop()
            await self._task

    def _topic(self, name: str) -> Any:
        ch = self.app.channels.get(name)
        if ch is None:
            raise KeyError(f"the app declares no topic {name!r}")
        return ch

    async def send(
        self,
        topic: str,
        value: Any,
        *,
        key: Any = None,
        timestamp: int | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Produce one value to a topic, encoded with the topic's codec."""
        ch = self._topic(topic)
        kb = None if key is None else (key if isinstance(key, bytes) else ch.key_codec.encode(key))
        self.broker.produce(topic, ch.codec.encode(value), kb, headers, timestamp)

    async def send_many(self, topic: str, values: Iterable[Any], *, key: Callable[[Any], Any] | None = None) -> None:
        """Produce many values, optionally keyed by ``key(value)``."""
        for v in values:
            await self.send(topic, v, key=None if key is None else key(v))

    def send_raw(self, topic: str, data: bytes | None, *, key: bytes | None = None) -> None:
        """Produce raw bytes (e.g. malformed JSON) to a topic."""
        self.broker.produce(topic, data, key)

    async def finish(self, timeout: float = 30.0) -> None:
        """End every input topic and wait for the worker to drain, flush, commit and stop."""
        for name, t in list(self.broker.topics.items()):
            ch = self.app.channels.get(name)
            if ch is not None and ch.source is None:
                t.ended = True
        self.broker._notify()
        if not self.app.agents:
            self.app.stop()
        assert self._task is not None
        await asyncio.wait_for(asyncio.shield(self._task), timeout)

    async def wait_stopped(self, timeout: float = 30.0) -> None:
        """Wait for a worker that stops by itself (its inputs ended), without ending them."""
        assert self._task is not None
        await asyncio.wait_for(asyncio.shield(self._task), timeout)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker as SIGTERM would (drain, flush, commit) without ending inputs."""
        self.app.stop()
        assert self._task is not None
        await asyncio.wait_for(asyncio.shield(self._task), timeout)

    def outputs(self, topic: str) -> list[Any]:
        """Values written to a topic, decoded with its codec, in partition order."""
        ch = self.app.channels.get(topic)
        return [
            ch.codec.decode(r.value) if ch is not None and r.value is not None else r.value
            for r in self.broker.records(topic)
        ]

    def table(self, name: str) -> dict[Any, Any]:
        """A table's values as its changelog holds them (what a restore would rebuild).

        Every source partition's records are read up to its last checkpoint
        marker, following claims as a restore does (``asyncflow.state.restore``);
        values are decoded with the table's codec.
        """
        from asyncflow.state.codec import decode_key
        from asyncflow.state.shard import CLAIM_HEADER, MARKER_KEY, PARTITION_HEADER, SENTINEL_KEY

        table = self.app.tables[name]
        topic = f"{self.app.id}-{name}-changelog"
        if topic not in self.broker.topics:
            return {}
        out: dict[Any, Any] = {}
        for log in self.broker.topic(topic).partitions:
            trusted: dict[tuple[bytes, bytes], bytes | None] = {}
            tails: dict[bytes, dict[bytes, bytes | None]] = {}
            claimants: dict[bytes, bytes | None] = {}
            for rec in log:
                headers = dict(rec.headers)
                label, claim = headers.get(PARTITION_HEADER, b""), headers.get(CLAIM_HEADER)
                if rec.key == SENTINEL_KEY:
                    claimants[label] = claim
                    continue
                claimant = claimants.get(label)
                if claim is not None and claimant is not None and claim != claimant:
                    continue  # written late by a worker that had lost the partition
                tail = tails.setdefault(label, {})
                if rec.key == MARKER_KEY:
                    trusted.update({(label, k): v for k, v in tail.items()})
                    tail.clear()
                elif rec.key is not None:
                    tail[rec.key] = rec.value
            for (_, kb), vb in trusted.items():
                if vb is None:
                    out.pop(decode_key(kb), None)
                else:
                    out[decode_key(kb)] = table.codec.decode(vb if table.ttl_ms is None else vb[8:])
        return out

    def dead_letters(self) -> list[MemoryRecord]:
        """Records in the dead-letter topic; the reason is in the ``asyncflow.reason`` header."""
        target = self.app.dead_letter_target
        if not isinstance(target, str) or target not in self.broker.topics:
            return []
        return self.broker.records(target)

    async def advance(self, seconds: float) -> None:
        """Move the manual clock forward and let a watermark tick go through."""
        if self.clock is None:
            raise RuntimeError("pass clock=ManualClock() to TestRun to move time by hand")
        self.clock.advance(seconds)
        await asyncio.sleep(self.app.watermark_interval * 2)


def reason_of(record: MemoryRecord) -> str:
    """The dead-letter reason stored in a record's headers.

    Example:
        >>> reason_of(MemoryRecord(0, None, b"", 0, [("asyncflow.reason", b"bad")]))
        'bad'
    """
    return dict(record.headers).get("asyncflow.reason", b"").decode()
