"""`diff`: what changed between two snapshots, or a snapshot and the live tree, as
`zfs diff` shows it: `+` added, `-` removed, `M` modified, `R` renamed.

Only versions born after the older view are looked at (the births index), so the cost
follows the changes, not the size of the tree. A path is found by walking up the parent
each inode records and looking its name up in that directory.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from ..namespace import ROOT_INO
from ..namespace.records import U64, entry_name

# What makes an inode "modified": contents, size, type and permissions, owner, mtime.
# ctime and atime alone (a rename, a read) do not.
_COMPARED = ("mode", "uid", "gid", "size", "mtime_ns", "rdev", "target")


@dataclass(frozen=True, order=True)
class Change:
    path: bytes
    kind: str              # "+", "-", "M", "R"
    new_path: bytes = b""  # for "R"
    is_dir: bool = False

    def __str__(self) -> str:
        p = self.path.decode(errors="surrogateescape")
        if self.kind == "R":
            return f"R\t{p} -> {self.new_path.decode(errors='surrogateescape')}"
        return f"{self.kind}\t{p}"


class PathFinder:
    """Paths of inodes in one view, by their recorded parent; cached per directory."""

    def __init__(self, view):
        self.view = view
        self._names: dict[int, dict[int, bytes]] = {}
        self._paths: dict[int, bytes] = {ROOT_INO: b""}

    def _names_in(self, d: int) -> dict[int, bytes]:
        names = self._names.get(d)
        if names is None:
            names = self._names[d] = {}
            for name, attr in self.view.readdir(d):
                names.setdefault(attr.ino, name)
        return names

    def path(self, ino: int, parent: int | None = None) -> bytes:
        p = self._paths.get(ino)
        if p is not None:
            return p
        if parent is None:
            parent = self.view.getattr(ino).parent
        name = self._names_in(parent).get(ino)
        if name is None:
            return b"<inode %d>" % ino  # a hard link whose first name is gone
        p = self._paths[ino] = self.path(parent) + b"/" + name
        return p


def diff(ns, old_epoch: int, new_epoch: int | None = None) -> list[Change]:
    old = ns.view(old_epoch)
    new = ns.view(new_epoch) if new_epoch is not None else ns.live
    last = new.epoch
    old_paths, new_paths = PathFinder(old), PathFinder(new)
    removed: dict[int, bytes] = {}
    added: dict[int, bytes] = {}
    touched: set[int] = set()
    for _, table_id, prefix, _ in ns.births.walk(old_epoch + 1, last):
        if table_id == ns.entries.table_id:
            parent, name = U64.unpack_from(prefix)[0], entry_name(prefix)
            a, b = old.child(parent, name), new.child(parent, name)
            if a == b:
                continue
            if a is not None:
                removed[a] = old_paths.path(parent) + b"/" + name
            if b is not None:
                added[b] = new_paths.path(parent) + b"/" + name
        else:
            touched.add(U64.unpack_from(prefix)[0])
    changes = []
    for ino in removed.keys() & added.keys():
        changes.append(Change(removed.pop(ino), "R", added.pop(ino), _is_dir(new, ino)))
    changes += [Change(p, "-", is_dir=_is_dir(old, ino)) for ino, p in removed.items()]
    changes += [Change(p, "+", is_dir=_is_dir(new, ino)) for ino, p in added.items()]
    for ino in touched - removed.keys() - added.keys():
        if _modified(old, new, ino):
            changes.append(Change(new_paths.path(ino), "M", is_dir=_is_dir(new, ino)))
    return sorted(changes)


def _is_dir(view, ino: int) -> bool:
    try:
        return stat.S_ISDIR(view.getattr(ino).mode)
    except OSError:
        return False


def _modified(old, new, ino: int) -> bool:
    try:
        a, b = old.getattr(ino), new.getattr(ino)
    except OSError:
        return False  # born and gone between the two, or not there in one: +/- say it
    if b.nlink == 0:
        return False
    if any(getattr(a, f) != getattr(b, f) for f in _COMPARED):
        return True
    if list(old.block_range(ino)) != list(new.block_range(ino)):
        return True
    return {n: old.getxattr(ino, n) for n in old.listxattr(ino)} != \
        {n: new.getxattr(ino, n) for n in new.listxattr(ino)}
