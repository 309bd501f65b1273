"""Exactly-once end to end (``processing_guarantee="exactly_once"``, ``client=rdkafka``).

Workers are ``asyncflow worker`` subprocesses of ``apps_for_tests`` with stable
transactional ids (``eos_workers.EosPool``). Outputs are read back as a
``read_committed`` consumer sees them (``eos_workers.read_committed``, which
also drops aborted transactions the Tansu broker hands out): every input must
be in exactly one output, every window exactly once with exactly its events.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.integration.kafka.apps_for_tests import (
    Config,
    Tail,
    assigned_partitions,
    decode_outputs,
    end_marks,
    key_of,
    partition_counts,
    produce_events,
)
from tests.integration.kafka.broker import create_topic, unique_name
from tests.integration.kafka.eos_workers import EosPool, read_committed
from tests.integration.kafka.state_workers import (
    PARTITIONS,
    SoakReport,
    alive,
    kill_soak,
    soak_seed,
    wait_committed,
)
from tests.integration.kafka.test_e2e_state import (
    all_windows_out,
    check_windows,
    expected_windows,
    with_marks,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]

KILLS = 20
FAST = 0.5  # commit interval: a transaction every half second


def eos(cfg: Config) -> Config:
    cfg.client, cfg.guarantee = "rdkafka", "exactly_once"
    return cfg


async def topics(bootstrap: str) -> tuple[str, str]:
    src = await create_topic(bootstrap, PARTITIONS, unique_name("eos-in"))
    out = await create_topic(bootstrap, PARTITIONS, unique_name("eos-out"))
    return src, out


def check_copies(outputs: list[dict[str, Any]], n: int, keys: int) -> None:
    """Every input event in exactly one output: none lost, none twice."""
    copies = Counter((o["p"], o["o"]) for o in outputs)
    twice = {pos: c for pos, c in copies.items() if c > 1}
    if twice:
        by: Counter[tuple[Any, ...]] = Counter()
        writers: dict[tuple[Any, Any], list[Any]] = {}
        for o in outputs:
            writers.setdefault((o["p"], o["o"]), []).append(o["pid"])
        for pos in twice:
            by[(pos[0], *writers[pos])] += 1
        ranges = {p: (min(o for q, o in twice if q == p), max(o for q, o in twice if q == p))
                  for p in {q for q, _ in twice}}
        raise AssertionError(f"{len(twice)} inputs written more than once; by (partition, "
                             f"writers): {dict(by)}; offsets {ranges}")
    got = {(o["key"], o["seq"]) for o in outputs}
    expected = {(key_of(i, keys), i // keys) for i in range(n)}
    assert got == expected, f"{len(expected - got)} lost, {len(got - expected)} unexpected"
    assert len(outputs) == n


@pytest.mark.slow
async def test_a_copy_app_and_a_windowed_app_killed_20_times_each_write_every_result_exactly_once(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    """The kill -9 soak with exactly-once: both apps at once, 2 workers each, 20 kills each."""
    seed = soak_seed()
    print(f"seed {seed}")
    copy_keys, window_keys = 100, 100
    copy_src, copy_out = await topics(kafka_bootstrap)
    win_src, win_out = await topics(kafka_bootstrap)
    copy_cfg = eos(Config(app_id=unique_name("eos-copy"), input=copy_src, output=copy_out,
                          commit_interval=FAST))
    win_cfg = eos(Config(app_id=unique_name("eos-window"), input=win_src, output=win_out,
                         mode="window", commit_interval=FAST))

    async def copy_chunk(c: int) -> None:
        await produce_events(kafka_bootstrap, copy_src, 2 * copy_keys, keys=copy_keys,
                             start=c * 2 * copy_keys)

    async def window_chunk(c: int) -> None:
        await produce_events(kafka_bootstrap, win_src, 2 * window_keys, keys=window_keys,
                             start=c * 2 * window_keys)

    began = time.monotonic()
    for sub in ("copy", "window"):
        (tmp_path / sub).mkdir()
    async with (
        EosPool(kafka_url, copy_cfg, tmp_path / "copy") as copies,
        EosPool(kafka_url, win_cfg, tmp_path / "window") as windows,
        Tail(kafka_bootstrap, win_out, PARTITIONS) as tail,
    ):
        reports: tuple[SoakReport, SoakReport] = await asyncio.gather(
            kill_soak(copies, ["w0", "w1"], kills=KILLS, rng=random.Random(seed),
                      produce_chunk=copy_chunk, pace=0.5, early_share=0.4, spread=1.0),
            kill_soak(windows, ["w0", "w1"], kills=KILLS, rng=random.Random(seed + 1),
                      produce_chunk=window_chunk, pace=0.2, early_share=0.4, spread=1.0),
        )
        copy_n = reports[0].chunks * 2 * copy_keys
        win_n = reports[1].chunks * 2 * window_keys
        await produce_events(kafka_bootstrap, win_src, 0, raw=end_marks(PARTITIONS))
        await tail.wait(all_windows_out(window_keys, win_n // window_keys), timeout=120,
                        what="every window", alive=windows.running())
        # every input offset committed: every transaction that carries an output committed
        await wait_committed(kafka_bootstrap, copy_cfg.app_id, copy_src,
                             partition_counts(copy_n, copy_keys, PARTITIONS), timeout=90,
                             workers=copies.running())
        await wait_committed(kafka_bootstrap, win_cfg.app_id, win_src,
                             with_marks(partition_counts(win_n, window_keys, PARTITIONS)),
                             timeout=90, workers=windows.running())
        await asyncio.gather(copies.stop_all(), windows.stop_all())
        fenced = copies.count(r"fenced") + windows.count(r"fenced")
    copy_records, copy_tx = await read_committed(kafka_bootstrap, copy_out, PARTITIONS)
    win_records, win_tx = await read_committed(kafka_bootstrap, win_out, PARTITIONS)
    copy_outputs, results = decode_outputs(copy_records), decode_outputs(win_records)
    print(
        f"exactly-once soak in {time.monotonic() - began:.0f}s: copy {copy_n} events, "
        f"{reports[0].kills} kills, {len(copy_outputs)} outputs read committed, transactions "
        f"{copy_tx}; window {win_n} events, {len(expected_windows(window_keys, win_n // window_keys))} "
        f"windows, {reports[1].kills} kills, {len(results)} results, transactions {win_tx}; "
        f"fenced lines {fenced}"
    )
    check_copies(copy_outputs, copy_n, copy_keys)
    figures = check_windows(results, window_keys, win_n // window_keys, exactly_once=True)
    assert figures["duplicates"] == 0
    assert reports[0].kills == reports[1].kills == KILLS


async def test_a_rebalance_while_a_transaction_is_open_commits_it_on_revoke_and_writes_nothing_twice(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    """A second worker joins while the first one's transaction holds outputs of every partition.

    No periodic checkpoint (commit interval one hour): the revoke's checkpoint is the
    transaction's commit, with the offsets of everything the first worker wrote (under
    exactly-once a revoke drains the lanes). Then more input comes for both.
    """
    n, keys = 6000, 60
    src, out = await topics(kafka_bootstrap)
    cfg = eos(Config(app_id=unique_name("eos-rebalance"), input=src, output=out,
                     lane_rate=400, commit_interval=3600))
    async with (
        EosPool(kafka_url, cfg, tmp_path) as pool,
        Tail(kafka_bootstrap, out, PARTITIONS) as tail,
    ):
        first = pool.start("first")
        await first.wait_log(r"asyncflow\.worker: assigned", 30)
        await produce_events(kafka_bootstrap, src, n // 2, keys=keys)
        # outputs of every partition are in the open transaction (the tail reads uncommitted)
        await tail.wait(lambda vs: {v["p"] for v in vs} == set(range(PARTITIONS)),
                        what="outputs of every partition", alive=[first])
        second = pool.start("second")
        await first.wait_log(r"revoking .*: checkpointing", 30)
        deadline = time.monotonic() + 30
        while not (assigned_partitions(second) and assigned_partitions(second)[-1]):
            alive(first, second)
            assert time.monotonic() < deadline, second.tail()
            await asyncio.sleep(0.05)
        await produce_events(kafka_bootstrap, src, n // 2, keys=keys, start=n // 2)
        await tail.wait(lambda vs: len({(v["p"], v["o"]) for v in vs}) >= n, timeout=60,
                        what="every input", alive=[first, second])
        await pool.stop_all()
    assert not first.lines(r"without a last checkpoint")
    records, tx = await read_committed(kafka_bootstrap, out, PARTITIONS)
    outputs = decode_outputs(records)
    check_copies(outputs, n, keys)
    mine = {o["p"] for o in outputs if o["pid"] == first.pid}
    theirs = {o["p"] for o in outputs if o["pid"] == second.pid}
    assert mine == set(range(PARTITIONS)) and theirs, (mine, theirs)
    print(f"rebalance in a transaction: {len(outputs)} outputs, transactions {tx}")


async def test_a_paused_worker_whose_partitions_moved_is_fenced_with_one_line_and_commits_nothing(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    """A zombie: SIGSTOP one of two workers mid-transaction, let the other take over, SIGCONT it."""
    n, keys = 8000, 80
    src, out = await topics(kafka_bootstrap)
    cfg = eos(Config(app_id=unique_name("eos-zombie"), input=src, output=out, lane_rate=300,
                     commit_interval=FAST))
    async with (
        EosPool(kafka_url, cfg, tmp_path) as pool,
        Tail(kafka_bootstrap, out, PARTITIONS) as tail,
    ):
        zombie, other = pool.start("zombie"), pool.start("other")
        deadline = time.monotonic() + 40
        while True:  # both own partitions
            za, oa = assigned_partitions(zombie), assigned_partitions(other)
            if za and oa and za[-1] and oa[-1] and not za[-1] & oa[-1]:
                break
            alive(zombie, other)
            assert time.monotonic() < deadline, f"{zombie.tail()}\n{other.tail()}"
            await asyncio.sleep(0.05)
        zombie_parts = za[-1]
        await produce_events(kafka_bootstrap, src, n, keys=keys)
        await tail.wait(lambda vs: {v["p"] for v in vs if v["pid"] == zombie.pid}
                        == zombie_parts, what="the zombie writing", alive=[zombie, other])
        zombie.signal(signal.SIGSTOP)
        # the group drops it after session_timeout_ms; the other worker takes everything over
        await other.wait_log(r"assigned .*partition=0.*partition=1.*partition=2.*partition=3",
                             60)
        await tail.wait(lambda vs: any(v["pid"] == other.pid and v["p"] in zombie_parts
                                       for v in vs), what="the new owner writing",
                        alive=[other])
        zombie.signal(signal.SIGCONT)
        assert await zombie.wait_exit(60) == 1, zombie.tail()
        await wait_committed(kafka_bootstrap, cfg.app_id, src,
                             partition_counts(n, keys, PARTITIONS), timeout=90, workers=[other])
        await pool.stop_all()
    errors = zombie.lines(r"asyncflow: error: .*")
    assert len(errors) == 1 and "fenced" in errors[0].group(0), zombie.tail()
    records, tx = await read_committed(kafka_bootstrap, out, PARTITIONS)
    check_copies(decode_outputs(records), n, keys)
    print(f"zombie: {errors[0].group(0)}; transactions {tx}")
