"""The Kafka clients' flood of connection errors becomes one line per change of the broker's state.

No broker here: the tests log what aiokafka logs with the broker down (lines
taken from a worker's log with Tansu killed) on aiokafka's own loggers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from adapters.kafka_health import _FILTER, BrokerHealth

FLOOD = [
    ("aiokafka", "Unable connect to node with id 111: [Errno 111] Connect call failed "
     "('127.0.0.1', 38395)"),
    ("aiokafka", "Unable to update metadata from [111]"),
    ("aiokafka.consumer.fetcher", "Failed fetch messages from 111: NodeNotReadyError: Attempt "
     "to send a request to node which is not ready (node id 111)."),
    ("aiokafka.consumer.group_coordinator", "Group Coordinator Request failed: "
     "NodeNotReadyError: Attempt to send a request to node which is not ready (node id 111)."),
    ("aiokafka.consumer.group_coordinator", "Heartbeat session expired - marking coordinator dead"),
]


def flood(times: int = 50) -> None:
    for _ in range(times):
        for name, message in FLOOD:
            logging.getLogger(name).error(message)


class Lines(logging.Handler):
    """Every record that reaches the root logger's handlers (what a worker's log shows)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, prefix: str) -> list[str]:
        return [r.getMessage() for r in self.records if r.name.startswith(prefix)]


@pytest.fixture
def lines() -> Iterator[Lines]:
    """What the root logger's handlers get, with no other ``BrokerHealth`` of the process watching.

    A client another test left running would still be watching the same
    process-wide loggers: its watchers are set aside for the test.
    """
    others = [h for h in _FILTER.watchers]
    for h in others:
        _FILTER.discard(h)
    handler = Lines()
    root = logging.getLogger()
    before = root.level, logging.getLogger("asyncflow.kafka").level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("asyncflow.kafka").setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for h in others:
            _FILTER.add(h)
        root.setLevel(before[0])
        logging.getLogger("asyncflow.kafka").setLevel(before[1])


async def test_a_flood_of_client_connection_errors_becomes_one_line_with_the_first_error(
    lines: Lines,
) -> None:
    health = BrokerHealth("kafka://127.0.0.1:38395")
    health.watch()
    try:
        flood()
    finally:
        await health.close()
    assert lines.of("aiokafka") == []
    ours = lines.of("asyncflow.kafka")
    assert len(ours) == 1
    assert ours[0].startswith("lost connection to the Kafka broker at kafka://127.0.0.1:38395 "
                              "(Unable connect to node with id 111: [Errno 111] Connect call "
                              "failed ('127.0.0.1', 38395)); retrying")
    assert health.lost and health.hidden == 50 * len(FLOOD) - 1


async def test_other_client_lines_and_lines_after_the_worker_stopped_watching_pass(
    lines: Lines,
) -> None:
    health = BrokerHealth("kafka://k:9092")
    health.watch()
    logging.getLogger("aiokafka.consumer.group_coordinator").warning(
        "OffsetCommit failed for group g due to group error (UnknownMemberIdError), will rejoin"
    )
    await health.close()
    flood(1)
    assert len(lines.of("aiokafka")) == 1 + len(FLOOD)
    assert lines.of("asyncflow.kafka") == []
    assert _FILTER.watchers == []


async def test_a_lone_request_timeout_is_shown_as_it_is_and_starts_no_outage(
    lines: Lines,
) -> None:
    health = BrokerHealth("kafka://k:9092")
    health.watch()
    try:
        logging.getLogger("aiokafka.consumer.group_coordinator").error(
            "Error sending JoinGroupRequest to node 111 [[Error 7] RequestTimedOutError] -- "
            "marking coordinator dead"
        )
    finally:
        await health.close()
    assert len(lines.of("aiokafka")) == 1  # a slow group join, say: not an outage
    assert lines.of("asyncflow.kafka") == [] and not health.lost


async def test_at_debug_level_every_client_line_still_shows(lines: Lines) -> None:
    logging.getLogger("asyncflow.kafka").setLevel(logging.DEBUG)
    health = BrokerHealth("kafka://k:9092")
    health.watch()
    try:
        flood(2)
    finally:
        await health.close()
    assert len(lines.of("aiokafka")) == 2 * len(FLOOD)
    assert len([m for m in lines.of("asyncflow.kafka") if m.startswith("lost")]) == 1


async def test_the_broker_is_back_once_a_probe_succeeds_with_no_client_error_since(
    lines: Lines,
) -> None:
    answers = asyncio.Event()

    async def probe() -> None:
        if not answers.is_set():
            raise ConnectionRefusedError("refused")

    health = BrokerHealth("kafka://k:9092", probe=probe, probe_interval=0.01)
    health.watch()
    try:
        flood(1)
        await asyncio.sleep(0.05)  # probes fail meanwhile
        assert health.lost
        answers.set()
        for _ in range(200):
            if not health.lost:
                break
            await asyncio.sleep(0.01)
    finally:
        await health.close()
    ours = lines.of("asyncflow.kafka")
    assert len(ours) == 2 and ours[0].startswith("lost connection")
    assert ours[1].startswith("Kafka broker at kafka://k:9092 reachable again after ")
    assert ours[1].endswith(f"({len(FLOOD) - 1} client errors hidden)")


async def test_a_probe_that_succeeds_while_clients_still_fail_does_not_say_back() -> None:
    health = BrokerHealth("kafka://k:9092")
    health.failed("Connect call failed")
    began = health._last_error_at - 1.0
    health.ok(since=began)  # a call that began before the last client error
    assert health.lost
    health.ok(since=health._last_error_at + 0.001)
    assert not health.lost


async def test_a_long_outage_is_recalled_at_most_once_per_reminder_interval(lines: Lines) -> None:
    health = BrokerHealth("kafka://k:9092", remind_every=0.05)
    health.watch()
    try:
        flood(1)
        await asyncio.sleep(0.06)
        flood(1)
        flood(1)
    finally:
        await health.close()
    ours = lines.of("asyncflow.kafka")
    assert len(ours) == 2
    assert ours[1].startswith("Kafka broker at kafka://k:9092 still unreachable after ")
    assert "client errors hidden, last: " in ours[1]


async def test_a_lost_line_never_shows_a_password(lines: Lines) -> None:
    health = BrokerHealth("kafka://alice:***@k:9092")
    health.failed("SASL handshake to kafka://alice:hunter2@k:9092 timed out")
    assert "hunter2" not in " ".join(lines.of("asyncflow.kafka"))


def test_clients_made_but_never_started_leave_no_filter_behind() -> None:
    from adapters.kafka import KafkaBroker
    from asyncflow.protocols import TopicSpec

    before = list(_FILTER.watchers)
    broker = KafkaBroker("kafka://127.0.0.1:9", {})
    broker.source([TopicSpec("t")], "g")
    broker.sink()
    assert _FILTER.watchers == before  # only running clients watch the clients' loggers


async def test_a_broker_watches_while_one_of_its_clients_runs_and_not_after() -> None:
    health = BrokerHealth("kafka://127.0.0.1:9")
    source, sink = object(), object()
    health.watch(source)
    health.watch(sink)
    health.unwatch(source)
    assert health in _FILTER.watchers
    health.unwatch(sink)
    assert health not in _FILTER.watchers
    health.watch(source)
    await health.close()
    assert health not in _FILTER.watchers
