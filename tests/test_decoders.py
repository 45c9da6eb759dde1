"""Decoder processes: blocks read, decompressed and verified outside the daemon's loop
(store/decoder.py, store/decode_pool.py), and what a mount does with them."""

from __future__ import annotations

import json
import logging
import os
import random
import select
import signal
import time
from pathlib import Path

import pytest
import trio

from backupfs.errors import BackupfsError, CorruptBlock
from backupfs.store import Store, codec, decoder
from backupfs.store.codec import RECORD_HEADER_LEN
from backupfs.store.decode_pool import DecodePool, decoder_count

from mounting import backupfs, drop_page_cache, flip_byte

KiB = 1024
BS = 128 * KiB


def text(seed: int, n: int = BS) -> bytes:
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghij") for _ in range(rng.randrange(2, 9)))
             for _ in range(200)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def noise(seed: int, n: int = BS) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def blocks(tmp_path):
    """A store holding one run of blocks (text and noise, the last one short), reopened so
    that no pack is being written; yields (store, hashes, plaintexts)."""
    d = tmp_path / "store"
    Store.init(d)
    data = [text(1), noise(2), text(3), noise(4), text(5)[:1000]]
    with Store.open(d) as s:
        hashes = [s.blocks.put(b) for b in data]
    s = Store.open(d)
    yield s, hashes, data
    s.blocks.stop_decoders()
    s.close()


def decoder_pids(parent: int, expect: int | None = None) -> list[int]:
    """The decoder processes of `parent`; waits until there are `expect` of them (a
    process just started shows its parent's command line until it has exec'd)."""
    deadline = time.monotonic() + 10
    while True:
        pids = []
        for p in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
            try:
                if b"backupfs.store.decoder" in Path(f"/proc/{p}/cmdline").read_bytes():
                    pids.append(int(p))
            except FileNotFoundError:
                pass  # just ended
        if expect is None or len(pids) == expect or time.monotonic() > deadline:
            return pids
        time.sleep(0.01)


# -- decoding into a buffer ------------------------------------------------------------


@pytest.mark.parametrize("checked", [False, True], ids=["version 1", "checked"])
@pytest.mark.parametrize("data", [b"", b"x", text(7), noise(8), text(9, 5000)],
                         ids=["empty", "one byte", "text", "noise", "short text"])
def test_decode_record_into_gives_what_decode_record_gives(data, checked):
    block = codec.encode(data, codec.Compression("zstd", 3), checked=checked)
    record = b"".join(block.record_parts())
    dest = bytearray(len(data) + 2)
    codec.decode_record_into(record, block.hash, memoryview(dest)[1:1 + len(data)], 1, 16)
    assert bytes(dest[1:-1]) == data == codec.decode_record(record, block.hash, 1, 16)
    assert codec.decode_record(record, block.hash, 1, 16, full=True) == data
    assert dest[0] == dest[-1] == 0  # nothing outside its place


@pytest.mark.parametrize("checked", [False, True], ids=["version 1", "checked"])
@pytest.mark.parametrize("data, stored_as", [(text(10), codec.CODEC_ZSTD),
                                             (noise(11), codec.CODEC_RAW)], ids=["zstd", "raw"])
def test_decode_record_into_refuses_damage_and_wrong_sizes(data, stored_as, checked):
    block = codec.encode(data, codec.Compression("zstd", 3), checked=checked)
    record = bytearray(b"".join(block.record_parts()))
    assert block.codec == stored_as | (codec.CHECKED if checked else 0)
    with pytest.raises(CorruptBlock, match="raw length differs"):
        codec.decode_record_into(bytes(record), block.hash, memoryview(bytearray(BS - 1)), 1, 16)
    record[RECORD_HEADER_LEN + len(record) // 3] ^= 0x04
    with pytest.raises(CorruptBlock) as ei:
        codec.decode_record_into(bytes(record), block.hash, memoryview(bytearray(BS)), 1, 16)
    assert (ei.value.pack_id, ei.value.offset) == (1, 16)


# -- the pool --------------------------------------------------------------------------


async def test_a_run_is_read_by_a_decoder(blocks):
    s, hashes, data = blocks
    s.blocks.use_decoders(2)
    pool = s.blocks.decoders
    assert pool is not None and pool.alive == 2  # started at once, before any read
    assert len(decoder_pids(os.getpid(), expect=2)) == 2
    run = await s.blocks.get_run(hashes)
    assert bytes(run) == b"".join(data)
    assert pool.served == 1
    # Blocks out of their file's order, or one block: the same.
    assert bytes(await s.blocks.get_run(hashes[3:0:-1])) == b"".join(data[3:0:-1])
    assert bytes(await s.blocks.get_run(hashes[4:])) == data[4]


async def test_runs_a_decoder_cannot_take_are_declined(blocks):
    s, hashes, data = blocks
    s.blocks.use_decoders(1)
    # A short block before the last: the run would not be the file's bytes end to end.
    assert await s.blocks.get_run([hashes[4], hashes[0]]) is None
    # More than a slot holds: 1 MiB and a block (a READ of 1 MiB starting inside a block).
    assert await s.blocks.get_run(hashes[:4] * 3) is None
    nine = hashes[:4] * 2 + [hashes[4]]
    assert bytes(await s.blocks.get_run(nine)) == b"".join(data[:4] * 2 + [data[4]])
    # Its one decoder busy: the second of two reads at once is declined.
    got = []

    async def read(hs):
        got.append(await s.blocks.get_run(hs))

    async with trio.open_nursery() as n:
        n.start_soon(read, hashes[:2])
        n.start_soon(read, hashes[2:4])
    assert sorted(g is None for g in got) == [False, True]
    assert bytes(next(g for g in got if g is not None)) in (b"".join(data[:2]),
                                                            b"".join(data[2:4]))
    # The pack being written: its newest bytes may be in this process only.
    h = s.blocks.put(text(12))
    assert s.blocks.locate(h).pack_id == s.packs.current_pack
    assert await s.blocks.get_run([h]) is None
    # So are the older blocks of that pack (a reopened store appends to its last pack).
    assert s.blocks.locate(hashes[0]).pack_id == s.packs.current_pack
    assert await s.blocks.get_run(hashes[:2]) is None


async def test_damage_is_declined_by_the_decoder_and_reported_by_the_daemon(blocks):
    s, hashes, data = blocks
    s.blocks.use_decoders(1)
    loc = s.blocks.locate(hashes[2])
    flip_byte(s.packs.path(loc.pack_id), loc.offset + RECORD_HEADER_LEN + 100)
    drop_page_cache()
    assert await s.blocks.get_run(hashes) is None
    assert s.blocks.checksum_errors == 0  # the decoder only declines...
    with pytest.raises(CorruptBlock) as ei:  # ...the daemon's own read reports
        await s.blocks.get_many(hashes)
    assert ei.value.block_hash == hashes[2]
    assert s.blocks.checksum_errors == 1
    # The decoder is still there for the blocks that are sound.
    assert bytes(await s.blocks.get_run(hashes[:2])) == b"".join(data[:2])


async def test_a_pack_cut_short_is_declined_by_the_decoder(blocks):
    s, hashes, data = blocks
    s.blocks.use_decoders(1)
    last = s.blocks.locate(hashes[-1])
    path = s.packs.path(last.pack_id)
    os.truncate(path, last.offset + last.record_len - 1)
    assert await s.blocks.get_run(hashes) is None
    assert bytes(await s.blocks.get_run(hashes[:4])) == b"".join(data[:4])
    with pytest.raises(CorruptBlock):
        await s.blocks.get_many(hashes[4:])


async def test_a_decoder_that_dies_is_replaced(blocks, caplog):
    s, hashes, data = blocks
    s.blocks.use_decoders(1)
    pool = s.blocks.decoders
    pool.restart_after = 0  # replaced at once, however short its life
    assert bytes(await s.blocks.get_run(hashes)) == b"".join(data)
    (pid,) = decoder_pids(os.getpid())
    os.kill(pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING):
        assert await s.blocks.get_run(hashes) is None  # it was asked, and died
    assert f"decoder process {pid} ended" in caplog.text
    assert "another starts at the next read" in caplog.text
    assert pool.alive == 0
    assert bytes(await s.blocks.get_run(hashes)) == b"".join(data)
    (new,) = decoder_pids(os.getpid(), expect=1)
    assert new != pid and pool.alive == 1 and pool.served == 2


async def test_a_decoder_that_dies_young_is_replaced_only_later(blocks, caplog):
    s, hashes, data = blocks
    s.blocks.use_decoders(1)
    pool = s.blocks.decoders
    now = [1000.0]
    pool._clock = lambda: now[0]
    pool.restart_after = 60
    assert bytes(await s.blocks.get_run(hashes)) == b"".join(data)
    pool._all[0].started = now[0] - 10  # it had run 10 s
    (pid,) = decoder_pids(os.getpid())
    os.kill(pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING):
        assert await s.blocks.get_run(hashes) is None
    assert "another starts at the first read 50 s from now" in caplog.text
    now[0] += 49
    assert await s.blocks.get_run(hashes) is None  # none yet: the daemon reads
    assert decoder_pids(os.getpid()) == [] and pool.alive == 0
    assert await s.blocks.get_many(hashes) == data
    now[0] += 1
    assert bytes(await s.blocks.get_run(hashes)) == b"".join(data)
    assert len(decoder_pids(os.getpid(), expect=1)) == 1 and pool.alive == 1


def test_decoders_end_with_their_pool_or_its_process(blocks):
    s, hashes, data = blocks
    pool = DecodePool(s.packs.root, 2, BS)
    assert len(decoder_pids(os.getpid(), expect=2)) == 2
    pool.close()
    assert decoder_pids(os.getpid()) == []
    # A daemon killed outright closes its sockets all the same: the processes see the
    # end of the stream and leave (here: the sockets closed without the wait).
    pool = DecodePool(s.packs.root, 1, BS)
    assert len(decoder_pids(os.getpid(), expect=1)) == 1
    for d in pool._all:
        d.sock.close()
    deadline = time.monotonic() + 10
    while pool._all[0].proc.poll() is None:
        assert time.monotonic() < deadline, "the decoder outlived its socket"
        time.sleep(0.01)
    assert pool._all[0].proc.returncode == 0
    pool.close()
    # Killed with an answer unread: the process sees a reset, not an end, and leaves
    # just as quietly (no traceback in the daemon's log).
    pool = DecodePool(s.packs.root, 1, BS)
    (d,) = pool._all
    loc = s.blocks.locate(hashes[0])
    d.sock.send(decoder.REQUEST.pack(1, 1) + decoder.RECORD.pack(
        loc.pack_id, loc.offset, loc.record_len, loc.raw_len, 0, loc.hash))
    select.select([d.sock], [], [], 10)
    d.sock.close()
    assert d.proc.wait(timeout=10) == 0
    pool.close()


def test_decoder_count_from_the_config():
    assert decoder_count({}) == min(os.cpu_count() or 1, 4)
    assert decoder_count({"read": {"decoders": 0}}) == 0
    assert decoder_count({"read": {"decoders": 3}}) == 3
    for bad in ({"read": {"decoders": -1}}, {"read": {"decoders": "2"}},
                {"read": {"decoders": True}}, {"read": 2}):
        with pytest.raises(BackupfsError, match=r"\[read\]"):
            decoder_count(bad)


# -- through a mount -------------------------------------------------------------------


def store_decoders(store: Path) -> list[int]:
    """Decoder processes of `store`, whoever their parent is now."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"backupfs.store.decoder" in cmd and str(store / "packs").encode() in cmd:
            pids.append(int(p.name))
    return pids


def written_and_remounted(m, data: bytes) -> None:
    m.start()
    with open(m.path / "f", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    m.stop()
    m.start()  # no pack is being written until the next write
    drop_page_cache()


@pytest.mark.mount
@pytest.mark.timeout(120)
def test_a_mount_reads_through_its_decoders_and_ends_them(mount_factory):
    m = mount_factory()
    data = b"".join(text(i) if i % 2 else noise(i) for i in range(24)) + b"tail"
    written_and_remounted(m, data)
    cores = min(os.cpu_count(), 4)
    # Started with the mount, not at its first read.
    assert len(decoder_pids(m.proc.pid, expect=cores)) == cores
    before = json.loads(backupfs("stats", m.path, "--json", "--quick").stdout)["daemon"]
    assert before["decoders"] == cores and before["decoded_reads"] == 0
    assert (m.path / "f").read_bytes() == data
    with open(m.path / "f", "rb") as f:  # and from the middle, across blocks
        f.seek(3 * BS - 7)
        assert f.read(2 * BS + 9) == data[3 * BS - 7:5 * BS + 2]
    pids = store_decoders(m.store)
    # And they answer the reads, not just start: the daemon counts their answers.
    st = json.loads(backupfs("stats", m.path, "--json", "--quick").stdout)["daemon"]
    assert st["decoders"] == cores and st["decoded_reads"] > 0
    drop_page_cache()
    assert (m.path / "f").read_bytes() == data
    again = json.loads(backupfs("stats", m.path, "--json", "--quick").stdout)["daemon"]
    assert again["decoded_reads"] > st["decoded_reads"]
    m.stop()
    assert store_decoders(m.store) == []
    assert all(not Path(f"/proc/{p}").exists() for p in pids)


@pytest.mark.mount
@pytest.mark.timeout(120)
def test_no_decoders_where_the_config_says_none(mount_factory):
    m = mount_factory()
    with open(m.store / "config.toml", "a") as f:
        f.write("\n[read]\ndecoders = 0\n")
    data = noise(30, 5 * BS)
    written_and_remounted(m, data)
    assert (m.path / "f").read_bytes() == data
    assert store_decoders(m.store) == []
    m.stop()


@pytest.mark.mount
@pytest.mark.timeout(120)
def test_decoders_leave_with_a_killed_daemon(mount_factory):
    m = mount_factory()
    data = text(31, 8 * BS)
    written_and_remounted(m, data)
    assert (m.path / "f").read_bytes() == data
    assert store_decoders(m.store)
    m.kill()
    deadline = time.monotonic() + 10
    while store_decoders(m.store):
        assert time.monotonic() < deadline, "decoders outlived their daemon"
        time.sleep(0.05)
    m.start()  # and the store mounts again as ever
    assert (m.path / "f").read_bytes() == data
    m.stop()
