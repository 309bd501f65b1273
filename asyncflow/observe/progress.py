"""The progress line a running worker logs at info level every few seconds.

Example:
    >>> snapshot = {"lag": 120, "watermark": "2026-01-01T00:00:05.000Z",
    ...             "totals": {"dead_letters": 2, "events_in": 500},
    ...             "progress": {"read": 500, "total": 1000, "fraction": 0.5}}
    >>> progress_line(snapshot, in_per_s=2500.0, out_per_s=2400.0)
    'progress: 2,500 events/s in, 2,400 out; 500 read, 50.0% of 1,000; lag 120; watermark 2026-01-01T00:00:05.000Z; 2 dead letters'
"""

from __future__ import annotations

from typing import Any

PROGRESS_INTERVAL = 5.0
"""Seconds between two progress lines."""


def progress_line(snapshot: dict[str, Any], in_per_s: float, out_per_s: float) -> str:
    """One line from a ``status`` snapshot and the current rates.

    Example:
        >>> progress_line({"lag": None, "watermark": None, "totals": {"dead_letters": 0,
        ...                "events_in": 0}, "progress": None}, 0.0, 0.0)
        'progress: 0 events/s in, 0 out; 0 read; lag unknown; watermark none yet; 0 dead letters'
    """
    totals = snapshot["totals"]
    parts = [f"progress: {in_per_s:,.0f} events/s in, {out_per_s:,.0f} out"]
    done = snapshot.get("progress")
    read = f"{totals['events_in']:,} read"
    if done is not None:
        read = f"{done['read']:,} read, {100 * done['fraction']:.1f}% of {done['total']:,}"
    parts.append(read)
    lag = snapshot.get("lag")
    parts.append(f"lag {lag:,}" if lag is not None else "lag unknown")
    parts.append(f"watermark {snapshot.get('watermark') or 'none yet'}")
    parts.append(f"{totals['dead_letters']:,} dead letters")
    return "; ".join(parts)
