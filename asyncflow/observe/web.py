"""The worker's web server (aiohttp): ``/`` the live page, ``/api/status`` JSON, ``/metrics``.

The page is ``page.html`` shipped in this package: plain HTML and a little
JavaScript that polls ``/api/status`` every second (no build step).
``/metrics`` is the Prometheus text format from the app's own registry.

Example:
    >>> import asyncio, asyncflow as af
    >>> from asyncflow.runtime import Runtime
    >>> from asyncflow.observe.settings import WebSettings
    >>> async def demo():
    ...     server = WebServer(Runtime(af.App("web-doc")), WebSettings(0), lambda: [])
    ...     await server.start()
    ...     try:
    ...         return server.host, server.port > 0
    ...     finally:
    ...         await server.stop()
    >>> asyncio.run(demo())
    ('127.0.0.1', True)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from asyncflow.errors import ConfigError
from asyncflow.observe.collector import registry_for
from asyncflow.observe.settings import WebSettings
from asyncflow.observe.status import status

if TYPE_CHECKING:
    from asyncflow.runtime import Runtime

log = logging.getLogger("asyncflow.web")

History = Callable[[], list[tuple[float, float, float]]]


def page() -> str:
    """The live page's HTML (package data).

    Example:
        >>> "<title>asyncflow" in page()
        True
    """
    return resources.files("asyncflow.observe").joinpath("page.html").read_text("utf-8")


class WebServer:
    """Serves one runtime's page, status and metrics on ``settings.host:settings.port``."""

    def __init__(self, runtime: Runtime, settings: WebSettings, history: History) -> None:
        self.runtime = runtime
        self.settings = settings
        self.history = history
        self.registry = registry_for(runtime)
        self._runner: web.AppRunner | None = None
        self.host = settings.host
        self.port = settings.port

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=page(), content_type="text/html")

    async def _status(self, request: web.Request) -> web.Response:
        body = json.dumps(status(self.runtime, self.history()))
        return web.Response(text=body, content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        """Bind and serve; a port in use (or not allowed) is a one-line ``ConfigError``."""
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                f"web_port (--web-port / ASYNCFLOW_WEB_PORT) {self.settings.port} on "
                f"{self.settings.host}: cannot listen ({exc.strerror or exc}); choose a free port"
            ) from None
        self._runner = runner
        address = runner.addresses[0]
        self.host, self.port = str(address[0]), int(address[1])
        shown = f"[{self.host}]" if ":" in self.host else self.host
        log.info("web view on http://%s:%d/ (metrics at /metrics)", shown, self.port)

    @property
    def addresses(self) -> list[str]:
        """The addresses the listening sockets are bound to (empty when not serving)."""
        if self._runner is None:
            return []
        return [str(a[0]) for a in self._runner.addresses]

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
