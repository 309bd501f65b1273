"""Typed records: declare fields once, decode JSON fast, reject what does not fit.

A ``Record`` subclass lists its fields as annotations, those with defaults
after those without. It is a msgspec ``Struct`` (slots, a constructor in C):
msgspec decodes JSON straight into a record of plain fields and an event
time, and a record msgspec cannot take whole (nested records, typed lists,
``datetime`` fields) has a decoder generated once, so decoding costs a type
check per field (see ``asyncflow.compiled_decode``). A value that does not fit raises
``DecodeError`` naming the field, what was expected and what came, and the
core sends the raw record to the dead-letter output. Unknown fields in the
input are ignored. ``class R(Record, kw_only=True)`` and ``frozen=True`` are
the class options a record takes.

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
import inspect
import math
import operator
import sys
import types
import typing
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Literal,
    TypeVar,
    Union,
    get_args,
    get_origin,
)

import msgspec

from asyncflow.errors import DecodeError


class _EventTimeMarker:
    __slots__ = ()

    def __repr__(self) -> str:
        return "EVENT_TIME"


EVENT_TIME = _EventTimeMarker()
if TYPE_CHECKING:
    EventTime = Annotated[datetime, EVENT_TIME]
else:
    # what msgspec takes from JSON for it (epoch seconds or an ISO string): the record's
    # __post_init__ turns that into epoch ms, and reading the field gives a datetime
    EventTime = Annotated[int | float | str, EVENT_TIME]
    """Annotate one field with this to make it the record's event time."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
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


class _EpochMs(int):
    """An event time as a record's field holds it: epoch milliseconds.

    A type of its own, so a field holding one is never mistaken for epoch
    seconds given to the constructor (``msgspec.structs.replace`` and
    unpickling hand the stored value to the constructor again). It is an
    ``int`` in every other way: ``event_time_ms`` hands it over as it is.
    """

    __slots__ = ()


class _EpochMsAt(_EpochMs):
    """An event time given with an offset other than UTC's, or finer than a millisecond.

    Its value is the epoch ms, as for any event time; ``dt`` is the datetime
    as it was given, which reading the field gives back.
    """

    dt: datetime


def _stored(dt: datetime, ms: int) -> _EpochMs:
    """What an event-time field holds for an aware datetime whose epoch ms are ``ms``."""
    if dt.tzinfo is UTC and not dt.microsecond % 1000 and type(dt) is datetime:
        return _EpochMs(ms)  # read back equal, isoformat alike
    at = _EpochMsAt(ms)
    at.dt = dt
    return at


def _store_time(value: Any, field: str) -> _EpochMs:
    """What an event-time field holds for a time as it may come; ``DecodeError`` for no time."""
    if isinstance(value, _EpochMs):
        return value
    if type(value) is int or type(value) is float:
        return _EpochMs(numeric_time_ms(value, field))
    return _stored(*_parse_time(value, field))


class _LazyTime:
    """The event-time field of a record: epoch ms inside, a ``datetime`` when read.

    Whatever time comes (epoch seconds, an ISO-8601 string, a datetime), the
    field keeps its epoch milliseconds; from epoch seconds or a UTC time, a
    ``datetime`` is made from them only when the field is read (most
    pipelines only window on it, which needs the milliseconds), and a time
    with another offset reads back as it was given. Setting the field checks
    the time and stores it the same way.
    """

    __slots__ = ("member", "name")

    def __init__(self, member: Any, name: str) -> None:
        self.member = member
        self.name = name

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        v = self.member.__get__(obj)
        if type(v) is _EpochMsAt:
            return v.dt
        return _EPOCH + timedelta(milliseconds=_store_time(v, self.name))

    def __set__(self, obj: Any, value: Any) -> None:
        self.member.__set__(obj, _store_time(value, self.name))


_STORED_TIME = "_af_time_ms"
"""The class attribute that reads an event-time field's slot as stored (an ``_EpochMs``)."""


def _lazy_time(cls: type[Record], field: str) -> _LazyTime:
    """Make ``field`` the event time of ``cls``: a ``_LazyTime`` over its slot (once)."""
    found = None
    for klass in cls.__mro__:
        d = klass.__dict__.get(field)
        if d is not None:
            found = d
            break
    if isinstance(found, _LazyTime):
        lazy = found
    elif isinstance(found, types.MemberDescriptorType):
        lazy = _LazyTime(found, field)
        type.__setattr__(cls, field, lazy)
    else:
        raise TypeError(f"{cls.__name__}.{field}: an event-time field must be a plain field")
    cls._time_field = field
    # the slot itself under a second name: reading the epoch ms is one C-level attribute read
    type.__setattr__(cls, _STORED_TIME, lazy.member)
    cls._time_ms = operator.attrgetter(_STORED_TIME)
    return lazy


def _is_event_time(annotation: Any) -> bool:
    """Whether a field's annotation, resolved or still text, is ``EventTime``."""
    if isinstance(annotation, str):
        return annotation.replace(" ", "").rsplit(".", 1)[-1] == "EventTime"
    return EVENT_TIME in getattr(annotation, "__metadata__", ())


_MIN_S = MIN_TIME_MS / 1000
_MAX_S = MAX_TIME_MS / 1000


def _event_time_post_init(field: str, then: Callable[[Any], None] | None) -> tuple[
    Callable[[Any], None], Callable[[Any], None]
]:
    """A record's ``__post_init__`` that stores its event time as epoch ms, and its ``bind``.

    msgspec calls it after the constructor and after decoding JSON straight
    into the record, so every record holds its time alike (equal, hashed and
    copied alike), and a time that is none says so at once. ``bind(member)``
    gives it the field's slot once the class exists; ``then`` is the class's
    own ``__post_init__``, called after.
    """
    get: Any = None
    put: Any = None
    floor = math.floor
    from_iso = datetime.fromisoformat
    epoch, ms_unit = _EPOCH, _MS

    def __post_init__(self: Any) -> None:
        # the common inputs inline (about half the time of the general path); anything else,
        # and every input that is no time, goes through _store_time, which says what is wrong
        v = get(self)
        t = type(v)
        if t is not _EpochMs and t is not _EpochMsAt:
            if (t is float or t is int) and _MIN_S <= v <= _MAX_S:  # epoch seconds
                put(self, _EpochMs(v * 1000 if t is int else floor(v * 1000 + 0.001)))
            elif t is str and v[-1:] == "Z":  # ISO-8601 in UTC, as most sources send it
                try:
                    dt = from_iso(v)
                except ValueError:
                    dt = None
                if dt is not None and not dt.microsecond % 1000:
                    put(self, _EpochMs((dt - epoch) // ms_unit))
                else:
                    put(self, _store_time(v, field))
            else:
                put(self, _store_time(v, field))
        if then is not None:
            then(self)

    def bind(member: Any) -> None:
        nonlocal get, put
        get, put = member.__get__, member.__set__

    return __post_init__, bind


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


class _FactoryProbe(msgspec.Struct):
    made: list[Any] = []


_FACTORY = type(_FactoryProbe.__struct_defaults__[0])
"""How msgspec keeps a mutable default (``[]``, ``{}``): ``.factory()`` makes a fresh one."""

_CLASS_OPTIONS = ("kw_only", "frozen")
"""The class options a ``Record`` takes (``class R(af.Record, frozen=True)``)."""


class _RecordMeta(msgspec.StructMeta):
    """Makes each Record subclass a msgspec Struct and notes its fields and event time."""

    def __new__(
        mcs, name: str, bases: tuple[type, ...], ns: dict[str, Any], **options: Any
    ) -> _RecordMeta:
        other = sorted(set(options) - set(_CLASS_OPTIONS))
        if other:
            raise TypeError(
                f"{name}: a Record takes only {' and '.join(_CLASS_OPTIONS)} as class options, "
                f"not {', '.join(other)}"
            )
        own_times = [f for f, a in ns.get("__annotations__", {}).items() if _is_event_time(a)]
        inherited = next((t for b in bases if (t := getattr(b, "_time_field", None))), None)
        times = list(dict.fromkeys([*([inherited] if inherited else []), *own_times]))
        if len(times) > 1:
            raise TypeError(f"{name}: one EventTime field at most, not {', '.join(times)}")
        time_field = own_times[0] if own_times else inherited
        bind = None
        if time_field is not None and (own_times or "__post_init__" in ns):
            then = ns.get("__post_init__")
            if then is None:
                then = next((p for b in bases if (p := getattr(b, "__post_init__", None))), None)
                if getattr(then, "checks_event_time", False):
                    then = None  # a base's own check, done again by this one
            post_init, bind = _event_time_post_init(time_field, then)
            post_init.checks_event_time = True  # type: ignore[attr-defined]
            ns["__post_init__"] = post_init
        cls: Any = super().__new__(mcs, name, bases, ns, **options)
        fields: tuple[str, ...] = cls.__struct_fields__
        given = cls.__struct_defaults__
        cls._fields = fields
        cls._defaults = {
            f: d for f, d in zip(fields[len(fields) - len(given):], given, strict=True)
            if d is not msgspec.NODEFAULT
        }
        cls._decoder = None
        if time_field is not None:
            lazy = _lazy_time(cls, time_field)
            if bind is not None:
                bind(lazy.member)
        result: _RecordMeta = cls
        return result


def _event_time_of(cls: type[Record], hints: dict[str, Any]) -> str | None:
    """The event-time field by the resolved annotations; it must be the one the class found."""
    field = next(
        (f for f in cls._fields if EVENT_TIME in getattr(hints[f], "__metadata__", ())), None
    )
    if field != cls._time_field:
        raise TypeError(
            f"{cls.__name__}: annotate the event-time field as af.EventTime itself "
            "(not through another name), so the record knows it when the class is made"
        )
    return field


def _no_event_time(record: Any) -> int:
    raise TypeError(f"{type(record).__name__} has no EventTime field")


class Record(msgspec.Struct, metaclass=_RecordMeta):
    """Base class of typed stream values: a msgspec ``Struct``, decoded from JSON in C.

    Fields are declared as annotations; those with defaults come after those
    without (or the class says ``kw_only=True``). A record of plain fields is
    decoded by msgspec straight from the bytes; see ``asyncflow.compiled_decode``.

    Example:
        >>> class Ride(Record):
        ...     id: str
        ...     fare: float = 0.0
        >>> Ride("r1"), Ride.decode_obj({"id": "r2", "fare": 7}).fare
        (Ride(id='r1', fare=0.0), 7.0)
    """

    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, Any]] = {}
    _time_field: ClassVar[str | None] = None
    _time_ms: ClassVar[Callable[[Any], int]] = _no_event_time
    _decoder: ClassVar[Callable[[Any], Any] | None] = None

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

    def __repr__(self) -> str:
        body = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({body})"


def constructor_call(cls: type[Record], values: list[str]) -> str:
    """Source text calling ``_cls`` with ``values`` (one per field, in field order).

    Fields the constructor takes by position are given by position, the
    others (``kw_only``) by name.

    Example:
        >>> class P(Record, kw_only=True):
        ...     x: int
        >>> constructor_call(P, ["v0"])
        '_cls(x=v0)'
    """
    params = inspect.signature(cls).parameters
    by_field = dict(zip(cls._fields, values, strict=True))
    args = [by_field[n] if p.kind is p.POSITIONAL_OR_KEYWORD else f"{n}={by_field[n]}"
            for n, p in params.items()]
    return f"_cls({', '.join(args)})"


def _build_decoder(cls: type[Record]) -> Callable[[Any], Any]:
    """Generate a straight-line decoder for ``cls`` (once per class)."""
    hints = typing.get_type_hints(cls, include_extras=True, localns=vars(sys.modules[cls.__module__]))
    time_field = _event_time_of(cls, hints)
    ns: dict[str, Any] = {
        "_cls": cls,
        "DecodeError": DecodeError,
        "_MISSING": _MISSING,
        "_dict": dict,
        "_obj_msg": f"expected a JSON object for {cls.__name__}, got ",
    }
    lines = [
        "def decode(obj):",
        "    if type(obj) is not _dict:",
        "        raise DecodeError(_obj_msg + type(obj).__name__)",
        "    get = obj.get",
    ]
    for i, f in enumerate(cls._fields):
        tp = hints[f]
        base = get_args(tp)[0] if get_origin(tp) is Annotated else tp
        ns[f"_n{i}"] = f
        ns[f"_m{i}"] = f"missing field {f!r} for {cls.__name__}"
        ns[f"_e{i}"] = f"field {f!r}: expected {getattr(base, '__name__', base)}, got "
        v = f"v{i}"
        lines.append(f"    {v} = get(_n{i}, _MISSING)")
        if f in cls._defaults:
            default = cls._defaults[f]
            if isinstance(default, _FACTORY):
                ns[f"_d{i}"] = default.factory
                lines.append(f"    if {v} is _MISSING: {v} = _d{i}()")
            else:
                ns[f"_d{i}"] = default
                lines.append(f"    if {v} is _MISSING: {v} = _d{i}")
            lines.append("    else:")
            ind = "        "
        else:
            lines.append(f"    if {v} is _MISSING: raise DecodeError(_m{i})")
            ind = "    "
        err = f"raise DecodeError(_e{i} + type({v}).__name__)"
        if f == time_field:  # any time as it came: the record's __post_init__ checks and stores it
            lines.append(f"{ind}pass")
        elif base is str:
            lines.append(f"{ind}if type({v}) is not str: {err}")
        elif base is float:
            lines.append(f"{ind}if type({v}) is not float:")
            lines.append(f"{ind}    if type({v}) is int: {v} = float({v})")
            lines.append(f"{ind}    else: {err}")
        elif base is int:
            lines.append(f"{ind}if type({v}) is not int: {err}")
        else:
            ns[f"_c{i}"] = _checker(tp, f)
            lines.append(f"{ind}{v} = _c{i}({v})")
    lines.append("    return " + constructor_call(cls, [f"v{i}" for i in range(len(cls._fields))]))
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
    return type(record)._time_ms(record)


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
