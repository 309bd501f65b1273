"""Codecs turn record bytes into values and back: JSON (orjson), raw bytes, str.

Example:
    >>> codec = json_codec()
    >>> codec.decode(b'{"a": 1}'), codec.encode({"a": 1})
    ({'a': 1}, b'{"a":1}')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import orjson

from asyncflow.errors import DecodeError
from asyncflow.records import Record, to_builtins

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Codec(Protocol[T]):
    """Decodes bytes to values of one type and encodes them back.

    A topic's ``codec=`` takes any object with these two methods; ``decode``
    raises ``DecodeError`` for bytes that are not a value (the record then
    goes to the dead letters with that reason).

    Example (comma-separated pairs):
        >>> import asyncflow as af
        >>> class PairCodec:
        ...     def decode(self, data):
        ...         a, b = data.split(b",")
        ...         return int(a), int(b)
        ...     def encode(self, value):
        ...         return b"%d,%d" % value
        >>> codec = PairCodec()
        >>> codec.decode(codec.encode((2, 3)))
        (2, 3)
        >>> af.App("a").topic("pairs", codec=codec).codec is codec
        True
    """

    def decode(self, data: bytes) -> T:
        """The value ``data`` holds; ``DecodeError`` with the reason if it holds none."""
        ...

    def encode(self, value: T) -> bytes:
        """``value`` as bytes that ``decode`` turns back into it."""
        ...


def _default(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    return to_builtins(value) if not isinstance(value, type) else str(value)


RIGHT_SIZED = orjson.OPT_APPEND_NEWLINE
"""The orjson option behind a cheap right-sized copy: ``orjson.dumps(v, option=RIGHT_SIZED)[:-1]``.

What ``orjson.dumps`` returns holds a ~4 KB allocation however short the
text: thousands of them waiting in a sink buffer are megabytes, and made and
freed at that rate they cost ~3 us each. A slice is a new object of exactly
its size; ending the text with a newline and slicing it off copies it in one
step (~90 ns), where ``bytes(memoryview(...))`` takes ~330 ns.

Example:
    >>> orjson.dumps({"a": 1}, option=RIGHT_SIZED)[:-1]
    b'{"a":1}'
"""


def dumps(value: Any) -> bytes:
    """JSON-encode a value, records and dataclasses included.

    Example:
        >>> dumps({"x": 1.5})
        b'{"x":1.5}'
    """
    return orjson.dumps(value, default=_default)


class JsonCodec(Generic[T]):
    """JSON through orjson; with a ``Record`` type, fields are checked on decode.

    A record type with plain fields decodes through msgspec, bytes straight
    to the record (``asyncflow.compiled_decode``); any other, and any record
    msgspec refuses, through orjson and the record's generated decoder.

    Example:
        >>> JsonCodec().decode(b"[1, 2]")
        [1, 2]
    """

    __slots__ = ("decode", "decode_many", "value_type")

    def __init__(self, value_type: type[T] | None = None) -> None:
        self.value_type = value_type
        if value_type is not None and issubclass(value_type, Record):
            build = value_type.decode_obj

            def decode_record(data: bytes) -> Any:
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError as exc:
                    raise DecodeError(f"malformed JSON: {exc}") from None
                return build(obj)

            record_type = value_type

            compiled = False

            def compile_once() -> None:
                # a caller may hold on to a first_* function for a whole batch: compile once
                nonlocal compiled
                if not compiled:
                    self._compile(record_type, decode_record)
                    compiled = True

            def first_decode(data: bytes) -> Any:
                compile_once()
                return self.decode(data)

            def first_decode_many(datas: list[bytes]) -> list[Any]:
                compile_once()
                return self.decode_many(datas)

            # the decoder is built at the first record, once the record's module is complete
            self.decode: Callable[[bytes], T] = first_decode
            self.decode_many: Callable[[list[bytes]], list[T]] = first_decode_many
        else:

            def decode_plain(data: bytes) -> Any:
                try:
                    return orjson.loads(data)
                except orjson.JSONDecodeError as exc:
                    raise DecodeError(f"malformed JSON: {exc}") from None

            self.decode = decode_plain

            def decode_plain_many(datas: list[bytes]) -> list[Any]:
                return list(map(orjson.loads, datas))

            self.decode_many = decode_plain_many

    def _compile(self, record_type: type[Record], python_decode: Callable[[bytes], Any]) -> None:
        """Pick the record decoder: msgspec's where the fields allow, else the Python one."""
        from asyncflow.compiled_decode import compiled_decoder

        decode = compiled_decoder(record_type, fallback=python_decode) or python_decode
        self.decode = decode
        many = getattr(decode, "many", None)  # the compiled decoder's batch loop
        if many is None:

            def many(datas: list[bytes]) -> list[Any]:
                return list(map(decode, datas))

        self.decode_many = many

    def encode(self, value: T) -> bytes:
        """``value`` as JSON (a ``Record`` as its fields)."""
        # a right-sized copy (RIGHT_SIZED): orjson's result keeps a ~4 KB allocation alive
        # behind it, which adds up while records wait in sink buffers
        return orjson.dumps(value, default=_default, option=RIGHT_SIZED)[:-1]


class RawCodec:
    """Bytes in, bytes out.

    Example:
        >>> RawCodec().decode(b"x")
        b'x'
    """

    __slots__ = ()

    def decode(self, data: bytes) -> bytes:
        """``data`` itself."""
        return data

    def encode(self, value: bytes) -> bytes:
        """``value`` itself (``TypeError`` if it is not bytes)."""
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"the raw codec sends bytes, got {type(value).__name__}")
        return bytes(value)


class StrCodec:
    """UTF-8 text.

    Example:
        >>> StrCodec().encode("é")
        b'\\xc3\\xa9'
    """

    __slots__ = ()

    def decode(self, data: bytes) -> str:
        """``data`` as text; ``DecodeError`` if it is not UTF-8."""
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise DecodeError(f"not UTF-8 text: {exc}") from None

    def encode(self, value: str) -> bytes:
        """``value`` as UTF-8."""
        return str(value).encode()


def json_codec(value_type: type[T] | None = None) -> JsonCodec[T]:
    """A JSON codec, typed when ``value_type`` is a ``Record``.

    Example:
        >>> json_codec().decode(b"1")
        1
    """
    return JsonCodec(value_type)


def codec_for(name_or_codec: str | Codec[Any] | None, value_type: type[Any] | None) -> Codec[Any]:
    """Pick a codec: by name ("json", "raw", "str"), a codec object, or JSON by default.

    Example:
        >>> type(codec_for("raw", None)).__name__
        'RawCodec'
    """
    if name_or_codec is None or name_or_codec == "json":
        return JsonCodec(value_type)
    if name_or_codec == "raw":
        return RawCodec()
    if name_or_codec == "str":
        return StrCodec()
    if isinstance(name_or_codec, str):
        raise ValueError(f"unknown codec {name_or_codec!r}: use 'json', 'raw', 'str' or a Codec")
    return name_or_codec
