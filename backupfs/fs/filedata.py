"""File contents: dirty block buffers in front of the block store.

Writes land in per-inode buffers, one per block. A block whose last byte has been
written is *sealed* soon after, by background sealer tasks: hashed, compressed and stored
in worker threads, then entered in the namespace's block map. The write does not wait
for that (unless the sealers fall SEAL_AHEAD behind), so the kernel's next write arrives
while the last one is being compressed. Partial blocks are sealed on flush, fsync, release,
the periodic transaction group and before a snapshot. While a block is being sealed its
bytes stay readable from `sealing`, so a reader never sees a gap.

A stored block may be shorter than the block size (the last block of a file): bytes past
its end, up to the file size, read as zeros. All-zero blocks are stored as holes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import trio

from ..errors import CorruptBlock, MissingBlock
from ..store import Store
from .gate import ChangeGate
from .pieces import PIECE, between_pieces

log = logging.getLogger(__name__)

DEFAULT_DIRTY_LIMIT = 256 * 1024 * 1024
# Background sealing: blocks per put_many, and the full blocks a writer may queue ahead.
SEAL_BATCH = 32
SEAL_AHEAD = 64 * 1024 * 1024
# Gaps a late page of the writeback cache can leave (at most a large folio), and how
# many are remembered per file.
MAX_TORN_GAP = 2 * 1024 * 1024
MAX_GAPS = 64
# A truncate releases a big file's stored blocks this many at a time, serving other
# requests in between (pieces.py): each costs ~20 us here (1.96 s measured for 100,000),
# so a 100 GiB file's 819,200 blocks of 128 KiB would take ~16 s in one piece, every
# client waiting.
DROP_CHUNK = PIECE


@dataclass(eq=False)
class InodeBuffers:
    """The unsealed and being-sealed blocks of one inode."""

    ino: int
    # A block being written: a bytearray, or a read-only view of a write that covered it
    # whole (turned into a bytearray if a later write changes part of it).
    dirty: dict[int, bytearray | memoryview] = field(default_factory=dict)
    sealing: dict[int, bytes | memoryview] = field(default_factory=dict)
    # Bumped on every change to `dirty` or `sealing`: a read-modify-write that awaited
    # a stored block retries if the buffers moved under it.
    changes: int = 0
    # [start, end, write number]: byte ranges below the size that no write has filled,
    # opened by a write past the end (see `torn_ends`).
    gaps: list[list[int]] = field(default_factory=list)


class FileContents:
    def __init__(self, store: Store, namespace, is_open: Callable[[int], bool],
                 dirty_limit: int = DEFAULT_DIRTY_LIMIT):
        self.store = store
        self.ns = namespace
        # Whether a handle has the inode open: without one no WRITE can come for it, so
        # its buffers go once they hold nothing (see drop_if_idle).
        self.is_open = is_open
        self.block_size = store.config.block_size
        self.dirty_limit = dirty_limit
        self.buffers: dict[int, InodeBuffers] = {}
        self.dirty_bytes = 0
        self.writes = 0  # writes ever received: numbers the gaps they open
        self._zero_block = bytes(self.block_size)
        # Full blocks waiting for a background sealer (see run_sealers), in write order.
        self._full: dict[tuple[int, int], None] = {}
        self._sealers = 0
        self._work = trio.Event()  # set when _full gains blocks
        self._progress = trio.Event()  # set (and replaced) when a sealer finishes a batch
        # A truncate has a file to itself: writes to it wait (see truncate).
        self._truncating: dict[int, trio.Event] = {}  # ino -> set when its truncate ends
        self._writing: dict[int, int] = {}  # ino -> writes under way
        self._writes_ended = trio.Event()  # set (and replaced) when a file's last one ends
        # Entered by every truncate that releases stored blocks in chunks; a commit
        # closes it (TransactionGroups.hold_still), so none is ever committed half done.
        self.drop_gate = ChangeGate()

    # -- reading ---------------------------------------------------------------------

    async def read(self, ino: int, offset: int, size: int, view=None) -> bytes | memoryview:
        """Bytes [offset, offset+size) of a file, clipped to its size. A memoryview is
        valid only until the calling task next waits (BlockStore.get_run).

        `view` is a snapshot view; None reads the live file including unsealed writes.
        """
        live = view is None
        view = view or self.ns.live
        file_size = view.getattr(ino).size
        end = min(offset + size, file_size)
        if offset >= end:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        bufs = self.buffers.get(ino) if live else None
        chunks: list[bytes] = []
        stored: dict[int, bytes] = {}  # chunk index -> hash of a block to read
        for i, n in enumerate(range(first, last + 1)):
            buffered = self._buffered(bufs, n)
            if buffered is None:
                h = view.block_hash(ino, n)
                if h is not None:
                    stored[i] = h
            chunks.append(buffered or b"")
        if len(stored) == len(chunks):  # every block stored: perhaps a decoder's
            run = await self.store.blocks.get_run(list(stored.values()))
            if run is not None:
                return self._clip_run(run, offset - first * bs, end - first * bs)
        if stored:
            # One worker-thread round per request, not one per block.
            try:
                blocks = await self.store.blocks.get_many(list(stored.values()))
            except CorruptBlock as e:
                e.file_block = next((first + i for i, h in stored.items() if h == e.block_hash),
                                    None)
                raise
            for i, data in zip(stored, blocks):
                chunks[i] = data
        pieces = []
        for i, n in enumerate(range(first, last + 1)):
            start = n * bs
            lo, hi = max(offset, start) - start, min(end, start + bs) - start
            piece = memoryview(chunks[i])[lo:hi]
            pieces.append(piece)
            if len(piece) < hi - lo:  # a hole, or a block that ends before the file does
                pieces.append(bytes(hi - lo - len(piece)))
        return pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)

    @staticmethod
    def _clip_run(run: memoryview, lo: int, hi: int) -> memoryview | bytes:
        """Bytes [lo, hi) of blocks' plaintexts end to end, where zeros follow a last
        block that ends before the file does."""
        if len(run) >= hi:
            return run[lo:hi]
        return bytes(run[lo:]) + bytes(hi - max(lo, len(run)))

    @staticmethod
    def _buffered(bufs: InodeBuffers | None, n: int) -> bytes | None:
        """Block n as written but not yet stored, if it is."""
        if bufs is None:
            return None
        buf = bufs.dirty.get(n)
        if isinstance(buf, bytearray):
            return bytes(buf)  # a copy: the reply must not change if a write comes
        if buf is not None:
            return buf
        return bufs.sealing.get(n)

    async def _block_content(self, view, ino: int, n: int, bufs: InodeBuffers | None) -> bytes:
        buffered = self._buffered(bufs, n)
        if buffered is not None:
            return buffered
        h = view.block_hash(ino, n)
        if h is None:
            return b""
        try:
            return await self.store.blocks.get_async(h)
        except CorruptBlock as e:
            e.file_block = n
            raise

    # -- writing ---------------------------------------------------------------------

    def _bufs(self, ino: int) -> InodeBuffers:
        b = self.buffers.get(ino)
        if b is None:
            b = self.buffers[ino] = InodeBuffers(ino)
        return b

    async def _dirty_block(self, bufs: InodeBuffers, n: int, file_size: int) -> bytearray:
        """The dirty buffer of block n, created from its current content if needed."""
        while True:
            buf = bufs.dirty.get(n)
            if isinstance(buf, bytearray):
                return buf
            if buf is not None:
                # A whole block kept as it was written: copied once something changes it.
                buf = bufs.dirty[n] = bytearray(buf)
                return buf
            if n * self.block_size >= file_size:
                content = b""  # nothing of the old block shows
            elif n in bufs.sealing:
                content = bufs.sealing[n]
            else:
                seen = bufs.changes
                content = await self._block_content(self.ns.live, bufs.ino, n, None)
                if bufs.changes != seen or n in bufs.dirty:
                    continue  # the block moved while we read it: start over
                file_size = self.ns.live.getattr(bufs.ino).size
            start = n * self.block_size
            buf = bytearray(content[:max(0, file_size - start)])
            bufs.dirty[n] = buf
            bufs.changes += 1
            self.dirty_bytes += self.block_size
            return buf

    async def write(self, ino: int, offset: int, data: bytes, now_ns: int | None) -> int:
        """Write into the buffers; `now_ns` None leaves mtime/ctime alone (with the
        kernel's writeback cache the kernel keeps them and sends them in a setattr)."""
        if not data:
            return 0  # no bytes, no other effect either (not even on the size)
        await self._truncate_ended(ino)
        self._writing[ino] = self._writing.get(ino, 0) + 1
        try:
            return await self._write(ino, offset, data, now_ns)
        finally:
            self._writing[ino] -= 1
            if not self._writing[ino]:
                del self._writing[ino]
                self._writes_ended.set()
                self._writes_ended = trio.Event()

    async def _write(self, ino: int, offset: int, data: bytes, now_ns: int | None) -> int:
        if self.store.packs.free_bytes() < self.dirty_bytes + len(data):
            # Near a full disk, refuse a write we may not be able to store (as ext4
            # reserves blocks at write time), rather than buffer it and fail only at the
            # next fsync. Sealing what is buffered first tells how much really fits.
            await self.flush_all()
            if self.store.packs.free_bytes() < len(data):
                raise OSError(errno.ENOSPC, "No space left on device (the store's disk)")
        bs = self.block_size
        bufs = self._bufs(ino)
        end = offset + len(data)
        if not isinstance(data, bytes):
            data = bytes(data)  # whole blocks are kept as views of it: it must not change
        view = memoryview(data)
        full = []
        self.writes += 1
        number = self.writes
        for n in range(offset // bs, (end - 1) // bs + 1):
            start = n * bs
            lo, hi = max(offset, start) - start, min(end, start + bs) - start
            if lo == 0 and hi == bs:
                self._keep_whole_block(bufs, n, view[start - offset:start - offset + bs])
                full.append(n)
                continue
            # A partial block is filled from the file's bytes, up to its size (read
            # afresh: an earlier block's read may have awaited while a truncate ran).
            size = self.ns.live.getattr(ino).size
            buf = await self._dirty_block(bufs, n, size)
            if len(buf) < lo:
                buf.extend(bytes(lo - len(buf)))
            buf[lo:hi] = view[start + lo - offset:start + hi - offset]
            if hi == bs:
                full.append(n)
        attr = self.ns.live.getattr(ino)
        # Only now, with no await between this and the size update below: a gap that a
        # concurrent write opened while this one waited for a stored block is one this
        # write may fill (gaps checked on arrival once stayed open for good that way).
        self._track_gaps(bufs, offset, end, attr.size, number)
        if now_ns is None:
            if end > attr.size:
                self.ns.live.setattr(ino, size=end)
        else:
            self.ns.live.setattr(ino, size=max(attr.size, end), mtime_ns=now_ns,
                                 ctime_ns=now_ns)
        if full:
            await self._queue_full(ino, full)
        if self.dirty_bytes > self.dirty_limit:
            # Backpressure: seal everything in one batch. (Sealing only this inode would,
            # with many small files, seal one file per write from here on.)
            await self.flush_all()
        return len(data)

    def _keep_whole_block(self, bufs: InodeBuffers, n: int, data: memoryview) -> None:
        """Buffer a block a write covers whole as a view of the write's own bytes (pyfuse3
        hands each WRITE over as a new bytes object), not a copy: a sequential write
        then copies nothing in this thread (1 GiB through the mount: 257-299 MB/s
        against 235-266 with two copies, docs/performance.md)."""
        if n not in bufs.dirty:
            self.dirty_bytes += self.block_size
        bufs.dirty[n] = data
        bufs.changes += 1

    async def _queue_full(self, ino: int, blocknos: list[int]) -> None:
        """Have full blocks sealed: by the background sealers when they run (the write
        answers at once and the kernel sends the next), else right here."""
        if not self._sealers:
            await self.seal(ino, blocknos)
            return
        self._full.update(dict.fromkeys((ino, n) for n in blocknos))
        self._work.set()
        # Backpressure: a writer faster than the sealers waits for them.
        while self._sealers and self._queued_bytes() > SEAL_AHEAD:
            await self._progress.wait()

    def _queued_bytes(self) -> int:
        """Full blocks waiting for a sealer, in bytes."""
        return len(self._full) * self.block_size

    async def run_sealers(self, count: int = 2) -> None:
        """Seal full blocks in the background until cancelled, in batches of SEAL_BATCH,
        `count` batches at a time (while one batch's block maps are written in this
        thread, another keeps the worker threads compressing)."""
        async def sealer() -> None:
            while True:
                if not self._full:
                    if self._work.is_set():
                        self._work = trio.Event()
                    await self._work.wait()
                    continue
                # Half the allowance queued: writes come faster than the sealers store.
                hurry = self._queued_bytes() >= SEAL_AHEAD // 2
                batch = []
                while self._full and len(batch) < SEAL_BATCH:
                    key = next(iter(self._full))
                    del self._full[key]
                    batch.append(key)
                try:
                    await self.seal_many(batch, hurry=hurry)
                except Exception as e:
                    # The blocks are dirty again; fsync or the next transaction group
                    # retries and reports. A full disk is expected, anything else is a
                    # bug, but neither may end the sealers: they run beside pyfuse3's
                    # loop, and an escaping error would take the mount down.
                    log.log(logging.WARNING if isinstance(e, OSError) else logging.ERROR,
                            "sealing written blocks failed: %s", e,
                            exc_info=not isinstance(e, OSError))
                    await trio.sleep(1)  # no busy retry
                finally:
                    self._progress.set()
                    self._progress = trio.Event()

        self._sealers += 1
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(sealer)
        finally:
            self._sealers -= 1
            self._progress.set()  # no writer waits on sealers that are gone

    def _track_gaps(self, bufs: InodeBuffers, offset: int, end: int, size: int,
                    number: int) -> None:
        """Note the gap write `number` opens past the end (`size`), and close what it
        fills of earlier gaps."""
        if offset > size and offset - size <= MAX_TORN_GAP:
            bufs.gaps.append([size, offset, number])
            del bufs.gaps[:-MAX_GAPS]
        if bufs.gaps and end > offset:
            left = []
            for a, b, k in bufs.gaps:
                if end <= a or offset >= b:
                    left.append([a, b, k])
                    continue
                if a < offset:
                    left.append([a, offset, k])
                if end < b:
                    left.append([end, b, k])
            bufs.gaps = left

    def inodes_with_gaps(self) -> list[int]:
        """The files with a gap open (see `torn_ends`)."""
        return [ino for ino, bufs in self.buffers.items() if bufs.gaps]

    def torn_ends(self, since: int) -> dict[int, int]:
        """For a snapshot: where each file's gap-free part ends, for the files that have a
        gap opened by write number `since` or later.

        With the kernel's writeback cache, appended pages can reach us out of order: the
        page after a re-dirtied one may arrive first, leaving a gap of zeros that the late
        page fills a moment later. A snapshot taken in that moment would hold later data
        behind a hole, so it ends such a file where the gap begins. Gaps opened before
        `since` outlived the kernel writing back every dirty page of their file (see
        BackupFS.pull_dirty_pages): they are holes meant to be, and are forgotten."""
        out = {}
        for ino, bufs in self.buffers.items():
            if bufs.gaps:
                bufs.gaps = [g for g in bufs.gaps if g[2] >= since]
                if bufs.gaps:
                    out[ino] = min(a for a, _, _ in bufs.gaps)
        return out

    def stored_ends(self) -> dict[int, int]:
        """{ino: where its stored bytes end}, for each file whose size runs past them:
        its last bytes are buffered (new bytes a full disk would not take) with no
        stored version under them. An overwritten block still has its old one."""
        bs = self.block_size
        live = self.ns.live
        out = {}
        for ino, bufs in self.buffers.items():
            unstored = bufs.dirty.keys() | bufs.sealing.keys()
            if not unstored:
                continue
            try:
                size = live.getattr(ino).size
            except OSError:
                continue  # reclaimed
            n = (size - 1) // bs
            while n >= 0 and n in unstored and live.block_hash(ino, n) is None:
                n -= 1
            # The last block with a stored version may be an old, shorter one (a write
            # appended to it).
            end = 0 if n < 0 else n * bs + self._stored_len(live.block_hash(ino, n))
            if end < size:
                out[ino] = end
        return out

    def _stored_len(self, h: bytes | None) -> int:
        """Bytes a block map entry holds: a hole (or a block gone missing) is a whole
        block of zeros."""
        if h is None:
            return self.block_size
        try:
            return self.store.blocks.locate(h).raw_len
        except MissingBlock:
            return self.block_size

    def cut_sizes(self, ends: dict[int, int]) -> dict[int, int]:
        """Record each file's size as at most ends[ino], keeping its blocks (growing it
        back shows the same bytes); returns the sizes it replaced."""
        replaced = {}
        for ino, end in ends.items():
            size = self.ns.live.getattr(ino).size
            if end < size:
                self.ns.live.set_size_keeping_blocks(ino, end)
                replaced[ino] = size
        return replaced

    @contextlib.contextmanager
    def sizes_cut_to(self, ends: dict[int, int]) -> Iterator[dict[int, int]]:
        """Within: the sizes cut as `cut_sizes` does (for a commit or a snapshot to
        record); after it, the sizes are back. Yields the sizes replaced."""
        replaced = self.cut_sizes(ends)
        try:
            yield replaced
        finally:
            for ino, size in replaced.items():
                self.ns.live.set_size_keeping_blocks(ino, size)

    def sizes_as_stored(self):
        """For a commit made when buffered bytes could not be stored (a full disk): it
        never records a size past a file's stored data; the bytes are retried after."""
        return self.sizes_cut_to(self.stored_ends())

    def _is_zero(self, data: bytes | memoryview) -> bool:
        # A compare with a zero block runs at memcmp speed; bytes.count(0) is a loop, and
        # so is comparing a memoryview: a view is checked on its first bytes first.
        if not isinstance(data, bytes):
            if bytes(data[:64]) != self._zero_block[:min(64, len(data))]:
                return False
            data = bytes(data)
        if len(data) == self.block_size:
            return data == self._zero_block
        return data == bytes(len(data))

    async def seal(self, ino: int, blocknos) -> None:
        """Store the given dirty blocks of one inode and enter them in the block map."""
        await self.seal_many([(ino, n) for n in blocknos])

    async def seal_many(self, wanted, hurry: bool = False) -> None:
        """Store the given (ino, block no) dirty blocks, of any number of inodes, in one
        batch (one round of worker threads for all of them), and enter them in the
        block map. `hurry`: see BlockStore.put_many."""
        items = []
        for ino, n in sorted(wanted):
            bufs = self.buffers.get(ino)
            buf = None if bufs is None else bufs.dirty.pop(n, None)
            if buf is None:
                continue
            self.dirty_bytes -= self.block_size
            data = bytes(buf) if isinstance(buf, bytearray) else buf
            bufs.sealing[n] = data
            bufs.changes += 1
            items.append((bufs, n, data))
        if not items:
            return
        # All-zero blocks become holes: nothing stored, nothing to read back.
        holes = [self._is_zero(d) for _, _, d in items]
        to_store = [d for (_, _, d), hole in zip(items, holes) if not hole]
        try:
            hashes = iter(await self.store.blocks.put_many(to_store, hurry=hurry)
                          if to_store else [])
        except BaseException:
            # Not stored (say ENOSPC): the bytes go back to being dirty, never lost.
            for bufs, n, data in items:
                if bufs.sealing.get(n) is data:
                    del bufs.sealing[n]
                    if n not in bufs.dirty:
                        bufs.dirty[n] = data
                        self.dirty_bytes += self.block_size
                    bufs.changes += 1
            raise
        sizes: dict[int, int] = {}
        mapped: dict[int, list[tuple[int, bytes | None]]] = {}  # by inode: (block no, hash)
        for (bufs, n, data), hole in zip(items, holes):
            h = None if hole else next(hashes)
            size = sizes.get(bufs.ino)
            if size is None:
                try:
                    size = self.ns.live.getattr(bufs.ino).size
                except OSError:
                    size = -1  # reclaimed meanwhile: drop everything
                sizes[bufs.ino] = size
            current = bufs.sealing.get(n) is data
            if current and n * self.block_size < size:
                mapped.setdefault(bufs.ino, []).append((n, h))
            elif h is not None:
                # Superseded by a later write or cut off by a truncate while we sealed.
                self.store.blocks.decref(h)
            if current:
                del bufs.sealing[n]
                bufs.changes += 1
        for ino, blocks in mapped.items():
            self.ns.live.write_blocks(ino, blocks)
        for ino in {bufs.ino for bufs, _, _ in items}:
            self.drop_if_idle(ino)

    async def truncate(self, ino: int, new_size: int) -> None:
        """Cut a file's contents at `new_size`: its buffered bytes and stored blocks past
        it, and the bytes past it in the block that now holds its end. The caller then
        sets the size (and times).

        A file's truncates run one at a time and never beside a write to it, because
        the stored blocks of a big file are released in chunks (DROP_CHUNK), serving
        other requests between them: a write let in meanwhile could have a block it
        stored released, or show a block not yet released past the old end."""
        await self._truncate_ended(ino)
        done = self._truncating[ino] = trio.Event()
        try:
            while self._writing.get(ino):
                await self._writes_ended.wait()
            await self._truncate_buffers(ino, new_size)
            await self._drop_stored_past(ino, new_size)
        finally:
            del self._truncating[ino]
            done.set()
            self.drop_if_idle(ino)

    async def _truncate_ended(self, ino: int) -> None:
        """Return once no truncate of the file is under way."""
        while ino in self._truncating:
            await self._truncating[ino].wait()

    async def _drop_stored_past(self, ino: int, new_size: int) -> None:
        """Release the stored blocks past `new_size`, a chunk at a time. Readers see the
        new size at once (and so never the blocks still to go); a commit waits for the
        last chunk (drop_gate), so a crash keeps the old file or the new, never a mix."""
        live = self.ns.live
        first = -(-new_size // self.block_size)
        if new_size >= live.getattr(ino).size:
            return
        if next(live.block_range(ino, first), None) is None:
            return  # nothing stored past the new end
        async with self.drop_gate.changing():
            # Shielded: once begun it ends, or a block past the end would stay stored
            # and show again if the file grew back (an unmount waits for it).
            with trio.CancelScope(shield=True):
                live.set_size_keeping_blocks(ino, new_size)
                try:
                    while live.drop_blocks_from(ino, first, DROP_CHUNK) == DROP_CHUNK:
                        await between_pieces()
                except OSError:
                    pass  # unlinked and reclaimed meanwhile: its garbage collection ends it

    async def _truncate_buffers(self, ino: int, new_size: int) -> None:
        """Drop buffered bytes past `new_size`, and make sure the block that now holds
        the end of the file keeps no bytes beyond it."""
        bs = self.block_size
        bufs = self._bufs(ino)
        bufs.gaps = [[a, min(b, new_size), k] for a, b, k in bufs.gaps if a < new_size]
        keep_block, tail = divmod(new_size, bs)
        old_size = self.ns.live.getattr(ino).size
        if tail and new_size < old_size:
            # Read-modify-write of the new last block (may await a stored block).
            buf = await self._dirty_block(bufs, keep_block, old_size)
            del buf[tail:]
        cut = keep_block + (1 if tail else 0)
        for n in [n for n in bufs.dirty if n >= cut]:
            del bufs.dirty[n]
            self.dirty_bytes -= bs
        for n in [n for n in bufs.sealing if n >= cut]:
            del bufs.sealing[n]
        bufs.changes += 1

    # -- flushing --------------------------------------------------------------------

    def pending_blocks(self, ino: int) -> int:
        """Blocks of an inode written but not yet in the block map (an upper bound:
        some may replace stored blocks, some may turn out to be holes)."""
        bufs = self.buffers.get(ino)
        if bufs is None:
            return 0
        return len(bufs.dirty.keys() | bufs.sealing.keys())

    def has_dirty(self, ino: int) -> bool:
        bufs = self.buffers.get(ino)
        return bool(bufs and (bufs.dirty or bufs.sealing))

    async def flush(self, ino: int) -> None:
        """Seal every dirty block of one inode and wait for seals already under way."""
        bufs = self.buffers.get(ino)
        while bufs is not None and (bufs.dirty or bufs.sealing):
            if bufs.dirty:
                await self.seal(ino, list(bufs.dirty))
            else:
                await trio.sleep(0.001)  # another task is sealing: let it finish
            bufs = self.buffers.get(ino)

    async def flush_all(self) -> None:
        """Seal every dirty block of every inode, in one batch, and wait for seals
        already under way."""
        wanted = [(ino, n) for ino, bufs in self.buffers.items() for n in bufs.dirty]
        if wanted:
            await self.seal_many(wanted)
        for ino in list(self.buffers):
            await self.flush(ino)

    def discard(self, ino: int) -> None:
        """Forget the buffers of an inode that is being reclaimed."""
        bufs = self.buffers.pop(ino, None)
        if bufs is not None:
            self.dirty_bytes -= self.block_size * len(bufs.dirty)

    def drop_if_idle(self, ino: int) -> None:
        """Forget an inode's buffers once they hold nothing and nothing can add to
        them: called when its last handle closes, its blocks are stored or its truncate
        ends. Never while open, nor during a truncate: a write or a truncate awaiting a
        stored block holds on to them. (Closed, a file has no pages left in the kernel
        to write back, so the gaps they record are holes meant to be.)"""
        bufs = self.buffers.get(ino)
        if (bufs is not None and not bufs.dirty and not bufs.sealing
                and ino not in self._truncating and not self.is_open(ino)):
            del self.buffers[ino]
