"""Nexmark q0, q1, q2, q3, q5, q7 and q8: asyncflow apps beside hand-written loops, on memory and Kafka.

The workload is the Nexmark auction stream as the reference generators make it (Beam's and
``nexmark/nexmark``'s ``NexmarkGenerator``): persons, auctions and bids in the proportions 1:3:46,
ids from 1000, event time advancing with the event number (``--rate`` events per second of event
time, 10,000 by default, from a fixed base time), 50% of the bids on the current hot auction (the
first id of the current block of 100), the others on one of the last ~110, 75% by a hot bidder,
prices log-uniform in [1 $, 1,000,000 $], channels/URLs 50% one of four hot ones, and ``extra``
padding so that events average 200/500/100 bytes of fields. Deterministic from ``--seed`` (one
``random.Random``; the reference seeds one per event). Fields: person ``id, name, email_address,
credit_card, city, state, date_time, extra``; auction ``id, item_name, description, initial_bid,
reserve, date_time, expires, seller, category, extra``; bid ``auction, bidder, price, channel, url,
date_time, extra``; ``date_time`` and ``expires`` are epoch milliseconds.

Events are JSON (orjson) in **one topic with a ``type`` discriminator** (``"person"``,
``"auction"``, ``"bid"``), like the single event stream of Flink's Nexmark source: the events/s
count every event read, as Flink's published rates do; the stream stays in event-time order across
kinds; and a query that joins kinds later reads one partition's consistent event time. A query
reads it as dicts and starts with ``stream.filter(is_bid)``.

The topic has **one partition, and every agent one lane**: asyncflow windows are per key and per
source partition (a key's windows follow its own partition's watermark), and there is no window
over all keys (Flink's ``windowAll``). q5's "auction with the most bids per window" and q7's
"highest bid per window" are aggregates over every bid of a window, so they are written as one
window over a single key with a custom aggregate, which is exact only when all bids come through
one partition and one lane. On two cores and one Python process, more lanes add no parallelism.

Queries (Flink's Nexmark SQL; q3 and q8 are joins, through ``asyncflow.joins``):

- ``q0`` pass-through: every bid as ``auction, bidder, price, date_time, extra``.
- ``q1`` currency conversion: the same with ``price * 0.908`` (dollars to euros).
- ``q2`` selection: ``auction, price`` of the bids with ``auction % 123 == 0``.
- ``q3`` local item suggestion: auctions of category 10 joined with their seller, a person of
  Oregon, Idaho or California: ``name, city, state, id`` (the auction's). A stream–table join
  (``join_table``, inner, as of event time) with the topic as both sides: auctions (``where``
  category 10) the stream, persons (``where`` one of the states) the table keyed by id; each
  auction gets its seller as of the auction's time. Flink's q3 is a regular join that also matches
  a seller created after the auction; here, as in a temporal join, such an auction has no seller
  yet (the generator's few sellers "not created yet"). The hand loop: a dict of persons, each
  millisecond's auctions looked up once the stream has moved past that millisecond.
- ``q8`` monitor new users: the persons who opened an auction in the 10 s tumbling window in
  which they were created: ``id, name, starttime``. An interval join (``interval_join``, bounds
  ±9,999 ms) keyed by ``(person id, window start)`` and ``(seller, window start)``, so a pair is
  in one window; the agent keeps one result per key (a table of keys done, ``stream.state``),
  as Flink's query groups the auctions by seller and window first. The hand loop: per window, a
  dict of persons and a set of sellers, closed as the watermark passes.
- ``q5`` hot items: hopping windows of 10 s every 2 s (Flink's sizes, not scaled: 100,000 events a
  window at the default rate) over all bids, ``af.fold`` counting bids per auction; each window
  emits the auction(s) with the highest count (ties: all of them) with the count.
- ``q7`` highest bid: tumbling 10 s windows, a custom ``Aggregate`` keeping the highest price and
  its bids; each window emits those bids.

Watermarks wait 4 s behind the event-time frontier, as Flink's Nexmark DDL (``dateTime - INTERVAL
'4' SECOND``); with ``wait=0``, bids of the frontier's millisecond that a fetch leaves for the
next one would be late. The stream ends with one ``end_of_stream`` record 60 s of event time
after the last event (no query's event, not counted in ``--events``): it closes every window on
any broker, since a Kafka topic never ends. The event time is read from ``date_time`` (``time=``
on the topic).

The baseline of each query is the best plain-Python loop over the same raw JSON: ``orjson.loads``,
the same logic inline, a dict of open windows closed as the same watermark passes, outputs encoded
with ``orjson.dumps``. On the memory broker it runs over the records the broker holds and appends
its outputs to a list, and the app (``asyncflow.memory.MemoryBroker``, as in
``memory_pipeline.py``) writes to a memory topic; both are timed from start to end (the app's
start-up and shutdown included). On Kafka (a Tansu broker started here through
``tests/integration/kafka/broker.py`` as ``kafka_throughput.py`` does, or ``--bootstrap``) the
baseline is an aiokafka loop like ``kafka_throughput.py``'s: ``getmany``, the same logic, outputs
produced with the batch API, offsets committed once they are acknowledged; the app writes to a
Kafka topic; both are timed from the first record read (the group join excluded) to the last
output acknowledged. Output goes to a topic, not Flink's blackhole sink, so that it can be checked:
each run's outputs must equal the baseline's as a multiset of JSON documents, or the script stops
with the difference; a late or dead-lettered event fails the run too.

Each (query, broker) case runs in its own process, so its peak RSS is its own: app and baseline
run in it, alternately (the app first), ``--repeat`` times, the best time of each counting;
``peak MB`` is the process's peak when the app first finished (before any check or hand loop; the
input included), ``input MB`` the RSS with the input loaded (on Kafka: the bare process). On a
shared machine only the ratio (asyncflow events/s over hand-loop events/s) compares. For scale,
Flink's published Nexmark throughput per core (events/s of all kinds): q0 155k, q1 158k, q2 175k,
q3 109k, q5 22.1k, q7 12.3k, q8 146k.

Usage:
    .venv/bin/python benchmarks/nexmark.py                       # both brokers, all queries
    .venv/bin/python benchmarks/nexmark.py --broker memory --events 500000 --queries q0,q5
    .venv/bin/python benchmarks/nexmark.py --broker kafka --bootstrap 127.0.0.1:9092 --json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncflow as af  # noqa: E402
from asyncflow.joins import interval_join, join_table  # noqa: E402
from asyncflow.memory import MemoryBroker  # noqa: E402
from asyncflow.metrics import Metrics  # noqa: E402
from asyncflow.runtime import GC_YOUNG_THRESHOLD  # noqa: E402
from asyncflow.windows import Aggregate  # noqa: E402

QUERY_NAMES = ("q0", "q1", "q2", "q3", "q5", "q7", "q8")
FLINK_PER_CORE = {"q0": 155_000, "q1": 158_000, "q2": 175_000, "q3": 109_000, "q5": 22_100,
                  "q7": 12_300, "q8": 146_000}
"""Flink's published Nexmark throughput per core, events/s (for scale only)."""
DEFAULT_EVENTS = {"memory": 300_000, "kafka": 150_000}
DEFAULT_REPEAT = {"memory": 2, "kafka": 1}

BASE_TIME_MS = 1_709_294_400_000  # 2024-03-01T12:00:00Z: every run sees the same stream
WAIT_MS = 4_000  # the watermark's delay behind the frontier (Flink's Nexmark DDL)
END_OF_STREAM_AFTER_MS = 60_000
Q5_SIZE_MS, Q5_SLIDE_MS = 10_000, 2_000
Q7_SIZE_MS = 10_000
Q3_CATEGORY, Q3_STATES = 10, ("OR", "ID", "CA")
Q8_SIZE_MS = 10_000
DOLLARS_TO_EUROS = 0.908
SELECTION_MODULUS = 123
INPUT_TOPIC = "nexmark"

Event = dict[str, Any]

# -- the Nexmark generator --------------------------------------------------------------------
PERSON_PROPORTION, AUCTION_PROPORTION, BID_PROPORTION = 1, 3, 46
TOTAL_PROPORTION = PERSON_PROPORTION + AUCTION_PROPORTION + BID_PROPORTION
FIRST_PERSON_ID = FIRST_AUCTION_ID = 1000
FIRST_CATEGORY_ID, NUM_CATEGORIES = 10, 5
NUM_ACTIVE_PEOPLE, NUM_IN_FLIGHT_AUCTIONS = 1000, 100
PERSON_ID_LEAD = AUCTION_ID_LEAD = 10
HOT_AUCTION_RATIO, HOT_BIDDERS_RATIO, HOT_SELLERS_RATIO = 2, 4, 4  # 1 - 1/ratio are hot
HOT_BATCH = 100  # the hot auction/bidder/seller is the first of the last 100 created
HOT_CHANNELS_RATIO, CHANNELS_NUMBER = 2, 10_000
HOT_CHANNELS = ("Google", "Facebook", "Baidu", "Apple")
AVG_PERSON_BYTES, AVG_AUCTION_BYTES, AVG_BID_BYTES = 200, 500, 100
US_STATES = ("AZ", "CA", "ID", "OR", "WA", "WY")
US_CITIES = ("Phoenix", "Los Angeles", "San Francisco", "Boise", "Portland", "Bend", "Redmond",
             "Seattle", "Kent", "Cheyenne")
FIRST_NAMES = ("Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah",
               "Deiter", "Walter")
LAST_NAMES = ("Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones",
              "Noris")
STRING_POOL = 1 << 16


def last_base0_person_id(event_id: int) -> int:
    """The id (from 0) of the last person created at ``event_id`` (the new one at a person)."""
    epoch, offset = divmod(event_id, TOTAL_PROPORTION)
    return epoch * PERSON_PROPORTION + min(offset, PERSON_PROPORTION - 1)


def last_base0_auction_id(event_id: int) -> int:
    """The id (from 0) of the last auction created at ``event_id`` (the new one at an auction)."""
    epoch, offset = divmod(event_id, TOTAL_PROPORTION)
    if offset < PERSON_PROPORTION:
        epoch, offset = epoch - 1, AUCTION_PROPORTION - 1
    elif offset >= PERSON_PROPORTION + AUCTION_PROPORTION:
        offset = AUCTION_PROPORTION - 1
    else:
        offset -= PERSON_PROPORTION
    return epoch * AUCTION_PROPORTION + offset


def java_int_reverse(n: int) -> int:
    """Java's ``Integer.reverse``: the 32 bits of ``n`` in reverse order, as a signed int."""
    bits = int(f"{n & 0xFFFFFFFF:032b}"[::-1], 2)
    return bits - (1 << 32) if bits >> 31 else bits


def encode(value: Any) -> bytes:
    """JSON bytes, right-sized (orjson's own result keeps a ~4 KB allocation behind it)."""
    return bytes(memoryview(orjson.dumps(value)))


@dataclass(frozen=True)
class GeneratorConfig:
    """How many events, how fast event time runs, and the seed."""

    events: int
    rate: int = 10_000
    seed: int = 42

    def timestamp(self, event_number: int) -> int:
        """Event time (epoch ms) of an event: the base time plus ``n / rate`` seconds."""
        return BASE_TIME_MS + event_number * 1000 // self.rate

    @property
    def end_of_stream_ms(self) -> int:
        return self.timestamp(max(self.events - 1, 0)) + END_OF_STREAM_AFTER_MS


class NexmarkGenerator:
    """The reference generator's events, in order, from one seeded ``random.Random``.

    Random strings are slices of two seeded pools of letters (one with a space 1 in 13), so that
    half a million events take seconds, not minutes.
    """

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        rng = self._rng = random.Random(config.seed)
        self._random = rng.random
        letters = string.ascii_lowercase
        self._letters = "".join(rng.choices(letters, k=STRING_POOL))
        self._spaced = "".join(c if self._below(13) else " " for c in
                               rng.choices(letters, k=STRING_POOL))
        self._hot_urls = tuple(self._base_url() for _ in HOT_CHANNELS)
        self._channels: dict[int, tuple[str, str]] = {}
        self._auction_horizon = NUM_IN_FLIGHT_AUCTIONS * TOTAL_PROPORTION // AUCTION_PROPORTION

    def __iter__(self) -> Iterator[Event]:
        for n in range(self.config.events):
            yield self.event(n)

    def encoded(self) -> Iterator[bytes]:
        """Every event as JSON, then the end-of-stream record."""
        for event in self:
            yield encode(event)
        yield encode({"type": "end_of_stream", "date_time": self.config.end_of_stream_ms})

    def event(self, n: int) -> Event:
        offset = n % TOTAL_PROPORTION
        t = self.config.timestamp(n)
        if offset < PERSON_PROPORTION:
            return self.person(n, t)
        if offset < PERSON_PROPORTION + AUCTION_PROPORTION:
            return self.auction(n, t)
        return self.bid(n, t)

    # -- the three kinds ------------------------------------------------------------------
    def person(self, n: int, t: int) -> Event:
        rng = self._rng
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        email = f"{self._string(7)}@{self._string(5)}.com"
        card = " ".join(f"{self._below(10_000):04d}" for _ in range(4))
        city, state = rng.choice(US_CITIES), rng.choice(US_STATES)
        size = 8 + len(name) + len(email) + len(card) + len(city) + len(state)
        return {
            "type": "person", "id": last_base0_person_id(n) + FIRST_PERSON_ID, "name": name,
            "email_address": email, "credit_card": card, "city": city, "state": state,
            "date_time": t, "extra": self._extra(size, AVG_PERSON_BYTES),
        }

    def auction(self, n: int, t: int) -> Event:
        if self._below(HOT_SELLERS_RATIO):
            seller = last_base0_person_id(n) // HOT_BATCH * HOT_BATCH
        else:
            seller = self._some_person(n)
        category = FIRST_CATEGORY_ID + self._below(NUM_CATEGORIES)
        initial_bid = self._price()
        horizon = self.config.timestamp(n + self._auction_horizon) - t
        expires = t + 1 + self._below(max(horizon * 2, 1))
        name, description = self._string(20), self._string(100)
        reserve = initial_bid + self._price()
        size = 8 + len(name) + len(description) + 8 + 8 + 8 + 8 + 8
        return {
            "type": "auction", "id": last_base0_auction_id(n) + FIRST_AUCTION_ID,
            "item_name": name, "description": description, "initial_bid": initial_bid,
            "reserve": reserve, "date_time": t, "expires": expires,
            "seller": seller + FIRST_PERSON_ID, "category": category,
            "extra": self._extra(size, AVG_AUCTION_BYTES),
        }

    def bid(self, n: int, t: int) -> Event:
        if self._below(HOT_AUCTION_RATIO):
            auction = last_base0_auction_id(n) // HOT_BATCH * HOT_BATCH
        else:
            last = last_base0_auction_id(n)
            low = max(last - NUM_IN_FLIGHT_AUCTIONS, 0)
            auction = low + self._below(last - low + 1 + AUCTION_ID_LEAD)
        if self._below(HOT_BIDDERS_RATIO):
            bidder = last_base0_person_id(n) // HOT_BATCH * HOT_BATCH + 1
        else:
            bidder = self._some_person(n)
        price = self._price()
        if self._below(HOT_CHANNELS_RATIO):
            i = self._below(len(HOT_CHANNELS))
            channel, url = HOT_CHANNELS[i], self._hot_urls[i]
        else:
            channel, url = self._channel(self._below(CHANNELS_NUMBER))
        return {
            "type": "bid", "auction": auction + FIRST_AUCTION_ID,
            "bidder": bidder + FIRST_PERSON_ID, "price": price, "channel": channel, "url": url,
            "date_time": t, "extra": self._extra(8 + 8 + 8 + 8, AVG_BID_BYTES),
        }

    # -- the pieces -----------------------------------------------------------------------
    def _below(self, n: int) -> int:
        """A uniform int in ``[0, n)`` (Java's ``nextInt(n)``; ``randrange`` costs 3x more)."""
        return int(self._random() * n)

    def _some_person(self, n: int) -> int:
        """One of the active people, or a few not created yet (the reference's "lead")."""
        people = last_base0_person_id(n) + 1
        active = min(people, NUM_ACTIVE_PEOPLE)
        return people - active + self._below(active + PERSON_ID_LEAD)

    def _price(self) -> int:
        """Cents, log-uniform over [100, 100,000,000] (Java's ``Math.round``)."""
        return math.floor(math.pow(10.0, self._random() * 6.0) * 100.0 + 0.5)

    def _string(self, max_length: int) -> str:
        """3 to ``max_length - 1`` letters with a space now and then, trimmed."""
        length = 3 + self._below(max_length - 3)
        start = self._below(STRING_POOL - length)
        return self._spaced[start : start + length].strip()

    def _extra(self, current_size: int, average_size: int) -> str:
        """Padding that brings the event to ``average_size`` on average (±20%)."""
        if current_size > average_size:
            return ""
        wanted = average_size - current_size
        delta = round(wanted * 0.2)
        length = wanted - delta + (self._below(2 * delta) if delta else 0)
        start = self._below(STRING_POOL - length)
        return self._letters[start : start + length]

    def _base_url(self) -> str:
        parts = "/".join(self._string(5).replace(" ", "_") for _ in range(3))
        return f"https://www.nexmark.com/{parts}/item.htm?query=1"

    def _channel(self, number: int) -> tuple[str, str]:
        known = self._channels.get(number)
        if known is None:
            url = self._base_url()
            if self._below(10):
                url += f"&channel_id={abs(java_int_reverse(number))}"
            known = self._channels[number] = (f"channel-{number}", url)
        return known


# -- what the queries compute (shared by the apps and the hand loops) --------------------------
def is_bid(event: Event) -> bool:
    kind: str = event["type"]
    return kind == "bid"


def event_time(event: Event) -> float:
    """The event time as the topic's ``time=`` wants it: epoch seconds."""
    ms: int = event["date_time"]
    return ms / 1000


def bid_row(bid: Event) -> Event:
    """q0's output: the bid's columns of Flink's ``SELECT auction, bidder, price, ... FROM bid``."""
    return {"auction": bid["auction"], "bidder": bid["bidder"], "price": bid["price"],
            "date_time": bid["date_time"], "extra": bid["extra"]}


def euro_row(bid: Event) -> Event:
    """q1's output: q0's with the price in euros."""
    return {"auction": bid["auction"], "bidder": bid["bidder"],
            "price": DOLLARS_TO_EUROS * bid["price"], "date_time": bid["date_time"],
            "extra": bid["extra"]}


def selected(bid: Event) -> bool:
    auction: int = bid["auction"]
    return auction % SELECTION_MODULUS == 0


def hottest(start: int, end: int, counts: Mapping[Any, int]) -> list[Event]:
    """q5's output for one window: the auction(s) with the most bids, and how many."""
    top = max(counts.values())
    return [{"start": start, "end": end, "auction": int(auction), "count": n}
            for auction, n in counts.items() if n == top]


def highest_rows(start: int, end: int, bids: list[Event]) -> list[Event]:
    """q7's output for one window: its highest bid(s)."""
    return [{"start": start, "end": end, "auction": b["auction"], "price": b["price"],
             "bidder": b["bidder"], "date_time": b["date_time"], "extra": b["extra"]}
            for b in bids]


def is_q3_auction(event: Event) -> bool:
    return is_auction(event) and int(event["category"]) == Q3_CATEGORY


def is_q3_person(event: Event) -> bool:
    return is_person(event) and str(event["state"]) in Q3_STATES


def q3_row(auction: Event, person: Event) -> Event:
    """q3's output: the seller's name, city and state, the auction's id."""
    return {"name": person["name"], "city": person["city"], "state": person["state"],
            "id": auction["id"]}


def is_person(event: Event) -> bool:
    kind: str = event["type"]
    return kind == "person"


def is_auction(event: Event) -> bool:
    kind: str = event["type"]
    return kind == "auction"


def q8_start(t: int) -> int:
    """The start of q8's 10 s tumbling window of event time ``t``."""
    return t - t % Q8_SIZE_MS


def q8_row(person: Event, start: int) -> Event:
    """q8's output: the new user, and the window's start."""
    return {"id": person["id"], "name": person["name"], "starttime": start}


def count_auction(counts: dict[str, int], auction: str) -> dict[str, int]:
    """q5's fold step. Window state is JSON, whose object keys are strings: auction ids as str."""
    counts[auction] = counts.get(auction, 0) + 1
    return counts


class HighestBids(Aggregate[list[Any], list[Event]]):
    """q7's aggregate: ``[highest price, [its bids]]``; the result is the bids."""

    def create(self) -> list[Any]:
        return [-1, []]

    def add(self, acc: list[Any], value: Any, time_ms: int) -> list[Any]:
        price = value["price"]
        if price > acc[0]:
            acc[0] = price
            acc[1] = [value]
        elif price == acc[0]:
            acc[1].append(value)
        return acc

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        if a[0] == b[0]:
            return [a[0], a[1] + b[1]]
        return a if a[0] > b[0] else b

    def result(self, acc: list[Any]) -> list[Event]:
        return list(acc[1])


# -- the queries as asyncflow apps ------------------------------------------------------------
Input = af.Topic[Event]
WAIT = timedelta(milliseconds=WAIT_MS)


def app_q0(app: af.App, events: Input, out: Input) -> None:
    @app.agent(events)
    async def q0(stream: af.Stream[Event]) -> None:
        async for bid in stream.filter(is_bid):
            await out.send(None, bid_row(bid))


def app_q1(app: af.App, events: Input, out: Input) -> None:
    @app.agent(events)
    async def q1(stream: af.Stream[Event]) -> None:
        async for row in stream.filter(is_bid).map(euro_row):
            await out.send(None, row)


def app_q2(app: af.App, events: Input, out: Input) -> None:
    @app.agent(events)
    async def q2(stream: af.Stream[Event]) -> None:
        async for bid in stream.filter(is_bid).filter(selected):
            await out.send(None, {"auction": bid["auction"], "price": bid["price"]})


def app_q5(app: af.App, events: Input, out: Input) -> None:
    hopping = af.Hopping(timedelta(milliseconds=Q5_SIZE_MS), timedelta(milliseconds=Q5_SLIDE_MS))

    @app.agent(events)
    async def q5(stream: af.Stream[Event]) -> None:
        auctions = stream.filter(is_bid).map(lambda bid: str(bid["auction"]))
        windows = auctions.window(hopping, aggregate=af.fold(dict, count_auction), wait=WAIT)
        async for w in windows:
            for row in hottest(w.start_ms, w.end_ms, w.value):
                await out.send(None, row)


def app_q7(app: af.App, events: Input, out: Input) -> None:
    tumbling = af.Tumbling(timedelta(milliseconds=Q7_SIZE_MS))

    @app.agent(events)
    async def q7(stream: af.Stream[Event]) -> None:
        windows = stream.filter(is_bid).window(tumbling, aggregate=HighestBids(), wait=WAIT)
        async for w in windows:
            for row in highest_rows(w.start_ms, w.end_ms, w.value):
                await out.send(None, row)


def app_q3(app: af.App, events: Input, out: Input) -> None:
    join = join_table(events, events, name="q3", how="inner", wait=WAIT,
                      stream_key=lambda a: a["seller"], table_key=lambda p: p["id"],
                      stream_where=is_q3_auction, table_where=is_q3_person)

    @app.agent(join.topic)
    async def q3(stream: af.Stream[Any]) -> None:
        async for j in join.joined(stream):
            await out.send(None, q3_row(j.left, j.right))


def app_q8(app: af.App, events: Input, out: Input) -> None:
    bound = timedelta(milliseconds=Q8_SIZE_MS - 1)  # a pair of one key is in one window
    join = interval_join(events, events, name="q8", lower=-bound, upper=bound, wait=WAIT,
                         left_key=lambda p: (p["id"], q8_start(p["date_time"])),
                         right_key=lambda a: (a["seller"], q8_start(a["date_time"])),
                         left_where=is_person, right_where=is_auction)
    done = app.table("q8-done", default=False, ttl=timedelta(hours=1))

    @app.agent(join.topic)
    async def q8(stream: af.Stream[Any]) -> None:
        reported = stream.state(done)
        async for j in join.joined(stream):
            if not reported.get():  # one row per (person, window), however many auctions
                reported.set(True)
                await out.send(None, q8_row(j.left, q8_start(j.left["date_time"])))


APPS: dict[str, Callable[[af.App, Input, Input], None]] = {
    "q0": app_q0, "q1": app_q1, "q2": app_q2, "q3": app_q3, "q5": app_q5, "q7": app_q7,
    "q8": app_q8,
}


def build_app(
    query: str,
    app_id: str,
    broker: str | af.Broker,
    input_topic: str,
    output_topic: str,
    *,
    broker_options: Mapping[str, str] | None = None,
    state_dir: str | None = None,
) -> af.App:
    """One query as an app: the Nexmark topic in, its output topic out."""
    app = af.App(app_id, broker=broker, broker_options=dict(broker_options or {}),
                 state_dir=state_dir)
    events: Input = app.topic(input_topic, time=event_time, create=False)
    out: Input = app.topic(output_topic)
    APPS[query](app, events, out)
    return app


# -- the queries as hand-written loops --------------------------------------------------------
class HandQuery(Protocol):
    """A hand loop's state: ``feed`` takes raw events in order and appends JSON outputs."""

    def feed(self, batch: Iterable[bytes], out: list[bytes]) -> None: ...


class HandQ0:
    def feed(self, batch: Iterable[bytes], out: list[bytes]) -> None:
        loads, append = orjson.loads, out.append
        for data in batch:
            e = loads(data)
            if e["type"] == "bid":
                append(encode(bid_row(e)))


class HandQ1:
    def feed(self, batch: Iterable[bytes], out: list[bytes]) -> None:
        loads, append = orjson.loads, out.append
        for data in batch:
            e = loads(data)
            if e["type"] == "bid":
                append(encode(euro_row(e)))


class HandQ2:
    def feed(self, batch: Iterable[bytes], out: list[bytes]) -> None:
        loads, append = orjson.loads, out.append
        for data in batch:
            e = loads(data)
            if e["type"] == "bid" and e["auction"] % SELECTION_MODULUS == 0:
                append(encode({"auction": e["auction"], "price": e["price"]}))


class HandQ5:
    """Windows ``{start: {auction: count}}``, closed once ``time - wait`` has passed their end - 1.

    The watermark is the time before the latest event's, less the wait: the events of one
    millisecond all go into their windows first (the app's watermark follows what it has read
    by whole fetches, a millisecond sooner at most).
    """

    def __init__(self) -> None:
        self.windows: dict[int, dict[int, int]] = {}
        self.close_at = math.inf  # the event time from which the oldest open window closes

    def feed(self, batch: Iterable[bytes], out: list[bytes]) -> None:
        loads, windows = orjson.loads, self.windows
        size, slide = Q5_SIZE_MS, Q5_SLIDE_MS
        for data in batch:
            e = loads(data)
            t = e["date_time"]
            if e["type"] == "bid":
                auction = e["auction"]
                start = t - t % slide
                while start > t - size:
                    counts = windows.get(start)
                    if counts is None:
                        counts = windows[start] = {}
                        self.close_at = min(self.close_at, start + size + WAIT_MS)
                    counts[auction] = counts.get(auction, 0) + 1
                    start -= slide
            if t >= self.close_at:
                self._close(t - WAIT_MS - 1, out)

    def _close(self, watermark: int, out: list[bytes]) -> None:
        windows = self.windows
        for start in sorted(s for s in windows if s + Q5_SIZE_MS - 1 <= watermark):
            out.extend(encode(row) for row in hottest(start, start + Q5_SIZE_MS, windows[start]))
            del windows[start]
        self.close_at = min((s + Q5_SIZE_MS + WAIT_MS for s in windows), default=math.inf)


class HandQ7:
    """Windows ``{start: [highest price, [bids]]}``, closed as in ``HandQ5``."""

    def __init__(self) -> None:
        self.windows: dict[int, list[Any]] = {}
        self.close_at = math.inf

    def feed(self, batch: Iterable[bytes], out: list[bytes]) -> None:
        loads, windows, size = orjson.loads, self.windows, Q7_SIZE_MS
        for data in batch:
            e = loads(data)
            t = e["date_time"]
            if e["type"] == "bid":
                start = t - t % size
                acc = windows.get(start)
                if acc is None:
                    acc = windows[start] = [-1, []]
                    self.close_at = min(self.close_at, start + size + WAIT_MS)
                price = e["price"]
                if price > acc[0]:
                    acc[0] = price
                    acc[1] = [e]
                elif price == acc[0]:
                    acc[1].append(e)
            if t >= self.close_at:
                self._close(t - WAIT_MS - 1, out)

    def _close(self, watermark: int, out: list[bytes]) -> None:
        windows = self.windows
        for start in sorted(s for s in windows if s + Q7_SIZE_MS - 1 <= watermark):
            rows = highest_rows(start, start + Q7_SIZE_MS, windows.pop(start)[1])
            out.extend(encode(row) for row in rows)
        self.close_at = min((s + Q7_SIZE_MS + WAIT_MS for s in windows), default=math.inf)


class HandQ3:
    """A dict of the persons of the three states; an auction of category 10 is looked up once
    the stream has moved past its millisecond (so a seller of the same millisecond counts)."""

    def __init__(self) -> None:
        self.persons: dict[int, Event] = {}
        self.waiting: list[Event] = []
        self.now: int | None = None

    def feed(self, batch: Iterable[bytes], out: list[bytes]) -> None:
        loads, persons, append = orjson.loads, self.persons, out.append
        for data in batch:
            e = loads(data)
            t = e["date_time"]
            if t != self.now:
                for a in self.waiting:
                    p = persons.get(a["seller"])
                    if p is not None:
                        append(encode(q3_row(a, p)))
                self.waiting.clear()
                self.now = t
            kind = e["type"]
            if kind == "person":
                if e["state"] in Q3_STATES:
                    persons[e["id"]] = e
            elif kind == "auction" and e["category"] == Q3_CATEGORY:
                self.waiting.append(e)


class HandQ8:
    """Windows ``{start: ({person id: name}, {sellers})}``, closed as the watermark passes."""

    def __init__(self) -> None:
        self.windows: dict[int, tuple[dict[int, str], set[int]]] = {}
        self.close_at = math.inf

    def feed(self, batch: Iterable[bytes], out: list[bytes]) -> None:
        loads, windows, size = orjson.loads, self.windows, Q8_SIZE_MS
        for data in batch:
            e = loads(data)
            t = e["date_time"]
            kind = e["type"]
            if kind == "person" or kind == "auction":
                start = t - t % size
                w = windows.get(start)
                if w is None:
                    w = windows[start] = ({}, set())
                    self.close_at = min(self.close_at, start + size + WAIT_MS)
                if kind == "person":
                    w[0][e["id"]] = e["name"]
                else:
                    w[1].add(e["seller"])
            if t >= self.close_at:
                self._close(t - WAIT_MS - 1, out)

    def _close(self, watermark: int, out: list[bytes]) -> None:
        windows = self.windows
        for start in sorted(s for s in windows if s + Q8_SIZE_MS - 1 <= watermark):
            persons, sellers = windows.pop(start)
            out.extend(encode({"id": i, "name": n, "starttime": start})
                       for i, n in persons.items() if i in sellers)
        self.close_at = min((s + Q8_SIZE_MS + WAIT_MS for s in windows), default=math.inf)


HANDS: dict[str, Callable[[], HandQuery]] = {
    "q0": HandQ0, "q1": HandQ1, "q2": HandQ2, "q3": HandQ3, "q5": HandQ5, "q7": HandQ7,
    "q8": HandQ8,
}


# -- checking -------------------------------------------------------------------------------
def canonical(values: Iterable[bytes]) -> Counter[bytes]:
    """JSON documents as a multiset, each with its keys sorted."""
    loads, dumps, sort = orjson.loads, orjson.dumps, orjson.OPT_SORT_KEYS
    return Counter(bytes(memoryview(dumps(loads(v), option=sort))) for v in values)


def check_same(case: str, have: Counter[bytes], want: Counter[bytes]) -> int:
    """Fail loudly unless the app's outputs are the hand loop's; returns how many."""
    if have != want:
        extra, missing = have - want, want - have
        raise SystemExit(
            f"{case}: asyncflow's output differs from the hand loop's: {sum(have.values())} "
            f"results against {sum(want.values())}; {sum(extra.values())} only from asyncflow "
            f"(e.g. {[v.decode() for v in list(extra)[:3]]}), {sum(missing.values())} only from "
            f"the hand loop (e.g. {[v.decode() for v in list(missing)[:3]]})"
        )
    return sum(want.values())


def check_metrics(case: str, metrics: Metrics) -> None:
    """A late or dead-lettered event means the app computed something else."""
    bad = {k: metrics.get(k) for k in ("late_events", "dead_letters", "future_events")}
    if any(bad.values()):
        raise SystemExit(f"{case}: asyncflow had {bad}; the comparison would mean nothing")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    import psutil  # type: ignore[import-untyped]

    return float(psutil.Process().memory_info().rss) / 2**20


@dataclass
class CaseSpec:
    """One (query, broker) case, as the parent hands it to its child process."""

    query: str
    broker: str
    events: int
    rate: int
    seed: int
    repeat: int
    bootstrap: str | None = None
    input_topic: str | None = None
    prefix: str = "nexmark"
    expected: int = 0
    """Kafka: how many outputs the app is to have acknowledged before it is stopped."""


@dataclass
class Timing:
    """The best times of a case and what else its report needs."""

    app_seconds: float
    hand_seconds: float
    results: int
    input_rss_mb: float
    app_rss_mb: float


def hand_timed(query: str, values: list[bytes]) -> tuple[float, list[bytes]]:
    """The hand loop over every raw event, with the worker's GC setting; seconds, outputs."""
    out: list[bytes] = []
    gc_before = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc_before[1:])
    try:
        started = time.perf_counter()
        HANDS[query]().feed(values, out)
        seconds = time.perf_counter() - started
    finally:
        gc.set_threshold(*gc_before)
    return seconds, out


# -- the memory broker ---------------------------------------------------------------------
def load_memory(spec: CaseSpec) -> MemoryBroker:
    """The generated stream in a one-partition memory topic, ended."""
    broker = MemoryBroker()
    broker.create_topic(INPUT_TOPIC, partitions=1)
    for value in NexmarkGenerator(GeneratorConfig(spec.events, spec.rate, spec.seed)).encoded():
        broker.produce(INPUT_TOPIC, value, None, (), BASE_TIME_MS)
    broker.end(INPUT_TOPIC)
    return broker


async def app_on_memory(
    spec: CaseSpec, broker: MemoryBroker, run: int
) -> tuple[float, list[bytes]]:
    """The query's app over the memory topic until its input ends; seconds, outputs."""
    case = f"{spec.query}/memory"
    output = f"{spec.query}-out-{run}"
    app = build_app(spec.query, f"{spec.prefix}-{spec.query}-{run}", broker, INPUT_TOPIC, output)
    started = time.perf_counter()
    try:
        await asyncio.wait_for(app.run(), timeout=120 + spec.events / 1000)
    except TimeoutError:
        snapshot = app.metrics.snapshot()
        raise SystemExit(f"{case}: the app did not finish (metrics {snapshot})") from None
    seconds = time.perf_counter() - started
    check_metrics(case, app.metrics)
    values = [r.value or b"" for r in broker.records(output)]
    del broker.topics[output]  # the next run writes its own; this one's memory goes back
    for name in [t for t in broker.topics if t.startswith(f"{app.id}-")]:
        del broker.topics[name]  # its internal topics (a join's) and changelogs too
    return seconds, values


async def run_memory_case(spec: CaseSpec) -> Timing:
    """Every run in one event loop: a ``MemoryBroker`` cannot move to another one."""
    broker = load_memory(spec)
    values = [r.value or b"" for r in broker.topic(INPUT_TOPIC).partitions[0]]
    input_rss = rss_mb()
    best_app = best_hand = math.inf
    app_rss = 0.0
    results = 0
    for run in range(spec.repeat):
        seconds, got = await app_on_memory(spec, broker, run)
        best_app = min(best_app, seconds)
        if run == 0:
            app_rss = peak_rss_mb()  # the input and the app, before any check or hand loop
        have = canonical(got)
        del got
        seconds, expected = hand_timed(spec.query, values)  # blocks the loop: nothing else runs
        best_hand = min(best_hand, seconds)
        results = check_same(f"{spec.query}/memory", have, canonical(expected))
        del have, expected
    return Timing(best_app, best_hand, results, input_rss, app_rss)


# -- Kafka ----------------------------------------------------------------------------------
SESSION_TIMEOUT_MS = 3000  # Tansu holds a group join for half of it


async def load_kafka(
    bootstrap: str, config: GeneratorConfig, topic: str, queries: list[str]
) -> dict[str, int]:
    """The generated stream in a one-partition Kafka topic; each query's number of outputs.

    The numbers (from the hand loops over the same events, here) tell each case when its app
    is done; the outputs themselves are checked in the case.
    """
    from tests.integration.kafka.broker import create_topic, produce

    values = list(NexmarkGenerator(config).encoded())
    expected = {}
    for query in queries:
        out: list[bytes] = []
        HANDS[query]().feed(values, out)
        expected[query] = len(out)
    await create_topic(bootstrap, partitions=1, name=topic)
    sent = await produce(bootstrap, topic, ((None, v) for v in values))
    if sent != len(values):
        raise SystemExit(f"loading {topic}: {sent} of {len(values)} records acknowledged")
    return expected


async def send_values(producer: Any, topic: str, values: list[bytes]) -> list[Any]:
    """Produce ``values`` to partition 0 of ``topic`` in batches; the acknowledgement futures."""
    futures = []
    batch, n = producer.create_batch(), 0
    for value in values:
        if batch.append(key=None, value=value, timestamp=None) is None:
            batch.close()
            futures.append(await producer.send_batch(batch, topic, partition=0))
            batch, n = producer.create_batch(), 0
            batch.append(key=None, value=value, timestamp=None)
        n += 1
    if n:
        batch.close()
        futures.append(await producer.send_batch(batch, topic, partition=0))
    return futures


async def hand_on_kafka(spec: CaseSpec, run: int) -> tuple[float, list[bytes]]:
    """The hand loop as an aiokafka consumer and producer; seconds from the first record, outputs.

    A batch's input offsets are committed once its outputs are acknowledged, while the next
    batch is already being processed (``kafka_throughput.py``'s baseline).
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from tests.integration.kafka.broker import create_topic

    assert spec.bootstrap is not None and spec.input_topic is not None
    out_topic = await create_topic(spec.bootstrap, 1, f"{spec.prefix}-{spec.query}-hand-{run}")
    consumer = AIOKafkaConsumer(
        spec.input_topic, bootstrap_servers=spec.bootstrap,
        group_id=f"{spec.prefix}-{spec.query}-hand-{run}", enable_auto_commit=False,
        auto_offset_reset="earliest", session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=500, max_poll_records=20_000,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=spec.bootstrap, enable_idempotence=False, max_batch_size=65_536
    )
    await consumer.start()
    await producer.start()
    hand = HANDS[spec.query]()
    outputs: list[bytes] = []
    consumed, records = 0, spec.events + 1
    started: float | None = None
    previous: tuple[list[Any], dict[Any, int]] | None = None
    try:
        while consumed < records:
            data = await consumer.getmany(timeout_ms=200, max_records=20_000)
            if not data:
                continue
            if started is None:
                started = time.perf_counter()
            out: list[bytes] = []
            offsets = {}
            for tp, batch in data.items():
                consumed += len(batch)
                offsets[tp] = batch[-1].offset + 1
                hand.feed([r.value for r in batch], out)
            futures = await send_values(producer, out_topic, out)
            outputs.extend(out)
            if previous is not None:  # the previous batch's outputs, then its commit
                await asyncio.gather(*previous[0])
                await consumer.commit(previous[1])
            previous = (futures, offsets)
        if previous is not None:
            await asyncio.gather(*previous[0])
            await consumer.commit(previous[1])
        assert started is not None
        return time.perf_counter() - started, outputs
    finally:
        await consumer.stop()
        await producer.stop()


async def app_on_kafka(spec: CaseSpec, run: int) -> tuple[float, str, int]:
    """The query's app on Kafka; seconds from its first record to its last output acknowledged.

    A Kafka input never ends: the app is stopped once it has read every record and had
    ``spec.expected`` outputs acknowledged (or, if fewer come, 30 s after the input was read;
    the check then says what is missing). Returns the output topic and how many it got.
    """
    from tests.integration.kafka.broker import TEST_OPTIONS, create_topic

    assert spec.bootstrap is not None and spec.input_topic is not None
    case = f"{spec.query}/kafka"
    name = f"{spec.prefix}-{spec.query}-app-{run}"
    out_topic = await create_topic(spec.bootstrap, 1, f"{name}-out")
    records = spec.events + 1
    with tempfile.TemporaryDirectory(prefix="nexmark-state-") as state_dir:
        app = build_app(spec.query, name, f"kafka://{spec.bootstrap}", spec.input_topic,
                        out_topic, broker_options=TEST_OPTIONS, state_dir=state_dir)
        metrics = app.metrics
        worker = asyncio.create_task(app.run())
        started: float | None = None
        read_all: float | None = None
        deadline = time.monotonic() + 120 + spec.events / 1000
        try:
            while True:
                if worker.done():
                    worker.result()
                    raise SystemExit(f"{case}: the worker stopped before the end of its input")
                now = time.monotonic()
                if started is None and metrics.get("events_in") > 0:
                    started = time.perf_counter()
                if read_all is None and read_from(metrics, spec.input_topic) >= records:
                    read_all = now
                if read_all is not None and (
                    written_to(metrics, out_topic) >= spec.expected or now > read_all + 30
                ):
                    break
                if now > deadline:
                    raise SystemExit(f"{case}: the app did not finish ({metrics.snapshot()})")
                await asyncio.sleep(0.002)
            finished = time.perf_counter()
        finally:
            app.stop()
            await worker
    check_metrics(case, metrics)
    assert started is not None
    return finished - started, out_topic, written_to(metrics, out_topic)


def read_from(metrics: Metrics, topic: str) -> int:
    """Records of ``topic`` read by its busiest agent (a join reads its input twice)."""
    counts = [n for (t, _), n in metrics.labeled("events_in").items() if t == topic]
    return max(counts, default=0)


def written_to(metrics: Metrics, topic: str) -> int:
    """Records written to ``topic`` (not to a join's internal topic or a changelog)."""
    return sum(n for (_, t), n in metrics.labeled("events_out").items() if t == topic)


async def read_back(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """The values of the first ``count`` records of a one-partition topic."""
    from tests.integration.kafka.broker import consume

    return [r.value for r in await consume(bootstrap, topic, count)] if count else []


def run_kafka_case(spec: CaseSpec) -> Timing:
    assert spec.bootstrap is not None
    input_rss = rss_mb()
    best_app = best_hand = math.inf
    app_rss = 0.0
    results = 0
    for run in range(spec.repeat):
        seconds, out_topic, written = asyncio.run(app_on_kafka(spec, run))
        best_app = min(best_app, seconds)
        if run == 0:
            app_rss = peak_rss_mb()  # the app, before any check or hand loop
        have = canonical(asyncio.run(read_back(spec.bootstrap, out_topic, written)))
        seconds, expected = asyncio.run(hand_on_kafka(spec, run))
        best_hand = min(best_hand, seconds)
        results = check_same(f"{spec.query}/kafka", have, canonical(expected))
        del have, expected
    return Timing(best_app, best_hand, results, input_rss, app_rss)


# -- one case per process, and the report ----------------------------------------------------
def run_case(spec: CaseSpec) -> dict[str, Any]:
    """Run one case here; the report line (``events`` counts the Nexmark events, not the end)."""
    if spec.broker == "memory":
        timing = asyncio.run(run_memory_case(spec))
    else:
        timing = run_kafka_case(spec)
    rate, base = spec.events / timing.app_seconds, spec.events / timing.hand_seconds
    return {
        "case": f"{spec.query}/{spec.broker}",
        "query": spec.query,
        "broker": spec.broker,
        "events": spec.events,
        "seconds": round(timing.app_seconds, 3),
        "events_per_s": round(rate),
        "baseline_seconds": round(timing.hand_seconds, 3),
        "baseline_events_per_s": round(base),
        "ratio": round(rate / base, 3),
        "peak_rss_mb": round(timing.app_rss_mb, 1),
        "input_rss_mb": round(timing.input_rss_mb, 1),
        "results": timing.results,
        "flink_events_per_s_per_core": FLINK_PER_CORE[spec.query],
    }


def run_child(spec: CaseSpec) -> dict[str, Any]:
    """Run one case in a fresh interpreter (its own peak RSS); stop everything if it fails."""
    command = [sys.executable, __file__, "--child", json.dumps(asdict(spec))]
    limit = 300 + spec.repeat * spec.events / 500  # seconds: generous, but never forever
    try:
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        limit_s = f"{limit:.0f} s"
        raise SystemExit(f"{spec.query}/{spec.broker} did not finish within {limit_s}") from None
    if done.returncode != 0:
        raise SystemExit(f"{spec.query}/{spec.broker} failed:\n{done.stderr[-4000:]}")
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return row


def memory_rows(queries: list[str], args: argparse.Namespace, prefix: str) -> list[dict[str, Any]]:
    events = args.events or DEFAULT_EVENTS["memory"]
    repeat = args.repeat or DEFAULT_REPEAT["memory"]
    return [run_child(CaseSpec(q, "memory", events, args.rate, args.seed, repeat, prefix=prefix))
            for q in queries]


def kafka_rows(queries: list[str], args: argparse.Namespace, prefix: str) -> list[dict[str, Any]]:
    """Start Tansu (unless ``--bootstrap``), load the stream once, run the cases, clean up."""
    from tests.integration.kafka.broker import start_tansu

    events = args.events or DEFAULT_EVENTS["kafka"]
    repeat = args.repeat or DEFAULT_REPEAT["kafka"]
    tansu = None if args.bootstrap else start_tansu()
    bootstrap = args.bootstrap or tansu.bootstrap  # type: ignore[union-attr]
    topic = f"{prefix}-input"
    config = GeneratorConfig(events, args.rate, args.seed)
    try:
        expected = asyncio.run(load_kafka(bootstrap, config, topic, queries))
        return [run_child(CaseSpec(q, "kafka", events, args.rate, args.seed, repeat, bootstrap,
                                   topic, prefix, expected[q])) for q in queries]
    finally:
        if tansu is not None:
            tansu.stop()
            tansu.log_path.unlink(missing_ok=True)
        else:
            asyncio.run(delete_topics(bootstrap, prefix))


async def delete_topics(bootstrap: str, prefix: str) -> None:
    """Delete this run's topics (input, outputs, changelogs) from a broker we did not start."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        ours = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if ours:
            await admin.delete_topics(ours)
    finally:
        await admin.close()


def report(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for r in rows:
            print(json.dumps(r), flush=True)
        return
    print(f"{'query':<6}{'broker':<8}{'events':>9}{'asyncflow/s':>13}{'hand/s':>11}{'ratio':>7}"
          f"{'peak MB':>9}{'input MB':>10}{'results':>9}{'Flink/core':>12}")
    for r in rows:
        print(f"{r['query']:<6}{r['broker']:<8}{r['events']:>9,}{r['events_per_s']:>13,}"
              f"{r['baseline_events_per_s']:>11,}{r['ratio']:>7.2f}{r['peak_rss_mb']:>9.0f}"
              f"{r['input_rss_mb']:>10.0f}{r['results']:>9,}"
              f"{r['flink_events_per_s_per_core']:>12,}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, help="Nexmark events (memory 300,000; Kafka 150,000)")
    p.add_argument("--broker", choices=("memory", "kafka", "both"), default="both")
    p.add_argument("--queries", default=",".join(QUERY_NAMES), help="e.g. q0,q5 (all seven)")
    p.add_argument("--rate", type=int, default=10_000, help="events per second of event time")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeat", type=int,
                   help="alternate runs, best time counts (memory 2, Kafka 1)")
    p.add_argument("--bootstrap", default=os.environ.get("ASYNCFLOW_TEST_KAFKA"),
                   help="use this Kafka (host:port) instead of starting Tansu")
    p.add_argument("--json", action="store_true", help="one JSON object per case per line")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(run_case(CaseSpec(**json.loads(args.child)))), flush=True)
        return
    queries = [q.strip() for q in args.queries.split(",") if q.strip()]
    unknown = sorted(set(queries) - set(QUERY_NAMES))
    if unknown:
        raise SystemExit(f"unknown queries {unknown}; choose from {', '.join(QUERY_NAMES)}")
    prefix = f"nexmark-{uuid.uuid4().hex[:8]}"
    rows: list[dict[str, Any]] = []
    if args.broker in ("memory", "both"):
        rows += memory_rows(queries, args, prefix)
    if args.broker in ("kafka", "both"):
        rows += kafka_rows(queries, args, prefix)
    report(rows, args.json)


if __name__ == "__main__":
    main()
