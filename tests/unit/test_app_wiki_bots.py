"""apps.wiki_bots: page edits per user and 5 s window over the recorded recentchange events."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from adapters.sse import SSESource
from apps.wiki_bots import ALERTS, INPUT, make_app
from asyncflow.testing import CaptureSink, TestRun, wait_for

DATA = Path(__file__).resolve().parents[2] / "apps" / "data" / "wikimedia_recentchange.jsonl"
EVENTS = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(autouse=True)
def plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "ASYNCFLOW_BROKER",
        "ASYNCFLOW_DEMO_LOAD",
        "ASYNCFLOW_LANE_CAPACITY",
        "WIKI_SSE_URL",
        "WIKI_BOT_RATE",
    ):
        monkeypatch.delenv(name, raising=False)


def edits_per_window(events: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Plain Python: the ``edit``/``new`` events per (user, 5 s window start in epoch s)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e["type"] in ("edit", "new"):
            groups[(e["user"], e["timestamp"] - e["timestamp"] % 5)].append(e)
    return groups


def as_key(alert: dict[str, Any]) -> tuple[str, int]:
    start = datetime.fromisoformat(alert["window_start"]).timestamp()
    end = datetime.fromisoformat(alert["window_end"]).timestamp()
    assert end - start == 5
    return alert["user"], int(start)


async def replayed(app: Any) -> TestRun:
    async with TestRun(app) as run:
        await run.wait_stopped(20)
    return run


async def test_alerts_match_a_plain_count_of_page_edits_per_user_and_window() -> None:
    echo = CaptureSink()
    run = await replayed(make_app(echo=echo, load=True, rate=1.0))  # more than 5 edits in 5 s

    alerts = {as_key(a): a for a in run.outputs(ALERTS)}
    expected = {k: v for k, v in edits_per_window(EVENTS).items() if len(v) > 5}
    assert (
        alerts.keys()
        == expected.keys()
        == {("Cewbot", 1707238690), ("Cewbot", 1707238695), ("SchlurcherBot", 1707310920)}
    )
    for key, events in expected.items():
        a = alerts[key]
        assert a["edits"] == len(events)
        assert a["pages_per_s"] == round(len(events) / 5, 2)
        assert a["flagged_bot"] == any(e["bot"] for e in events)
        assert a["wikis"] == sorted({e["wiki"] for e in events})
    assert len(echo.values) == 3


async def test_with_a_zero_rate_every_user_window_with_edits_is_reported_exactly_once() -> None:
    run = await replayed(make_app(echo=CaptureSink(), load=True, rate=0.0))
    counts = [(as_key(a), a["edits"]) for a in run.outputs(ALERTS)]
    assert sorted(counts) == sorted((k, len(v)) for k, v in edits_per_window(EVENTS).items())
    assert run.dead_letters() == []  # nothing late: the 10 s wait covers the 6 s of disorder


async def test_the_default_rate_of_10_pages_per_second_flags_nobody_in_the_recording(
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = await replayed(make_app(load=True))
    assert run.outputs(ALERTS) == []
    assert max(len(v) for v in edits_per_window(EVENTS).values()) == 18  # 3.6/s at most
    assert (
        "0 alerts (> 50 edits per 5 s); busiest: 'Cewbot' with 18 edits" in capsys.readouterr().out
    )


async def test_first_session_windows_close_when_the_second_session_arrives_20_hours_later() -> None:
    app = make_app(echo=CaptureSink(), load=False, rate=0.0)
    first, second = EVENTS[:218], EVENTS[218:]
    assert second[0]["timestamp"] - first[-1]["timestamp"] > 19 * 3600
    async with TestRun(app) as run:
        for e in first:
            await run.send(INPUT, e)
        await wait_for(lambda: app.metrics.get("events_in") == 218)
        await run.send(INPUT, second[0])
        n_first = len(edits_per_window(first))
        await wait_for(lambda: len(run.outputs(ALERTS)) == n_first)  # before any end of input
        assert {as_key(a) for a in run.outputs(ALERTS)} == edits_per_window(first).keys()
        for e in second[1:]:
            await run.send(INPUT, e)
        await run.finish()
    assert len(run.outputs(ALERTS)) == len(edits_per_window(EVENTS))


def test_live_events_are_read_over_sse_when_WIKI_SSE_URL_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WIKI_SSE_URL", "http://127.0.0.1:9/v2/stream/recentchange")
    app = make_app(echo=CaptureSink())
    source = app.channels[INPUT].source
    assert isinstance(source, SSESource)
    assert source.url == "http://127.0.0.1:9/v2/stream/recentchange"
