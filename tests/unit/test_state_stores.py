"""The local state stores (SQLite, RocksDB, LMDB): one contract, checked on each backend."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import pytest

from asyncflow.state.backends.lmdb import LmdbStore
from asyncflow.state.store import Store, open_store

KINDS = ["sqlite", "rocksdb", "lmdb"]
ROOT = Path(__file__).resolve().parents[2]

Opener = Callable[[], Store]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return cast(str, request.param)


@pytest.fixture
def store_dir(tmp_path: Path) -> str:
    return str(tmp_path / "table-0")


@pytest.fixture
def reopen(kind: str, store_dir: str) -> Iterator[Opener]:
    """Opens the store of ``kind`` in ``store_dir`` (again); every store it opened is closed after."""
    opened: list[Store] = []

    def open_() -> Store:
        store = open_store(kind, store_dir)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(reopen: Opener) -> Store:
    return reopen()


def key(i: int) -> bytes:
    return b"key-%06d" % i


# -- reads and writes ---------------------------------------------------------------------


def test_get_of_a_missing_key_is_none(store: Store) -> None:
    assert store.get(b"missing") is None
    assert store.meta("missing") is None


def test_write_applies_puts_deletes_and_metadata(store: Store) -> None:
    store.write([(b"a", b"1"), (b"b", b"2")], {"offset": b"10"})
    store.write([(b"a", None), (b"c", b"3")], {"offset": b"11", "checkpoint": b"2"})
    assert store.get(b"a") is None
    assert store.get(b"b") == b"2"
    assert store.get(b"c") == b"3"
    assert store.meta("offset") == b"11"
    assert store.meta("checkpoint") == b"2"
    assert sorted(store.items()) == [(b"b", b"2"), (b"c", b"3")]


def test_write_is_all_or_nothing_with_its_metadata(store: Store) -> None:
    store.write([(b"a", b"old"), (b"b", b"old")], {"offset": b"1"})

    def changes_that_fail_midway() -> Iterator[tuple[bytes, bytes | None]]:
        yield b"a", b"new"
        yield b"b", None
        yield b"c", b"new"
        raise RuntimeError("the checkpoint failed while its changes were read")

    with pytest.raises(RuntimeError, match="failed while"):
        store.write(changes_that_fail_midway(), {"offset": b"2"})
    assert sorted(store.items()) == [(b"a", b"old"), (b"b", b"old")]
    assert store.meta("offset") == b"1"


def test_a_later_change_to_the_same_key_in_one_write_wins(store: Store) -> None:
    store.write([(b"put-then-delete", b"1"), (b"put-then-delete", None)], {})
    store.write([(b"delete-then-put", None), (b"delete-then-put", b"2")], {})
    store.write([(b"put-twice", b"first"), (b"put-twice", b"second")], {})
    assert store.get(b"put-then-delete") is None
    assert store.get(b"delete-then-put") == b"2"
    assert store.get(b"put-twice") == b"second"


def test_a_write_may_carry_only_metadata_or_only_changes(store: Store) -> None:
    store.write([], {"offset": b"5"})
    store.write([(b"k", b"v")], {})
    assert store.meta("offset") == b"5"
    assert store.get(b"k") == b"v"


def test_deleting_a_key_that_does_not_exist_is_fine(store: Store) -> None:
    store.write([(b"never-written", None)], {"offset": b"1"})
    store.write([(b"k", b"v"), (b"k", None), (b"k", None)], {})
    assert store.get(b"never-written") is None
    assert list(store.items()) == []
    assert store.meta("offset") == b"1"


def test_items_never_include_metadata(store: Store) -> None:
    # Metadata names that look like keys, and keys that look like metadata names.
    store.write([(b"offset", b"a key"), (b"\x00meta", b"also a key")], {"offset": b"9", "k": b"m"})
    assert sorted(store.items()) == [(b"\x00meta", b"also a key"), (b"offset", b"a key")]
    assert store.meta("offset") == b"9"
    assert store.get(b"k") is None


def test_keys_and_values_are_arbitrary_bytes(store: Store) -> None:
    pairs = [(b"\x00", b""), (b"\xff" * 40, b"\x00\xff" * 100), (b"k\n\x00v", b"\x80" * 5000)]
    store.write(pairs, {"bin": b"\x00\xff"})
    assert sorted(store.items()) == sorted(pairs)
    assert all(store.get(k) == v for k, v in pairs)
    assert store.meta("bin") == b"\x00\xff"


def test_a_large_batch_of_50000_keys_round_trips(store: Store) -> None:
    batch = {key(i): b"value-%024d" % (i * 7) for i in range(50_000)}
    store.write(batch.items(), {"offset": b"50000"})
    assert store.get(key(0)) == batch[key(0)]
    assert store.get(key(31_337)) == batch[key(31_337)]
    assert store.get(key(49_999)) == batch[key(49_999)]
    assert dict(store.items()) == batch
    store.write(((key(i), None) for i in range(0, 50_000, 2)), {"offset": b"50001"})
    assert dict(store.items()) == {k: v for i, (k, v) in enumerate(batch.items()) if i % 2}


def test_a_batch_of_an_odd_size_applies_every_put_and_delete(store: Store) -> None:
    # Sizes that are not multiples of a backend's internal statement or chunk sizes.
    store.write([(key(i), b"v%d" % i) for i in range(12_345)], {})
    store.write([(key(i), None) for i in range(0, 12_345, 3)] + [(b"new", b"1")], {"o": b"2"})
    expected = {key(i): b"v%d" % i for i in range(12_345) if i % 3}
    expected[b"new"] = b"1"
    assert dict(store.items()) == expected
    assert store.meta("o") == b"2"


# -- lifecycle ----------------------------------------------------------------------------


def test_reopening_the_directory_sees_the_data_and_metadata(reopen: Opener) -> None:
    first = reopen()
    first.write([(b"a", b"1"), (b"b", b"2"), (b"b", None)], {"offset": b"41"})
    first.close()
    again = reopen()
    assert list(again.items()) == [(b"a", b"1")]
    assert again.meta("offset") == b"41"


def test_clear_removes_data_and_metadata(reopen: Opener) -> None:
    store = reopen()
    store.write([(key(i), b"v") for i in range(10_000)], {"offset": b"1", "checkpoint": b"3"})
    store.clear()
    assert list(store.items()) == []
    assert store.get(key(5)) is None
    assert store.meta("offset") is None
    assert store.meta("checkpoint") is None
    store.write([(b"after", b"clear")], {"offset": b"2"})
    store.close()
    again = reopen()
    assert list(again.items()) == [(b"after", b"clear")]
    assert again.meta("offset") == b"2"
    assert again.meta("checkpoint") is None


def test_clear_of_an_empty_store_is_fine(store: Store) -> None:
    store.clear()
    assert list(store.items()) == []


def test_closing_twice_is_harmless(store: Store) -> None:
    store.close()
    store.close()


def test_the_directory_is_created_with_its_parents(kind: str, tmp_path: Path) -> None:
    store = open_store(kind, str(tmp_path / "app" / "table" / "3"))
    try:
        store.write([(b"k", b"v")], {})
        assert store.get(b"k") == b"v"
    finally:
        store.close()


# -- threads ------------------------------------------------------------------------------


async def test_write_in_a_worker_thread_while_the_event_loop_reads(store: Store) -> None:
    keys = [key(i) for i in range(500)]
    store.write([(k, b"%06d" % 0) for k in keys], {"version": b"%06d" % 0})

    def checkpoints() -> None:
        for version in range(1, 11):
            store.write([(k, b"%06d" % version) for k in keys], {"version": b"%06d" % version})

    worker = asyncio.ensure_future(asyncio.to_thread(checkpoints))
    seen: list[bytes] = []
    seen_meta: list[bytes] = []
    while not worker.done():
        value = store.get(keys[len(seen) % len(keys)])
        meta = store.meta("version")
        assert value is not None and meta is not None
        seen.append(value)
        seen_meta.append(meta)
        await asyncio.sleep(0)
    await worker
    # Each checkpoint lands whole: a later read never sees an older version.
    assert seen == sorted(seen)
    assert seen_meta == sorted(seen_meta)
    assert store.get(keys[-1]) == b"%06d" % 10
    assert store.meta("version") == b"%06d" % 10


def test_a_scan_while_a_thread_writes_yields_each_key_once(store: Store) -> None:
    keys = [key(i) for i in range(20_000)]
    store.write([(k, b"0") for k in keys], {})

    def checkpoints() -> None:
        for version in range(1, 6):
            store.write([(k, b"%d" % version) for k in keys[::3]], {"v": b"%d" % version})

    with ThreadPoolExecutor(max_workers=1) as pool:
        worker = pool.submit(checkpoints)
        scans = 0
        while not worker.done() or scans == 0:
            scanned = [k for k, _ in store.items()]
            assert len(scanned) == len(keys)
            assert set(scanned) == set(keys)
            scans += 1
        worker.result()  # the writer's own error, if any


# -- crashes ------------------------------------------------------------------------------

CHILD = r"""
import os, sys, time
from asyncflow.state.store import open_store

kind, path, mode, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = open_store(kind, path)
store.write([(b"k%06d" % i, b"A%06d" % i) for i in range(n)], {"batch": b"A"})
if mode == "exit":
    os._exit(0)  # no close(), no flush, no atexit
batch_b = [(b"k%06d" % i, b"B%06d" % i) for i in range(n)]
batch_b += [(b"only-in-b-%06d" % i, b"B") for i in range(n)]
batch_b += [(b"k%06d" % i, None) for i in range(0, n, 10)]
print("writing B", flush=True)
store.write(batch_b, {"batch": b"B"})
print("wrote B", flush=True)
time.sleep(60)
"""


def run_child(kind: str, path: str, mode: str, n: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, kind, path, mode, str(n)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(ROOT),
    )


def assert_whole_batch(store: Store, n: int) -> bytes:
    """The store holds batch A or batch B whole, with its own metadata; which one is returned."""
    batch = store.meta("batch")
    state = dict(store.items())
    if batch == b"A":
        assert state == {b"k%06d" % i: b"A%06d" % i for i in range(n)}
    else:
        assert batch == b"B"
        expected = {b"k%06d" % i: b"B%06d" % i for i in range(n) if i % 10}
        expected.update({b"only-in-b-%06d" % i: b"B" for i in range(n)})
        assert state == expected
    return batch


def test_a_process_that_exits_without_closing_leaves_its_write_complete(
    kind: str, store_dir: str, reopen: Opener
) -> None:
    child = run_child(kind, store_dir, "exit", 20_000)
    assert child.wait(timeout=120) == 0
    assert assert_whole_batch(reopen(), 20_000) == b"A"


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.1])
def test_a_process_killed_during_a_write_leaves_one_whole_checkpoint(
    kind: str, store_dir: str, reopen: Opener, delay: float
) -> None:
    child = run_child(kind, store_dir, "kill", 100_000)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "writing B\n"
        time.sleep(delay)
        child.kill()  # SIGKILL: nothing of the process's own runs after this
    finally:
        child.wait(timeout=120)
    assert assert_whole_batch(reopen(), 100_000) in (b"A", b"B")


# -- backend specifics --------------------------------------------------------------------


def test_lmdb_grows_a_full_map_and_retries_the_write(tmp_path: Path) -> None:
    store = LmdbStore(str(tmp_path), map_size=256 * 1024)
    try:
        store.write([(key(i), b"x" * 30) for i in range(50_000)], {"offset": b"1"})
        assert store.map_size > 256 * 1024
        assert store.get(key(49_999)) == b"x" * 30
        assert store.meta("offset") == b"1"
        assert sum(1 for _ in store.items()) == 50_000
    finally:
        store.close()


def test_lmdb_reads_keep_working_while_a_write_grows_the_map(tmp_path: Path) -> None:
    store = LmdbStore(str(tmp_path), map_size=256 * 1024)
    store.write([(b"fixed", b"1")], {})
    thread = threading.Thread(
        target=store.write, args=([(key(i), b"y" * 100) for i in range(20_000)], {})
    )
    try:
        thread.start()
        while thread.is_alive():
            assert store.get(b"fixed") == b"1"
            time.sleep(0.0001)  # spinning would starve the writer of the GIL
        thread.join()
        assert store.map_size > 256 * 1024
        assert store.get(key(19_999)) == b"y" * 100
    finally:
        store.close()


def test_lmdb_rejects_a_key_it_cannot_hold_and_applies_nothing(tmp_path: Path) -> None:
    store = LmdbStore(str(tmp_path))
    try:
        with pytest.raises(ValueError, match="1 to 511 bytes"):
            store.write([(b"fine", b"1"), (b"x" * 512, b"2")], {"offset": b"1"})
        with pytest.raises(ValueError, match="1 to 511 bytes"):
            store.write([(b"", b"empty")], {})
        assert store.get(b"fine") is None
        assert store.meta("offset") is None
        store.write([(b"", None), (b"x" * 512, None)], {})  # cannot exist, so deleting is fine
    finally:
        store.close()
