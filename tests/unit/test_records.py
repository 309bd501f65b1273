"""Typed records: fields are checked on decode; what does not fit says why."""

import copy
import pickle
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncflow as af
from asyncflow.codecs import JsonCodec
from asyncflow.records import datetime_to_ms, event_time_ms, numeric_time_ms


class Reading(af.Record):
    id: str
    value: float
    time: af.EventTime
    status: Literal["OK", "WARNING", "ERROR"] = "OK"
    tags: list[str] | None = None


def decode(data: bytes) -> Reading:
    return JsonCodec(Reading).decode(data)


def test_valid_json_decodes_to_a_typed_record() -> None:
    r = decode(b'{"id": "s1", "value": 2, "time": "2024-01-01T00:00:01Z", "other": 1}')
    assert r == Reading("s1", 2.0, datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC), "OK", None)
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
    r = Reading("a", 1.0, 0, "OK")
    with pytest.raises(AttributeError):
        r.unknown = 1  # type: ignore[attr-defined]
    assert r == Reading("a", 1.0, 0, "OK")


def test_records_encode_to_json_and_back() -> None:
    codec = JsonCodec(Reading)
    r = Reading("a", 1.5, 2, "ERROR", ["x"])
    assert codec.decode(codec.encode(r)) == r


def test_a_record_of_plain_fields_is_decoded_by_msgspec_into_the_record_itself() -> None:
    class Plain(af.Record):
        id: str
        value: float
        tags: dict = {}  # type: ignore[type-arg]  # a bare dict: msgspec checks only that it is one

    codec = JsonCodec(Plain)
    first, second = codec.decode_many([b'{"id": "a", "value": 1}', b'{"id": "b", "value": 2.5}'])
    assert (first, second) == (Plain("a", 1.0), Plain("b", 2.5))
    assert first.tags == {} and first.tags is not second.tags  # a fresh default for each record
    assert "_direct" in codec.decode.__qualname__


def test_a_field_without_a_default_after_one_with_a_default_is_refused_with_the_fix() -> None:
    with pytest.raises(TypeError, match="cannot follow optional fields.*reorder.*kw_only=True"):

        class Misordered(af.Record):
            status: str = "OK"
            id: str

    class KeywordsOnly(af.Record, kw_only=True):
        status: str = "OK"
        id: str

    assert KeywordsOnly(id="a") == JsonCodec(KeywordsOnly).decode(b'{"id": "a"}')
    assert KeywordsOnly.decode_obj({"id": "b", "status": "ERROR"}) == KeywordsOnly(
        id="b", status="ERROR")


def test_class_options_other_than_kw_only_and_frozen_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="takes only kw_only and frozen as class options, not rename"):

        class Renamed(af.Record, rename="camel"):  # type: ignore[call-arg]
            id: str


class Stamped(af.Record, frozen=True):
    id: str
    time: af.EventTime


def test_an_event_time_given_to_the_constructor_is_kept_as_a_decoded_one_is() -> None:
    as_seconds = Stamped("a", 1.5)
    as_datetime = Stamped("a", datetime(1970, 1, 1, 0, 0, 1, 500_000, tzinfo=UTC))
    decoded = JsonCodec(Stamped).decode(b'{"id": "a", "time": 1.5}')
    assert as_seconds == as_datetime == decoded
    assert hash(as_seconds) == hash(as_datetime) == hash(decoded)
    assert event_time_ms(as_seconds) == event_time_ms(as_datetime) == event_time_ms(decoded) == 1500
    assert pickle.loads(pickle.dumps(decoded)) == decoded
    assert event_time_ms(copy.copy(decoded)) == 1500
    assert event_time_ms(msgspec.structs.replace(decoded, id="b")) == 1500  # not read as seconds
    with pytest.raises(af.DecodeError, match="field 'time': 'soon' is not an ISO-8601 time"):
        Stamped("b", "soon")
    with pytest.raises(af.DecodeError, match="naive datetime"):
        Stamped("b", datetime(2024, 1, 1))


def test_an_event_time_counts_in_epoch_ms_and_reads_back_as_it_was_given() -> None:
    r = decode(b'{"id": "a", "value": 1, "time": "2024-01-01T02:00:00.0019+02:00"}')
    assert event_time_ms(r) == 1704067200001  # the millisecond it falls in, as windows count
    assert r.time.isoformat() == "2024-01-01T02:00:00.001900+02:00"
    assert decode(b'{"id": "a", "value": 1, "time": "2024-01-01T00:00:00Z"}').time == datetime(
        2024, 1, 1, tzinfo=UTC)
    r.time = 1.25
    assert (event_time_ms(r), r.time) == (1250, datetime(1970, 1, 1, 0, 0, 1, 250_000, tzinfo=UTC))
    with pytest.raises(af.DecodeError, match="not a time in epoch seconds"):
        r.time = float("1e20")
    assert r == pickle.loads(pickle.dumps(r))


class Base(af.Record):
    id: str
    time: af.EventTime


class Derived(Base):
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError("value must not be negative")


def test_a_record_has_one_event_time_at_most_its_bases_included() -> None:
    with pytest.raises(TypeError, match="one EventTime field at most, not time, sent"):

        class Twice(Base):
            sent: af.EventTime

    with pytest.raises(TypeError, match="one EventTime field at most, not a, b"):

        class Both(af.Record):
            a: af.EventTime
            b: af.EventTime


def test_a_derived_record_keeps_its_bases_event_time_and_its_own_post_init() -> None:
    r = JsonCodec(Derived).decode(b'{"id": "a", "time": 2, "value": 1}')
    assert (event_time_ms(r), r == Derived("a", 2, 1.0)) == (2000, True)
    with pytest.raises(ValueError, match="negative"):
        Derived("b", 1, -1.0)
    with pytest.raises(af.DecodeError, match="field 'time'"):
        Derived("b", "later")


def general_time_ms(value: Any) -> tuple[str, Any]:
    """The event time by the general rules (``numeric_time_ms``, ``datetime.fromisoformat``)."""
    try:
        if type(value) is int or type(value) is float:
            return "ms", numeric_time_ms(value, "time")
        if type(value) is str:
            dt = datetime.fromisoformat(value)
            if dt.tzinfo is None:
                raise af.DecodeError("naive")
            return "ms", datetime_to_ms(dt)
    except (af.DecodeError, ValueError):
        return "error", None
    return "error", None


def constructed_time_ms(value: Any) -> tuple[str, Any]:
    try:
        return "ms", event_time_ms(Stamped("a", value))
    except af.DecodeError:
        return "error", None


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.integers(-(10**13), 10**13),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-1e12, 1e12),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat().replace("+00:00", "Z")),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5))])).map(
        lambda d: d.isoformat()),
    st.sampled_from(["Z", "2024-13-01T00:00:00Z", "2024-01-01T00:00:00", "soonZ", ""]),
    st.booleans(), st.none(),
))
def test_every_input_time_is_stored_as_the_general_rules_say(value: Any) -> None:
    assert constructed_time_ms(value) == general_time_ms(value)
