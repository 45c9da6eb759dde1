"""The virtual, read-only `/snapshots` directory: one directory per snapshot, plus
`latest`, a symlink to the newest.

Each snapshot gets a *slot* (1..65535) for the life of the mount; its objects are shown
to the kernel as `slot << 48 | ino` (see inodes.py). Slots are never reused within a
mount, so a kernel inode number always means the same object.
"""

from __future__ import annotations

import errno
import stat
import time

from . import inodes


class SnapshotTree:
    def __init__(self, namespace):
        self.ns = namespace
        self._slot_of: dict[int, int] = {}   # snapshot id -> slot
        self._by_slot: dict[int, object] = {}  # slot -> SnapshotRecord
        self._views: dict[int, object] = {}  # slot -> NamespaceView
        self._next_slot = 1
        self.mtime_ns = time.time_ns()
        self.refresh()

    def refresh(self) -> None:
        """Re-read the catalog (after a snapshot is taken or deleted)."""
        records = self.ns.snapshots()
        live_ids = {r.id for r in records}
        for snap_id in [i for i in self._slot_of if i not in live_ids]:
            slot = self._slot_of.pop(snap_id)
            self._by_slot.pop(slot, None)
            # The view stays: open files in a deleted snapshot read on until closed.
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

    def slot(self, snap_id: int) -> int:
        return self._slot_of[snap_id]

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
