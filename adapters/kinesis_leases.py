"""Shard leases shared between workers: the decisions, with no I/O (testable with plain values).

A *lease* is one row of the lease table per shard (``kinesis_lease_table``
reads and writes them). Its holder renews it by adding one to its counter
every ``renewal_interval`` seconds; another worker that has seen the counter
stand still for ``lease_duration`` seconds (by its own clock, so clocks need
not agree) takes the lease as expired. Every write is conditional on the
owner and counter last seen, so of two workers racing for a lease one wins.

This module answers, from the rows and the times a worker saw them:

- which leases have expired (``ExpiryWatch``);
- which leases a worker takes next (``leases_to_take``): expired or unowned
  ones first, up to its fair share (leases divided by live workers, rounded
  up); when none is free and it is below its share by more than one, a few
  (``max_leases_to_steal``) from the most-loaded worker.

Example:
    >>> watch = ExpiryWatch(lease_duration=10.0)
    >>> rows = [Lease("s0", "w1", 5), Lease("s1", None, 0)]
    >>> watch.observe(rows, now=0.0)
    >>> sorted(watch.expired(rows, now=5.0))
    ['s1']
    >>> watch.observe(rows, now=10.0)     # s0's counter did not move for 10 s
    >>> sorted(watch.expired(rows, now=10.0))
    ['s0', 's1']
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from asyncflow.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Lease:
    """One shard's lease as last read from the lease table.

    ``owner`` is ``None`` for a lease nobody holds (new, released at a
    hand-over, or finished); ``counter`` grows at every write (take, renewal,
    checkpoint, release); ``checkpoint`` is the last processed sequence
    number, ``SHARD_END`` or ``None``; ``parents`` are the shard's parents;
    ``owner_switches`` counts owner changes since the last checkpoint;
    ``holder`` is the token of the process that wrote the lease last under
    ``owner`` (two processes given the same worker id tell their writes apart
    by it).

    Example:
        >>> Lease("shardId-000000000001", "worker-a", 3, checkpoint="42").owner
        'worker-a'
    """

    shard_id: str
    owner: str | None
    counter: int
    checkpoint: str | None = None
    parents: tuple[str, ...] = ()
    owner_switches: int = 0
    holder: str | None = None


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """Lease timing and identity of one worker, range-checked.

    ``lease_duration``: seconds a lease's counter must stand still before
    another worker takes it (the longest a dead worker's shards wait).
    ``renewal_interval``: seconds between renewals (and lease-table scans);
    below ``lease_duration`` so that a live worker renews in time (a third of
    it by default). ``max_leases_to_steal``: leases taken from a live worker
    at one time when balancing (0: never steal). ``worker_id``: this worker's
    name in the table, unique per process.

    Example:
        >>> LeaseSettings(lease_duration=10.0, worker_id="w1").renewal_interval
        3.3333333333333335
        >>> LeaseSettings(lease_duration=0.0, worker_id="w1")
        Traceback (most recent call last):
        ...
        asyncflow.errors.ConfigError: lease_duration must be between 0.1 and 86400 s, got 0.0
    """

    lease_duration: float = 10.0
    worker_id: str = ""
    renewal_interval: float | None = None
    max_leases_to_steal: int = 1

    def __post_init__(self) -> None:
        if not 0.1 <= self.lease_duration <= 86_400:
            raise ConfigError(
                f"lease_duration must be between 0.1 and 86400 s, got {self.lease_duration}"
            )
        if self.renewal_interval is None:
            object.__setattr__(self, "renewal_interval", self.lease_duration / 3)
        elif not 0.01 <= self.renewal_interval < self.lease_duration:
            raise ConfigError(
                f"lease_renewal_interval must be at least 0.01 s and below lease_duration "
                f"({self.lease_duration} s), got {self.renewal_interval}"
            )
        if not 0 <= self.max_leases_to_steal <= 1000:
            raise ConfigError(
                f"max_leases_to_steal must be between 0 and 1000, got {self.max_leases_to_steal}"
            )
        if not self.worker_id or len(self.worker_id) > 256:
            raise ConfigError(
                f"worker_id must be 1 to 256 characters, got {self.worker_id!r}; leave it out "
                f"for host-pid-random"
            )

    @property
    def renew_every(self) -> float:
        """``renewal_interval`` as a number (it is filled in when not given).

        Example:
            >>> LeaseSettings(lease_duration=3.0, worker_id="w").renew_every
            1.0
        """
        assert self.renewal_interval is not None
        return self.renewal_interval


class ExpiryWatch:
    """When this worker last saw each lease's owner or counter change.

    ``observe`` is given every scan of the table with the local monotonic
    time; a lease is expired once its owner and counter have stood still for
    ``lease_duration`` seconds since first seen that way (a worker that just
    started waits a full duration before taking anything from a live owner).
    A lease without an owner is always free to take.

    Example:
        >>> watch = ExpiryWatch(2.0)
        >>> watch.observe([Lease("s0", "w1", 1)], now=0.0)
        >>> watch.observe([Lease("s0", "w1", 2)], now=1.5)   # renewed: the clock restarts
        >>> watch.expired([Lease("s0", "w1", 2)], now=3.0)
        set()
        >>> watch.expired([Lease("s0", "w1", 2)], now=3.5)
        {'s0'}
    """

    def __init__(self, lease_duration: float) -> None:
        self.lease_duration = lease_duration
        self._seen: dict[str, tuple[str | None, int, float]] = {}

    def observe(self, leases: Iterable[Lease], now: float) -> None:
        """Record a scan: a lease whose owner or counter changed starts a new wait."""
        current: dict[str, tuple[str | None, int, float]] = {}
        for lease in leases:
            before = self._seen.get(lease.shard_id)
            if before is not None and before[:2] == (lease.owner, lease.counter):
                current[lease.shard_id] = before
            else:
                current[lease.shard_id] = (lease.owner, lease.counter, now)
        self._seen = current

    def is_expired(self, lease: Lease, now: float) -> bool:
        """Nobody holds ``lease``, or its counter stood still for ``lease_duration``."""
        if lease.owner is None:
            return True
        seen = self._seen.get(lease.shard_id)
        if seen is None or seen[:2] != (lease.owner, lease.counter):
            return False  # not observed like this yet: the wait starts at the next observe
        return now - seen[2] >= self.lease_duration

    def expired(self, leases: Iterable[Lease], now: float) -> set[str]:
        """The shard ids of ``leases`` that are expired at ``now``."""
        return {lease.shard_id for lease in leases if self.is_expired(lease, now)}


def fair_share(leases: int, workers: int) -> int:
    """How many leases each worker aims at: ``leases / workers``, rounded up.

    Example:
        >>> fair_share(4, 3), fair_share(4, 1), fair_share(0, 2)
        (2, 4, 0)
    """
    return math.ceil(leases / max(1, workers))


def leases_to_take(
    leases: Collection[Lease],
    worker_id: str,
    *,
    expired: Collection[str],
    eligible: Collection[str],
    max_leases_to_steal: int,
) -> list[str]:
    """The shard ids whose leases ``worker_id`` tries to take now, best first.

    ``leases`` is the table (finished shards left out), ``expired`` what
    ``ExpiryWatch`` says, ``eligible`` the shards that may be read now
    (parents finished). Live workers are the owners of unexpired leases and
    this one; the target is ``fair_share`` of the eligible leases. Below it,
    the worker takes expired or unowned eligible leases (sorted by shard id);
    if there are none and it holds at least two fewer than the target (or
    the most-loaded worker holds more than the target), it steals up to
    ``max_leases_to_steal`` from the most-loaded worker. Pure: the caller
    makes the conditional writes, and a lost race just loses that lease.

    Example:
        >>> table = [Lease(f"s{i}", "w1", 1) for i in range(4)]
        >>> leases_to_take(table, "w2", expired=(), eligible=[l.shard_id for l in table],
        ...                max_leases_to_steal=1)
        ['s0']
        >>> leases_to_take(table, "w1", expired=(), eligible=[l.shard_id for l in table],
        ...                max_leases_to_steal=1)
        []
    """
    pool = [lease for lease in leases if lease.shard_id in eligible]
    expired_set = set(expired)
    live = {
        lease.owner
        for lease in pool
        if lease.owner is not None and lease.shard_id not in expired_set
    }
    live.add(worker_id)
    held: Counter[str] = Counter(
        lease.owner
        for lease in pool
        if lease.owner is not None and lease.shard_id not in expired_set
    )
    mine = held[worker_id]
    target = fair_share(len(pool), len(live))
    needed = target - mine
    if needed <= 0:
        return []
    free = sorted(
        lease.shard_id
        for lease in pool
        if lease.shard_id in expired_set and lease.owner != worker_id
    )
    if free:
        return free[:needed]
    if max_leases_to_steal <= 0:
        return []
    others = [(count, owner) for owner, count in held.items() if owner != worker_id]
    if not others:
        return []
    # the most loaded; ties broken by name so that every worker picks the same victim
    most, victim = max(others, key=lambda pair: (pair[0], pair[1]))
    if most > target:
        n = min(max_leases_to_steal, needed, most - target)
    elif most == target and needed > 1:
        n = 1  # taking one from a worker at the target leaves both at or above target - 1
    else:
        return []
    theirs = sorted(lease.shard_id for lease in pool if lease.owner == victim)
    return theirs[:n]


def eligible_shards(
    leases: Mapping[str, Lease], listed: Collection[str], finished: Collection[str]
) -> set[str]:
    """Shards whose lease may be taken: not finished, every parent finished or gone.

    ``listed`` are the shards the stream lists now; a parent no longer listed
    was trimmed away (older than the retention period) and counts as done.

    Example:
        >>> rows = {"p": Lease("p", None, 0, checkpoint="SHARD_END"),
        ...         "c": Lease("c", None, 0, parents=("p",)),
        ...         "d": Lease("d", None, 0, parents=("c",))}
        >>> sorted(eligible_shards(rows, ["p", "c", "d"], finished=["p"]))
        ['c']
    """
    done = set(finished)
    out = set()
    for shard_id, lease in leases.items():
        if shard_id in done:
            continue
        if all(p in done or p not in listed for p in lease.parents):
            out.add(shard_id)
    return out
