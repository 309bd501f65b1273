"""How state keys and values become bytes (for the local store and the changelog).

Keys are JSON through orjson (strings, numbers, booleans, ``None`` and tuples of
these; a tuple comes back as a tuple, so it stays hashable); ``bytes`` keys are
stored as they are behind a zero byte. Values are JSON too: records and
dataclasses become dicts (``to_builtins``), datetimes ISO-8601 strings, sets
lists. A table declared with a ``value_type`` or ``codec`` uses that codec
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

from typing import Any

import orjson

from asyncflow.codecs import Codec
from asyncflow.records import Record, to_builtins

_BYTES = b"\x00"


def _default(value: Any) -> Any:
    if isinstance(value, Record):
        return to_builtins(value)
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


def encode_key(key: Any) -> bytes:
    """The bytes a key is stored under.

    Example:
        >>> encode_key("a"), encode_key(("a", 1))
        (b'"a"', b'["a",1]')
    """
    if type(key) is bytes:
        return _BYTES + key
    return orjson.dumps(key, default=_default)


def decode_key(data: bytes) -> Any:
    """The key ``encode_key`` turned into ``data``.

    Example:
        >>> decode_key(b'["a",1]')
        ('a', 1)
    """
    if data[:1] == _BYTES:
        return data[1:]
    return _tuples(orjson.loads(data))


class JsonValues(Codec[Any]):
    """The default value codec of state: orjson, records as dicts.

    Example:
        >>> JsonValues().encode([1, 2.5, None])
        b'[1,2.5,null]'
    """

    def encode(self, value: Any) -> bytes:
        return orjson.dumps(value, default=_default)

    def decode(self, data: bytes) -> Any:
        return orjson.loads(data)


JSON_VALUES = JsonValues()
"""The codec state values use unless their table names another."""
