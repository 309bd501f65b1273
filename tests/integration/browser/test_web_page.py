"""The live page in a real browser: headless Chromium from the system's packages, via Playwright.

Nothing is downloaded: Playwright is pointed at ``/usr/bin/chromium`` (or
``ASYNCFLOW_TEST_CHROMIUM``); without that browser the test is skipped and says
why. The screenshot goes to ``ASYNCFLOW_TEST_ARTIFACTS`` (default
``/tmp/asyncflow-artifacts``); the test prints its path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import asyncflow as af
from asyncflow.observe.settings import WebSettings, configure_web
from asyncflow.testing import TestRun, wait_for

CHROMIUM = Path(os.environ.get("ASYNCFLOW_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("ASYNCFLOW_TEST_ARTIFACTS", "/tmp/asyncflow-artifacts"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set "
                              "ASYNCFLOW_TEST_CHROMIUM); CI installs it"),
]

playwright_api = pytest.importorskip("playwright.async_api",
                                     reason="playwright is not installed (the dev extra has it)")


def _app() -> af.App:
    app = af.App("page-demo")
    rides = app.topic("rides", partitions=2)
    out = app.topic("rides-counted")

    @app.agent(rides, concurrency=2)
    async def count(stream: af.Stream[Any]) -> None:
        async for v in stream:
            if v.get("bad"):
                raise ValueError("a bad ride")
            await out.send(None, v)

    return app


async def test_page_shows_topology_and_live_figures_during_a_run() -> None:
    app = _app()
    configure_web(app, WebSettings(0))
    async with TestRun(app) as run:
        await wait_for(lambda: app._runtime is not None and app._runtime.observer is not None
                       and app._runtime.observer.server is not None)
        assert app._runtime is not None and app._runtime.observer is not None
        server = app._runtime.observer.server
        assert server is not None
        await run.send_many("rides", [{"n": i} for i in range(200)])
        await run.send("rides", {"bad": True})
        await wait_for(lambda: app.metrics.get("events_in") == 201
                       and app.metrics.get("dead_letters") == 1)
        async with playwright_api.async_playwright() as p:
            browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1100, "height": 1100})
                await page.goto(f"http://127.0.0.1:{server.port}/")
                await page.wait_for_function(
                    "document.getElementById('events-in').textContent === '201'", timeout=20_000)
                topology = await page.text_content("#topology")
                partitions = await page.locator("#partitions tbody tr").count()
                dead = await page.text_content("#dead-letters")
                await run.send_many("rides", [{"n": i} for i in range(200, 400)])
                await page.wait_for_function(  # the open page follows the run
                    "document.getElementById('events-in').textContent === '401'", timeout=20_000)
                await page.wait_for_function(
                    "document.querySelectorAll('#throughput polyline').length === 2 && "
                    "Number(document.getElementById('peak').textContent.replace(/,/g, '')) > 1",
                    timeout=20_000)
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                shot = ARTIFACTS / "web-page.png"
                await page.screenshot(path=str(shot), full_page=True)
                print(f"screenshot: {shot}")
            finally:
                await browser.close()
        await run.finish()
    assert topology is not None and "rides" in topology and "count (2 lanes)" in topology
    assert "rides-counted" in topology and "page-demo-dead-letters" in topology
    assert partitions == 2
    assert dead is not None and "agent_error" in dead and "a bad ride" in dead
    assert shot.stat().st_size > 0
