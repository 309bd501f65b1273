"""Backpressure end to end: a sink 100x slower than the source keeps a worker's memory flat.

The topic holds 1,000,000 events; a worker subprocess (``apps_for_tests``, slow mode)
sends each to a sink that writes 3,000 events/s, while getmany reads ~300,000/s on
this machine. Lanes fill, partitions pause, and the worker holds a bounded number of
events however much is waiting in the topic.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import pytest

from tests.integration.kafka.apps_for_tests import Config, Worker, produce_events
from tests.integration.kafka.broker import committed, create_topic, unique_name

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]

PARTITIONS = 4
EVENTS = 1_000_000
SINK_RATE = 3_000.0
MAX_POLL_RECORDS = 10_000  # the Kafka adapter's default: records one fetch may return
LANE_LINE = r"lanes size=(\d+) peak=(\d+) capacity=(\d+) events_in=(\d+) written=(\d+)"


def lane_stats(worker: Worker) -> tuple[int, int, int, int, int] | None:
    found = worker.lines(LANE_LINE)
    if not found:
        return None
    size, peak, capacity, events_in, written = (int(g) for g in found[-1].groups())
    return size, peak, capacity, events_in, written


@pytest.mark.slow
async def test_a_slow_sink_keeps_memory_flat_and_lanes_bounded_and_sigterm_exits_zero(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    src = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("e2e-bp"))
    assert await produce_events(kafka_bootstrap, src, EVENTS, keys=1000) == EVENTS
    group = unique_name("e2e-bp")
    cfg = Config(app_id=group, input=src, mode="slow", lane_rate=SINK_RATE)
    worker = Worker(broker=kafka_url, env=cfg.env(), log_dir=tmp_path, name="bp").start()
    try:
        await worker.wait_log(r"asyncflow\.worker: assigned", 30)
        # warm-up: the sink is writing and the lanes have filled (reading has stopped for a
        # moment: every partition is paused); on a loaded machine the sink can start well
        # before the lanes are full, and their filling is no read ahead of the writes
        deadline = time.monotonic() + 30
        last_in, still_since = -1, time.monotonic()
        while True:
            assert time.monotonic() < deadline, worker.tail()
            s = lane_stats(worker)
            if s is not None and s[3] != last_in:
                last_in, still_since = s[3], time.monotonic()
            if s is not None and s[4] >= 2 * 100 and time.monotonic() - still_since >= 0.5:
                break
            await asyncio.sleep(0.05)

        samples: list[tuple[float, int, int]] = []  # (RSS MB, events_in, written)
        end = time.monotonic() + 8.0
        while time.monotonic() < end:
            stats = lane_stats(worker)
            assert stats is not None
            samples.append((worker.rss_mb(), stats[3], stats[4]))
            await asyncio.sleep(0.25)
        size, peak, capacity, events_in, written = lane_stats(worker)  # type: ignore[misc]

        rss = [r for r, _, _ in samples]
        assert max(rss) - rss[0] < 50, f"RSS grew from {rss[0]:.0f} to {max(rss):.0f} MB: {rss}"
        # the sink set the pace ...
        assert samples[-1][2] > samples[0][2], "the sink wrote nothing while sampled"
        assert written < EVENTS // 10
        # ... reading went only as fast as writing ...
        read_more = samples[-1][1] - samples[0][1]
        assert read_more <= samples[-1][2] - samples[0][2] + 2 * MAX_POLL_RECORDS, samples
        # ... and the worker held a bounded number of events, not the topic: per lane one
        # batch being handled, its queue and a parked part per partition, where a part is
        # a lane's share of one fetch (the Kafka source returns up to 10,000 records)
        held = max(e - w for _, e, w in samples)
        assert held <= 8 * MAX_POLL_RECORDS, held
        assert events_in < EVENTS // 10
        # a lane queue goes over its capacity only by taking one part when empty
        assert peak <= capacity + MAX_POLL_RECORDS, (peak, capacity)

        stopping = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit(45) == 0, worker.tail()
        drain = time.monotonic() - stopping
    finally:
        worker.stop_now()

    log = worker.log()
    assert "SIGTERM received: draining, flushing and committing" in log
    stopped = re.search(r"worker \S+ stopped: .*'sink\.slow\.written': (\d+)", log)
    assert stopped is not None, worker.tail()
    offsets = await committed(kafka_bootstrap, group, src, PARTITIONS)
    assert 0 < sum(o or 0 for o in offsets.values()) <= int(stopped.group(1))
    print(
        f"held at most {held} events, RSS {rss[0]:.0f}-{max(rss):.0f} MB, "
        f"lane peak {peak}/{capacity}, SIGTERM drain {drain:.1f}s"
    )
