"""``asyncflow status --web http://host:port``: a running worker's figures in the terminal.

It reads the worker's ``/api/status`` (the same figures as the page) once
and prints them; an address that does not answer is one line naming it
(credentials in it masked) and exit 1.

Example:
    >>> snapshot = {"app": "rides", "broker": "kafka://h:9092", "running": True,
    ...     "totals": {"events_in": 10, "events_out": 9, "dead_letters": 1, "late_events": 0},
    ...     "lag": 0, "watermark": None, "progress": None, "throughput": [],
    ...     "topology": {"topics": [{"name": "in", "partitions": 1}],
    ...                  "agents": [{"name": "parse", "reads": "in", "lanes": 2, "writes": ["out"]}],
    ...                  "sinks": [], "dead_letters": "rides-dead-letters"},
    ...     "partitions": [{"topic": "in", "partition": "0", "read_to": 9, "committed": 9,
    ...                     "end": 10, "lag": 0, "watermark": None, "paused": False}],
    ...     "lanes": {"parse": 0}, "dead_letter_reasons": {"decode": 1}, "recent_dead_letters": []}
    >>> print(render(snapshot))  # doctest: +NORMALIZE_WHITESPACE
    rides: running on kafka://h:9092
    events in 10, out 9 (0 /s in, 0 /s out); lag 0; watermark none yet; dead letters 1 (decode 1)
    in -> parse (2 lanes) -> out
    dead letters to rides-dead-letters
    partition          read to  committed        end      lag  watermark
    in[0]                    9          9         10        0  -
"""

from __future__ import annotations

import asyncio  # noqa: F401 - the doctests use it
import json
from typing import Any

import aiohttp

from asyncflow.errors import AsyncflowError, redact_url


class StatusUnavailable(AsyncflowError):
    """The worker's web address did not answer with a status."""


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def render(s: dict[str, Any]) -> str:
    """The status snapshot as lines of text."""
    totals = s["totals"]
    last = s["throughput"][-1] if s["throughput"] else {"in_per_s": 0, "out_per_s": 0}
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(s["dead_letter_reasons"].items()))
    lines = [
        f"{s['app']}: {'running' if s['running'] else 'starting'} on {s['broker']}",
        f"events in {totals['events_in']:,}, out {totals['events_out']:,} "
        f"({last['in_per_s']:,.0f} /s in, {last['out_per_s']:,.0f} /s out); lag {_n(s['lag'])}; "
        f"watermark {s['watermark'] or 'none yet'}; dead letters {totals['dead_letters']:,}"
        + (f" ({reasons})" if reasons else ""),
    ]
    if s["progress"] is not None:
        p = s["progress"]
        lines.append(f"progress {p['read']:,} of {p['total']:,} ({100 * p['fraction']:.1f}%)")
    topo = s["topology"]
    for a in topo["agents"]:
        lines.append(" -> ".join([a["reads"], f"{a['name']} ({a['lanes']} lanes)", *a["writes"]]))
    lines.append(f"dead letters to {topo['dead_letters']}")
    lines.append(f"{'partition':<14}{'read to':>11}{'committed':>11}{'end':>11}{'lag':>9}  watermark")
    for p in s["partitions"]:
        name = f"{p['topic']}[{p['partition']}]" if p["topic"] else p["partition"]
        lines.append(f"{name:<14}{_n(p['read_to']):>11}{_n(p['committed']):>11}"
                     f"{_n(p['end']):>11}{_n(p['lag']):>9}  {p['watermark'] or '-'}")
    for d in s["recent_dead_letters"][:5]:
        lines.append(f"dead letter {d['reason_class']}: {d['topic']} {d['partition']}"
                     f"@{_n(d['offset'])}: {d['reason']}")
    return "\n".join(lines)


async def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``url``/api/status; ``StatusUnavailable`` (one line) when it does not answer.

    Example:
        >>> asyncio.run(fetch_status("http://127.0.0.1:9/", timeout=1))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        asyncflow.observe.terminal.StatusUnavailable: no asyncflow worker answered at http://127.0.0.1:9/ ...
    """
    base = url if "://" in url else f"http://{url}"
    endpoint = base.rstrip("/") + "/api/status"
    shown = redact_url(base)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.get(endpoint) as response:
                if response.status != 200:
                    raise StatusUnavailable(
                        f"{shown} answered HTTP {response.status}; is it a worker started with "
                        "--web-port?")
                data: dict[str, Any] = json.loads(await response.text())
                return data
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        why = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0]
        raise StatusUnavailable(
            f"no asyncflow worker answered at {shown} ({redact_url(why)}); start it with "
            "asyncflow worker ... --web-port PORT and give that address"
        ) from None
