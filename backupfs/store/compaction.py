"""Compaction: giving the dead space in packs back to the disk.

A pack mostly made of dead blocks (refcount 0) is rewritten: its live blocks are
appended to the current pack, the index points at their new places, the pack leaves the
index, and once that is committed its file is deleted (a crash in between leaves a file
the index does not know, which the next writable open removes).

`PackCompaction` does one pack in steps, so that a mount can serve requests while the
slow ones run in a worker thread: reading the pack and verifying its live records (up
to 64 MiB each) touch no LMDB and may run anywhere; looking blocks up and moving them
must run in the thread that owns the write transaction. What the index says may change
between the steps (a write revives a dead block, a delete kills a live one), so `move`
looks every record up again and verifies any live one `check` did not see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import CorruptBlock
from . import codec
from .codec import RECORD_HEADER_LEN
from .packs import PACK_HEADER_LEN

if TYPE_CHECKING:
    from .blockstore import BlockLocation, BlockStore


@dataclass
class CompactResult:
    packs_rewritten: int = 0
    bytes_freed: int = 0
    blocks_moved: int = 0
    blocks_dropped: int = 0
    corrupt: list[CorruptBlock] | None = None


def candidates(blocks: "BlockStore", threshold: float) -> list[int]:
    """Closed packs whose dead share is over `threshold` (0..1)."""
    out = []
    current = blocks.packs.current_pack
    for pack_id in sorted(blocks.store.committed_pack_lengths()):
        if pack_id == current:
            continue
        length, dead = blocks.store.pack_info(pack_id)
        body = max(1, length - PACK_HEADER_LEN)
        if dead and dead / body > threshold:
            out.append(pack_id)
    return out


class PackCompaction:
    def __init__(self, blocks: "BlockStore", pack_id: int):
        """Index thread. From here on nothing is appended to the pack."""
        self.blocks = blocks
        self.pack_id = pack_id
        blocks.packs.seal(pack_id)
        self.length = blocks.store.pack_info(pack_id)[0]
        self.data = b""
        self.records: list[tuple[int, int, bytes]] = []   # (offset, end, hash)
        self.whole = False        # the framing was walked to the end: no record unmet
        self.checked: set[int] = set()                     # offsets verified
        self.moved = self.dropped = 0

    def read(self) -> None:
        """Any thread: read the pack and walk its records."""
        data = self.data = self.blocks.packs.read(self.pack_id, 0, self.length)
        pos = PACK_HEADER_LEN
        while pos + RECORD_HEADER_LEN <= len(data):
            parsed = codec.parse_record_header(data[pos:pos + RECORD_HEADER_LEN])
            if parsed is None:
                break  # damaged framing: what follows is found through the index (move)
            end = pos + RECORD_HEADER_LEN + parsed[2]
            self.records.append((pos, end, parsed[3]))
            pos = end
        self.whole = pos == len(data)

    def live(self) -> list[int]:
        """Index thread: the offsets of the records the index still needs."""
        return [pos for pos, _, h in self.records
                if (loc := self._placed_here(h, pos)) is not None and loc.refcount]

    def check(self, offsets: list[int]) -> None:
        """Any thread: verify those records, so that a bad block is never spread."""
        ends = {pos: (end, h) for pos, end, h in self.records}
        for pos in offsets:
            end, h = ends[pos]
            codec.decode_record(self.data[pos:end], h, self.pack_id, pos)
            self.checked.add(pos)

    def move(self) -> None:
        """Index thread: move the live blocks, forget the dead ones and the pack. The
        caller then commits, and `finish`es. Raises CorruptBlock (the pack then stays)."""
        for pos, end, h in self.records:
            loc = self._placed_here(h, pos)
            if loc is not None:
                self._move_or_drop(loc, self.data[pos:end], verified=pos in self.checked)
        # Past damaged framing, what the index still places in this pack must move too.
        # Finding it means reading the whole index (3.5 us a block here: 30 s for 1 TB of
        # 128 KiB blocks, with the mount waiting), so only then.
        if not self.whole:
            for loc in [loc for loc in self.blocks.iter_locations()
                        if loc.pack_id == self.pack_id]:
                record = self.blocks.packs.read(loc.pack_id, loc.offset, loc.record_len)
                self._move_or_drop(loc, record, verified=False)
        self.blocks.store.drop_pack_record(self.pack_id)

    def finish(self, result: CompactResult) -> None:
        """After the commit that holds `move`: delete the pack file."""
        self.blocks.packs.remove(self.pack_id)
        result.packs_rewritten += 1
        result.bytes_freed += self.length
        result.blocks_moved += self.moved
        result.blocks_dropped += self.dropped

    def _placed_here(self, h: bytes, pos: int) -> "BlockLocation | None":
        loc = self.blocks.location_or_none(h)
        if loc is None or (loc.pack_id, loc.offset) != (self.pack_id, pos):
            return None  # moved or dropped before, or a stale copy
        return loc

    def _move_or_drop(self, loc: "BlockLocation", record: bytes, verified: bool) -> None:
        if loc.refcount == 0:
            self.blocks.forget_dead(loc)
            self.dropped += 1
            return
        if not verified:
            codec.decode_record(record, loc.hash, loc.pack_id, loc.offset)
        self.blocks.relocate(loc, record)
        self.moved += 1


def compact_pack(blocks: "BlockStore", pack_id: int, result: CompactResult) -> bool:
    """One pack, all steps in the calling thread, with its own commit. Crash-safe: the
    pack is deleted only after the commit that moves its blocks. Raises CorruptBlock if
    a live block fails verification (it and its pack stay)."""
    c = PackCompaction(blocks, pack_id)
    c.read()
    c.check(c.live())
    c.move()
    blocks.store.commit()
    c.finish(result)
    return True


def compact_one(blocks: "BlockStore", pack_id: int, result: CompactResult) -> None:
    """`compact_pack`, with a live block that fails verification noted in `result`
    (its pack stays, and the other packs are still compacted)."""
    try:
        compact_pack(blocks, pack_id, result)
    except CorruptBlock as e:
        result.corrupt = (result.corrupt or []) + [e]


def compact(blocks: "BlockStore", threshold: float = 0.5,
            progress: Callable[[int, int], None] | None = None) -> CompactResult:
    result = CompactResult()
    packs = candidates(blocks, threshold)
    for i, pack_id in enumerate(packs):
        compact_one(blocks, pack_id, result)
        if progress:
            progress(i + 1, len(packs))
    return result
