"""apps.wiki_bots end to end over Server-Sent Events: the recorded Wikimedia stream, cut or not.

The worker is ``asyncflow worker apps.wiki_bots:app`` with ``WIKI_SSE_URL`` set to a
local ``ReplayServer`` and ``WIKI_BOT_RATE=0``, so every (user, 5 s window) with page
edits is an alert: the output shows every count. The servers replay the 336
recorded events and then an end mark, a ``log`` event an hour later, which
moves the watermark past every window (an SSE stream has no end of input).
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from datetime import UTC, datetime

import orjson
import pytest

from tests.integration.apps.helpers import Worker, Workers
from tests.integration.sse.server import EVENTS_FILE, Connection, Frame, ReplayServer

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(120)]

EVENTS = [json.loads(line) for line in EVENTS_FILE.read_text(encoding="utf-8").splitlines()]
END_MARK = Frame(
    str(len(EVENTS) + 1),
    orjson.dumps(
        {
            "type": "log",
            "user": "~end",
            "bot": False,
            "wiki": "-",
            "title": "-",
            "timestamp": max(e["timestamp"] for e in EVENTS) + 3600,
            "meta": {"domain": "test"},
        }
    ),
)
ALERT = re.compile(r"^BOT ALERT (.*): (\d+) edits in \[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d), ")
SUMMARY = re.compile(r"^wiki_bots: (\d+) user-windows with edits, (\d+) alerts")
Alerts = Counter[tuple[str, int, int]]


def edits_per_user_window() -> Alerts:
    """Plain Python: (user, window start in epoch s, page edits) of every window with edits."""
    counts: Counter[tuple[str, int]] = Counter(
        (e["user"], e["timestamp"] - e["timestamp"] % 5)
        for e in EVENTS
        if e["type"] in ("edit", "new") and e.get("meta", {}).get("domain") != "canary"
    )
    return Counter((user, start, n) for (user, start), n in counts.items())


def alerts_in(output: str) -> Alerts:
    """The alerts a worker printed, as (user, window start in epoch s, edits)."""
    found: Alerts = Counter()
    for line in output.splitlines():
        m = ALERT.match(line)
        if m:
            start = datetime.fromisoformat(m[3]).replace(tzinfo=UTC).timestamp()
            found[(ast.literal_eval(m[1]), int(start), int(m[2]))] += 1
    return found


def summary_in(output: str) -> tuple[int, int]:
    """(user-windows, alerts) from the summary line printed when the worker stops."""
    [m] = [m for m in map(SUMMARY.match, output.splitlines()) if m]
    return int(m[1]), int(m[2])


async def run_worker(server: ReplayServer, workers: Workers, alerts: int) -> Worker:
    """Run the app on ``server`` until it printed ``alerts`` alerts, then stop it with SIGTERM."""
    worker = workers.start("apps.wiki_bots:app", WIKI_SSE_URL=server.url, WIKI_BOT_RATE="0")
    await worker.wait_until(
        lambda: sum(alerts_in(worker.stdout()).values()) >= alerts,
        timeout=60,
        what=f"{alerts} alerts",
    )
    assert await worker.terminate() == 0, worker.describe()
    return worker


async def test_a_disconnect_mid_stream_leaves_no_gap_and_no_duplicate_in_alerts_or_counts(
    replay_server: ReplayServer, workers: Workers
) -> None:
    expected = edits_per_user_window()
    windows = sum(expected.values())
    uncut = ReplayServer()
    await uncut.start()
    try:
        uncut.frames.append(END_MARK)
        reference = await run_worker(uncut, workers, windows)
    finally:
        await uncut.stop()
    cut = replay_server
    cut.frames.append(END_MARK)
    # after 168 events, half of the next frame, then the TCP connection dies
    cut.script = [Connection(drop_after=168)]
    interrupted = await run_worker(cut, workers, windows)

    assert uncut.requests == [None]
    assert cut.requests == [None, "168"]  # reconnected, resuming after the last whole event
    assert "disconnected" in interrupted.stderr()
    assert alerts_in(interrupted.stdout()) == alerts_in(reference.stdout()) == expected
    assert summary_in(interrupted.stdout()) == summary_in(reference.stdout()) == (windows, windows)
