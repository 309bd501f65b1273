"""A local SSE server replaying the recorded Wikimedia events, with scripted misbehaviour.

Reusable from any test::

    from tests.integration.sse.server import ReplayServer, Connection

    server = ReplayServer()                       # 336 recorded events, ids "1".."336"
    server.script = [Connection(drop_after=100)]  # first connection dies after 100 events
    await server.start()
    ... SSESource(server.url) ...                 # server.sample_url serves the raw sample
    await server.stop()

``/v2/stream/recentchange`` serves ``tests/data/wikimedia_recentchange.jsonl``: event
``n`` (1-based line number) has ``id: n``, ``event: message`` and the line as ``data:``.
A request with ``Last-Event-ID: n`` gets the events after ``n``. ``/sample`` serves the
three raw frames of ``wikimedia_recentchange_sse_sample.txt`` with their real ids (all
three carry the same id, as recorded: resuming from it skips to after the last of them).
Each connection follows ``script[i]`` (default: send everything, then stay open).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

DATA = Path(__file__).resolve().parents[2] / "data"
EVENTS_FILE = DATA / "wikimedia_recentchange.jsonl"
SAMPLE_FILE = DATA / "wikimedia_recentchange_sse_sample.txt"


@dataclass(frozen=True)
class Frame:
    """One SSE message as the server sends it."""

    id: str | None
    data: bytes
    event: str | None = "message"

    def encode(self) -> bytes:
        out = b""
        if self.event:
            out += b"event: " + self.event.encode() + b"\n"
        if self.id is not None:
            out += b"id: " + self.id.encode() + b"\n"
        for line in self.data.split(b"\n"):
            out += b"data: " + line + b"\n"
        return out + b"\n"


@dataclass
class Connection:
    """What the server does on one connection (counted from the first)."""

    drop_after: int | None = None  # abort the TCP connection after this many events
    cut_frame: bool = True  # ...having sent the first half of the next frame
    end_after: int | None = None  # end the response normally after this many events
    silent_after: int | None = None  # then send nothing at all
    pause_after: int | None = None  # stop for pause_seconds, sending comments, then go on
    pause_seconds: float = 0.0
    comment_every: float | None = None  # ": keepalive" comments while silent or paused


def wikimedia_frames() -> list[Frame]:
    """The 336 recorded events, with SSE ids built from their line numbers."""
    lines = EVENTS_FILE.read_bytes().splitlines()
    return [Frame(str(n), line) for n, line in enumerate(lines, start=1)]


def sample_frames() -> list[Frame]:
    """The raw recorded frames, parsed as a client would (real ids kept)."""
    frames = []
    for block in SAMPLE_FILE.read_bytes().split(b"\n\n"):
        fields: dict[bytes, list[bytes]] = {}
        for line in block.splitlines():
            name, _, value = line.partition(b":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(b" ") else value)
        if b"data" in fields:
            frames.append(
                Frame(
                    fields[b"id"][-1].decode() if b"id" in fields else None,
                    b"\n".join(fields[b"data"]),
                    fields.get(b"event", [b"message"])[-1].decode(),
                )
            )
    return frames


@dataclass
class ReplayServer:
    """An aiohttp SSE server on 127.0.0.1 (free port) replaying ``frames``."""

    frames: list[Frame] = field(default_factory=wikimedia_frames)
    script: list[Connection] = field(default_factory=list)
    sample: list[Frame] = field(default_factory=sample_frames)
    requests: list[str | None] = field(default_factory=list)  # Last-Event-ID per connection
    path: str = "/v2/stream/recentchange"
    _runner: web.AppRunner | None = None
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def sample_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/sample"

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get(self.path, self._replay)
        app.router.add_get("/sample", self._sample)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.url

    async def stop(self) -> None:
        """Close every connection and the listening socket (idempotent)."""
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _open(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        return response

    @staticmethod
    def _after(frames: list[Frame], last_id: str | None) -> list[Frame]:
        if last_id is None:
            return frames
        index = max((i for i, f in enumerate(frames) if f.id == last_id), default=-1)
        return frames[index + 1 :]

    async def _sample(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.headers.get("Last-Event-ID"))
        response = await self._open(request)
        for frame in self._after(self.sample, request.headers.get("Last-Event-ID")):
            await response.write(frame.encode())
        await self._hold(response, None)
        return response

    async def _replay(self, request: web.Request) -> web.StreamResponse:
        number = len(self.requests)
        last_id = request.headers.get("Last-Event-ID")
        self.requests.append(last_id)
        plan = self.script[number] if number < len(self.script) else Connection()
        response = await self._open(request)
        try:
            for sent, frame in enumerate(self._after(self.frames, last_id)):
                if sent == plan.drop_after:
                    if plan.cut_frame:
                        encoded = frame.encode()
                        await response.write(encoded[: len(encoded) // 2])
                    assert request.transport is not None
                    request.transport.close()  # no final chunk: the client sees a broken payload
                    return response
                if sent == plan.end_after:
                    await response.write_eof()
                    return response
                if sent == plan.silent_after:
                    await self._hold(response, plan.comment_every)
                    return response
                if sent == plan.pause_after:
                    await self._hold(response, plan.comment_every, plan.pause_seconds)
                await response.write(frame.encode())
            await self._hold(response, plan.comment_every)
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away
        return response

    async def _hold(
        self,
        response: web.StreamResponse,
        comment_every: float | None,
        seconds: float | None = None,
    ) -> None:
        """Stay open (sending comments if asked) for ``seconds`` or until the server stops."""
        loop = asyncio.get_running_loop()
        end = None if seconds is None else loop.time() + seconds
        while not self._closing.is_set():
            left = None if end is None else end - loop.time()
            if left is not None and left <= 0:
                return
            step = min(x for x in (comment_every, left, 3600.0) if x is not None)
            try:
                await asyncio.wait_for(self._closing.wait(), step)
            except TimeoutError:
                if comment_every is not None:
                    await response.write(b": keepalive\n\n")
