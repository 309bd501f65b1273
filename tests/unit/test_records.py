"""Typed records: fields are checked on decode; what does not fit says why."""

from datetime import UTC, datetime
from typing import Literal

import pytest

import asyncflow as af
from asyncflow.codecs import JsonCodec
from asyncflow.records import event_time_ms


class Reading(af.Record):
    id: str
    value: float
    status: Literal["OK", "WARNING", "ERROR"] = "OK"
    time: af.EventTime
    tags: list[str] | None = None


def decode(data: bytes) -> Reading:
    return JsonCodec(Reading).decode(data)


def test_valid_json_decodes_to_a_typed_record() -> None:
    r = decode(b'{"id": "s1", "value": 2, "time": "2024-01-01T00:00:01Z", "other": 1}')
    assert r == Reading("s1", 2.0, "OK", datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC), None)
    assert isinstance(r.value, float)
    assert event_time_ms(r) == 1704067201000


def test_epoch_seconds_are_accepted_as_event_time() -> None:
    assert event_time_ms(decode(b'{"id": "a", "value": 1, "time": 1.25}')) == 1250


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"id": 1, "value": 1, "time": 0}', "field 'id': expected str, got int"),
        (b'{"id": "a", "value": "x", "time": 0}', "field 'value': expected float, got str"),
        (b'{"id": "a", "value": 1}', "missing field 'time'"),
        (b'{"id": "a", "value": 1, "time": 0, "status": "MAYBE"}', "'MAYBE' is not one of"),
        (b'{"id": "a", "value": 1, "time": "2024-01-01T00:00:00"}', "naive datetime"),
        (b'{"id": "a", "value": 1, "time": 0, "tags": [1]}', "field 'tags'"),
        (b"[1, 2]", "expected a JSON object"),
        (b"{not json", "malformed JSON"),
    ],
)
def test_records_that_do_not_fit_raise_a_decode_error_naming_the_problem(
    payload: bytes, reason: str
) -> None:
    with pytest.raises(af.DecodeError, match=reason.replace("(", r"\(").replace("[", r"\[")):
        decode(payload)


def test_records_use_slots_and_compare_by_value() -> None:
    r = Reading("a", 1.0, "OK", 0)
    with pytest.raises(AttributeError):
        r.unknown = 1  # type: ignore[attr-defined]
    assert r == Reading("a", 1.0, "OK", 0)


def test_records_encode_to_json_and_back() -> None:
    codec = JsonCodec(Reading)
    r = Reading("a", 1.5, "ERROR", 2, ["x"])
    assert codec.decode(codec.encode(r)) == r
