"""IoT sensor averages: per-sensor 5 s event-time windows, upserted by sensor id.

Readings ``{"sensor_id", "temperature", "time"}`` arrive on the topic
``sensor-readings`` (keyed by sensor id). Each sensor gets 5 s tumbling windows
in event time; the watermark waits 10 s for out-of-order readings
(``wait=10s``: the watermark is the newest event time minus 10 s), so each
window fires once, complete, and a reading later than that goes to the
dead-letter topic ``sensors-dead-letters``. (Allowed ``lateness`` would instead
re-emit a window for each late reading; upserting by sensor id, such an update
of an older window could overwrite a newer one.) Each window gives its average
temperature, count, and first and last event time, and is upserted keyed by
``sensor_id``: the table holds each sensor's latest closed window.

Run: ``asyncflow worker apps.sensor_averages:app`` (``make run``).

By default (no environment variables) it runs on the embedded memory broker:
a task replays ``apps/data/sensor_readings.csv`` (29,962 real readings of two
NAB sensors, see ``apps/data/README.md``), prints one line per window and
exits 0 when the replay is done, in a few seconds.

**Replay timeline.** The readings are hourly (``office_ambient``) and every
5 minutes (``machine_internal``), so a 5 s window of real time holds at most
one reading. The replay keeps the real order and values but compresses time:
event time = first timestamp + (timestamp - first timestamp) / ``SENSOR_TIME_SCALE``,
in whole milliseconds; with the default scale 86,400 one day of readings lasts
one second, so a 5 s window holds 5 days (120 office or 1,440 machine
readings), and the whole run prints 82 lines. The CSV timestamps have no
zone: they are read as UTC. Each reading carries its original timestamp in
``recorded_at``, and the output shows the real span each window covers.

**On the real services** (Kafka in, DynamoDB out). Create the table (hash key
``sensor_id``, a string), then run the worker::

    aws dynamodb create-table --table-name sensor-averages \\
        --attribute-definitions AttributeName=sensor_id,AttributeType=S \\
        --key-schema AttributeName=sensor_id,KeyType=HASH --billing-mode PAY_PER_REQUEST
    ASYNCFLOW_BROKER=kafka://localhost:9092 SENSOR_TABLE=sensor-averages AWS_REGION=us-east-1 \\
        asyncflow worker apps.sensor_averages:app

It consumes ``sensor-readings`` as the consumer group ``sensors`` (the topic is
created with 1 partition if missing; create it first with more, e.g.
``asyncflow topics --broker kafka://localhost:9092 create sensor-readings --partitions 4``).
Each record's value is a JSON ``Reading`` (``time`` in epoch seconds or ISO-8601
with a zone), its key the sensor id. Add ``ASYNCFLOW_DEMO_LOAD=1`` to have the
worker replay the data set into the topic itself. A topic has no end: a window
is written once a later reading moves the watermark past it (so each sensor's
newest window waits for more readings), and the worker runs until SIGINT/SIGTERM,
which flush the buffered DynamoDB writes, commit and exit 0. Late readings go to
the Kafka topic ``sensors-dead-letters`` (the reason in the ``asyncflow.reason``
header). With the local stand-ins of ``apps/_support.py``, use
``ASYNCFLOW_BROKER='kafka://127.0.0.1:9092?enable_idempotence=false'`` and
``AWS_ENDPOINT_URL=http://127.0.0.1:5000`` with dummy credentials.

Environment:

- ``ASYNCFLOW_BROKER``: ``kafka://host:port[?option=value&...]`` to read from Kafka
  (options: see ``adapters.kafka``); the replay then runs only with ``ASYNCFLOW_DEMO_LOAD=1``.
- ``SENSOR_TOPIC``: the input topic (default ``sensor-readings``).
- ``SENSOR_TABLE``: upsert into this DynamoDB table instead of printing. ``AWS_ENDPOINT_URL``
  (e.g. a local moto server), ``AWS_REGION`` and the usual AWS credential variables
  (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``...) select the service.
- ``SENSOR_FLUSH_INTERVAL``: seconds between DynamoDB batch writes (default 5).
- ``SENSOR_TIME_SCALE``: replay compression (default 86400; 1 = real time).
- ``SENSOR_REPLAY_LIMIT``: replay only the first N readings.
- ``ASYNCFLOW_DEMO_LOAD``: ``1`` to replay on a real broker, ``0`` to skip it on memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import asyncflow as af
from apps._support import (
    compressed_ms,
    demo_load_enabled,
    env,
    read_csv,
    utc_ms,
)

WINDOW = timedelta(seconds=5)
WAIT = timedelta(seconds=10)
DEFAULT_SCALE = 86_400
DATA_FILE = "sensor_readings.csv"
TOPIC = "sensor-readings"
DEFAULT_FLUSH_INTERVAL = 5.0


class Reading(af.Record):
    """One temperature reading; ``recorded_at`` is the original time of a time-compressed replay."""

    sensor_id: str
    temperature: float
    time: af.EventTime
    recorded_at: str | None = None


def replay_readings(
    scale: int = DEFAULT_SCALE, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """The readings of ``sensor_readings.csv`` in file order, as ``Reading`` JSON objects
    on the compressed timeline (``time`` in epoch seconds, ``recorded_at`` in UTC)."""
    anchor_ms: int | None = None
    for i, row in enumerate(read_csv(DATA_FILE)):
        if limit is not None and i >= limit:
            return
        ts = row["timestamp"]
        ms = utc_ms(ts)
        if anchor_ms is None:
            anchor_ms = ms
        yield {
            "sensor_id": row["sensor_id"],
            "temperature": float(row["temperature"]),
            "time": compressed_ms(ms, anchor_ms, scale) / 1000,
            "recorded_at": ts.replace(" ", "T") + "Z",
        }


def window_row(w: af.WindowResult) -> dict[str, Any]:
    """The item upserted for one (sensor, window) result."""
    agg = w.value
    row: dict[str, Any] = {
        "sensor_id": w.key,
        "window_start": w.start,
        "window_end": w.end,
        "average": agg["average"],
        "count": agg["count"],
        "first": agg["first"],
        "last": agg["last"],
    }
    if agg["recorded_from"] is not None:
        row["recorded_from"] = agg["recorded_from"]
        row["recorded_to"] = agg["recorded_to"]
    return row


def format_row(key: Any, row: dict[str, Any]) -> str:
    """One console line for a window result."""
    span = (
        f"recorded {row['recorded_from'][:16]} .. {row['recorded_to'][:16]}"
        if "recorded_from" in row
        else f"events {row['first']:%H:%M:%S.%f} .. {row['last']:%H:%M:%S.%f}"
    )
    return (
        f"{row['sensor_id']:<17} [{row['window_start']:%Y-%m-%d %H:%M:%S}, "
        f"{row['window_end']:%H:%M:%S})  n={row['count']:<5} avg={row['average']:7.2f}  {span}"
    )


def results_sink() -> af.Sink:
    """``DynamoDBSink`` on ``SENSOR_TABLE`` when set, else a console sink."""
    table = env("SENSOR_TABLE")
    if table:
        from adapters.dynamodb import DynamoDBSink

        return DynamoDBSink(
            table,
            key="sensor_id",
            endpoint_url=env("AWS_ENDPOINT_URL"),
            flush_interval=float(env("SENSOR_FLUSH_INTERVAL") or DEFAULT_FLUSH_INTERVAL),
        )
    return af.ConsoleSink(format_row, name="sensor-averages")


def make_app(
    *, sink: af.Sink | None = None, load: bool | None = None, limit: int | None = None
) -> af.App:
    """Build the app; ``sink`` replaces the results sink, ``load`` forces the replay on or off."""
    app = af.App("sensors")
    readings = app.topic(
        env("SENSOR_TOPIC") or TOPIC, value_type=Reading, key=lambda r: r.sensor_id
    )
    averages = app.sink(sink or results_sink())
    scale = int(env("SENSOR_TIME_SCALE") or DEFAULT_SCALE)
    max_rows = limit if limit is not None else int(env("SENSOR_REPLAY_LIMIT") or 0) or None

    @app.agent(readings, concurrency=4)
    async def average(stream: af.Stream[Reading]) -> None:
        """Average, count and first/last event time per sensor and 5 s window."""
        windows = stream.window(
            af.Tumbling(WINDOW),
            wait=WAIT,
            aggregate={
                "average": af.Mean("temperature"),
                "count": af.Count(),
                "first": af.First("time"),
                "last": af.Last("time"),
                "recorded_from": af.First("recorded_at"),
                "recorded_to": af.Last("recorded_at"),
            },
        )
        async for w in windows:
            await averages.send(w.key, window_row(w))

    @app.task
    async def replay() -> None:
        """Replay the sensor data set into ``sensor-readings`` (see the module docstring)."""
        if not demo_load_enabled(app, load):
            return
        for r in replay_readings(scale, max_rows):
            await readings.send(r["sensor_id"], r)
        await readings.end()

    return app


app = make_app()
