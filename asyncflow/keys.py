"""Which lane a key goes to: the same lane in every process, for every run.

Window state is checkpointed per lane, and a restart or another worker must
route a key's events to the lane its restored windows went to. Python's
``hash`` of a ``str`` differs between processes (``PYTHONHASHSEED``), so keys
hash with CRC-32 of their UTF-8 bytes instead; ``None`` is 0; ints, floats and
booleans use ``hash`` (the same everywhere), tuples combine their items'.
Other hashable types fall back to ``hash`` (stable only if theirs is).

Example:
    >>> key_hash("sensor-7")
    3193469670
    >>> lane_of(("a", 1), 16) == lane_of(("a", 1), 16)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any
from zlib import crc32

CACHE_LIMIT = 100_000
"""How many distinct keys a key cache holds before it starts over (memory stays bounded)."""


def key_hash(key: Hashable) -> int:
    """A hash of ``key`` that is the same in every process (raises for unhashable keys).

    Example:
        >>> key_hash(b"k") == key_hash(b"k"), key_hash(3)
        (True, 3)
    """
    if isinstance(key, str):
        return crc32(key.encode("utf-8", "surrogatepass"))
    if key is None:
        return 0  # hash(None) depends on None's address before Python 3.12
    if isinstance(key, bytes):
        return crc32(key)
    if isinstance(key, tuple):
        h = 0x345678
        for item in key:
            h = ((h * 1_000_003) ^ key_hash(item)) & 0xFFFF_FFFF_FFFF
        return h
    return hash(key)


def lane_of(key: Hashable, lanes: int) -> int:
    """The lane a key goes to: the same key always to the same lane, in any process.

    Example:
        >>> 0 <= lane_of(("a", 1), 16) < 16
        True
    """
    return key_hash(key) % lanes


class HashCache(dict[Any, int]):
    """``key_hash`` of keys seen before, looked up instead of computed: ``cache[key]``.

    Streams repeat their keys, so a lookup (a dict hit, in C) replaces an
    encode and a CRC per event. Holds at most ``CACHE_LIMIT`` keys, then
    starts over. Equal keys hash equal under ``key_hash`` (``1``, ``1.0`` and
    ``True`` alike), so sharing one entry between them is exact. An
    unhashable key raises ``TypeError``, as ``key_hash`` does.

    Example:
        >>> cache = HashCache()
        >>> [cache[k] for k in ["sensor-7", "sensor-7", 3]] == [key_hash("sensor-7")] * 2 + [3]
        True
    """

    def __missing__(self, key: Any) -> int:
        h = key_hash(key)
        if len(self) >= CACHE_LIMIT:
            self.clear()
        self[key] = h
        return h


class RawKeyCache(dict[bytes | None, tuple[Any, int]]):
    """Raw key bytes to ``(decoded key, key_hash)``: ``cache[raw]`` decodes a key once.

    Only immutable decoded keys (``str``, ``bytes``, ``int``) are kept; any
    other result is decoded again each time, so no two events share a mutable
    key. A key that does not decode raises the codec's error.

    Example:
        >>> cache = RawKeyCache(bytes.decode)
        >>> cache[b"sensor-7"] == ("sensor-7", key_hash("sensor-7")), cache[None]
        (True, (None, 0))
    """

    def __init__(self, decode: Callable[[bytes], Any]) -> None:
        super().__init__()
        self._decode = decode
        self[None] = (None, key_hash(None))

    def __missing__(self, raw: bytes | None) -> tuple[Any, int]:
        key = self._decode(raw)  # type: ignore[arg-type]  # None is always present
        pair = (key, key_hash(key))
        if type(key) in _IMMUTABLE:
            if len(self) >= CACHE_LIMIT:
                self.clear()
                self[None] = (None, key_hash(None))
            self[raw] = pair
        return pair


class KeyOfRawCache(dict[bytes | None, Any]):
    """Raw key bytes to the decoded key alone: ``cache[raw]``, one lookup a record.

    Keeps what ``raw_keys`` (a ``RawKeyCache``) keeps: immutable keys; any
    other is decoded again each time.

    Example:
        >>> keys = KeyOfRawCache(RawKeyCache(bytes.decode))
        >>> keys[b"sensor-7"], keys[None]
        ('sensor-7', None)
    """

    def __init__(self, raw_keys: RawKeyCache) -> None:
        super().__init__()
        self._raw_keys = raw_keys

    def __missing__(self, raw: bytes | None) -> Any:
        key = self._raw_keys[raw][0]
        if type(key) in _IMMUTABLE or key is None:
            if len(self) >= CACHE_LIMIT:
                self.clear()
            self[raw] = key
        return key


class LaneCache(dict[Any, int]):
    """What goes to which of ``lanes`` lanes, looked up: ``cache[x]`` is ``hash_of(x) % lanes``.

    ``x`` is a decoded key (``hash_of`` is ``key_hash``) or a record's raw
    key (``hash_of`` looks it up in a ``RawKeyCache``): one dict hit, in C,
    per record instead of a hash and a modulo. Starts over past ``CACHE_LIMIT``
    entries; ``hash_of``'s errors (an unhashable key) are raised and nothing is kept.

    Example:
        >>> lanes = LaneCache(key_hash, 4)
        >>> [lanes[k] for k in ("a", "a", 5)] == [lane_of("a", 4)] * 2 + [1]
        True
    """

    def __init__(self, hash_of: Callable[[Any], int], lanes: int) -> None:
        super().__init__()
        self._hash_of = hash_of
        self._lanes = lanes

    def __missing__(self, x: Any) -> int:
        lane = self._hash_of(x) % self._lanes
        if len(self) >= CACHE_LIMIT:
            self.clear()
        self[x] = lane
        return lane


_IMMUTABLE = (str, bytes, int)
