"""`LiveView`: the read-write tree at the current epoch.

Every change is a versioned write (see versions.py), so whatever a snapshot sees stays
as it was. Checks follow ext4's answers (ENOENT, EEXIST, ENOTEMPTY, EISDIR, ENOTDIR,
EINVAL for a directory moved into itself); permission checks are the kernel's.
"""

from __future__ import annotations

import errno
import itertools
import stat

from . import records as rec
from .records import Attr
from .versions import LIVE_CACHE_MAX
from .view import NamespaceView, fail

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2


class LiveView(NamespaceView):
    def __init__(self, ns):
        super().__init__(ns, None)
        # ino -> (the inode record, its Attr): the table's live cache hands back the very
        # bytes object it was given, so an unchanged record is decoded only once.
        self._attrs: dict[int, tuple[bytes, Attr]] = {}

    @property
    def epoch(self) -> int:
        return self.ns.epoch

    def _decode_inode(self, ino: int, v: bytes) -> Attr:
        known = self._attrs.get(ino)
        if known is not None and known[0] is v:
            return known[1]
        return self._remember(super()._decode_inode(ino, v), v)

    def _remember(self, attr: Attr, v: bytes) -> Attr:
        if len(self._attrs) >= LIVE_CACHE_MAX:
            self._attrs.clear()
        self._attrs[attr.ino] = (v, attr)
        return attr

    @property
    def readonly(self) -> bool:
        return False

    # -- small helpers ---------------------------------------------------------------

    def _put(self, attr: Attr) -> Attr:
        v = rec.pack_inode(attr)
        self.ns.inodes.write(rec.inode_prefix(attr.ino), v)
        return self._remember(attr, v)

    def _set_entry(self, parent: int, name: bytes, ino: int | None) -> None:
        value = None if ino is None else rec.U64.pack(ino)
        self.ns.entries.write(rec.entry_prefix(parent, name), value)

    def _dir(self, ino: int) -> Attr:
        attr = self.getattr(ino)
        if not stat.S_ISDIR(attr.mode):
            raise fail(errno.ENOTDIR, f"inode {ino}")
        return attr

    def _existing(self, parent: int, name: bytes) -> Attr:
        self._dir(parent)
        ino = self.child(parent, name)
        if ino is None:
            raise fail(errno.ENOENT, repr(name))
        return self.getattr(ino)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise fail(errno.EINVAL, f"bad name {name!r}")

    def _touch_dir(self, attr: Attr, now_ns: int, nlink_delta: int = 0) -> Attr:
        return self._put(attr.changed(mtime_ns=now_ns, ctime_ns=now_ns,
                                      nlink=attr.nlink + nlink_delta))

    def _drop_link(self, attr: Attr, now_ns: int) -> Attr:
        """One name fewer for `attr`; at zero it becomes an orphan until reclaimed."""
        if stat.S_ISDIR(attr.mode):
            attr = attr.changed(nlink=0, ctime_ns=now_ns)
        else:
            attr = attr.changed(nlink=attr.nlink - 1, ctime_ns=now_ns)
        if attr.nlink == 0:
            self.ns.orphan_set.add(attr.ino)
        return self._put(attr)

    # -- creating --------------------------------------------------------------------

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int, now_ns: int,
               rdev: int = 0, target: bytes | None = None) -> Attr:
        self._check_name(name)
        pattr = self._dir(parent)
        if self.child(parent, name) is not None:
            raise fail(errno.EEXIST, repr(name))
        is_dir = stat.S_ISDIR(mode)
        if pattr.mode & stat.S_ISGID:  # BSD group semantics of a setgid directory
            gid = pattr.gid
            if is_dir:
                mode |= stat.S_ISGID
        target = target or b""
        attr = Attr(self.ns.allocate_ino(), mode, uid, gid, size=len(target),
                    nlink=2 if is_dir else 1, rdev=rdev, atime_ns=now_ns, mtime_ns=now_ns,
                    ctime_ns=now_ns, parent=parent, target=target)
        self._put(attr)
        self._set_entry(parent, name, attr.ino)
        self._touch_dir(pattr, now_ns, 1 if is_dir else 0)
        return attr

    def link(self, ino: int, parent: int, name: bytes, now_ns: int) -> Attr:
        self._check_name(name)
        attr = self.getattr(ino)
        if stat.S_ISDIR(attr.mode):
            raise fail(errno.EPERM, "hard link to a directory")
        pattr = self._dir(parent)
        if self.child(parent, name) is not None:
            raise fail(errno.EEXIST, repr(name))
        if attr.nlink == 0:
            self.ns.orphan_set.discard(ino)
        self._set_entry(parent, name, ino)
        self._touch_dir(pattr, now_ns)
        return self._put(attr.changed(nlink=attr.nlink + 1, ctime_ns=now_ns, parent=parent))

    # -- removing --------------------------------------------------------------------

    def unlink(self, parent: int, name: bytes, now_ns: int) -> Attr:
        """Remove a name; returns the inode as it is now (nlink 0: an orphan until
        `Namespace.reclaim`, which the filesystem calls once nothing holds it)."""
        attr = self._existing(parent, name)
        if stat.S_ISDIR(attr.mode):
            raise fail(errno.EISDIR, repr(name))
        self._set_entry(parent, name, None)
        self._touch_dir(self.getattr(parent), now_ns)
        return self._drop_link(attr, now_ns)

    def rmdir(self, parent: int, name: bytes, now_ns: int) -> Attr:
        attr = self._existing(parent, name)
        if not stat.S_ISDIR(attr.mode):
            raise fail(errno.ENOTDIR, repr(name))
        if not self.is_empty_dir(attr.ino):
            raise fail(errno.ENOTEMPTY, repr(name))
        self._set_entry(parent, name, None)
        self._touch_dir(self.getattr(parent), now_ns, -1)
        return self._drop_link(attr, now_ns)

    # -- renaming --------------------------------------------------------------------

    def _is_ancestor(self, maybe_ancestor: int, ino: int) -> bool:
        """Whether directory `maybe_ancestor` is `ino` or lies on its path to the root."""
        while True:
            if ino == maybe_ancestor:
                return True
            if ino == rec.ROOT_INO:
                return False
            ino = self.getattr(ino).parent

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int, now_ns: int) -> Attr | None:
        """Move a name; returns the inode it replaced (its nlink now lowered), if any."""
        self._check_name(new_name)
        src = self._existing(old_parent, old_name)
        self._dir(new_parent)
        dst_ino = self.child(new_parent, new_name)
        dst = None if dst_ino is None else self.getattr(dst_ino)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise fail(errno.ENOENT, repr(new_name))
            return self._exchange(old_parent, old_name, src, new_parent, new_name, dst, now_ns)
        if dst is not None and flags & RENAME_NOREPLACE:
            raise fail(errno.EEXIST, repr(new_name))
        src_is_dir = stat.S_ISDIR(src.mode)
        if src_is_dir and self._is_ancestor(src.ino, new_parent):
            raise fail(errno.EINVAL, "directory moved into its own subtree")
        if dst is not None:
            if dst.ino == src.ino:
                return None  # two names of one file: POSIX says do nothing
            if src_is_dir and not stat.S_ISDIR(dst.mode):
                raise fail(errno.ENOTDIR, repr(new_name))
            if not src_is_dir and stat.S_ISDIR(dst.mode):
                raise fail(errno.EISDIR, repr(new_name))
            if stat.S_ISDIR(dst.mode) and not self.is_empty_dir(dst.ino):
                raise fail(errno.ENOTEMPTY, repr(new_name))
        self._set_entry(old_parent, old_name, None)
        self._set_entry(new_parent, new_name, src.ino)
        moved = src.changed(ctime_ns=now_ns, parent=new_parent)
        subdirs_delta_new = 0
        if src_is_dir and old_parent != new_parent:
            self._touch_dir(self.getattr(old_parent), now_ns, -1)
            subdirs_delta_new += 1
        elif old_parent != new_parent:
            self._touch_dir(self.getattr(old_parent), now_ns)
        self._put(moved)
        replaced = None
        if dst is not None:
            if stat.S_ISDIR(dst.mode):
                subdirs_delta_new -= 1
            replaced = self._drop_link(dst, now_ns)
        self._touch_dir(self.getattr(new_parent), now_ns, subdirs_delta_new)
        return replaced

    def _exchange(self, old_parent, old_name, a: Attr, new_parent, new_name, b: Attr,
                  now_ns: int) -> None:
        a_dir, b_dir = stat.S_ISDIR(a.mode), stat.S_ISDIR(b.mode)
        if a.ino == b.ino:
            return None
        if (a_dir and self._is_ancestor(a.ino, new_parent)) or \
                (b_dir and self._is_ancestor(b.ino, old_parent)):
            raise fail(errno.EINVAL, "directory moved into its own subtree")
        self._set_entry(old_parent, old_name, b.ino)
        self._set_entry(new_parent, new_name, a.ino)
        delta = int(a_dir) - int(b_dir)  # subdirectories moving from old to new parent
        a, b = a.changed(parent=new_parent), b.changed(parent=old_parent)
        if old_parent != new_parent:
            self._touch_dir(self.getattr(old_parent), now_ns, -delta)
            self._touch_dir(self.getattr(new_parent), now_ns, delta)
        else:
            self._touch_dir(self.getattr(old_parent), now_ns)
        self._put(a.changed(ctime_ns=now_ns))
        self._put(b.changed(ctime_ns=now_ns))
        return None

    # -- attributes and contents -----------------------------------------------------

    SETTABLE = frozenset({"mode", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns"})

    def setattr(self, ino: int, **changes) -> Attr:
        unknown = set(changes) - self.SETTABLE
        if unknown:
            raise TypeError(f"cannot set {sorted(unknown)}")
        attr = self.getattr(ino)
        new_size = changes.get("size")
        if new_size is not None and new_size < attr.size:
            if self.drop_blocks_from(ino, -(-new_size // self.ns.block_size)):
                attr = self.getattr(ino)
        return self._put(attr.changed(**changes))

    def set_size_keeping_blocks(self, ino: int, size: int) -> Attr:
        """Change only the recorded size: blocks past a smaller size stay, so growing
        back to the old size shows the same bytes (readers never look past the size).
        For the filesystem's snapshot of a file the kernel has yet to finish writing."""
        return self._put(self.getattr(ino).changed(size=size))

    def drop_blocks_from(self, ino: int, first: int, limit: int | None = None) -> int:
        """Release the block map entries of a file from block `first` on, at most
        `limit` of them; returns how many. The size is the caller's to set (the
        filesystem drops a big file's blocks a chunk at a time, see FileContents)."""
        prefixes = [rec.block_prefix(ino, n)
                    for n, _ in itertools.islice(self.block_range(ino, first), limit)]
        for prefix in prefixes:
            self.ns.blockmap.write(prefix, None)
        if prefixes:
            attr = self.getattr(ino)
            self._put(attr.changed(stored_blocks=attr.stored_blocks - len(prefixes)))
        return len(prefixes)

    def write_block(self, ino: int, n: int, block_hash: bytes | None) -> None:
        """Point block n at `block_hash` (None: a hole). The caller hands over one
        reference to the block; the reference of a block it replaces is released."""
        self.write_blocks(ino, [(n, block_hash)])

    def write_blocks(self, ino: int, blocks: list[tuple[int, bytes | None]]) -> None:
        """`write_block` for many blocks of one inode: the inode record is read and
        rewritten once, not once a block (a 1 MiB write seals eight blocks)."""
        attr = self.getattr(ino)
        delta = 0
        for n, block_hash in blocks:
            prefix = rec.block_prefix(ino, n)
            had = self.ns.blockmap.read(prefix, self.epoch) is not None
            self.ns.blockmap.write(prefix, block_hash)
            delta += (block_hash is not None) - had
        if delta:
            self._put(attr.changed(stored_blocks=attr.stored_blocks + delta))

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self.getattr(ino)
        if not name or b"\0" in name:
            raise fail(errno.EINVAL, "bad xattr name")
        prefix = rec.xattr_prefix(ino, name)
        exists = self.ns.xattrs.read(prefix, self.epoch) is not None
        if flags & XATTR_CREATE and exists:
            raise fail(errno.EEXIST, repr(name))
        if flags & XATTR_REPLACE and not exists:
            raise fail(errno.ENODATA, repr(name))
        self.ns.xattrs.write(prefix, rec.XATTR_PRESENT + value)

    def removexattr(self, ino: int, name: bytes) -> None:
        prefix = rec.xattr_prefix(ino, name)
        if self.ns.xattrs.read(prefix, self.epoch) is None:
            raise fail(errno.ENODATA, repr(name))
        self.ns.xattrs.write(prefix, None)
