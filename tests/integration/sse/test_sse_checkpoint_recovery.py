"""A restart over a torn SSE checkpoint file resumes from ``last_event_id`` instead of crashing."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.sse import read_checkpoint
from asyncflow.protocols import TopicPartition
from tests.integration.sse.server import ReplayServer
from tests.integration.sse.test_sse_source import LINES, Listener, make_source, read, values

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.mark.parametrize("content", [b"", b"20"], ids=["empty", "torn"])
async def test_a_torn_checkpoint_resumes_from_last_event_id_and_is_rewritten_whole(
    replay_server: ReplayServer, tmp_path: Path, content: bytes
) -> None:
    checkpoint = tmp_path / "wiki.last-event-id"
    checkpoint.write_bytes(content)
    (tmp_path / "wiki.last-event-id.tmp").write_bytes(b"30")  # left by the crash
    source = make_source(replay_server.url, checkpoint=checkpoint, last_event_id="100")
    await source.start(Listener())
    try:
        batches = await read(source, 236)
        await source.commit({TopicPartition("wiki", 0): 235})
    finally:
        await source.stop()
    assert replay_server.requests == ["100"]
    assert values(batches) == LINES[100:]
    assert read_checkpoint(checkpoint) == "336"
    assert not (tmp_path / "wiki.last-event-id.tmp").exists()
