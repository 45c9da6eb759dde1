"""Replication: one store's snapshots copied into another (a USB disk, a second NAS's
disk), as `zfs send -i | zfs receive` does.

The replica holds the same snapshots, by name and creation time, and its live tree is
the newest of them. Each run sends the source's snapshots that are newer than the
newest one both stores have (the base), oldest first:

- What is copied per snapshot is what changed since the last one sent: the namespace
  records with a version born between the two snapshots' epochs (the births index lists
  them, so the cost follows the changes, not the size of the tree), and the blocks the
  replica lacks. Those go over as their records, byte for byte (no recompression), each
  checked against its BLAKE3 address on the way.
- Records keep their keys, so inode numbers too: hard links and everything else that
  names an inode come over as they are, and the replica never gives out a number below
  the source's next one.
- An incremental run needs the base still in the source: while it exists, a name
  deleted since keeps a tombstone there, which is how the deletion is known.
- The replica's live tree must be as its newest snapshot left it (the replica is not for
  writing into); a run refuses otherwise, and refuses a replica whose newest snapshot
  the source does not have.
- The blocks a snapshot needs go first, committed every COMMIT_BYTES as blocks nothing
  refers to yet (dead, as a deleted file's are). Then its records, and the snapshot, in
  one transaction of the replica (packs synced, then the index committed). An
  interruption leaves the replica at its last whole snapshot, with the blocks copied so
  far: the next run takes those as they are and goes on (a `compact` in between would
  drop them).

Files unlinked but still open when a snapshot was taken (nlink 0) are not sent: no name
reaches them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import BackupfsError, CorruptBlock
from ..namespace import Namespace
from ..namespace.catalog import SnapshotRecord
from ..namespace.records import ROOT_INO, U64
from ..store import codec

# Inodes whose records are dropped at once per collect_garbage call, in the replica.
GC_BUDGET = 10_000
# Bytes of blocks copied between commits: what an interrupted run copies again.
COMMIT_BYTES = 256 << 20
LIVENESS_CACHE_MAX = 1 << 16


class ReplicationError(BackupfsError):
    """The two stores cannot be matched up: nothing was changed."""


@dataclass
class Plan:
    base: SnapshotRecord | None  # the newest snapshot both have (the source's record)
    todo: list[SnapshotRecord]   # the source's snapshots to send, oldest first


@dataclass
class Sent:
    """What sending one snapshot (or rolling the replica's live tree back to one) took."""

    name: str
    rollback: bool = False
    records: int = 0             # namespace records written in the replica
    blocks_copied: int = 0       # blocks the replica did not have
    bytes_copied: int = 0        # their records' bytes
    blocks_shared: int = 0       # references to blocks it had (or had just copied)


def same_snapshot(a: SnapshotRecord, b: SnapshotRecord) -> bool:
    return a.name == b.name and a.created_ns == b.created_ns


def plan(source: Namespace, replica: Namespace, rollback: bool = False) -> Plan:
    """Which snapshots to send; ReplicationError if the replica is not one of `source`,
    or (unless `rollback`) if its live tree was changed since its newest snapshot."""
    theirs = source.snapshots()
    ours = replica.snapshots()
    if not ours:
        if replica.next_ino != ROOT_INO + 1 or next(replica.live.names(ROOT_INO), None):
            raise ReplicationError(
                "the destination holds files but no snapshot: it is not a replica "
                "(replicate into a new or empty directory)")
        return Plan(None, theirs)
    newest = ours[-1]
    base = next((s for s in theirs if same_snapshot(s, newest)), None)
    if base is None:
        raise ReplicationError(
            f"the destination's newest snapshot, {newest.name}, is not in the source "
            f"(deleted there, or taken in the destination): there is nothing to send "
            f"changes against; replicate into a new store")
    if not rollback and has_local_changes(replica):
        raise ReplicationError(
            f"the destination's live tree was changed after its snapshot {newest.name} "
            f"(mounted and written to): --rollback discards those changes")
    todo = [s for s in theirs if s.epoch > base.epoch]
    held = {r.name for r in replica.catalog.records} & {s.name for s in todo}
    if held:
        # A snapshot deleted in the replica while open there, not yet freed.
        raise ReplicationError(
            f"the destination still holds a snapshot named {min(held)} that is being "
            f"deleted: mount it once and unmount it, then run again")
    return Plan(base, todo)


def run(todo: Plan, source: Namespace, replica: Namespace, rollback: bool = False,
        progress: Callable[[str, int, int], None] | None = None) -> Iterator[Sent]:
    """Carry out a plan: first the rollback if asked for and needed, then each snapshot,
    each committed as it is yielded. `progress(snapshot name, done, total)`."""
    def sender(name: str, source: Namespace) -> Sender:
        return Sender(source, replica, progress and (lambda d, t: progress(name, d, t)))

    if rollback and todo.base is not None and has_local_changes(replica):
        yield sender(replica.snapshots()[-1].name, replica).rollback()
    base_epoch = todo.base.epoch if todo.base else 0
    for snapshot in todo.todo:
        yield sender(snapshot.name, source).send(snapshot, base_epoch)
        base_epoch = snapshot.epoch


def changed_keys(ns: Namespace, first: int, last: int) -> Iterator[tuple[int, bytes]]:
    """(table id, key) of each version born in epochs first..last, read a piece at a time
    (a send of a whole store must not hold every key in memory). A key changed in several
    epochs comes once for each; looking at it again finds nothing to do."""
    for _, table_id, prefix, _ in ns.births.walk(first, last):
        yield table_id, prefix


def has_local_changes(replica: Namespace) -> bool:
    """Whether a record of the replica's live tree differs from its newest snapshot."""
    newest = replica.snapshots()[-1].epoch
    return any(replica.tables[t].read(prefix, newest)
               != replica.tables[t].read(prefix, replica.epoch)
               for t, prefix in changed_keys(replica, newest + 1, replica.epoch))


class Sender:
    """Sends snapshots of `source` into `replica` (both open; the replica writable).
    `progress(done, total)` is called as records are looked at."""

    def __init__(self, source: Namespace, replica: Namespace,
                 progress: Callable[[int, int], None] | None = None):
        self.src = source
        self.dst = replica
        self.progress = progress or (lambda done, total: None)

    def send(self, snapshot: SnapshotRecord, base_epoch: int) -> Sent:
        """Make the replica's live tree the snapshot's, then snapshot it under the same
        name and time; committed. `base_epoch`: the source epoch of the snapshot the
        replica's live tree is now (0 for none: everything is sent)."""
        sent = Sent(snapshot.name)
        self._copy_blocks(snapshot.epoch, base_epoch + 1, sent)
        self._copy(snapshot.epoch, base_epoch + 1, snapshot.epoch, sent)
        self.dst.reserve_inos_below(self.src.next_ino)
        self.dst.snapshot(label=snapshot.label, now_ns=snapshot.created_ns, name=snapshot.name)
        self.dst.store.commit()
        return sent

    def _copy_blocks(self, epoch: int, first: int, sent: Sent) -> None:
        """Copy the blocks that the block maps changed in epochs first..epoch name at
        `epoch` and the replica lacks, committing every COMMIT_BYTES."""
        alive = _Liveness(self.src, epoch)
        since_commit = 0
        for table_id, prefix in changed_keys(self.src, first, epoch):
            if table_id != self.src.blockmap.table_id:
                continue
            h = self.src.blockmap.read(prefix, epoch)
            if h is None or not alive(U64.unpack_from(prefix)[0]):
                continue
            if self.dst.store.blocks.location_or_none(h) is not None:
                sent.blocks_shared += 1
                continue
            since_commit += self._copy_block(h, sent)
            if since_commit >= COMMIT_BYTES:
                self.dst.store.commit()
                since_commit = 0

    def _copy(self, epoch: int, first: int, last: int, sent: Sent) -> None:
        """Give every key with a version born in the source's epochs first..last, in the
        replica's live tree, its value at the source's `epoch`; then free what files
        that went away leave."""
        total = sum(1 for _ in changed_keys(self.src, first, last))
        self.progress(0, total)
        alive = _Liveness(self.src, epoch)
        gone = []
        for done, (table_id, prefix) in enumerate(changed_keys(self.src, first, last), 1):
            if self._copy_record(table_id, prefix, epoch, alive, sent):
                gone.append(U64.unpack_from(prefix)[0])
            if done % 1000 == 0:
                self.progress(done, total)
        self.progress(total, total)
        # A file gone since leaves its block map and xattrs: freed as the source's own
        # garbage collection frees an unlinked file's.
        for ino in gone:
            self.dst.reclaim_queue.add(ino, U64.pack(self.dst.epoch))
        while self.dst.collect_garbage(GC_BUDGET):
            pass

    def _copy_record(self, table_id: int, prefix: bytes, epoch: int,
                     alive: "_Liveness", sent: Sent) -> bool:
        """Give the key its value at `epoch`; whether that removed an inode record."""
        src_table, dst_table = self.src.tables[table_id], self.dst.tables[table_id]
        ino = U64.unpack_from(prefix)[0]  # every table's keys begin with an inode
        want = src_table.read(prefix, epoch)
        if want is not None and src_table is not self.src.entries and not alive(ino):
            want = None  # an open unlinked file's, or a gone file's not yet freed
        have = dst_table.read(prefix, self.dst.epoch)
        if want == have:
            return False
        if want is not None and dst_table is self.dst.blockmap:
            self._take_block(want, sent)
        dst_table.write(prefix, want)
        sent.records += 1
        if dst_table is not self.dst.inodes:
            return False
        # Only a rollback meets an orphan here (a file unlinked in the replica while
        # open): named again, or freed with the rest.
        self.dst.orphan_set.discard(ino)
        return want is None

    def rollback(self) -> Sent:
        """Undo what was written into the replica's live tree since its newest snapshot
        (Sender(replica, replica)); committed."""
        newest = self.dst.snapshots()[-1]
        sent = Sent(newest.name, rollback=True)
        # Walked while written: a key met again (born anew in the live epoch) is found
        # done, and births.walk resumes after the last key it gave.
        self._copy(newest.epoch, newest.epoch + 1, self.dst.epoch, sent)
        self.dst.store.commit()
        return sent

    def _take_block(self, h: bytes, sent: Sent) -> None:
        """One more reference to block `h` in the replica. It is there: copied by
        `_copy_blocks`, which reads the same view, or a rollback's own."""
        self.dst.store.blocks.incref(h)

    def _copy_block(self, h: bytes, sent: Sent) -> int:
        """Copy block `h` from the source, unreferenced; the bytes it took."""
        blocks = self.dst.store.blocks
        loc = self.src.store.blocks.locate(h)
        try:
            record, plaintext = self.src.store.blocks.read_record(loc)
        except CorruptBlock as e:
            raise ReplicationError(
                f"{e}: nothing of snapshot {sent.name} was written to the destination "
                f"(a pack compacted by the source's daemon meanwhile? run again; "
                f"else `backupfs verify` the source)") from None
        sent.blocks_copied += 1
        if bool(loc.codec & codec.CHECKED) == blocks.checked_records:
            blocks.put_record(loc, record)
            sent.bytes_copied += len(record)
            return len(record)
        # Stores of different format versions: encoded as the replica's are.
        blocks.put(plaintext)
        blocks.decref(h)
        sent.bytes_copied += len(plaintext)
        return len(plaintext)


class _Liveness:
    """Whether an inode has a name in one view of the source (cached)."""

    def __init__(self, ns: Namespace, epoch: int):
        self.view = ns.view(epoch)
        self._known: dict[int, bool] = {}

    def __call__(self, ino: int) -> bool:
        known = self._known.get(ino)
        if known is None:
            if len(self._known) >= LIVENESS_CACHE_MAX:
                self._known.clear()  # keys come by inode within an epoch: few are met again
            try:
                known = self.view.getattr(ino).nlink > 0
            except OSError:  # no such inode there
                known = False
            self._known[ino] = known
        return known
