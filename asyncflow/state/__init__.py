"""Durable keyed state: tables and window state, checkpointed with the source offsets.

A key's state lives with the source partition its events come from. Each
(app, table, partition) has a local store on disk (``asyncflow.state.store``)
and a changelog topic ``<app>-<table>-changelog`` on the broker; a checkpoint
(``asyncflow.checkpoint``) writes both after the outputs are flushed and
before the offsets are committed, and a partition assigned to a worker is
restored before it is read (``asyncflow.state.restore``). The guarantees:

- **No event applied twice to state.** A replay after a crash starts at the
  committed offset; state that already reflects later offsets skips them.
- **State never ahead of outputs.** What state claims was flushed first.
- **Nothing lost.** What the committed offsets cover is in the changelog.
- **A worker that lost a partition leaves nothing behind.** Its lanes handle
  none of the partition's events after the one each is on, that one is
  abandoned if it asks for state (``PartitionRevoked``), and a checkpoint it
  writes late (it was dropped from the group without knowing yet) is not
  what anyone restores: each restore claims the partition, and later
  restores follow the claims (``asyncflow.state.restore``).

Outputs are at-least-once: a crash, a kill or a rebalance may send what was
sent since the last checkpoint again.

Example:
    >>> import asyncflow as af
    >>> app = af.App("shop")
    >>> carts = app.table("carts", default=[])
    >>> carts.name, app.tables["carts"] is carts
    ('carts', True)
"""

from asyncflow.state.keyed import KeyedState
from asyncflow.state.table import Table

__all__ = ["KeyedState", "Table"]
