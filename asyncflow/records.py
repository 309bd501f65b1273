"""Typed records: declare fields once, decode JSON fast, reject what does not fit.

A ``Record`` subclass lists its fields as annotations. Instances use slots; the
decoder for each class is generated once, so decoding costs a type check and a
store per field. A value that does not fit raises ``DecodeError`` naming the
field, what was expected and what came, and the core sends the raw record to
the dead-letter output. Unknown fields in the input are ignored.

Supported field types: ``str``, ``int``, ``float`` (ints accepted), ``bool``,
``datetime`` and ``EventTime`` (tz-aware datetime, ISO-8601 string with an
offset, or epoch seconds), ``X | None``, ``list``/``list[X]``, ``dict``,
``Literal[...]``, nested ``Record`` types and ``Any``.

Example:
    >>> class Reading(Record):
    ...     id: str
    ...     value: float
    ...     time: EventTime
    >>> r = Reading.decode_obj({"id": "s1", "value": 3, "time": 1700000000})
    >>> r.value, r.time.isoformat(), event_time_ms(r)
    (3.0, '2023-11-14T22:13:20+00:00', 1700000000000)
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from asyncflow.errors import DecodeError


class _EventTimeMarker:
    __slots__ = ()

    def __repr__(self) -> str:
        return "EVENT_TIME"


EVENT_TIME = _EventTimeMarker()
EventTime = Annotated[datetime, EVENT_TIME]
"""Annotate one field with this to make it the record's event time."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_TIME_SLOT = "_af_time_ms"
MIN_TIME_MS = -62_135_596_800_000
"""0001-01-01T00:00:00Z in epoch ms: the earliest event time a ``datetime`` can hold."""
MAX_TIME_MS = 253_402_300_799_999
"""9999-12-31T23:59:59.999Z in epoch ms: the latest event time a ``datetime`` can hold."""
TIME_UNITS = {"s": 1000, "ms": 1, "us": 0.001, "ns": 0.000_001}
"""Numeric event times: the unit's name and how many milliseconds one of it is."""
_UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}


def floor_ms(ms: float) -> int:
    """The millisecond a time of ``ms`` milliseconds falls in (floored, as for datetimes).

    Floored, not rounded: 44.9998 s is in the window that ends at 45 s. A
    thousandth of a millisecond of tolerance absorbs a float's representation
    error (1.001 s times 1000 is 1000.9999999999999).

    Example:
        >>> floor_ms(44_999.77), floor_ms(1.001 * 1000), floor_ms(-0.5)
        (44999, 1001, -1)
    """
    return ms if type(ms) is int else math.floor(ms + 0.001)


def numeric_time_ms(value: float, field: str, unit: str = "s") -> int:
    """Epoch ms of a numeric event time in ``unit``; ``DecodeError`` naming ``field`` if it is none.

    A value that cannot be a time in that unit (before year 1 or after 9999,
    NaN, infinite) is an error that says so, with the units that would fit.

    Example:
        >>> numeric_time_ms(1.5, "time"), numeric_time_ms(1_500, "time", "ms")
        (1500, 1500)
        >>> numeric_time_ms(1_700_000_000_000, "time")
        Traceback (most recent call last):
        ...
        asyncflow.errors.DecodeError: field 'time': 1700000000000 is not a time in epoch seconds (it would be after the year 9999); if the field holds milliseconds, say so (time_unit='ms')
    """
    try:
        ms = floor_ms(value * TIME_UNITS[unit])
    except (OverflowError, ValueError):
        raise DecodeError(f"field {field!r}: {value!r} is not a time") from None
    if MIN_TIME_MS <= ms <= MAX_TIME_MS:
        return ms
    fits = [u for u, per in TIME_UNITS.items() if MIN_TIME_MS <= value * per <= MAX_TIME_MS
            and per < TIME_UNITS[unit]]
    hint = (f"; if the field holds {_UNIT_NAMES[fits[0]]}, say so (time_unit={fits[0]!r})"
            if fits else "")
    when = "after the year 9999" if ms > MAX_TIME_MS else "before the year 1"
    raise DecodeError(
        f"field {field!r}: {value!r} is not a time in epoch {_UNIT_NAMES[unit]} "
        f"(it would be {when}){hint}"
    )
_MISSING: Any = object()
_LAZY: Any = object()
"""In an event-time slot: the datetime is made from the epoch ms when first read."""


class _LazyTime:
    """The event-time field of a record: epoch ms inside, a ``datetime`` when read.

    A numeric input time (epoch seconds) is kept as milliseconds; the
    ``datetime`` is built only if the field is read (most pipelines only
    window on it, which needs the milliseconds). Setting the field parses the
    time again and updates both.
    """

    __slots__ = ("member", "name", "ms")

    def __init__(self, member: Any, ms: Any, name: str) -> None:
        self.member = member
        self.ms = ms
        self.name = name

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        v = self.member.__get__(obj, owner)
        if v is _LAZY:
            v = _EPOCH + timedelta(milliseconds=self.ms.__get__(obj, owner))
            self.member.__set__(obj, v)
        return v

    def __set__(self, obj: Any, value: Any) -> None:
        dt, ms = _parse_time(value, self.name)
        self.member.__set__(obj, dt)
        self.ms.__set__(obj, ms)


def _lazy_time(cls: type, field: str) -> _LazyTime:
    """Put a ``_LazyTime`` over the slot of ``cls``'s event-time field (once)."""
    found = None
    for klass in cls.__mro__:
        d = klass.__dict__.get(field)
        if d is not None:
            found = d
            break
    if isinstance(found, _LazyTime):
        return found
    if not isinstance(found, types.MemberDescriptorType):
        raise TypeError(f"{cls.__name__}.{field}: an event-time field must be a plain field")
    lazy = _LazyTime(found, Record.__dict__[_TIME_SLOT], field)
    setattr(cls, field, lazy)
    return lazy
R = TypeVar("R", bound="Record")


def datetime_to_ms(value: datetime) -> int:
    """Epoch milliseconds of a tz-aware datetime; a naive one is an error.

    Example:
        >>> datetime_to_ms(datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC))
        1000
    """
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise DecodeError(
            f"naive datetime {value.isoformat()} has no timezone: "
            "give event times with an offset (e.g. '...Z' or '+00:00') or as epoch seconds"
        )
    return (value - _EPOCH) // _MS


def _parse_time(value: Any, field: str) -> tuple[datetime, int]:
    """Turn an input time (datetime, ISO string, epoch seconds) into (datetime, epoch ms)."""
    if type(value) is str:
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise DecodeError(f"field {field!r}: {value!r} is not an ISO-8601 time") from None
    elif type(value) is int or type(value) is float:
        ms = numeric_time_ms(value, field)
        return _EPOCH + timedelta(milliseconds=ms), ms
    elif isinstance(value, datetime):
        dt = value
    else:
        raise DecodeError(
            f"field {field!r}: expected a time (ISO string or epoch seconds), "
            f"got {type(value).__name__}"
        )
    try:
        return dt, datetime_to_ms(dt)
    except DecodeError as exc:
        raise DecodeError(f"field {field!r}: {exc}") from None


def _type_error(field: str, expected: str, value: Any) -> DecodeError:
    return DecodeError(f"field {field!r}: expected {expected}, got {type(value).__name__} {value!r:.60}")


def _checker(tp: Any, field: str) -> Callable[[Any], Any]:
    """A function that validates and converts one decoded JSON value to ``tp``."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _checker(get_args(tp)[0], field)
    if tp is Any or tp is object:
        return lambda v: v
    if tp is str or tp is bool or tp is dict:
        name = tp.__name__

        def check_exact(v: Any, _t: type = tp) -> Any:
            if type(v) is not _t:
                raise _type_error(field, name, v)
            return v

        return check_exact
    if tp is int:

        def check_int(v: Any) -> Any:
            if type(v) is not int:
                raise _type_error(field, "int", v)
            return v

        return check_int
    if tp is float:

        def check_float(v: Any) -> Any:
            t = type(v)
            if t is float:
                return v
            if t is int:
                return float(v)
            raise _type_error(field, "float", v)

        return check_float
    if tp is datetime:
        return lambda v: _parse_time(v, field)[0]
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = _checker(args[0] if len(args) == 1 else Union[tuple(args)], field)  # noqa: UP007
        if len(args) > 1:
            checks = [_checker(a, field) for a in args]

            def check_union(v: Any) -> Any:
                for c in checks:
                    try:
                        return c(v)
                    except DecodeError:
                        pass
                raise _type_error(field, str(tp), v)

            inner = check_union
        return lambda v: None if v is None else inner(v)
    if tp is list or origin is list:
        item_args = get_args(tp)
        item = _checker(item_args[0], field) if item_args else None

        def check_list(v: Any) -> Any:
            if type(v) is not list:
                raise _type_error(field, "list", v)
            return v if item is None else [item(x) for x in v]

        return check_list
    if origin is dict:
        return _checker(dict, field)
    if origin is Literal:
        allowed = frozenset(get_args(tp))

        def check_literal(v: Any) -> Any:
            if v not in allowed:
                raise DecodeError(f"field {field!r}: {v!r} is not one of {sorted(map(str, allowed))}")
            return v

        return check_literal
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.decode_obj
    raise TypeError(f"field {field!r}: asyncflow records do not support the type {tp!r}")


class _RecordMeta(type):
    """Gives each Record subclass slots for its annotated fields."""

    def __new__(mcs, name: str, bases: tuple[type, ...], ns: dict[str, Any]) -> _RecordMeta:
        annotations = ns.get("__annotations__", {})
        fields = [
            f
            for f, a in annotations.items()
            if not (isinstance(a, str) and a.startswith(("ClassVar", "typing.ClassVar")))
            and get_origin(a) is not ClassVar
        ]
        defaults = {f: ns.pop(f) for f in fields if f in ns}
        ns["__slots__"] = tuple(ns.get("__slots__", ())) + tuple(fields)
        ns["_own_defaults"] = defaults
        return super().__new__(mcs, name, bases, ns)


class Record(metaclass=_RecordMeta):
    """Base class of typed stream values (slots, orjson underneath).

    Example:
        >>> class Ride(Record):
        ...     id: str
        ...     fare: float = 0.0
        >>> Ride("r1"), Ride.decode_obj({"id": "r2", "fare": 7}).fare
        (Ride(id='r1', fare=0.0), 7.0)
    """

    __slots__ = (_TIME_SLOT,)
    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, Any]] = {}
    _time_field: ClassVar[str | None] = None
    _decoder: ClassVar[Callable[[Any], Any] | None] = None
    _own_defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields: list[str] = []
        defaults: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            if klass is Record or not issubclass(klass, Record):
                continue
            for f in klass.__slots__:
                if f not in fields:
                    fields.append(f)
            defaults.update(klass.__dict__.get("_own_defaults", {}))
        cls._fields = tuple(fields)
        cls._defaults = defaults
        cls._decoder = None
        hints = typing.get_type_hints(cls, include_extras=True) if _resolvable(cls) else {}
        cls._time_field = next(
            (f for f in fields if f in hints and EVENT_TIME in getattr(hints[f], "__metadata__", ())),
            None,
        )
        if cls._time_field is not None:
            _lazy_time(cls, cls._time_field)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__} takes {len(fields)} fields, got {len(args)}")
        for name, value in zip(fields, args, strict=False):
            object.__setattr__(self, name, value)
        for name in fields[len(args) :]:
            if name in kwargs:
                value = kwargs.pop(name)
            elif name in self._defaults:
                value = self._defaults[name]
            else:
                raise TypeError(f"{type(self).__name__} missing field {name!r}")
            object.__setattr__(self, name, value)
        if kwargs:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(kwargs))!r}")

    @classmethod
    def decode_obj(cls: type[R], obj: Any) -> R:
        """Build an instance from a decoded JSON object, checking every field's type."""
        decoder = cls._decoder
        if decoder is None:
            decoder = cls._decoder = _build_decoder(cls)
        result: R = decoder(obj)
        return result

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (nested records stay records; see ``to_builtins``)."""
        return {f: getattr(self, f) for f in self._fields}

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self._fields)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        body = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({body})"


def _resolvable(cls: type) -> bool:
    try:
        typing.get_type_hints(cls, include_extras=True)
        return True
    except (NameError, AttributeError):
        return False


def _build_decoder(cls: type[Record]) -> Callable[[Any], Any]:
    """Generate a straight-line decoder for ``cls`` (once per class)."""
    hints = typing.get_type_hints(cls, include_extras=True, localns=vars(sys.modules[cls.__module__]))
    cls._time_field = next(
        (f for f in cls._fields if EVENT_TIME in getattr(hints[f], "__metadata__", ())), None
    )
    lazy = _lazy_time(cls, cls._time_field) if cls._time_field is not None else None
    ns: dict[str, Any] = {
        "_LAZY": _LAZY,
        "_numeric_time_ms": numeric_time_ms,
        "_time_set": None if lazy is None else lazy.member.__set__,
        "_new": object.__new__,
        "_cls": cls,
        "_set": object.__setattr__,
        "DecodeError": DecodeError,
        "_MISSING": _MISSING,
        "_parse_time": _parse_time,
        "_dict": dict,
        "_TIME_SLOT": _TIME_SLOT,
        "_obj_msg": f"expected a JSON object for {cls.__name__}, got ",
    }
    lines = [
        "def decode(obj):",
        "    if type(obj) is not _dict:",
        "        raise DecodeError(_obj_msg + type(obj).__name__)",
        "    self = _new(_cls)",
        "    get = obj.get",
    ]
    for i, f in enumerate(cls._fields):
        tp = hints[f]
        base = get_args(tp)[0] if get_origin(tp) is Annotated else tp
        ns[f"_n{i}"] = f
        ns[f"_m{i}"] = f"missing field {f!r} for {cls.__name__}"
        ns[f"_e{i}"] = f"field {f!r}: expected {getattr(base, '__name__', base)}, got "
        lines.append(f"    v = get(_n{i}, _MISSING)")
        if f in cls._defaults:
            ns[f"_d{i}"] = cls._defaults[f]
            lines.append(f"    if v is _MISSING: v = _d{i}")
            lines.append("    else:")
            ind = "        "
        else:
            lines.append(f"    if v is _MISSING: raise DecodeError(_m{i})")
            ind = "    "
        err = f"raise DecodeError(_e{i} + type(v).__name__)"
        if f == cls._time_field:
            lines.append(f"{ind}if type(v) is float or type(v) is int:")  # epoch seconds
            lines.append(f"{ind}    ms = _numeric_time_ms(v, _n{i})")
            lines.append(f"{ind}    v = _LAZY")
            lines.append(f"{ind}else: v, ms = _parse_time(v, _n{i})")
            lines.append(f"{ind}_set(self, _TIME_SLOT, ms)")
            lines.append("    _time_set(self, v)")
            continue
        elif base is str:
            lines.append(f"{ind}if type(v) is not str: {err}")
        elif base is float:
            lines.append(f"{ind}if type(v) is not float:")
            lines.append(f"{ind}    if type(v) is int: v = float(v)")
            lines.append(f"{ind}    else: {err}")
        elif base is int:
            lines.append(f"{ind}if type(v) is not int: {err}")
        else:
            ns[f"_c{i}"] = _checker(tp, f)
            lines.append(f"{ind}v = _c{i}(v)")
        lines.append(f"    _set(self, _n{i}, v)")
    lines.append("    return self")
    exec("\n".join(lines), ns)  # noqa: S102 - generated from the class's own field names
    decoder: Callable[[Any], Any] = ns["decode"]
    return decoder


def event_time_ms(record: Record) -> int:
    """The event time (epoch ms) of a record with an ``EventTime`` field.

    Example:
        >>> class E(Record):
        ...     t: EventTime
        >>> event_time_ms(E(t=1.5))
        1500
    """
    ms: int = getattr(record, _TIME_SLOT)
    return ms


def to_builtins(value: Any) -> Any:
    """Turn records and dataclasses (recursively) into dicts, ready for JSON or a sink.

    Example:
        >>> class P(Record):
        ...     x: int
        >>> to_builtins({"p": P(1), "l": [P(2)]})
        {'p': {'x': 1}, 'l': [{'x': 2}]}
    """
    if isinstance(value, Record):
        return {f: to_builtins(getattr(value, f)) for f in value._fields}
    if isinstance(value, dict):
        return {k: to_builtins(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_builtins(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_builtins(dataclasses.asdict(value))
    return value
