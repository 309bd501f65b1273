"""The LMDB backend, through the ``lmdb`` package (a memory-mapped copy-on-write B+tree).

The store is an LMDB environment in its directory (``data.mdb`` and
``lock.mdb``) with two named databases: ``data`` for the state and ``meta``
for the checkpoint metadata, so ``items()`` never sees metadata. ``write`` is
one write transaction: LMDB's copy-on-write pages make its commit all or
nothing. The environment is opened with ``sync=False, metasync=False``: a
commit reaches the operating system before ``write`` returns (it survives a
killed process) but is not ``fsync``-ed (a power loss may drop the last
checkpoints, which the changelog restores).

The memory map starts at ``map_size`` (1 GiB of address space: the file only
grows with the data) and doubles whenever a write finds it full, after which
the write is retried. Remapping must not happen under a reader, so reads pass
through a gate that a resize closes for its duration. LMDB keys are 1 to 511
bytes long.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     store = LmdbStore(d)
    ...     store.write([(b"a", b"1"), (b"b", b"2"), (b"b", None)], {"offset": b"7"})
    ...     got = (store.get(b"a"), store.get(b"b"), store.meta("offset"), list(store.items()))
    ...     store.close()
    >>> got
    (b'1', None, b'7', [(b'a', b'1')])
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterable, Iterator, Mapping

import lmdb

DEFAULT_MAP_SIZE = 1 << 30
"""The initial size of the memory map, in bytes (address space, not disk)."""

_SCAN_BATCH = 4096


class _ResizeGate:
    """Many readers at once, or one map resize alone (a resize waits for readers to leave)."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.readers = 0
        self.resizing = False

    def enter(self) -> None:
        with self.cond:
            while self.resizing:
                self.cond.wait()
            self.readers += 1

    def leave(self) -> None:
        with self.cond:
            self.readers -= 1
            if self.resizing and not self.readers:
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.resizing = True
            while self.readers:
                self.cond.wait()

    def open(self) -> None:
        with self.cond:
            self.resizing = False
            self.cond.notify_all()


class LmdbStore:
    """A ``Store`` in the LMDB environment in the directory ``path`` (created if needed).

    ``map_size`` is the initial memory map size in bytes; it doubles as
    needed. Thread safety: ``write`` and ``clear`` may run in a worker thread
    while other threads call ``get``, ``meta`` and ``items``; writers are
    serialized by a lock, readers never wait for them (LMDB readers see the
    last commit), except briefly while the map grows. Note that ``lmdb``
    releases the GIL around every put: a ``write`` in a worker thread waits
    for the GIL once per key while another thread runs Python, so beside a
    busy event loop it can be far slower than the same ``write`` called on
    the loop's own thread (10,000 keys: 0.1 s in some runs, 25 to 36 s in
    others, measured on 2 cores).

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     store = LmdbStore(os.path.join(d, "t-0"), map_size=1 << 20)
        ...     store.write([(b"%06d" % i, b"x" * 30) for i in range(50_000)], {"checkpoint": b"1"})
        ...     store.map_size > 1 << 20
        ...     store.close()
        ...     again = LmdbStore(os.path.join(d, "t-0"))
        ...     got = (again.get(b"000042"), again.meta("checkpoint"))
        ...     again.close()
        True
        >>> got
        (b'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx', b'1')
    """

    write_in_thread = False
    """py-lmdb releases the GIL around every key it writes: beside a busy event loop a
    write from a worker thread can take 100x longer, so the checkpoint writes on the loop."""

    def __init__(self, path: str, map_size: int = DEFAULT_MAP_SIZE) -> None:
        """Open (creating the environment and its two databases if needed) the store in ``path``."""
        os.makedirs(path, exist_ok=True)
        self.path = path
        self._env = lmdb.open(
            path,
            map_size=map_size,
            max_dbs=2,
            sync=False,
            metasync=False,
            max_spare_txns=4,
        )
        self._data = self._env.open_db(b"data")
        self._meta = self._env.open_db(b"meta")
        self._max_key = self._env.max_key_size()
        self._write_lock = threading.Lock()
        self._gate = _ResizeGate()
        self._closed = False

    def __repr__(self) -> str:
        return f"LmdbStore({self.path!r})"

    @property
    def map_size(self) -> int:
        """The memory map's current size in bytes."""
        return self._env.info()["map_size"]

    def get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or ``None`` (also for a key LMDB could not hold).

        Example:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as d:
            ...     store = LmdbStore(d)
            ...     (store.get(b"nothing"), store.get(b""))
            ...     store.close()
            (None, None)
        """
        if not 0 < len(key) <= self._max_key:
            return None
        self._gate.enter()
        try:
            with self._env.begin(db=self._data) as txn:
                return txn.get(key)
        finally:
            self._gate.leave()

    def write(
        self, changes: Iterable[tuple[bytes, bytes | None]], meta: Mapping[str, bytes]
    ) -> None:
        """Apply puts (value bytes) and deletes (``None``) and set ``meta``, in one write transaction.

        When a key appears more than once, its last change wins. If anything
        fails (including the ``changes`` iterable itself), nothing is applied.
        A full map is grown and the transaction retried. A key LMDB cannot
        hold (empty, or longer than 511 bytes) fails the whole write with
        ``ValueError``.

        Example:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as d:
            ...     store = LmdbStore(d)
            ...     store.write([(b"k", b"1"), (b"k", b"2"), (b"never-there", None)], {"o": b"3"})
            ...     got = (store.get(b"k"), store.meta("o"))
            ...     store.close()
            >>> got
            (b'2', b'3')
        """
        final = dict(changes)
        puts = [(key, value) for key, value in final.items() if value is not None]
        # A key that LMDB cannot hold cannot be there to delete.
        deletes = [
            key for key, value in final.items() if value is None and 0 < len(key) <= self._max_key
        ]
        metas = [(name.encode(), value) for name, value in meta.items()]
        with self._write_lock:
            while True:
                try:
                    with self._env.begin(write=True) as txn:
                        if puts:
                            txn.cursor(db=self._data).putmulti(puts)
                        for key in deletes:
                            txn.delete(key, db=self._data)
                        if metas:
                            txn.cursor(db=self._meta).putmulti(metas)
                    return
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.BadValsizeError as e:
                    raise ValueError(
                        f"{self!r}: LMDB keys must be 1 to {self._max_key} bytes long ({e})"
                    ) from e

    def _grow(self) -> None:
        # Called under the write lock with no write transaction open; readers are held at the gate.
        self._gate.close()
        try:
            self._env.set_mapsize(self.map_size * 2)
        finally:
            self._gate.open()

    def meta(self, name: str) -> bytes | None:
        """The metadata entry ``name`` set by ``write``, or ``None``."""
        self._gate.enter()
        try:
            with self._env.begin(db=self._meta) as txn:
                return txn.get(name.encode())
        finally:
            self._gate.leave()

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every key and value (metadata excluded), in key order.

        The scan reads chunks of keys, each in a short read transaction, and
        yields a chunk with no transaction open (a long-lived reader would keep
        LMDB from reusing pages, and would hold off a map resize). A ``write``
        that commits during the scan may thus be seen for the keys after it;
        every key is yielded at most once.
        """
        after: bytes | None = None
        while True:
            self._gate.enter()
            try:
                with self._env.begin(db=self._data) as txn:
                    cursor = txn.cursor()
                    if after is None:
                        positioned = cursor.first()
                    else:
                        positioned = cursor.set_range(after)
                        if positioned and cursor.key() == after:
                            positioned = cursor.next()
                    chunk = (
                        list(itertools.islice(cursor.iternext(), _SCAN_BATCH)) if positioned else []
                    )
            finally:
                self._gate.leave()
            yield from chunk
            if len(chunk) < _SCAN_BATCH:
                return
            after = chunk[-1][0]

    def clear(self) -> None:
        """Remove every key and every metadata entry, in one write transaction.

        The file keeps its size: LMDB reuses the freed pages for the writes of
        the rebuild that usually follows.
        """
        with self._write_lock, self._env.begin(write=True) as txn:
            txn.drop(self._data, delete=False)
            txn.drop(self._meta, delete=False)

    def close(self) -> None:
        """Close the environment (its files stay for the next open); closing twice is harmless."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            self._gate.close()
            try:
                self._env.close()
            finally:
                # Reads after this fail at once (the environment is closed) instead of waiting.
                self._gate.open()
