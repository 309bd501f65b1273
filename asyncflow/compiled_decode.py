"""Typed JSON decoding through msgspec: bytes straight to a ``Record``, checked in C.

A ``Record`` is a msgspec ``Struct``. When its fields have plain types
(``str``, ``int``, ``float``, ``bool``, ``dict``/``dict[str, Any]``,
``list``/``list[Any]``, ``Any``, ``Literal`` of strings or ints, ``X | None``
of those) and ``EventTime``, msgspec decodes the JSON into the record
itself, in one pass and without a dict in between; the record's
``__post_init__`` turns the event time into epoch ms. A record with
a ``datetime`` field gets a mirror ``Struct`` that takes the times as they
come (epoch seconds or ISO strings), and a generated function builds the
record from it. For ``benchmarks/memory_pipeline.py``'s 4-field reading the
record costs what msgspec's bare Struct costs (~280 ns here, against ~450-780
ns for the mirror and its build it replaced, and ~1,360 ns for orjson and the
generated Python decoder); with an ``EventTime`` from epoch seconds ~820 ns
(~1,010 ns before).

msgspec's rules for these types are ours (an ``int`` is no ``float`` for
``bool``, no ``float`` is an ``int``, ``1`` is a valid ``float``). Anything it
refuses goes through the Python decoder again, so a bad record gets the same
dead-letter reason as before (the field, what was expected, what came). A
record with any other field type (nested records, lists, unions of several
types) uses the Python decoder only.

Example:
    >>> from asyncflow.records import Record
    >>> class Reading(Record):
    ...     id: str
    ...     value: float
    >>> decode = compiled_decoder(Reading, fallback=None)
    >>> decode(b'{"id": "s1", "value": 2}')
    Reading(id='s1', value=2.0)
    >>> decode.many([b'{"id": "s2", "value": 3}'])
    [Reading(id='s2', value=3.0)]
"""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec

from asyncflow.records import (
    _FACTORY,
    EVENT_TIME,
    Record,
    _event_time_of,
    _parse_time,
    constructor_call,
)

_REFUSED = (msgspec.ValidationError, msgspec.DecodeError)
"""What msgspec raises for input it will not take: the Python decoder then says why."""

_TIME_INPUT = int | float | str
"""What a time field may hold in JSON: epoch seconds or an ISO-8601 string."""


def compiled_decoder(
    cls: type[Record], fallback: Callable[[bytes], Any] | None
) -> Callable[[bytes], Any] | None:
    """``decode(bytes) -> cls`` through msgspec, or ``None`` when a field type is not plain.

    A record msgspec refuses is handed to ``fallback`` (the Python decoder,
    for its error message); with no fallback, msgspec's error is raised. The
    function's ``many(datas)`` decodes a list of records the same way in one
    generated loop (what ``JsonCodec.decode_many`` uses): no Python call per
    record besides msgspec's parse.

    Example:
        >>> from asyncflow.records import Record
        >>> class Nested(Record):
        ...     inner: list[int]
        >>> compiled_decoder(Nested, fallback=None) is None
        True
    """
    try:
        hints = typing.get_type_hints(
            cls, include_extras=True, localns=vars(sys.modules[cls.__module__])
        )
    except (NameError, AttributeError, KeyError):
        return None  # unresolvable annotations: the Python decoder says what is wrong
    _event_time_of(cls, hints)  # the one the class found when it was made
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    kinds: list[str] = []  # per field: "value", "time" (the event time) or "datetime"
    mirrored = True  # whether a mirror Struct can take every field's input and default
    for f in cls._fields:
        tp = hints[f]
        is_event_time = get_origin(tp) is Annotated and EVENT_TIME in tp.__metadata__
        base = get_args(tp)[0] if get_origin(tp) is Annotated else tp
        if is_event_time or base is datetime:
            mirror: Any = _TIME_INPUT
            kinds.append("time" if is_event_time else "datetime")
        elif _optional_datetime(base):
            mirror = Union[_TIME_INPUT, None]  # noqa: UP007
            kinds.append("datetime")
        elif _plain(base):
            mirror = base
            kinds.append("value")
        else:
            return None
        if f not in cls._defaults:
            fields.append((f, mirror))
            continue
        default = cls._defaults[f]
        if isinstance(default, _FACTORY):
            default = msgspec.field(default_factory=default.factory)
        elif not isinstance(default, str | int | float | bool | None):
            mirrored = False
        if kinds[-1] == "datetime" and default is not None:
            mirrored = False  # a defaulted datetime: the Python decoder's
        fields.append((f, mirror if default is not None else Union[mirror, None], default))  # noqa: UP007
    if "datetime" not in kinds:  # msgspec builds the record itself (its __post_init__ the time)
        return _direct(cls, fallback)
    if not mirrored:
        return None
    # a mirror lives only until its fields move into the record: it is in no reference cycle,
    # so the collector need not track it (about 20 ns a record less)
    mirror_cls = msgspec.defstruct(f"_{cls.__name__}Mirror", fields, gc=False)
    structure = msgspec.json.Decoder(mirror_cls).decode
    build, many = _builder(cls, kinds, structure, fallback)

    def decode(data: bytes) -> Any:
        try:
            parsed = structure(data)
        except _REFUSED:
            if fallback is None:
                raise
            return fallback(data)
        return build(parsed)

    decode.many = many  # type: ignore[attr-defined]  # a batch at once: Codec.decode_many
    return decode


def _optional_datetime(tp: Any) -> bool:
    """Whether ``tp`` is ``datetime | None``."""
    if get_origin(tp) not in (Union, types.UnionType):
        return False
    args = get_args(tp)
    return len(args) == 2 and datetime in args and type(None) in args


def _plain(tp: Any) -> bool:
    """Whether msgspec checks ``tp`` exactly as ``asyncflow.records`` does."""
    if tp in (str, int, float, bool, dict, list, Any, object):
        return True
    origin = get_origin(tp)
    if origin is list or origin is dict:  # any list, any JSON object: checked as a whole
        return get_args(tp) in ((Any,), (object,), (str, Any), (str, object))
    if origin is Literal:
        return all(type(a) is str or type(a) is int for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return len(args) == 1 and len(get_args(tp)) == 2 and _plain(args[0])
    return False


def _direct(cls: type[Record], fallback: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """``decode`` (with its ``many``) of a record msgspec decodes into by itself."""
    structure = msgspec.json.Decoder(cls).decode

    def decode(data: bytes) -> Any:
        try:
            return structure(data)
        except _REFUSED:
            if fallback is None:
                raise
            return fallback(data)

    def many(datas: list[bytes]) -> list[Any]:
        out: list[Any] = []
        rest = iter(datas)
        while True:
            try:
                out.extend(map(structure, rest))  # the loop in C, while msgspec takes them
                return out
            except _REFUSED:
                if fallback is None:
                    raise
            # the one it refused (``extend`` kept those before it) the Python way; then on
            # from the next, so no record is decoded twice
            out.append(fallback(datas[len(out)]))

    decode.many = many  # type: ignore[attr-defined]  # a batch at once: Codec.decode_many
    return decode


def _builder(
    cls: type[Record], kinds: list[str], structure: Callable[[bytes], Any],
    fallback: Callable[[bytes], Any] | None,
) -> tuple[Callable[[Any], Any], Callable[[list[bytes]], list[Any]]]:
    """Generate ``build(mirror) -> record`` and ``many(datas) -> records``.

    ``build`` takes a parsed mirror's fields over (times parsed) into the
    record's constructor; ``many`` parses and builds a whole batch in one loop
    (no call per record but msgspec's and the constructor's), a record msgspec
    refuses going to ``fallback`` (or raising).
    """
    ns: dict[str, Any] = {
        "_cls": cls,
        "_parse_time": _parse_time,
        "_structure": structure,
        "_fallback": fallback,
        "_refused": _REFUSED,
    }
    lines = []
    values = []
    for i, (f, kind) in enumerate(zip(cls._fields, kinds, strict=True)):
        ns[f"_n{i}"] = f
        if kind == "time":
            values.append(f"s.{f}")  # as it came: the record's __post_init__ stores it
        elif kind == "datetime":
            lines += [f"    v{i} = s.{f}",
                      f"    if v{i} is not None: v{i} = _parse_time(v{i}, _n{i})[0]"]
            values.append(f"v{i}")
        else:
            values.append(f"s.{f}")
    lines.append("    self = " + constructor_call(cls, values))
    many = [
        "def many(datas):",
        "    out = []",
        "    add = out.append",
        "    for d in datas:",
        "        try:",
        "            s = _structure(d)",
        "        except _refused:",
        "            if _fallback is None:",
        "                raise",
        "            add(_fallback(d))",
        "            continue",
        *("    " + line for line in lines),
        "        add(self)",
        "    return out",
    ]
    code = ["def build(s):", *lines, "    return self", "", *many]
    exec("\n".join(code), ns)  # noqa: S102 - generated from the class's own field names
    return ns["build"], ns["many"]
