"""A snapshot never holds data behind a hole the kernel is still to fill.

With the writeback cache, appended pages can reach the daemon out of order: the page
after a re-dirtied one first, leaving a gap the late page fills a moment later. Found by
test_mount_snapshot_pit.py (about one snapshot in a hundred held zeros in the middle of
a writer's records); here the same order of requests is made directly, without the
kernel."""

from __future__ import annotations

import os
from types import SimpleNamespace

import trio
from trio.testing import wait_all_tasks_blocked

from backupfs.fs import inodes
from test_fs_operations import CTX, fields, fs, new_file  # noqa: F401  (fs is a fixture)


async def snapshot_contents(fs, record, ino) -> bytes:
    kino = inodes.join(fs.snapshots.slot(record.id), ino)
    size = (await fs.getattr(kino)).st_size
    fh = (await fs.open(kino, os.O_RDONLY, CTX)).fh
    try:
        return await fs.read(fh, 0, size + 100)
    finally:
        await fs.release(fh)


async def test_a_gap_opened_after_the_syncfs_ends_the_file_in_the_snapshot(fs):
    fh, ino = await new_file(fs, b"log")
    await fs.write(fh, 0, b"a" * 100)
    since = fs.data.writes + 1               # the snapshot's syncfs begins here
    await fs.write(fh, 8192, b"c" * 50)      # a later page arrives first: gap 100..8192
    first = await fs.take_snapshot(torn_since=since)
    assert await snapshot_contents(fs, first, ino) == b"a" * 100
    # The live file is untouched: full size, and the late pages fill the gap.
    assert (await fs.getattr(ino)).st_size == 8192 + 50
    await fs.write(fh, 100, b"b" * 8092)
    whole = b"a" * 100 + b"b" * 8092 + b"c" * 50
    assert await fs.read(fh, 0, 10000) == whole
    second = await fs.take_snapshot(torn_since=fs.data.writes + 1)
    assert await snapshot_contents(fs, second, ino) == whole
    assert await snapshot_contents(fs, first, ino) == b"a" * 100


async def test_a_hole_older_than_the_syncfs_is_meant(fs):
    fh, ino = await new_file(fs, b"sparse")
    await fs.write(fh, 0, b"x" * 10)
    await fs.write(fh, 5000, b"y" * 10)      # before the snapshot began: a real hole
    record = await fs.take_snapshot(torn_since=fs.data.writes + 1)
    assert await snapshot_contents(fs, record, ino) == b"x" * 10 + bytes(4990) + b"y" * 10
    # ... and one made by truncate is no gap at all.
    await fs.setattr(ino, SimpleNamespace(st_size=20000), fields(update_size=True), None, CTX)
    since = fs.data.writes + 1
    await fs.write(fh, 30000, b"z")          # a gap opened after: 20000..30000
    record = await fs.take_snapshot(torn_since=since)
    assert await snapshot_contents(fs, record, ino) == \
        b"x" * 10 + bytes(4990) + b"y" * 10 + bytes(20000 - 5010)


async def test_a_gap_is_closed_by_a_write_that_began_before_it_opened(fs):
    """Two WRITEs at once: the one that fills the gap arrives first but waits for its
    stored block; the next page arrives meanwhile and opens the gap. Once both are in,
    there is no gap. (test_mount_snapshot_pit.py once ended a writer's file short in a
    snapshot this way: the gap was recorded after the fill had looked for gaps.)"""
    fh, ino = await new_file(fs, b"log")
    await fs.write(fh, 0, b"a" * 5000)
    await fs.flush_everything()              # the partial block 1 is stored now
    gate = trio.Event()
    read_block = fs.data._block_content

    async def slow_read(*args):
        await gate.wait()
        return await read_block(*args)

    fs.data._block_content = slow_read
    since = fs.data.writes + 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.write, fh, 5000, b"b" * 3192)   # fills up to 8192
        await wait_all_tasks_blocked()       # ... waiting for block 1's stored bytes
        await fs.write(fh, 8192, b"c" * 100)  # the next page, while the fill waits
        gate.set()
    assert fs.data.torn_ends(since) == {}
    record = await fs.take_snapshot(torn_since=since)
    assert await snapshot_contents(fs, record, ino) == b"a" * 5000 + b"b" * 3192 + b"c" * 100


async def test_the_snapshot_has_the_kernel_write_back_what_fills_a_gap(fs, monkeypatch):
    """syncfs can leave behind a page the kernel re-dirtied while writing it back: the
    very page that fills a gap. Invalidating the file's cache makes the kernel write it
    (faked here: the kernel's WRITE of the late page). A gap still open after that is a
    hole meant to be, kept inside the file."""
    fh, log_ino = await new_file(fs, b"log")
    await fs.write(fh, 0, b"a" * 100)
    await fs.write(fh, 4096, b"c" * 50)           # page 1 first: gap 100..4096
    fh2, sparse_ino = await new_file(fs, b"sparse")
    await fs.write(fh2, 0, b"x" * 10)
    await fs.write(fh2, 8192, b"y" * 10)          # a real hole: gap 10..8192
    await new_file(fs, b"plain")                  # no gap: its cache is left alone
    invalidated = []

    def kernel_invalidates(ino):                  # in a worker thread, as the kernel blocks
        invalidated.append(ino)
        if ino == log_ino:                        # the late page, written back first
            trio.from_thread.run(fs.write, fh, 0, b"a" * 100 + b"b" * 3996)

    monkeypatch.setattr("pyfuse3.invalidate_inode", kernel_invalidates)
    since = await fs.pull_dirty_pages()
    assert sorted(invalidated) == sorted([log_ino, sparse_ino])
    record = await fs.take_snapshot(torn_since=since)
    assert await snapshot_contents(fs, record, log_ino) == b"a" * 100 + b"b" * 3996 + b"c" * 50
    assert await snapshot_contents(fs, record, sparse_ino) == b"x" * 10 + bytes(8182) + b"y" * 10
    # Forgotten once kept: the next snapshot asks the kernel about neither file again.
    invalidated.clear()
    await fs.pull_dirty_pages()
    assert invalidated == []
