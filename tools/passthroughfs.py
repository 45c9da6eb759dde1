#!/usr/bin/env python3
"""passthroughfs: a bare pyfuse3 filesystem that passes every request on to a directory.

The baseline between the raw disk and backupfs: the same disk, the same FUSE channel and
pyfuse3 loop, and nothing of backupfs's own (no hashing, compression, index or packs).
Where memfs (tools/memfs.py) is the ceiling of a filesystem that keeps its bytes in
memory, this is the ceiling of one that keeps them on the disk as they are: its cold
read waits for the disk as backupfs's does, and its write ends in the disk's page cache
and `fsync` as backupfs's packs do.

It is configured the way backupfs and memfs are (long entry/attr timeouts, writeback
cache, the same read-ahead, EOPNOTSUPP at once for the ACL and SELinux xattrs the kernel
probes for), and does each request in the event loop with one system call or a few,
as simply as it can: READ is one `pread`, WRITE one `pwrite`, FSYNC one `fsync`.
--threads N does each READ's `pread` and each WRITE's `pwrite` in a worker thread
instead, N at a time, so that the disk's waits and the copies overlap the loop's work.

    tools/passthroughfs.py SOURCE MOUNTPOINT [-o allow_other] [--threads N]
                                  # foreground; unmount with fusermount3 -u

Inode numbers are the source's own. The daemon knows each inode by the paths it has
answered for it, so SOURCE must not change beneath the mount. Renames with flags
(RENAME_NOREPLACE, RENAME_EXCHANGE) answer EINVAL. A baseline, not a filesystem to keep
anything in.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backupfs.fs.handlers import fuse_handler  # noqa: E402
from backupfs.fs.operations import UNSUPPORTED_XATTRS  # noqa: E402
from baseline_mount import serve  # noqa: E402

TIMEOUT = 300.0  # as memfs
ROOT = pyfuse3.ROOT_INODE


def _by_name(target: int | bytes) -> dict:
    """The keywords that make a call on a name act on a symlink itself, as a call on a
    handle does (and may not be given)."""
    return {} if isinstance(target, int) else {"follow_symlinks": False}


class PassthroughFS(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, source: str | Path, threads: int = 0):
        super().__init__()
        self._limit = trio.CapacityLimiter(threads) if threads else None
        root = os.fsencode(os.path.realpath(source))
        self._root_ino = os.lstat(root).st_ino
        # Every inode the kernel holds (its lookup count > 0), by the paths it was
        # answered for: a file with hard links may be known by several.
        self._paths: dict[int, set[bytes]] = {ROOT: {root}}
        self._lookups: dict[int, int] = {ROOT: 1}
        # File handle (the fd itself) -> inode: how an open file with no name left is
        # reached (_target).
        self._fds: dict[int, int] = {}
        self._dirs: dict[int, list[os.DirEntry]] = {}
        self._dir_fh = itertools.count(1)

    # -- inodes and paths ------------------------------------------------------------

    def _ino(self, st: os.stat_result) -> int:
        if st.st_ino == self._root_ino:
            return ROOT
        if st.st_ino == ROOT:  # ext4 and xfs never give a file inode 1
            raise pyfuse3.FUSEError(errno.EIO)
        return st.st_ino

    def _path(self, ino: int) -> bytes:
        paths = self._paths.get(ino)
        if not paths:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return next(iter(paths))

    def _child(self, parent_inode: int, name: bytes) -> bytes:
        return os.path.join(self._path(parent_inode), name)

    def _entry(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = self._ino(st)
        e.entry_timeout = e.attr_timeout = TIMEOUT
        e.st_mode, e.st_nlink, e.st_uid, e.st_gid = st.st_mode, st.st_nlink, st.st_uid, st.st_gid
        e.st_rdev, e.st_size, e.st_blocks = st.st_rdev, st.st_size, st.st_blocks
        e.st_blksize = st.st_blksize
        e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return e

    def _remember(self, path: bytes, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        """The entry for `path`, counted as one more lookup the kernel holds."""
        entry = self._entry(st or os.lstat(path))
        ino = entry.st_ino
        self._paths.setdefault(ino, set()).add(path)
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return entry

    def _forget_path(self, path: bytes) -> None:
        try:
            ino = self._ino(os.lstat(path))
        except OSError:
            return
        self._paths.get(ino, set()).discard(path)

    def _moved(self, old: bytes, new: bytes, is_dir: bool, ino: int) -> None:
        """A rename of `old` (inode `ino`) to `new`: its path, and a directory's every
        path beneath it, now lie under `new`."""
        prefix = old + b"/"
        for paths in self._paths.values() if is_dir else [self._paths.get(ino, set())]:
            for p in [p for p in paths if p == old or p.startswith(prefix)]:
                paths.discard(p)
                paths.add(new + p[len(old):])

    @fuse_handler
    async def lookup(self, parent_inode, name, ctx=None):
        if name == b"." or (name == b".." and parent_inode == ROOT):
            return self._remember(self._path(parent_inode))
        if name == b"..":
            return self._remember(os.path.dirname(self._path(parent_inode)))
        return self._remember(self._child(parent_inode, name))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            left = self._lookups.get(ino, 0) - n
            if left > 0 or ino == ROOT:
                self._lookups[ino] = max(left, 1)
            else:
                self._lookups.pop(ino, None)
                self._paths.pop(ino, None)

    # -- attributes ------------------------------------------------------------------

    def _target(self, inode: int, fh: int | None = None) -> int | bytes:
        """What a system call on `inode` goes through: the handle the kernel names, else
        a name of it, else (unlinked but open: the kernel names no handle for fchmod or
        fstat) any handle open on it."""
        if fh is not None:
            return fh
        if self._paths.get(inode):
            return self._path(inode)
        for fd, ino in self._fds.items():
            if ino == inode:
                return fd
        raise pyfuse3.FUSEError(errno.ENOENT)

    @fuse_handler
    async def getattr(self, inode, ctx=None):
        target = self._target(inode)
        return self._entry(os.stat(target, **_by_name(target)))

    @fuse_handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        target = self._target(inode, fh)
        by_name = _by_name(target)
        if fields.update_size:
            os.truncate(target, attr.st_size)
        if fields.update_mode:
            os.chmod(target, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(target, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1, **by_name)
        if fields.update_atime or fields.update_mtime:
            st = os.stat(target, **by_name)
            os.utime(target, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                 attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                     **by_name)
        return self._entry(os.stat(target, **by_name))

    @fuse_handler
    async def statfs(self, ctx):
        v = os.statvfs(self._path(ROOT))
        s = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(s, field, getattr(v, field))
        return s

    # -- names -----------------------------------------------------------------------

    def _made(self, path: bytes, ctx) -> pyfuse3.EntryAttributes:
        """A new node at `path`, given to the caller as a local filesystem would."""
        os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)
        return self._remember(path)

    @fuse_handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        os.mkdir(path, stat.S_IMODE(mode) & ~ctx.umask)
        return self._made(path, ctx)

    @fuse_handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        path = self._child(parent_inode, name)
        os.mknod(path, mode & ~ctx.umask, rdev)
        return self._made(path, ctx)

    @fuse_handler
    async def symlink(self, parent_inode, name, target, ctx):
        path = self._child(parent_inode, name)
        os.symlink(target, path)
        return self._made(path, ctx)

    @fuse_handler
    async def readlink(self, inode, ctx):
        return os.readlink(self._path(inode))

    @fuse_handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        path = self._child(new_parent_inode, new_name)
        os.link(self._path(inode), path, follow_symlinks=False)
        return self._remember(path)

    @fuse_handler
    async def unlink(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        self._forget_path(path)
        os.unlink(path)

    @fuse_handler
    async def rmdir(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        self._forget_path(path)
        os.rmdir(path)

    @fuse_handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        moving = os.lstat(old)
        try:
            replaced = os.lstat(new)
        except FileNotFoundError:
            replaced = None
        os.rename(old, new)
        if replaced is not None:  # (never another name of `moving`: the kernel answers that)
            self._paths.get(self._ino(replaced), set()).discard(new)
        self._moved(old, new, stat.S_ISDIR(moving.st_mode), self._ino(moving))

    # -- directories -----------------------------------------------------------------

    @fuse_handler
    async def opendir(self, inode, ctx):
        # A sorted snapshot of the names: a READDIR's offset is an index into it.
        with os.scandir(self._path(inode)) as it:
            entries = sorted(it, key=lambda e: e.name)
        fh = next(self._dir_fh)
        self._dirs[fh] = entries
        return fh

    @fuse_handler
    async def readdir(self, fh, start_id, token):
        entries = self._dirs[fh]
        for i in range(start_id, len(entries)):
            entry = entries[i]
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(entry.name), self._entry(st), i + 1):
                return
            # The kernel now holds the entry, as after a LOOKUP.
            self._remember(os.fsencode(entry.path), st)

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    @fuse_handler
    async def fsyncdir(self, fh, datasync):
        pass  # every change above is made by a system call on the source already

    # -- files -----------------------------------------------------------------------

    @staticmethod
    def _backing_flags(flags: int) -> int:
        # With the writeback cache the kernel reads pages of write-only files, and keeps
        # O_APPEND's offsets itself.
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = flags & ~os.O_ACCMODE | os.O_RDWR
        return flags & ~(os.O_APPEND | os.O_NOCTTY)

    @fuse_handler
    async def open(self, inode, flags, ctx):
        fd = os.open(self._path(inode), self._backing_flags(flags))
        self._fds[fd] = inode
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @fuse_handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        fd = os.open(path, self._backing_flags(flags) | os.O_CREAT,
                     stat.S_IMODE(mode) & ~ctx.umask)
        try:
            entry = self._made(path, ctx)
        except BaseException:
            os.close(fd)
            raise
        self._fds[fd] = entry.st_ino
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), entry

    @fuse_handler
    async def read(self, fh, off, size):
        if self._limit is not None:
            return await trio.to_thread.run_sync(os.pread, fh, size, off, limiter=self._limit)
        return os.pread(fh, size, off)

    @fuse_handler
    async def write(self, fh, off, buf):
        if self._limit is not None:
            return await trio.to_thread.run_sync(os.pwrite, fh, buf, off, limiter=self._limit)
        return os.pwrite(fh, buf, off)

    @fuse_handler
    async def fsync(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)

    async def flush(self, fh):
        pass  # the data is with the source's page cache already

    @fuse_handler
    async def release(self, fh):
        self._fds.pop(fh, None)
        os.close(fh)

    # -- extended attributes ---------------------------------------------------------

    @fuse_handler
    async def getxattr(self, inode, name, ctx):
        if name in UNSUPPORTED_XATTRS:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        return os.getxattr(self._path(inode), name, follow_symlinks=False)

    @fuse_handler
    async def setxattr(self, inode, name, value, ctx):
        os.setxattr(self._path(inode), name, value, follow_symlinks=False)

    @fuse_handler
    async def listxattr(self, inode, ctx):
        return [os.fsencode(n) for n in os.listxattr(self._path(inode), follow_symlinks=False)]

    @fuse_handler
    async def removexattr(self, inode, name, ctx):
        os.removexattr(self._path(inode), name, follow_symlinks=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="the directory whose files the mount shows")
    ap.add_argument("mountpoint")
    ap.add_argument("-o", dest="options", action="append", default=[])
    ap.add_argument("--threads", type=int, default=0, metavar="N",
                    help="pread and pwrite in worker threads, N at a time")
    args = ap.parse_args()
    if not os.path.isdir(args.source):
        ap.error(f"{args.source}: not a directory")
    if args.threads < 0:
        ap.error("--threads must not be negative")
    mountpoint = Path(args.mountpoint).resolve()  # not once mounted: it would ask itself
    os.umask(0)  # modes arrive with the caller's umask applied, and must stay as they are
    serve("passthroughfs", PassthroughFS(args.source, args.threads), mountpoint, args.options)


if __name__ == "__main__":
    main()
