#!/usr/bin/env python3
"""memfs: a minimal in-memory pyfuse3 filesystem, the "Python FUSE ceiling" baseline.

It does as little as a pyfuse3 filesystem can: files live in bytearrays, directories in
dicts; no hashing, no compression, no index. It is configured the way backupfs is (long
entry/attr timeouts, writeback cache, a getxattr that answers at once: EOPNOTSUPP for
ACLs and SELinux labels, ENOATTR for the rest; the same read-ahead), so the difference
between the two is what backupfs's own work costs, not FUSE or pyfuse3.

    tools/memfs.py MOUNTPOINT [-o allow_other] [--discard-data [--seal] |
                                                 --zstd [--decode-threads N]]
                                  # foreground; unmount with fusermount3 -u

--discard-data keeps only each file's size (reads give zeros): the cost of moving bytes
through FUSE and pyfuse3 alone. For large writes memfs is no ceiling: writing 1 GiB
into it cost its daemon 2.5 s of system time against 0.55 s of user time (the fresh
memory its bytearrays grow into), which a filesystem that passes the bytes on to the
disk does not pay.

--seal, with --discard-data, first does to every 128 KiB written the CPU work backupfs
does to a new block (its own `codec.encode`: BLAKE3 to name it, zstd at backupfs's
hurried level, the fastest that still Huffman-codes literals, and the XXH3 checksum a
record carries), in two worker threads as backupfs's sealers do, 4 MiB of WRITEs a
batch, at most two batches at work and one waiting; a flush or fsync waits for them.
The result is thrown away: a write that hashes and compresses as backupfs does, with no
index or disk.

--zstd keeps each file zstd-compressed in memory from its last handle's close on (128
KiB blocks at level 3, a block that does not shrink kept as it is: what backupfs stores)
and decompresses the blocks a READ spans in the event loop, each straight into its place
in one reused reply buffer (as backupfs's decoders do into theirs): the ceiling of a
cold read that must decode, with no disk, index or checksum behind it.
--decode-threads N decodes each READ's blocks in a worker thread instead, N at a time:
the same ceiling with the decoding moved off the event loop's core.

Supports files, directories, read/write, truncate, chmod/chown/utimens, rename, unlink,
rmdir, statfs and fsync (a no-op but for --seal's wait). Not a filesystem to keep
anything in.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import stat
import sys
import time
from pathlib import Path

import pyfuse3
import trio
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backupfs.fs.operations import UNSUPPORTED_XATTRS  # noqa: E402
from backupfs.store import codec  # noqa: E402
from backupfs.store.config import HURRIED_LEVEL, Compression  # noqa: E402
from baseline_mount import serve  # noqa: E402

TIMEOUT = 300.0
ROOT = pyfuse3.ROOT_INODE
ZSTD_BLOCK = 128 * 1024  # backupfs's default block size
ZSTD_LEVEL = 3  # and compression level
SEAL_BATCH = 4 << 20  # --seal: bytes per hand-off to a worker thread
SEAL_THREADS = 2
SEAL_COMPRESSION = Compression("zstd", HURRIED_LEVEL, adaptive=False)


class Node:
    __slots__ = ("ino", "mode", "uid", "gid", "nlink", "atime", "mtime", "ctime", "data",
                 "children", "rdev", "target", "discarded_size", "frozen", "frozen_size")

    def __init__(self, ino: int, mode: int, uid: int, gid: int):
        now = time.time_ns()
        self.ino, self.mode, self.uid, self.gid = ino, mode, uid, gid
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.atime = self.mtime = self.ctime = now
        self.data = bytearray()
        self.children: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None
        self.rdev = 0
        self.target = b""
        self.discarded_size = 0  # --discard-data: the size the discarded writes reached
        # --zstd: the file's blocks as (compressed?, payload) from its last close on;
        # `data` is then empty until a write or truncate thaws them.
        self.frozen: list[tuple[bool, bytes]] | None = None
        self.frozen_size = 0


class Sealer:
    """--seal: backupfs's CPU work on every block written, in worker threads.

    A batch is the WRITEs' own bytes objects, not a copy, as backupfs's dirty buffers
    keep the blocks a WRITE covers whole."""

    def __init__(self):
        self._send, self._recv = trio.open_memory_channel(0)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._busy = 0  # batches handed over and not yet sealed
        self._idle = trio.Event()
        self._idle.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(SEAL_THREADS):
                nursery.start_soon(self._work)

    async def _work(self) -> None:
        async for batch in self._recv:
            await trio.to_thread.run_sync(seal_blocks, batch)
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    async def add(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= SEAL_BATCH:
            await self._hand_over()

    async def _hand_over(self) -> None:
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        if not self._busy:
            self._idle = trio.Event()
        self._busy += 1
        await self._send.send(batch)  # waits while both threads are at work

    async def drain(self) -> None:
        if self._pending:
            await self._hand_over()
        await self._idle.wait()


def seal_blocks(batch: list[bytes]) -> None:
    for data in batch:
        view = memoryview(data)  # of bytes: read-only, as encode wants
        for i in range(0, len(view), ZSTD_BLOCK):
            codec.encode(view[i:i + ZSTD_BLOCK], SEAL_COMPRESSION, checked=True)


class MemFS(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, discard_data: bool = False, zstd: bool = False,
                 sealer: Sealer | None = None, decode_threads: int = 0):
        super().__init__()
        self.discard_data = discard_data
        self.zstd = zstd
        self.sealer = sealer
        self._compress = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress
        # --zstd: READs are answered from here. pyfuse3 sends a reply before another
        # handler can run, and _read_frozen does not wait, so one buffer serves them all.
        self._reply = bytearray()
        # --decode-threads: a buffer for each READ at work in a thread.
        self._decoding = trio.CapacityLimiter(decode_threads) if decode_threads else None
        self._spare: list[bytearray] = []
        self.nodes: dict[int, Node] = {ROOT: Node(ROOT, stat.S_IFDIR | 0o755, 0, 0)}
        self._ino = itertools.count(ROOT + 1)
        self._fh = itertools.count(1)
        self.open_fh: dict[int, int] = {}

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _entry(self, n: Node) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = n.ino
        e.entry_timeout = e.attr_timeout = TIMEOUT
        e.st_mode, e.st_nlink, e.st_uid, e.st_gid = n.mode, n.nlink, n.uid, n.gid
        e.st_rdev = n.rdev
        e.st_size = len(n.target) if n.target else max(len(n.data), n.discarded_size,
                                                          n.frozen_size)
        e.st_blksize = 131072
        e.st_blocks = (e.st_size + 511) // 512
        e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = n.atime, n.mtime, n.ctime
        return e

    async def lookup(self, parent_inode, name, ctx=None):
        p = self._node(parent_inode)
        if name == b".":
            return self._entry(p)
        ino = p.children.get(name) if p.children is not None else None
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(self.nodes[ino])

    async def getattr(self, inode, ctx=None):
        return self._entry(self._node(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        n = self._node(inode)
        now = time.time_ns()
        if fields.update_size:
            size = attr.st_size
            self._thaw(n)
            if self.discard_data:
                n.discarded_size = size
            elif size < len(n.data):
                del n.data[size:]
            else:
                n.data.extend(bytes(size - len(n.data)))
            n.mtime = now
        if fields.update_mode:
            n.mode = stat.S_IFMT(n.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            n.uid = attr.st_uid
        if fields.update_gid:
            n.gid = attr.st_gid
        if fields.update_atime:
            n.atime = attr.st_atime_ns
        if fields.update_mtime:
            n.mtime = attr.st_mtime_ns
        n.ctime = now
        return self._entry(n)

    def _new(self, parent_inode, name, mode, ctx) -> Node:
        p = self._node(parent_inode)
        if name in p.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        n = Node(next(self._ino), mode, ctx.uid, ctx.gid)
        self.nodes[n.ino] = n
        p.children[name] = n.ino
        if stat.S_ISDIR(mode):
            p.nlink += 1
        p.mtime = p.ctime = n.ctime
        return n

    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._entry(self._new(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx))

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        n = self._new(parent_inode, name, mode, ctx)
        n.rdev = rdev
        return self._entry(n)

    async def symlink(self, parent_inode, name, target, ctx):
        n = self._new(parent_inode, name, stat.S_IFLNK | 0o777, ctx)
        n.target = target
        return self._entry(n)

    async def readlink(self, inode, ctx):
        return self._node(inode).target

    async def create(self, parent_inode, name, mode, flags, ctx):
        n = self._new(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        fh = next(self._fh)
        self.open_fh[fh] = n.ino
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._entry(n)

    async def open(self, inode, flags, ctx):
        self._node(inode)
        fh = next(self._fh)
        self.open_fh[fh] = inode
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh, off, size):
        n = self.nodes[self.open_fh[fh]]
        if n.frozen is not None:
            if self._decoding is None:
                return self._read_frozen(n, off, size, self._reply)
            buf = self._spare.pop() if self._spare else bytearray()
            try:
                return await trio.to_thread.run_sync(self._read_frozen, n, off, size, buf,
                                                     limiter=self._decoding)
            finally:
                # Back before pyfuse3 replies from it, which it does before any other
                # task (so any other thread) can have it.
                self._spare.append(buf)
        if self.discard_data:
            return bytes(max(0, min(size, n.discarded_size - off)))
        # A view, not a copy: pyfuse3 sends it before another task can resize the
        # bytearray. `bytes(data[a:b])` copied twice into fresh memory, and on this VM
        # fresh memory's page faults made memfs's cold read cost 2-3 s of CPU per GiB
        # in some hours and 0.9 s in others: no steady ceiling (docs/performance.md,
        # "A steady ceiling, and the cold read against it").
        return memoryview(n.data)[off:off + size]

    def _read_frozen(self, n: Node, off: int, size: int,
                     buf: bytearray) -> memoryview | bytes:
        end = min(off + size, n.frozen_size)
        if off >= end:
            return b""
        first, last = off // ZSTD_BLOCK, (end - 1) // ZSTD_BLOCK
        need = (last + 1 - first) * ZSTD_BLOCK
        if len(buf) < need:
            buf.extend(bytes(need - len(buf)))  # in place: the caller keeps it
        out = memoryview(buf)
        at = 0
        for compressed, payload in n.frozen[first:last + 1]:
            if compressed:
                reader = codec.decompressor().stream_reader(payload, read_across_frames=False)
                at += reader.readinto(out[at:at + ZSTD_BLOCK])
            else:
                out[at:at + len(payload)] = payload
                at += len(payload)
        start = first * ZSTD_BLOCK
        return out[off - start:end - start]

    def _freeze(self, n: Node) -> None:
        if not n.data or not stat.S_ISREG(n.mode):
            return
        blocks = []
        for i in range(0, len(n.data), ZSTD_BLOCK):
            block = bytes(n.data[i:i + ZSTD_BLOCK])
            packed = self._compress(block)
            blocks.append((True, packed) if len(packed) < len(block) else (False, block))
        n.frozen, n.frozen_size, n.data = blocks, len(n.data), bytearray()

    def _thaw(self, n: Node) -> None:
        if n.frozen is not None:
            data = bytearray()
            for off in range(0, n.frozen_size, ZSTD_BLOCK):  # not the whole file at once
                data += self._read_frozen(n, off, ZSTD_BLOCK, self._reply)
            n.data = data
            n.frozen, n.frozen_size = None, 0

    async def write(self, fh, off, buf):
        n = self.nodes[self.open_fh[fh]]
        self._thaw(n)
        if self.discard_data:
            if self.sealer is not None:
                await self.sealer.add(buf)
            n.discarded_size = max(n.discarded_size, off + len(buf))
            n.mtime = n.ctime = time.time_ns()
            return len(buf)
        if off > len(n.data):
            n.data.extend(bytes(off - len(n.data)))
        n.data[off:off + len(buf)] = buf
        n.mtime = n.ctime = time.time_ns()
        return len(buf)

    async def flush(self, fh):
        if self.sealer is not None:
            await self.sealer.drain()
        # The last close of a file freezes it (--zstd) before close() returns, so a
        # benchmark's first read never waits for the compression.
        if self.zstd:
            ino = self.open_fh[fh]
            if list(self.open_fh.values()).count(ino) == 1:
                self._freeze(self.nodes[ino])

    async def fsync(self, fh, datasync):
        if self.sealer is not None:
            await self.sealer.drain()

    async def release(self, fh):
        self.open_fh.pop(fh, None)

    def _remove(self, parent_inode, name, want_dir: bool):
        p = self._node(parent_inode)
        ino = p.children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        n = self.nodes[ino]
        if want_dir != stat.S_ISDIR(n.mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR if want_dir else errno.EISDIR)
        if want_dir and n.children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del p.children[name]
        if want_dir:
            p.nlink -= 1
        n.nlink = 0 if want_dir else n.nlink - 1
        p.mtime = p.ctime = n.ctime = time.time_ns()

    async def unlink(self, parent_inode, name, ctx):
        self._remove(parent_inode, name, False)

    async def rmdir(self, parent_inode, name, ctx):
        self._remove(parent_inode, name, True)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        po, pn = self._node(parent_inode_old), self._node(parent_inode_new)
        ino = po.children.get(name_old)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        old = pn.children.get(name_new)
        if old is not None:
            self._remove(parent_inode_new, name_new, stat.S_ISDIR(self.nodes[old].mode))
        del po.children[name_old]
        pn.children[name_new] = ino
        if stat.S_ISDIR(self.nodes[ino].mode) and po is not pn:
            po.nlink -= 1
            pn.nlink += 1

    async def forget(self, inode_list):
        for ino, _ in inode_list:
            n = self.nodes.get(ino)
            if n is not None and n.nlink == 0 and ino not in self.open_fh.values():
                del self.nodes[ino]

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        # Cookie = position in a sorted snapshot of the names: good enough for a baseline
        # that nobody deletes from while listing.
        names = sorted(self.nodes[fh].children.items())
        for i in range(start_id, len(names)):
            name, ino = names[i]
            if not pyfuse3.readdir_reply(token, name, self._entry(self.nodes[ino]), i + 1):
                return

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 30
        s.f_files = s.f_ffree = s.f_favail = 1 << 30
        s.f_namemax = 255
        return s

    async def getxattr(self, inode, name, ctx):
        if name in UNSUPPORTED_XATTRS:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):
        return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mountpoint")
    ap.add_argument("-o", dest="options", action="append", default=[])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--discard-data", action="store_true",
                      help="keep only file sizes: measures FUSE and pyfuse3 alone")
    mode.add_argument("--zstd", action="store_true",
                      help="keep closed files zstd-compressed: decode on every READ")
    ap.add_argument("--seal", action="store_true",
                    help="with --discard-data: hash and compress every block written first")
    ap.add_argument("--decode-threads", type=int, default=0, metavar="N",
                    help="with --zstd: decode in worker threads, N at a time")
    args = ap.parse_args()
    if args.seal and not args.discard_data:
        ap.error("--seal needs --discard-data")
    if args.decode_threads and not args.zstd:
        ap.error("--decode-threads needs --zstd")
    if args.decode_threads < 0:
        ap.error("--decode-threads must not be negative")
    mountpoint = Path(args.mountpoint).resolve()  # not once mounted: it would ask itself
    sealer = Sealer() if args.seal else None
    serve("memfs", MemFS(args.discard_data, args.zstd, sealer, args.decode_threads),
          mountpoint, args.options, [sealer.run] if sealer is not None else [])


if __name__ == "__main__":
    main()
