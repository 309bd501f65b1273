"""apps.ip_enrichment's HTTP mode against a local ip-api-like service (aiohttp on loopback).

The service (``GeoServer``) answers ``GET /json/{ip}`` in ip-api.com's format
after a chosen latency, and fails the requests a test tells it to: HTTP 500,
answers slower than any time-out, 404, unreadable bodies, ``"fail"`` answers.
It counts the requests per address and the most it had in flight at once.
The app runs through ``TestRun`` on the memory broker. No test measures a
time: they check counts, order, reasons and bounds.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

import asyncflow as af
from apps.ip_enrichment import (
    GeoLookup,
    HttpGeoLookup,
    IpLocation,
    LookupSettings,
    lookup_from_env,
    make_app,
)
from asyncflow.testing import CaptureSink, TestRun, reason_of

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "apps" / "data" / "ip_address_w_country.txt"
ASYNCFLOW = Path(sys.executable).parent / "asyncflow"
IN, OUT = "ip-addresses", "ip-locations"
APP_VARIABLES = (
    "ASYNCFLOW_BROKER",
    "ASYNCFLOW_DEMO_LOAD",
    "IP_LANES",
    "IP_GEO_URL",
    "IP_GEO_DB",
    "IP_LOOKUP_CONCURRENCY",
    "IP_LOOKUP_IN_FLIGHT",
    "IP_LOOKUP_TIMEOUT",
    "IP_LOOKUP_RETRIES",
    "IP_LOOKUP_CACHE",
)


@pytest.fixture(autouse=True)
def plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in APP_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def where(ip: str) -> dict[str, Any]:
    """The location the service gives ``ip`` (made up from the address, so tests can check it)."""
    n = sum(int(part) for part in ip.split(".")) if "." in ip else 7
    return {
        "country": f"Country {ip}",
        "countryCode": "C" + chr(ord("A") + n % 26),
        "regionName": f"Region {n % 5}",
        "city": f"City {ip}",
        "lat": float(n % 90),
        "lon": -float(n % 180),
    }


def expected(ip: str, input_country: str | None) -> IpLocation:
    w = where(ip)
    return IpLocation(
        ip,
        w["country"],
        w["countryCode"],
        w["regionName"],
        w["city"],
        w["lat"],
        w["lon"],
        input_country,
        "http",
    )


class GeoServer:
    """An ip-api-like service on loopback: latency, scripted failures, requests counted.

    ``answers[ip]`` is what successive requests for ``ip`` get (the last one
    repeats): ``"ok"``, ``"500"``, ``"404"``, ``"slow"`` (no answer until the
    server stops), ``"garbage"`` (an HTML page), ``"fail"`` (ip-api's
    ``{"status": "fail"}``). ``latency`` is seconds, or a function of the address.
    """

    def __init__(self) -> None:
        self.latency: float | Callable[[str], float] = 0.02
        self.answers: dict[str, list[str]] = {}
        self.requests: Counter[str] = Counter()
        self.in_flight = 0
        self.peak = 0
        self.stopping = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/json/{ip}", self.handle)
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/json/{{ip}}"

    async def stop(self) -> None:
        self.stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def total(self) -> int:
        return sum(self.requests.values())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ip = request.match_info["ip"]
        script = self.answers.get(ip, ["ok"])
        answer = script[min(self.requests[ip], len(script) - 1)]
        self.requests[ip] += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if answer == "slow":
                await self.stopping.wait()  # past any time-out: the client gives up first
            latency = self.latency(ip) if callable(self.latency) else self.latency
            await asyncio.sleep(latency)
            if answer == "500":
                return web.Response(status=500, text="boom")
            if answer == "404":
                return web.Response(status=404, text="no such endpoint")
            if answer == "garbage":
                return web.Response(text="<html>maintenance</html>", content_type="text/html")
            if answer == "fail":
                body = {"status": "fail", "message": "reserved range", "query": ip}
            else:
                body = {"status": "success", **where(ip), "query": ip}
            return web.Response(body=orjson.dumps(body), content_type="application/json")
        finally:
            self.in_flight -= 1


@pytest.fixture
async def server() -> AsyncIterator[GeoServer]:
    geo = GeoServer()
    await geo.start()
    try:
        yield geo
    finally:
        await geo.stop()


def settings(**changes: Any) -> LookupSettings:
    """Test settings: generous time-out, quick retries, no cache unless asked."""
    base: dict[str, Any] = {
        "in_flight": 10,
        "timeout": 5.0,
        "retries": 2,
        "backoff": 0.01,
        "cache": 0,
    }
    base.update(changes)
    return LookupSettings(**base)


def http_app(
    server: GeoServer, *, lanes: int = 4, load: bool = False, **changes: Any
) -> tuple[af.App, HttpGeoLookup]:
    cfg = settings(**changes)
    lookup = HttpGeoLookup(server.url, connections=cfg.in_flight)
    app = make_app(echo=CaptureSink(), lookup=lookup, load=load, lanes=lanes, settings=cfg)
    return app, lookup


async def run_lines(app: af.App, lines: list[str] | None = None) -> TestRun:
    """Run ``app`` over ``lines``, or, with ``None``, over its own replay until it stops."""
    async with TestRun(app) as run:
        if lines is None:
            await run.wait_stopped(30)
            return run
        for line in lines:
            run.send_raw(IN, line.encode(), key=line.partition(",")[0].encode())
        await run.finish()
    return run


def by_address(locations: list[IpLocation]) -> dict[str, list[str | None]]:
    out: dict[str, list[str | None]] = defaultdict(list)
    for loc in locations:
        out[loc.ip].append(loc.input_country)
    return dict(out)


def dead_letters_of(run: TestRun) -> dict[bytes | None, str]:
    return {d.value: reason_of(d) for d in run.dead_letters()}


async def test_every_line_is_located_by_the_service_in_per_address_order(
    server: GeoServer,
) -> None:
    rng = random.Random(14)
    server.latency = lambda ip: rng.uniform(0.0, 0.03)  # later lines often answer first
    ips = [f"8.8.{i}.{i * 7 % 250}" for i in range(10)]
    lines = [f"{ip},{ip}#{n}" for n in range(6) for ip in ips]
    app, _ = http_app(server, lanes=4, in_flight=16)
    run = await run_lines(app, lines)

    assert run.dead_letters() == []
    out = run.outputs(OUT)
    assert len(out) == 60
    assert by_address(out) == {ip: [f"{ip}#{n}" for n in range(6)] for ip in ips}
    assert all(loc == expected(loc.ip, loc.input_country) for loc in out)
    assert server.requests == Counter({ip: 6 for ip in ips})


async def test_the_demo_replay_through_the_service_locates_all_70_addresses(
    server: GeoServer,
) -> None:
    app, _ = http_app(server, load=True, lanes=8)
    run = await run_lines(app)

    _header, *lines = DATA.read_text(encoding="utf-8").splitlines()
    out = run.outputs(OUT)
    assert sorted((loc.ip, loc.input_country) for loc in out) == sorted(
        tuple(line.split(",")) for line in lines
    )
    assert all(loc == expected(loc.ip, loc.input_country) for loc in out)
    [dead] = run.dead_letters()
    assert reason_of(dead) == "not an IP address: 'IP Address'"
    assert server.total() == 70


async def test_server_errors_and_slow_answers_are_retried_until_answered(
    server: GeoServer,
) -> None:
    server.answers = {
        "8.8.8.1": ["500", "500", "ok"],
        "8.8.8.2": ["slow", "ok"],
        "8.8.8.3": ["500", "slow", "ok"],
        "8.8.8.4": ["ok"],
    }
    app, _ = http_app(server, retries=2, timeout=0.5)
    run = await run_lines(app, [f"{ip},US" for ip in server.answers])

    assert run.dead_letters() == []
    assert sorted(loc.ip for loc in run.outputs(OUT)) == sorted(server.answers)
    assert all(loc == expected(loc.ip, "US") for loc in run.outputs(OUT))
    assert server.requests == Counter({"8.8.8.1": 3, "8.8.8.2": 2, "8.8.8.3": 3, "8.8.8.4": 1})
    assert app.metrics.get("lookup_retries") == 5
    assert app.metrics.get("lookup_timeouts") == 2


async def test_lookups_failing_past_the_retries_are_dead_letters_with_the_reason(
    server: GeoServer,
) -> None:
    server.answers = {"8.8.8.1": ["500"], "8.8.8.2": ["slow"]}
    lines = ["8.8.8.1,first", "8.8.8.2,US", "9.9.9.9,before", "8.8.8.1,second", "9.9.9.9,after"]
    app, _ = http_app(server, retries=2, timeout=0.5)
    run = await run_lines(app, lines)

    url = server.url.replace("{ip}", "8.8.8.1")
    reason = f"lookup failed: GeoServiceUnavailable: HTTP 500 Internal Server Error from {url}"
    assert dead_letters_of(run) == {
        b"8.8.8.1,first": reason,
        b"8.8.8.1,second": reason,
        b"8.8.8.2,US": "lookup failed: TimeoutError: no answer within 0.5s (3 attempts)",
    }
    assert server.requests["8.8.8.1"] == 6  # each line: the first attempt and two retries
    assert server.requests["8.8.8.2"] == 3
    assert by_address(run.outputs(OUT)) == {"9.9.9.9": ["before", "after"]}  # the rest goes on
    headers = dict(run.dead_letters()[0].headers)
    assert headers["asyncflow.topic"] == IN.encode()


async def test_client_errors_and_unreadable_answers_are_dead_letters_without_retries(
    server: GeoServer,
) -> None:
    server.answers = {"8.8.8.1": ["404"], "8.8.8.2": ["garbage"]}
    app, _ = http_app(server, retries=3)
    run = await run_lines(app, ["8.8.8.1,US", "8.8.8.2,US", "8.8.8.3,US"])

    url = server.url.replace("{ip}", "8.8.8.1")
    assert dead_letters_of(run) == {
        b"8.8.8.1,US": f"lookup failed: GeoServiceRefused: HTTP 404 Not Found from {url}",
        b"8.8.8.2,US": "lookup failed: GeoServiceRefused: not JSON from "
        f"{server.url.replace('{ip}', '8.8.8.2')}: b'<html>maintenance</html>'",
    }
    assert server.requests == Counter({"8.8.8.1": 1, "8.8.8.2": 1, "8.8.8.3": 1})
    assert [loc.ip for loc in run.outputs(OUT)] == ["8.8.8.3"]


async def test_fail_answers_and_private_addresses_give_null_locations(server: GeoServer) -> None:
    server.answers = {"8.8.8.1": ["fail"]}
    lines = ["8.8.8.1,Reserved", "10.0.0.1,Intranet", "192.168.1.7,", "2001:db8::1,Docs"]
    app, _ = http_app(server)
    run = await run_lines(app, lines)

    assert run.dead_letters() == []
    out = {loc.ip: loc for loc in run.outputs(OUT)}
    assert out == {
        "8.8.8.1": IpLocation("8.8.8.1", None, None, None, None, None, None, "Reserved", None),
        "10.0.0.1": IpLocation("10.0.0.1", None, None, None, None, None, None, "Intranet", None),
        "192.168.1.7": IpLocation("192.168.1.7", None, None, None, None, None, None, None, None),
        "2001:db8::1": IpLocation("2001:db8::1", None, None, None, None, None, None, "Docs", None),
    }
    assert server.requests == Counter({"8.8.8.1": 1})  # private addresses: no request


@pytest.mark.parametrize("lanes", [1, 4])
async def test_the_service_never_has_more_requests_in_flight_than_configured(
    server: GeoServer, lanes: int
) -> None:
    lines = [f"8.8.{i}.1,US" for i in range(60)]
    app, _ = http_app(server, lanes=lanes, in_flight=3)
    run = await run_lines(app, lines)

    assert len(run.outputs(OUT)) == 60
    assert server.total() == 60
    assert server.peak == 3  # lookups waited for each other at the bound, and used it


@pytest.mark.parametrize(("cache", "requests"), [(100, 5), (0, 40)])
async def test_repeated_addresses_are_answered_from_the_cache(
    server: GeoServer, cache: int, requests: int
) -> None:
    ips = [f"8.8.8.{i}" for i in range(1, 6)]
    lines = [f"{ip},US" for _ in range(8) for ip in ips]
    app, _ = http_app(server, cache=cache)
    run = await run_lines(app, lines)

    assert by_address(run.outputs(OUT)) == {ip: ["US"] * 8 for ip in ips}
    assert server.total() == requests
    if cache:  # a repeat while the first is in flight shares its request; later ones hit
        assert server.requests == Counter({ip: 1 for ip in ips})
        assert app.metrics.get("lookup_cache_hits") == 35


async def test_a_cached_answer_is_for_its_whole_line_not_only_the_address(
    server: GeoServer,
) -> None:
    lines = ["8.8.8.8,United States", "8.8.8.8,USA", "8.8.8.8,United States"]
    app, _ = http_app(server, cache=100, lanes=1)
    run = await run_lines(app, lines)

    assert [loc.input_country for loc in run.outputs(OUT)] == [
        "United States",
        "USA",
        "United States",
    ]
    assert server.requests == Counter({"8.8.8.8": 2})


async def test_one_session_is_opened_by_the_first_lookup_and_closed_when_the_worker_stops(
    server: GeoServer,
) -> None:
    app, lookup = http_app(server, lanes=4)
    assert lookup.sessions_opened == 0  # nothing opened by building the app
    async with TestRun(app) as run:
        for i in range(20):
            run.send_raw(IN, f"8.8.{i}.1,US".encode())
        await run.finish()
    assert len(run.outputs(OUT)) == 20
    assert lookup.sessions_opened == 1  # shared by the four lanes
    assert not lookup.is_open


async def test_the_environment_chooses_the_http_mode_and_its_settings(
    server: GeoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert lookup_from_env()[1] == LookupSettings(in_flight=4, timeout=None, retries=0)
    assert isinstance(lookup_from_env()[0], GeoLookup)

    monkeypatch.setenv("IP_GEO_URL", server.url)
    lookup, cfg = lookup_from_env()
    assert isinstance(lookup, HttpGeoLookup) and lookup.url == server.url
    assert cfg == LookupSettings(in_flight=10, timeout=2.0, retries=2, cache=10_000)

    for name, value in [
        ("IP_LOOKUP_IN_FLIGHT", "2"),
        ("IP_LOOKUP_TIMEOUT", "1.5"),
        ("IP_LOOKUP_RETRIES", "1"),
        ("IP_LOOKUP_CACHE", "0"),
        ("IP_LANES", "3"),
    ]:
        monkeypatch.setenv(name, value)
    assert lookup_from_env()[1] == LookupSettings(in_flight=2, timeout=1.5, retries=1, cache=0)
    app = make_app(echo=CaptureSink(), load=False)
    assert app.agents["enrich"].concurrency == 3
    run = await run_lines(app, [f"8.8.{i}.1,US" for i in range(30)] * 2)
    assert len(run.outputs(OUT)) == 60
    assert server.total() == 60  # no cache
    assert server.peak == 2


def test_the_former_name_of_the_in_flight_bound_is_still_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IP_LOOKUP_CONCURRENCY", "6")
    assert lookup_from_env()[1].in_flight == 6
    monkeypatch.setenv("IP_LOOKUP_IN_FLIGHT", "5")
    assert lookup_from_env()[1].in_flight == 5


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "IP_LOOKUP_TIMEOUT",
            "soon",
            "IP_LOOKUP_TIMEOUT='soon' is not allowed; use a number of seconds > 0 (0 for none)",
        ),
        (
            "IP_LOOKUP_TIMEOUT",
            "-1",
            "IP_LOOKUP_TIMEOUT='-1' is not allowed; use a number of seconds > 0 (0 for none)",
        ),
        ("IP_LOOKUP_RETRIES", "-1", "IP_LOOKUP_RETRIES='-1' is not allowed; use an integer >= 0"),
        ("IP_LOOKUP_IN_FLIGHT", "0", "IP_LOOKUP_IN_FLIGHT='0' is not allowed; use an integer >= 1"),
        ("IP_LOOKUP_CACHE", "lots", "IP_LOOKUP_CACHE='lots' is not allowed; use an integer >= 0"),
        ("IP_LANES", "2.5", "IP_LANES='2.5' is not allowed; use an integer >= 1"),
        (
            "IP_GEO_URL",
            "ftp://geo/{ip}",
            "IP_GEO_URL='ftp://geo/{ip}' is not an http(s) URL "
            "with a host; use e.g. http://ip-api.com/json/{ip}",
        ),
        (
            "IP_GEO_URL",
            "http://geo:port/{ip}",
            "IP_GEO_URL='http://geo:port/{ip}' is not an "
            "http(s) URL with a host; use e.g. http://ip-api.com/json/{ip}",
        ),
        (
            "IP_GEO_URL",
            "http://geo/json",
            "IP_GEO_URL='http://geo/json' has no {ip} where the "
            "address goes; use e.g. http://ip-api.com/json/{ip}",
        ),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(af.ConfigError) as raised:
        make_app(echo=CaptureSink(), load=False)
    assert str(raised.value) == message


def test_the_service_and_the_database_are_not_both_chosen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IP_GEO_URL", "http://geo/json/{ip}")
    monkeypatch.setenv("IP_GEO_DB", "/tmp/city.mmdb")
    with pytest.raises(af.ConfigError, match="IP_GEO_URL and IP_GEO_DB are both set"):
        make_app(echo=CaptureSink(), load=False)


def test_a_secret_in_the_url_stays_out_of_error_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IP_GEO_URL", "https://pro.ip-api.com/json/?key=s3cret")
    with pytest.raises(af.ConfigError) as raised:
        make_app(echo=CaptureSink(), load=False)
    assert "s3cret" not in str(raised.value)
    assert "key=***" in str(raised.value)


def worker_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCFLOW_", "IP_"))}
    env.update(settings, PYTHONUNBUFFERED="1")
    return env


async def test_the_worker_command_runs_the_http_mode_to_the_end(server: GeoServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(ASYNCFLOW),
        "worker",
        "apps.ip_enrichment:app",
        cwd=ROOT,
        env=worker_env(IP_GEO_URL=server.url, IP_LOOKUP_IN_FLIGHT="5"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 70  # no DB-IP credit: the database is not used
    assert all(line.endswith("source: http]") for line in lines)
    assert server.total() == 70
    assert server.peak <= 5


async def test_the_worker_command_names_a_bad_setting_in_one_line() -> None:
    proc = await asyncio.create_subprocess_exec(
        str(ASYNCFLOW),
        "worker",
        "apps.ip_enrichment:app",
        cwd=ROOT,
        env=worker_env(IP_GEO_URL="http://127.0.0.1:9/json/{ip}", IP_LOOKUP_TIMEOUT="soon"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert err.decode().splitlines() == [
        "asyncflow: error: IP_LOOKUP_TIMEOUT='soon' is not allowed; use a number of seconds > 0 "
        "(0 for none)"
    ]
