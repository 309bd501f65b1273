"""Records decoded through msgspec are the records the Python decoder gives, and so are errors."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncflow as af
from asyncflow.codecs import JsonCodec
from asyncflow.compiled_decode import compiled_decoder
from asyncflow.errors import DecodeError
from asyncflow.records import event_time_ms


class Reading(af.Record):
    id: str
    temperature: float
    count: int
    ok: bool
    status: Literal["OK", "ERROR"]
    time: af.EventTime
    seen: datetime | None = None
    note: str | None = None
    extra: Any = None
    labels: list[Any] | None = None
    meta: dict[str, Any] = {}


class Nested(af.Record):
    reading: Reading
    tags: list[str]


def python_decode(data: bytes) -> Any:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}") from None
    return Reading.decode_obj(obj)


def outcome(decode: Any, data: bytes) -> tuple[str, Any]:
    try:
        r = decode(data)
    except DecodeError as exc:
        return "error", str(exc)
    except (TypeError, ValueError, OverflowError) as exc:
        return "error", f"{type(exc).__name__}: {exc}"
    return "record", (r.to_dict(), event_time_ms(r))


JSON_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.sampled_from(["OK", "ERROR", "x", "2024-03-01T12:00:00+00:00", "2024-03-01T12:00:00", ""]),
    st.just({"a": 1}), st.just([1]),
)
FIELDS = ["id", "temperature", "count", "ok", "status", "time", "seen", "note", "extra", "labels",
          "meta", "other"]


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUE))
def test_any_json_object_decodes_to_the_same_record_or_the_same_error(doc: dict[str, Any]) -> None:
    data = orjson.dumps(doc)
    compiled = compiled_decoder(Reading, fallback=python_decode)
    assert compiled is not None
    assert outcome(compiled, data) == outcome(python_decode, data)


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=8), st.floats(-1e6, 1e6), st.integers(-(2**40), 2**40), st.booleans(),
    st.sampled_from(["OK", "ERROR"]), st.floats(0, 4e9),
)
def test_valid_readings_decode_alike(
    id_: str, temperature: float, count: int, ok: bool, status: str, time: float
) -> None:
    doc = {"id": id_, "temperature": temperature, "count": count, "ok": ok, "status": status,
           "time": time, "note": "n"}
    data = orjson.dumps(doc)
    compiled = compiled_decoder(Reading, fallback=python_decode)
    assert outcome(compiled, data) == outcome(python_decode, data)
    assert outcome(compiled, data)[0] == "record"


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b'{"id": "a"}', b"", b'{"time": true}'])
def test_bad_input_gets_the_python_decoders_reason(data: bytes) -> None:
    compiled = compiled_decoder(Reading, fallback=python_decode)
    assert outcome(compiled, data) == outcome(python_decode, data)
    assert outcome(compiled, data)[0] == "error"


def test_records_with_nested_or_list_fields_keep_the_python_decoder() -> None:
    assert compiled_decoder(Nested, fallback=None) is None
    codec = JsonCodec(Nested)
    doc = {"reading": {"id": "a", "temperature": 1, "count": 1, "ok": True, "status": "OK",
                       "time": 1}, "tags": ["x"]}
    assert codec.decode(orjson.dumps(doc)).reading.temperature == 1.0


def test_a_json_topic_of_records_decodes_through_msgspec() -> None:
    codec = JsonCodec(Reading)
    doc = {"id": "s", "temperature": 1, "count": 2, "ok": False, "status": "OK", "time": 2.5}
    [r] = codec.decode_many([orjson.dumps(doc)])
    assert (r.temperature, event_time_ms(r)) == (1.0, 2500)
    assert "compiled_decode" in codec.decode.__code__.co_filename


class Ahead(af.Record):
    id: DefinedLater  # resolved only once the module is complete
    time: af.EventTime


DefinedLater = str


def test_a_record_whose_annotations_resolve_after_the_class_still_has_its_event_time() -> None:
    codec = JsonCodec(Ahead)
    r = codec.decode(b'{"id": "a", "time": 2}')
    assert (r.id, event_time_ms(r)) == ("a", 2000)
    assert "compiled_decode" in codec.decode.__code__.co_filename


class Guarded(af.Record):
    """A record that refuses attribute changes once it is built."""

    id: str
    value: float

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")


def test_a_record_with_its_own_setattr_is_built_without_calling_it() -> None:
    decode = compiled_decoder(Guarded, fallback=None)
    assert decode is not None
    got = decode(b'{"id": "g1", "value": 2.5}')
    assert (got.id, got.value) == ("g1", 2.5)
    with pytest.raises(AttributeError, match="read-only"):
        got.value = 3.0


def test_a_plain_record_is_built_by_attribute_stores_with_every_field_set() -> None:
    decode = compiled_decoder(Reading, fallback=None)
    assert decode is not None
    doc = {"id": "r", "temperature": 1.5, "count": 2, "ok": True, "status": "OK",
           "time": 1_700_000_000, "note": "n"}
    got = decode(orjson.dumps(doc))
    assert got == Reading.decode_obj(doc)
    assert (got.id, got.temperature, got.count, got.ok, got.note, got.extra) == (
        "r", 1.5, 2, True, "n", None)


def test_a_batch_decodes_to_the_records_and_errors_of_one_record_at_a_time() -> None:
    decode = compiled_decoder(Reading, fallback=python_decode)
    assert decode is not None
    good = {"id": "r", "temperature": 1.5, "count": 2, "ok": True, "status": "OK",
            "time": "2024-03-01T12:00:00Z", "seen": "2024-03-01T12:00:01+00:00"}
    odd = {**good, "temperature": 2}  # an int where a float goes: msgspec takes it as the record does
    batch = [orjson.dumps(good), orjson.dumps(odd)]
    assert decode.many(batch) == [decode(b) for b in batch]  # type: ignore[attr-defined]
    with pytest.raises(DecodeError) as one:
        decode(orjson.dumps({**good, "status": "MAYBE"}))
    with pytest.raises(DecodeError) as many:
        decode.many([*batch, orjson.dumps({**good, "status": "MAYBE"})])  # type: ignore[attr-defined]
    assert str(many.value) == str(one.value)


class Plain(af.Record):
    """Fields msgspec decodes into by itself (no event time, nothing to build after it)."""

    id: str
    value: float


@settings(max_examples=100, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["id", "value", "other"]), JSON_VALUE),
                max_size=8))
def test_a_batch_of_a_record_msgspec_decodes_by_itself_is_its_records_one_at_a_time(
    docs: list[dict[str, Any]],
) -> None:
    def plain_python(data: bytes) -> Any:
        return Plain.decode_obj(orjson.loads(data))

    def outcome_of(data: bytes) -> tuple[str, Any]:
        try:
            return "record", decode(data).to_dict()
        except (DecodeError, TypeError, ValueError, OverflowError) as exc:
            return "error", f"{type(exc).__name__}: {exc}"

    decode = compiled_decoder(Plain, fallback=plain_python)
    assert decode is not None
    batch = [orjson.dumps(d) for d in docs]
    one_by_one = [outcome_of(b) for b in batch]
    try:
        many = decode.many(batch)  # type: ignore[attr-defined]
    except (DecodeError, TypeError, ValueError, OverflowError) as exc:
        # the first that fails, with the error it gets alone
        assert ("error", f"{type(exc).__name__}: {exc}") == next(
            o for o in one_by_one if o[0] == "error")
    else:
        assert [("record", r.to_dict()) for r in many] == one_by_one


def test_a_batch_goes_through_msgspec_once_a_record_around_the_ones_it_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[bytes] = []
    real = msgspec.json.Decoder

    class CountingDecoder:
        def __init__(self, tp: Any) -> None:
            self._decode = real(tp).decode

        def decode(self, data: bytes) -> Any:
            parsed.append(data)
            return self._decode(data)

    monkeypatch.setattr(msgspec.json, "Decoder", CountingDecoder)
    fell_back: list[bytes] = []

    def lenient(data: bytes) -> Any:
        fell_back.append(data)
        return ("taken the Python way", data)

    decode = compiled_decoder(Plain, fallback=lenient)
    assert decode is not None
    good = [orjson.dumps({"id": f"p{i}", "value": i}) for i in range(3)]
    refused = [orjson.dumps({"id": "x", "value": "not a float"}), b'{"id": 1}']
    batch = [good[0], refused[0], good[1], refused[1], good[2]]

    got = decode.many(batch)  # type: ignore[attr-defined]

    assert got == [Plain(id="p0", value=0.0), ("taken the Python way", refused[0]),
                   Plain(id="p1", value=1.0), ("taken the Python way", refused[1]),
                   Plain(id="p2", value=2.0)]
    assert parsed == batch  # each record parsed once, the ones before a refused one too
    assert fell_back == refused
