"""`Namespace`: the versioned tree of one store: epochs, views, snapshots and their
deletion, and the reclaiming of unlinked inodes.

The live tree writes in the current epoch E. A snapshot records E in the catalog and
moves on to E + 1: one small write, whatever the size of the tree. Deleting a snapshot
frees, from the deadlists of the epochs it covered, exactly the versions no remaining
snapshot and not the live tree can see (ZFS's deadlist rule), so its cost follows what
changed, not the size of the tree.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import stat
import time

from ..store import Store
from .catalog import Catalog, SnapshotHeld, SnapshotRecord
from .live import LiveView
from .records import ROOT_INO, U64, Attr, pack_inode
from .deletion import SnapshotDeletion
from .epoch_index import Births, Deadlist
from .versions import VersionedTable
from .view import NamespaceView

log = logging.getLogger(__name__)

_EPOCH, _NEXT_INO, _NEXT_SNAPSHOT = b"epoch", b"next_ino", b"next_snapshot"
_LAST_SNAPSHOT_NAME = b"last_snapshot_name"
FIRST_EPOCH = 1


class InodeSet:
    """A set of inode numbers kept in one LMDB database (orphans, the reclaim queue).

    `mirrored`: its members are also kept in memory, for a set asked about far more
    often than it changes (the orphan set, on every FORGET). Only this object changes
    it, in the one write transaction of the store's one writer, which is never rolled
    back under it (the store aborts one only when it closes), so the copy stays true."""

    def __init__(self, store: Store, name: str, mirrored: bool = False):
        self.store = store
        self.db = store.open_db(name)
        self._mirror: set[int] | None = None
        if mirrored:
            keys = store.txn.cursor(db=self.db).iternext(keys=True, values=False)
            self._mirror = {U64.unpack(k)[0] for k in keys}

    def add(self, ino: int, value: bytes = b"") -> None:
        self.store.txn.put(U64.pack(ino), value, db=self.db)
        if self._mirror is not None:
            self._mirror.add(ino)

    def discard(self, ino: int) -> None:
        self.store.txn.delete(U64.pack(ino), db=self.db)
        if self._mirror is not None:
            self._mirror.discard(ino)

    def __contains__(self, ino: int) -> bool:
        if self._mirror is not None:
            return ino in self._mirror
        return self.store.txn.get(U64.pack(ino), db=self.db) is not None

    def items(self, limit: int | None = None) -> list[tuple[int, bytes]]:
        """(inode, value) in inode order: all, or the first `limit`."""
        rows = itertools.islice(self.store.txn.cursor(db=self.db), limit)
        return [(U64.unpack(k)[0], v) for k, v in rows]

    def __len__(self) -> int:
        return self.store.txn.stat(self.db)["entries"]


class Namespace:
    def __init__(self, store: Store):
        self.store = store
        self.block_size = store.config.block_size
        self.meta = store.open_db("meta")
        self.inodes = VersionedTable(self, "inodes", 1)
        self.entries = VersionedTable(self, "entries", 2)
        self.blockmap = VersionedTable(self, "blockmap", 3, release=store.blocks.decref)
        self.xattrs = VersionedTable(self, "xattrs", 4)
        self.tables = {t.table_id: t for t in (self.inodes, self.entries, self.blockmap,
                                               self.xattrs)}
        self.deadlist = Deadlist(self)
        self.births = Births(self)
        # nlink 0, maybe still open; asked on every FORGET (fs.operations._maybe_reclaim)
        self.orphan_set = InodeSet(store, "orphans", mirrored=True)
        self.reclaim_queue = InodeSet(store, "reclaim")    # ino -> epoch it died in
        self.catalog = Catalog(store)
        self._snapshot_epochs = self.catalog.epochs()
        self._deletions: dict[int, SnapshotDeletion] = {}   # snapshot id -> its freeing
        if self._counter(_EPOCH) is None:
            self._format()
        # Read on every versioned write: kept in memory, changed only by `snapshot`.
        self._epoch = self._counter(_EPOCH)
        self.live = LiveView(self)

    # -- counters --------------------------------------------------------------------

    def _counter(self, key: bytes) -> int | None:
        v = self.store.txn.get(key, db=self.meta)
        return None if v is None else U64.unpack(v)[0]

    def _set_counter(self, key: bytes, value: int) -> None:
        self.store.txn.put(key, U64.pack(value), db=self.meta)

    def _format(self) -> None:
        """An empty tree: the root directory, owned by root, mode 0755."""
        now = time.time_ns()
        self._set_counter(_EPOCH, FIRST_EPOCH)
        self._epoch = FIRST_EPOCH
        self._set_counter(_NEXT_INO, ROOT_INO + 1)
        self._set_counter(_NEXT_SNAPSHOT, 1)
        root = Attr(ROOT_INO, stat.S_IFDIR | 0o755, 0, 0, 0, 2, 0, now, now, now,
                    parent=ROOT_INO)
        self.inodes.write(U64.pack(ROOT_INO), pack_inode(root))

    @property
    def epoch(self) -> int:
        """The live epoch: every change now is born in it."""
        return self._epoch

    def allocate_ino(self) -> int:
        ino = self._counter(_NEXT_INO)
        self._set_counter(_NEXT_INO, ino + 1)
        return ino

    @property
    def next_ino(self) -> int:
        """The inode number the next new file gets."""
        return self._counter(_NEXT_INO)

    def reserve_inos_below(self, ino: int) -> None:
        """Never give out an inode number below `ino` (a replica holds another store's
        inodes under their own numbers)."""
        if ino > self.next_ino:
            self._set_counter(_NEXT_INO, ino)

    # -- views -----------------------------------------------------------------------

    def view(self, epoch: int) -> NamespaceView:
        return NamespaceView(self, epoch)

    def seen_by_snapshot(self, born: int, killed: int) -> bool:
        """Whether a remaining snapshot sees a version that lives in [born, killed)."""
        i = bisect.bisect_left(self._snapshot_epochs, born)
        return i < len(self._snapshot_epochs) and self._snapshot_epochs[i] < killed

    # -- snapshots -------------------------------------------------------------------

    def snapshot(self, label: str | None = None, hold: bool = False,
                 now_ns: int | None = None, name: str | None = None) -> SnapshotRecord:
        """Freeze the live tree: O(1), the caller has sealed everything into this epoch.
        `name`: the replica of another store's snapshot keeps its name (replication)."""
        epoch = self.epoch
        snap_id = self._counter(_NEXT_SNAPSHOT)
        last = self.store.txn.get(_LAST_SNAPSHOT_NAME, db=self.meta)
        record = self.catalog.add(snap_id, epoch, label, hold, now_ns,
                                  None if last is None else bytes(last).decode(), name)
        self._set_counter(_NEXT_SNAPSHOT, snap_id + 1)
        self.store.txn.put(_LAST_SNAPSHOT_NAME, record.name.encode(), db=self.meta)
        self._snapshot_epochs.append(epoch)
        self._set_counter(_EPOCH, epoch + 1)
        self._epoch = epoch + 1
        return record

    def snapshots(self) -> list[SnapshotRecord]:
        """Every snapshot users see, oldest first (not those being deleted)."""
        return [r for r in self.catalog.records if not r.deleting]

    def deleting_snapshots(self) -> list[SnapshotRecord]:
        """Snapshots deleted while open: readable still, freed by `delete_snapshot` (or
        `start_deleting`) once closed; not those being freed already."""
        return [r for r in self.catalog.records
                if r.deleting and r.id not in self._deletions]

    def snapshot_epochs(self) -> list[int]:
        """The epochs of every snapshot that still holds versions: deleting ones and
        those being freed included."""
        return sorted(self._snapshot_epochs + [d.record.epoch for d in self._deletions.values()])

    def mark_deleting(self, snap_id: int) -> SnapshotRecord:
        """Take a snapshot out of sight now, durably once committed; its versions stay
        until `delete_snapshot` (files in it are still open)."""
        record = self.catalog.get(snap_id)
        if record.hold:
            raise SnapshotHeld(f"snapshot {record.name} is held; release it first")
        return self.catalog.set_deleting(snap_id)

    def find_snapshot(self, name_or_id: str | int) -> SnapshotRecord:
        return self.catalog.find(name_or_id)

    def set_hold(self, snap_id: int, hold: bool) -> SnapshotRecord:
        return self.catalog.set_hold(snap_id, hold)

    def delete_snapshot(self, snap_id: int) -> int:
        """Delete a snapshot and free what only it could see, in one go; returns versions
        freed."""
        deletion = self.start_deleting(snap_id)
        deletion.free_some()
        return deletion.freed

    def start_deleting(self, snap_id: int) -> SnapshotDeletion:
        """Hide a snapshot for good and stop counting it as a reader of versions; its
        versions are freed by the returned deletion's `free_some` (see deletion.py).
        One deletion at a time: finish it before starting another."""
        if self._deletions:
            raise RuntimeError("one snapshot deletion at a time")
        record = self.mark_deleting(snap_id)
        epochs = self._snapshot_epochs
        i = epochs.index(record.epoch)
        prev_epoch = epochs[i - 1] if i > 0 else 0
        next_epoch = epochs[i + 1] if i + 1 < len(epochs) else self.epoch
        del epochs[i]
        deletion = self._deletions[snap_id] = SnapshotDeletion(self, record, prev_epoch,
                                                               next_epoch)
        return deletion

    def deletion_ended(self, deletion: SnapshotDeletion) -> None:
        del self._deletions[deletion.record.id]

    # -- unlinked inodes -------------------------------------------------------------

    def orphans(self) -> list[int]:
        """Inodes with no names left that were not reclaimed (open when last seen)."""
        return [ino for ino, _ in self.orphan_set.items()]

    def reclaim(self, ino: int) -> None:
        """Drop an inode with no names that nothing holds open. The inode record goes at
        once; its blocks and xattrs are queued for `collect_garbage`, off the hot path."""
        try:
            attr = self.live.getattr(ino)
        except OSError:
            return
        if attr.nlink:
            return
        self.orphan_set.discard(ino)
        self.inodes.write(U64.pack(ino), None)
        self.reclaim_queue.add(ino, U64.pack(self.epoch))

    def collect_garbage(self, budget: int) -> int:
        """Release up to `budget` records of at most `budget` reclaimed inodes; returns how
        many inodes are still queued (0: nothing left to do)."""
        for ino, died in self.reclaim_queue.items(limit=budget):
            died_in = U64.unpack(died)[0]
            budget = self._release_inode_records(ino, died_in, budget)
            if budget <= 0:
                break
            self.reclaim_queue.discard(ino)
        return len(self.reclaim_queue)

    def _release_inode_records(self, ino: int, died_in: int, budget: int) -> int:
        """Remove (as of the epoch the inode died in) its block map and xattrs."""
        group = U64.pack(ino)
        for table in (self.blockmap, self.xattrs):
            # Not listed first: that read all of a big file's entries for every budget.
            # (scan finds its place afresh after each write.)
            for prefix, _ in table.scan(group, died_in):
                if budget <= 0:
                    return 0
                table.write(prefix, None, epoch=died_in)
                budget -= 1
        return budget
