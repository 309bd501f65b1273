"""The observer: a task in the runtime's TaskGroup that samples rates, logs progress and serves.

Every second it samples the events in and out (for the page's throughput
chart, the last ``HISTORY_SECONDS``); every ``PROGRESS_INTERVAL`` it logs the
progress line; with web settings it runs the web server, which it stops on
every way out (cancellation at stop included).

Example:
    >>> import asyncio, asyncflow as af
    >>> from asyncflow.runtime import Runtime
    >>> async def demo():
    ...     obs = Observer(Runtime(af.App("obs-doc")), None)
    ...     task = asyncio.create_task(obs.run())
    ...     await obs.serving()
    ...     task.cancel()
    ...     await asyncio.gather(task, return_exceptions=True)
    ...     return obs.server is None
    >>> asyncio.run(demo())
    True
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from asyncflow.observe.progress import PROGRESS_INTERVAL, progress_line
from asyncflow.observe.settings import WebSettings
from asyncflow.observe.status import status

if TYPE_CHECKING:
    from asyncflow.observe.web import WebServer
    from asyncflow.runtime import Runtime

log = logging.getLogger("asyncflow.progress")

HISTORY_SECONDS = 300
"""How far back the throughput samples go (one a second)."""


class Observer:
    """Samples throughput, logs the progress line and owns the web server of one runtime."""

    def __init__(
        self,
        runtime: Runtime,
        settings: WebSettings | None,
        *,
        sample_interval: float = 1.0,
        progress_interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.sample_interval = sample_interval
        self.progress_interval = progress_interval
        self.server: WebServer | None = None
        self.samples: deque[tuple[float, float, float]] = deque(
            maxlen=int(HISTORY_SECONDS / sample_interval) + 1)
        self._ready = asyncio.Event()
        self._failed: BaseException | None = None
        self._last: tuple[float, int, int] | None = None

    def history(self) -> list[tuple[float, float, float]]:
        """``(unix time, events in per s, events out per s)`` samples, oldest first."""
        return list(self.samples)

    async def serving(self) -> None:
        """Wait until the web server listens (or there is none); raise what stopped it binding."""
        await self._ready.wait()
        if self._failed is not None:
            raise self._failed

    def _totals(self) -> tuple[int, int]:
        m = self.runtime.app.metrics
        return int(m.get("events_in")), sum(m.labeled("events_out").values())

    def sample(self) -> tuple[float, float]:
        """Take one throughput sample now; the rates since the last one (in, out per s)."""
        now = time.monotonic()
        total_in, total_out = self._totals()
        rates = (0.0, 0.0)
        if self._last is not None:
            then, last_in, last_out = self._last
            span = max(now - then, 1e-9)
            rates = ((total_in - last_in) / span, (total_out - last_out) / span)
            self.samples.append((time.time(), *rates))
        self._last = (now, total_in, total_out)
        return rates

    async def run(self) -> None:
        """Until cancelled: sample every second, log progress every few; serve when configured."""
        try:
            if self.settings is not None:
                from asyncflow.observe.web import WebServer  # aiohttp, prometheus: only when on

                server = WebServer(self.runtime, self.settings, self.history)
                try:
                    await server.start()
                except BaseException as exc:
                    self._failed = exc
                    raise
                finally:
                    self._ready.set()
                self.server = server
            self._ready.set()
            self.sample()
            since_line = time.monotonic()
            window: tuple[float, int, int] = (since_line, *self._totals())
            while True:
                await asyncio.sleep(self.sample_interval)
                self.sample()
                now = time.monotonic()
                if now - since_line >= self.progress_interval:
                    began, last_in, last_out = window
                    total_in, total_out = self._totals()
                    span = max(now - began, 1e-9)
                    log.info("%s", progress_line(status(self.runtime),
                                                 (total_in - last_in) / span,
                                                 (total_out - last_out) / span))
                    since_line, window = now, (now, total_in, total_out)
        finally:
            serving, self.server = self.server, None
            if serving is not None:
                await serving.stop()
