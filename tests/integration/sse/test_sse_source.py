"""SSESource against a local aiohttp server replaying recorded Wikimedia events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters.sse import SSESource, SSEUnavailable
from asyncflow.errors import ConfigError
from asyncflow.protocols import Partition, RawBatch, TopicPartition
from tests.integration.sse.server import EVENTS_FILE, Connection, Frame, ReplayServer

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(60)]

LINES = EVENTS_FILE.read_bytes().splitlines()


class Listener:
    def __init__(self) -> None:
        self.assigned: list[Partition] = []

    async def on_assigned(self, partitions: Collection[Partition]) -> None:
        self.assigned.extend(partitions)

    async def on_revoked(self, partitions: Collection[Partition]) -> None:
        pass


def make_source(url: str, **kwargs: Any) -> SSESource:
    options: dict[str, Any] = {"reconnect_backoff": (0.01, 0.05), "silence_timeout": 5.0}
    options.update(kwargs)
    return SSESource(url, name="wiki", **options)


async def read(source: SSESource, count: int, timeout: float = 20.0) -> list[RawBatch]:
    """Fetch until ``count`` records arrived (polling with a deadline)."""
    batches: list[RawBatch] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while sum(len(b.records) for b in batches) < count:
        assert loop.time() < deadline, f"got {sum(len(b.records) for b in batches)} of {count}"
        batches.extend(await source.fetch(0.1))
    return batches


def values(batches: list[RawBatch]) -> list[bytes]:
    return [r.value for b in batches for r in b.records if r.value is not None]


def offsets(batches: list[RawBatch]) -> list[int]:
    return [r.offset for b in batches for r in b.records]


async def test_replayed_wikimedia_stream_is_read_whole(replay_server: ReplayServer) -> None:
    listener = Listener()
    source = make_source(replay_server.url)
    await source.start(listener)
    try:
        batches = await read(source, 336)
    finally:
        await source.stop()
    assert listener.assigned == [TopicPartition("wiki", 0)]
    assert values(batches) == LINES  # every event, in order, bytes untouched
    assert offsets(batches) == list(range(336))
    assert source.last_event_id == "336"
    first = batches[0].records[0]
    assert dict(first.headers) == {"sse-event": b"message", "sse-id": b"1"}
    assert orjson.loads(first.value or b"")["meta"]["topic"] == "codfw.mediawiki.recentchange"
    assert source.stats.connections == 1 and source.stats.reconnects == 0


async def test_recorded_sample_frames_are_read_with_their_real_ids(
    replay_server: ReplayServer,
) -> None:
    source = make_source(replay_server.sample_url)
    await source.start(Listener())
    try:
        batches = await read(source, 3)
    finally:
        await source.stop()
    records = [r for b in batches for r in b.records]
    assert [r.value for r in records] == [f.data for f in replay_server.sample]
    real_id = replay_server.sample[0].id
    assert real_id is not None and real_id.startswith('[{"topic":"eqiad.mediawiki.recentchange"')
    assert source.last_event_id == real_id
    assert {dict(r.headers)["sse-id"] for r in records} == {real_id.encode()}


@pytest.mark.parametrize("drop_after", [1, 100, 335])
async def test_forced_disconnect_resumes_from_the_last_event_id_without_gap_or_duplicate(
    replay_server: ReplayServer, drop_after: int, caplog: pytest.LogCaptureFixture
) -> None:
    replay_server.script = [Connection(drop_after=drop_after, cut_frame=True)]
    source = make_source(replay_server.url)
    with caplog.at_level(logging.WARNING, logger="adapters.sse"):
        await source.start(Listener())
        try:
            batches = await read(source, 336)
        finally:
            await source.stop()
    assert values(batches) == LINES
    assert offsets(batches) == list(range(336))
    assert replay_server.requests == [None, str(drop_after)]
    warnings = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(warnings) == 1
    assert f"after {drop_after} events" in warnings[0]
    assert f"Last-Event-ID {drop_after}" in warnings[0]


async def test_server_ending_the_stream_is_reconnected_from_the_last_id(
    replay_server: ReplayServer,
) -> None:
    replay_server.script = [Connection(end_after=10), Connection(end_after=0), Connection()]
    source = make_source(replay_server.url)
    await source.start(Listener())
    try:
        batches = await read(source, 336)
    finally:
        await source.stop()
    assert values(batches) == LINES
    assert replay_server.requests == [None, "10", "10"]


async def test_malformed_data_is_passed_on_not_dropped() -> None:
    frames = [
        Frame("1", LINES[0]),
        Frame("2", b'{"broken": '),  # malformed JSON
        Frame("3", b"\xff\xfe not utf-8"),  # not even text
        Frame("4", b"line one\nline two"),  # multi-line data
        Frame("5", b""),  # "data:" with nothing: an event with empty data
        Frame("6", LINES[1]),
    ]
    server = ReplayServer(frames=frames)
    await server.start()
    source = make_source(server.url)
    try:
        await source.start(Listener())
        batches = await read(source, 6)
    finally:
        await source.stop()
        await server.stop()
    assert values(batches) == [
        LINES[0],
        b'{"broken": ',
        b"\xff\xfe not utf-8",
        b"line one\nline two",
        b"",
        LINES[1],
    ]
    assert source.stats.undecodable_lines == 1
    assert source.last_event_id == "6"


async def test_silent_server_triggers_the_silence_timeout_and_a_reconnect(
    replay_server: ReplayServer, caplog: pytest.LogCaptureFixture
) -> None:
    replay_server.script = [Connection(silent_after=50)]
    source = make_source(replay_server.url, silence_timeout=0.3)
    with caplog.at_level(logging.WARNING, logger="adapters.sse"):
        await source.start(Listener())
        try:
            batches = await read(source, 336)
        finally:
            await source.stop()
    assert values(batches) == LINES
    assert replay_server.requests == [None, "50"]
    assert source.stats.silence_timeouts == 1
    assert any("no event or comment for 0.3 s" in r.getMessage() for r in caplog.records)


async def test_comments_keep_a_quiet_connection_open(replay_server: ReplayServer) -> None:
    replay_server.script = [Connection(pause_after=50, pause_seconds=1.0, comment_every=0.1)]
    source = make_source(replay_server.url, silence_timeout=0.4)
    await source.start(Listener())
    try:
        batches = await read(source, 336)
    finally:
        await source.stop()
    assert values(batches) == LINES
    assert replay_server.requests == [None]
    assert source.stats.silence_timeouts == 0


async def test_commit_checkpoints_the_acked_id_and_a_restart_resumes_from_it(
    replay_server: ReplayServer, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "wiki.last-event-id"
    seen: list[str] = []
    first = make_source(replay_server.url, checkpoint=checkpoint)
    await first.start(Listener())
    try:
        await read(first, 336)  # read everything, but only 200 are processed
        await first.commit({TopicPartition("wiki", 0): 199})
        seen.append(checkpoint.read_text().strip())
        assert first.committed_event_id == "200"
        assert first.last_event_id == "336"
    finally:
        await first.stop()

    second = make_source(replay_server.url, checkpoint=checkpoint)
    await second.start(Listener())
    try:
        batches = await read(second, 136)
    finally:
        await second.stop()
    assert seen == ["200"]
    assert values(batches) == LINES[200:]
    assert replay_server.requests == [None, "200"]


async def test_commit_hands_the_acked_id_to_a_checkpoint_callable(
    replay_server: ReplayServer,
) -> None:
    stored: list[str] = []

    async def save(event_id: str) -> None:
        stored.append(event_id)

    source = make_source(replay_server.url, checkpoint=save)
    await source.start(Listener())
    try:
        await read(source, 336)
        for offset in (9, 9, 10, 335):
            await source.commit({TopicPartition("wiki", 0): offset})
    finally:
        await source.stop()
    assert stored == ["10", "11", "336"]


async def test_paused_source_hands_out_nothing_until_resumed(replay_server: ReplayServer) -> None:
    source = make_source(replay_server.url, max_buffer=50)
    partition = TopicPartition("wiki", 0)
    await source.start(Listener())
    try:
        source.pause([partition])
        assert await source.fetch(0.2) == []
        source.resume([partition])
        batches = await read(source, 336)
    finally:
        await source.stop()
    assert values(batches) == LINES


async def test_wrong_url_gives_a_clear_error(replay_server: ReplayServer) -> None:
    source = make_source(replay_server.url.replace("recentchange", "nothing-here"))
    with pytest.raises(ConfigError, match="answered HTTP 404; check the URL"):
        await source.start(Listener())


async def test_unreachable_server_gives_a_clear_error(replay_server: ReplayServer) -> None:
    url = replay_server.url
    await replay_server.stop()
    with pytest.raises(SSEUnavailable, match="cannot reach SSE server"):
        await make_source(url).start(Listener())
