"""Keyed state as agents use it: a table partition's values in memory over its local store.

``TablePartition`` keeps the values read or written since the last eviction
in a dict (a read misses to the local store), and the keys written since the
last checkpoint; at a checkpoint ``export`` hands those writes over, encoded,
and the cache is trimmed back to its bound once they are in the store.
``KeyedState`` is what ``stream.state(table)`` returns: the table seen through
the event a stream is handling, so ``get()`` and ``set(v)`` act on that
event's key in that event's partition.

Writes made while a replay re-delivers events the restored state already
reflects (offsets at or before ``TableShard.applied``) are ignored, so no
event is applied to state twice.

Example: deduplication with a TTL, through ``stateful_map``.

    >>> import asyncio, asyncflow as af
    >>> from datetime import timedelta
    >>> from asyncflow.testing import TestRun
    >>> app = af.App("dedup")
    >>> orders = app.topic("orders", key=lambda o: o["id"])
    >>> seen = app.table("seen-orders", default=False, ttl=timedelta(hours=1))
    >>> fresh = app.topic("fresh-orders")
    >>> @app.agent(orders)
    ... async def dedup(stream):
    ...     first_time = stream.stateful_map(seen, lambda was_seen, o: (True, None if was_seen else o))
    ...     async for order in first_time:
    ...         await fresh.send(order["id"], order)
    >>> async def main():
    ...     async with TestRun(app) as run:
    ...         await run.send_many("orders", [{"id": 1}, {"id": 2}, {"id": 1}])
    ...         await run.finish()
    ...         return run.outputs("fresh-orders")
    >>> asyncio.run(main())
    [{'id': 1}, {'id': 2}]
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from asyncflow.clock import Clock
from asyncflow.state.codec import encode_key
from asyncflow.state.shard import TableShard
from asyncflow.state.table import Table

if TYPE_CHECKING:
    from asyncflow.stream import Stream

V = TypeVar("V")

_ABSENT: Any = object()
_DELETED: Any = object()
_EXPIRY = struct.Struct(">q")

DEFAULT_CACHE = 100_000
"""Values a table partition keeps decoded in memory (beyond those written since the last checkpoint)."""


class TablePartition:
    """One table's values for one source partition: cache, writes since the checkpoint, store.

    Example:
        >>> from asyncflow.state.store import MemoryStore
        >>> from asyncflow.clock import ManualClock
        >>> tp = TablePartition(Table("t", default=0), TableShard("t", 0, MemoryStore(), None),
        ...                     ManualClock())
        >>> tp.set("a", 5); tp.get("a", 0), tp.get("b", 0)
        (5, 0)
        >>> tp.export()
        [(b'"a"', b'5')]
    """

    __slots__ = ("_cache", "_clock", "_codec", "_dirty", "_kb", "_limit", "_ttl", "shard", "table")

    def __init__(
        self, table: Table[Any], shard: TableShard, clock: Clock, cache_limit: int = DEFAULT_CACHE
    ) -> None:
        self.table = table
        self.shard = shard
        self._clock = clock
        self._codec = table.codec
        self._ttl = table.ttl_ms
        self._cache: dict[Any, Any] = {}
        self._dirty: dict[Any, Any] = {}
        self._kb: dict[Any, bytes] = {}  # encoded keys of cached values (reused each checkpoint)
        self._limit = cache_limit

    @property
    def dirty(self) -> bool:
        """Whether something was written since the last checkpoint."""
        return bool(self._dirty) or bool(self.shard.compensation)

    def get(self, key: Hashable, default: Any) -> Any:
        """The key's value, or ``default`` when it has none (or it expired)."""
        cached = self._cache.get(key, _ABSENT)
        if cached is _ABSENT:
            cached = self._load(key)
        if self._ttl is None:
            return default if cached is _DELETED else cached
        if cached is _DELETED:
            return default
        value, expires = cached
        if expires <= self._clock.wall_ms():
            self.delete(key)
            return default
        return value

    def _key_bytes(self, key: Hashable) -> bytes:
        kb = self._kb.get(key)
        if kb is None:
            kb = self._kb[key] = encode_key(key)
        return kb

    def _load(self, key: Hashable) -> Any:
        raw = self.shard.store.get(self._key_bytes(key))
        if raw is None:
            value: Any = _DELETED
        elif self._ttl is None:
            value = self._codec.decode(raw)
        else:
            value = (self._codec.decode(raw[8:]), _EXPIRY.unpack_from(raw)[0])
        self._cache[key] = value
        return value

    def set(self, key: Hashable, value: Any) -> None:
        """Give the key a new value (``None`` is a value; ``delete`` removes it)."""
        if self._ttl is not None:
            value = (value, self._clock.wall_ms() + self._ttl)
        self._cache[key] = value
        self._dirty[key] = value

    def delete(self, key: Hashable) -> None:
        """Remove the key's value."""
        self._cache[key] = _DELETED
        self._dirty[key] = _DELETED

    def contains(self, key: Hashable) -> bool:
        """Whether the key has a value that has not expired."""
        return self.get(key, _ABSENT) is not _ABSENT

    def export(self) -> list[tuple[bytes, bytes | None]]:
        """The writes since the last checkpoint, encoded (and expired values swept)."""
        if self._ttl is not None:
            now = self._clock.wall_ms()
            for key, cached in self._cache.items():
                if cached is not _DELETED and cached[1] <= now:
                    self._dirty[key] = _DELETED
        encode = self._codec.encode
        out: list[tuple[bytes, bytes | None]] = []
        append = out.append
        ttl = self._ttl is not None
        kbs = self._kb
        for key, value in self._dirty.items():
            kb = kbs.get(key)
            if kb is None:
                kb = kbs[key] = encode_key(key)
            if value is _DELETED:
                append((kb, None))
            elif ttl:
                append((kb, _EXPIRY.pack(value[1]) + encode(value[0])))
            else:
                append((kb, encode(value)))
        if ttl:
            for key, value in self._dirty.items():
                if value is _DELETED:
                    self._cache[key] = _DELETED
        self._dirty = {}
        return out

    def trim(self) -> None:
        """After a checkpoint is in the store: let the cache go when it outgrew its bound."""
        if len(self._cache) > self._limit:
            self._cache = dict(self._dirty)
            self._kb = {}

    def items(self) -> dict[Any, Any]:
        """Every live key and value (store and cache; for tests and inspection)."""
        from asyncflow.state.codec import decode_key

        out: dict[Any, Any] = {}
        for kb, _ in self.shard.store.items():
            key = decode_key(kb)
            if key not in self._cache:
                self._load(key)
        for key in list(self._cache):
            value = self.get(key, _ABSENT)
            if value is not _ABSENT:
                out[key] = value
        return out


class KeyedState(Generic[V]):
    """A table seen through the event a stream is handling: state of that event's key.

    Get one with ``stream.state(table)`` (once, before the loop); each call
    acts on the key and partition of ``stream.current``.

    Example: a per-key alert that remembers the last value.

        >>> import asyncio, asyncflow as af
        >>> from asyncflow.testing import TestRun
        >>> app = af.App("alerts")
        >>> temps = app.topic("temps", key=lambda r: r["room"])
        >>> last = app.table("last-temp")
        >>> alerts = app.topic("alerts")
        >>> @app.agent(temps)
        ... async def jumps(stream):
        ...     previous = stream.state(last)
        ...     async for r in stream:
        ...         before = previous.get()
        ...         if before is not None and abs(r["t"] - before) > 5:
        ...             await alerts.send(r["room"], {"room": r["room"], "from": before, "to": r["t"]})
        ...         previous.set(r["t"])
        >>> async def main():
        ...     async with TestRun(app) as run:
        ...         await run.send_many("temps", [{"room": "a", "t": 20}, {"room": "a", "t": 21},
        ...                                       {"room": "a", "t": 30}])
        ...         await run.finish()
        ...         return run.outputs("alerts")
        >>> asyncio.run(main())
        [{'room': 'a', 'from': 21, 'to': 30}]
    """

    __slots__ = ("_last", "_lookup", "_stream", "table")

    def __init__(
        self, stream: Stream[Any], table: Table[V], lookup: Callable[[Hashable], TablePartition]
    ) -> None:
        self._stream = stream
        self.table = table
        self._lookup = lookup
        self._last: tuple[Hashable, TablePartition] | None = None

    def _part(self) -> tuple[Hashable, TablePartition, bool]:
        ev = self._stream.current
        if ev is None:
            raise RuntimeError(
                f"table {self.table.name!r} is keyed by the event being handled; use "
                "stream.state(...) inside the loop over the stream"
            )
        last = self._last
        if last is not None and last[0] == ev.partition and not last[1].shard.closed:
            part = last[1]
        else:
            part = self._lookup(ev.partition)
            self._last = (ev.partition, part)
        applied = part.shard.applied
        replayed = applied is not None and ev.offset <= applied
        return ev.key, part, replayed

    @property
    def key(self) -> Hashable:
        """The key of the event being handled."""
        ev = self._stream.current
        return None if ev is None else ev.key

    def get(self, default: V | None = None) -> V | None:
        """This key's value, else ``default``, else the table's default."""
        key, part, _ = self._part()
        value: V | None = part.get(key, self.table.default if default is None else default)
        return value

    def set(self, value: V) -> None:
        """Give this key a new value."""
        key, part, replayed = self._part()
        if not replayed:
            part.set(key, value)

    def delete(self) -> None:
        """Remove this key's value."""
        key, part, replayed = self._part()
        if not replayed:
            part.delete(key)

    def update(self, fn: Callable[[V | None], V]) -> V:
        """Set this key's value to ``fn(current value)`` and return it.

        Example:
            >>> # total.update(lambda n: n + amount)  inside an agent's loop
        """
        key, part, replayed = self._part()
        new = fn(part.get(key, self.table.default))
        if not replayed:
            part.set(key, new)
        return new

    def exists(self) -> bool:
        """Whether this key has a value (that has not expired)."""
        key, part, _ = self._part()
        return part.contains(key)
