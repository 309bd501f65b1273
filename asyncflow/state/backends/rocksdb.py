"""The RocksDB backend, through the ``rocksdict`` package (an LSM tree in a directory).

The store is a RocksDB database in its directory, opened in raw mode (keys and
values are plain bytes, with no pickling). The state lives in the ``default``
column family and the checkpoint metadata in a column family of its own,
``meta``, so no key is reserved and ``items()`` (a scan of ``default``) never
sees metadata. ``write`` builds one ``WriteBatch`` over both column families
and applies it at once: RocksDB logs the batch as one WAL record, so after a
crash it is replayed whole or not at all. Writes are not synced (the WAL record
reaches the operating system before ``write`` returns, which a killed process
cannot undo; a power loss may drop the last checkpoints, which the changelog
restores).

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     store = RocksStore(d)
    ...     store.write([(b"a", b"1"), (b"b", b"2"), (b"b", None)], {"offset": b"7"})
    ...     got = (store.get(b"a"), store.get(b"b"), store.meta("offset"), list(store.items()))
    ...     store.close()
    >>> got
    (b'1', None, b'7', [(b'a', b'1')])
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import cast

from rocksdict import ColumnFamily, Options, Rdict, WriteBatch

META_CF = "meta"
"""The column family that holds the metadata entries (their names UTF-8 encoded)."""


def _options() -> Options:
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.create_missing_column_families(True)
    # One old info LOG is enough; each open would otherwise leave another behind.
    options.set_keep_log_file_num(2)
    return options


class RocksStore:
    """A ``Store`` in the RocksDB database in the directory ``path`` (created if needed).

    Thread safety: RocksDB itself serializes concurrent writers and lets reads
    run beside them; a lock here keeps ``write`` and ``clear`` from racing with
    ``close``. Note that ``rocksdict`` holds the GIL while RocksDB applies a
    batch, so a large ``write`` in a worker thread still pauses the other
    Python threads for its duration.

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     store = RocksStore(os.path.join(d, "t-0"))
        ...     store.write([(b"k", b"v")], {"checkpoint": b"1"})
        ...     store.close()
        ...     again = RocksStore(os.path.join(d, "t-0"))
        ...     got = (again.get(b"k"), again.meta("checkpoint"))
        ...     again.close()
        >>> got
        (b'v', b'1')
    """

    def __init__(self, path: str) -> None:
        """Open (creating it and its ``meta`` column family if needed) the database in ``path``."""
        os.makedirs(path, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._closed = False
        self._db = Rdict(path, _options(), column_families={META_CF: _options()})
        self._meta: Rdict | None = self._db.get_column_family(META_CF)
        self._meta_handle: ColumnFamily | None = self._db.get_column_family_handle(META_CF)

    def __repr__(self) -> str:
        return f"RocksStore({self.path!r})"

    def _meta_cf(self) -> tuple[Rdict, ColumnFamily]:
        if self._meta is None or self._meta_handle is None:
            raise ValueError(f"{self!r} is closed")
        return self._meta, self._meta_handle

    def get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or ``None``.

        Example:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as d:
            ...     store = RocksStore(d)
            ...     store.get(b"nothing") is None
            ...     store.close()
            True
        """
        return cast("bytes | None", self._db.get(key))

    def write(
        self, changes: Iterable[tuple[bytes, bytes | None]], meta: Mapping[str, bytes]
    ) -> None:
        """Apply puts (value bytes) and deletes (``None``) and set ``meta``, as one ``WriteBatch``.

        Changes apply in order (a key's last change wins). If anything fails
        (including the ``changes`` iterable itself), nothing is applied.

        Example:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as d:
            ...     store = RocksStore(d)
            ...     store.write([(b"k", b"1"), (b"k", b"2"), (b"never-there", None)], {"o": b"3"})
            ...     got = (store.get(b"k"), store.meta("o"))
            ...     store.close()
            >>> got
            (b'2', b'3')
        """
        _, handle = self._meta_cf()
        batch = WriteBatch(raw_mode=True)
        for key, value in changes:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        for name, value in meta.items():
            batch.put(name.encode(), value, handle)
        with self._lock:
            self._db.write(batch)

    def meta(self, name: str) -> bytes | None:
        """The metadata entry ``name`` set by ``write``, or ``None``."""
        cf, _ = self._meta_cf()
        return cast("bytes | None", cf.get(name.encode()))

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every key and value (metadata excluded), in key order.

        The scan is a RocksDB iterator, which reads one implicit snapshot: a
        ``write`` that lands meanwhile is not seen.
        """
        return cast("Iterator[tuple[bytes, bytes]]", self._db.items())

    def clear(self) -> None:
        """Remove every key and every metadata entry, atomically, and compact the space away.

        One batch holds a range deletion over each column family (from the
        empty key to just past its last key), so a crash leaves either all or
        nothing; a manual compaction then drops the deleted files.
        """
        cf, handle = self._meta_cf()
        with self._lock:
            batch = WriteBatch(raw_mode=True)
            for db, family in ((self._db, None), (cf, handle)):
                last = next(iter(db.keys(backwards=True)), None)
                if last is not None:
                    batch.delete_range(b"", cast(bytes, last) + b"\x00", family)
            if batch.is_empty():
                return
            self._db.write(batch)
            self._db.compact_range(None, None)
            cf.compact_range(None, None)

    def close(self) -> None:
        """Close the database (its files stay for the next open); closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._meta is not None:
                self._meta.close()
            # The column family objects keep the database (and its LOCK) alive: drop them first.
            self._meta = None
            self._meta_handle = None
            self._db.close()
