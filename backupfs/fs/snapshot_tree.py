"""The virtual, read-only `/snapshots` directory: one directory per snapshot, plus
`latest`, a symlink to the newest.

Each snapshot gets a *slot* (1..65535) for the life of the mount; its objects are shown
to the kernel as `slot << 48 | ino` (see inodes.py). Slots are never reused within a
mount, so a kernel inode number always means the same object.

A snapshot deleted while files or directories in it are open is *hidden* at once (gone
from the listing, `latest`, `list` and `prune`) and deleted for real when the last of
them is closed: until then its versions stay, and the open files read on.
"""

from __future__ import annotations

import errno
import stat
import time

from ..namespace import SnapshotNotFound
from . import inodes


class SnapshotTree:
    def __init__(self, namespace):
        self.ns = namespace
        self._slot_of: dict[int, int] = {}   # snapshot id -> slot
        self._by_slot: dict[int, object] = {}  # slot -> SnapshotRecord
        self._views: dict[int, object] = {}  # slot -> NamespaceView
        self._next_slot = 1
        self.hidden: dict[int, object] = {}  # snapshot id -> record, deleted but still open
        self.mtime_ns = time.time_ns()
        self.refresh()

    def refresh(self) -> None:
        """Re-read the catalog (after a snapshot is taken or deleted)."""
        all_records = self.ns.snapshots()
        # Deleting ones still exist (their open files read on) but are never listed.
        existing = {r.id for r in all_records} | {r.id for r in self.ns.deleting_snapshots()}
        for snap_id in [i for i in self.hidden if i not in existing]:
            del self.hidden[snap_id]
        records = [r for r in all_records if r.id not in self.hidden]
        visible = {r.id for r in records}
        for snap_id in [i for i in self._slot_of if i not in visible]:
            slot = self._slot_of[snap_id]
            self._by_slot.pop(slot, None)
            if snap_id not in existing:
                del self._slot_of[snap_id]
                self._views.pop(slot, None)
            # A hidden snapshot keeps its slot and view: its open files read on.
        self.by_name = {}
        for r in records:
            slot = self._slot_of.get(r.id)
            if slot is None:
                if self._next_slot > inodes.MAX_SLOT:
                    continue  # more snapshots than slots in one mount: remount shows them
                slot = self._slot_of[r.id] = self._next_slot
                self._next_slot += 1
            self._by_slot[slot] = r
            self.by_name[r.name.encode()] = r
        self.records = records
        self.mtime_ns = time.time_ns()

    def slot(self, snap_id: int) -> int | None:
        return self._slot_of.get(snap_id)

    def hide(self, record) -> None:
        """Take a snapshot out of sight until it is deleted for real."""
        self.hidden[record.id] = record
        self.refresh()

    def find(self, name: str):
        """The visible snapshot named `name` (or with that id)."""
        for r in self.records:
            if r.name == name or str(r.id) == str(name):
                return r
        raise SnapshotNotFound(f"no snapshot named {name!r}")

    def view(self, slot: int):
        v = self._views.get(slot)
        if v is None:
            r = self._by_slot.get(slot)
            if r is None:
                raise OSError(errno.ESTALE, "snapshot was deleted")
            v = self._views[slot] = self.ns.view(r.epoch)
        return v

    def record(self, slot: int):
        return self._by_slot.get(slot)

    def latest(self):
        return self.records[-1] if self.records else None

    def entries(self) -> list[tuple[bytes, int]]:
        """(name, kernel inode) of everything in /snapshots, in name order."""
        out = [(name, inodes.join(self._slot_of[r.id], 1))
               for name, r in sorted(self.by_name.items())]
        if self.records:
            out.append((inodes.LATEST_NAME, inodes.LATEST_INO))
        return sorted(out)

    def lookup(self, name: bytes) -> int:
        if name == inodes.LATEST_NAME and self.records:
            return inodes.LATEST_INO
        r = self.by_name.get(name)
        if r is None:
            raise OSError(errno.ENOENT, "no such snapshot")
        return inodes.join(self._slot_of[r.id], 1)

    def dir_mode(self) -> int:
        return stat.S_IFDIR | 0o555
