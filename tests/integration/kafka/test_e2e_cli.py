"""The ``asyncflow`` command on a real broker: run, stop, fail clearly, manage topics."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.integration.kafka.apps_for_tests import (
    ROOT,
    Config,
    Tail,
    Worker,
    count_records,
    decode_outputs,
    key_of,
    partition_counts,
    produce_events,
    read_all,
)
from tests.integration.kafka.broker import committed, create_topic, free_port, unique_name

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

PARTITIONS = 4
APP = "tests.integration.kafka.apps_for_tests:app"


async def run_cli(*args: str, timeout: float = 30.0) -> tuple[int, str, str, float]:
    """Run ``asyncflow ARGS``; (exit code, stdout, stderr, seconds)."""
    command = Worker.command(APP, None)[:-2] + list(args)  # the executable part
    env = {k: v for k, v in os.environ.items() if k != "ASYNCFLOW_BROKER"}
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"asyncflow {' '.join(args)} still running after {timeout}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - started


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("asyncflow: error:")]


def shutdown_is_clean(worker: Worker) -> None:
    log = worker.log()
    assert "SIGTERM received: draining, flushing and committing" in log
    assert re.search(r"asyncflow\.worker: worker \S+ stopped: ", log), worker.tail()
    assert "Traceback" not in log and " ERROR " not in log, worker.tail()


def events_in(worker: Worker) -> int:
    found = worker.lines(r"worker \S+ stopped: .*'events_in': (\d+)")
    assert found, worker.tail()
    return int(found[-1].group(1))


async def test_worker_sigterm_after_consuming_everything_exits_zero_with_every_record_committed(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    n = 20_000
    src = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("cli-in"))
    out = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("cli-out"))
    await produce_events(kafka_bootstrap, src, n)
    group = unique_name("cli")
    cfg = Config(app_id=group, input=src, output=out)
    worker = Worker(broker=kafka_url, env=cfg.env(), log_dir=tmp_path, name="cli").start()
    try:
        await worker.wait_log(
            r"asyncflow\.worker: worker \S+ running on " + re.escape(kafka_url), 20
        )
        await count_records(kafka_bootstrap, out, n, timeout=60)
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit(30) == 0, worker.tail()
    finally:
        worker.stop_now()
    shutdown_is_clean(worker)
    assert events_in(worker) == n
    assert await committed(kafka_bootstrap, group, src, PARTITIONS) == partition_counts(
        n, 1000, PARTITIONS
    )


@pytest.mark.slow
async def test_worker_sigterm_mid_stream_commits_exactly_what_it_processed_and_a_restart_resumes_there(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    n = 200_000
    src = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("cli-in"))
    out = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("cli-out"))
    await produce_events(kafka_bootstrap, src, n)
    group = unique_name("cli")
    cfg = Config(app_id=group, input=src, output=out)
    first = Worker(broker=kafka_url, env=cfg.env(), log_dir=tmp_path, name="first")
    second = Worker(broker=kafka_url, env=cfg.env(), log_dir=tmp_path, name="second")
    try:
        async with Tail(kafka_bootstrap, out, PARTITIONS) as tail:
            first.start()
            await tail.wait(lambda vs: len(vs) >= n // 10, timeout=60, alive=[first])
            first.signal(signal.SIGTERM)
            assert await first.wait_exit(30) == 0, first.tail()
            # a partition nothing was processed of yet has no commit: it starts at 0
            at_stop = {p: o or 0 for p, o in
                       (await committed(kafka_bootstrap, group, src, PARTITIONS)).items()}
        shutdown_is_clean(first)
        processed = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
        assert len(processed) < n, "the input was consumed before the signal; make it bigger"
        done = {(o["p"], o["o"]) for o in processed}
        assert len(done) == len(processed)  # one worker, no rebalance: no duplicates
        for p in range(PARTITIONS):
            # the commit is the end of the contiguous prefix of processed records
            frontier = 0
            while (p, frontier) in done:
                frontier += 1
            assert at_stop[p] == frontier, (p, at_stop, frontier)
        beyond = len(done) - sum(at_stop.values())
        assert 0 <= beyond
        if beyond:
            print(f"{beyond} of {len(done)} processed records lie beyond the commit")

        everything = {(key_of(i, 1000), i // 1000) for i in range(n)}
        async with Tail(kafka_bootstrap, out, PARTITIONS) as tail:
            second.start()
            await tail.wait(
                lambda vs: {(v["key"], v["seq"]) for v in vs} >= everything, 60, alive=[second]
            )
        second.signal(signal.SIGTERM)
        assert await second.wait_exit(30) == 0, second.tail()
    finally:
        first.stop_now()
        second.stop_now()
    outputs = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    assert {(o["key"], o["seq"]) for o in outputs} == everything
    counts = partition_counts(n, 1000, PARTITIONS)
    after = [o for o in outputs if o["pid"] == second.pid]
    for p in range(PARTITIONS):  # the restart read from the commit on
        assert min((o["o"] for o in after if o["p"] == p), default=counts[p]) == at_stop[p]
    assert await committed(kafka_bootstrap, group, src, PARTITIONS) == counts


async def test_worker_with_an_unreachable_broker_exits_non_zero_with_one_clear_error_line() -> None:
    url = f"kafka://127.0.0.1:{free_port()}"
    code, out, err, seconds = await run_cli("worker", APP, "--broker", url, timeout=30)
    assert code != 0
    assert seconds < 15
    assert "Traceback" not in err
    [line] = error_lines(err)
    assert url in line and "cannot reach broker" in line, line


async def test_worker_with_a_missing_module_exits_non_zero_with_one_line() -> None:
    code, out, err, _ = await run_cli("worker", "no_such_module:app")
    assert code != 0
    assert err.strip().splitlines() == error_lines(err)
    [line] = error_lines(err)
    assert "no_such_module" in line


async def test_topics_create_then_list_shows_the_topic_with_its_partitions(kafka_url: str) -> None:
    name = unique_name("cli-topic")
    code, out, err, _ = await run_cli(
        "topics", "--broker", kafka_url, "create", name, "--partitions", "3"
    )
    assert code == 0, err
    assert name in out
    code, out, err, _ = await run_cli("topics", "--broker", kafka_url, "list")
    assert code == 0, err
    assert f"{name}\t3" in out.splitlines()


async def test_topics_accepts_the_broker_option_after_the_subcommand(kafka_url: str) -> None:
    name = unique_name("cli-topic")
    code, _, err, _ = await run_cli(
        "topics", "create", name, "--partitions", "3", "--broker", kafka_url
    )
    assert code == 0, err
    code, out, err, _ = await run_cli("topics", "list", "--broker", kafka_url)
    assert code == 0, err
    assert f"{name}\t3" in out.splitlines()
