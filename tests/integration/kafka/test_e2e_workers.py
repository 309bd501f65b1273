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

import orjson
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
    log_time,
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
    async with (
        workers(kafka_url, cfg, tmp_path) as make,
        Tail(kafka_bootstrap, out, PARTITIONS) as tail,
    ):
        victim, survivor = make("victim").start(), make("survivor").start()
        v_parts, s_parts = await wait_split(victim, survivor)
        # the input arrives only once the group has settled, so no data was read before the split
        await produce_events(kafka_bootstrap, src, n, keys=keys)
        shares = {victim.pid: v_parts, survivor.pid: s_parts}
        await tail.wait(  # each worker has written output for each of its partitions
            lambda vs: all(
                {v["p"] for v in vs if v["pid"] == pid} == parts for pid, parts in shares.items()
            ),
            what="both workers writing for all their partitions",
            alive=[victim, survivor],
        )
        victim.signal(signal.SIGKILL)
        at_kill = await committed(kafka_bootstrap, group, src, PARTITIONS)
        assert await victim.wait_exit(10) == -signal.SIGKILL

        await survivor.wait_log(
            r"assigned .*partition=0.*partition=1.*partition=2.*partition=3", 30
        )
        await tail.wait(
            lambda vs: len({(v["p"], v["o"]) for v in vs}) >= n,
            timeout=90,
            what="every input",
            alive=[survivor],
        )
        survivor.signal(signal.SIGTERM)
        assert await survivor.wait_exit(30) == 0, survivor.tail()

    outputs = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    # every input is reflected in the output at least once
    assert {(o["key"], o["seq"]) for o in outputs} == {
        (key_of(i, keys), i // keys) for i in range(n)
    }
    counts = partition_counts(n, keys, PARTITIONS)
    assert all(o["o"] < counts[o["p"]] for o in outputs)
    # both workers did a share, each on its own partitions until the kill
    assert v_parts and s_parts
    assert {o["p"] for o in outputs if o["pid"] == victim.pid} == v_parts

    # The survivor's takeover is an eager rebalance: it also revokes and gets back its own
    # partitions. Its outputs before the takeover and after it are told apart by time.
    revoked = survivor.lines(r"asyncflow\.worker: revoking ")[-1]
    takeover = (log_time(revoked) + log_time(survivor.wait_log_now(r"assigned .*partition=3"))) / 2
    writes: dict[tuple[int, int], list[str]] = defaultdict(list)
    for o in outputs:
        who = "victim" if o["pid"] == victim.pid else ("after" if o["t"] > takeover else "before")
        writes[(o["p"], o["o"])].append(who)
    duplicates = {pos: sorted(w) for pos, w in writes.items() if len(w) > 1}

    for p in range(PARTITIONS):
        before = {o for (q, o), w in writes.items() if q == p and ({"victim", "before"} & set(w))}
        restart = min(
            (o for (q, o), w in writes.items() if q == p and "after" in w), default=counts[p]
        )
        # after the takeover the survivor read each partition from the last commit made for
        # it: the victim's last periodic commit, or the survivor's own commit on revoke ...
        if p in v_parts:
            assert restart == (at_kill[p] or 0), (p, restart, at_kill)
        # ... which covered exactly what was done before it: nothing is skipped
        assert set(range(restart)) <= before, p
        # and the only duplicates are events at or after that commit
        dups = {o: w for (q, o), w in duplicates.items() if q == p}
        assert all(o >= restart and w.count("after") == 1 and len(w) == 2 for o, w in dups.items())
        expected_pair = ["after", "victim"] if p in v_parts else ["after", "before"]
        assert all(w == expected_pair for w in dups.values()), (p, dups)
    victim_tail = sum(
        1
        for (p, o), w in writes.items()
        if p in v_parts and "victim" in w and o >= (at_kill[p] or 0)
    )
    assert sum(1 for (p, _) in duplicates if p in v_parts) == victim_tail
    own = sum(1 for (p, _) in duplicates if p in s_parts)
    print(f"duplicates: {victim_tail} from the kill, {own} from the survivor's own rebalance")
    # the survivor's shutdown committed everything
    assert await committed(kafka_bootstrap, group, src, PARTITIONS) == counts


def sentinel_keys(partitions: int) -> list[bytes]:
    """One key per partition, for records that push each partition's event time far ahead."""
    found: dict[int, bytes] = {}
    i = 0
    while len(found) < partitions:
        key = f"end-{i}".encode()
        found.setdefault(kafka_partition(key, partitions), key)
        i += 1
    return [found[p] for p in range(partitions)]


@pytest.mark.slow
async def test_a_joining_worker_gets_partitions_drained_and_committed_and_window_state_is_rebuilt(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    """Window state across a graceful rebalance: exactly one complete result per key and window.

    Per key, event time is ``seq`` * 10 ms, so 1 s windows hold 100 events each.
    The first worker reads seqs 0-199 alone: window [0 s, 1 s) closes and is written,
    [1 s, 2 s) stays open, in its window state. It never checkpoints on a timer, so any
    committed offset comes from the checkpoint on revoke, which commits everything it read
    and hands the open windows over in the changelog.
    """
    keys, per_phase = 50, 10_000  # 200 seqs per key a phase
    src = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("e2e-in"))
    out = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("e2e-out"))
    group = unique_name("e2e-rebalance")
    cfg = Config(app_id=group, input=src, output=out, mode="window", commit_interval=3600)
    await produce_events(kafka_bootstrap, src, per_phase, keys=keys)
    async with (
        workers(kafka_url, cfg, tmp_path) as make,
        Tail(kafka_bootstrap, out, PARTITIONS) as tail,
    ):
        first = make("first").start()
        await tail.wait(
            lambda vs: len({v["key"] for v in vs if v["start"] == 0}) == keys,
            what="window [0 s, 1 s) of every key",
            alive=[first],
        )
        assert all(v["start"] == 0 for v in tail.values)  # [1 s, 2 s) is still open
        assert set((await committed(kafka_bootstrap, group, src, PARTITIONS)).values()) == {None}

        second = make("second").start()
        first_parts, second_parts = await wait_split(first, second)
        # the first worker checkpointed before releasing: everything it read is committed,
        # the open window's events included (they are in the window state it handed over)
        assert await committed(kafka_bootstrap, group, src, PARTITIONS) == partition_counts(
            200 * keys, keys, PARTITIONS
        )
        await produce_events(
            kafka_bootstrap,
            src,
            per_phase,
            keys=keys,
            start=per_phase,
            raw=[
                (k, orjson.dumps({"key": k.decode(), "seq": END_SEQ}))
                for k in sentinel_keys(PARTITIONS)
            ],
        )
        everything = {(key_of(i, keys), i // keys) for i in range(2 * per_phase)}
        await tail.wait(
            lambda vs: {(v["key"], s) for v in vs for s in v["seqs"]} >= everything,
            timeout=60,
            what="every input in a window result",
            alive=[first, second],
        )
        for w in (first, second):
            w.signal(signal.SIGTERM)
        assert await first.wait_exit(30) == 0, first.tail()
        assert await second.wait_exit(30) == 0, second.tail()

    assert first.lines(r"revoking .*: checkpointing")
    assert not first.lines(r"without a last checkpoint")
    results = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    by_window = Counter((r["key"], r["start"]) for r in results)
    assert by_window == Counter(
        {(key_of(k, keys), s * 1000): 1 for k in range(keys) for s in range(4)}
    )
    for r in results:
        first_seq = r["start"] // 10
        assert r["seqs"] == list(range(first_seq, first_seq + 100)), (r["key"], r["start"])
        mine = first_parts if r["pid"] == first.pid else second_parts
        assert kafka_partition(r["key"].encode(), PARTITIONS) in mine or r["start"] == 0
    # every data event is committed; the sentinels may stay held by their open windows
    done = await committed(kafka_bootstrap, group, src, PARTITIONS)
    data = partition_counts(2 * per_phase, keys, PARTITIONS)
    assert all(data[p] <= (done[p] or 0) <= data[p] + 1 for p in range(PARTITIONS)), (done, data)
