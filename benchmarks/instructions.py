"""Instructions per event, framework vs hand loop: a load-independent measure of the hot path.

Wall-clock ratios on a shared 2-core machine move by 0.1-0.2 between runs of
the same code; the number of machine instructions executed does not. This
script runs each ``benchmarks/memory_pipeline.py`` case under valgrind's
cachegrind (``valgrind --tool=cachegrind --cache-sim=no``: instruction counts
only) at two input sizes and reports the *marginal* instructions per event,
``(I(large) - I(small)) / (large - small)``, which cancels the interpreter's
start-up, imports and the app's set-up. Building the input (the payloads, and
for the framework the memory topic) is counted in a separate run and taken
off, so what remains is the pipeline itself: the framework's run against the
hand-written loop over the same records.

Instructions are not time (a cache miss costs more than an add), so use this
to compare two versions of the code; use the wall-clock benchmarks for the
figures. valgrind runs Python about 50 times slower: the default sizes take a
few minutes per case.

Usage:
    .venv/bin/python benchmarks/instructions.py                   # every case
    .venv/bin/python benchmarks/instructions.py --cases pipeline_dict,batches_dict
    .venv/bin/python benchmarks/instructions.py --small 5000 --large 20000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = ("pipeline_dict", "pipeline_record", "batches_dict", "batches_record")
MODES = ("framework", "framework-setup", "baseline", "baseline-setup")
_IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def run_mode(case: str, mode: str, events: int) -> None:
    """What one valgrind child runs: one case's input, then (unless ``-setup``) its pipeline."""
    import memory_pipeline as mp

    typed = case.endswith("_record")
    batches = case.startswith("batches")
    payloads = mp.make_payloads(events)
    if mode == "framework":
        asyncio.run(mp.run_framework(payloads, typed, batches))
    elif mode == "framework-setup":  # the memory topic run_framework fills before it runs
        from asyncflow.memory import MemoryBroker

        broker = MemoryBroker()
        broker.create_topic("readings", partitions=mp.PARTITIONS)
        for k, v in payloads:
            broker.produce("readings", v, key=k)
        broker.end("readings")
    elif mode == "baseline":
        asyncio.run(mp.run_baseline(payloads, typed))


def count(case: str, mode: str, events: int) -> int:
    """Instructions one child executed (valgrind's ``I refs``)."""
    cmd = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, __file__, "--child", case, "--mode", mode, "--events", str(events),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = _IREFS.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{case} {mode} {events}: valgrind failed:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def measure(case: str, small: int, large: int) -> dict[str, Any]:
    """Marginal instructions per event of the framework and the hand loop, set-up taken off."""
    per: dict[str, float] = {}
    for mode in MODES:
        per[mode] = (count(case, mode, large) - count(case, mode, small)) / (large - small)
    framework = per["framework"] - per["framework-setup"]
    baseline = per["baseline"] - per["baseline-setup"]
    return {
        "case": case,
        "framework_instructions_per_event": round(framework),
        "baseline_instructions_per_event": round(baseline),
        "ratio": round(baseline / framework, 3),
        "small": small,
        "large": large,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=lambda s: s.split(","), default=list(CASES),
                   help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--small", type=int, default=10_000, help="the smaller input (10,000)")
    p.add_argument("--large", type=int, default=40_000, help="the larger input (40,000)")
    p.add_argument("--json", action="store_true", help="one JSON object per case")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--events", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_mode(args.child, args.mode, args.events)
        return
    unknown = set(args.cases) - set(CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    if not args.small < args.large:
        p.error(f"--small ({args.small}) must be less than --large ({args.large})")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed; install it (apt-get install valgrind)")
    rows = [measure(c, args.small, args.large) for c in CASES if c in args.cases]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'case':<18}{'framework/event':>17}{'hand loop/event':>17}{'ratio':>8}")
    for r in rows:
        print(f"{r['case']:<18}{r['framework_instructions_per_event']:>17,}"
              f"{r['baseline_instructions_per_event']:>17,}{r['ratio']:>8}")


if __name__ == "__main__":
    main()
