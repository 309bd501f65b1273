"""Wikipedia bot watch: flag accounts editing faster than 10 pages per second.

Wikimedia ``recentchange`` events are read from Server-Sent Events
(``adapters.sse.SSESource`` on ``WIKI_SSE_URL``) or, by default, replayed from
``apps/data/wikimedia_recentchange.jsonl`` (336 real events, CC BY-SA 4.0,
Wikimedia contributors) into the memory topic ``wiki-recentchange``. The
input is keyed by ``user``, so each account is in one lane.

**Rule.** Per user and 5 s tumbling event-time window, count the events of
type ``edit`` or ``new`` (page edits and page creations; ``log`` and
``categorize`` entries are not page edits). An alert is sent when the count
is more than ``WIKI_BOT_RATE`` x 5, i.e. with the default rate of 10 pages/s,
more than 50 edits in one window ([start, start + 5 s), aligned to the epoch).
The ``bot`` flag is *not* a condition: an unflagged account editing at bot
speed is what a watcher most wants to see; the alert says whether any of
its events carried the flag (``flagged_bot``). Event time is the event's
``timestamp`` (epoch seconds; equal to ``meta.dt`` in every recorded
event). The watermark waits 10 s for out-of-order events (the recording has
up to 6 s of disorder), so each window is counted once, complete. Canary
events (``meta.domain == "canary"``) are skipped.

The recording has two sessions about 20 hours apart: the first event of the
second session moves the watermark past every window of the first, which
closes them there (not only at the end of input).

Alerts go to the topic ``wiki-bot-alerts`` (keyed by user) and are printed.
The recording holds no account above 10 pages/s (the busiest makes 18 edits
in a window, 3.6/s), so the default run prints no alert, only a summary line
when the worker stops; ``WIKI_BOT_RATE=1`` prints three alerts.

Run: ``asyncflow worker apps.wiki_bots:app``.

**On the live stream**::

    WIKI_SSE_URL=https://stream.wikimedia.org/v2/stream/recentchange \\
    WIKI_SSE_CHECKPOINT=wiki-bots.last-event-id \\
        asyncflow worker apps.wiki_bots:app

The SSE connection is re-opened after a drop with ``Last-Event-ID`` (nothing
lost, nothing repeated); the checkpoint file keeps the id of the last event
the worker committed (processed, its results written), and a restarted worker
resumes after it. A stream has no
end: a window is counted once the watermark (newest event time minus 10 s)
passes it, so alerts come about 15 s after their window, and the worker runs
until SIGINT/SIGTERM (drain, flush, commit, exit 0; the summary line is printed
then). Alerts are printed and sent to the topic ``wiki-bot-alerts`` on the
broker: with ``ASYNCFLOW_BROKER=kafka://localhost:9092`` a Kafka topic (JSON
alerts keyed by user; undecodable events go to ``wiki-bots-dead-letters``), by
default the in-process memory broker (printed only). On the local Tansu broker
of ``apps/_support.py`` use ``ASYNCFLOW_BROKER='kafka://127.0.0.1:9092?enable_idempotence=false'``.

Environment:

- ``WIKI_SSE_URL``: read live events from this SSE URL (e.g. the Wikimedia one above).
- ``WIKI_SSE_CHECKPOINT``: a file to keep the last processed event id in, to resume from
  after a restart.
- ``WIKI_BOT_RATE``: pages per second above which an account is flagged (default 10;
  ``0`` reports every user-window with edits).
- ``ASYNCFLOW_BROKER``: ``kafka://host:port[?option=value&...]`` for the topics (without
  ``WIKI_SSE_URL`` the replay then runs only with ``ASYNCFLOW_DEMO_LOAD=1``; ``0`` skips it
  on memory).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson

import asyncflow as af
from apps._support import (
    demo_load_enabled,
    env,
    read_lines,
)

WINDOW = timedelta(seconds=5)
WAIT = timedelta(seconds=10)
INPUT = "wiki-recentchange"
ALERTS = "wiki-bot-alerts"
DATA_FILE = "wikimedia_recentchange.jsonl"
COUNTED_TYPES = frozenset({"edit", "new"})
USER_AGENT = "asyncflow-wiki-bots/0.1 (asyncflow demo app)"


class Change(af.Record):
    """The fields of a ``recentchange`` event the pipeline uses."""

    type: str
    user: str
    bot: bool
    wiki: str
    title: str
    timestamp: af.EventTime
    meta: dict[str, Any] = {}  # a fresh one for each record that has none


def counted(change: Change) -> bool:
    """Whether an event counts as a page edit: ``edit``/``new``, and not a canary."""
    return change.type in COUNTED_TYPES and change.meta.get("domain") != "canary"


def alert_of(w: af.WindowResult) -> dict[str, Any]:
    """The alert for one (user, window) result."""
    agg = w.value
    seconds = (w.end_ms - w.start_ms) / 1000
    return {
        "user": w.key,
        "window_start": w.start,
        "window_end": w.end,
        "edits": agg["edits"],
        "pages_per_s": round(agg["edits"] / seconds, 2),
        "flagged_bot": bool(agg["flagged_bot"]),
        "wikis": sorted(set(agg["wikis"])),
    }


def format_alert(key: Any, a: dict[str, Any]) -> str:
    """One console line for an alert."""
    return (
        f"BOT ALERT {a['user']!r}: {a['edits']} edits in [{a['window_start']:%Y-%m-%d %H:%M:%S}, "
        f"{a['window_end']:%H:%M:%S}) = {a['pages_per_s']}/s, bot flag {a['flagged_bot']}, "
        f"wikis {', '.join(a['wikis'])}"
    )


class Summary:
    """What the detector saw, across lanes: printed when the worker stops."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.windows = 0
        self.alerts = 0
        self.busiest: tuple[int, str, str] = (0, "-", "-")

    def add(self, w: af.WindowResult, alerted: bool) -> None:
        """Count one (user, window) result."""
        self.windows += 1
        self.alerts += alerted
        edits = w.value["edits"]
        if edits > self.busiest[0]:
            self.busiest = (edits, w.key, f"{w.start:%Y-%m-%d %H:%M:%S}")

    def text(self) -> str:
        """One summary line."""
        edits, user, start = self.busiest
        return (
            f"wiki_bots: {self.windows} user-windows with edits, {self.alerts} alerts "
            f"(> {self.limit:g} edits per 5 s); busiest: {user!r} with {edits} edits "
            f"in the window from {start}"
        )


def make_app(
    *,
    echo: af.Sink | None = None,
    load: bool | None = None,
    rate: float | None = None,
    lanes: int = 4,
) -> af.App:
    """Build the app; ``echo`` replaces the console sink, ``rate`` the pages/s threshold."""
    app = af.App("wiki-bots")
    limit = (rate if rate is not None else float(env("WIKI_BOT_RATE") or 10)) * WINDOW.seconds
    url = env("WIKI_SSE_URL")
    changes: af.Channel[Change]
    if url:
        from adapters.sse import SSESource

        source = SSESource(
            url,
            name=INPUT,
            headers={"User-Agent": USER_AGENT},
            checkpoint=env("WIKI_SSE_CHECKPOINT"),
        )
        changes = app.source(source, name=INPUT, value_type=Change, key=lambda c: c.user)
    else:
        changes = app.topic(INPUT, value_type=Change, key=lambda c: c.user)
    alerts: af.Topic[dict[str, Any]] = app.topic(ALERTS)
    summary = Summary(limit)
    console = app.sink(
        echo or af.ConsoleSink(format_alert, name="wiki-bot-console", footer=summary.text)
    )

    @app.agent(changes, concurrency=lanes)
    async def detect(stream: af.Stream[Change]) -> None:
        """Count page edits per user and 5 s window; alert above the limit."""
        windows = stream.filter(counted).window(
            af.Tumbling(WINDOW),
            wait=WAIT,
            aggregate={
                "edits": af.Count(),
                "flagged_bot": af.Max("bot"),
                "wikis": af.Collect("wiki"),
            },
        )
        async for w in windows:
            alerted = w.value["edits"] > limit
            summary.add(w, alerted)
            if alerted:
                alert = alert_of(w)
                await alerts.send(w.key, alert)
                await console.send(w.key, alert)

    @app.task
    async def replay() -> None:
        """Replay the recorded events, in their order, into ``wiki-recentchange``."""
        if url or not isinstance(changes, af.Topic) or not demo_load_enabled(app, load):
            return
        for line in read_lines(DATA_FILE):
            event = orjson.loads(line)
            await changes.send(event.get("user"), event)
        await changes.end()

    return app


app = make_app()
