"""Readings by status: 1-minute hopping windows every 10 s, count and average temperature.

Readings ``{"id", "temperature", "status", "time"}`` (``status`` is ``OK``,
``WARNING`` or ``ERROR``) come from the Kinesis stream ``KINESIS_INPUT_STREAM``
or, by default, from the memory topic ``status-readings``. The input is keyed
by status at the channel level, so all readings of one status are in one
lane. Each status gets 60 s windows starting every 10 s in event time (each
reading is in 6 windows); the watermark waits 5 s for out-of-order readings
(``wait=5s``), later readings go to the dead-letter topic. Each window gives
its reading count and average temperature, sent keyed by status to the
Kinesis stream ``KINESIS_OUTPUT_STREAM`` (``adapters.kinesis.KinesisSink``)
or printed.

**Default replay.** Derived from the real NAB readings in
``apps/data/sensor_readings.csv`` (timestamps read as UTC); ``status_of``
gives the status:

- a reading is *out of band* when its temperature is outside its sensor's
  normal band, the 1st-99th percentile of that sensor's readings outside NAB's
  anomaly windows, rounded: ``office_ambient`` 61-78, ``machine_internal`` 55-103;
- ``ERROR``: out of band inside a labelled anomaly window (``in_anomaly_window``);
- ``WARNING``: inside an anomaly window but in band, or out of band outside one;
- ``OK``: otherwise.

As in ``apps.sensor_averages``, time is compressed by ``STATUS_TIME_SCALE``
(default 86,400: a day of readings lasts a second, so a window covers 60 days
and starts every 10 days); the run prints 88 lines and exits 0.

Run: ``asyncflow worker apps.status_windows:app``.

**On Kinesis**. Create the streams, then run the worker::

    aws kinesis create-stream --stream-name status-readings --shard-count 4
    aws kinesis create-stream --stream-name status-windows --shard-count 1
    KINESIS_INPUT_STREAM=status-readings KINESIS_OUTPUT_STREAM=status-windows \\
    AWS_REGION=us-east-1 ASYNCFLOW_DEMO_LOAD=1 asyncflow worker apps.status_windows:app

Each input record's data is a JSON ``StatusReading`` (``time`` in epoch seconds
or ISO-8601 with a zone); any partition key will do (the demo load uses the
status). Every shard is read from ``TRIM_HORIZON`` the first time; the
positions done are checkpointed in the DynamoDB table
``status-windows-kinesis-checkpoints`` (created if missing, at the same
endpoint), so a restart resumes there; several workers share the shards
through leases in that table (a killed worker's shards move to the others once
its leases expire, 10 s by default). Results go to
the output stream as JSON (``status``, ``window_start``, ``window_end``,
``count``, ``average_temperature``) with the status as partition key.
``ASYNCFLOW_DEMO_LOAD=1`` makes the worker put the derived readings into the
input stream itself; leave it out to process what producers put. A stream has
no end: a window is sent once the watermark (the lowest newest event time over
the shards, minus 5 s; a shard quiet for ``ASYNCFLOW_IDLE_TIMEOUT`` s is left
out) passes it, and the worker runs until SIGINT/SIGTERM (drain, flush,
checkpoint, exit 0). Late readings go to the broker's topic
``status-windows-dead-letters``: set ``ASYNCFLOW_BROKER=kafka://...`` to keep
them (on the default memory broker they are only counted, in the worker's
final log line). With the local moto server of ``apps/_support.py`` add
``AWS_ENDPOINT_URL=http://127.0.0.1:5000`` and dummy credentials.

Environment:

- ``KINESIS_INPUT_STREAM``: read readings from this stream (shards are partitions).
- ``KINESIS_OUTPUT_STREAM``: send window results to this stream instead of printing.
- ``AWS_ENDPOINT_URL`` (e.g. a local moto server), ``AWS_REGION`` and the usual AWS
  credential variables (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``...).
- ``ASYNCFLOW_DEMO_LOAD=1``: replay the derived readings into ``KINESIS_INPUT_STREAM``
  (or, with ``ASYNCFLOW_BROKER=kafka://...`` and no Kinesis input, into the
  ``status-readings`` topic).
- ``ASYNCFLOW_BROKER``: ``kafka://host:port[?option=value&...]`` for the dead letters, and
  for the input topic ``status-readings`` when ``KINESIS_INPUT_STREAM`` is not set.
- ``STATUS_TIME_SCALE`` (default 86400; 1 = real time), ``STATUS_REPLAY_LIMIT`` (first N rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any, Literal

import asyncflow as af
from apps._support import (
    compressed_ms,
    demo_load_enabled,
    env,
    read_csv,
    utc_ms,
)

SIZE = timedelta(seconds=60)
STEP = timedelta(seconds=10)
WAIT = timedelta(seconds=5)
INPUT = "status-readings"
DATA_FILE = "sensor_readings.csv"
DEFAULT_SCALE = 86_400
NORMAL_BANDS = {"office_ambient": (61.0, 78.0), "machine_internal": (55.0, 103.0)}
Status = Literal["OK", "WARNING", "ERROR"]


class StatusReading(af.Record):
    """One reading with the sensor's status."""

    id: str
    temperature: float
    status: Status
    time: af.EventTime


def status_of(sensor_id: str, temperature: float, in_anomaly_window: bool) -> Status:
    """The status of a reading (see the module docstring).

    Example:
        >>> status_of("office_ambient", 85.0, True), status_of("office_ambient", 85.0, False)
        ('ERROR', 'WARNING')
    """
    low, high = NORMAL_BANDS.get(sensor_id, (float("-inf"), float("inf")))
    out_of_band = not low <= temperature <= high
    if out_of_band and in_anomaly_window:
        return "ERROR"
    if out_of_band or in_anomaly_window:
        return "WARNING"
    return "OK"


def replay_readings(
    scale: int = DEFAULT_SCALE, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """``StatusReading`` JSON objects derived from ``sensor_readings.csv``, on the compressed timeline."""
    anchor_ms: int | None = None
    for i, row in enumerate(read_csv(DATA_FILE)):
        if limit is not None and i >= limit:
            return
        ms = utc_ms(row["timestamp"])
        if anchor_ms is None:
            anchor_ms = ms
        temperature = float(row["temperature"])
        yield {
            "id": row["sensor_id"],
            "temperature": temperature,
            "status": status_of(row["sensor_id"], temperature, row["in_anomaly_window"] == "true"),
            "time": compressed_ms(ms, anchor_ms, scale) / 1000,
        }


def window_row(w: af.WindowResult) -> dict[str, Any]:
    """The record sent for one (status, window) result."""
    return {
        "status": w.key,
        "window_start": w.start,
        "window_end": w.end,
        "count": w.value["count"],
        "average_temperature": w.value["average_temperature"],
    }


def format_row(key: Any, row: dict[str, Any]) -> str:
    """One console line for a window result."""
    return (
        f"{row['status']:<7} [{row['window_start']:%Y-%m-%d %H:%M:%S}, {row['window_end']:%H:%M:%S})"
        f"  n={row['count']:<6} avg={row['average_temperature']:7.2f}"
    )


def results_sink() -> af.Sink:
    """``KinesisSink`` on ``KINESIS_OUTPUT_STREAM`` when set, else a console sink."""
    stream = env("KINESIS_OUTPUT_STREAM")
    if stream:
        from adapters.kinesis import KinesisSink

        return KinesisSink(stream, endpoint_url=env("AWS_ENDPOINT_URL"))
    return af.ConsoleSink(format_row, name="status-console")


def make_app(
    *, sink: af.Sink | None = None, load: bool | None = None, limit: int | None = None
) -> af.App:
    """Build the app; ``sink`` replaces the results sink, ``load`` forces the replay on or off."""
    app = af.App("status-windows")
    kinesis_in = env("KINESIS_INPUT_STREAM")
    readings: af.Channel[StatusReading]
    demo_out: af.Output | None = None
    if kinesis_in:
        from adapters.kinesis import KinesisSink, KinesisSource

        endpoint = env("AWS_ENDPOINT_URL")
        source = KinesisSource(kinesis_in, app_name=app.id, name=INPUT, endpoint_url=endpoint)
        readings = app.source(source, name=INPUT, value_type=StatusReading, key=lambda r: r.status)
        if load or (load is None and env("ASYNCFLOW_DEMO_LOAD") == "1"):
            demo_out = app.sink(KinesisSink(kinesis_in, endpoint_url=endpoint, name="demo-load"))
    else:
        readings = demo_out = app.topic(INPUT, value_type=StatusReading, key=lambda r: r.status)
    results = app.sink(sink or results_sink())
    scale = int(env("STATUS_TIME_SCALE") or DEFAULT_SCALE)
    max_rows = limit if limit is not None else int(env("STATUS_REPLAY_LIMIT") or 0) or None

    @app.agent(readings, concurrency=3)
    async def by_status(stream: af.Stream[StatusReading]) -> None:
        """Count and average temperature per status and hopping window."""
        windows = stream.window(
            af.Hopping(SIZE, STEP),
            wait=WAIT,
            aggregate={"count": af.Count(), "average_temperature": af.Mean("temperature")},
        )
        async for w in windows:
            await results.send(w.key, window_row(w))

    @app.task
    async def replay() -> None:
        """Replay the derived readings into the input (see the module docstring)."""
        if demo_out is None or not demo_load_enabled(app, True if kinesis_in else load):
            return
        for r in replay_readings(scale, max_rows):
            await demo_out.send(r["status"], r)
        if isinstance(readings, af.Topic):
            await readings.end()

    return app


app = make_app()
