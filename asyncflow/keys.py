"""Which lane a key goes to: the same lane in every process, for every run.

Window state is checkpointed per lane, and a restart or another worker must
route a key's events to the lane its restored windows went to. Python's
``hash`` of a ``str`` differs between processes (``PYTHONHASHSEED``), so keys
hash with CRC-32 of their UTF-8 bytes instead; ints, floats, booleans and
``None`` use ``hash`` (the same everywhere), tuples combine their items'.
Other hashable types fall back to ``hash`` (stable only if theirs is).

Example:
    >>> key_hash("sensor-7")
    3193469670
    >>> lane_of(("a", 1), 16) == lane_of(("a", 1), 16)
    True
"""

from __future__ import annotations

from collections.abc import Hashable
from zlib import crc32


def key_hash(key: Hashable) -> int:
    """A hash of ``key`` that is the same in every process (raises for unhashable keys).

    Example:
        >>> key_hash(b"k") == key_hash(b"k"), key_hash(3)
        (True, 3)
    """
    if isinstance(key, str):
        return crc32(key.encode("utf-8", "surrogatepass"))
    if isinstance(key, bytes):
        return crc32(key)
    if isinstance(key, tuple):
        h = 0x345678
        for item in key:
            h = ((h * 1_000_003) ^ key_hash(item)) & 0xFFFF_FFFF_FFFF
        return h
    return hash(key)


def hashes_of(keys: list[Hashable]) -> list[int]:
    """``key_hash`` of each key, in one pass when they are all strings (the common case).

    Example:
        >>> hashes_of(["a", 1]) == [key_hash("a"), 1]
        True
    """
    try:
        return [crc32(k.encode("utf-8", "surrogatepass")) for k in keys]  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return [key_hash(k) for k in keys]


def lane_of(key: Hashable, lanes: int) -> int:
    """The lane a key goes to: the same key always to the same lane, in any process.

    Example:
        >>> 0 <= lane_of(("a", 1), 16) < 16
        True
    """
    return key_hash(key) % lanes
