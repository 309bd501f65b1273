"""Durable state end to end on the Kafka-protocol broker: kills, restarts, takeovers, restores.

Workers are ``asyncflow worker`` subprocesses of ``apps_for_tests`` (``total``,
``window`` and ``dedup`` modes), each with its own ``ASYNCFLOW_STATE_DIR``. Every
result is checked against a batch computation over the same input: a running
total against the prefix sums of the key's amounts, a window against the exact
list of the sequence numbers it must hold. Outputs are at-least-once (a kill may
re-send what was sent since the last checkpoint), state is exactly-once: every
copy of an output must be right, and nothing may be missing.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from itertools import accumulate
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters.kafka_sink import kafka_partition
from tests.integration.kafka.apps_for_tests import (
    Config,
    Item,
    Tail,
    amount,
    assigned_partitions,
    decode_outputs,
    end_marks,
    key_of,
    log_time,
    partition_counts,
    produce_events,
    read_all,
    seq_time,
)
from tests.integration.kafka.broker import committed, create_topic, unique_name
from tests.integration.kafka.state_workers import (
    PARTITIONS,
    Pool,
    alive,
    dead_letters,
    final_metrics,
    kill_soak,
    restore_lines,
    restored_table,
    soak_seed,
    wait_committed,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]

FAST = 0.5  # ASYNCFLOW_COMMIT_INTERVAL: checkpoints twice a second
WINDOW_SEQS = 100  # window mode: 1 s windows over seq * 10 ms event time
KILLS = 20


async def topics(bootstrap: str) -> tuple[str, str]:
    src = await create_topic(bootstrap, PARTITIONS, unique_name("e2e-in"))
    out = await create_topic(bootstrap, PARTITIONS, unique_name("e2e-out"))
    return src, out


def with_marks(counts: dict[int, int], marks: int = 1) -> dict[int, int]:
    """Partition counts plus the end-of-input sentinels ``end_marks`` adds to each."""
    return {p: c + marks for p, c in counts.items()}


# -- running totals -------------------------------------------------------------------


def prefix_totals(seqs: int) -> list[int]:
    """``[total after seq 0, after seq 1, ...]``: what every key's running total must read."""
    return list(accumulate(amount(s) for s in range(seqs)))


def check_totals(outputs: list[dict[str, Any]], keys: int, seqs: int) -> dict[str, int]:
    """Every output's total is its prefix sum, every input has an output, the last one is the sum.

    Returns figures: outputs, duplicates.
    """
    totals = prefix_totals(seqs)
    wrong = [o for o in outputs if o["total"] != totals[o["seq"]]]
    if wrong:
        low = sum(1 for o in wrong if o["total"] < totals[o["seq"]])
        by = Counter((o["pid"], o["out_p"]) for o in wrong)
        keys_hit = {o["key"] for o in wrong}
        raise AssertionError(
            f"{len(wrong)} of {len(outputs)} outputs (of {len(keys_hit)} keys) have a total that "
            f"is not the batch sum up to their seq: {low} too low (updates lost from state), "
            f"{len(wrong) - low} too high (events applied twice); by (pid, output partition): "
            f"{dict(by)}; e.g. (key, seq, total, expected) "
            f"{[(o['key'], o['seq'], o['total'], totals[o['seq']]) for o in wrong[:6]]}"
        )
    seen = Counter((o["key"], o["seq"]) for o in outputs)
    expected = {(key_of(k, keys), s) for k in range(keys) for s in range(seqs)}
    missing = expected - set(seen)
    assert not missing, f"{len(missing)} inputs without an output, e.g. {sorted(missing)[:5]}"
    assert set(seen) == expected
    last: dict[str, int] = {}
    for o in outputs:  # partition by partition in offset order: the last write of each key wins
        last[o["key"]] = o["total"]
    assert last == {key_of(k, keys): totals[-1] for k in range(keys)}
    return {"outputs": len(outputs), "duplicates": len(outputs) - len(seen)}


@pytest.mark.slow
async def test_a_running_total_app_killed_20_times_across_2_workers_ends_with_every_total_equal_to_a_batch_sum(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    keys = 500  # a chunk is one event for every key; 2 chunks a second
    seed = soak_seed()
    print(f"seed {seed}")
    rng = random.Random(seed)
    src, out = await topics(kafka_bootstrap)
    group = unique_name("e2e-soak-total")
    cfg = Config(app_id=group, input=src, output=out, mode="total", commit_interval=FAST)

    async def chunk(c: int) -> None:
        await produce_events(kafka_bootstrap, src, keys, keys=keys, start=c * keys)

    began = time.monotonic()
    async with Pool(kafka_url, cfg, tmp_path) as pool:
        report = await kill_soak(
            pool, ["w0", "w1"], kills=KILLS, rng=rng, produce_chunk=chunk, pace=0.5
        )
        n = report.chunks * keys
        drain = await wait_committed(
            kafka_bootstrap, group, src, partition_counts(n, keys, PARTITIONS),
            timeout=120, workers=pool.running(),
        )
        await pool.stop_all()
        survivors = list(pool.current.values())
    outputs = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    duplicates = len(outputs) - len({(o["key"], o["seq"]) for o in outputs})
    print(
        f"total soak: {n} events, {keys} keys, {report.kills} kills ({report.early} early) in "
        f"{report.seconds:.0f}s, drained {drain:.1f}s after, {time.monotonic() - began:.0f}s in "
        f"all; {len(outputs)} outputs, {duplicates} duplicates; restores "
        f"{report.restores(pool)}; kill moments {report.moments}"
    )
    failed = [m.string for w in pool.all for m in w.lines(r"failed on key")]
    check_totals(outputs, keys, n // keys)
    assert not failed, failed[:5]
    # what the soak left in the changelogs: what the next owner of each partition restores
    counts = partition_counts(n, keys, PARTITIONS)
    state, applied = await restored_table(
        kafka_url, group, "totals", src, await committed(kafka_bootstrap, group, src, PARTITIONS)
    )
    assert applied == {p: c - 1 for p, c in counts.items()}
    expected = {key_of(k, keys): prefix_totals(n // keys)[-1] for k in range(keys)}
    assert state == expected, (
        f"{sum(state.get(k) != v for k, v in expected.items())} of {keys} totals in the "
        f"changelogs are not the batch sum, e.g. "
        f"{[(k, state.get(k), v) for k, v in expected.items() if state.get(k) != v][:5]}"
    )
    for w in survivors:
        assert final_metrics(w).get("dead_letters", 0) == 0


# -- windows ---------------------------------------------------------------------------


def expected_windows(keys: int, seqs: int) -> dict[tuple[str, int], list[int]]:
    """Every (key, window start ms) the window mode must emit, with the seqs it holds.

    Seqs ``0 .. seqs-1`` of every key; the end marks close the last window even when
    it is not full.
    """
    return {
        (key_of(k, keys), w * WINDOW_SEQS * 10): list(
            range(w * WINDOW_SEQS, min((w + 1) * WINDOW_SEQS, seqs))
        )
        for k in range(keys)
        for w in range(-(-seqs // WINDOW_SEQS))
    }


def check_windows(
    results: list[dict[str, Any]], keys: int, seqs: int, *, exactly_once: bool
) -> dict[str, int]:
    """Every expected window is there and every copy of it holds exactly its events."""
    expected = expected_windows(keys, seqs)
    wrong = [r for r in results if expected.get((r["key"], r["start"])) != r["seqs"]]
    assert not wrong, (
        f"{len(wrong)} window results that are not the batch result, e.g. "
        + "; ".join(
            f"{r['key']}@{r['start']}: {len(r['seqs'])} seqs {r['seqs'][:3]}..{r['seqs'][-3:]}"
            for r in wrong[:5]
        )
    )
    copies = Counter((r["key"], r["start"]) for r in results)
    missing = set(expected) - set(copies)
    assert not missing, f"{len(missing)} windows never emitted, e.g. {sorted(missing)[:5]}"
    if exactly_once:
        twice = {w: c for w, c in copies.items() if c > 1}
        assert not twice, f"{len(twice)} windows emitted more than once, e.g. {list(twice)[:5]}"
    return {"results": len(results), "duplicates": len(results) - len(copies)}


async def no_late_events(bootstrap: str, app_id: str) -> list[str]:
    """The dead-letter topic's reasons; fails on a late event."""
    reasons = [reason for reason, _ in await dead_letters(bootstrap, app_id)]
    late = [r for r in reasons if "late event" in r]
    assert not late, f"{len(late)} late events, e.g. {late[:3]}"
    return reasons


class AllWindowsOut:
    """``Tail.wait`` predicate: every (key, window start) of ``expected_windows`` is out.

    ``explain`` says which are not, by output partition (a key's windows all go to
    one, the partition of its input) and by window start.
    """

    def __init__(self, keys: int, seqs: int) -> None:
        self.wanted = set(expected_windows(keys, seqs))

    def __call__(self, values: list[dict[str, Any]]) -> bool:
        return {(v["key"], v["start"]) for v in values} >= self.wanted

    def explain(self, values: list[dict[str, Any]]) -> str:
        missing = sorted(self.wanted - {(v["key"], v["start"]) for v in values})
        partition_of = {v["key"]: v["out_p"] for v in values}
        by_partition = Counter(partition_of.get(k, "none out") for k, _ in missing)
        by_start = Counter(start for _, start in missing)
        return (f"{len(missing)} windows missing, e.g. {missing[:5]}; by partition "
                f"{dict(by_partition)}; by window start {dict(sorted(by_start.items()))}")


def all_windows_out(keys: int, seqs: int) -> AllWindowsOut:
    return AllWindowsOut(keys, seqs)


@pytest.mark.slow
async def test_a_windowed_app_killed_20_times_across_2_workers_emits_every_window_with_its_full_count(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    keys = 100  # a chunk is 2 events for every key (20 ms of event time); 5 chunks a second
    seed = soak_seed()
    print(f"seed {seed}")
    rng = random.Random(seed)
    src, out = await topics(kafka_bootstrap)
    group = unique_name("e2e-soak-window")
    cfg = Config(app_id=group, input=src, output=out, mode="window", commit_interval=FAST)

    async def chunk(c: int) -> None:
        await produce_events(kafka_bootstrap, src, 2 * keys, keys=keys, start=c * 2 * keys)

    began = time.monotonic()
    async with (
        Pool(kafka_url, cfg, tmp_path) as pool,
        Tail(kafka_bootstrap, out, PARTITIONS) as tail,
    ):
        report = await kill_soak(
            pool, ["w0", "w1"], kills=KILLS, rng=rng, produce_chunk=chunk, pace=0.2
        )
        n = report.chunks * 2 * keys
        await produce_events(kafka_bootstrap, src, 0, raw=end_marks(PARTITIONS))
        await tail.wait(
            all_windows_out(keys, n // keys), timeout=120, what="every window",
            alive=pool.running(),
        )
        # every record is committed, the end marks too (their windows stay open, in state)
        drain = await wait_committed(
            kafka_bootstrap, group, src, with_marks(partition_counts(n, keys, PARTITIONS)),
            timeout=60, workers=pool.running(),
        )
        await pool.stop_all()
        survivors = list(pool.current.values())
    results = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    duplicates = len(results) - len({(r["key"], r["start"]) for r in results})
    print(
        f"window soak: {n} events, {keys} keys, {len(expected_windows(keys, n // keys))} windows, "
        f"{report.kills} kills ({report.early} early) in {report.seconds:.0f}s, drained "
        f"{drain:.1f}s after, {time.monotonic() - began:.0f}s in all; {len(results)} "
        f"results, {duplicates} duplicates; restores {report.restores(pool)}; "
        f"kill moments {report.moments}"
    )
    check_windows(results, keys, n // keys, exactly_once=False)
    assert await no_late_events(kafka_bootstrap, group) == []
    for w in survivors:
        assert final_metrics(w).get("late_events", 0) == 0


async def test_a_restart_in_the_middle_of_windows_emits_every_window_exactly_once_with_its_full_count(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    # per key, seqs 0-249 first (window [2 s, 3 s) is half full when they end), then 250-449
    keys, first_seqs, then_seqs = 50, 250, 200
    src, out = await topics(kafka_bootstrap)
    group = unique_name("e2e-restart")
    cfg = Config(app_id=group, input=src, output=out, mode="window", commit_interval=FAST)
    seqs = first_seqs + then_seqs
    async with (
        Pool(kafka_url, cfg, tmp_path) as pool,
        Tail(kafka_bootstrap, out, PARTITIONS) as tail,
    ):
        await produce_events(kafka_bootstrap, src, first_seqs * keys, keys=keys)
        first = pool.start("w")
        await wait_committed(  # everything read and checkpointed: every key's window
            kafka_bootstrap, group, src, partition_counts(first_seqs * keys, keys, 4),
            timeout=30, workers=[first],  # [2 s, 3 s) is half full, in its state
        )
        await tail.wait(lambda vs: len(vs) >= 2 * keys, what="windows 0 and 1", alive=[first])
        first.signal(signal.SIGTERM)
        assert await first.wait_exit(30) == 0, first.tail()
        at_stop = len(tail.values)
        assert at_stop == 2 * keys, "a window came out before its end"

        await produce_events(
            kafka_bootstrap, src, then_seqs * keys, keys=keys, start=first_seqs * keys,
            raw=end_marks(PARTITIONS),
        )
        second = pool.start("w")  # same state directory
        await tail.wait(all_windows_out(keys, seqs), timeout=60, what="every window",
                        alive=[second])
        await wait_committed(
            kafka_bootstrap, group, src, with_marks(partition_counts(seqs * keys, keys, 4)),
            timeout=30, workers=[second],
        )
        await pool.stop_all()
    results = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    check_windows(results, keys, seqs, exactly_once=True)
    assert await no_late_events(kafka_bootstrap, group) == []
    m1, m2 = final_metrics(first), final_metrics(second)
    assert m1.get("late_events", 0) == m2.get("late_events", 0) == 0
    # the restart found its local store current: each of the 4 window shards read only
    # what followed its own last marker in the changelog (the restore's sentinel)
    assert m2["state.restored_shards"] == 4
    assert m2["state.restore_records"] <= 4 * 2, m2
    assert not second.lines(r"restored table .* from its changelog:")
    print(f"restart: {at_stop} windows before the stop, {len(results)} in all")


async def test_a_takeover_between_two_workers_gives_complete_windows_and_no_late_events(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    # 130 seqs a key a phase: each handover comes in the middle of every key's window
    keys, per_phase = 50, 130
    seqs = 3 * per_phase  # windows [0 s, 1 s) .. [3 s, 4 s), the last one 90 events
    src, out = await topics(kafka_bootstrap)
    group = unique_name("e2e-takeover")
    cfg = Config(app_id=group, input=src, output=out, mode="window", commit_interval=FAST)

    async def phase(k: int, raw: Any = ()) -> None:
        await produce_events(kafka_bootstrap, src, per_phase * keys, keys=keys,
                             start=k * per_phase * keys, raw=raw)

    def window_out(start: int) -> Any:
        return lambda vs: len({v["key"] for v in vs if v["start"] == start}) == keys

    async with (
        Pool(kafka_url, cfg, tmp_path) as pool,
        Tail(kafka_bootstrap, out, PARTITIONS) as tail,
    ):
        await phase(0)
        a = pool.start("a")
        await tail.wait(window_out(0), what="window [0 s, 1 s) of every key", alive=[a])
        b = pool.start("b")  # joins: takes half of the partitions over, from the changelog
        deadline = time.monotonic() + 30
        while not (assigned_partitions(b) and assigned_partitions(b)[-1]):
            alive(a, b)
            assert time.monotonic() < deadline, f"b got no partitions:\n{b.tail()}"
            await asyncio.sleep(0.05)
        b_parts = assigned_partitions(b)[-1]
        await phase(1)
        await tail.wait(window_out(1000), what="window [1 s, 2 s) of every key", alive=[a, b])
        a.signal(signal.SIGTERM)  # a leaves: b takes every partition over
        assert await a.wait_exit(30) == 0, a.tail()
        await b.wait_log(r"assigned .*partition=0.*partition=1.*partition=2.*partition=3", 30)
        await phase(2, raw=end_marks(PARTITIONS))
        await tail.wait(all_windows_out(keys, seqs), timeout=60, what="every window", alive=[b])
        await wait_committed(
            kafka_bootstrap, group, src, with_marks(partition_counts(seqs * keys, keys, 4)),
            timeout=30, workers=[b],
        )
        await pool.stop_all()
    results = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    check_windows(results, keys, seqs, exactly_once=True)
    assert await no_late_events(kafka_bootstrap, group) == []
    assert final_metrics(a).get("late_events", 0) == final_metrics(b).get("late_events", 0) == 0
    assert not a.lines(r"without a last checkpoint") and not b.lines(r"without a last checkpoint")
    # b rebuilt each partition from the changelog once: its own half when it joined (its
    # store was empty), a's half when a left; its own half's store stayed current meanwhile
    rebuilt = Counter(int(m.group(2)) for m in restore_lines(b) if m.group(3) == "its changelog")
    assert rebuilt == Counter(range(PARTITIONS)), [m.string for m in restore_lines(b)]
    # each window came out of the worker that owned its partition when it closed: a had
    # every partition for [0 s, 1 s) and its own half for [1 s, 2 s); b the rest
    a_parts = set(range(PARTITIONS)) - b_parts
    for r in results:
        p = kafka_partition(r["key"].encode(), PARTITIONS)
        by_a = r["start"] == 0 or (p in a_parts and r["start"] == 1000)
        assert r["pid"] == (a.pid if by_a else b.pid), (p, r["key"], r["start"], r["pid"])


# -- a rebalance while a big changelog is read back ---------------------------------


async def test_a_rebalance_during_a_restore_neither_hangs_nor_skips_data(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    keys, rounds, more = 100_000, 3, 1  # a changelog of ~300,000 records
    src, out = await topics(kafka_bootstrap)
    group = unique_name("e2e-restore")
    # every changelog read waits a moment first: a's restore lasts about two seconds on any
    # machine, so b joins in the middle of it (but not much longer: Tansu drops a member that
    # has not rejoined a rebalance within its session timeout, 3 s, and a restore runs inside
    # the rebalance)
    cfg = Config(app_id=group, input=src, output=out, mode="total", commit_interval=FAST,
                 restore_delay=0.08)
    async with Pool(kafka_url, cfg, tmp_path) as pool:
        await produce_events(kafka_bootstrap, src, rounds * keys, keys=keys)
        seed = pool.start("seed")
        await wait_committed(
            kafka_bootstrap, group, src, partition_counts(rounds * keys, keys, 4),
            timeout=90, workers=[seed],
        )
        await pool.stop_all()

        a = pool.start("a")  # a fresh state dir: every partition is read back from the changelog
        await a.wait_log(r"asyncflow\.worker: assigned", 30)
        b = pool.start("b")  # joins while a restores
        await produce_events(
            kafka_bootstrap, src, more * keys, keys=keys, start=rounds * keys
        )
        total = (rounds + more) * keys
        await wait_committed(
            kafka_bootstrap, group, src, partition_counts(total, keys, 4), timeout=120,
            workers=[a, b],
        )
        began = time.monotonic()
        await pool.stop_all(timeout=60)
        stop_seconds = time.monotonic() - began
    # b's join came while a was still reading its first assignment's changelogs back
    a_assigned = log_time(a.lines(r"asyncflow\.worker: assigned")[0])
    first_restores = [m for m in restore_lines(a) if log_time(m) >= a_assigned][:PARTITIONS]
    b_running = log_time(b.wait_log_now(r"asyncflow\.worker: worker \S+ running"))
    restored_at = max(log_time(m) for m in first_restores)
    assert b_running < restored_at, (
        "b joined only after a had restored: the test did not rebalance during a restore",
        [m.string for m in first_restores],
    )
    outputs = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    print(
        f"restore: a read {sum(int(m.group(4)) for m in first_restores)} changelog records "
        f"back in {restored_at - a_assigned:.1f}s, b joined {b_running - a_assigned:.1f}s "
        f"into it; the stop took {stop_seconds:.1f}s; {len(outputs)} outputs"
    )
    for w in (a, b):
        assert not w.lines(r"RestoreStalled|Traceback"), w.tail()
    check_totals(outputs, keys, rounds + more)
    state, _ = await restored_table(
        kafka_url, group, "totals", src, await committed(kafka_bootstrap, group, src, PARTITIONS)
    )
    assert state == {key_of(k, keys): prefix_totals(rounds + more)[-1] for k in range(keys)}


async def test_a_worker_frozen_past_its_session_timeout_and_resumed_leaves_every_total_exact(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    """A worker frozen (SIGSTOP) longer than its session timeout is dropped from the group
    while its lanes hold events, and ``b`` takes every partition over. Resumed, ``a`` goes on
    for a moment as if it still had them, until it hears it was dropped: what its lanes hold
    then must not be handled on state it let go (totals counted from nothing), and nothing
    it writes late may get into what anyone restores.
    """
    keys = 20_000
    src, out = await topics(kafka_bootstrap)
    group = unique_name("e2e-frozen")
    cfg = Config(app_id=group, input=src, output=out, mode="total", commit_interval=FAST)
    async with Pool(kafka_url, cfg, tmp_path) as pool:
        a = pool.start("a", env={"E2E_LANE_RATE": "2000"})  # slow lanes: they hold a backlog
        await a.wait_log(r"asyncflow\.worker: assigned", 30)
        b = pool.start("b")
        await b.wait_log(r"asyncflow\.worker: assigned", 30)  # two partitions each
        await produce_events(kafka_bootstrap, src, keys, keys=keys)
        await wait_committed(kafka_bootstrap, group, src, partition_counts(keys, keys, 4),
                             timeout=60, workers=[a, b])
        producing = asyncio.create_task(
            produce_events(kafka_bootstrap, src, 6 * keys, keys=keys, start=keys)
        )
        try:
            await asyncio.sleep(random.uniform(0.3, 0.8))  # a moment in: a's lanes are busy
            a.signal(signal.SIGSTOP)
            try:
                await b.wait_log(r"asyncflow\.worker: assigned .*partition=\d+\)"
                                 r".*partition=\d+\).*partition=\d+\).*partition=\d+\)", 60)
            finally:
                a.signal(signal.SIGCONT)
            await a.wait_log(r"no longer a member of the group", 30)
            await producing
        finally:
            producing.cancel()
        await produce_events(kafka_bootstrap, src, keys, keys=keys, start=7 * keys)
        await wait_committed(kafka_bootstrap, group, src, partition_counts(8 * keys, keys, 4),
                             timeout=120, workers=[a, b])
        await pool.stop_all()
    outputs = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    for w in (a, b):
        assert not w.lines(r"Traceback|DbClosedError|failed on key"), w.tail()
    check_totals(outputs, keys, 8)
    state, _ = await restored_table(
        kafka_url, group, "totals", src, await committed(kafka_bootstrap, group, src, PARTITIONS)
    )
    assert state == {key_of(k, keys): prefix_totals(8)[-1] for k in range(keys)}


async def test_a_worker_given_back_a_partition_it_had_keeps_every_running_total_exact(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    """A partition taken away from a worker and later given back to it (Kafka's eager
    rebalances do this on every join and leave): its lanes must use the restored state.

    One input partition, so every lane of ``a`` last handled an event of it before each
    rebalance. ``a`` counts alone, ``b`` joins (one of them gets the partition), ``b``
    leaves (``a`` gets it back), then ``a`` restarts: every total it ever wrote must be
    the batch sum.
    """
    keys = 1_000
    src = await create_topic(kafka_bootstrap, 1, unique_name("e2e-in"))
    out = await create_topic(kafka_bootstrap, 1, unique_name("e2e-out"))
    group = unique_name("e2e-back")
    cfg = Config(app_id=group, input=src, output=out, mode="total", commit_interval=FAST,
                 partitions=1)
    assigned = r"asyncflow\.worker: assigned"

    async def phase(k: int, workers: list[Any]) -> None:
        await produce_events(kafka_bootstrap, src, 2 * keys, keys=keys, start=2 * k * keys)
        await wait_committed(kafka_bootstrap, group, src, {0: 2 * (k + 1) * keys}, timeout=60,
                             workers=workers)

    async with Pool(kafka_url, cfg, tmp_path) as pool:
        a = pool.start("a")
        await phase(0, [a])
        b = pool.start("b")
        await b.wait_log(r"Successfully synced group", 30)  # a rebalance: a revoked its partition
        await phase(1, [a, b])
        before = len(a.lines(assigned))
        b.signal(signal.SIGTERM)
        assert await b.wait_exit(30) == 0, b.tail()
        await a.wait_log(assigned, 30, count=before + 1)  # the partition is a's again
        await phase(2, [a])
        a.signal(signal.SIGTERM)
        assert await a.wait_exit(30) == 0, a.tail()
        again = pool.start("a")  # the same state directory
        await phase(3, [again])
        await pool.stop_all()
    outputs = decode_outputs(await read_all(kafka_bootstrap, out, 1))
    for w in (a, b, again):
        assert not w.lines(r"DbClosedError|failed on key"), [m.string for m in w.lines("ERROR")]
    check_totals(outputs, keys, 8)


# -- ttl and far-future events -------------------------------------------------------


async def test_values_expire_after_their_ttl_on_kafka(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    keys, ttl = 200, 2.0
    src, out = await topics(kafka_bootstrap)
    group = unique_name("e2e-ttl")
    cfg = Config(app_id=group, input=src, output=out, mode="dedup", commit_interval=FAST, ttl=ttl)
    async with (
        Pool(kafka_url, cfg, tmp_path) as pool,
        Tail(kafka_bootstrap, out, PARTITIONS) as tail,
    ):
        w = pool.start("w")
        await produce_events(kafka_bootstrap, src, keys, keys=keys)  # seq 0 of each id
        await tail.wait(lambda vs: len(vs) >= keys, what="round 1", alive=[w])
        await produce_events(kafka_bootstrap, src, keys, keys=keys, start=keys)  # seq 1: again
        await tail.wait(lambda vs: len(vs) >= 2 * keys, what="round 2", alive=[w])
        # round 3 once the ttl has passed since each id's last sighting (round 2)
        last_seen = max(v["t"] for v in tail.values)
        await asyncio.sleep(max(0.0, last_seen + ttl + 0.5 - time.time()))
        await produce_events(kafka_bootstrap, src, keys, keys=keys, start=2 * keys)
        await tail.wait(lambda vs: len(vs) >= 3 * keys, what="round 3", alive=[w])
        await pool.stop_all()
    outputs = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    assert len(outputs) == 3 * keys
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for o in outputs:
        by_key[o["key"]].append(o)
    round2_age = []
    for key, seen in by_key.items():
        assert [o["seq"] for o in seen] == [0, 1, 2], key
        first, again, later = seen
        round2_age.append(again["t"] - first["t"])
        assert first["fresh"] is True, first
        # seen again within the ttl: held back (and the sighting refreshes the ttl)
        assert again["t"] - first["t"] < ttl and again["fresh"] is False, again
        # seen again after the ttl: let through
        assert later["t"] - again["t"] > ttl and later["fresh"] is True, later
    print(f"ttl: round 2 came {max(round2_age):.2f}s at most after round 1")


async def test_a_far_future_event_is_a_dead_letter_on_kafka_and_does_not_stall_its_partition(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    keys, half = 10, 2_500  # 500 seqs a key: 5 windows a key
    src, out = await topics(kafka_bootstrap)
    group = unique_name("e2e-future")
    cfg = Config(app_id=group, input=src, output=out, mode="window", commit_interval=FAST)
    future_key = key_of(3, keys)
    future_seq = 410_244_480_000  # seq * 10 ms = 2100-01-01T00:00:00Z
    when = datetime.fromtimestamp(seq_time(Item(key=future_key, seq=future_seq)), UTC)
    assert when.isoformat() == "2100-01-01T00:00:00+00:00"
    future = (future_key.encode(), orjson.dumps({"key": future_key, "seq": future_seq}))
    await produce_events(kafka_bootstrap, src, half, keys=keys, raw=[future])
    await produce_events(kafka_bootstrap, src, half, keys=keys, start=half,
                         raw=end_marks(PARTITIONS))
    counts = with_marks(partition_counts(2 * half, keys, PARTITIONS))
    fp = kafka_partition(future_key.encode(), PARTITIONS)
    counts[fp] += 1
    async with (
        Pool(kafka_url, cfg, tmp_path) as pool,
        Tail(kafka_bootstrap, out, PARTITIONS) as tail,
    ):
        w = pool.start("w")
        await tail.wait(all_windows_out(keys, 500), timeout=60, what="every window", alive=[w])
        # the partition with the far-future event is read and committed to its end
        await wait_committed(kafka_bootstrap, group, src, counts, timeout=30, workers=[w])
        await pool.stop_all()
    results = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    check_windows(results, keys, 500, exactly_once=True)
    dead = await dead_letters(kafka_bootstrap, group)
    assert len(dead) == 1, [r for r, _ in dead]
    reason, record = dead[0]
    assert "2100-01-01" in reason and "ahead" in reason, reason
    assert f"'{seq_time.__name__}'" in reason, reason
    assert orjson.loads(record.value) == {"key": future_key, "seq": future_seq}
    headers = {k: v.decode() for k, v in record.headers}
    assert headers["asyncflow.partition"] == str(fp)
    assert headers["asyncflow.offset"] == str(partition_counts(half, keys, PARTITIONS)[fp])
    metrics = final_metrics(w)
    assert metrics["future_events"] == 1 and metrics.get("late_events", 0) == 0, metrics
    # windows after the far-future event came out: every key's last window, on every partition
    assert {r["key"] for r in results if r["start"] == 4000} == {key_of(k, keys) for k in range(keys)}
    assert await committed(kafka_bootstrap, group, src, PARTITIONS) == counts

