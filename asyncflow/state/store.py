"""The local store protocol: one embedded database per (app, table, partition) on disk.

A store holds a table's state for one source partition as encoded keys and
values, plus a few metadata entries (the checkpoint it reflects: its id, the
source offset it has applied, where its marker stands in the changelog). The
changelog topic is the durable copy another worker rebuilds from; the local
store makes a restart on the same machine fast and lets state exceed memory.

A store is written only at checkpoints: ``write`` applies one checkpoint's
puts and deletes and its metadata atomically (all or nothing, even if the
process is killed in the middle). It need not ``fsync``: after a power loss
the changelog is authoritative, and a store whose metadata does not match the
changelog is rebuilt from it. ``write`` may be called from a worker thread
(``asyncio.to_thread``) while the event loop's thread calls ``get``: a backend
serializes what needs it.

Example:
    >>> import tempfile
    >>> from asyncflow.state.store import open_store
    >>> with tempfile.TemporaryDirectory() as d:
    ...     store = open_store("sqlite", d)
    ...     store.write([(b"k", b"1"), (b"gone", None)], {"offset": b"41"})
    ...     got = (store.get(b"k"), store.meta("offset"), list(store.items()))
    ...     store.close()
    >>> got
    (b'1', b'41', [(b'k', b'1')])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol


class Store(Protocol):
    """One table's state for one partition, in an embedded database.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     s: Store = open_store("sqlite", d)
        ...     s.get(b"missing") is None
        ...     s.close()
        True
    """

    def get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or ``None``."""
        ...

    def write(self, changes: Iterable[tuple[bytes, bytes | None]], meta: Mapping[str, bytes]) -> None:
        """Apply puts (value bytes) and deletes (``None``) and set ``meta``, atomically."""
        ...

    def meta(self, name: str) -> bytes | None:
        """A metadata entry written by ``write``, or ``None``."""
        ...

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every key and value (metadata excluded), in no particular order."""
        ...

    def clear(self) -> None:
        """Remove every key and every metadata entry."""
        ...

    def close(self) -> None:
        """Release the database (its files stay for the next open)."""
        ...


class MemoryStore:
    """A store in a dict: for tests, and for state that need not outlive the process.

    Example:
        >>> s = MemoryStore(); s.write([(b"a", b"1")], {"offset": b"3"})
        >>> s.get(b"a"), s.meta("offset")
        (b'1', b'3')
    """

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._meta: dict[str, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def write(self, changes: Iterable[tuple[bytes, bytes | None]], meta: Mapping[str, bytes]) -> None:
        data = self._data
        for key, value in changes:
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        self._meta.update(meta)

    def meta(self, name: str) -> bytes | None:
        return self._meta.get(name)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self._data.items()))

    def clear(self) -> None:
        self._data.clear()
        self._meta.clear()

    def close(self) -> None:
        pass


STORE_KINDS = ("lmdb", "memory", "rocksdb", "sqlite")
"""The values ``ASYNCFLOW_STATE_STORE`` accepts."""


def open_store(kind: str, path: str) -> Store:
    """Open (creating if needed) a store of ``kind`` in the directory ``path``.

    ``kind`` is ``"rocksdb"`` (through ``rocksdict``), ``"lmdb"``,
    ``"sqlite"`` or ``"memory"`` (nothing on disk; ``path`` is ignored).

    Example:
        >>> open_store("paper", "/tmp/x")
        Traceback (most recent call last):
        ...
        asyncflow.errors.ConfigError: state store 'paper' is not known; use one of: lmdb, memory, rocksdb, sqlite
    """
    from asyncflow.errors import ConfigError

    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        from asyncflow.state.backends.sqlite import SqliteStore

        return SqliteStore(path)
    if kind == "rocksdb":
        from asyncflow.state.backends.rocksdb import RocksStore

        return RocksStore(path)
    if kind == "lmdb":
        from asyncflow.state.backends.lmdb import LmdbStore

        return LmdbStore(path)
    raise ConfigError(f"state store {kind!r} is not known; use one of: {', '.join(STORE_KINDS)}")
