"""`BlockStore`: put, get and reference-count content-addressed blocks.

A block is named by the BLAKE3 hash of its plaintext and stored once, however many
files and snapshots use it. Every reference is counted explicitly: `put` adds one,
`incref`/`decref` move it; a block at zero is dead space in its pack until `compact`.
Reads always re-hash: `get` returns the exact bytes that were put, or raises CorruptBlock.
"""

from __future__ import annotations

import logging
import struct
import threading
from functools import partial
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, TypeVar

import trio

from ..errors import CorruptBlock, MissingBlock
from . import codec, compaction
from .codec import RECORD_HEADER_LEN, EncodedBlock
from .compaction import CompactResult
from .decode_pool import DecodePool
from .config import Compression

if TYPE_CHECKING:
    from .packs import Cached
    from .store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")

# blocks db: hash -> pack id u32, offset u64, stored length u32, raw length u32, codec u8, refcount u64
BLOCK_VALUE = struct.Struct(">IQIIBQ")
# dead db: pack id u32 + hash -> b"" (blocks at refcount zero, by pack, for compaction)
DEAD_KEY = struct.Struct(">I32s")

# The blocks of one call whose records the page cache holds are checked in the event
# loop's thread, up to this many bytes in all (one READ's worth): on this 2-core VM a hop
# to a worker thread and back costs more than checking them there. Measured: a small
# file's READ took ~850 us with the hop, ~300 us without; a cold 1 GiB `dd` read ran at
# 352-425 MB/s against 223-355, on a third less daemon CPU (docs/performance.md).
INLINE_READ_MAX = 1024 * 1024
# put_many hashes a batch of up to this many bytes in the event loop's thread too: BLAKE3
# runs at ~3.4 GB/s here, so about a millisecond, less than the hops to two workers and
# back. A 1 GiB dd through the mount, interleaved: 215-245 MB/s against 194-233; the
# same GiB again (all deduplicated): 321-466 against 316-418, with 25-35% less CPU.
INLINE_HASH_MAX = 4 * 1024 * 1024

# Worker threads for hashing, compression and verified reads: one per core is all that helps.
_cpu_limiter: trio.CapacityLimiter | None = None


def cpu_limiter() -> trio.CapacityLimiter:
    global _cpu_limiter
    if _cpu_limiter is None:
        import os

        _cpu_limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
    return _cpu_limiter


async def _in_threads(work: Callable[[T], None], items: Sequence[T]) -> None:
    """Call `work(item)` for every item, in as many worker threads as there are cores.

    The threads take the next item as they finish one, so a share of slow items (text to
    compress) does not leave a thread idle beside a share of fast ones (random bytes).
    An exception from `work` (say CorruptBlock) stops the others at their next item and
    reaches the caller as itself, not wrapped in the nursery's ExceptionGroup."""
    limiter = cpu_limiter()
    n = min(len(items), max(1, int(limiter.total_tokens)))
    pending = iter(items)
    take = threading.Lock()
    errors: list[Exception] = []

    def worker() -> None:
        while not errors:
            with take:
                item = next(pending, _DONE)
            if item is _DONE:
                return
            try:
                work(item)
            except Exception as e:
                errors.append(e)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(partial(trio.to_thread.run_sync, worker, limiter=limiter))
    if errors:
        raise errors[0]


_DONE = object()


@dataclass(frozen=True, slots=True)
class BlockLocation:
    hash: bytes
    pack_id: int
    offset: int
    stored_len: int
    raw_len: int
    codec: int
    refcount: int

    @property
    def record_len(self) -> int:
        return RECORD_HEADER_LEN + self.stored_len

    def value(self) -> bytes:
        return BLOCK_VALUE.pack(self.pack_id, self.offset, self.stored_len, self.raw_len,
                                self.codec, self.refcount)

    @classmethod
    def from_value(cls, h: bytes, v: bytes) -> "BlockLocation":
        return cls(h, *BLOCK_VALUE.unpack(v))


class BlockStore:
    def __init__(self, store: "Store"):
        self.store = store
        self.packs = store.packs
        self.compression = store.config.compression
        # Stores of format version 2 write records that a read checks by XXH3-128.
        self.checked_records = store.config.checked_records
        self.db = store.open_db("blocks")
        self.dead_db = store.open_db("dead")
        self.checksum_errors = 0
        self._storing: dict[bytes, trio.Event] = {}  # hash -> set when its put_many ends
        self.decoders: DecodePool | None = None  # for get_run (use_decoders)

    # -- lookups ---------------------------------------------------------------------

    def locate(self, h: bytes) -> BlockLocation:
        loc = self.location_or_none(h)
        if loc is None:
            raise MissingBlock(h)
        return loc

    def location_or_none(self, h: bytes) -> BlockLocation | None:
        v = self.store.txn.get(h, db=self.db)
        return None if v is None else BlockLocation.from_value(h, v)

    def refcount(self, h: bytes) -> int:
        v = self.store.txn.get(h, db=self.db)
        return BLOCK_VALUE.unpack(v)[5] if v else 0

    def __contains__(self, h: bytes) -> bool:
        return self.refcount(h) > 0

    def iter_locations(self) -> Iterator[BlockLocation]:
        for k, v in self.store.txn.cursor(db=self.db):
            yield BlockLocation.from_value(bytes(k), bytes(v))

    # -- writing ---------------------------------------------------------------------

    def put(self, data: bytes) -> bytes:
        """Store one block (or count one more reference to it); returns its hash."""
        h = codec.block_hash(data)
        if not self._incref_existing(h):
            self._append_new(self._encode(data, self.compression, h))
        return h

    def _encode(self, data: bytes, compression: Compression, h: bytes) -> EncodedBlock:
        return codec.encode(data, compression, h, checked=self.checked_records)

    def _append_new(self, block: EncodedBlock, refcount: int = 1) -> None:
        self._index_new(block, *self.packs.append(*block.record_parts()), refcount=refcount)

    def _index_new(self, block: EncodedBlock, pack_id: int, offset: int,
                   refcount: int = 1) -> BlockLocation:
        loc = BlockLocation(block.hash, pack_id, offset, block.stored_len, block.raw_len,
                            block.codec, refcount)
        self.store.txn.put(block.hash, loc.value(), db=self.db)
        return loc

    async def put_many(self, blocks: Sequence[bytes], hurry: bool = False) -> list[bytes]:
        """Store many blocks, hashing, compressing and appending them in worker threads;
        returns their hashes, each counted once more per time it is given.

        Blocks already in the store are only counted again and never compressed: a
        nightly copy of an unchanged tree costs one hash per block. All or nothing: if
        it raises (a full disk), the caller owns no new references. `hurry`: writes are
        coming in faster than the store's compression keeps up; new blocks are
        compressed at its faster level (Compression.hurried).
        """
        hashes = await self._hash_all(blocks)
        data_of = dict(zip(hashes, blocks))
        wanted = Counter(hashes)  # references still to count, by block
        new = {h: d for h, d in data_of.items()
               if self.store.txn.get(h, db=self.db) is None and h not in self._storing}
        # Blocks another put_many is compressing right now: counted once it has indexed
        # them, rather than stored twice.
        elsewhere = {self._storing[h] for h in data_of if h in self._storing}
        done = trio.Event()
        self._storing.update(dict.fromkeys(new, done))
        owned: list[tuple[bytes, int]] = []  # references counted so far, undone on failure
        try:
            try:
                compression = self.compression.hurried() if hurry else self.compression
                placed = await self._store_new(new, compression)
                for h, (block, pack_id, offset) in placed.items():
                    self._index_new(block, pack_id, offset, refcount=wanted[h])
                    owned.append((h, wanted.pop(h)))
            finally:
                for h in new:
                    del self._storing[h]
                done.set()
            for event in elsewhere:
                await event.wait()
            for h, n in wanted.items():
                if not self._incref_existing(h, n):
                    # Compaction dropped it while we were hashing, or the put_many that
                    # was storing it failed: store it here after all.
                    self._append_new(self._encode(data_of[h], self.compression, h), n)
                owned.append((h, n))
        except BaseException:
            for h, n in owned:
                self.decref(h, n)
            raise
        return hashes

    @staticmethod
    async def _hash_all(blocks: Sequence[bytes]) -> list[bytes]:
        """The blocks' hashes: here if they are few bytes in all, else in worker threads."""
        if sum(map(len, blocks)) <= INLINE_HASH_MAX:
            return [codec.block_hash(b) for b in blocks]
        hashes: list[bytes] = [b""] * len(blocks)

        def hash_one(i: int) -> None:
            hashes[i] = codec.block_hash(blocks[i])

        await _in_threads(hash_one, range(len(blocks)))
        return hashes

    async def _store_new(self, new: dict[bytes, bytes],
                         compression: Compression) -> dict[bytes, tuple]:
        """Compress and append blocks that are in no pack yet; {hash: (block, pack id,
        offset)}. Each worker appends what it compressed (appends take a lock), so the
        disk writes of one block overlap the compression of the next; the index, which
        only the trio thread may touch, learns the locations afterwards."""
        placed: dict[bytes, tuple[EncodedBlock, int, int]] = {}

        def store_one(item: tuple[bytes, bytes]) -> None:
            h, data = item
            block = self._encode(data, compression, h)
            placed[h] = (block, *self.packs.append(*block.record_parts()))

        try:
            await _in_threads(store_one, list(new.items()))
        except BaseException:
            # The records that did get appended are dead space, counted as such.
            for block, pack_id, offset in placed.values():
                self._mark_dead(self._index_new(block, pack_id, offset, refcount=0))
            raise
        return placed

    def incref(self, h: bytes, n: int = 1) -> None:
        loc = self.locate(h)
        if loc.refcount == 0:
            self._revive(loc)
        self._set_refcount(loc, loc.refcount + n)

    def decref(self, h: bytes, n: int = 1) -> None:
        loc = self.locate(h)
        if loc.refcount < n:
            raise ValueError(f"refcount of {h.hex()} would go below zero")
        new = loc.refcount - n
        self._set_refcount(loc, new)
        if new == 0:
            self._mark_dead(loc)

    def set_refcount(self, loc: BlockLocation, refcount: int) -> None:
        """Set a block's refcount outright, keeping the dead index right (fsck's repair)."""
        self._set_refcount(loc, refcount)
        if loc.refcount == 0 and refcount:
            self._revive(loc)
        elif refcount == 0 and loc.refcount:
            self._mark_dead(loc)

    def in_dead_index(self, loc: BlockLocation) -> bool:
        return self.store.txn.get(DEAD_KEY.pack(loc.pack_id, loc.hash), db=self.dead_db) is not None

    def add_to_dead_index(self, loc: BlockLocation) -> None:
        """List a block at refcount 0 for compaction (fsck's repair of a lost entry)."""
        self.store.txn.put(DEAD_KEY.pack(loc.pack_id, loc.hash), b"", db=self.dead_db)

    def _mark_dead(self, loc: BlockLocation) -> None:
        self.add_to_dead_index(loc)
        self.store.add_dead_bytes(loc.pack_id, loc.record_len)

    def _set_refcount(self, loc: BlockLocation, refcount: int) -> None:
        v = BLOCK_VALUE.pack(loc.pack_id, loc.offset, loc.stored_len, loc.raw_len, loc.codec,
                             refcount)
        self.store.txn.put(loc.hash, v, db=self.db)

    def _incref_existing(self, h: bytes, n: int = 1) -> bool:
        if self.store.txn.get(h, db=self.db) is None:
            return False
        self.incref(h, n)
        return True

    def _revive(self, loc: BlockLocation) -> None:
        self.store.txn.delete(DEAD_KEY.pack(loc.pack_id, loc.hash), db=self.dead_db)
        self.store.add_dead_bytes(loc.pack_id, -loc.record_len)

    # -- reading ---------------------------------------------------------------------

    def read_verified(self, loc: BlockLocation, full: bool = False) -> bytes:
        """Read and verify one block at a known location. Thread-safe (no LMDB access).
        `full`: check its BLAKE3 address as well as the record's checksum (verify)."""
        try:
            return self._read_checked(loc, full)
        except CorruptBlock as e:
            self._report(e)
            raise

    def _read_checked(self, loc: BlockLocation, full: bool = False) -> bytes:
        return self._read_record(loc, full)[1]

    def read_record(self, loc: BlockLocation) -> tuple[bytes, bytes]:
        """(record, plaintext) of a block, checked in full (its BLAKE3 address too), to
        copy the record elsewhere as it is."""
        return self._read_record(loc, full=True)

    def _read_record(self, loc: BlockLocation, full: bool) -> tuple[bytes, bytes]:
        record = self.packs.read(loc.pack_id, loc.offset, loc.record_len)
        if not record and not self.packs.path(loc.pack_id).exists():
            raise CorruptBlock(loc.hash, loc.pack_id, loc.offset, "pack file is missing")
        return record, codec.decode_record(record, loc.hash, loc.pack_id, loc.offset, full)

    def _read_here_if_cached(self, locs: Sequence[BlockLocation]) -> list[bytes | None]:
        """The blocks read and checked in the calling (event loop) thread where the page
        cache holds their records; None for the others, which the caller reads in a
        worker thread."""
        records = self.packs.read_cached_many(
            [(loc.pack_id, loc.offset, loc.record_len) for loc in locs])
        return [None if record is None else self._check_here(loc, record)
                for loc, record in zip(locs, records)]

    def _check_here(self, loc: BlockLocation, record: Cached) -> bytes:
        try:
            return codec.decode_record(record, loc.hash, loc.pack_id, loc.offset)
        except CorruptBlock as e:
            return self._reread_if_moved(loc, e)

    def _report(self, e: CorruptBlock) -> None:
        self.checksum_errors += 1
        log.error("%s (pack file %s)", e, self.packs.path(e.pack_id))

    def _reread_if_moved(self, loc: BlockLocation, e: CorruptBlock) -> bytes:
        """After a failed read in a worker thread (main thread): compaction may have
        moved the block and deleted its pack meanwhile. Read it where it is now; if it
        has not moved, the damage is real."""
        now = self.locate(loc.hash)
        if (now.pack_id, now.offset) == (loc.pack_id, loc.offset):
            self._report(e)
            raise e
        return self.read_verified(now)

    def get(self, h: bytes) -> bytes:
        """The verified plaintext of a block; CorruptBlock rather than wrong bytes."""
        return self.read_verified(self.locate(h))

    async def get_async(self, h: bytes) -> bytes:
        """`get` without blocking the event loop: the reading and checking happen in a
        worker thread, unless the block's record is in the page cache (see get_many)."""
        return (await self.get_many([h]))[0]

    def use_decoders(self, processes: int) -> None:
        """Start `processes` decoder processes (decode_pool.py) for get_run. A mount
        starts them at once, not at its first read: a decoder takes ~0.1 s of CPU to
        start, which a first read would otherwise wait for while it competes for CPU."""
        self.stop_decoders()
        if processes:
            try:
                self.decoders = DecodePool(self.packs.root, processes, self.store.config.block_size)
            except OSError as e:
                log.warning("cannot start decoder processes (%s): blocks are read in the "
                            "daemon", e)

    def stop_decoders(self) -> None:
        if self.decoders is not None:
            self.decoders, pool = None, self.decoders
            pool.close()

    async def get_run(self, hashes: Sequence[bytes]) -> memoryview | None:
        """Blocks' plaintexts end to end, read and verified by a decoder process, where
        every block but the last is a whole block; None where that is not so, or no
        decoder is idle, or a record is in the pack being written (its bytes may still be
        in this process's memory), or the decoder met any failure: get_many then reads
        them here, and reports what is corrupt.

        The view is valid only until the calling task next waits (DecodePool.decode_run)."""
        pool = self.decoders
        if pool is None or not pool.ready():
            return None  # before the lookups, which get_many would do again
        locs = [self.locate(h) for h in hashes]
        writing = self.packs.current_pack
        block_size = self.store.config.block_size
        last = len(locs) - 1
        if any(loc.pack_id == writing or (i < last and loc.raw_len != block_size)
               for i, loc in enumerate(locs)):
            return None
        return await pool.decode_run(
            [(loc.pack_id, loc.offset, loc.record_len, loc.raw_len, loc.hash) for loc in locs])

    async def get_many(self, hashes: Sequence[bytes]) -> list[bytes]:
        """Verified plaintexts of many blocks. Those whose records are in the page cache
        are checked here if they add up to at most INLINE_READ_MAX; the others are read
        in worker threads (one hop per thread, not per block). Raises the first
        CorruptBlock met, never bad bytes."""
        locs = [self.locate(h) for h in hashes]
        out: list[bytes | None] = [None] * len(locs)
        if sum(loc.raw_len for loc in locs) <= INLINE_READ_MAX:
            out = self._read_here_if_cached(locs)
        missing = [i for i, data in enumerate(out) if data is None]
        failed: dict[int, CorruptBlock] = {}

        def read_one(i: int) -> None:
            try:
                out[i] = self._read_checked(locs[i])
            except CorruptBlock as e:
                failed[i] = e

        if missing:
            await _in_threads(read_one, missing)
        for i, e in sorted(failed.items()):
            out[i] = self._reread_if_moved(locs[i], e)
        return out  # type: ignore[return-value]  # every None was filled or raised

    # -- dead space ------------------------------------------------------------------

    def dead_bytes(self) -> int:
        return sum(self.store.pack_info(p)[1] for p in self.store.committed_pack_lengths())

    # -- compaction (compaction.py) ---------------------------------------------------

    def compact_candidates(self, threshold: float) -> list[int]:
        return compaction.candidates(self, threshold)

    def compact_pack(self, pack_id: int, result: CompactResult) -> bool:
        return compaction.compact_pack(self, pack_id, result)

    def compact_one(self, pack_id: int, result: CompactResult) -> None:
        compaction.compact_one(self, pack_id, result)

    def compact(self, threshold: float = 0.5,
                progress: Callable[[int, int], None] | None = None) -> CompactResult:
        return compaction.compact(self, threshold, progress)

    def forget_dead(self, loc: BlockLocation) -> None:
        """Drop a dead block from the index (its pack is being compacted away)."""
        self.store.txn.delete(loc.hash, db=self.db)
        self.store.txn.delete(DEAD_KEY.pack(loc.pack_id, loc.hash), db=self.dead_db)

    def relocate(self, loc: BlockLocation, record: bytes) -> None:
        """Append a verified record to the current pack and point the index there."""
        self._place_record(loc, record, loc.refcount)

    def put_record(self, loc: BlockLocation, record: bytes) -> None:
        """Store a block that is not here from another store's record, verified by the
        caller, byte for byte (no recompression), with no reference yet: it is listed
        dead until `incref` (replication copies blocks, committing as it goes, before
        the records that refer to them)."""
        self._mark_dead(self._place_record(loc, record, 0))

    def _place_record(self, loc: BlockLocation, record: bytes, refcount: int) -> BlockLocation:
        pack_id, offset = self.packs.append(record)
        placed = BlockLocation(loc.hash, pack_id, offset, loc.stored_len, loc.raw_len,
                               loc.codec, refcount)
        self.store.txn.put(loc.hash, placed.value(), db=self.db)
        return placed

