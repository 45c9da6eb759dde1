"""Pack files: append-only files of block records, rotated at about 64 MiB.

A pack's bytes count only up to the length the index committed for it; anything beyond
is the tail of a write that never committed and is cut off when the store opens.
Closed packs are never written again (compaction writes live blocks into the current
pack and deletes the old file once the index no longer points into it).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import StoreError
from .layout import pack_path
from .pack_maps import PackMaps
from .pack_writer import PackWriter, StagePool

log = logging.getLogger(__name__)

PACK_MAGIC = b"BKFSPACK"
PACK_HEADER = struct.Struct(">8sII")  # magic, pack format version, pack id
PACK_HEADER_LEN = PACK_HEADER.size
PACK_VERSION = 1
DEFAULT_ROTATE_SIZE = 64 * 1024 * 1024
# Kept free for the index when the disk fills: 2% of the disk, at most 256 MiB.
RESERVE_SHARE = 0.02
RESERVE_MAX = 256 * 1024 * 1024
# Below this estimate of free space, every append looks at the disk again.
SPACE_RECHECK = 64 * 1024 * 1024
# preadv2's flag for "fail with EAGAIN rather than wait for the disk" (Linux 4.14).
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0x00000008)
# A cached record: staged bytes, a view of a mapped pack, or RWF_NOWAIT's copy.
Cached = bytes | memoryview | bytearray


def _locked(method):
    """Run a PackSet method holding its write lock (appends come from worker threads)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SyncPlan:
    """Files and directories to fsync, with the pack lengths that are durable afterwards.

    Opens its own descriptors, so it is safe to run in a worker thread while the owner
    keeps appending, rotating or closing packs.
    """

    def __init__(self, files: list[Path], dirs: list[Path], lengths: dict[int, int],
                 written: Callable[[], None] | None = None):
        self.files, self.dirs, self.lengths = files, dirs, lengths
        self.written = written  # waits until the pack writer has given the disk its bytes

    def run(self) -> None:
        if self.written is not None:
            self.written()
        for path in self.files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # compacted away since: nothing of it is referenced any more
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for d in self.dirs:
            _fsync_dir(d)


class PackSet:
    """The pack files of one store: one pack open for appending, cached read handles."""

    def __init__(self, root: Path, rotate_size: int = DEFAULT_ROTATE_SIZE, readonly: bool = False,
                 direct: bool = True):
        self.root = Path(root)
        self.rotate_size = rotate_size
        self.readonly = readonly
        self.direct = direct  # appends past the page cache where the filesystem allows
        self._stages = StagePool()
        self._read_fds: dict[int, int] = {}
        self._read_lock = threading.Lock()
        # Appends come from worker threads (BlockStore.put_many): everything that touches
        # the write pack or the sync bookkeeping holds this.
        self._lock = threading.RLock()
        # Read descriptors in use by a pread in some thread, and those to close when the
        # last such read ends (their pack was removed meanwhile): never close a descriptor
        # under a reader, whose pread would then fail or read whatever file reuses it.
        self._reads_in_flight: dict[int, int] = {}
        self._close_when_idle: set[int] = set()
        self._nowait_works = hasattr(os, "preadv")
        self._maps = PackMaps(self.path) if PackMaps.available() else None
        self._write_id: int | None = None
        self._writer: PackWriter | None = None
        self._next_id = 1
        self._dirty: set[int] = set()  # packs written since the last sync
        self._dirs_to_sync: set[Path] = set()
        self._lengths: dict[int, int] = {}  # current (possibly uncommitted) lengths
        self._synced_unrecorded: dict[int, int] = {}
        self._sealed: set[int] = set()  # never appended to again (being compacted away)
        self._retired: set[int] = set()  # dropped from the index: no length to record
        self._free_estimate = 0
        self._space_checked = 0.0

    # -- naming ---------------------------------------------------------------------

    def path(self, pack_id: int) -> Path:
        return pack_path(self.root, pack_id)

    def on_disk(self) -> dict[int, Path]:
        """Every pack file present, by id (whatever the index says)."""
        found = {}
        if self.root.is_dir():
            for sub in self.root.iterdir():
                if not sub.is_dir():
                    continue
                for f in sub.glob("*.pack"):
                    try:
                        found[int(f.stem)] = f
                    except ValueError:
                        continue
        return found

    # -- opening --------------------------------------------------------------------

    def recover(self, committed: dict[int, int]) -> list[str]:
        """Bring the files in line with the committed lengths the index records.

        Tails past a committed length are cut; pack files the index does not know were
        being written when the last writer stopped and are deleted. Returns what was
        done, one line per action, for the log.
        """
        actions = []
        newest = max(committed, default=None)
        for pack_id, path in sorted(self.on_disk().items()):
            if pack_id not in committed:
                if not self.readonly:
                    path.unlink()
                    actions.append(f"removed uncommitted pack {path.name}")
                continue
            size = path.stat().st_size
            want = committed[pack_id]
            if size > want and not self.readonly:
                os.truncate(path, want)
                actions.append(f"cut {size - want} uncommitted bytes from {path.name}")
            elif size == want and pack_id == newest and not self.readonly:
                # The pack last written may hold disk blocks reserved past its end by a
                # writer that stopped (pack_writer.PackWriter._reserve): a truncate to
                # the same size gives them back. (Never to a larger size: that would
                # fill a damaged pack's missing tail with zeros and hide it from fsck.)
                os.truncate(path, want)
        self._lengths = dict(committed)
        self._next_id = max(committed, default=0) + 1
        return actions

    # -- writing --------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Bytes the disk under the packs can still take for block data: its free space
        less the reserve kept for index commits."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize - self.reserve_bytes(st)

    @staticmethod
    def reserve_bytes(st: os.statvfs_result) -> int:
        # Block data stops short of a full disk, so the LMDB commits that record what was
        # written (and the deletes that free space) always find room: like ZFS's slop space.
        return min(RESERVE_MAX, st.f_blocks * st.f_frsize * RESERVE_SHARE)

    def _check_space(self, n: int) -> None:
        self._free_estimate -= n
        now = time.monotonic()
        if self._free_estimate < SPACE_RECHECK or now - self._space_checked > 1.0:
            # Bytes still in the writer's stages are not on the disk yet, but will be.
            unwritten = self._writer.unwritten_bytes if self._writer is not None else 0
            self._free_estimate = self.free_bytes() - unwritten
            self._space_checked = now
        if self._free_estimate < n:
            raise OSError(errno.ENOSPC, "No space left on device (the store's disk is full)")

    def append(self, *parts: bytes) -> tuple[int, int]:
        """Append one record, given as its parts (header, payload); returns (pack id,
        offset). Thread-safe. Durable only after a sync that starts after it returns."""
        if self.readonly:
            raise StoreError("store is open read-only")
        size = sum(map(len, parts))
        with self._lock:
            self._check_space(size)
            writer = self._writer
            if writer is None or (
                writer.length > PACK_HEADER_LEN and writer.length + size > self.rotate_size
            ):
                writer = self._open_for_append()
            offset = writer.append(parts, size)
            self._lengths[self._write_id] = writer.length
            self._dirty.add(self._write_id)
            return self._write_id, offset

    def _open_for_append(self) -> PackWriter:
        # Continue the newest pack while it has room, else start a new one.
        newest = max(self._lengths, default=None)
        if (self._writer is None and newest is not None and newest not in self._sealed
                and self._lengths[newest] < self.rotate_size):
            self._writer = PackWriter(self.path(newest), self._lengths[newest], self.direct,
                                      self._stages)
            self._write_id = newest
            return self._writer
        self._close_writer()
        pack_id = self._next_id
        self._next_id += 1
        path = self.path(pack_id)
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs_to_sync.add(self.root)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        header = PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, pack_id)
        try:
            os.pwrite(fd, header, 0)
            self._writer = PackWriter(path, PACK_HEADER_LEN, self.direct, self._stages)
        except OSError:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._dirs_to_sync.add(path.parent)
        self._write_id = pack_id
        self._lengths[pack_id] = PACK_HEADER_LEN
        self._dirty.add(pack_id)
        return self._writer

    def _close_writer(self, keep_staged: bool = True) -> None:
        if self._writer is not None:
            self._writer.close(keep_staged)
            self._writer = None
            self._write_id = None

    def sync(self) -> dict[int, int]:
        """fsync every pack written since the last sync (and new directory entries).

        Returns {pack id: length} for those packs: the lengths to commit to the index,
        which must happen only after this returns.
        """
        plan = self.plan_sync()
        self.run_plan(plan)
        return self.record_synced(plan)

    @_locked
    def plan_sync(self) -> "SyncPlan":
        """Take what needs an fsync now; `run_plan` may then go to a worker thread
        while this thread goes on appending (those later appends wait for the next sync)."""
        written = None
        if self._writer is not None and self._write_id in self._dirty:
            written = functools.partial(self._writer.wait_written, self._writer.start_flush())
        plan = SyncPlan(
            files=[self.path(p) for p in sorted(self._dirty)],
            dirs=sorted(self._dirs_to_sync, key=lambda p: len(p.parts), reverse=True),
            lengths={p: self._lengths[p] for p in self._dirty if p in self._lengths},
            written=written,
        )
        self._dirty.clear()
        self._dirs_to_sync.clear()
        return plan

    def run_plan(self, plan: "SyncPlan") -> None:
        """Run a plan (in any thread). If it fails, its packs and directories wait for the
        next sync, so that no commit records their lengths before they are on the disk."""
        try:
            plan.run()
        except BaseException:
            with self._lock:
                self._dirty.update(p for p in plan.lengths if p in self._lengths)
                self._dirs_to_sync.update(plan.dirs)
            raise

    @_locked
    def record_synced(self, plan: "SyncPlan") -> dict[int, int]:
        lengths = {p: n for p, n in plan.lengths.items() if p not in self._retired}
        self._synced_unrecorded.update(lengths)
        return lengths

    @_locked
    def take_synced_lengths(self) -> dict[int, int]:
        """Lengths synced (possibly by an earlier `sync` in a worker thread) and not yet
        recorded in the index; the caller records them in the commit that follows."""
        out, self._synced_unrecorded = self._synced_unrecorded, {}
        return out

    @_locked
    def has_unsynced(self) -> bool:
        return bool(self._dirty or self._dirs_to_sync)

    @property
    def current_pack(self) -> int | None:
        return self._write_id

    def length(self, pack_id: int) -> int:
        return self._lengths.get(pack_id, 0)

    @_locked
    def seal(self, pack_id: int) -> None:
        """Append no more to this pack (compaction is about to empty it). Without this, a
        store reopened with no pack open for appending would continue its newest pack,
        and compacting that pack would move its live blocks into itself."""
        self._sealed.add(pack_id)
        if pack_id == self._write_id:
            self._close_writer()

    @_locked
    def retire(self, pack_id: int) -> None:
        """The index no longer references this pack: it needs no fsync, and its length
        must not be recorded again by the commit that drops it."""
        self.seal(pack_id)
        self._retired.add(pack_id)
        self._dirty.discard(pack_id)
        self._synced_unrecorded.pop(pack_id, None)

    @_locked
    def remove(self, pack_id: int) -> None:
        """Delete a pack whose blocks the committed index no longer references."""
        if pack_id == self._write_id:
            self._close_writer(keep_staged=False)
        with self._read_lock:
            fd = self._read_fds.pop(pack_id, None)
            if fd is not None:
                self._close_read_fd(fd)
        if self._maps is not None:
            self._maps.forget(pack_id)
        self._lengths.pop(pack_id, None)
        self._dirty.discard(pack_id)
        try:
            self.path(pack_id).unlink()
        except FileNotFoundError:
            pass
        self._dirs_to_sync.add(self.path(pack_id).parent)

    # -- reading --------------------------------------------------------------------

    def read(self, pack_id: int, offset: int, length: int) -> bytes:
        """Read bytes from a pack. Thread-safe; may return fewer bytes at the end of a file,
        and none if the pack is gone (compacted away since its location was looked up)."""
        staged = self._read_staged(pack_id, offset, length)
        if staged is not None:
            return staged
        with self._reading(pack_id) as fd:
            return b"" if fd is None else os.pread(fd, length, offset)

    def _read_staged(self, pack_id: int, offset: int, length: int) -> bytes | None:
        """The bytes from the writer's memory if some of them are not in the file yet."""
        if pack_id != self._write_id:  # a pack stops being written only once in its file
            return None
        with self._lock:
            if pack_id != self._write_id or self._writer is None:
                return None
            return self._writer.read_staged(offset, length)

    def read_cached(self, pack_id: int, offset: int, length: int) -> Cached | None:
        """All `length` bytes if the page cache holds them, else None (read_cached_many)."""
        return self.read_cached_many([(pack_id, offset, length)])[0]

    def read_cached_many(self, wanted: list[tuple[int, int, int]]) -> list[Cached | None]:
        """For each (pack, offset, length), all its bytes if the page cache holds them,
        else None, without ever waiting for the disk, so that the event loop may call it.
        Where packs can be mapped, the bytes are views of the mappings, read in place
        (pack_maps.py)."""
        out: list[Cached | None] = [None] * len(wanted)
        by_pack: dict[int, list[int]] = {}
        for i, (pack_id, offset, length) in enumerate(wanted):
            staged = self._read_staged(pack_id, offset, length)
            if staged is not None:
                out[i] = staged if len(staged) == length else None
            else:
                by_pack.setdefault(pack_id, []).append(i)
        for pack_id, idx in by_pack.items():
            views = self._mapped(pack_id, [wanted[i][1:] for i in idx])
            for n, i in enumerate(idx):
                out[i] = views[n] if views is not None else self._read_nowait(*wanted[i])
        return out

    def _mapped(self, pack_id: int, ranges: list[tuple[int, int]]) -> list | None:
        """Views of the cached ones among these records of a pack, or None if packs
        cannot be mapped here."""
        if self._maps is None:
            return None
        try:
            return self._maps.views_if_cached(pack_id, ranges)
        except (OSError, ValueError) as e:
            log.info("%s cannot map pack files (%s): cached records are copied",
                     self.root, e)
            self._maps = None
            return None

    def _read_nowait(self, pack_id: int, offset: int, length: int) -> bytearray | None:
        """A copy of the bytes if the page cache holds them (`preadv2(RWF_NOWAIT)`). A
        miss still starts the kernel's read-ahead, which the reader that then waits for
        the disk will find under way."""
        if not self._nowait_works:
            return None
        buf = bytearray(length)
        with self._reading(pack_id) as fd:
            if fd is None:
                return None
            try:
                n = os.preadv(fd, [buf], offset, RWF_NOWAIT)
            except BlockingIOError:
                return None
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                log.info("%s cannot read without waiting (%s): every read waits",
                         self.root, os.strerror(e.errno))
                self._nowait_works = False
                return None
        return buf if n == length else None

    @contextlib.contextmanager
    def _reading(self, pack_id: int) -> Iterator[int | None]:
        """A read descriptor of the pack (None if the pack is gone), kept open until the
        `with` block ends even if the pack is removed meanwhile."""
        with self._read_lock:
            fd = self._read_fds.get(pack_id)
            if fd is None:
                try:
                    fd = os.open(self.path(pack_id), os.O_RDONLY)
                except FileNotFoundError:
                    fd = None
                else:
                    self._read_fds[pack_id] = fd
            if fd is not None:
                self._reads_in_flight[fd] = self._reads_in_flight.get(fd, 0) + 1
        if fd is None:
            yield None
            return
        try:
            yield fd
        finally:
            with self._read_lock:
                left = self._reads_in_flight.pop(fd) - 1
                if left:
                    self._reads_in_flight[fd] = left
                elif fd in self._close_when_idle:
                    self._close_when_idle.discard(fd)
                    os.close(fd)

    def _close_read_fd(self, fd: int) -> None:
        """Close a read descriptor now or, if a read is using it, when that read ends.
        Call with `_read_lock` held."""
        if self._reads_in_flight.get(fd):
            self._close_when_idle.add(fd)
        else:
            os.close(fd)

    def forget_read_handles(self) -> None:
        if self._maps is not None:
            self._maps.forget_all()
        with self._read_lock:
            fds, self._read_fds = self._read_fds, {}
            for fd in fds.values():
                self._close_read_fd(fd)

    @_locked
    def close(self) -> None:
        self._close_writer()
        self.forget_read_handles()
