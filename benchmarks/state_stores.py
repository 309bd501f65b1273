"""Local state stores (SQLite, RocksDB, LMDB) on the checkpoint, read and restore paths.

For each backend, in a fresh process of its own (so that its peak RSS is its
own), on N keys (``--keys``, default 100,000) of 16 bytes with 30-byte values,
written in random order:

- ``write_s``: one checkpoint that writes all N keys (one ``write`` call);
- ``scan_s``: after a close and a reopen, a full ``items()`` scan (the
  restore path), in ``open_s`` plus ``scan_s``;
- ``get_us``: N ``get`` calls of random existing keys, microseconds per get;
- ``rewrite_s``: a second checkpoint that rewrites a random 10% of the keys;
- ``busy_write_s`` and ``max_pause_ms``: a checkpoint of ``--busy-keys``
  dirty keys (default 10,000) written from a worker thread (as the runtime
  does, through ``asyncio.to_thread``) while the main thread runs pure-Python
  work, as a busy event loop would: how long the write takes then, and the
  longest the main thread was kept from running;
- ``disk_mb``: the space the directory's files take on disk after close;
- ``peak_rss_mb``: the process's peak RSS (``base_rss_mb``: its RSS once the
  test data was built, before the store was opened). LMDB's figure includes
  the pages of its memory-mapped file that were touched (page cache, which the
  kernel can reclaim).

Usage:
    .venv/bin/python benchmarks/state_stores.py
    .venv/bin/python benchmarks/state_stores.py --keys 1000000 --json
    .venv/bin/python benchmarks/state_stores.py --cases lmdb,rocksdb --dir /var/tmp
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncflow.state.store import open_store

CASES = ("sqlite", "rocksdb", "lmdb")
VALUE_BYTES = 30


def rss_mb() -> float:
    """The current RSS of this process, in MiB."""
    import psutil  # type: ignore[import-untyped]

    return float(psutil.Process().memory_info().rss) / 2**20


def disk_mb(path: str) -> float:
    """The space the files under ``path`` take on disk (allocated blocks), in MiB."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total / 2**20


def values(rng: random.Random, n: int) -> list[bytes]:
    """``n`` random 30-byte values (hex text: about as compressible as encoded JSON)."""
    return [rng.randbytes(VALUE_BYTES // 2).hex().encode() for _ in range(n)]


def run_case(case: str, n: int, busy_keys: int, base_dir: str | None, seed: int) -> dict[str, Any]:
    """Measure one backend on ``n`` keys, in this process."""
    rng = random.Random(seed)
    keys = [b"user-%011d" % i for i in range(n)]
    rng.shuffle(keys)
    first = list(zip(keys, values(rng, n), strict=True))
    lookups = [keys[rng.randrange(n)] for _ in range(n)]
    dirty = rng.sample(keys, n // 10)
    second = list(zip(dirty, values(rng, len(dirty)), strict=True))
    busy = list(
        zip(rng.sample(keys, min(busy_keys, n)), values(rng, min(busy_keys, n)), strict=True)
    )
    base_rss = rss_mb()

    with tempfile.TemporaryDirectory(prefix=f"state-{case}-", dir=base_dir) as tmp:
        path = os.path.join(tmp, "table-0")
        store = open_store(case, path)
        t = time.perf_counter()
        store.write(first, {"checkpoint": b"1", "offset": b"%d" % n})
        write_s = time.perf_counter() - t
        store.close()

        t = time.perf_counter()
        store = open_store(case, path)
        open_s = time.perf_counter() - t
        t = time.perf_counter()
        scanned = sum(1 for _ in store.items())
        scan_s = time.perf_counter() - t
        assert scanned == n, (case, scanned, n)

        get = store.get
        t = time.perf_counter()
        for key in lookups:
            get(key)
        get_us = (time.perf_counter() - t) / n * 1e6
        assert store.get(lookups[0]) is not None

        t = time.perf_counter()
        store.write(second, {"checkpoint": b"2", "offset": b"%d" % (n + len(second))})
        rewrite_s = time.perf_counter() - t

        busy_write_s, max_pause_ms = write_beside_a_busy_thread(store, busy)
        store.close()
        disk = disk_mb(path)

    return {
        "case": case,
        "keys": n,
        "write_s": round(write_s, 3),
        "get_us": round(get_us, 2),
        "scan_s": round(scan_s, 3),
        "rewrite_s": round(rewrite_s, 3),
        "disk_mb": round(disk, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "open_s": round(open_s, 3),
        "busy_keys": len(busy),
        "busy_write_s": round(busy_write_s, 3),
        "max_pause_ms": round(max_pause_ms, 1),
        "base_rss_mb": round(base_rss, 1),
    }


def write_beside_a_busy_thread(store: Any, batch: list[tuple[bytes, bytes]]) -> tuple[float, float]:
    """Write ``batch`` in a worker thread while this thread spins in Python.

    Returns the write's duration and the longest gap between two turns of
    this thread's loop (in milliseconds): how long a busy event loop would be
    held up by the write.
    """
    took: list[float] = []

    def checkpoint() -> None:
        t = time.perf_counter()
        store.write(batch, {"checkpoint": b"3"})
        took.append(time.perf_counter() - t)

    worker = threading.Thread(target=checkpoint)
    last = time.perf_counter()
    longest = 0.0
    worker.start()
    spins = 0
    while worker.is_alive():
        for _ in range(50):  # a little pure-Python work per turn
            spins += 1
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
    worker.join()
    return took[0], longest * 1000


def line(r: dict[str, Any]) -> str:
    """One human-readable line of a case's figures."""
    return (
        f"{r['case']:<8} keys={r['keys']:<8} write {r['write_s']:7.3f}s  "
        f"get {r['get_us']:6.2f}us  open+scan {r['open_s']:.3f}+{r['scan_s']:.3f}s  "
        f"rewrite10% {r['rewrite_s']:6.3f}s  "
        f"busy-thread write of {r['busy_keys']} {r['busy_write_s']:7.3f}s "
        f"(max pause {r['max_pause_ms']:.1f}ms)  "
        f"disk {r['disk_mb']:7.1f}MB  peak RSS {r['peak_rss_mb']:7.1f}MB "
        f"(data alone {r['base_rss_mb']:.1f}MB)"
    )


def main(argv: list[str] | None = None) -> int:
    """Run every case in a child process and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--keys", type=int, default=100_000, help="keys in the store (default 100000)"
    )
    parser.add_argument(
        "--busy-keys", type=int, default=10_000, help="keys in the busy-thread checkpoint"
    )
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated backends")
    parser.add_argument(
        "--dir", default=None, help="where to make the stores (default: the temp dir)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON object per backend")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        result = run_case(args.child, args.keys, args.busy_keys, args.dir, args.seed)
        print(json.dumps(result), flush=True)
        return 0

    status = 0
    for case in args.cases.split(","):
        command = [sys.executable, __file__, "--child", case, "--keys", str(args.keys)]
        command += ["--busy-keys", str(args.busy_keys), "--seed", str(args.seed)]
        if args.dir is not None:
            command += ["--dir", args.dir]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{case}: failed ({done.returncode})\n{done.stderr}", file=sys.stderr)
            status = 1
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(result) if args.json else line(result), flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
