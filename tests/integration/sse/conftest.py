"""Fixtures for the SSE adapter tests: a local server replaying recorded Wikimedia events."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.integration.sse.server import ReplayServer


@pytest_asyncio.fixture
async def replay_server() -> AsyncIterator[ReplayServer]:
    """A started ``ReplayServer``; set ``.script`` before the source connects."""
    server = ReplayServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
