"""End to end with worker subprocesses in one group: scale-out, a crash, a rebalance with window state.

Workers run ``asyncflow worker tests.integration.kafka.apps_for_tests:app`` against the
session broker. Output records carry the input partition and offset (transform mode)
or the window's sequence numbers (window mode), so loss and duplicates are computed
exactly from what the workers wrote.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from adapters.kafka_sink import kafka_partition
from tests.integration.kafka.apps_for_tests import (
    END_SEQ,
    Config,
    Tail,
    Worker,
    assigned_partitions,
    decode_outputs,
    key_of,
    partition_counts,
    produce_events,
    read_all,
)
from tests.integration.kafka.broker import committed, create_topic, unique_name

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]

PARTITIONS = 4


@asynccontextmanager
async def workers(
    url: str, cfg: Config, tmp_path: Path, count: int = 2
) -> AsyncIterator[Callable[[str], Worker]]:
    """Make workers for ``cfg`` (started by the caller); kill what still runs at the end."""
    made: list[Worker] = []

    def make(name: str) -> Worker:
        w = Worker(broker=url, env=cfg.env(), log_dir=tmp_path, name=name)
        made.append(w)
        return w

    try:
        yield make
    finally:
        for w in made:
            w.stop_now()


async def wait_split(a: Worker, b: Worker, timeout: float = 30.0) -> tuple[set[int], set[int]]:
    """Wait until the latest assignments of ``a`` and ``b`` split all partitions between them."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        pa, pb = assigned_partitions(a), assigned_partitions(b)
        if pa and pb and pa[-1] and pb[-1] and not pa[-1] & pb[-1]:
            if pa[-1] | pb[-1] == set(range(PARTITIONS)):
                return pa[-1], pb[-1]
        for w in (a, b):
            if w.process is not None and w.process.poll() is not None:
                raise AssertionError(f"{w.log_path.name} exited:\n{w.tail()}")
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no split in {timeout}s: a={pa} b={pb}\n{a.tail()}\n{b.tail()}")
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_two_workers_split_partitions_and_after_a_kill_the_survivor_replays_only_past_the_last_commit(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    n, keys = 60_000, 1000
    src = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("e2e-in"))
    out = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("e2e-out"))
    group = unique_name("e2e-scale")
    cfg = Config(app_id=group, input=src, output=out, lane_rate=1500)
    async with workers(kafka_url, cfg, tmp_path) as make, Tail(kafka_bootstrap, out, PARTITIONS) as tail:
        victim, survivor = make("victim").start(), make("survivor").start()
        v_parts, s_parts = await wait_split(victim, survivor)
        # the input arrives only once the group has settled, so no data was read before the split
        await produce_events(kafka_bootstrap, src, n, keys=keys)
        await tail.wait(
            lambda vs: len(vs) > n // 3 and {victim.pid, survivor.pid} <= {v["pid"] for v in vs},
            what="both workers writing",
        )
        victim.signal(signal.SIGKILL)
        at_kill = await committed(kafka_bootstrap, group, src, PARTITIONS)
        assert await victim.wait_exit(10) == -signal.SIGKILL

        await survivor.wait_log(r"assigned .*partition=0.*partition=1.*partition=2.*partition=3", 30)
        await tail.wait(
            lambda vs: len({(v["p"], v["o"]) for v in vs}) >= n, timeout=90, what="every input"
        )
        survivor.signal(signal.SIGTERM)
        assert await survivor.wait_exit(30) == 0, survivor.tail()

    outputs = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    # every input is reflected in the output at least once
    assert {(o["key"], o["seq"]) for o in outputs} == {(key_of(i, keys), i // keys) for i in range(n)}
    by_position: dict[tuple[int, int], list[int]] = defaultdict(list)
    for o in outputs:
        by_position[(o["p"], o["o"])].append(o["pid"])
    counts = partition_counts(n, keys, PARTITIONS)
    assert len(by_position) == n
    assert all(o < counts[p] for p, o in by_position)

    # both workers did a share, each on its own partitions until the kill
    assert {o["p"] for o in outputs if o["pid"] == victim.pid} == v_parts
    assert v_parts and s_parts
    # the survivor resumed each of the victim's partitions exactly at its last commit ...
    for p in v_parts:
        start = min(o for (q, o), pids in by_position.items() if q == p and survivor.pid in pids)
        assert start == (at_kill[p] or 0), (p, start, at_kill)
        done_by_victim = {o for (q, o), pids in by_position.items() if q == p and victim.pid in pids}
        assert set(range(start)) <= done_by_victim  # ... having everything before it done
    # ... and the only duplicates are the victim's events after its last commit
    duplicates = {pos: pids for pos, pids in by_position.items() if len(pids) > 1}
    for (p, o), pids in duplicates.items():
        assert p in v_parts and o >= (at_kill[p] or 0), ((p, o), pids, at_kill)
        assert sorted(pids) == sorted([victim.pid, survivor.pid])
    victim_tail = sum(
        1 for (p, o), pids in by_position.items()
        if p in v_parts and victim.pid in pids and o >= (at_kill[p] or 0)
    )
    print("DIAG dups", len(duplicates), "victim_tail", victim_tail, "at_kill", at_kill, "v_parts", v_parts)
    assert len(duplicates) == victim_tail
    # the survivor's shutdown committed everything
    assert await committed(kafka_bootstrap, group, src, PARTITIONS) == counts
