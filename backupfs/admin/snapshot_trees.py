"""fsck of the snapshots' trees, at the cost of what changed between them.

Walking every snapshot's tree costs snapshots x files: a year of daily snapshots of a
million files is 365 million entries (0.1 s per snapshot of 10,000 files here). But a
snapshot's tree differs from the one before it only where a version was born between
them (versions.py: a version stops being seen only where the next one of its key is
born), and the births index names those. So the first snapshot is counted whole, and each
later one is the one before it plus what its births changed; a problem is reported once,
with the snapshots it is seen in.

What is checked in each snapshot, over every entry and inode it holds (not only those
reachable from the root, which a walk would see):
- every entry names an inode that exists (`dangling-entry`);
- entries lie only in inodes that exist and are directories (`stray-entry`);
- each inode's link count: the entries naming it, 2 plus its subdirectories for a
  directory, 0 for one that nothing names (an unlinked file still open, `orphan`).

This trusts the births index, which `check_versions` checks first. If that found the
index wrong, every snapshot is counted whole instead, which reads only the tables.
"""

from __future__ import annotations

import stat
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from ..namespace import ROOT_INO
from ..namespace.records import U64, unpack_inode


@dataclass
class SnapshotProblem:
    kind: str       # dangling-entry, stray-entry or nlink
    ino: int
    message: str
    first: int      # index of the first and last snapshot it is seen in
    last: int


class _Counts:
    """Entry counts of one view: what the checks need, kept up to date by deltas."""

    def __init__(self):
        self.names: Counter = Counter()       # inode -> entries naming it
        self.subdirs: Counter = Counter()     # directory -> entries in it naming a directory
        self.entries_in: Counter = Counter()  # directory -> entries in it
        self.inodes = 0                       # inodes in the view

    def count(self, parent: int, child: int, child_is_dir: bool, sign: int) -> None:
        self.names[child] += sign
        self.entries_in[parent] += sign
        if child_is_dir:
            self.subdirs[parent] += sign


class SnapshotTrees:
    def __init__(self, ns, trust_births: bool = True):
        self.ns = ns
        self.trust_births = trust_births
        self.problems: list[SnapshotProblem] = []
        self.inodes_checked = 0  # summed over the snapshots
        self._open: dict[tuple[str, int], SnapshotProblem] = {}

    def run(self, epochs: list[int], step=lambda: None) -> list[SnapshotProblem]:
        """Check the views at `epochs` (ascending); problems in the order found."""
        counts: _Counts | None = None
        for i, epoch in enumerate(epochs):
            if counts is None or not self.trust_births:
                counts, affected = self._count_whole(epoch)
            else:
                affected = self._apply_changes(counts, epochs[i - 1], epoch)
                if affected is None:  # an inode changed kind under an entry: start over
                    counts, affected = self._count_whole(epoch)
            self._judge(counts, epoch, i, affected)
            self.inodes_checked += counts.inodes
            step()
        for p in self._open.values():
            self.problems.append(p)
        self._open = {}
        return self.problems

    # -- counting --------------------------------------------------------------------

    def _count_whole(self, epoch: int) -> tuple[_Counts, set[int]]:
        counts = _Counts()
        dirs, present = set(), set()
        for prefix, v in self.ns.inodes.scan(b"", epoch):
            ino = U64.unpack(prefix)[0]
            present.add(ino)
            if stat.S_ISDIR(unpack_inode(ino, v).mode):
                dirs.add(ino)
        for prefix, v in self.ns.entries.scan(b"", epoch):
            child = U64.unpack(v)[0]
            counts.count(U64.unpack_from(prefix)[0], child, child in dirs, 1)
        counts.inodes = len(present)
        # Every inode, and whatever entries name or lie in: some may not exist. Closing
        # the problems of those that vanished since is what makes this a fresh start.
        return counts, present | set(counts.names) | set(counts.entries_in) | {
            ino for _, ino in self._open}

    def _changed(self, first: int, last: int) -> tuple[set[bytes], set[int]]:
        """Entry prefixes and inodes with a version born in epochs first..last."""
        entries, inodes = set(), set()
        for _, table_id, prefix, _ in self.ns.births.walk(first, last):
            if table_id == self.ns.entries.table_id:
                entries.add(prefix)
            elif table_id == self.ns.inodes.table_id:
                inodes.add(U64.unpack(prefix)[0])
        return entries, inodes

    def _kind(self, epoch: int, ino: int) -> int | None:
        """The inode's mode at `epoch`, None if it does not exist there."""
        v = self.ns.inodes.read(U64.pack(ino), epoch)
        return None if v is None else unpack_inode(ino, v).mode

    def _is_dir(self, epoch: int, ino: int) -> bool:
        mode = self._kind(epoch, ino)
        return mode is not None and stat.S_ISDIR(mode)

    def _apply_changes(self, counts: _Counts, before: int, epoch: int) -> set[int] | None:
        """Move `counts` from the view at `before` to the one at `epoch`; the inodes
        whose checks may have changed, or None if the counts must be made afresh."""
        entries, inodes = self._changed(before + 1, epoch)
        affected = set(inodes)
        named_anew: Counter = Counter()  # names given by the changed entries, at `epoch`
        for prefix in entries:
            parent = U64.unpack_from(prefix)[0]
            old = self.ns.entries.read(prefix, before)
            new = self.ns.entries.read(prefix, epoch)
            if old == new:
                continue
            if new is not None:
                named_anew[U64.unpack(new)[0]] += 1
            affected.add(parent)
            for value, at, sign in ((old, before, -1), (new, epoch, 1)):
                if value is not None:
                    child = U64.unpack(value)[0]
                    counts.count(parent, child, self._is_dir(at, child), sign)
                    affected.add(child)
        for ino in inodes:
            was, now = self._kind(before, ino), self._kind(epoch, ino)
            counts.inodes += (now is not None) - (was is not None)
            was_dir = was is not None and stat.S_ISDIR(was)
            now_dir = now is not None and stat.S_ISDIR(now)
            # Entries that did not change still count it as what it was: in a sound
            # store a directory has no name before it exists or after it is gone.
            if was_dir != now_dir and counts.names[ino] > named_anew[ino]:
                return None
        return affected

    # -- judging ---------------------------------------------------------------------

    def _judge(self, counts: _Counts, epoch: int, index: int, affected: Iterable[int]) -> None:
        for ino in affected:
            found = self._problems_of(counts, epoch, ino)
            for kind in ("dangling-entry", "stray-entry", "nlink"):
                key = (kind, ino)
                message = found.get(kind)
                seen = self._open.get(key)
                if seen is not None and seen.message != message:
                    self.problems.append(self._open.pop(key))
                    seen = None
                if message is not None and seen is None:
                    self._open[key] = SnapshotProblem(kind, ino, message, index, index)
        for p in self._open.values():
            p.last = index

    def _problems_of(self, counts: _Counts, epoch: int, ino: int) -> dict[str, str]:
        found = {}
        v = self.ns.inodes.read(U64.pack(ino), epoch)
        attr = None if v is None else unpack_inode(ino, v)
        names, inside = counts.names[ino], counts.entries_in[ino]
        if attr is None and names > 0:
            found["dangling-entry"] = (f"inode {ino} does not exist, but "
                                       f"{_entries(names, 'names', 'name')} it")
        if inside > 0 and (attr is None or not stat.S_ISDIR(attr.mode)):
            found["stray-entry"] = (f"{_entries(inside, 'lies', 'lie')} in inode {ino}, which "
                                    f"{'is not a directory' if attr else 'does not exist'}")
        if attr is not None:
            if names == 0 and ino != ROOT_INO:
                want = 0
            elif stat.S_ISDIR(attr.mode):
                want = 2 + counts.subdirs[ino]
            else:
                want = names
            if attr.nlink != want:
                found["nlink"] = f"inode {ino} has link count {attr.nlink}, {want} expected"
        return found


def _entries(n: int, one: str, many: str) -> str:
    return f"1 entry {one}" if n == 1 else f"{n} entries {many}"
