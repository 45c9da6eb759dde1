"""`fsck`: cross-check the index of a store, and repair what is safe to repair.

Checks, each reported as a `Problem`:
- packs: pack files the index does not know, tails past the committed length, packs
  shorter than committed (lost bytes), and every live block's record header in place;
- blocks: each refcount equals the block-map versions that name it; every named block
  exists; the dead index (blocks at refcount 0, dead bytes per pack) matches;
- versions: every version visible to the live tree or a snapshot, no needless
  tombstones, the deadlist exact (namespace.check);
- the live tree, walked from the root: every entry names an existing inode, link counts
  equal the names, inodes nobody names are found (lost), orphans are real;
- every snapshot's tree, from the oldest one's and what was born since
  (snapshot_trees.py): the same, and no entry lies in what is not a directory.

`--repair` fixes refcounts, the dead index, orphan bookkeeping, link counts and dangling
entries of the live tree, pack tails and unknown packs, and links lost inodes into
`/lost+found`; lost bytes cannot be repaired and are reported as such.
"""

from __future__ import annotations

import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from ..namespace import ROOT_INO
from ..namespace.check import check_versions
from ..namespace.records import U64, entry_name, entry_prefix, inode_prefix, pack_inode, unpack_inode
from ..store import codec
from ..store.blockstore import BlockLocation
from .progress import progress_bar
from .snapshot_trees import SnapshotTrees

LOST_FOUND = b"lost+found"


@dataclass
class Problem:
    kind: str
    message: str
    repair: Callable[[], None] | None = None   # None: cannot be repaired safely

    def as_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "repairable": self.repair is not None}


@dataclass
class FsckReport:
    problems: list[Problem] = field(default_factory=list)
    checked: Counter = field(default_factory=Counter)
    repaired: list[Problem] = field(default_factory=list)
    not_repaired: list[Problem] = field(default_factory=list)
    # What a crash leaves and the next writable open recovers by itself: not problems.
    notes: list[Problem] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems


class Fsck:
    def __init__(self, store, ns, show_progress: bool | None = None):
        self.store = store
        self.ns = ns
        self.show_progress = show_progress
        self.report = FsckReport()
        self._births_sound = True  # check_versions found the births index right

    def problem(self, kind: str, message: str, repair=None) -> None:
        self.report.problems.append(Problem(kind, message, repair))

    def note(self, kind: str, message: str) -> None:
        self.report.notes.append(Problem(kind, message + " (recovered when next mounted)"))

    def run(self) -> FsckReport:
        for line in getattr(self.store, "recovery_actions", []):
            # A writable open already did this (fsck --repair): say so.
            self.report.repaired.append(Problem("pack-recovery", line))
        self.check_packs()
        refs = self.check_versions()
        self.check_blocks(refs)
        self.check_trees()
        return self.report

    def repair(self) -> FsckReport:
        for p in self.report.problems:
            if p.repair is None:
                self.report.not_repaired.append(p)
            else:
                p.repair()
                self.report.repaired.append(p)
        self.store.commit()
        return self.report

    # -- packs -----------------------------------------------------------------------

    def check_packs(self) -> None:
        packs = self.store.packs
        committed = self.store.committed_pack_lengths()
        on_disk = packs.on_disk()
        for pack_id, path in sorted(on_disk.items()):
            size = path.stat().st_size
            if pack_id not in committed:
                self.note("unknown-pack", f"{path.name}: pack file the index does not know")
            elif size > committed[pack_id]:
                self.note("pack-tail", f"{path.name}: {size - committed[pack_id]} bytes past "
                          f"its committed length")
            elif size < committed[pack_id]:
                self.problem("pack-truncated", f"{path.name}: {committed[pack_id] - size} "
                             f"committed bytes are missing (blocks in them are lost)")
        for pack_id in sorted(set(committed) - set(on_disk)):
            self.problem("pack-missing", f"pack {pack_id} ({packs.path(pack_id)}) is missing")
        self.report.checked["packs"] = len(on_disk)

    # -- versions and blocks -----------------------------------------------------------

    def check_versions(self) -> dict[bytes, int]:
        with progress_bar("fsck: versions", unit="ver", enabled=self.show_progress) as bar:
            report = check_versions(self.ns, progress=bar.update)
        for issue in report.issues:
            self.problem(issue.kind, str(issue))
        self._births_sound = not any(i.kind.startswith("births-") for i in report.issues)
        self.report.checked["versions"] = report.versions
        return report.block_refs

    def check_blocks(self, refs: dict[bytes, int]) -> None:
        blocks = self.store.blocks
        committed = self.store.committed_pack_lengths()
        dead_by_pack: Counter = Counter()
        seen = set()
        total = self.store.txn.stat(blocks.db)["entries"]
        with progress_bar("fsck: blocks", total=total, unit="blk",
                          enabled=self.show_progress) as bar:
            for loc in blocks.iter_locations():
                bar.update(1)
                seen.add(loc.hash)
                want = refs.get(loc.hash, 0)
                if loc.refcount != want:
                    self.problem("refcount", f"block {loc.hash.hex()}: refcount {loc.refcount}, "
                                 f"but {want} references", lambda loc=loc, want=want:
                                 self.store.blocks.set_refcount(loc, want))
                if loc.refcount == 0:
                    dead_by_pack[loc.pack_id] += loc.record_len
                    if not self.store.blocks.in_dead_index(loc):
                        self.problem("dead-index", f"block {loc.hash.hex()} at refcount 0 is "
                                     f"not in the dead index",
                                     lambda loc=loc: self.store.blocks.add_to_dead_index(loc))
                if want:
                    self._check_location(loc, committed)
        for h in sorted(set(refs) - seen):
            self.problem("missing-block", f"block {h.hex()} is referenced {refs[h]} times but "
                         f"the index does not know it (its data is lost)")
        for pack_id in committed:
            _, dead = self.store.pack_info(pack_id)
            if dead != dead_by_pack.get(pack_id, 0):
                want = dead_by_pack.get(pack_id, 0)
                self.problem("dead-bytes", f"pack {pack_id}: {dead} dead bytes recorded, "
                             f"{want} found", lambda p=pack_id, d=want - dead:
                             self.store.add_dead_bytes(p, d))
        self.report.checked["blocks"] = len(seen)

    def _check_location(self, loc: BlockLocation, committed: dict[int, int]) -> None:
        where = f"block {loc.hash.hex()} (pack {loc.pack_id}, offset {loc.offset})"
        length = committed.get(loc.pack_id)
        if length is None:
            self.problem("block-location", f"{where}: its pack is not in the index")
            return
        if loc.offset + loc.record_len > length:
            self.problem("block-location", f"{where}: lies past the pack's committed length")
            return
        header = self.store.packs.read(loc.pack_id, loc.offset, codec.RECORD_HEADER_LEN)
        parsed = codec.parse_record_header(header) if len(header) == codec.RECORD_HEADER_LEN else None
        if parsed is None or parsed[3] != loc.hash or parsed[2] != loc.stored_len:
            self.problem("block-header", f"{where}: no matching record header there "
                         f"(damaged pack; `backupfs verify` names the files)")

    # -- trees -----------------------------------------------------------------------

    def check_trees(self) -> None:
        live_names = self._check_tree(self.ns.live, "live", repairable=True)
        self._check_live_inodes(live_names)
        self.check_snapshot_trees()

    def check_snapshot_trees(self) -> None:
        """Each snapshot's tree, at the cost of what changed between them
        (snapshot_trees.py); a problem is reported once, naming the snapshots it is in."""
        records = self.ns.snapshots()
        trees = SnapshotTrees(self.ns, trust_births=self._births_sound)
        with progress_bar("fsck: snapshots", total=len(records), unit="snap",
                          enabled=self.show_progress) as bar:
            found = trees.run([r.epoch for r in records], step=lambda: bar.update(1))
        for p in found:
            first, last = records[p.first].name, records[p.last].name
            where = (f"snapshot {first}" if p.first == p.last else
                     f"snapshots {first} to {last} ({p.last - p.first + 1})")
            self.problem(p.kind, f"{where}: {p.message}")
        self.report.checked["snapshots"] = len(records)
        self.report.checked["inodes (snapshots)"] = trees.inodes_checked

    def _check_tree(self, view, where: str, repairable: bool) -> Counter:
        """Walk a view: dangling entries and link counts. Returns names per inode."""
        names: Counter = Counter()
        subdirs: Counter = Counter()
        attrs = {ROOT_INO: view.getattr(ROOT_INO)}
        stack = [ROOT_INO]
        with progress_bar(f"fsck: {where}", unit="dir", enabled=self.show_progress) as bar:
            while stack:
                d = stack.pop()
                bar.update(1)
                for prefix, v in self.ns.entries.scan(U64.pack(d), view.epoch):
                    name, child = entry_name(prefix), U64.unpack(v)[0]
                    try:
                        attr = attrs.get(child) or view.getattr(child)
                    except OSError:
                        fix = (lambda d=d, name=name: self.ns.entries.write(entry_prefix(d, name), None)
                               ) if repairable else None
                        self.problem("dangling-entry", f"{where}: entry {name!r} in directory "
                                     f"{d} names inode {child}, which does not exist", fix)
                        continue
                    names[child] += 1
                    if child not in attrs:
                        attrs[child] = attr
                        if stat.S_ISDIR(attr.mode):
                            subdirs[d] += 1
                            stack.append(child)
        for ino, attr in attrs.items():
            want = 2 + subdirs[ino] if stat.S_ISDIR(attr.mode) else names[ino]
            if attr.nlink != want:
                fix = (lambda ino=ino, want=want: self._set_nlink(ino, want)) if repairable else None
                self.problem("nlink", f"{where}: inode {ino} has link count {attr.nlink}, "
                             f"{want} expected", fix)
        self.report.checked[f"inodes ({where})"] = len(attrs)
        return names

    def _set_nlink(self, ino: int, nlink: int) -> None:
        attr = self.ns.live.getattr(ino)
        self.ns.inodes.write(inode_prefix(ino), pack_inode(attr.changed(nlink=nlink)))

    def _check_live_inodes(self, live_names: Counter) -> None:
        orphans = set(self.ns.orphans())
        queued = {ino for ino, _ in self.ns.reclaim_queue.items()}
        live_inodes = set()
        for prefix, v in self.ns.inodes.scan(b"", self.ns.epoch):
            ino = U64.unpack(prefix)[0]
            attr = unpack_inode(ino, v)
            live_inodes.add(ino)
            if ino == ROOT_INO or live_names[ino]:
                continue
            if attr.nlink == 0:
                if ino not in orphans:
                    self.problem("orphan", f"inode {ino} has no names and is not queued for "
                                 f"reclaiming", lambda ino=ino: self.ns.orphan_set.add(ino))
            else:
                self.problem("lost-inode", f"inode {ino} ({attr.size} bytes) has link count "
                             f"{attr.nlink} but no name in the live tree",
                             lambda ino=ino: self._to_lost_found(ino))
        for ino in sorted(orphans - live_inodes) + sorted(
                ino for ino in orphans & live_inodes if live_names[ino]):
            self.problem("orphan", f"inode {ino} is listed as an orphan but is "
                         f"{'gone' if ino not in live_inodes else 'named'}",
                         lambda ino=ino: self.ns.orphan_set.discard(ino))
        for ino in sorted(queued & live_inodes):
            self.problem("reclaim", f"inode {ino} is queued for reclaiming but still live")

    def _to_lost_found(self, ino: int) -> None:
        live = self.ns.live
        now = time.time_ns()
        lf = live.child(ROOT_INO, LOST_FOUND)
        if lf is None:
            lf = live.create(ROOT_INO, LOST_FOUND, stat.S_IFDIR | 0o700, 0, 0, now).ino
        attr = live.getattr(ino)
        name = b"#%d" % ino
        self.ns.entries.write(entry_prefix(lf, name), U64.pack(ino))
        if stat.S_ISDIR(attr.mode):
            self.ns.inodes.write(inode_prefix(ino), pack_inode(attr.changed(nlink=2, parent=lf)))
            parent = live.getattr(lf)
            self.ns.inodes.write(inode_prefix(lf), pack_inode(parent.changed(nlink=parent.nlink + 1)))
        else:
            self.ns.inodes.write(inode_prefix(ino), pack_inode(attr.changed(nlink=1)))
