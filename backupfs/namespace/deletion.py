"""`SnapshotDeletion`: freeing what only one snapshot could see, a piece at a time.

Deleting a snapshot that many changes followed frees one version per change (2.6 s of
work after 10% of a million files changed), so the daemon does it in pieces and serves
requests between them. What makes that safe:

- The snapshot's epoch leaves the namespace's list of snapshot epochs before the first
  piece. From then on a write that kills a version only this snapshot saw frees it at
  once, so no new deadlist entry in the range being walked ever names a version this
  deletion must free: the walk can resume after the last key it looked at.
- Each freed version goes with its deadlist and births entries and block reference in
  the same write transaction, so whatever a commit between two pieces makes durable is
  a consistent store: the catalog still names the snapshot (marked deleting, hidden from
  users), and the versions not yet freed are still seen by its epoch. After a crash the
  next mount starts the deletion again; versions freed already are simply not met.
- One deletion runs at a time (`Namespace.start_deleting` refuses a second): freeing
  moves deadlist entries, and a second walk over the same range could then be told a
  stale birth.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .catalog import SnapshotRecord

if TYPE_CHECKING:
    from .namespace import Namespace

log = logging.getLogger(__name__)


class SnapshotDeletion:
    def __init__(self, ns: "Namespace", record: SnapshotRecord, prev_epoch: int,
                 next_epoch: int):
        self.ns = ns
        self.record = record
        # Versions born after the previous snapshot and killed up to the next one (or the
        # live epoch) were seen by this snapshot alone.
        self._prev_epoch = prev_epoch
        self._first, self._last = record.epoch + 1, next_epoch
        self._after: bytes | None = None   # the last deadlist key looked at
        self.freed = 0
        self.done = False

    def free_some(self, budget: int | None = None) -> bool:
        """Look at up to `budget` deadlist entries (None: all that are left) and free the
        versions among them that nobody sees now. True once the snapshot is gone."""
        if self.done:
            return True
        ns = self.ns
        entries = ns.deadlist.killed_in(self._first, self._last, self._after, budget)
        for killer, table_id, prefix, born in entries:
            table = ns.tables[table_id]
            # Still killed by `killer` and born after the previous snapshot: the version
            # lived in [born, killer) where no remaining snapshot is. (An entry freed or
            # moved by an earlier free_version is not met, or met with another birth.)
            if born > self._prev_epoch and ns.deadlist.get(killer, table, prefix) == born:
                table.free_version(prefix, born)
                self.freed += 1
        if entries:
            killer, table_id, prefix, _ = entries[-1]
            self._after = ns.deadlist.key_of(killer, table_id, prefix)
        if budget is None or len(entries) < budget:
            ns.catalog.remove(self.record.id)
            ns.deletion_ended(self)
            self.done = True
            log.debug("snapshot %s deleted: %d versions freed", self.record.name, self.freed)
        return self.done
