"""Kinesis leases between workers, against a real moto server: sharing, takeover, fencing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError

from adapters._aws import Backoff
from adapters.kinesis import SHARD_END, CheckpointStore, KinesisSource, Shard
from adapters.kinesis_lease_table import LeaseTable
from adapters.kinesis_leases import Lease
from asyncflow.protocols import Partition
from tests.integration.aws.kinesis_util import (
    Recorder,
    create_stream,
    hash_key_of_shard,
    put_values,
    wait_for,
)
from tests.integration.aws.moto import CREDENTIALS, REGION

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(120)]

LONG_LEASE: dict[str, Any] = {"lease_duration": 600.0, "lease_renewal_interval": 0.2}
"""Leases far longer than a test, renewed often: no loss in a test is an expiry."""

LEASE = 2.0  # seconds: short, so that a takeover after expiry fits in a test, and long
# enough that a worker slowed down by a loaded machine does not lose a lease it is renewing


@dataclass
class Write:
    """A checkpoint write the lease table accepted."""

    at: float
    worker: str
    shard_id: str
    checkpoint: str


@dataclass
class Watch:
    """Every accepted checkpoint write of every worker, in the order they succeeded.

    Also the checkpoint writes a stop cut off before their answer came (the table
    may have them or not), for the workers named in ``stalled``, writes that
    reach the table and whose answer never comes back, and for those named in
    ``lose_answers``, that many renewals that reach the table and time out.
    """

    writes: list[Write] = field(default_factory=list)
    cut_off: list[Write] = field(default_factory=list)
    stalled: set[str] = field(default_factory=set)
    stalls: int = 0  # writes that reached the table and then hung
    lose_answers: dict[str, int] = field(default_factory=dict)
    answers_lost: int = 0

    def client(self, worker: str, client: Any) -> Any:
        watch = self

        class Watched:
            def __getattr__(self, name: str) -> Any:
                return getattr(client, name)

            async def update_item(self, **kwargs: Any) -> Any:
                value = kwargs.get("ExpressionAttributeValues", {}).get(":ckpt")
                shard_id = kwargs["Key"]["shard_id"]["S"]
                loop = asyncio.get_running_loop()
                try:
                    response = await client.update_item(**kwargs)
                except asyncio.CancelledError:
                    if value is not None:  # a stop cut it off: the table may have it or not
                        watch.cut_off.append(Write(loop.time(), worker, shard_id, value["S"]))
                    raise
                if value is not None:
                    watch.writes.append(Write(loop.time(), worker, shard_id, value["S"]))
                if worker in watch.stalled:
                    watch.stalls += 1
                    await asyncio.get_running_loop().create_future()  # written, never answered
                if value is None and watch.lose_answers.get(worker, 0) > 0:
                    watch.lose_answers[worker] -= 1
                    watch.answers_lost += 1
                    raise TimeoutError("the answer never came")  # but the table has the write
                return response

        return Watched()

    def by_shard(self) -> dict[str, list[Write]]:
        out: dict[str, list[Write]] = {}
        for w in self.writes:
            out.setdefault(w.shard_id, []).append(w)
        return out


def rank(checkpoint: str) -> float:
    return float("inf") if checkpoint == SHARD_END else int(checkpoint)


@dataclass
class Worker:
    """A source with a core loop of its own: fetch, remember, commit what it handed out."""

    name: str
    source: KinesisSource
    recorder: Recorder = field(default_factory=Recorder)
    seen: list[tuple[float, str, int]] = field(default_factory=list)  # (time, shard, value)
    task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batches = await self.source.fetch(0.05)
            positions: dict[Partition, int] = {}
            for b in batches:
                shard_id = b.partition.shard_id  # type: ignore[attr-defined]
                for r in b.records:
                    self.seen.append((loop.time(), shard_id, orjson.loads(r.value)["i"]))  # type: ignore[arg-type]
                positions[b.partition] = b.records[-1].offset
            if positions:
                await self.source.commit(positions)

    def values(self) -> set[int]:
        return {v for _, _, v in self.seen}

    def shards_read(self) -> set[str]:
        return {s for _, s, _ in self.seen}


def make_source(
    endpoint: str, stream: str, app: str, worker: str, watch: Watch, **kwargs: Any
) -> KinesisSource:
    options: dict[str, Any] = {
        "app_name": app,
        "endpoint_url": endpoint,
        "region": REGION,
        "poll_interval": 0.05,
        "min_read_interval": 0.0,
        "shard_refresh_interval": 0.5,
        "backoff_base": 0.001,
        "backoff_cap": 0.01,
        "lease_duration": LEASE,
        "lease_renewal_interval": LEASE / 5,
        "worker_id": worker,
        "_wrap_client": lambda service, c: watch.client(worker, c) if service == "dynamodb" else c,
        **CREDENTIALS,
    }
    options.update(kwargs)
    return KinesisSource(stream, **options)


@contextlib.asynccontextmanager
async def running(workers: list[Worker]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for w in workers:
            if w.task is not None:
                w.task.cancel()
                await asyncio.gather(w.task, return_exceptions=True)
            await w.source.stop()


async def start(worker: Worker) -> None:
    await worker.source.start(worker.recorder)
    worker.task = asyncio.create_task(worker.run())


def release_only_pair(
    endpoint: str, stream: str, app: str, watch: Watch
) -> tuple[Worker, Worker]:
    """w1 and w2 with leases far longer than a test, w2 never stealing: only a release by
    w1 lets w2 take its leases."""
    w1 = Worker("w1", make_source(endpoint, stream, app, "w1", watch, **LONG_LEASE))
    w2 = Worker(
        "w2", make_source(endpoint, stream, app, "w2", watch, max_leases_to_steal=0, **LONG_LEASE)
    )
    return w1, w2


async def stop_loop(worker: Worker) -> None:
    """Cancel a worker's core loop (its source keeps running until stopped)."""
    assert worker.task is not None
    worker.task.cancel()
    await asyncio.gather(worker.task, return_exceptions=True)
    worker.task = None


async def lease_rows(aws: Callable[[str], Any], source: KinesisSource) -> dict[str, Lease]:
    table = LeaseTable(
        aws("dynamodb"),
        source.checkpoint_table,
        source.stream,
        source.app_name,
        backoff=Backoff(),
        endpoint="moto",
    )
    return await table.load()


def settled(workers: list[Worker], shards: list[str]) -> bool:
    """Every shard held by exactly one live worker, and every worker holds one at least."""
    held = [s for w in workers for s in w.source.held_leases]
    return sorted(held) == sorted(shards) and all(w.source.held_leases for w in workers)


async def test_three_workers_share_four_shards_and_take_over_a_killed_one_without_loss(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    kinesis = aws("kinesis")
    stream, app = unique("share"), unique("app")
    shards = await create_stream(kinesis, stream, 4)
    watch = Watch()
    workers = [
        Worker(name, make_source(moto_endpoint, stream, app, name, watch))
        for name in ("w1", "w2", "w3")
    ]
    async with running(workers):
        for w in workers:
            await start(w)
        await wait_for(lambda: settled(workers, shards), timeout=30)
        rows = await lease_rows(aws, workers[0].source)
        assert {s: r.owner for s, r in rows.items()} == {
            s: w.name for w in workers for s in w.source.held_leases
        }
        assert sorted(len(w.source.held_leases) for w in workers) == [1, 1, 2]

        first = await put_values(
            kinesis, stream, range(2_000), hash_key=lambda i: hash_key_of_shard(i % 4, 4)
        )
        assert sorted(first) == shards
        await wait_for(lambda: set().union(*(w.values() for w in workers)) >= set(range(2_000)))
        for w in workers:  # each read exactly the shards it holds: no shard read by two
            assert w.shards_read() == set(w.source.held_leases)
        seen = [v for w in workers for _, _, v in w.seen]
        assert sorted(seen) == list(range(2_000))  # and so nothing twice

        # kill the busiest worker: its task is cancelled, its leases are not handed over
        victim = max(workers, key=lambda w: len(w.source.held_leases))
        orphaned = set(victim.source.held_leases)
        assert victim.task is not None
        victim.task.cancel()
        await asyncio.gather(victim.task, return_exceptions=True)
        await victim.source.stop(release=False)
        killed_at = asyncio.get_running_loop().time()
        survivors = [w for w in workers if w is not victim]

        await put_values(
            kinesis, stream, range(2_000, 4_000), hash_key=lambda i: hash_key_of_shard(i % 4, 4)
        )
        await wait_for(lambda: settled(survivors, shards), timeout=30)
        await wait_for(
            lambda: set().union(*(w.values() for w in workers)) >= set(range(4_000)), timeout=30
        )

        def taken_over() -> set[str]:  # checkpointed by a survivor since the kill
            return {w.shard_id for w in watch.writes if w.worker != victim.name and w.at > killed_at}

        await wait_for(lambda: orphaned <= taken_over())  # before the stop cuts commits off
        rows = await lease_rows(aws, workers[0].source)

    assert {r.owner for s, r in rows.items() if s in orphaned} <= {w.name for w in survivors}
    final = await lease_rows(aws, workers[0].source)  # all stopped: the last writes are in
    assert all(r.owner in {w.name for w in survivors} for r in rows.values())
    assert set().union(*(w.values() for w in workers)) == set(range(4_000))  # nothing lost
    # the orphaned shards were read again only after the kill, by one survivor each
    for shard_id in orphaned:
        readers = {w.name for w in survivors if shard_id in w.shards_read()}
        assert len(readers) == 1
        assert all(t > killed_at for w in survivors for t, s, _ in w.seen if s == shard_id)
    # checkpoints never move backwards, whoever wrote them
    for shard_id, writes in watch.by_shard().items():
        ranks = [rank(w.checkpoint) for w in writes]
        assert ranks == sorted(ranks), shard_id
        # the table has the last answered write, or a later one a stop cut off unanswered
        cut_off = {w.checkpoint for w in watch.cut_off if w.shard_id == shard_id}
        kept = final[shard_id].checkpoint
        assert kept is not None
        assert kept == writes[-1].checkpoint or (kept in cut_off and rank(kept) > ranks[-1])


async def test_a_worker_whose_lease_was_taken_cannot_checkpoint_and_stops_reading_the_shard(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    kinesis = aws("kinesis")
    stream, app = unique("fence"), unique("app")
    [shard_id] = await create_stream(kinesis, stream, 1)
    watch = Watch()
    # a long lease: only the intruder's take explains the loss
    worker = Worker(
        "w1",
        make_source(
            moto_endpoint,
            stream,
            app,
            "w1",
            watch,
            lease_duration=60.0,
            lease_renewal_interval=30.0,
        ),
    )
    async with running([worker]):
        await worker.source.start(worker.recorder)
        assert worker.source.assigned == [Shard(stream, shard_id)]
        placed = await put_values(kinesis, stream, range(100))
        first_seq = placed[shard_id][10]
        await worker.source.commit({Shard(stream, shard_id): first_seq})
        table = LeaseTable(
            aws("dynamodb"),
            worker.source.checkpoint_table,
            stream,
            app,
            backoff=Backoff(),
            endpoint="moto",
        )
        [row] = (await table.load()).values()
        await table.take(row, "intruder")  # steals it, as a balancing worker would
        await worker.source.commit({Shard(stream, shard_id): placed[shard_id][50]})  # refused
        await wait_for(lambda: ("lost", [shard_id]) in worker.recorder.events)
        assert worker.source.assigned == []
        assert worker.source.held_leases == {}
        [row] = (await table.load()).values()
    assert row.owner == "intruder"
    assert row.checkpoint == str(first_seq)  # the refused write left nothing
    assert [w.checkpoint for w in watch.writes] == [str(first_seq)]


async def test_a_graceful_stop_hands_its_leases_over_at_once_and_nothing_is_read_twice(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    kinesis = aws("kinesis")
    stream, app = unique("handover"), unique("app")
    shards = await create_stream(kinesis, stream, 2)
    watch = Watch()
    w1, w2 = release_only_pair(moto_endpoint, stream, app, watch)
    async with running([w1, w2]):
        await start(w1)
        await put_values(kinesis, stream, range(1_000))
        await wait_for(lambda: w1.values() >= set(range(1_000)))
        await start(w2)
        assert w2.source.held_leases == {}  # nothing expires, nothing is stolen
        await stop_loop(w1)
        await w1.source.stop()  # its last commit was made by its loop: release only
        await wait_for(lambda: sorted(w2.source.held_leases) == shards, timeout=20)
        await put_values(kinesis, stream, range(1_000, 1_500))
        await wait_for(lambda: w2.values() >= set(range(1_000, 1_500)))
    assert not w2.values() & set(range(1_000))  # w2 resumed at w1's checkpoints
    assert w1.source.stats.leases_released == 2


async def test_a_write_cut_off_by_the_stop_after_it_reached_the_table_does_not_keep_the_lease(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    # a renewal (or a commit's checkpoint) cancelled between its write and its answer leaves
    # the worker a counter behind the table's: the release at stop still gives the lease up
    kinesis = aws("kinesis")
    stream, app = unique("cutoff"), unique("app")
    [shard] = await create_stream(kinesis, stream, 1)
    watch = Watch()
    w1, w2 = release_only_pair(moto_endpoint, stream, app, watch)
    async with running([w1, w2]):
        await start(w1)
        placed = await put_values(kinesis, stream, range(100))
        last = str(placed[shard][-1])
        await wait_for(lambda: any(w.checkpoint == last for w in watch.writes))
        watch.stalled.add("w1")
        await wait_for(lambda: watch.stalls > 0)  # a renewal is written; its answer never comes
        await start(w2)
        await stop_loop(w1)
        watch.stalled.discard("w1")
        await w1.source.stop()  # cancels the hung renewal, then releases
        await wait_for(lambda: sorted(w2.source.held_leases) == [shard], timeout=20)
        await put_values(kinesis, stream, range(100, 150))
        await wait_for(lambda: w2.values() >= set(range(100, 150)))
    assert w1.source.stats.leases_released == 1
    assert not w2.values() & set(range(100))  # w2 resumed at w1's checkpoint


async def test_a_renewal_that_timed_out_after_it_reached_the_table_does_not_cost_the_lease(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    # the table counted the renewal, the worker never heard: its next write is refused against
    # its old counter; the row still names it, so it goes on from the row and keeps reading
    kinesis = aws("kinesis")
    stream, app = unique("lostanswer"), unique("app")
    [shard] = await create_stream(kinesis, stream, 1)
    watch = Watch()
    worker = Worker("w1", make_source(moto_endpoint, stream, app, "w1", watch, **LONG_LEASE))
    async with running([worker]):
        await start(worker)
        placed = await put_values(kinesis, stream, range(100))
        last = str(placed[shard][-1])
        await wait_for(lambda: getattr(worker.source.held_leases.get(shard), "checkpoint", None)
                       == last)
        watch.lose_answers["w1"] = 3
        await wait_for(lambda: watch.answers_lost == 3)
        counter = (await lease_rows(aws, worker.source))[shard].counter
        await wait_for(lambda: worker.source.held_leases[shard].counter > counter)  # renewed
        await put_values(kinesis, stream, range(100, 150))
        await wait_for(lambda: worker.values() >= set(range(150)))
        assert list(worker.source.held_leases) == [shard]
        assert worker.recorder.events == [("assigned", [shard])]  # never lost, never retaken


async def test_a_process_given_the_worker_id_of_a_live_one_fences_it_off_its_leases(
    moto_endpoint: str,
    aws: Callable[[str], Any],
    unique: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a restarted worker with a fixed worker id takes its rows back at once; the earlier process,
    # still alive, does not take the newer one's writes for its own: it lets the shard go, says
    # why, and from then on treats the newer one's leases as another worker's (no tug of war):
    # taken once they expire
    kinesis = aws("kinesis")
    stream, app = unique("sameid"), unique("app")
    [shard] = await create_stream(kinesis, stream, 1)
    new_watch = Watch()
    old = Worker("old", make_source(moto_endpoint, stream, app, "w1", Watch()))
    new = Worker("new", make_source(moto_endpoint, stream, app, "w1", new_watch))
    async with running([old, new]):
        await start(old)
        await put_values(kinesis, stream, range(100))
        await wait_for(lambda: old.values() >= set(range(100)))
        with caplog.at_level(logging.ERROR, logger="adapters.kinesis"):
            await start(new)
            await wait_for(lambda: ("lost", [shard]) in old.recorder.events, timeout=20)
        assert "another process with worker_id 'w1'" in caplog.text
        await put_values(kinesis, stream, range(100, 150))
        await wait_for(lambda: new.values() >= set(range(100, 150)))
        await asyncio.sleep(1.0)  # renewals and looks later: the shard stays where it is
        assert list(new.source.held_leases) == [shard] and old.source.held_leases == {}
        assert not old.values() & set(range(100, 150))
        assert new.recorder.events == [("assigned", [shard])]
        new_watch.stalled.add("w1")  # the newer process hangs: its lease expires, the older takes it
        try:
            await wait_for(lambda: list(old.source.held_leases) == [shard], timeout=20)
        finally:
            new_watch.stalled.discard("w1")  # its stop is not held up by the table
        await put_values(kinesis, stream, range(150, 200))
        await wait_for(lambda: old.values() >= set(range(150, 200)))


async def test_children_are_read_only_after_their_parent_is_checkpointed_at_shard_end(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    # three moto shards shown as the lineage s0 -> (s1, s2), s0 closed at its last record
    kinesis = aws("kinesis")
    stream, app = unique("reshard"), unique("app")
    s0, s1, s2 = await create_stream(kinesis, stream, 3)
    placed = await put_values(
        kinesis, stream, range(900), hash_key=lambda i: hash_key_of_shard(i % 3, 3)
    )
    parent_end = str(placed[s0][-1])

    class Lineage:
        def __init__(self, client: Any) -> None:
            self.client = client

        def __getattr__(self, name: str) -> Any:
            return getattr(self.client, name)

        async def list_shards(self, **kwargs: Any) -> dict[str, Any]:
            page = dict(await self.client.list_shards(**kwargs))
            for s in page["Shards"]:
                if s["ShardId"] == s0:
                    s["SequenceNumberRange"]["EndingSequenceNumber"] = parent_end
                else:
                    s["ParentShardId"] = s0
            return page

    watch = Watch()

    def wrap(worker: str) -> Callable[[str, Any], Any]:
        return lambda service, c: Lineage(c) if service == "kinesis" else watch.client(worker, c)

    workers = [
        Worker(
            n,
            make_source(moto_endpoint, stream, app, n, watch, max_records=50, _wrap_client=wrap(n)),
        )
        for n in ("w1", "w2")
    ]
    async with running(workers):
        for w in workers:
            await start(w)
        await wait_for(lambda: set().union(*(w.values() for w in workers)) >= set(range(900)))
        rows = await lease_rows(aws, workers[0].source)
    [end] = [w for w in watch.writes if w.shard_id == s0 and w.checkpoint == SHARD_END]
    child_reads = [t for w in workers for t, s, _ in w.seen if s in (s1, s2)]
    parent_reads = [t for w in workers for t, s, _ in w.seen if s == s0]
    assert max(parent_reads) < end.at < min(child_reads)
    assert rows[s0].checkpoint == SHARD_END and rows[s0].owner is None
    assert rows[s1].parents == (s0,)
    # every record read; a child's lease may move once while the two balance (at-least-once)
    assert set().union(*(w.values() for w in workers)) == set(range(900))


async def test_checkpoints_of_an_earlier_version_are_kept_and_resumed_after(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    kinesis = aws("kinesis")
    stream, app = unique("upgrade"), unique("app")
    [shard_id] = await create_stream(kinesis, stream, 1)
    placed = await put_values(kinesis, stream, range(300))
    table_name = LeaseTable.default_table(app)
    old = CheckpointStore(
        aws("dynamodb"), table_name, stream, app, backoff=Backoff(), endpoint="moto"
    )
    await old.ensure(create=True)
    await old.save({shard_id: str(placed[shard_id][199])})  # what an earlier version wrote
    worker = Worker("w1", make_source(moto_endpoint, stream, app, "w1", Watch()))
    async with running([worker]):
        await start(worker)
        await wait_for(lambda: worker.values() >= set(range(200, 300)))
    assert worker.values() == set(range(200, 300))


async def test_a_worker_process_killed_with_sigkill_has_its_leases_taken_over_without_loss(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    kinesis = aws("kinesis")
    stream, app = unique("sigkill"), unique("app")
    shards = await create_stream(kinesis, stream, 4)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.aws.kinesis_util",
        moto_endpoint,
        stream,
        app,
        "proc",
        str(LEASE),
        stdout=asyncio.subprocess.PIPE,
        cwd=str(Path(__file__).resolve().parents[3]),
    )
    assert process.stdout is not None
    proc_seen: set[int] = set()
    proc_shards: set[str] = set()
    proc_held: list[str] = []

    async def read_child() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            event = orjson.loads(line)
            if "held" in event:
                proc_held[:] = event["held"]
            if "values" in event:
                proc_seen.update(event["values"])
                proc_shards.add(event["shard"])

    reader = asyncio.create_task(read_child())

    async def rows_if_any() -> dict[str, Lease]:
        try:
            return await lease_rows(aws, workers[0].source)
        except ClientError as exc:  # the process has not created the table yet
            assert exc.response["Error"]["Code"] == "ResourceNotFoundException"
            return {}

    watch = Watch()
    workers = [Worker(n, make_source(moto_endpoint, stream, app, n, watch)) for n in ("w1", "w2")]
    try:
        async with running(workers):
            # the process starts first and takes every lease; the others balance them away
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not any(r.owner == "proc" for r in (await rows_if_any()).values()):
                assert loop.time() < deadline, "the worker process took no lease"
                await asyncio.sleep(0.05)
            for w in workers:
                await start(w)
            while True:
                table = {s: r.owner for s, r in (await lease_rows(aws, workers[0].source)).items()}
                local = sorted((s, w.name) for w in workers for s in w.source.held_leases)
                local += [(s, "proc") for s in proc_held]
                if set(table.values()) == {"proc", "w1", "w2"} and sorted(local) == sorted(
                    table.items()
                ):  # every worker's own view agrees with the table: no shard held twice
                    break
                assert loop.time() < deadline, f"leases did not settle: {table}"
                await asyncio.sleep(0.05)
            held_by_process = {s for s, o in table.items() if o == "proc"}
            await put_values(
                kinesis, stream, range(2_000), hash_key=lambda i: hash_key_of_shard(i % 4, 4)
            )

            def everything(n: int) -> bool:
                return set().union(proc_seen, *(w.values() for w in workers)) >= set(range(n))

            await wait_for(lambda: everything(2_000), timeout=30)
            assert proc_shards == held_by_process  # it read its shards, the others theirs
            assert all(w.shards_read() == set(w.source.held_leases) for w in workers)

            process.kill()  # SIGKILL: no hand-over, no last checkpoint
            await process.wait()
            killed_at = loop.time()
            await put_values(
                kinesis, stream, range(2_000, 4_000), hash_key=lambda i: hash_key_of_shard(i % 4, 4)
            )
            await wait_for(lambda: settled(workers, shards), timeout=30)
            await wait_for(lambda: everything(4_000), timeout=30)
            rows = await lease_rows(aws, workers[0].source)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    assert process.returncode == -signal.SIGKILL
    assert {r.owner for r in rows.values()} <= {"w1", "w2"}
    assert set().union(proc_seen, *(w.values() for w in workers)) == set(range(4_000))
    for shard_id in held_by_process:  # taken over after the kill only
        assert all(t > killed_at for w in workers for t, s, _ in w.seen if s == shard_id)
    for shard_id, writes in watch.by_shard().items():
        ranks = [rank(w.checkpoint) for w in writes]
        assert ranks == sorted(ranks), shard_id


async def test_leases_are_renewed_while_the_core_takes_its_time_over_an_assignment(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    # on_assigned restores state and may last longer than a lease: renewals go on meanwhile
    kinesis = aws("kinesis")
    stream, app = unique("slowassign"), unique("app")
    shards = await create_stream(kinesis, stream, 2)
    watch = Watch()
    w1 = Worker("w1", make_source(moto_endpoint, stream, app, "w1", watch))
    released = asyncio.Event()

    waiting: list[str] = []  # assignments whose on_assigned has not returned

    class SlowRecorder(Recorder):
        async def on_assigned(self, partitions: Any) -> None:
            await super().on_assigned(partitions)
            waiting.extend(p.shard_id for p in partitions)
            await released.wait()
            del waiting[:]

    w2 = Worker("w2", make_source(moto_endpoint, stream, app, "w2", watch), SlowRecorder())
    async with running([w1, w2]):
        await start(w1)
        assert sorted(w1.source.held_leases) == shards
        # w2 steals one (at start, or at its next look if w1's renewal came first) and waits
        starting = asyncio.create_task(w2.source.start(w2.recorder))
        await wait_for(lambda: len(waiting) == 1, timeout=20)
        [stolen] = waiting
        counter = w2.source.held_leases[stolen].counter
        # renewed while on_assigned has not returned, until w1 has seen it move for 3 lease
        # durations (without renewals, w1 would take it back as expired after one)
        await wait_for(lambda: w2.source.held_leases[stolen].counter >= counter + 15, timeout=20)
        assert waiting == [stolen]
        released.set()
        await starting
        w2.task = asyncio.create_task(w2.run())
        rows = await lease_rows(aws, w1.source)
    assert rows[stolen].owner == "w2"
    assert w2.source.stats.leases_lost == 0 and w1.source.stats.leases_taken == 2


async def test_a_worker_cut_off_from_the_lease_table_stops_its_shard_and_takes_it_back_after(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    kinesis = aws("kinesis")
    stream, app = unique("cutoff"), unique("app")
    [shard_id] = await create_stream(kinesis, stream, 1)
    down = asyncio.Event()

    class Flaky:
        """The lease table's client, answering 503 to every lease call while ``down``."""

        def __init__(self, client: Any) -> None:
            self.client = client

        def __getattr__(self, name: str) -> Any:
            attr = getattr(self.client, name)
            if name not in ("query", "update_item", "put_item"):
                return attr

            async def call(**kwargs: Any) -> Any:
                if down.is_set():
                    error = {"Code": "ServiceUnavailable", "Message": "down"}
                    raise ClientError(
                        {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 503}}, name
                    )
                return await attr(**kwargs)

            return call

    worker = Worker(
        "w1",
        make_source(
            moto_endpoint,
            stream,
            app,
            "w1",
            Watch(),
            _wrap_client=lambda service, c: Flaky(c) if service == "dynamodb" else c,
        ),
    )
    async with running([worker]):
        await start(worker)
        placed = await put_values(kinesis, stream, range(100))
        last = str(placed[shard_id][-1])
        await wait_for(lambda: worker.source.held_leases[shard_id].checkpoint == last)
        down.set()  # renewals fail: once the lease could have lapsed, the shard is let go
        await wait_for(lambda: ("lost", [shard_id]) in worker.recorder.events, timeout=20)
        assert worker.source.assigned == [] and worker.source.held_leases == {}
        await put_values(kinesis, stream, range(100, 200))
        down.clear()  # the table answers again: the lease is taken back, reading goes on
        await wait_for(lambda: worker.values() >= set(range(200)), timeout=20)
        assert list(worker.source.held_leases) == [shard_id]
        assert worker.task is not None and not worker.task.done()  # the source never failed
    assert worker.recorder.assigned() == [shard_id, shard_id]
