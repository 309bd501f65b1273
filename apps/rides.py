"""Ride-hailing trips: parse CSV lines, derive duration/speed/tip, enrich, send on.

Trips arrive on the topic ``rides`` as CSV lines in the columns of
``apps/data/rides_sample.csv`` (pickup, dropoff, passengers, distance, fare,
tip, tolls, total, color, payment, pickup_zone, dropoff_zone, pickup_borough,
dropoff_borough). The topic's codec parses each line into a typed ``Ride``
(``color`` is ``yellow``/``green``, ``payment`` ``credit card``/``cash`` or
empty; pickup and dropoff are New York local times and become zone-aware);
a malformed line (wrong field count, a bad number or time, an unknown color
or payment) goes with its raw bytes and the reason to the dead-letter topic
``rides-dead-letters``. Each ride is joined with its driver (``join_table``,
left join, as of the ride's pickup time) from the table kept from the topic
``drivers`` (JSON ``Driver`` updates keyed by driver id, ``apps/data/drivers.csv``;
the sample has no driver column, so a ride's driver is a hash of its pickup
time and zone, ``driver_of``; an update with ``active`` false removes the
driver). The agent (4 lanes, keyed by driver) transforms each ride (duration,
average speed, tip % of fare) and enriches it (borough pair, time-of-day
bucket, weekday, fare per mile, the driver's name, vehicle and rating at the
time of the ride), then sends an ``EnrichedRide`` to the topic
``rides-enriched``, keyed by driver id. Undefined ratios (a zero-second or
zero-mile trip) are ``null``; a ride whose driver is unknown or retired at
its pickup time has ``driver`` ``null``.

Run: ``asyncflow worker apps.rides:app``. By default (memory broker) a task
replays the 321 driver updates, then the 6,433 NYC TLC trips of March 2019,
sorted by pickup; the console
prints every 250th enriched ride (26 lines) and the total, then the worker exits 0.

**On Kafka**::

    ASYNCFLOW_BROKER=kafka://localhost:9092 ASYNCFLOW_DEMO_LOAD=1 asyncflow worker apps.rides:app

It consumes ``rides`` and ``drivers`` as the consumer group ``rides``: each
``rides`` record's value is one CSV line in the columns above, without a
header (keys are not used); each ``drivers`` record a JSON ``Driver``. Both
are forwarded, keyed by driver id, into the internal topic
``rides-ride-drivers-join`` (the join's state is in the changelog
``rides-ride-drivers-join-changelog``), so one driver's rides keep their
pickup order. A ride waits until event time has passed it (a later ride, or
2 s without one: ``system_wait``) before it is joined. Enriched rides go to
``rides-enriched`` as JSON ``EnrichedRide`` objects keyed by driver id;
malformed lines to ``rides-dead-letters`` (raw
bytes; the reason, source topic, partition and offset in the
``asyncflow.reason``/``.topic``/``.partition``/``.offset`` headers). Missing
topics are created with 1 partition. ``ASYNCFLOW_DEMO_LOAD=1`` makes the worker
replay the drivers into ``drivers`` and the sample into ``rides`` itself. The worker runs until SIGINT/SIGTERM
(drain, flush, commit, exit 0). On the local Tansu broker of ``apps/_support.py``
use ``ASYNCFLOW_BROKER='kafka://127.0.0.1:9092?enable_idempotence=false'``.

Environment:

- ``ASYNCFLOW_BROKER``: ``kafka://host:port[?option=value&...]`` for the real topics (the
  replay then runs only with ``ASYNCFLOW_DEMO_LOAD=1``; ``0`` skips it on memory).
- ``RIDES_PRINT_EVERY``: print every N-th ride (default 250; 1 prints all).
"""

from __future__ import annotations

import csv
import zlib
from datetime import datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import asyncflow as af
from apps._support import DATA, demo_load_enabled, env
from asyncflow.joins import join_table

DATA_FILE = "rides_sample.csv"
DRIVERS_FILE = "drivers.csv"
DRIVERS = 150
"""How many drivers the rides are shared among (``D000`` to ``D149``)."""
NYC = ZoneInfo("America/New_York")
COLUMNS = (
    "pickup",
    "dropoff",
    "passengers",
    "distance",
    "fare",
    "tip",
    "tolls",
    "total",
    "color",
    "payment",
    "pickup_zone",
    "dropoff_zone",
    "pickup_borough",
    "dropoff_borough",
)


class Ride(af.Record):
    """One trip as the topic carries it."""

    pickup: af.EventTime
    dropoff: datetime
    passengers: int
    distance: float
    fare: float
    tip: float
    tolls: float
    total: float
    color: Literal["yellow", "green"]
    payment: Literal["credit card", "cash"] | None
    pickup_zone: str | None
    dropoff_zone: str | None
    pickup_borough: str | None
    dropoff_borough: str | None


class Driver(af.Record):
    """One update of a driver (the ``drivers`` topic): the latest one is the driver's row."""

    driver_id: str
    updated: af.EventTime
    name: str
    vehicle: str
    rating: float
    active: bool


class EnrichedRide(af.Record):
    """A trip with what the pipeline derived from it, and its driver at pickup time."""

    ride: Ride
    driver_id: str
    driver: Driver | None
    duration_min: float
    speed_mph: float | None
    tip_pct: float | None
    borough_pair: str
    time_of_day: Literal["night", "morning rush", "midday", "evening rush", "evening"]
    weekday: str
    fare_per_mile: float | None


_CONVERT: dict[str, Any] = {
    "passengers": int,
    "distance": float,
    "fare": float,
    "tip": float,
    "tolls": float,
    "total": float,
}


def local_time(text: str) -> datetime:
    """A ``YYYY-MM-DD HH:MM:SS`` New York local time as an aware datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=NYC)


class RideCsvCodec:
    """CSV lines to ``Ride`` records; anything malformed is a ``DecodeError`` (a dead letter).

    Example:
        >>> RideCsvCodec().decode(b"2019-03-01 08:00:00,oops").__class__
        Traceback (most recent call last):
        ...
        asyncflow.errors.DecodeError: expected 14 CSV fields, got 2
    """

    def decode(self, data: bytes) -> Ride:
        """Parse and check one line."""
        try:
            fields = next(csv.reader([data.decode("utf-8")]))
        except (UnicodeDecodeError, csv.Error, StopIteration) as exc:
            raise af.DecodeError(f"not a CSV line: {exc}") from None
        if len(fields) != len(COLUMNS):
            raise af.DecodeError(f"expected {len(COLUMNS)} CSV fields, got {len(fields)}")
        obj: dict[str, Any] = {}
        for name, text in zip(COLUMNS, fields, strict=True):
            try:
                if name in ("pickup", "dropoff"):
                    obj[name] = local_time(text)
                elif name in _CONVERT:
                    obj[name] = _CONVERT[name](text)
                else:
                    obj[name] = text or None
            except ValueError:
                raise af.DecodeError(f"field {name!r}: cannot read {text!r:.40}") from None
        return Ride.decode_obj(obj)

    def encode(self, value: str | Ride) -> bytes:
        """A line is produced as it is (the replay sends the file's lines); a ``Ride`` as its line."""
        if isinstance(value, str):
            return value.encode()
        return ride_line(value).encode()


def ride_line(ride: Ride) -> str:
    """The CSV line of a ride (what ``RideCsvCodec`` reads back to the same ``Ride``)."""
    fields: list[str] = []
    for name in COLUMNS:
        v = getattr(ride, name)
        if isinstance(v, datetime):
            fields.append(f"{v.astimezone(NYC):%Y-%m-%d %H:%M:%S}")
        else:
            fields.append("" if v is None else str(v))
    out: list[str] = []
    writer = csv.writer(_Lines(out), lineterminator="")
    writer.writerow(fields)
    return out[0]


class _Lines:
    def __init__(self, out: list[str]) -> None:
        self.write = out.append


def driver_of(ride: Ride) -> str:
    """The driver of a trip: the sample has none, so a hash of its pickup time and zone.

    Example:
        >>> ride = RideCsvCodec().decode(b"2019-03-23 20:21:09,2019-03-23 20:27:24,1,1.6,7.0,"
        ...                              b"2.15,0.0,12.95,yellow,credit card,Lenox Hill West,"
        ...                              b"UN/Turtle Bay South,Manhattan,Manhattan")
        >>> driver_of(ride)
        'D017'
    """
    text = f"{ride.pickup.astimezone(NYC):%Y-%m-%d %H:%M:%S}|{ride.pickup_zone or ''}"
    return f"D{zlib.crc32(text.encode()) % DRIVERS:03d}"


def read_drivers() -> list[Driver]:
    """The driver updates of ``apps/data/drivers.csv``, in update order (New York times)."""
    with (DATA / DRIVERS_FILE).open(newline="", encoding="utf-8") as f:
        return [
            Driver(
                driver_id=row["driver_id"],
                updated=local_time(row["updated"]),
                name=row["name"],
                vehicle=row["vehicle"],
                rating=float(row["rating"]),
                active=row["active"] == "true",
            )
            for row in csv.DictReader(f)
        ]


def time_of_day(hour: int) -> Literal["night", "morning rush", "midday", "evening rush", "evening"]:
    """The bucket of a local pickup hour: night 0-5, morning rush 6-9, midday 10-15,
    evening rush 16-19, evening 20-23."""
    if hour < 6:
        return "night"
    if hour < 10:
        return "morning rush"
    if hour < 16:
        return "midday"
    if hour < 20:
        return "evening rush"
    return "evening"


def enrich(ride: Ride, driver: Driver | None = None) -> EnrichedRide:
    """Transform (duration, speed, tip %) and enrich (borough pair, bucket, fare per mile, driver)."""
    seconds = ride.dropoff.timestamp() - ride.pickup.timestamp()  # right across DST changes
    return EnrichedRide(
        ride=ride,
        driver_id=driver_of(ride),
        driver=driver,
        duration_min=round(seconds / 60, 2),
        speed_mph=round(ride.distance / (seconds / 3600), 2) if seconds > 0 else None,
        tip_pct=round(100 * ride.tip / ride.fare, 1) if ride.fare > 0 else None,
        borough_pair=f"{ride.pickup_borough or '?'} -> {ride.dropoff_borough or '?'}",
        time_of_day=time_of_day(ride.pickup.hour),
        weekday=ride.pickup.strftime("%A"),
        fare_per_mile=round(ride.fare / ride.distance, 2) if ride.distance > 0 else None,
    )


def format_ride(key: Any, e: EnrichedRide) -> str:
    """One console line for an enriched ride."""
    r = e.ride
    speed = f"{e.speed_mph:5.1f} mph" if e.speed_mph is not None else "    - mph"
    tip = f"{e.tip_pct:5.1f}%" if e.tip_pct is not None else "    -"
    d = e.driver
    who = f"{d.name} ({d.vehicle}, {d.rating:.2f})" if d is not None else "no driver on record"
    return (
        f"{r.pickup:%a %m-%d %H:%M} {r.color:<6} {e.time_of_day:<12} {e.borough_pair:<26} "
        f"{r.distance:5.2f} mi {e.duration_min:6.1f} min {speed}  ${r.fare:6.2f} tip {tip}  "
        f"{e.driver_id} {who}"
    )


def sorted_lines() -> list[str]:
    """The data set's trip lines, sorted by pickup (the file is a random sample)."""
    with (DATA / DATA_FILE).open(encoding="utf-8") as f:
        lines = f.read().splitlines()[1:]
    return sorted(lines, key=lambda line: line[:19])


def make_app(
    *,
    echo: af.Sink | None = None,
    load: bool | None = None,
    limit: int | None = None,
    prefix: str = "",
) -> af.App:
    """Build the app; ``echo`` replaces the console sink, ``limit`` shortens the replay.

    ``prefix`` goes before the app id and every topic name (tests that share a broker).
    """
    app = af.App(f"{prefix}rides")
    rides = app.topic(f"{prefix}rides", value_type=Ride, codec=RideCsvCodec(), key=driver_of)
    drivers = app.topic(f"{prefix}drivers", value_type=Driver, key=lambda d: d.driver_id)
    ride_drivers = join_table(
        rides,
        drivers,
        name="ride-drivers",
        how="left",
        deleted=lambda d: not d.active,
        wait=timedelta(seconds=30),
        system_wait=timedelta(seconds=2),
    )
    enriched = app.topic(f"{prefix}rides-enriched", value_type=EnrichedRide)
    every = int(env("RIDES_PRINT_EVERY") or 250)
    console = app.sink(echo or af.ConsoleSink(format_ride, name="rides-console", every=every))

    @app.agent(ride_drivers.topic, concurrency=4)
    async def transform(stream: af.Stream[Any]) -> None:
        """Join each ride with its driver, derive and enrich, send it to ``rides-enriched``."""
        async for joined in ride_drivers.joined(stream):
            out = enrich(joined.left, joined.right)
            await enriched.send(out.driver_id, out)
            await console.send(out.driver_id, out)

    @app.task
    async def replay() -> None:
        """Replay the driver updates into ``drivers``, then the trips, sorted by pickup, into ``rides``."""
        if not demo_load_enabled(app, load):
            return
        for d in read_drivers():
            await drivers.send(d.driver_id, d)
        await drivers.end()
        for line in sorted_lines()[:limit]:
            await rides.send(None, line)
        await rides.end()

    return app


app = make_app()
