"""The block store on real files: round trips, dedup, refcounts and compaction, pack
rotation and recovery, corruption, the batch API, init/open errors and the writer lock.

LMDB forbids opening one environment twice in a process, so every test closes its store
before it reopens it, and anything that needs two openers at once runs a subprocess.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupfs.errors import CorruptBlock, MissingBlock, StoreError, StoreInUse
from backupfs.store import CompactResult, Store, block_hash, codec, index, pack_maps
from backupfs.store.blockstore import INLINE_HASH_MAX, INLINE_READ_MAX, cpu_limiter
from backupfs.store.codec import (CHECK_LEN, CODEC_RAW, CODEC_RAW_CHECKED, CODEC_ZSTD,
                                  CODEC_ZSTD_CHECKED, RECORD_HEADER_LEN)
from backupfs.store.compaction import PackCompaction
from backupfs.store.packs import PACK_HEADER, PACK_HEADER_LEN, PACK_MAGIC, PACK_VERSION

from mounting import flip_byte

KiB = 1024


def random_block(rng: random.Random, n: int = 128 * KiB) -> bytes:
    return rng.randbytes(n)


def text_block(seed: int, n: int = 128 * KiB) -> bytes:
    line = f"line {seed}: the quick brown fox jumps over the lazy dog\n".encode()
    return (line * (n // len(line) + 1))[:n]


def pack_files(store_dir: Path) -> dict[int, Path]:
    return {int(p.stem): p for p in (store_dir / "packs").glob("*/*.pack")}


def pack_bytes(store_dir: Path) -> int:
    return sum(p.stat().st_size for p in pack_files(store_dir).values())


@pytest.fixture
def store_dir(tmp_path) -> Path:
    d = tmp_path / "store"
    Store.init(d)
    return d


@pytest.fixture
def opened(store_dir):
    """Open the store; the test may close and reopen it through `opened.reopen()`."""

    class Opener:
        store: Store | None = None

        def reopen(self, commit: bool = True, **kw) -> Store:
            self.close(commit)
            self.store = Store.open(store_dir, **kw)
            return self.store

        def close(self, commit: bool = True) -> None:
            if self.store is not None:
                self.store.close(commit=commit)
                self.store = None

    o = Opener()
    o.reopen()
    yield o
    o.close(commit=False)


# -- round trips and dedup -------------------------------------------------------------


def test_round_trip_random_compressible_empty(opened):
    rng = random.Random(1)
    blocks = {
        "random": random_block(rng),
        "compressible": text_block(1),
        "empty": b"",
        "small": b"x",
        "zeros": bytes(128 * KiB),
    }
    s = opened.store
    hashes = {name: s.blocks.put(data) for name, data in blocks.items()}
    for name, data in blocks.items():
        assert hashes[name] == block_hash(data)
        assert s.blocks.get(hashes[name]) == data, name  # before the commit
    assert s.blocks.locate(hashes["random"]).codec == CODEC_RAW_CHECKED
    comp = s.blocks.locate(hashes["compressible"])
    assert comp.codec == CODEC_ZSTD_CHECKED and comp.stored_len < comp.raw_len // 10
    s = opened.reopen()
    for name, data in blocks.items():
        assert s.blocks.get(hashes[name]) == data, name
        assert s.blocks.refcount(hashes[name]) == 1


def compressed_lengths(monkeypatch) -> list[int]:
    """The length of everything codec's compressors are given from now on."""
    seen: list[int] = []
    real = codec._compressor

    def spy(level):
        c = real(level)
        return type("Spy", (), {"compress": lambda self, data: (
            seen.append(len(data)), c.compress(data))[1]})()

    monkeypatch.setattr(codec, "_compressor", spy)
    return seen


def test_a_block_whose_sample_does_not_shrink_is_not_compressed_whole(monkeypatch):
    zstd = codec.Compression("zstd", 3)
    seen = compressed_lengths(monkeypatch)
    noise = random_block(random.Random(2))
    assert codec.encode(noise, zstd).codec == CODEC_RAW
    assert seen == [3 * codec.PROBE_PIECE]  # the sample alone
    # The trade: compressible bytes that the sample misses are stored raw too.
    n, piece = 128 * KiB, codec.PROBE_PIECE
    hidden = bytearray(n)
    for at in (0, n // 2, n - piece):
        hidden[at:at + piece] = noise[at:at + piece]
    assert codec.encode(bytes(hidden), zstd).codec == CODEC_RAW


@pytest.mark.parametrize("compressible_piece", [0, 1, 2])
def test_a_sample_that_shrinks_anywhere_has_the_block_compressed(monkeypatch,
                                                                compressible_piece):
    n, piece = 128 * KiB, codec.PROBE_PIECE
    block = bytearray(random_block(random.Random(3)))
    # Zeros where one piece of the sample is taken, enough for zstd to keep its output.
    zeros = 8 * KiB
    at = (0, n // 2, n - zeros)[compressible_piece]
    block[at:at + zeros] = bytes(zeros)
    seen = compressed_lengths(monkeypatch)
    encoded = codec.encode(bytes(block), codec.Compression("zstd", 3))
    assert seen == [3 * piece, n]
    assert encoded.codec == CODEC_ZSTD
    assert codec.decode_record(b"".join(encoded.record_parts()), encoded.hash, 0, 0) == block


def test_a_small_block_is_compressed_whole_without_a_sample(monkeypatch):
    seen = compressed_lengths(monkeypatch)
    small = random_block(random.Random(4), codec.PROBE_MIN - 1)
    assert codec.encode(small, codec.Compression("zstd", 3)).codec == CODEC_RAW
    assert seen == [codec.PROBE_MIN - 1]


def prose_block(seed: int, n: int = 128 * KiB) -> bytes:
    """Text that zstd level 3 packs tighter than level 1 (repeated lines do not)."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(2, 9)).hex() for _ in range(400)]
    return " ".join(rng.choice(words) for _ in range(n // 4)).encode()[:n]


@pytest.mark.parametrize("adaptive", [True, False])
async def test_a_hurried_put_compresses_at_level_1_unless_fixed(tmp_path, adaptive):
    import zstandard

    Store.init(tmp_path / "s", compression="zstd:3", adaptive_compression=adaptive)
    blocks = [prose_block(1), prose_block(2)]
    level = {n: len(zstandard.ZstdCompressor(level=n, write_content_size=True).compress(b))
             for n, b in [(1, blocks[0]), (3, blocks[0])]}
    assert level[1] > level[3]
    with Store.open(tmp_path / "s") as s:
        assert s.config.compression.adaptive is adaptive
        hurried = await s.blocks.put_many(blocks[:1], hurry=True)
        calm = await s.blocks.put_many(blocks[1:])
        assert s.blocks.locate(hurried[0]).stored_len == CHECK_LEN + (
            level[1] if adaptive else level[3])
        assert s.blocks.locate(calm[0]).stored_len == CHECK_LEN + len(
            zstandard.ZstdCompressor(level=3, write_content_size=True).compress(blocks[1]))
        assert [s.blocks.get(h) for h in hurried + calm] == blocks
    # The choice is kept in config.toml (a store from before it existed reads as adaptive).
    text = (tmp_path / "s" / "config.toml").read_text()
    assert f"adaptive_compression = {str(adaptive).lower()}" in text
    (tmp_path / "s" / "config.toml").write_text(text.replace(
        f"adaptive_compression = {str(adaptive).lower()}\n", ""))
    with Store.open(tmp_path / "s") as s:
        assert s.config.compression.adaptive is True


def test_compression_none_stores_raw(tmp_path):
    Store.init(tmp_path / "s", compression="none")
    with Store.open(tmp_path / "s") as s:
        h = s.blocks.put(text_block(2))
        loc = s.blocks.locate(h)
        assert loc.codec == CODEC_RAW_CHECKED and loc.stored_len == loc.raw_len + CHECK_LEN
        assert s.blocks.get(h) == text_block(2)


def test_dedup_same_block_twice_is_one_copy(opened, store_dir):
    s = opened.store
    data = random_block(random.Random(2))
    h1 = s.blocks.put(data)
    s.commit()
    size_once = pack_bytes(store_dir)
    h2 = s.blocks.put(data)
    s.commit()
    assert h1 == h2
    assert pack_bytes(store_dir) == size_once
    assert s.blocks.refcount(h1) == 2
    assert len(list(s.blocks.iter_locations())) == 1
    s = opened.reopen()
    assert s.blocks.refcount(h1) == 2


def test_refcounts_and_missing(opened):
    s = opened.store
    h = s.blocks.put(b"abc")
    s.blocks.incref(h, 3)
    assert s.blocks.refcount(h) == 4
    s.blocks.decref(h, 4)
    assert s.blocks.refcount(h) == 0 and h not in s.blocks
    with pytest.raises(ValueError):
        s.blocks.decref(h)
    assert s.blocks.get(h) == b"abc"  # dead, but its bytes are there until compaction
    s.blocks.put(b"abc")  # revived without a second copy
    assert s.blocks.refcount(h) == 1
    assert s.blocks.dead_bytes() == 0
    unknown = block_hash(b"never stored")
    with pytest.raises(MissingBlock):
        s.blocks.get(unknown)
    with pytest.raises(MissingBlock):
        s.blocks.incref(unknown)
    assert s.blocks.refcount(unknown) == 0


# -- compaction and rotation -------------------------------------------------------------


def test_refcount_zero_then_compact_frees_pack_bytes(store_dir):
    rng = random.Random(3)
    s = Store.open(store_dir, rotate_size=600 * KiB)
    try:
        doomed = [s.blocks.put(random_block(rng)) for _ in range(4)]  # fills pack 1
        kept_data = [random_block(rng) for _ in range(4)]
        kept = [s.blocks.put(d) for d in kept_data]  # pack 2
        s.commit()
        assert {s.blocks.locate(h).pack_id for h in doomed} == {1}
        assert {s.blocks.locate(h).pack_id for h in kept} == {2}
        before = pack_bytes(store_dir)
        for h in doomed:
            s.blocks.decref(h)
        s.commit()
        assert s.blocks.dead_bytes() == 4 * (RECORD_HEADER_LEN + CHECK_LEN + 128 * KiB)
        assert pack_bytes(store_dir) == before  # nothing freed before compaction
        result = s.blocks.compact(threshold=0.5)
        assert result.packs_rewritten == 1 and result.blocks_dropped == 4
        assert result.blocks_moved == 0
        assert 1 not in pack_files(store_dir)
        assert pack_bytes(store_dir) <= before - 4 * 128 * KiB
        assert s.blocks.dead_bytes() == 0
        for h in doomed:
            with pytest.raises(MissingBlock):
                s.blocks.get(h)
    finally:
        s.close()
    with Store.open(store_dir) as s:
        assert 1 not in s.committed_pack_lengths()
        for h, d in zip(kept, kept_data):
            assert s.blocks.get(h) == d


def fill_first_pack(s, rng) -> tuple[list[bytes], list[bytes]]:
    """Four random blocks in pack 1, closed by a fifth (the store rotates at 600 KiB);
    returns their data and hashes."""
    data = [random_block(rng) for _ in range(4)]
    hs = [s.blocks.put(d) for d in data]
    s.blocks.put(random_block(rng))
    s.commit()
    return data, hs


def test_compact_moves_live_blocks_of_a_mostly_dead_pack(store_dir):
    rng = random.Random(4)
    with Store.open(store_dir, rotate_size=600 * KiB) as s:
        data, hs = fill_first_pack(s, rng)
        for h in hs[:3]:
            s.blocks.decref(h)
        result = s.blocks.compact(threshold=0.5)
        assert (result.packs_rewritten, result.blocks_moved, result.blocks_dropped) == (1, 1, 3)
        assert s.blocks.locate(hs[3]).pack_id != 1
        assert 1 not in pack_files(store_dir)
        assert s.blocks.get(hs[3]) == data[3]
    with Store.open(store_dir) as s:
        assert s.blocks.get(hs[3]) == data[3]
        assert s.blocks.refcount(hs[3]) == 1


def test_compact_reads_the_whole_index_only_past_damaged_framing(store_dir, monkeypatch):
    """Compaction finds a pack's live blocks by walking its records. Only when a record
    header is damaged does it look through the whole index for blocks placed past it:
    that costs the index's size, with a mount waiting."""
    rng = random.Random(14)
    with Store.open(store_dir, rotate_size=600 * KiB) as s:
        data, hs = fill_first_pack(s, rng)
        s.blocks.decref(hs[0])
        s.blocks.decref(hs[2])
        whole_index = s.blocks.iter_locations
        scans = []

        def counted():
            scans.append(1)
            return whole_index()

        monkeypatch.setattr(s.blocks, "iter_locations", counted)
        first = s.blocks.compact_pack(1, CompactResult())
        assert first and scans == []
        for i in (1, 3):
            assert s.blocks.get(hs[i]) == data[i]
        # Pack 2 now holds the moved blocks: free one whose record comes first, then
        # break its header, so the walk stops before the live block after it.
        s.blocks.put(random_block(rng))
        s.commit()
        moved = sorted((s.blocks.locate(h).offset, h) for h in (hs[1], hs[3]))
        (dead_at, dead), (_, live) = moved
        s.blocks.decref(dead)
        s.commit()
        pack = s.blocks.locate(live).pack_id
        in_pack = [loc.hash for loc in whole_index() if loc.pack_id == pack and loc.refcount]
        assert live in in_pack and dead not in in_pack
        flip_byte(pack_files(store_dir)[pack], dead_at)  # the record magic
        result = CompactResult()
        assert s.blocks.compact_pack(pack, result) and scans == [1]
        assert result.blocks_moved == len(in_pack)
        assert all(s.blocks.locate(h).pack_id != pack for h in in_pack)
        assert s.blocks.get(live) == data[hs.index(live)]


@pytest.mark.parametrize("revived_is_bad", [False, True])
def test_compaction_steps_follow_the_index_as_it_changes(store_dir, revived_is_bad):
    """In a mount the steps of compacting a pack run with requests served between them:
    a block killed after its record was checked is dropped, not moved, and a dead block
    revived meanwhile (written again) is verified and moved, or, bad, stops the pack."""
    rng = random.Random(15)
    with Store.open(store_dir, rotate_size=600 * KiB) as s:
        data, hs = fill_first_pack(s, rng)
        s.blocks.decref(hs[0])
        s.blocks.decref(hs[1])
        s.commit()
        if revived_is_bad:
            loc = s.blocks.locate(hs[0])
            flip_byte(pack_files(store_dir)[1], loc.offset + RECORD_HEADER_LEN + 10)
        c = PackCompaction(s.blocks, 1)
        c.read()
        live = c.live()
        assert sorted(live) == sorted(s.blocks.locate(h).offset for h in hs[2:])
        c.check(live)
        s.blocks.decref(hs[2])           # killed after the check
        assert s.blocks.put(data[0]) == hs[0]  # revived in place, never checked
        if revived_is_bad:
            with pytest.raises(CorruptBlock):
                c.move()
            return
        c.move()
        s.commit()
        result = CompactResult()
        c.finish(result)
        assert (result.blocks_moved, result.blocks_dropped) == (2, 2)
        assert 1 not in pack_files(store_dir)
        for i in (0, 3):
            assert s.blocks.locate(hs[i]).pack_id != 1 and s.blocks.get(hs[i]) == data[i]
        for i in (1, 2):
            assert s.blocks.refcount(hs[i]) == 0
            with pytest.raises(MissingBlock):
                s.blocks.locate(hs[i])


def test_compact_after_reopen_keeps_live_blocks(opened, store_dir):
    """After a reopen no pack is open for appending; compacting the newest pack must not
    move its live blocks into itself and then delete it."""
    s = opened.store
    rng = random.Random(5)
    data = [random_block(rng, 16 * KiB) for _ in range(6)]
    hs = [s.blocks.put(d) for d in data]
    s.commit()
    for h in hs[:5]:
        s.blocks.decref(h)
    s = opened.reopen()
    result = s.blocks.compact(threshold=0.5)
    assert result.packs_rewritten == 1 and result.blocks_moved == 1
    assert s.blocks.get(hs[5]) == data[5]
    s = opened.reopen()
    assert s.blocks.get(hs[5]) == data[5]
    assert set(pack_files(store_dir)) == set(s.committed_pack_lengths())


def test_compact_a_pack_with_uncommitted_appends(store_dir):
    """A closed pack appended to since the last commit, then compacted: no stale record
    of it is left in the index once its file is deleted."""
    rng = random.Random(6)
    with Store.open(store_dir, rotate_size=300 * KiB) as s:
        first = s.blocks.put(random_block(rng))
        s.commit()  # pack 1 is committed with one block
        second = s.blocks.put(random_block(rng))  # pack 1 grows (uncommitted)
        third_data = random_block(rng)
        third = s.blocks.put(third_data)  # pack 2: pack 1 is closed
        assert s.blocks.locate(second).pack_id == 1 and s.blocks.locate(third).pack_id == 2
        s.blocks.decref(first)
        s.blocks.decref(second)
        assert s.blocks.compact(0.5).packs_rewritten == 1
        assert 1 not in s.committed_pack_lengths()
    with Store.open(store_dir) as s:
        assert set(pack_files(store_dir)) == set(s.committed_pack_lengths()) == {2}
        assert s.blocks.get(third) == third_data


def test_pack_rotation_path_and_header(store_dir):
    rotate = 300 * KiB
    rng = random.Random(7)
    with Store.open(store_dir, rotate_size=rotate) as s:
        hs = [s.blocks.put(random_block(rng)) for _ in range(7)]
        s.commit()
        committed = s.committed_pack_lengths()
    files = pack_files(store_dir)
    assert sorted(files) == [1, 2, 3, 4]  # two 128 KiB records per pack
    assert set(committed) == set(files)
    for pack_id, path in files.items():
        assert path == store_dir / "packs" / f"{pack_id >> 8:02x}" / f"{pack_id:06d}.pack"
        assert path.stat().st_size == committed[pack_id] <= rotate
        with open(path, "rb") as f:
            assert PACK_HEADER.unpack(f.read(PACK_HEADER_LEN)) == (PACK_MAGIC, PACK_VERSION,
                                                                    pack_id)
    with Store.open(store_dir, rotate_size=rotate) as s:
        assert [s.blocks.locate(h).pack_id for h in hs] == [1, 1, 2, 2, 3, 3, 4]
        assert s.blocks.locate(hs[1]).offset == (PACK_HEADER_LEN + RECORD_HEADER_LEN + CHECK_LEN
                                                 + 128 * KiB)
        # a reopened store continues the newest pack while it has room
        h = s.blocks.put(random_block(rng))
        assert s.blocks.locate(h).pack_id == 4


# -- recovery of uncommitted tails ---------------------------------------------------------


def test_uncommitted_tail_and_garbage_are_cut_on_open(store_dir):
    rng = random.Random(8)
    kept_data = random_block(rng)
    with Store.open(store_dir, rotate_size=300 * KiB) as s:
        kept = s.blocks.put(kept_data)
    path = pack_files(store_dir)[1]
    committed_size = path.stat().st_size
    s = Store.open(store_dir, rotate_size=300 * KiB)
    lost = [s.blocks.put(random_block(rng)) for _ in range(3)]  # the rest of pack 1, pack 2
    s.packs.sync()  # even synced bytes do not count until the index commits them
    s.close(commit=False)
    assert path.stat().st_size > committed_size
    assert set(pack_files(store_dir)) == {1, 2}
    with open(path, "ab") as f:
        f.write(b"garbage after the tail" * 100)
    with Store.open(store_dir) as s:
        assert any("cut" in a for a in s.recovery_actions)
        assert any("removed uncommitted pack" in a for a in s.recovery_actions)
        assert path.stat().st_size == committed_size
        assert set(pack_files(store_dir)) == {1}
        assert s.blocks.get(kept) == kept_data
        for h in lost:
            with pytest.raises(MissingBlock):
                s.blocks.get(h)
        # appends go where the committed bytes end
        h = s.blocks.put(b"after recovery")
        assert s.blocks.locate(h).offset == committed_size
    with Store.open(store_dir) as s:
        assert s.recovery_actions == []
        assert s.blocks.get(h) == b"after recovery"


def test_garbage_only_tail_is_ignored_by_readonly_open(store_dir):
    with Store.open(store_dir) as s:
        h = s.blocks.put(b"data")
    path = pack_files(store_dir)[1]
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(os.urandom(1000))
    with Store.open(store_dir, readonly=True) as s:
        assert s.blocks.get(h) == b"data"
        assert path.stat().st_size == size + 1000  # a reader changes nothing
    with Store.open(store_dir) as s:
        assert path.stat().st_size == size


# -- corruption --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["payload", "header", "check", "last"])
@pytest.mark.parametrize("kind", ["random", "compressible"])
async def test_flipped_byte_is_never_returned(store_dir, where, kind, monkeypatch):
    data = random_block(random.Random(9)) if kind == "random" else text_block(9)
    with Store.open(store_dir) as s:
        other = s.blocks.put(b"a neighbour")
        h = s.blocks.put(data)
        loc = s.blocks.locate(h)
        s.blocks.get(h)  # a cached read handle must not hide the damage
        offset = {"payload": loc.offset + RECORD_HEADER_LEN + loc.stored_len // 2,
                  "header": loc.offset + 5,  # inside the raw length
                  "check": loc.offset + RECORD_HEADER_LEN + CHECK_LEN // 2,
                  "last": loc.offset + loc.record_len - 1}[where]
        s.commit()
        flip_byte(pack_files(store_dir)[loc.pack_id], offset)
        calls = [lambda: s.blocks.get(h), lambda: s.blocks.read_verified(loc)]
        for call in calls:
            with pytest.raises(CorruptBlock) as ei:
                call()
            e = ei.value
            assert (e.block_hash, e.pack_id, e.offset) == (h, loc.pack_id, loc.offset)
            assert h.hex() in str(e) and f"pack {loc.pack_id}" in str(e)
        with pytest.raises(CorruptBlock):
            await s.blocks.get_async(h)
        with pytest.raises(CorruptBlock):  # cached: checked in this thread
            await s.blocks.get_many([other, h])
        with monkeypatch.context() as mp:  # not cached: checked by a worker thread
            mp.setattr(s.blocks.packs, "read_cached_many", lambda wanted: [None] * len(wanted))
            with pytest.raises(CorruptBlock):
                await s.blocks.get_many([other, h])
        assert s.blocks.checksum_errors == 5
        assert s.blocks.get(other) == b"a neighbour"


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["random", "compressible", "short"]), checked=st.booleans(),
       at=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_a_record_with_any_bit_flipped_reads_right_or_not_at_all(kind, checked, at, bit):
    data = {"random": random_block(random.Random(3), 4 * KiB),
            "compressible": text_block(3, 4 * KiB), "short": b"xy"}[kind]
    block = codec.encode(data, codec.Compression("zstd", 3), checked=checked)
    record = bytearray(b"".join(block.record_parts()))
    record[int(at * len(record))] ^= 1 << bit
    got = []
    for read in (lambda: codec.decode_record(bytes(record), block.hash, 1, 16),
                 lambda: codec.decode_record(bytes(record), block.hash, 1, 16, full=True),
                 lambda: _decoded_into(record, block.hash, len(data))):
        try:
            got.append(read())
        except CorruptBlock:
            got.append(None)
    # Right bytes may still come back: the reserved header byte, or a field of zstd's
    # frame header that decoding does not need, can be damaged without harm.
    assert all(g in (None, data) for g in got), got


def _decoded_into(record: bytearray, h: bytes, n: int) -> bytes:
    dest = memoryview(bytearray(n))
    codec.decode_record_into(bytes(record), h, dest, 1, 16)
    return bytes(dest)


def test_a_version_1_store_stays_readable_by_the_backupfs_that_made_it(tmp_path):
    """Opened by this version, a store of format version 1 keeps writing records without
    the checksum (codecs 0 and 1), which the earlier backupfs reads."""
    d = tmp_path / "s"
    Store.init(d)
    cfg = d / "config.toml"
    cfg.write_text(cfg.read_text().replace("format_version = 2", "format_version = 1"))
    blocks = [random_block(random.Random(7)), text_block(7)]
    with Store.open(d) as s:
        assert s.config.format_version == 1 and not s.blocks.checked_records
        hashes = [s.blocks.put(b) for b in blocks]
        assert [s.blocks.locate(h).codec for h in hashes] == [CODEC_RAW, CODEC_ZSTD]
    with Store.open(d) as s:
        assert [s.blocks.get(h) for h in hashes] == blocks
        assert [len(s.blocks.read_verified(s.blocks.locate(h), full=True))
                for h in hashes] == [128 * KiB] * 2
    assert "format_version = 1" in cfg.read_text()


def test_missing_pack_file_is_a_corrupt_block(store_dir):
    with Store.open(store_dir) as s:
        h = s.blocks.put(b"lost with its pack")
    pack_files(store_dir)[1].unlink()
    with Store.open(store_dir) as s:
        with pytest.raises(CorruptBlock, match="pack file is missing") as ei:
            s.blocks.get(h)
        assert (ei.value.pack_id, ei.value.offset) == (1, PACK_HEADER_LEN)


def test_corrupt_live_block_is_not_spread_by_compaction(store_dir):
    rng = random.Random(10)
    with Store.open(store_dir, rotate_size=600 * KiB) as s:
        hs = [s.blocks.put(random_block(rng)) for _ in range(4)]
        s.blocks.put(random_block(rng))  # pack 2
        s.commit()
        loc = s.blocks.locate(hs[0])
        flip_byte(pack_files(store_dir)[1], loc.offset + RECORD_HEADER_LEN + 10)
        for h in hs[1:]:
            s.blocks.decref(h)
        result = s.blocks.compact(0.5)
        assert result.packs_rewritten == 0 and result.corrupt
        assert result.corrupt[0].block_hash == hs[0]
        assert 1 in pack_files(store_dir)
        with pytest.raises(CorruptBlock):
            s.blocks.get(hs[0])


# -- the batch API from trio ---------------------------------------------------------------


async def test_put_many_from_trio(opened):
    s = opened.store
    rng = random.Random(11)
    existing = s.blocks.put(b"already there")
    dead = s.blocks.put(b"dead before")
    s.blocks.decref(dead)
    blocks = [random_block(rng) for _ in range(6)] + [text_block(i) for i in range(6)]
    batch = blocks + [blocks[0], b"already there", b"dead before", b""]
    hashes = await s.blocks.put_many(batch)
    assert hashes == [block_hash(b) for b in batch]
    assert s.blocks.refcount(hashes[0]) == 2
    assert s.blocks.refcount(existing) == 2
    assert s.blocks.refcount(dead) == 1
    assert s.blocks.dead_bytes() == 0
    for h, b in zip(hashes, batch):
        assert await s.blocks.get_async(h) == b
    assert await s.blocks.get_many(hashes) == batch
    assert await s.blocks.get_many([]) == []
    s = opened.reopen()
    for h, b in zip(hashes, batch):
        assert s.blocks.get(h) == b
    assert len(list(s.blocks.iter_locations())) == len(set(hashes))


@pytest.fixture
def thread_hops(monkeypatch) -> list[str]:
    """The names of the functions the block store hands to a worker thread."""
    hops: list[str] = []
    run_sync = trio.to_thread.run_sync

    async def counted(fn, *args, **kw):
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await run_sync(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    return hops


async def test_cached_blocks_are_read_without_a_thread_hop(opened, thread_hops,
                                                           monkeypatch):
    s = opened.store
    rng = random.Random(14)
    small, text = random_block(rng, 64 * KiB), text_block(14)
    big = random_block(rng, INLINE_READ_MAX + 1)
    h_small, h_text, h_big = s.blocks.put(small), s.blocks.put(text), s.blocks.put(big)
    s.commit()
    # Appends go past the page cache; a read of the pack brings its pages in, as the
    # kernel's read-ahead does for a restore. (Again if this VM's own reclaim took a
    # page back meanwhile: see cached_record.)
    for _ in range(20):
        thread_hops.clear()
        for path in pack_files(s.path).values():
            path.read_bytes()
        assert await s.blocks.get_many([h_small, h_text]) == [small, text]
        assert await s.blocks.get_async(h_small) == small
        if not thread_hops:
            break
    assert thread_hops == []
    # More than a READ's worth in one call: workers check them, one hop per thread.
    assert await s.blocks.get_many([h_big]) == [big]
    assert len(thread_hops) == 1
    assert await s.blocks.get_many([h_small, h_big]) == [small, big]
    assert len(thread_hops) == 3
    # A record not in the page cache: read_cached declines it, and a worker waits for
    # the disk; the cached one beside it is still checked here.
    read_cached_many = s.blocks.packs.read_cached_many
    text_at = s.blocks.locate(h_text).offset
    monkeypatch.setattr(s.blocks.packs, "read_cached_many", lambda wanted: [
        None if offset == text_at else got
        for (_, offset, _), got in zip(wanted, read_cached_many(wanted))])
    for _ in range(20):
        del thread_hops[3:]
        for path in pack_files(s.path).values():
            path.read_bytes()
        assert await s.blocks.get_many([h_small, h_text]) == [small, text]
        if len(thread_hops) == 4:
            break
    assert len(thread_hops) == 4


def test_the_index_is_read_around_only_while_it_fits_in_memory(tmp_path, monkeypatch):
    """Read-around warms an index that fits in memory; one far bigger than memory is read
    at random for good, where each miss would read the disk's whole read-ahead."""
    Store.init(tmp_path / "s")
    with Store.open(tmp_path / "s") as s:
        assert s.env.flags()["readahead"]
    size = (tmp_path / "s" / index.INDEX_DIR / "data.mdb").stat().st_size
    small_memory = size * index.READ_AROUND_MAX_SHARE - 1
    monkeypatch.setattr(index, "_memory_bytes", lambda: small_memory)
    with Store.open(tmp_path / "s") as s:
        assert not s.env.flags()["readahead"]
    with Store.open(tmp_path / "s", readonly=True) as s:  # the admin commands' way in
        assert not s.env.flags()["readahead"]
    assert index.reads_around(size, size * index.READ_AROUND_MAX_SHARE)


def test_read_cached_gives_up_for_good_where_nowait_is_refused(opened, monkeypatch):
    """Where packs cannot be mapped, cached records are copied with RWF_NOWAIT; where
    that is refused too, every read goes to a worker."""
    s = opened.store
    h = s.blocks.put(b"on a filesystem without RWF_NOWAIT")
    s.commit()
    loc, packs = s.blocks.locate(h), s.blocks.packs
    monkeypatch.setattr(packs, "_maps", None)
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "preadv", refuse)
    for _ in range(3):
        assert packs.read_cached(loc.pack_id, loc.offset, loc.record_len) is None
    assert len(calls) == 1
    assert s.blocks.get(h) == b"on a filesystem without RWF_NOWAIT"


def cached_record(packs, loc):
    """`read_cached` of a record whose pack was read a moment ago. This VM reclaims
    memory it judges cold by itself (DAMON's pageout, on physical ranges, so a page just
    read can go at once): the pack is read again until its pages stay long enough."""
    for _ in range(20):
        got = packs.read_cached(loc.pack_id, loc.offset, loc.record_len)
        if got is not None:
            return got
        packs.path(loc.pack_id).read_bytes()
    raise AssertionError(f"pack {loc.pack_id} never stayed in the page cache")


def evict(path) -> None:
    """Take a file's pages out of the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_cached_records_are_read_in_place_and_others_never(opened):
    """A record the page cache holds is a view of the mapped pack, not a copy; one it
    does not hold is declined, so the event loop never waits in a page fault (nor meets
    the disk's errors there, as SIGBUS)."""
    s = opened.store
    block = random_block(random.Random(17), 64 * KiB)
    h = s.blocks.put(block)
    s.commit()
    loc, packs = s.blocks.locate(h), s.blocks.packs
    path = packs.path(loc.pack_id)
    evict(path)
    assert packs.read_cached(loc.pack_id, loc.offset, loc.record_len) is None
    whole = packs.read(loc.pack_id, loc.offset, loc.record_len)  # brings the pages in
    view = cached_record(packs, loc)
    assert isinstance(view, memoryview) and view == whole
    del view
    packs.forget_read_handles()  # unmaps the pages, which eviction leaves alone
    evict(path)
    assert packs.read_cached(loc.pack_id, loc.offset, loc.record_len) is None
    path.read_bytes()
    assert s.blocks.get(h) == block


def test_one_reads_records_are_checked_together(opened, monkeypatch):
    """A READ's records in one pack cost one mincore, and each is judged by its own
    pages: one whose pages left the cache is declined while its neighbours are read."""
    s = opened.store
    rng = random.Random(21)
    blocks = [random_block(rng, 64 * KiB) for _ in range(5)]
    hashes = [s.blocks.put(b) for b in blocks]
    s.commit()
    locs = [s.blocks.locate(h) for h in hashes]
    packs = s.blocks.packs
    path = packs.path(locs[0].pack_id)
    middle = locs[2]
    calls = []
    mincore = pack_maps._mincore
    monkeypatch.setattr(pack_maps, "_mincore", lambda *a: calls.append(a) or mincore(*a))
    for _ in range(20):  # until no other page left the cache meanwhile (cached_record)
        path.read_bytes()
        fd = os.open(path, os.O_RDONLY)
        try:  # the pages that hold the middle record and no byte of another
            start = -(-middle.offset // 4096) * 4096
            os.posix_fadvise(fd, start, middle.offset + middle.record_len - 4096 - start,
                             os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        calls.clear()
        got = packs.read_cached_many(
            [(loc.pack_id, loc.offset, loc.record_len) for loc in locs])
        assert len(calls) == 1 and got[2] is None
        if None not in got[:2] + got[3:]:
            break
    assert [g is None for g in got] == [False, False, True, False, False]
    for loc, h, b, g in zip(locs, hashes, blocks, got):
        if g is not None:
            assert codec.decode_record(g, h, loc.pack_id, loc.offset) == b
    # Far apart (more than HULL_MAX between them): one mincore each.
    monkeypatch.setattr(pack_maps, "HULL_MAX", 64 * KiB)
    calls.clear()
    packs.read_cached_many([(loc.pack_id, loc.offset, loc.record_len) for loc in locs[:2]])
    assert len(calls) == 2


def test_mapped_packs_grow_and_outlive_their_removal(opened, monkeypatch):
    s = opened.store
    rng = random.Random(18)
    first = s.blocks.put(random_block(rng, 64 * KiB))
    s.commit()
    packs = s.blocks.packs
    loc1 = s.blocks.locate(first)
    packs.path(loc1.pack_id).read_bytes()
    view = cached_record(packs, loc1)
    # A record appended after the pack was mapped lies past the mapping's end.
    second = s.blocks.put(random_block(rng, 64 * KiB))
    s.commit()
    loc2 = s.blocks.locate(second)
    assert loc2.pack_id == loc1.pack_id and loc2.offset >= len(view) + loc1.offset
    packs.path(loc2.pack_id).read_bytes()
    assert cached_record(packs, loc2) == packs.read(loc2.pack_id, loc2.offset, loc2.record_len)
    # Removing the pack forgets its mapping; a view a reader holds stays readable.
    before = bytes(view)
    packs.remove(loc1.pack_id)
    assert packs.read_cached(loc1.pack_id, loc1.offset, loc1.record_len) is None
    assert bytes(view) == before


def test_pages_read_in_place_are_unmapped_as_reading_goes_on(opened, monkeypatch):
    """Mapped pages count in the daemon's resident memory: they are unmapped (left to
    the page cache) every RELEASE_EVERY bytes read, in every pack read meanwhile."""
    monkeypatch.setattr(pack_maps, "RELEASE_EVERY", 256 * KiB)
    s = opened.reopen(rotate_size=640 * KiB)
    rng = random.Random(20)
    blocks = [random_block(rng, 64 * KiB) for _ in range(24)]
    hashes = [s.blocks.put(b) for b in blocks]
    s.commit()
    packs = s.blocks.packs
    paths = list(pack_files(s.path).values())
    assert len(paths) >= 2
    for path in paths:
        path.read_bytes()
    mapped = []
    for h, b in zip(hashes, blocks):
        loc = s.blocks.locate(h)
        view = cached_record(packs, loc)
        assert codec.decode_record(view, h, loc.pack_id, loc.offset) == b
        mapped.append(sum(resident_mapped_kib(path) for path in paths))
    assert max(mapped) <= 256 + 64 + 2 * 64  # fault-around may map up to 64 KiB more a pack
    assert mapped[3] >= 4 * 64 and mapped[4] < mapped[3]


def resident_mapped_kib(path) -> int:
    """KiB of this process's mappings of `path` that are mapped in (smaps' Rss)."""
    total, ours = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                ours = len(fields) >= 6 and fields[5] == str(path)
            elif ours and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_pack_mappings_are_bounded(opened, monkeypatch):
    monkeypatch.setattr(pack_maps, "MAX_MAPPED", 2)
    s = opened.reopen(rotate_size=64 * KiB)
    rng = random.Random(19)
    blocks = [random_block(rng, 48 * KiB) for _ in range(4)]
    hashes = [s.blocks.put(b) for b in blocks]
    s.commit()
    locs = [s.blocks.locate(h) for h in hashes]
    assert len({loc.pack_id for loc in locs}) == 4
    for path in pack_files(s.path).values():
        path.read_bytes()
    for _ in range(2):
        for loc, h, b in zip(locs, hashes, blocks):
            view = cached_record(s.blocks.packs, loc)
            assert codec.decode_record(view, h, loc.pack_id, loc.offset) == b
    assert list(s.blocks.packs._maps._maps) == [locs[2].pack_id, locs[3].pack_id]


def test_packs_that_cannot_be_mapped_are_copied_for_good(opened, monkeypatch):
    s = opened.store
    h = s.blocks.put(b"on a filesystem without mmap")
    s.commit()
    loc, packs = s.blocks.locate(h), s.blocks.packs
    packs.path(loc.pack_id).read_bytes()

    def refuse(*args, **kwargs):
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(pack_maps.mmap, "mmap", refuse)
    got = cached_record(packs, loc)
    assert isinstance(got, bytearray)  # RWF_NOWAIT's copy
    assert packs._maps is None
    assert s.blocks.get(h) == b"on a filesystem without mmap"


async def test_put_many_hashes_a_small_batch_without_a_thread_hop(opened, thread_hops):
    s = opened.store
    rng = random.Random(16)
    known = [random_block(rng) for _ in range(4)]
    await s.blocks.put_many(known)
    assert len(thread_hops) == 2  # compressing the new blocks: one hop per thread
    # Known blocks are only hashed and counted: here, with no hop at all.
    assert await s.blocks.put_many(known) == [block_hash(b) for b in known]
    assert len(thread_hops) == 2
    # More bytes than that: workers hash them, then compress the new ones.
    many = known * (INLINE_HASH_MAX // sum(map(len, known))) + [random_block(rng)]
    assert await s.blocks.put_many(many) == [block_hash(b) for b in many]
    assert len(thread_hops) == 2 + 2 + 1
    assert s.blocks.refcount(block_hash(known[0])) == 2 + len(many) // len(known)


def test_read_cached_gives_all_the_bytes_or_none(opened):
    s = opened.store
    h = s.blocks.put(random_block(random.Random(15), 64 * KiB))
    s.commit()
    loc, packs = s.blocks.locate(h), s.blocks.packs
    whole = packs.read(loc.pack_id, loc.offset, loc.record_len)
    assert len(whole) == loc.record_len
    assert packs.read_cached(loc.pack_id, loc.offset, loc.record_len) == whole
    end = loc.offset + loc.record_len
    assert packs.read_cached(loc.pack_id, end - 10, 20) is None  # cut short by the end
    assert packs.read_cached(loc.pack_id + 1, 0, 10) is None  # no such pack


async def test_put_many_concurrent_batches_dedup(opened):
    s = opened.store
    data = [text_block(i, 32 * KiB) for i in range(8)]
    results = []

    async def one():
        results.append(await s.blocks.put_many(data))

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(one)
    assert all(r == results[0] for r in results)
    for h, d in zip(results[0], data):
        assert s.blocks.refcount(h) == 3
        assert s.blocks.get(h) == d
    assert len(list(s.blocks.iter_locations())) == 8


async def test_put_many_waits_for_a_concurrent_batch_and_survives_its_failure(opened):
    """Two batches with the same blocks: the second waits for the first, which is
    compressing them, instead of storing them twice; when the first fails midway (a full
    disk), the second stores them itself. Nothing is lost, nothing is counted twice, and
    what the failed batch appended is accounted as dead space."""
    s = opened.store
    data = [text_block(100 + i, 32 * KiB) for i in range(8)]
    gate = threading.Event()
    lock = threading.Lock()
    appends = 0
    real_append = s.packs.append

    def append(*parts):
        nonlocal appends
        assert gate.wait(10), "the second batch never waited for the first"
        with lock:
            appends += 1
            if appends == 4:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real_append(*parts)

    s.packs.append = append
    second: list[list[bytes]] = []

    async def first_batch():
        with pytest.raises(OSError) as e:
            await s.blocks.put_many(data)
        assert e.value.errno == errno.ENOSPC

    async def second_batch():
        while not s.blocks._storing:
            await trio.sleep(0.001)
        # The first batch's workers wait at the gate holding their threads: this batch
        # needs threads of its own to hash with.
        limiter.total_tokens = 2 * tokens
        second.append(await s.blocks.put_many(data))

    async def open_gate_once_second_waits():
        while True:
            events = set(s.blocks._storing.values())
            if events and all(e.statistics().tasks_waiting for e in events):
                break
            await trio.sleep(0.001)
        gate.set()

    limiter = cpu_limiter()
    tokens = limiter.total_tokens
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                n.start_soon(first_batch)
                n.start_soon(second_batch)
                n.start_soon(open_gate_once_second_waits)
    finally:
        limiter.total_tokens = tokens
    assert appends > 8  # the second batch did store what the first could not
    hashes = second[0]
    for h, d in zip(hashes, data):
        assert s.blocks.refcount(h) == 1
        assert s.blocks.get(h) == d
    locations = list(s.blocks.iter_locations())
    assert len(locations) == 8
    assert s.blocks.dead_bytes() == 0  # records the failed batch placed were revived
    # ...not stored a second time: the packs hold exactly the 8 records.
    s.commit()
    packs = pack_files(s.path)
    assert sum(p.stat().st_size for p in packs.values()) == (
        len(packs) * PACK_HEADER_LEN + sum(loc.record_len for loc in locations))
    s.commit()
    s = opened.reopen()
    assert [s.blocks.get(h) for h in hashes] == data


async def test_reads_racing_compaction_get_the_moved_block(store_dir):
    """Readers in worker threads while compaction moves blocks and deletes their packs:
    a reader that looked a block up before the move still gets its bytes (no spurious
    CorruptBlock, no read from a closed or reused descriptor)."""
    s = Store.open(store_dir, rotate_size=64 * KiB)
    try:
        rng = random.Random(12)
        data = [rng.randbytes(16 * KiB) for _ in range(24)]
        hs = [s.blocks.put(d) for d in data]
        s.commit()
        moves = 0

        async def reader():
            for _ in range(60):
                i = rng.randrange(len(hs))
                assert await s.blocks.get_async(hs[i]) == data[i]
            assert await s.blocks.get_many(hs) == data

        async def compactor():
            nonlocal moves
            for _ in range(200):
                pack = s.blocks.locate(hs[rng.randrange(len(hs))]).pack_id
                moves += s.blocks.compact_pack(pack, CompactResult())
                await trio.sleep(0)

        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(reader)
            n.start_soon(compactor)
        assert moves == 200 and s.blocks.checksum_errors == 0
    finally:
        s.close()
    with Store.open(store_dir) as s:
        assert [s.blocks.get(h) for h in hs] == data
        assert set(pack_files(store_dir)) == set(s.committed_pack_lengths())


# -- init and open ------------------------------------------------------------------------


def test_init_refuses_non_empty_dir_and_existing_store(tmp_path):
    d = tmp_path / "full"
    d.mkdir()
    (d / "somefile").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        Store.init(d)
    assert sorted(os.listdir(d)) == ["somefile"]
    Store.init(tmp_path / "s")
    with pytest.raises(StoreError, match="already a backupfs store"):
        Store.init(tmp_path / "s")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        Store.init(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = Store.init(empty)  # an empty directory is fine
    assert cfg.block_size == 128 * KiB and str(cfg.compression) == "zstd:3"
    text = (empty / "config.toml").read_text()
    assert "format_version = 2" in text and "block_size = 131072" in text


def test_init_rejects_bad_parameters(tmp_path):
    with pytest.raises(StoreError, match="power of two"):
        Store.init(tmp_path / "a", block_size=100_000)
    with pytest.raises(StoreError, match="compression"):
        Store.init(tmp_path / "b", compression="lz4")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_open_missing_or_foreign_store(tmp_path, store_dir):
    with pytest.raises(StoreError, match="no such store"):
        Store.open(tmp_path / "nope")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.txt").write_text("x")
    with pytest.raises(StoreError, match="not a backupfs store"):
        Store.open(tmp_path / "foreign")
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        Store.open(tmp_path / "f")
    no_index = tmp_path / "no-index"
    no_index.mkdir()
    shutil.copy(store_dir / "config.toml", no_index / "config.toml")
    with pytest.raises(StoreError, match="index"):
        Store.open(no_index)


@pytest.mark.parametrize("change", ["version 3", "no version", "bad toml", "bad block size",
                                    "bad adaptive"])
def test_open_rejects_bad_config(store_dir, change):
    cfg = store_dir / "config.toml"
    text = cfg.read_text()
    text = {
        "version 3": text.replace("format_version = 2", "format_version = 3"),
        "no version": text.replace("format_version = 2", ""),
        "bad toml": text + "\n[[[\n",
        "bad block size": text.replace("block_size = 131072", "block_size = 1000"),
        "bad adaptive": text.replace("adaptive_compression = true",
                                     'adaptive_compression = "yes"'),
    }[change]
    assert text != cfg.read_text() or change == "bad toml"
    cfg.write_text(text)
    with pytest.raises(StoreError) as ei:
        Store.open(store_dir)
    assert "\n" not in str(ei.value).strip()
    if change.startswith("version") or change == "no version":
        assert "format version" in str(ei.value)


OTHER_PROCESS = textwrap.dedent("""
    import sys
    from backupfs.store import Store
    from backupfs.errors import StoreInUse
    store, h = sys.argv[1], bytes.fromhex(sys.argv[2])
    try:
        Store.open(store)
    except StoreInUse as e:
        print("in use:", e)
    else:
        print("opened for writing")
    with Store.open(store, readonly=True) as s:
        print("read:", s.blocks.get(h).decode())
""")


def test_second_writer_is_refused_while_readers_read(opened, store_dir):
    s = opened.store
    h = s.blocks.put(b"committed before")
    s.commit()
    s.blocks.put(b"not yet committed")
    r = subprocess.run([sys.executable, "-c", OTHER_PROCESS, str(store_dir), h.hex()],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("in use: ") and "in use by another process" in lines[0]
    assert lines[1] == "read: committed before"
    opened.close()
    r = subprocess.run([sys.executable, "-c", OTHER_PROCESS, str(store_dir), h.hex()],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines()[0] == "opened for writing", r.stderr


def test_store_in_use_is_a_store_error():
    assert issubclass(StoreInUse, StoreError)


# -- a property: random operations against a model of the refcounts ------------------------

POOL = [b""] + [text_block(i, 3 * KiB) for i in range(4)] + \
       [random.Random(i).randbytes(3 * KiB) for i in range(5)]

op = st.one_of(
    st.tuples(st.just("put"), st.integers(0, len(POOL) - 1)),
    st.tuples(st.just("put_many"), st.lists(st.integers(0, len(POOL) - 1), max_size=4)),
    st.tuples(st.just("incref"), st.integers(0, len(POOL) - 1)),
    st.tuples(st.just("decref"), st.integers(0, len(POOL) - 1)),
    st.tuples(st.just("decref"), st.integers(0, len(POOL) - 1)),  # twice: packs must die
    st.tuples(st.just("commit"), st.none()),
    st.tuples(st.just("compact"), st.sampled_from([0.0, 0.3, 0.6])),
    st.tuples(st.just("reopen"), st.booleans()),
)


def check_model(s: Store, model: dict[int, int]) -> None:
    for i, data in enumerate(POOL):
        h = block_hash(data)
        assert s.blocks.refcount(h) == model.get(i, 0), i
        if model.get(i, 0):
            assert s.blocks.get(h) == data
    # dead bytes per pack are exactly the records of blocks at refcount zero
    dead: dict[int, int] = {}
    for loc in s.blocks.iter_locations():
        if loc.refcount == 0:
            dead[loc.pack_id] = dead.get(loc.pack_id, 0) + loc.record_len
    for pack_id in set(dead) | set(s.committed_pack_lengths()):
        assert s.pack_info(pack_id)[1] == dead.get(pack_id, 0), pack_id


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=50))
def test_random_operations_match_a_refcount_model(ops):
    d = Path(tempfile.mkdtemp(prefix="bkfs-prop-"))
    rotate = 16 * KiB  # a few blocks per pack: rotation and compaction happen often
    try:
        Store.init(d / "s")
        s = Store.open(d / "s", rotate_size=rotate)
        model: dict[int, int] = {}
        committed: dict[int, int] = {}
        try:
            for name, arg in ops:
                if name == "put":
                    s.blocks.put(POOL[arg])
                    model[arg] = model.get(arg, 0) + 1
                elif name == "put_many":
                    trio.run(s.blocks.put_many, [POOL[i] for i in arg])
                    for i in arg:
                        model[i] = model.get(i, 0) + 1
                elif name == "incref" and model.get(arg):
                    s.blocks.incref(block_hash(POOL[arg]))
                    model[arg] += 1
                elif name == "decref" and model.get(arg):
                    s.blocks.decref(block_hash(POOL[arg]))
                    model[arg] -= 1
                elif name == "commit":
                    s.commit()
                    committed = dict(model)
                elif name == "compact":
                    if s.blocks.compact(arg).packs_rewritten:
                        committed = dict(model)  # compaction commits
                elif name == "reopen":
                    s.close(commit=arg)
                    if arg:
                        committed = dict(model)
                    model = dict(committed)
                    s = Store.open(d / "s", rotate_size=rotate)
                check_model(s, model)
            s.close()
            s = Store.open(d / "s", rotate_size=rotate)
            check_model(s, model)
            assert set(pack_files(d / "s")) == set(s.committed_pack_lengths())
        finally:
            s.close(commit=False)
    finally:
        shutil.rmtree(d)
