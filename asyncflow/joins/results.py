"""What a join yields, and how a join's buffered events are stored in state.

``Joined`` is one match: the key, the two values and an event time. A join
operator keeps, per key, a few buffered items ``(side, time, seq, value)``:
``side`` 0 is the left (stream) side, 1 the right (table) side, and
``DELETED`` stands for a table value that was deleted. ``seq`` orders items of
equal time by arrival (the offset in the join's internal topic, the same on
every replay). ``pack`` and ``unpack`` turn a key's items into the bytes a
checkpoint stores, each value encoded by its side's codec.

Example:
    >>> from asyncflow.codecs import JsonCodec
    >>> codecs = (JsonCodec(), JsonCodec())
    >>> raw = pack([(0, 1_000, 7, {"ride": 1}), (1, None, 3, DELETED)], codecs)
    >>> unpack(raw, codecs)
    [(0, 1000, 7, {'ride': 1}), (1, None, 3, <deleted>)]
"""

from __future__ import annotations

import struct
from collections.abc import Hashable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from asyncflow.codecs import Codec

L = TypeVar("L")
R = TypeVar("R")

Item = tuple[int, int | None, int, Any]
"""A buffered event of a join: ``(side, event time ms or None, seq, value)``."""

_HEAD = struct.Struct(">bqqI")
_NO_TIME = -(2**63)
_DELETED_SIDE = 2


class _Deleted:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<deleted>"


DELETED: Any = _Deleted()
"""A table value that was deleted (what a ``delete=`` predicate said of an update)."""


class Joined(NamedTuple, Generic[L, R]):
    """One result of a join: ``key``, ``left`` value, ``right`` value, event ``time`` (ms).

    For a stream–table join ``left`` is the stream's value, ``right`` the
    table's value for the key as of the event (``None`` in a left join when
    there is none) and ``time`` the stream event's time. For an interval join
    ``left`` and ``right`` are the pair and ``time`` the later of their times.

    Example:
        >>> j = Joined("d7", {"ride": 1}, {"name": "Ann"}, 1_000)
        >>> j.key, j.right["name"], j.time
        ('d7', 'Ann', 1000)
    """

    key: Hashable
    left: L
    right: R
    time: int | None


def pack(items: Sequence[Item], codecs: tuple[Codec[Any], Codec[Any]]) -> bytes:
    """A key's buffered items as bytes (one checkpoint entry)."""
    out = bytearray()
    head = _HEAD.pack
    for side, t, seq, value in items:
        if value is DELETED:
            out += head(_DELETED_SIDE, _NO_TIME if t is None else t, seq, 0)
            continue
        data = codecs[side].encode(value)
        out += head(side, _NO_TIME if t is None else t, seq, len(data))
        out += data
    return bytes(out)


def unpack(data: bytes, codecs: tuple[Codec[Any], Codec[Any]]) -> list[Item]:
    """The items ``pack`` stored (values decoded again by their side's codec)."""
    items: list[Item] = []
    pos, n, size = 0, len(data), _HEAD.size
    view = memoryview(data)
    while pos < n:
        side, t, seq, length = _HEAD.unpack_from(data, pos)
        pos += size
        time = None if t == _NO_TIME else t
        if side == _DELETED_SIDE:
            items.append((1, time, seq, DELETED))
            continue
        items.append((side, time, seq, codecs[side].decode(bytes(view[pos : pos + length]))))
        pos += length
    return items
