"""Embedded-database backends of the local state store (``asyncflow.state.store.Store``).

Each module holds one implementation of the ``Store`` protocol, opened through
``asyncflow.state.store.open_store(kind, path)``: ``sqlite`` (the standard
library's ``sqlite3``, one WAL-mode database file), ``rocksdb`` (RocksDB through
the ``rocksdict`` package, an LSM tree) and ``lmdb`` (the ``lmdb`` package, a
memory-mapped B+tree). All three apply a checkpoint's puts, deletes and metadata
in one atomic write, keep metadata out of ``items()``, survive a killed process
without ``fsync`` and let a worker thread write while another thread reads;
only the needs of the embedded library behind them differ.
"""
