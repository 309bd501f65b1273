"""How state keys and values become bytes (for the local store and the changelog).

Keys are JSON through orjson (strings, numbers, booleans, ``None`` and tuples of
these; a tuple comes back as a tuple, so it stays hashable); ``bytes`` keys are
stored as they are behind a zero byte. Values are JSON too, with two tagged
forms so that what goes in comes back the same: a datetime is
``{"__af_dt__": iso}``, a record ``{"__af_record__": name, "fields": {...}}``
(decoded again through its class, if that class is defined in the process;
else left a dict), and a dict whose keys are not all strings (an accumulator
counting by auction id) ``{"__af_map__": [[key, value], ...]}``. Sets become lists. A table declared with a ``value_type`` or ``codec`` uses that codec
instead, so typed values come back typed. State is never pickled: a changelog
topic is readable by whoever can read the broker, and unpickling what it holds
would run whatever code was written to it.

Example:
    >>> decode_key(encode_key(("sensor-1", 7)))
    ('sensor-1', 7)
    >>> decode_key(encode_key(b"\\x00raw"))
    b'\\x00raw'
    >>> JSON_VALUES.decode(JSON_VALUES.encode({"n": 1}))
    {'n': 1}
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from asyncflow.codecs import RIGHT_SIZED, Codec
from asyncflow.records import Record

_BYTES = b"\x00"


_DT = "__af_dt__"
_REC = "__af_record__"
_MAP = "__af_map__"
_TAGGED = b'"__af_'


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return {_DT: value.isoformat()}
    if isinstance(value, Record):
        cls = type(value)
        fields = {f: getattr(value, f) for f in value._fields}
        return {_REC: f"{cls.__module__}.{cls.__qualname__}", "fields": fields}
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    raise TypeError(
        f"a {type(value).__name__} cannot be kept in state; use JSON values (str, int, float, "
        "bool, None, list, dict), records, or give the table a codec"
    )


def _tuples(value: Any) -> Any:
    if type(value) is list:
        return tuple(_tuples(v) for v in value)
    return value


_VALUE_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | RIGHT_SIZED


def encode_key(key: Any) -> bytes:
    """The bytes a key is stored under.

    Example:
        >>> encode_key("a"), encode_key(("a", 1))
        (b'"a"', b'["a",1]')
    """
    if type(key) is bytes:
        return _BYTES + key
    # a right-sized copy: what orjson returns keeps a ~4 KB allocation alive behind it
    return orjson.dumps(key, default=_default, option=RIGHT_SIZED)[:-1]


def decode_key(data: bytes) -> Any:
    """The key ``encode_key`` turned into ``data``.

    Example:
        >>> decode_key(b'["a",1]')
        ('a', 1)
    """
    if data[:1] == _BYTES:
        return data[1:]
    return _tuples(orjson.loads(data))


def _record_classes() -> dict[str, type[Record]]:
    out: dict[str, type[Record]] = {}
    todo = list(Record.__subclasses__())
    while todo:
        cls = todo.pop()
        out[f"{cls.__module__}.{cls.__qualname__}"] = cls
        todo.extend(cls.__subclasses__())
    return out


def _keyed_maps(value: Any) -> Any:
    """``value`` with every dict whose keys are not all strings as a tagged list of pairs."""
    if type(value) is dict:
        if all(type(k) is str for k in value):
            return {k: _keyed_maps(v) for k, v in value.items()}
        return {_MAP: [[k, _keyed_maps(v)] for k, v in value.items()]}
    if type(value) is list or type(value) is tuple:
        return [_keyed_maps(v) for v in value]
    return value


def _untag(value: Any, classes: dict[str, type[Record]] | None) -> Any:
    if type(value) is dict:
        if len(value) == 1 and _DT in value:
            return datetime.fromisoformat(value[_DT])
        if len(value) == 1 and _MAP in value:
            return {_tuples(k): _untag(v, classes) for k, v in value[_MAP]}
        if _REC in value and len(value) == 2:
            if classes is None:
                classes = _record_classes()
            cls = classes.get(value[_REC])
            fields = {k: _untag(v, classes) for k, v in value["fields"].items()}
            return cls(**fields) if cls is not None else fields
        return {k: _untag(v, classes) for k, v in value.items()}
    if type(value) is list:
        return [_untag(v, classes) for v in value]
    return value


class JsonValues(Codec[Any]):
    """The default value codec of state: orjson; datetimes and records come back as they went in.

    Example:
        >>> from datetime import UTC, datetime
        >>> codec = JsonValues()
        >>> codec.encode([1, 2.5, None])
        b'[1,2.5,null]'
        >>> codec.decode(codec.encode({"at": datetime(2024, 1, 2, tzinfo=UTC)}))
        {'at': datetime.datetime(2024, 1, 2, 0, 0, tzinfo=datetime.timezone.utc)}
        >>> codec.decode(codec.encode([5000, {7: 2, ("a", 1): 1}]))
        [5000, {7: 2, ('a', 1): 1}]
    """

    def encode(self, value: Any) -> bytes:
        # a right-sized copy (see encode_key): state values are kept until written
        try:
            try:
                data = orjson.dumps(value, default=_default, option=_VALUE_OPTIONS)
            except TypeError as exc:
                if "Dict key must be str" not in str(exc):
                    raise
                data = orjson.dumps(_keyed_maps(value), default=_default, option=_VALUE_OPTIONS)
        except orjson.JSONEncodeError as exc:
            if isinstance(exc.__cause__, TypeError):
                raise exc.__cause__ from None  # _default's reason: what cannot be kept, and why
            raise
        return data[:-1]

    def decode(self, data: bytes) -> Any:
        value = orjson.loads(data)
        if _TAGGED in data:
            return _untag(value, None)
        return value


JSON_VALUES = JsonValues()
"""The codec state values use unless their table names another."""
