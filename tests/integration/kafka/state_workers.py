"""Helpers for the durable-state end-to-end tests: worker pools with state dirs, kills, checks.

Every worker process gets its own ``ASYNCFLOW_STATE_DIR`` under the test's
``tmp_path`` (``state/<name>``); restarting a name reuses its directory, so a
restart finds its own local store (current, or stale after another worker
owned the partitions meanwhile). Nothing here sleeps to wait for a condition:
waits poll with a deadline; the only sleeps are the random moments of a kill
soak and the pacing of its producer.
"""

from __future__ import annotations

import ast
import asyncio
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.integration.kafka.apps_for_tests import Config, Worker, read_all
from tests.integration.kafka.broker import committed

PARTITIONS = 4


class Pool:
    """Worker processes of one app, by name; each name has its own state directory.

    ``start(name)`` starts a new process for ``name`` (the log of each start is kept
    in ``all``); ``current[name]`` is the latest. Everything still running is
    killed on exit.
    """

    def __init__(
        self, url: str, cfg: Config, tmp_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.url = url
        self.cfg = cfg
        self.tmp_path = tmp_path
        self.env = dict(env or {})
        self.all: list[Worker] = []
        self.current: dict[str, Worker] = {}
        self._starts: Counter[str] = Counter()

    def state_dir(self, name: str) -> Path:
        return self.tmp_path / "state" / name

    def start(self, name: str, state: str | None = None, env: dict[str, str] | None = None) -> Worker:
        """Start a worker for ``name`` with the state directory of ``state`` (default: ``name``).

        ``env``: more variables for this worker alone.
        """
        n = self._starts[name]
        self._starts[name] += 1
        env = {
            **self.cfg.env(),
            "ASYNCFLOW_STATE_DIR": str(self.state_dir(state or name)),
            **self.env,
            **(env or {}),
        }
        w = Worker(broker=self.url, env=env, log_dir=self.tmp_path, name=f"{name}.{n}")
        self.all.append(w)
        self.current[name] = w.start()
        return w

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for w in self.all:
            w.stop_now()

    def running(self) -> list[Worker]:
        return [w for w in self.current.values() if w.process and w.process.poll() is None]

    async def stop_all(self, timeout: float = 60.0) -> None:
        """SIGTERM every running worker; each must exit 0 within ``timeout``."""
        workers = self.running()
        for w in workers:  # one restarted a moment ago may still be starting: let it run first
            await w.wait_log("running on", timeout=timeout)
        for w in workers:
            w.signal(signal.SIGTERM)
        codes = await asyncio.gather(*(w.wait_exit(timeout) for w in workers))
        for w, code in zip(workers, codes, strict=True):
            assert code == 0, f"{w.log_path.name} exited {code}:\n{w.tail()}"

    def count(self, pattern: str) -> int:
        """Log lines matching ``pattern`` over every process started."""
        return sum(len(w.lines(pattern)) for w in self.all)


def alive(*workers: Worker) -> None:
    for w in workers:
        if w.process is not None and w.process.poll() is not None:
            raise AssertionError(f"{w.log_path.name} exited ({w.process.returncode}):\n{w.tail()}")


async def wait_committed(
    bootstrap: str,
    group: str,
    topic: str,
    expected: dict[int, int],
    *,
    timeout: float,
    workers: Sequence[Worker] = (),
) -> float:
    """Poll the group's committed offsets until they equal ``expected``; seconds it took."""
    began = time.monotonic()
    got: dict[int, int | None] = {}
    while True:
        got = await committed(bootstrap, group, topic, len(expected))
        if got == expected:
            return time.monotonic() - began
        alive(*workers)
        if time.monotonic() - began > timeout:
            tails = "\n".join(f"--- {w.log_path.name}\n{w.tail(15)}" for w in workers)
            raise AssertionError(
                f"committed offsets {got} did not reach {expected} in {timeout}s\n{tails}"
            )
        await asyncio.sleep(0.25)


STOPPED = r"asyncflow\.worker: worker \S+ stopped: (\{.*\})$"


def final_metrics(worker: Worker) -> dict[str, float]:
    """The metrics snapshot of the worker's last log line (``worker ... stopped: {...}``)."""
    return ast.literal_eval(worker.wait_log_now(STOPPED).group(1))  # type: ignore[no-any-return]


async def dead_letters(bootstrap: str, app_id: str) -> list[tuple[str, Any]]:
    """``(reason, record)`` of every record in the app's dead-letter topic."""
    out = []
    for r in await read_all(bootstrap, f"{app_id}-dead-letters", 1):
        headers = {k: v.decode() for k, v in r.headers}
        out.append((headers.get("asyncflow.reason", ""), r))
    return out


SOAK_SEED = "ASYNCFLOW_SOAK_SEED"
"""Environment variable: the seed a soak runs with (a random one when unset)."""


def soak_seed() -> int:
    """The seed of a soak's kills and pacing: ``$ASYNCFLOW_SOAK_SEED``, else a random one.

    A soak prints its seed; setting the variable to it replays the same plan of
    kills (the timing of the processes around them still varies).
    """
    return int(os.environ.get(SOAK_SEED) or random.randrange(1 << 30))


@dataclass
class SoakReport:
    """What a kill soak did."""

    kills: int = 0
    chunks: int = 0
    early: int = 0
    """Kills at a random moment right after the start (import, join or restore)."""
    seconds: float = 0.0
    moments: list[float] = field(default_factory=list)

    def restores(self, pool: Pool) -> dict[str, int]:
        """Restore log lines over every process, by kind."""
        return {
            "from the changelog": pool.count(r"restored table .* from its changelog:"),
            "from the local store + tail": pool.count(r"from the local store and its changelog"),
            "unfinished checkpoints ignored": pool.count(r"of an unfinished checkpoint ignored"),
            "abandoned checkpoints": pool.count(r"checkpoint abandoned"),
            "revoked without checkpoint": pool.count(r"without a last checkpoint"),
        }


async def kill_soak(
    pool: Pool,
    names: Sequence[str],
    *,
    kills: int,
    rng: random.Random,
    produce_chunk: Callable[[int], Awaitable[None]],
    pace: float = 0.5,
    early_share: float = 0.25,
    spread: float = 2.0,
) -> SoakReport:
    """Start a worker per name, then kill -9 them in turn ``kills`` times, restarting each at once.

    Meanwhile a producer writes the input: ``produce_chunk(c)`` for c = 0, 1, 2, ...
    every ``pace`` seconds until the last kill is done (``report.chunks`` says how
    many), so the workers always have fresh events in flight when a kill comes.
    Each kill comes at a random moment: with probability ``early_share`` 0.3-1.5 s
    after the previous kill (while the victim joins, restores or takes partitions
    over), else up to ``spread`` s after the victim was assigned partitions again
    following the previous kill (so the survivor of each kill went through the
    rebalances it caused and worked on its new partitions). The victim restarts with
    its own state directory: sometimes its local store is current, sometimes a
    takeover rebuilds from the changelog.
    """
    report = SoakReport()
    began = time.monotonic()
    done = asyncio.Event()

    async def producer() -> None:
        while not done.is_set():
            await produce_chunk(report.chunks)
            report.chunks += 1
            try:
                await asyncio.wait_for(done.wait(), pace)
            except TimeoutError:
                pass

    for name in names:
        pool.start(name)
    assigned = r"asyncflow\.worker: assigned"
    seen = {n: 0 for n in names}  # each name's assignments logged up to the previous kill
    feeding = asyncio.create_task(producer())
    try:
        for k in range(kills):
            name = names[k % len(names)]
            victim = pool.current[name]
            others = [w for w in pool.current.values() if w is not victim]
            started = time.monotonic()
            if rng.random() < early_share:
                report.early += 1
                await asyncio.sleep(rng.uniform(0.3, 1.5))
            else:
                await victim.wait_log(assigned, timeout=60, count=seen[name] + 1)
                await asyncio.sleep(rng.uniform(0.0, spread))
            alive(victim, *others)
            if feeding.done():
                feeding.result()  # a failing producer fails the soak now
            seen = {n: len(w.lines(assigned)) for n, w in pool.current.items()}
            victim.signal(signal.SIGKILL)
            assert await victim.wait_exit(15) == -signal.SIGKILL
            report.moments.append(round(time.monotonic() - started, 2))
            report.kills += 1
            pool.start(name)
            seen[name] = 0
        done.set()
        await feeding
    finally:
        feeding.cancel()
    report.seconds = time.monotonic() - began
    return report


async def restored_table(
    url: str, app_id: str, table: str, source_topic: str, committed: dict[int, int | None]
) -> tuple[dict[Any, Any], dict[int, int | None]]:
    """What a new owner of every partition would restore of ``table``: values, and offsets.

    Runs the core's own restore (``restore_shard``) in this process, from the changelog
    topic into memory stores, with the group's ``committed`` offsets (Kafka's: the next
    offset to read) as a worker would see them. Returns every key's value and, per
    partition, the source offset the restored state reflects. No consumer group is
    joined (a group that saw many kills can keep a newcomer waiting on Tansu).
    """
    from adapters.kafka import KafkaBroker
    from asyncflow.protocols import TopicPartition
    from asyncflow.state.codec import JSON_VALUES, decode_key
    from asyncflow.state.restore import restore_shard
    from asyncflow.state.shard import ChangelogTarget, TableShard
    from asyncflow.state.store import MemoryStore
    from tests.integration.kafka.broker import TEST_OPTIONS

    broker = KafkaBroker(url, TEST_OPTIONS)
    values: dict[Any, Any] = {}
    applied: dict[int, int | None] = {}
    try:
        for p, next_offset in committed.items():
            tp = TopicPartition(source_topic, p)
            target = ChangelogTarget(broker, f"{app_id}-{table}-changelog", p, str(tp).encode())
            shard = TableShard(table, tp, MemoryStore(), target)
            await restore_shard(shard, committed=None if next_offset is None else next_offset - 1)
            applied[p] = shard.applied
            for kb, vb in shard.store.items():
                values[decode_key(kb)] = JSON_VALUES.decode(vb)
    finally:
        await broker.close()
    return values, applied


def restore_lines(worker: Worker) -> list[re.Match[str]]:
    return worker.lines(r"restored table (\S+) for partition .*partition=(\d+)\) from (.*?): (\d+)")
