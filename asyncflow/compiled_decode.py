"""Typed JSON decoding through msgspec: bytes straight to a ``Record``, checked in C.

A ``Record`` whose fields have plain types (``str``, ``int``, ``float``,
``bool``, ``dict``, ``Any``, ``Literal`` of strings or ints, ``X | None`` of
those, ``datetime`` and ``EventTime``) gets a mirror ``msgspec.Struct``:
msgspec parses and checks the JSON in one pass, without a dict in between,
and a generated function moves the fields into the record (times become epoch
ms and a lazy ``datetime``, as ``asyncflow.records`` does). On this machine
that is 633 ns a record against 1,361 ns for orjson and the generated Python
decoder (4 fields, ``benchmarks/memory_pipeline.py``'s reading; 231 ns for
msgspec alone, 390 ns for orjson to a dict).

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
    _LAZY,
    _TIME_SLOT,
    EVENT_TIME,
    Record,
    _lazy_time,
    _parse_time,
    numeric_time_ms,
)

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
    # as the Python decoder does: annotations unresolved when the class was made are now
    cls._time_field = next(
        (f for f in cls._fields if EVENT_TIME in getattr(hints[f], "__metadata__", ())), None
    )
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    kinds: list[str] = []  # per field: "value", "time" (the event time) or "datetime"
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
        if f in cls._defaults:
            default = cls._defaults[f]
            if kinds[-1] == "time" or not isinstance(default, str | int | float | bool | None):
                return None  # a defaulted event time, mutable defaults: the Python decoder's
            if kinds[-1] == "datetime" and default is not None:
                return None
            fields.append((f, mirror if default is not None else Union[mirror, None], default))  # noqa: UP007
        else:
            fields.append((f, mirror))
    # a mirror lives only until its fields move into the record: it is in no reference cycle,
    # so the collector need not track it (about 20 ns a record less)
    mirror_cls = msgspec.defstruct(f"_{cls.__name__}Mirror", fields, gc=False)
    structure = msgspec.json.Decoder(mirror_cls).decode
    build, many = _builder(cls, kinds, structure, fallback)
    refused = (msgspec.ValidationError, msgspec.DecodeError)

    def decode(data: bytes) -> Any:
        try:
            parsed = structure(data)
        except refused:
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
    if tp in (str, int, float, bool, dict, Any, object):
        return True
    origin = get_origin(tp)
    if origin is Literal:
        return all(type(a) is str or type(a) is int for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return len(args) == 1 and len(get_args(tp)) == 2 and _plain(args[0])
    return False


def _builder(
    cls: type[Record], kinds: list[str], structure: Callable[[bytes], Any],
    fallback: Callable[[bytes], Any] | None,
) -> tuple[Callable[[Any], Any], Callable[[list[bytes]], list[Any]]]:
    """Generate ``build(mirror) -> record`` and ``many(datas) -> records``.

    ``build`` moves a parsed mirror's fields over and parses times; ``many``
    parses and builds a whole batch in one loop (no call per record but
    msgspec's), a record msgspec refuses going to ``fallback`` (or raising).
    """
    lazy = _lazy_time(cls, cls._time_field) if cls._time_field is not None else None
    ns: dict[str, Any] = {
        "_new": object.__new__,
        "_cls": cls,
        "_LAZY": _LAZY,
        "_parse_time": _parse_time,
        "_numeric_time_ms": numeric_time_ms,
        "_set_ms": Record.__dict__[_TIME_SLOT].__set__,
        "_structure": structure,
        "_fallback": fallback,
        "_refused": (msgspec.ValidationError, msgspec.DecodeError),
    }
    lines = ["    self = _new(_cls)"]
    # fields are stored as plain attributes unless the class has a __setattr__ of its own
    plain_setattr = cls.__setattr__ is object.__setattr__
    for i, (f, kind) in enumerate(zip(cls._fields, kinds, strict=True)):
        if kind == "time":
            assert lazy is not None
            ns[f"_s{i}"] = lazy.member.__set__
            ns[f"_n{i}"] = f
            lines += [
                f"    v = s.{f}",
                "    if type(v) is str:",
                f"        v, ms = _parse_time(v, _n{i})",
                "    else:",
                f"        ms = _numeric_time_ms(v, _n{i})",
                "        v = _LAZY",
                "    _set_ms(self, ms)",
                f"    _s{i}(self, v)",
            ]
            continue
        if kind == "datetime":
            ns[f"_s{i}"] = _slot_setter(cls, f)
            ns[f"_n{i}"] = f
            lines += [f"    v = s.{f}", f"    _s{i}(self, None if v is None else _parse_time(v, _n{i})[0])"]
        elif plain_setattr:  # a slot store in bytecode: no call per field
            lines.append(f"    self.{f} = s.{f}")
        else:
            ns[f"_s{i}"] = _slot_setter(cls, f)
            lines.append(f"    _s{i}(self, s.{f})")
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


def _slot_setter(cls: type, field: str) -> Callable[[Any, Any], None]:
    """The C-level setter of a field's slot (found along the class's bases)."""
    for klass in cls.__mro__:
        d = klass.__dict__.get(field)
        if isinstance(d, types.MemberDescriptorType):
            setter: Callable[[Any, Any], None] = d.__set__
            return setter
    return lambda obj, v: object.__setattr__(obj, field, v)
