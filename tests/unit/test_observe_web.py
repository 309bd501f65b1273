"""The web view of a running worker: /metrics, /api/status, the page, the progress line, the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import asyncflow as af
from asyncflow.cli import main
from asyncflow.observe.observer import Observer
from asyncflow.observe.settings import WebSettings, configure_web
from asyncflow.testing import TestRun, wait_for
from tests.unit.cli_helpers import one_error_line, run_worker


def _pipeline(name: str = "seen") -> af.App:
    app = af.App(name)
    rides = app.topic("rides", partitions=2)
    out = app.topic("counted")

    @app.agent(rides, concurrency=2)
    async def count(stream: af.Stream[Any]) -> None:
        async for v in stream:
            if v.get("boom"):
                raise ValueError("boom")
            await out.send(None, v)

    return app


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        return await response.text()


def _server(app: af.App) -> Any:
    runtime = app._runtime
    assert runtime is not None and runtime.observer is not None
    return runtime.observer.server


async def test_web_view_binds_loopback_only_by_default() -> None:
    app = _pipeline()
    configure_web(app, WebSettings(0))
    async with TestRun(app) as run:
        await wait_for(lambda: _server(app) is not None)
        server = _server(app)
        assert server.host == "127.0.0.1"
        assert server.addresses == ["127.0.0.1"]
        await run.finish()


async def test_metrics_count_events_by_topic_and_agent_and_dead_letters_by_reason_class() -> None:
    app = _pipeline()
    configure_web(app, WebSettings(0))
    async with TestRun(app) as run:
        await wait_for(lambda: _server(app) is not None)
        base = f"http://127.0.0.1:{_server(app).port}"
        await run.send_many("rides", [{"n": i} for i in range(50)])
        await run.send("rides", {"boom": True})
        run.send_raw("rides", b"{not json")
        await wait_for(lambda: app.metrics.get("dead_letters") == 2
                       and app.metrics.get("commits") > 0, timeout=20)
        samples = _samples(await _get(base + "/metrics"))
        run_app = await _get(base + "/api/status")
        await run.finish()
    assert samples[("asyncflow_events_in_total", (("agent", "count"), ("topic", "rides")))] == 52
    assert samples[("asyncflow_events_out_total",
                    (("sink", "memory-producer"), ("topic", "counted")))] >= 50
    assert samples[("asyncflow_dead_letters_total", (("reason", "agent_error"),))] == 1
    assert samples[("asyncflow_dead_letters_total", (("reason", "decode"),))] == 1
    assert samples[("asyncflow_processing_seconds_count", ())] > 0
    assert samples[("asyncflow_commits_total", ())] > 0
    lags = [v for (name, _), v in samples.items() if name == "asyncflow_consumer_lag"]
    assert len(lags) == 2
    status = json.loads(run_app)
    assert [a["name"] for a in status["topology"]["agents"]] == ["count"]
    assert {d["reason_class"] for d in status["recent_dead_letters"]} == {"agent_error", "decode"}


async def test_page_is_served_at_the_root() -> None:
    app = _pipeline()
    configure_web(app, WebSettings(0))
    async with TestRun(app) as run:
        await wait_for(lambda: _server(app) is not None)
        html = await _get(f"http://127.0.0.1:{_server(app).port}/")
        await run.finish()
    assert 'id="topology"' in html and "api/status" in html


async def test_two_apps_in_one_process_keep_their_own_metrics() -> None:
    first, second = _pipeline("one"), _pipeline("two")
    for app in (first, second):
        configure_web(app, WebSettings(0))
    async with TestRun(first) as run_one, TestRun(second) as run_two:
        await wait_for(lambda: _server(first) is not None and _server(second) is not None)
        await run_one.send_many("rides", [{"n": i} for i in range(3)])
        await wait_for(lambda: first.metrics.get("events_in") == 3)
        one = _samples(await _get(f"http://127.0.0.1:{_server(first).port}/metrics"))
        two = _samples(await _get(f"http://127.0.0.1:{_server(second).port}/metrics"))
        await run_one.finish()
        await run_two.finish()
    key = ("asyncflow_events_in_total", (("agent", "count"), ("topic", "rides")))
    assert one[key] == 3 and key not in two


async def test_progress_line_says_rate_lag_watermark_dead_letters_and_how_far_a_replay_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = _pipeline()
    configure_web(app, None)
    async with TestRun(app) as run:
        await run.send_many("rides", [{"n": i} for i in range(10)])
        for t in run.broker.topics.values():
            t.ended = False
        run.broker.topics["rides"].ended = True  # a bounded input, still being read
        runtime = app._runtime
        assert runtime is not None
        observer = Observer(runtime, None, sample_interval=0.01, progress_interval=0.02)
        task = asyncio.create_task(observer.run())
        with caplog.at_level(logging.INFO, logger="asyncflow.progress"):
            await wait_for(lambda: any("progress:" in r.message for r in caplog.records))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await run.finish()
    line = next(r.message for r in caplog.records if "progress:" in r.message)
    assert "events/s in" in line and "lag" in line and "watermark" in line
    assert "dead letters" in line and "% of 10" in line


def test_web_port_out_of_range_is_refused_with_one_line_naming_the_setting(tmp_path: Path) -> None:
    line = one_error_line(run_worker(tmp_path, "tiny:app", "--web-port", "70000"))
    assert "web_port (--web-port)" in line and "0 to 65535" in line
    line = one_error_line(run_worker(tmp_path, "tiny:app", env={"ASYNCFLOW_WEB_PORT": "x"}))
    assert "ASYNCFLOW_WEB_PORT" in line


def test_status_of_an_unreachable_worker_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["status", "--web", "http://user:secret@127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("asyncflow: error: no asyncflow worker answered")
    assert "secret" not in err[0]


async def test_status_prints_the_figures_of_a_running_worker() -> None:
    app = _pipeline()
    configure_web(app, WebSettings(0))
    async with TestRun(app) as run:
        await wait_for(lambda: _server(app) is not None)
        await run.send_many("rides", [{"n": i} for i in range(5)])
        await wait_for(lambda: app.metrics.get("events_in") == 5)
        url = f"http://127.0.0.1:{_server(app).port}"
        proc = await asyncio.create_subprocess_exec(
            str(Path(__import__("sys").executable).parent / "asyncflow"), "status", "--web", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        await run.finish()
    assert proc.returncode == 0, err
    text = out.decode()
    assert text.startswith("seen: running") and "rides -> count (2 lanes) -> counted" in text
    assert "rides[0]" in text


def test_web_port_in_use_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        module = ('import asyncflow as af\napp = af.App("tiny")\nt = app.topic("t")\n'
                  '@app.agent(t)\nasync def a(stream):\n    async for _ in stream:\n        pass\n')
        result = run_worker(tmp_path, "tiny:app", "--web-port", str(port), module=module)
    line = one_error_line(result)
    assert f"web_port (--web-port / ASYNCFLOW_WEB_PORT) {port}" in line and "free port" in line


async def test_a_sinks_retries_and_write_latency_are_in_metrics_by_sink_name() -> None:
    from types import SimpleNamespace

    from asyncflow.testing import CaptureSink

    class RetryingSink(CaptureSink):
        """Counts a retry per write, as the Kinesis sink's ``stats.records_retried`` does."""

        def __init__(self) -> None:
            super().__init__("ledger")
            self.stats = SimpleNamespace(records_retried=0)

        async def write(self, records: Any) -> Any:
            self.stats.records_retried += 1
            return await super().write(records)

    app = af.App("retried")
    numbers = app.topic("numbers")
    out = app.sink(RetryingSink())

    @app.agent(numbers)
    async def copy(stream: af.Stream[Any]) -> None:
        async for v in stream:
            await out.send(None, v)

    configure_web(app, WebSettings(0))
    async with TestRun(app) as run:
        await wait_for(lambda: _server(app) is not None)
        await run.send_many("numbers", [{"n": i} for i in range(10)])
        await wait_for(lambda: app.metrics.get("sink.ledger.written") == 10)
        samples = _samples(await _get(f"http://127.0.0.1:{_server(app).port}/metrics"))
        await run.finish()
    assert samples[("asyncflow_sink_retries_total", (("sink", "ledger"),))] >= 1
    assert samples[("asyncflow_sink_write_seconds_count", (("sink", "ledger"),))] >= 1
    assert samples[("asyncflow_events_out_total", (("sink", "ledger"), ("topic", "ledger")))] == 10
