"""`BackupFS`: the pyfuse3 Operations of a backupfs mount.

Kernel inode numbers are mapped by `inodes`: slot 0 is the live, read-write tree; other
slots are snapshots, read-only; two fixed numbers are the virtual `/snapshots` directory
and its `latest` symlink. Every handler is wrapped by `fuse_handler`, so nothing but a
FUSEError ever reaches pyfuse3.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import pyfuse3
import trio

from ..errors import CorruptBlock
from ..namespace import paths
from . import inodes
from .filedata import FileContents
from .dircookies import CookieTable, DirCookies
from .gate import ChangeGate
from .handlers import fuse_handler
from .inodes import LATEST_INO, SNAPSHOTS_DIR_INO, SNAPSHOTS_DIR_NAME
from .pieces import PIECE, between_pieces
from .snapshot_tree import SnapshotTree
from .txg import TransactionGroups

log = logging.getLogger("backupfs.fs")

T = TypeVar("T")

ROOT = pyfuse3.ROOT_INODE
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
# The kernel asks for this before every write() (to drop file capabilities): answering
# it from memory keeps writes free of an LMDB lookup.
CAPABILITY_XATTR = b"security.capability"
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
# POSIX ACLs are not implemented: kept as plain xattrs they would not change the mode,
# and `cp -a`/`rsync -A` set a file's mode through this xattr when the target takes it.
# Refusing them (as ext4 mounted noacl does) makes them fall back to chmod.
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
# Refused the same way: ACLs, and SELinux labels (this is no SELinux system's disk).
# Answering "not supported" rather than "no such attribute" matters for speed: `ls -l`
# asks every file for both, and stops asking a filesystem once it says EOPNOTSUPP, which
# saves two round trips per file listed.
UNSUPPORTED_XATTRS = ACL_XATTRS + (b"security.selinux",)
# Deadlist entries a snapshot deletion looks at before it lets other requests in
# (pieces.py). Freeing one costs ~21 us here (a changed file leaves two: its inode and its
# block); 100,000 changed files took 4.2 s in all.
DELETE_CHUNK = PIECE


class BoundedSet(set):
    """A set that forgets everything when it grows past `limit`: a cache, not a record."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def add(self, item) -> None:
        if len(self) >= self.limit:
            self.clear()
        super().add(item)


def changes_live_tree(fn):
    """For handlers that change the live tree: they pass the snapshot gate."""

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        async with self.gate.changing():
            return await fn(self, *args, **kwargs)

    return wrapper


async def _tell_kernel(invalidate, *args) -> None:
    """Send the kernel one of pyfuse3's cache invalidations. It blocks until the kernel
    is done, which may take WRITEs that this loop must answer: so a worker thread. An
    OSError means the kernel holds nothing of it, so there was nothing to do."""
    try:
        await trio.to_thread.run_sync(invalidate, *args)
    except OSError:
        pass


def _resume_after(cookies, cookie: int, names) -> bytes | None:
    """The name a listing resumes after (None: from the start); EINVAL for a cookie of
    no name the directory has (or had while its table was kept): dircookies.py."""
    try:
        return cookies.name_before(cookie, names)
    except KeyError:
        raise pyfuse3.FUSEError(errno.EINVAL) from None


def erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


@dataclass(eq=False)
class DirHandle:
    kernel_ino: int
    cookies: CookieTable   # the directory's, shared with its other opens (dircookies.py)


@dataclass(eq=False)
class FileHandle:
    kernel_ino: int
    writable: bool
    # Past the page cache, opened by someone other than root: its writes clear the
    # set-user-ID and set-group-ID bits, which the kernel clears only for cached writes.
    clears_setid: bool = False


class BackupFS(pyfuse3.Operations):
    # Off by default: see _open_handle and docs/performance.md, "Write-only opens past
    # the page cache". pyfuse3 reads this when the kernel connects.
    enable_writeback_cache = False
    # NFS export: the kernel finds an inode it no longer caches (after memory pressure or
    # a restart of the daemon) from a file handle by looking up "." in it, and a
    # directory's parent by "..". See _dot_lookup.
    supports_dot_lookup = True

    def __init__(self, store, namespace, txg: TransactionGroups | None = None,
                 writeback_cache: bool = False):
        super().__init__()
        self.store = store
        self.ns = namespace
        self.live = namespace.live
        self.open_count: Counter[int] = Counter()   # live inode -> open handles
        self.data = FileContents(store, namespace, is_open=self.open_count.__contains__)
        self.txg = txg or TransactionGroups(store)
        if self.txg.seal is None:
            self.txg.seal = self.data.flush_all
            self.txg.sizes_as_stored = self.data.sizes_as_stored
            self.txg.hold_still = self.data.drop_gate.closed
        self.snapshots = SnapshotTree(namespace)
        self.gate = ChangeGate()
        self.block_size = store.config.block_size
        self.enable_writeback_cache = writeback_cache
        self.lookups: Counter[int] = Counter()   # kernel lookup count per live ino
        self.slot_handles: Counter[int] = Counter()  # open files and dirs per snapshot slot
        self._fh = itertools.count(1)
        self.files: dict[int, FileHandle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self.dir_cookies = DirCookies()
        self._no_xattrs = BoundedSet(65536)  # live inodes known to have no xattrs
        self._one_deletion = trio.Lock()  # the namespace frees one snapshot at a time
        self.mounted_at = time.time_ns()

    # -- helpers ---------------------------------------------------------------------

    def _entry(self, attr, kernel_ino: int, slot: int) -> pyfuse3.EntryAttributes:
        timeout = inodes.SNAPSHOT_TIMEOUT if slot else inodes.LIVE_TIMEOUT
        pending = 0 if slot else self.data.pending_blocks(attr.ino)
        e = inodes.entry_attributes(attr, kernel_ino, self.block_size, timeout, pending)
        if slot:
            e.generation = self._generation(slot)
        return e

    def _generation(self, slot: int) -> int:
        """A snapshot's slot is only this mount's: the generation of its objects is the
        snapshot's id, so a file handle kept across a remount (an NFS client's) that now
        names another snapshot's object is stale, never that object. Live inode numbers
        are never reused: their generation is 0."""
        r = self.snapshots.record(slot)
        if r is None:  # deleted while open: hidden, still readable
            r = next((h for h in self.snapshots.hidden.values()
                      if self.snapshots.slot(h.id) == slot), None)
        return r.id & 0xFFFFFFFF if r is not None else 0

    def _parent_of(self, kernel_ino: int) -> int:
        if kernel_ino in (ROOT, SNAPSHOTS_DIR_INO):
            return ROOT
        if kernel_ino == LATEST_INO:
            return SNAPSHOTS_DIR_INO
        slot, ino, view = self._resolve(kernel_ino)
        if slot and ino == ROOT:
            return SNAPSHOTS_DIR_INO
        attr = view.getattr(ino)
        if not stat.S_ISDIR(attr.mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inodes.join(slot, attr.parent or ROOT)

    def _dot_lookup(self, kernel_ino: int, name: bytes) -> pyfuse3.EntryAttributes:
        """lookup(ino, ".") is ino itself, lookup(dir, "..") its parent: how the kernel
        turns an NFS file handle (inode number and generation) back into an inode."""
        if name == b"..":
            kernel_ino = self._parent_of(kernel_ino)
        if kernel_ino == SNAPSHOTS_DIR_INO:
            return self._virtual_dir_entry()
        if kernel_ino == LATEST_INO:
            return self._latest_entry()
        slot, ino, view = self._resolve(kernel_ino)
        attr = view.getattr(ino)
        if slot:
            return self._entry(attr, kernel_ino, slot)
        return self._remember(attr)

    def _live_entry(self, attr) -> pyfuse3.EntryAttributes:
        return inodes.entry_attributes(attr, attr.ino, self.block_size, inodes.LIVE_TIMEOUT,
                                       self.data.pending_blocks(attr.ino))

    def _virtual_dir_entry(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = SNAPSHOTS_DIR_INO
        e.st_mode = stat.S_IFDIR | 0o555
        e.st_nlink = 2 + len(self.snapshots.records)
        e.st_uid = e.st_gid = 0
        e.st_size = 0
        e.st_blksize = self.block_size
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self.snapshots.mtime_ns
        # The listing changes when snapshots come and go: let the kernel re-ask.
        e.attr_timeout = e.entry_timeout = 1.0
        return e

    def _latest_entry(self) -> pyfuse3.EntryAttributes:
        latest = self.snapshots.latest()
        if latest is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e = pyfuse3.EntryAttributes()
        e.st_ino = LATEST_INO
        e.st_mode = stat.S_IFLNK | 0o777
        e.st_nlink = 1
        e.st_size = len(latest.name)
        e.st_blksize = self.block_size
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = latest.created_ns
        e.attr_timeout = e.entry_timeout = 1.0
        return e

    def _resolve(self, kernel_ino: int):
        """(slot, namespace ino, view) of a non-virtual kernel inode."""
        slot, ino = inodes.split(kernel_ino)
        if slot == 0:
            return 0, ino, self.live
        return slot, ino, self.snapshots.view(slot)

    def _writable(self, kernel_ino: int) -> int:
        """The live namespace ino of a kernel inode that may be changed, else EROFS."""
        if kernel_ino in (SNAPSHOTS_DIR_INO, LATEST_INO) or kernel_ino >> inodes.SLOT_SHIFT:
            raise erofs()
        return kernel_ino

    def _check_new_name(self, parent: int, name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if parent == ROOT and name == SNAPSHOTS_DIR_NAME:
            raise pyfuse3.FUSEError(errno.EEXIST)

    def _remember(self, attr) -> pyfuse3.EntryAttributes:
        self.lookups[attr.ino] += 1
        return self._live_entry(attr)

    def _maybe_reclaim(self, ino: int) -> None:
        """Free an unlinked inode once the kernel and every handle are done with it."""
        if ino not in self.ns.orphan_set:
            # It has names (the set holds exactly the inodes with none, live.py keeps
            # it so): a FORGET's usual case (the kernel dropping 10,000 cached inodes
            # sends 10,000), answered from the set's copy in memory (no LMDB read).
            return
        if self.lookups.get(ino, 0) or self.open_count.get(ino, 0):
            # Not yet: the kernel may still open it (a path walk that found the name
            # before the unlink or rename), and must then read what was written.
            return
        # Its unsealed data need never reach the disk (storing it could fill a full
        # disk again right after this delete).
        self.data.discard(ino)
        self._no_xattrs.discard(ino)
        self.ns.reclaim(ino)

    # -- lookups and attributes ------------------------------------------------------

    @fuse_handler
    async def lookup(self, parent_inode, name, ctx=None):
        if name in (b".", b".."):
            return self._dot_lookup(parent_inode, name)
        if parent_inode == SNAPSHOTS_DIR_INO:
            kernel_ino = self.snapshots.lookup(name)
            if kernel_ino == LATEST_INO:
                return self._latest_entry()
            return await self.getattr(kernel_ino)
        if parent_inode == ROOT and name == SNAPSHOTS_DIR_NAME:
            return self._virtual_dir_entry()
        if parent_inode == LATEST_INO:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        slot, ino, view = self._resolve(parent_inode)
        child = view.child(ino, name)
        if child is None:
            # Only this mount changes the live tree and nothing changes a snapshot, so
            # the kernel may remember an absent name as long as a present one (`rsync`
            # asks three times for each name it is about to create).
            return inodes.negative_entry(inodes.SNAPSHOT_TIMEOUT if slot
                                         else inodes.LIVE_TIMEOUT)
        attr = view.getattr(child)
        if slot:
            return self._entry(attr, inodes.join(slot, attr.ino), slot)
        return self._remember(attr)

    @fuse_handler
    async def forget(self, inode_list):
        for kernel_ino, n in inode_list:
            if kernel_ino >> inodes.SLOT_SHIFT or kernel_ino in (SNAPSHOTS_DIR_INO, LATEST_INO):
                continue
            left = self.lookups.get(kernel_ino, 0) - n
            if left > 0:
                self.lookups[kernel_ino] = left
            else:
                self.lookups.pop(kernel_ino, None)
                self._maybe_reclaim(kernel_ino)

    @fuse_handler
    async def getattr(self, inode, ctx=None):
        if inode == SNAPSHOTS_DIR_INO:
            return self._virtual_dir_entry()
        if inode == LATEST_INO:
            return self._latest_entry()
        slot, ino, view = self._resolve(inode)
        return self._entry(view.getattr(ino), inode, slot)

    @fuse_handler
    @changes_live_tree
    async def setattr(self, inode, attr, fields, fh, ctx):
        ino = self._writable(inode)
        now = time.time_ns()
        old = self.live.getattr(ino)
        changes = {}
        if fields.update_size:
            if stat.S_ISDIR(old.mode):
                raise pyfuse3.FUSEError(errno.EISDIR)
            # A cut inside a stored block reads the part of it that stays.
            await self._in_file(0, ino, self.live, self.data.truncate(ino, attr.st_size))
            changes["size"] = attr.st_size
            if not fields.update_mtime:
                changes["mtime_ns"] = now
        if fields.update_mode:
            changes["mode"] = stat.S_IFMT(old.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        changes["ctime_ns"] = attr.st_ctime_ns if fields.update_ctime else now
        return self._live_entry(self.live.setattr(ino, **changes))

    @fuse_handler
    async def readlink(self, inode, ctx):
        if inode == LATEST_INO:
            latest = self.snapshots.latest()
            if latest is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return latest.name.encode()
        _, ino, view = self._resolve(inode)
        return view.readlink(ino)

    # -- creating and removing -------------------------------------------------------

    def _create(self, parent_inode, name, mode, ctx, rdev=0, target=None):
        parent = self._writable(parent_inode)
        self._check_new_name(parent, name)
        attr = self.live.create(parent, name, mode, ctx.uid, ctx.gid, time.time_ns(),
                                rdev=rdev, target=target)
        self._no_xattrs.add(attr.ino)
        return attr

    @fuse_handler
    @changes_live_tree
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._remember(self._create(parent_inode, name, mode, ctx, rdev=rdev))

    @fuse_handler
    @changes_live_tree
    async def mkdir(self, parent_inode, name, mode, ctx):
        mode = stat.S_IFDIR | stat.S_IMODE(mode)
        return self._remember(self._create(parent_inode, name, mode, ctx))

    @fuse_handler
    @changes_live_tree
    async def symlink(self, parent_inode, name, target, ctx):
        if len(target) > 4095:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        return self._remember(
            self._create(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target=target))

    @fuse_handler
    @changes_live_tree
    async def create(self, parent_inode, name, mode, flags, ctx):
        attr = self._create(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        info = self._open_handle(attr.ino, True, flags, ctx)
        self.open_count[attr.ino] += 1
        return info, self._remember(attr)

    @fuse_handler
    @changes_live_tree
    async def link(self, inode, new_parent_inode, new_name, ctx):
        ino = self._writable(inode)
        parent = self._writable(new_parent_inode)
        self._check_new_name(parent, new_name)
        attr = self.live.link(ino, parent, new_name, time.time_ns())
        return self._remember(attr)

    @fuse_handler
    @changes_live_tree
    async def unlink(self, parent_inode, name, ctx):
        parent = self._writable(parent_inode)
        if parent == ROOT and name == SNAPSHOTS_DIR_NAME:
            raise erofs()
        attr = self.live.unlink(parent, name, time.time_ns())
        if attr.nlink == 0:
            self._maybe_reclaim(attr.ino)

    @fuse_handler
    @changes_live_tree
    async def rmdir(self, parent_inode, name, ctx):
        parent = self._writable(parent_inode)
        if parent == ROOT and name == SNAPSHOTS_DIR_NAME:
            raise erofs()
        self.live.rmdir(parent, name, time.time_ns())

    @fuse_handler
    @changes_live_tree
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old_parent = self._writable(parent_inode_old)
        new_parent = self._writable(parent_inode_new)
        if SNAPSHOTS_DIR_NAME in (name_old if old_parent == ROOT else None,
                                  name_new if new_parent == ROOT else None):
            raise pyfuse3.FUSEError(errno.EPERM)
        if len(name_new) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        replaced = self.live.rename(old_parent, name_old, new_parent, name_new, flags,
                                    time.time_ns())
        if replaced is not None and replaced.nlink == 0:
            self._maybe_reclaim(replaced.ino)

    # -- files -----------------------------------------------------------------------

    @fuse_handler
    async def open(self, inode, flags, ctx):
        writable = bool(flags & WRITE_FLAGS)
        if inode in (SNAPSHOTS_DIR_INO, LATEST_INO):
            raise pyfuse3.FUSEError(errno.EISDIR if inode == SNAPSHOTS_DIR_INO else errno.ELOOP)
        slot, ino, view = self._resolve(inode)
        if slot and writable:
            raise erofs()
        attr = view.getattr(ino)
        if stat.S_ISDIR(attr.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC and writable and not slot:
            # libfuse asks for atomic O_TRUNC: the kernel sends no setattr(size=0) first.
            async with self.gate.changing():
                await self.data.truncate(ino, 0)
                if self.enable_writeback_cache:
                    # The kernel stamps the times itself (and sends them if they moved):
                    # a stamp from our finer clock would outlive a kernel that saw no
                    # change within its clock tick, and differ after a remount.
                    self.live.setattr(ino, size=0)
                else:
                    now = time.time_ns()
                    self.live.setattr(ino, size=0, mtime_ns=now, ctime_ns=now)
        info = self._open_handle(inode, writable, flags, ctx)
        if slot:
            self.slot_handles[slot] += 1
        else:
            self.open_count[ino] += 1
        return info

    def _open_handle(self, kernel_ino: int, writable: bool, flags: int,
                     ctx) -> pyfuse3.FileInfo:
        # A write-only open can neither read nor be mapped, so it loses nothing by going
        # past the kernel's page cache (direct_io): each write() comes to us as the
        # writer makes it, with no copy into fresh page-cache pages and no
        # security.capability GETXATTR before it (docs/performance.md, "Write-only opens
        # past the page cache"). Not under the writeback cache: the kernel then keeps
        # mtime itself, ignores ours, and a direct write never moves its own.
        direct = not self.enable_writeback_cache and flags & os.O_ACCMODE == os.O_WRONLY
        fh = next(self._fh)
        self.files[fh] = FileHandle(kernel_ino, writable, clears_setid=direct and ctx.uid != 0)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=direct)

    def _handle(self, fh) -> FileHandle:
        h = self.files.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    @fuse_handler
    async def read(self, fh, off, size):
        h = self._handle(fh)
        slot, ino, view = self._resolve(h.kernel_ino)
        return await self._in_file(slot, ino, view,
                                   self.data.read(ino, off, size, view=view if slot else None))

    @fuse_handler
    @changes_live_tree
    async def write(self, fh, off, buf):
        h = self._handle(fh)
        ino = self._writable(h.kernel_ino)
        # With the writeback cache the kernel owns mtime and ctime: it sets them at write()
        # and sends them in a setattr, which may reach us before the WRITE of the same
        # data (both are in flight at once). Stamping "now" here would then overwrite
        # the kernel's time with a later one, and a remount shows another mtime.
        now = None if self.enable_writeback_cache else time.time_ns()
        if h.clears_setid:
            await self._clear_setid(h.kernel_ino, ino, now)
        # A write into part of a stored block reads the rest of it first.
        return await self._in_file(0, ino, self.live, self.data.write(ino, off, buf, now))

    async def _in_file(self, slot: int, ino: int, view, work: Awaitable[T]) -> T:
        """`await work` (a read, write or truncate of file `ino`), having the log line
        of a corrupt block met there (handlers.py) name the file."""
        try:
            return await work
        except CorruptBlock as e:
            try:
                e.file = self._file_name(slot, ino, view)
            except Exception:  # the block's error is the one to report
                log.exception("cannot name inode %d", ino)
                e.file = f"inode {ino}"
            raise

    def _file_name(self, slot: int, ino: int, view) -> str:
        """A file as the mount shows it: its path from the mount's root where its
        directory names it (namespace/paths.py), else its inode."""
        where = ""
        if slot:
            record = self.snapshots.record(slot)
            name = record.name if record is not None else "(deleted)"
            where = f"/{SNAPSHOTS_DIR_NAME.decode()}/{name}"
        path = paths.path_of(self.ns, view, ino)
        if path is None:
            return f"inode {ino}" + (f" of {where}" if where else "")
        return where + os.fsdecode(path)

    async def _clear_setid(self, kernel_ino: int, ino: int, now: int) -> None:
        """What the kernel does before a cached write by someone without CAP_FSETID, as
        ext4 does: drop set-user-ID, and set-group-ID where group execute makes it one
        (without it the bit marks mandatory locking). The kernel is then told, as it
        checks permissions against the mode it caches."""
        mode = self.live.getattr(ino).mode
        kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if mode & kill:
            self.live.setattr(ino, mode=mode & ~kill, ctime_ns=now)
            await _tell_kernel(pyfuse3.invalidate_inode, kernel_ino, True)

    @fuse_handler
    async def flush(self, fh):
        # Nothing to do: dirty blocks are sealed by the next transaction group (or fsync,
        # a snapshot, backpressure), many files in one batch. Sealing each small file at
        # close cost two worker-thread round trips per file. ENOSYS tells the kernel to
        # stop sending FLUSH at all (it still writes its cached pages back on close),
        # which saves a round trip per close().
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_handler
    async def release(self, fh):
        h = self.files.pop(fh, None)
        if h is None:
            return
        if h.kernel_ino >> inodes.SLOT_SHIFT:
            await self._slot_closed(h.kernel_ino >> inodes.SLOT_SHIFT)
            return
        ino = h.kernel_ino
        left = self.open_count[ino] - 1
        if left > 0:
            self.open_count[ino] = left
        else:
            self.open_count.pop(ino, None)
            self.data.drop_if_idle(ino)
            self._maybe_reclaim(ino)

    @fuse_handler
    async def fsync(self, fh, datasync):
        h = self._handle(fh)
        if not (h.kernel_ino >> inodes.SLOT_SHIFT):
            await self.txg.commit()   # seals every dirty block first: see txg.py

    # -- directories -----------------------------------------------------------------

    @fuse_handler
    async def opendir(self, inode, ctx):
        if inode == LATEST_INO:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if inode != SNAPSHOTS_DIR_INO:
            _, ino, view = self._resolve(inode)
            if not stat.S_ISDIR(view.getattr(ino).mode):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = next(self._fh)
        self.dirs[fh] = DirHandle(inode, self.dir_cookies.table(inode))
        if inode >> inodes.SLOT_SHIFT:
            self.slot_handles[inode >> inodes.SLOT_SHIFT] += 1
        return fh

    @fuse_handler
    async def readdir(self, fh, start_id, token):
        h = self.dirs.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if h.kernel_ino == SNAPSHOTS_DIR_INO:
            return self._readdir_snapshots(h.cookies, start_id, token)
        slot, ino, view = self._resolve(h.kernel_ino)
        virtual = []
        if h.kernel_ino == ROOT:
            virtual = [(SNAPSHOTS_DIR_NAME, self._virtual_dir_entry())]
        if start_id <= len(virtual):   # 0, or a position among the virtual entries
            for pos in range(start_id, len(virtual)):
                name, entry = virtual[pos]
                if not pyfuse3.readdir_reply(token, name, entry, pos + 1):
                    return
            after = None
        else:
            after = _resume_after(h.cookies, start_id, lambda: view.names(ino))
        for name, attr in view.readdir(ino, after):
            kernel_ino = inodes.join(slot, attr.ino)
            cookie = h.cookies.cookie_after(name)
            if not pyfuse3.readdir_reply(token, name, self._entry(attr, kernel_ino, slot), cookie):
                return
            if not slot:
                self.lookups[attr.ino] += 1

    def _readdir_snapshots(self, cookies, start_id, token):
        entries = self.snapshots.entries()
        after = _resume_after(cookies, start_id, lambda: (name for name, _ in entries))
        for name, kernel_ino in entries:
            if after is not None and name <= after:
                continue  # names in order: resumed after one, even if it is gone now
            if kernel_ino == LATEST_INO:
                entry = self._latest_entry()
            else:
                slot, ino = inodes.split(kernel_ino)
                entry = self._entry(self.snapshots.view(slot).getattr(ino), kernel_ino, slot)
            if not pyfuse3.readdir_reply(token, name, entry, cookies.cookie_after(name)):
                return

    @fuse_handler
    async def releasedir(self, fh):
        h = self.dirs.pop(fh, None)
        if h is not None and h.kernel_ino >> inodes.SLOT_SHIFT:
            await self._slot_closed(h.kernel_ino >> inodes.SLOT_SHIFT)

    @fuse_handler
    async def fsyncdir(self, fh, datasync):
        await self.txg.commit()

    @fuse_handler
    async def statfs(self, ctx):
        st = os.statvfs(self.store.path)
        s = pyfuse3.StatvfsData()
        s.f_bsize = self.block_size
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        # What writes can still use: the store keeps a reserve for its index.
        reserve = self.store.packs.reserve_bytes(st) // st.f_frsize
        s.f_bfree = max(0, st.f_bfree - reserve)
        s.f_bavail = max(0, st.f_bavail - reserve)
        s.f_files = st.f_files or 1 << 32
        s.f_ffree = st.f_ffree or 1 << 32
        s.f_favail = st.f_favail or 1 << 32
        s.f_namemax = NAME_MAX
        return s

    @fuse_handler
    async def access(self, inode, mode, ctx):
        # Mounted with default_permissions: the kernel checks; this is for access(2)
        # with W_OK on snapshot objects.
        if mode & os.W_OK and (inode >> inodes.SLOT_SHIFT or inode in (SNAPSHOTS_DIR_INO, LATEST_INO)):
            raise erofs()
        return True

    # -- extended attributes ---------------------------------------------------------

    @fuse_handler
    @changes_live_tree
    async def setxattr(self, inode, name, value, ctx):
        ino = self._writable(inode)
        if name in UNSUPPORTED_XATTRS:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if len(name) > XATTR_NAME_MAX:
            raise pyfuse3.FUSEError(errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            raise pyfuse3.FUSEError(errno.E2BIG)
        self.live.setxattr(ino, name, value)
        self._no_xattrs.discard(ino)
        self.live.setattr(ino, ctime_ns=time.time_ns())

    @fuse_handler
    async def getxattr(self, inode, name, ctx):
        if name in UNSUPPORTED_XATTRS:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if inode in (SNAPSHOTS_DIR_INO, LATEST_INO):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        slot, ino, view = self._resolve(inode)
        if not slot and ino in self._no_xattrs:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if not slot and name == CAPABILITY_XATTR and not view.listxattr(ino):
            self._no_xattrs.add(ino)
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        try:
            return view.getxattr(ino, name)
        except OSError as e:
            # Learn the files with no xattrs at all, so the next question (the kernel's
            # security.capability before each write) costs no LMDB work.
            if not slot and e.errno == errno.ENODATA and not view.listxattr(ino):
                self._no_xattrs.add(ino)
            raise

    @fuse_handler
    async def listxattr(self, inode, ctx):
        if inode in (SNAPSHOTS_DIR_INO, LATEST_INO):
            return []
        slot, ino, view = self._resolve(inode)
        if not slot and ino in self._no_xattrs:
            return []
        return view.listxattr(ino)

    @fuse_handler
    @changes_live_tree
    async def removexattr(self, inode, name, ctx):
        ino = self._writable(inode)
        if name in UNSUPPORTED_XATTRS:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        self.live.removexattr(ino, name)
        self.live.setattr(ino, ctime_ns=time.time_ns())

    # -- whole-filesystem operations used by the daemon ------------------------------

    async def flush_everything(self) -> None:
        """Seal all buffered data and close the transaction group (the commit seals
        first, and still commits the metadata when the disk is full)."""
        await self.txg.commit()

    async def pull_dirty_pages(self) -> int:
        """Have the kernel write back every dirty page of the files with a gap open, and
        return the number the next write will get: a gap opened before it and still open
        afterwards is a hole meant to be (see FileContents.torn_ends).

        syncfs alone was not always enough (a snapshot held zeros behind a gap older
        than its syncfs). The likely way: the kernel's sync skips a file that went back
        on the dirty list after the sync began (its guard against a sync that never
        ends), as one re-dirtied during a background writeback can; the page behind a
        gap is such a re-dirtied page. Invalidating a file's cached pages makes the
        kernel write each dirty one first and wait for it, whatever the list says."""
        since = self.data.writes + 1
        for ino in self.data.inodes_with_gaps():
            await _tell_kernel(pyfuse3.invalidate_inode, ino)
        return since

    async def take_snapshot(self, label: str | None = None, hold: bool = False,
                            torn_since: int | None = None):
        """Snapshot the live tree at one point in time and make it durable.

        `torn_since`: from `pull_dirty_pages`; a file with a gap opened since then is
        ended at the gap in the snapshot (see FileContents.torn_ends), so a snapshot never
        holds data behind a hole that the kernel is still to fill."""
        async with self.gate.closed():
            await self.data.flush_all()
            torn = self.data.torn_ends(torn_since) if torn_since is not None else {}
            with self.data.sizes_cut_to(torn) as cut:
                record = self.ns.snapshot(label=label, hold=hold)
            if cut:
                log.info("snapshot %s: %d files end where the kernel has yet to fill a gap",
                         record.name, len(cut))
            await self.txg.commit()
        self.snapshots.refresh()
        return record

    def visible_snapshots(self) -> list:
        """The snapshots the user sees, oldest first (not those being deleted)."""
        return list(self.snapshots.records)

    def find_snapshot(self, name: str):
        return self.snapshots.find(name)

    async def delete_snapshot(self, record, announce: str = "snapshot %s deleted") -> None:
        """Delete a snapshot. It disappears at once, for good (a crash leaves the next
        mount to finish); what only it sees is freed now, or, if files or directories
        in it are open, when the last of them is closed (they read on till then).
        `announce` (with the name) is logged as soon as it is out of sight, before
        anything an unmount could cancel, so that the log never misses a deletion (a
        scheduled prune at unmount did)."""
        record = self.ns.mark_deleting(record.id)  # SnapshotHeld if it is held
        log.info(announce, record.name)
        self.snapshots.hide(record)
        if not await self._delete_now(record):
            await self.txg.commit()
            log.info("snapshot %s is open: deleting it once closed", record.name)
        await self._forget_entry(record.name.encode())
        if not self.snapshots.records:
            await self._forget_entry(inodes.LATEST_NAME)

    async def _delete_now(self, record) -> bool:
        """Free what only this snapshot sees, unless something in it is open; False if
        so. The freeing looks at DELETE_CHUNK deadlist entries at a time and serves
        requests in between, then commits. Shielded: a deletion left half done would
        keep its epoch out of the reckoning of versions (see namespace/deletion.py)."""
        with trio.CancelScope(shield=True):
            async with self._one_deletion:
                if record.id not in {r.id for r in self.ns.catalog.records}:
                    return True  # deleted by another request while this one waited
                slot = self.snapshots.slot(record.id)
                if slot is not None and self.slot_handles.get(slot):
                    return False  # freed when the last is closed (_slot_closed)
                deletion = self.ns.start_deleting(record.id)
                self.snapshots.refresh()
                while not deletion.free_some(DELETE_CHUNK):
                    await between_pieces()
                await self.txg.commit()
                self.snapshots.refresh()
                return True

    async def _slot_closed(self, slot: int) -> None:
        left = self.slot_handles[slot] - 1
        if left > 0:
            self.slot_handles[slot] = left
            return
        self.slot_handles.pop(slot, None)
        record = self.snapshots.record(slot)
        if record is None:
            for r in self.snapshots.hidden.values():
                if self.snapshots.slot(r.id) == slot:
                    if await self._delete_now(r):
                        log.info("snapshot %s closed and deleted", r.name)
                    break

    async def finish_deletes(self, unmounted: bool = False) -> None:
        """Delete for real the snapshots deleted while open: when a mount starts (after
        a crash, or a stop with them open) and once `unmounted`, when the kernel has let
        go of every file."""
        if unmounted:
            self.slot_handles.clear()
        for r in self.ns.deleting_snapshots():
            if await self._delete_now(r):
                log.info("snapshot %s deleted (its deletion was pending)", r.name)

    async def _forget_entry(self, name: bytes) -> None:
        """Make the kernel forget /snapshots/NAME before the caller is answered."""
        await _tell_kernel(pyfuse3.invalidate_entry, SNAPSHOTS_DIR_INO, name)
