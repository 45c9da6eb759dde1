"""The pyfuse3 Operations called directly from pytest-trio, without the kernel."""

from __future__ import annotations

import errno
import inspect
import os
import stat
import subprocess
import sys
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from backupfs.errors import CorruptBlock
from backupfs.fs import BackupFS
from backupfs.fs import inodes
from backupfs.fs.dircookies import DirCookies
from backupfs.fs.handlers import fuse_handler
from backupfs.namespace import Namespace
from backupfs.namespace.check import check_versions
from backupfs.store import Store
from backupfs.store.codec import block_hash

BS = 4096  # small blocks make boundaries cheap to test
ROOT = pyfuse3.ROOT_INODE
CTX = SimpleNamespace(uid=1000, gid=1000, pid=1, umask=0o022)


def fields(**set_):
    names = ["update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid",
             "update_gid", "update_size"]
    return SimpleNamespace(**{n: set_.get(n, False) for n in names})


@pytest.fixture
def fs(tmp_path):
    Store.init(tmp_path / "store", block_size=BS)
    store = Store.open(tmp_path / "store")
    ns = Namespace(store)
    ops = BackupFS(store, ns)
    yield ops
    store.close(commit=False)


async def new_file(fs, name=b"f", parent=ROOT):
    info, entry = await fs.create(parent, name, stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    return info.fh, entry.st_ino


async def test_write_read_across_block_boundaries(fs):
    fh, ino = await new_file(fs)
    data = os.urandom(3 * BS + 123)
    assert await fs.write(fh, 0, data) == len(data)
    assert await fs.read(fh, 0, len(data) + 100) == data          # buffered
    await fs.fsync(fh, False)        # seals the dirty blocks
    assert await fs.read(fh, BS - 10, 20) == data[BS - 10:BS + 10]  # sealed, from the store
    assert (await fs.getattr(ino)).st_size == len(data)
    # A partial overwrite inside a stored block is a read-modify-write.
    await fs.write(fh, BS + 5, b"XYZ")
    await fs.release(fh)
    fh = (await fs.open(ino, os.O_RDONLY, CTX)).fh
    expect = data[:BS + 5] + b"XYZ" + data[BS + 8:]
    assert await fs.read(fh, 0, len(expect)) == expect


async def test_sparse_file_reads_zeros_and_stores_no_holes(fs):
    fh, ino = await new_file(fs)
    far = 1 << 40
    await fs.write(fh, far, b"end")
    await fs.write(fh, 0, bytes(BS))          # an all-zero block is a hole too
    await fs.fsync(fh, False)        # seals the dirty blocks
    attr = await fs.getattr(ino)
    assert attr.st_size == far + 3
    assert attr.st_blocks <= 2 * BS // 512
    assert await fs.read(fh, far - 5, 8) == b"\0" * 5 + b"end"
    assert await fs.read(fh, 12345678, 16) == bytes(16)


async def test_truncate_to_partial_block_then_grow_reads_zeros(fs):
    fh, ino = await new_file(fs)
    await fs.write(fh, 0, b"a" * (2 * BS))
    await fs.fsync(fh, False)        # seals the dirty blocks
    e = pyfuse3.EntryAttributes()
    e.st_size = 100
    await fs.setattr(ino, e, fields(update_size=True), fh, CTX)
    e.st_size = 2 * BS
    await fs.setattr(ino, e, fields(update_size=True), fh, CTX)
    got = await fs.read(fh, 0, 2 * BS)
    assert got == b"a" * 100 + bytes(2 * BS - 100)


async def test_a_big_truncate_serves_other_requests_and_commits_whole(fs, monkeypatch):
    """A truncate releases a big file's stored blocks in chunks, serving other requests
    between them; a write to the same file waits for its end, and so does a commit,
    which therefore never records a truncate half done."""
    from backupfs.fs import filedata

    monkeypatch.setattr(filedata, "DROP_CHUNK", 4)
    fh, ino = await new_file(fs, b"big")
    data = os.urandom(40 * BS)
    await fs.write(fh, 0, data)
    await fs.fsync(fh, False)
    other_fh, _ = await new_file(fs, b"other")
    await fs.write(other_fh, 0, b"small")
    await fs.fsync(other_fh, False)
    events = []
    drop = fs.live.drop_blocks_from

    def counted_drop(*args):
        n = drop(*args)
        events.append(("chunk", n))
        return n

    monkeypatch.setattr(fs.live, "drop_blocks_from", counted_drop)

    async def truncate():
        attr = pyfuse3.EntryAttributes()
        attr.st_size = BS  # on a block boundary: nothing to seal, a commit goes straight on
        await fs.setattr(ino, attr, fields(update_size=True), fh, CTX)
        events.append("truncated")

    async def read_other():
        assert await fs.read(other_fh, 0, 10) == b"small"
        events.append("other file read")

    async def write_same():
        assert await fs.write(fh, 2 * BS, b"new") == 3
        events.append("wrote")

    async def commit():
        await fs.txg.commit()
        events.append("committed")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(truncate)
            while not events:
                await trio.lowlevel.checkpoint()
            assert "truncated" not in events  # under way
            assert (await fs.getattr(ino)).st_size == BS  # the new size shows at once
            for task in (read_other, write_same, commit):
                nursery.start_soon(task)
    chunks = [e for e in events if isinstance(e, tuple)]
    assert [n for _, n in chunks] == [4] * 9 + [3]
    done = events.index("truncated")
    assert events.index("other file read") < done
    assert events.index("wrote") > done and events.index("committed") > done
    assert await fs.read(fh, 0, 3 * BS) == data[:BS] + bytes(BS) + b"new"
    await fs.fsync(fh, False)
    assert [n for n, _ in fs.live.block_range(ino)] == [0, 2]


async def test_snapshot_deletions_free_in_chunks_one_at_a_time(fs, monkeypatch):
    """Deleting a snapshot frees what only it saw a chunk at a time, serving requests
    between chunks. A second deletion waits for the first; a file of its snapshot that
    the kernel still knew and opened meanwhile makes it wait for that file's release."""
    from backupfs.fs import operations
    from backupfs.namespace.deletion import SnapshotDeletion

    monkeypatch.setattr(operations, "DELETE_CHUNK", 2)
    fh, ino = await new_file(fs, b"doc")
    versions = [os.urandom(8 * BS) for _ in range(3)]
    await fs.write(fh, 0, versions[0])
    first = await fs.take_snapshot(label="first")
    await fs.write(fh, 0, versions[1])
    second = await fs.take_snapshot(label="second")
    await fs.write(fh, 0, versions[2])  # each snapshot alone sees its 8 blocks
    await fs.fsync(fh, False)
    root = await fs.lookup(inodes.SNAPSHOTS_DIR_INO, second.name.encode(), CTX)
    doc = await fs.lookup(root.st_ino, b"doc", CTX)  # what the kernel may keep
    events = []
    free_some = SnapshotDeletion.free_some

    def counted(deletion, budget=None):
        done = free_some(deletion, budget)
        events.append(("chunk", deletion.record.label, done))
        return done

    monkeypatch.setattr(SnapshotDeletion, "free_some", counted)

    async def delete(record):
        await fs.delete_snapshot(record)
        events.append(("deleted", record.label))

    async def read_live():
        assert await fs.read(fh, 0, 8 * BS) == versions[2]
        events.append("live read")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(delete, first)
            while not events:
                await trio.lowlevel.checkpoint()
            nursery.start_soon(delete, second)
            nursery.start_soon(read_live)
            await trio.lowlevel.checkpoint()
            sfh = (await fs.open(doc.st_ino, os.O_RDONLY, CTX)).fh
            events.append("opened second")
    chunks = [e for e in events if e[0] == "chunk"]
    assert chunks and all(label == "first" for _, label, _ in chunks)
    assert [done for _, _, done in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len(chunks) >= 4  # 8 block map versions and the inode's, 2 at a time
    assert events.index("live read") < events.index(chunks[-1])
    assert events.index(("deleted", "second")) > events.index(chunks[-1])  # it waited
    assert [r.label for r in fs.ns.catalog.records] == ["second"]  # hidden, not freed
    assert fs.snapshots.records == [] and fs.ns.catalog.records[0].deleting
    assert await fs.read(sfh, 0, 8 * BS) == versions[1]  # the open file reads on
    await fs.release(sfh)
    assert fs.ns.catalog.records == []
    assert events[-1] == ("chunk", "second", True)
    report = check_versions(fs.ns)
    assert not report.issues and report.block_refs == {
        h: 1 for h in {block_hash(versions[2][i:i + BS]) for i in range(0, 8 * BS, BS)}}


async def test_a_listing_resumes_from_a_cookie_in_another_open_of_the_directory(
        fs, monkeypatch):
    """NFS servers (the kernel's nfsd, Ganesha) open a directory afresh for every
    READDIR and resume from the cookie the client sent back: a cookie must mean the
    same in every open of the directory, also while it changes. (A cookie from another
    open used to be looked up in this open's own list: EIO, found by Ganesha.)"""
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    names = [b"f%03d" % i for i in range(50)]
    for name in names:
        fh, _ = await new_file(fs, name, parent=d.st_ino)
        await fs.release(fh)

    def reply(token, name, attr, cookie):
        if len(token["got"]) == token["room"]:
            return False
        token["got"].append((name, cookie))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)

    async def piece(start, room=7, directory=d.st_ino):
        fh = await fs.opendir(directory, CTX)
        token = {"got": [], "room": room}
        try:
            await fs.readdir(fh, start, token)
        finally:
            await fs.releasedir(fh)
        return token["got"]

    listed, start = [], 0
    while got := await piece(start):
        listed += [name for name, _ in got]
        start = got[-1][1]
        if len(listed) == 14:  # one name goes behind the listing, one comes ahead of it
            await fs.unlink(d.st_ino, b"f000", CTX)
            fh, _ = await new_file(fs, b"g", parent=d.st_ino)
            await fs.release(fh)
    assert listed == names + [b"g"]
    assert [name for name, _ in await piece(0, room=100)] == names[1:] + [b"g"]
    for unknown in (10_000, 2):  # no name's cookie; a position, where no entry is virtual
        with pytest.raises(pyfuse3.FUSEError) as e:
            await piece(unknown)
        assert e.value.errno == errno.EINVAL
    # A client holding a cookie across a daemon restart: no table knows it then.
    first = await piece(0, room=20)
    fs.dir_cookies = DirCookies()
    assert [n for n, _ in first + await piece(first[-1][1], room=100)] == names[1:] + [b"g"]
    # The root lists `snapshots` first, at a cookie of its own.
    root = await piece(0, room=1, directory=ROOT)
    assert [n for n, _ in root] == [b"snapshots"]
    assert b"snapshots" not in [n for n, _ in await piece(root[0][1], directory=ROOT)]
    # /snapshots the same way, while a snapshot goes behind the listing.
    records = [await fs.take_snapshot(label=str(i)) for i in range(3)]
    first = await piece(0, room=1, directory=inodes.SNAPSHOTS_DIR_INO)
    await fs.delete_snapshot(records[0])
    rest = await piece(first[-1][1], room=10, directory=inodes.SNAPSHOTS_DIR_INO)
    assert [n for n, _ in first + rest] == [r.name.encode() for r in records] + [b"latest"]


async def test_snapshot_is_frozen_and_read_only(fs):
    fh, ino = await new_file(fs, b"doc")
    await fs.write(fh, 0, b"version 1")
    record = await fs.take_snapshot(label="t")
    await fs.write(fh, 0, b"VERSION 2")
    await fs.release(fh)
    snapdir = await fs.lookup(ROOT, b"snapshots", CTX)
    assert snapdir.st_ino == inodes.SNAPSHOTS_DIR_INO
    root = await fs.lookup(inodes.SNAPSHOTS_DIR_INO, record.name.encode(), CTX)
    doc = await fs.lookup(root.st_ino, b"doc", CTX)
    assert doc.st_ino != ino and doc.st_ino & inodes.INO_MASK == ino
    sfh = (await fs.open(doc.st_ino, os.O_RDONLY, CTX)).fh
    assert await fs.read(sfh, 0, 100) == b"version 1"
    live = (await fs.open(ino, os.O_RDONLY, CTX)).fh
    assert await fs.read(live, 0, 100) == b"VERSION 2"
    for attempt in (
        fs.open(doc.st_ino, os.O_WRONLY, CTX),
        fs.create(root.st_ino, b"new", stat.S_IFREG | 0o644, os.O_RDWR, CTX),
        fs.unlink(root.st_ino, b"doc", CTX),
        fs.mkdir(root.st_ino, b"d", 0o755, CTX),
        fs.setxattr(doc.st_ino, b"user.x", b"1", CTX),
        fs.setattr(doc.st_ino, pyfuse3.EntryAttributes(), fields(update_mode=True), None, CTX),
        fs.rename(root.st_ino, b"doc", ROOT, b"doc2", 0, CTX),
        fs.link(doc.st_ino, ROOT, b"hard", CTX),
        fs.mkdir(inodes.SNAPSHOTS_DIR_INO, b"x", 0o755, CTX),
    ):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await attempt
        assert e.value.errno == errno.EROFS
    latest = await fs.lookup(inodes.SNAPSHOTS_DIR_INO, b"latest", CTX)
    assert await fs.readlink(latest.st_ino, CTX) == record.name.encode()


async def test_an_absent_name_is_an_answer_the_kernel_may_keep(fs):
    """A missing name is a negative entry (st_ino 0) the kernel caches as long as a
    present one, except in /snapshots, whose names come and go behind its back."""
    gone = await fs.lookup(ROOT, b"absent", CTX)
    assert gone.st_ino == 0 and gone.entry_timeout == inodes.LIVE_TIMEOUT
    record = await fs.take_snapshot(label="t")
    root = await fs.lookup(inodes.SNAPSHOTS_DIR_INO, record.name.encode(), CTX)
    gone = await fs.lookup(root.st_ino, b"absent", CTX)
    assert gone.st_ino == 0 and gone.entry_timeout == inodes.SNAPSHOT_TIMEOUT
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.lookup(inodes.SNAPSHOTS_DIR_INO, b"2099-01-01T000000Z", CTX)
    assert e.value.errno == errno.ENOENT
    fh, ino = await new_file(fs, b"absent")
    assert (await fs.lookup(ROOT, b"absent", CTX)).st_ino == ino


async def test_snapshots_name_is_reserved_at_root(fs):
    for attempt in (fs.mkdir(ROOT, b"snapshots", 0o755, CTX),
                    fs.create(ROOT, b"snapshots", stat.S_IFREG | 0o644, os.O_RDWR, CTX)):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await attempt
        assert e.value.errno == errno.EEXIST
    d = await fs.mkdir(ROOT, b"dir", 0o755, CTX)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.rename(ROOT, b"dir", ROOT, b"snapshots", 0, CTX)
    assert e.value.errno == errno.EPERM
    # Inside a subdirectory the name is ordinary.
    assert (await fs.mkdir(d.st_ino, b"snapshots", 0o755, CTX)).st_ino


async def test_unlinked_open_file_reads_until_released_then_is_reclaimed(fs):
    fh, ino = await new_file(fs)
    await fs.write(fh, 0, b"still here")
    await fs.unlink(ROOT, b"f", CTX)
    assert await fs.read(fh, 0, 100) == b"still here"
    await fs.forget([(ino, fs.lookups[ino])])
    await fs.release(fh)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.getattr(ino)
    assert e.value.errno == errno.ENOENT


async def test_a_file_replaced_while_looked_up_keeps_its_unsealed_data(fs):
    # A reader's path walk found the name, then a rename replaced the file, then the
    # reader opens it: it must read what was written, not the zeros of a dropped buffer.
    fh, ino = await new_file(fs, b"old")
    await fs.write(fh, 0, b"written, not yet sealed")
    await fs.release(fh)
    assert fs.data.has_dirty(ino)
    await fs.lookup(ROOT, b"old", CTX)
    fh2, _ = await new_file(fs, b"new")
    await fs.release(fh2)
    await fs.rename(ROOT, b"new", ROOT, b"old", 0, CTX)
    fh = (await fs.open(ino, os.O_RDONLY, CTX)).fh
    assert await fs.read(fh, 0, 100) == b"written, not yet sealed"
    await fs.release(fh)
    # Once the kernel forgets it too, it goes, buffers and all.
    await fs.forget([(ino, fs.lookups[ino])])
    assert not fs.data.has_dirty(ino)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.getattr(ino)
    assert e.value.errno == errno.ENOENT


async def test_a_closed_files_buffers_go_once_its_blocks_are_stored(fs):
    # Kept, they would grow with every file a long mount writes, and every commit and
    # listing would walk them.
    for i in range(20):
        fh, ino = await new_file(fs, b"f%d" % i)
        await fs.write(fh, 0, b"x" * (BS + 100))
        await fs.release(fh)
    assert len(fs.data.buffers) == 20    # closed, but their last blocks are unsealed
    await fs.txg.commit()
    assert fs.data.buffers == {}
    fh = (await fs.open(ino, os.O_RDONLY, CTX)).fh
    assert await fs.read(fh, 0, 2 * BS) == b"x" * (BS + 100)


async def test_an_open_files_buffers_outlive_a_commit(fs):
    fh, ino = await new_file(fs)
    await fs.write(fh, 0, b"x" * 100)
    await fs.txg.commit()
    assert ino in fs.data.buffers       # a WRITE may still extend what it keeps
    await fs.release(fh)
    assert fs.data.buffers == {}


async def test_a_truncate_of_a_closed_file_leaves_no_buffers(fs):
    fh, ino = await new_file(fs)
    await fs.write(fh, 0, b"a" * (2 * BS))
    await fs.release(fh)
    await fs.txg.commit()
    e = pyfuse3.EntryAttributes()
    e.st_size = BS       # on a block boundary: nothing left to seal
    await fs.setattr(ino, e, fields(update_size=True), None, CTX)   # truncate(path)
    assert fs.data.buffers == {}
    e.st_size = 100      # mid-block: the block now holding the end is rewritten
    await fs.setattr(ino, e, fields(update_size=True), None, CTX)
    await fs.txg.commit()
    assert fs.data.buffers == {}
    e.st_size = BS
    await fs.setattr(ino, e, fields(update_size=True), None, CTX)
    fh = (await fs.open(ino, os.O_RDONLY, CTX)).fh
    assert await fs.read(fh, 0, 2 * BS) == b"a" * 100 + bytes(BS - 100)


async def test_a_seal_ending_during_a_truncate_keeps_the_truncates_buffers(fs, monkeypatch):
    """A closed file's seal that ends while a truncate of it awaits a stored block must
    not drop the buffers the truncate is about to fill: the new end's block would be
    lost, and growing the file back would show the bytes cut off."""
    fh, ino = await new_file(fs)
    await fs.write(fh, 0, b"a" * (3 * BS))
    await fs.fsync(fh, False)
    await fs.write(fh, 2 * BS, b"b" * 10)      # dirty again, then closed
    await fs.release(fh)
    sealed, may_seal, block_read, may_read = (trio.Event() for _ in range(4))
    put_many, block_content = fs.store.blocks.put_many, fs.data._block_content

    async def held_put_many(*args, **kw):
        hashes = await put_many(*args, **kw)
        sealed.set()
        await may_seal.wait()
        return hashes

    async def held_block_content(*args):
        content = await block_content(*args)
        block_read.set()
        await may_read.wait()
        return content

    monkeypatch.setattr(fs.store.blocks, "put_many", held_put_many)
    monkeypatch.setattr(fs.data, "_block_content", held_block_content)

    async def truncate():
        e = pyfuse3.EntryAttributes()
        e.st_size = 100
        await fs.setattr(ino, e, fields(update_size=True), None, CTX)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.data.flush_all)          # block 2 is being sealed
            await sealed.wait()
            nursery.start_soon(truncate)                    # reads block 0 to cut it
            await block_read.wait()
            may_seal.set()                                  # the seal ends first
            await wait_all_tasks_blocked()
            may_read.set()
    await fs.txg.commit()
    e = pyfuse3.EntryAttributes()
    e.st_size = BS
    await fs.setattr(ino, e, fields(update_size=True), None, CTX)
    fh = (await fs.open(ino, os.O_RDONLY, CTX)).fh
    assert await fs.read(fh, 0, BS) == b"a" * 100 + bytes(BS - 100)


async def test_new_files_belong_to_the_caller(fs):
    _, ino = await new_file(fs)
    attr = await fs.getattr(ino)
    assert (attr.st_uid, attr.st_gid) == (1000, 1000)
    assert stat.S_IMODE(attr.st_mode) == 0o644


async def test_fsync_makes_data_durable(fs, tmp_path):
    fh, ino = await new_file(fs)
    await fs.write(fh, 0, b"durable")
    await fs.fsync(fh, False)
    # Another process reading the store sees the committed state (LMDB allows one
    # environment per process, hence the subprocess).
    script = (
        "import sys; from backupfs.store import Store; from backupfs.namespace import Namespace\n"
        "s = Store.open(sys.argv[1], readonly=True)\n"
        "h = Namespace(s).live.block_hash(int(sys.argv[2]), 0)\n"
        "sys.stdout.buffer.write(s.blocks.get(h))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store"), str(ino)],
                         capture_output=True, check=True)
    assert out.stdout == b"durable"


async def test_identical_blocks_are_stored_once(fs):
    data = os.urandom(4 * BS)
    fh1, _ = await new_file(fs, b"a")
    fh2, _ = await new_file(fs, b"b")
    await fs.write(fh1, 0, data)
    await fs.write(fh2, 0, data)
    await fs.flush_everything()
    h = fs.live.block_hash(fs.live.lookup(ROOT, b"a").ino, 0)
    assert fs.store.blocks.refcount(h) == 2


def test_every_handler_answers_with_a_fuse_error_or_a_result():
    """One stray exception ends pyfuse3's loop and the mount with it: every handler
    BackupFS overrides is wrapped by fuse_handler, outermost."""
    wrapper = fuse_handler(lambda: None).__code__
    overridden = [name for name, fn in inspect.getmembers(pyfuse3.Operations, inspect.isfunction)
                  if inspect.iscoroutinefunction(fn) and getattr(BackupFS, name) is not fn]
    assert len(overridden) > 20
    assert [n for n in overridden if getattr(BackupFS, n).__code__ is not wrapper] == []


@pytest.mark.parametrize("error, errno_, logged", [
    (OSError(errno.ENOSPC, "full"), errno.ENOSPC, "handler: [Errno 28] full"),
    (FileNotFoundError(errno.ENOENT, "gone"), errno.ENOENT, None),
    (RuntimeError("a bug"), errno.EIO, "handler: unexpected error, answering EIO"),
    (ExceptionGroup("reads", [CorruptBlock(b"h" * 32, 1, 0, "checksum mismatch")]), errno.EIO,
     "handler: reading a file failed: corrupt block 6868"),
    (OSError("no errno"), errno.EIO, "handler: unexpected error, answering EIO"),
])
async def test_a_handler_maps_every_exception_to_an_errno(error, errno_, logged, caplog):
    @fuse_handler
    async def handler():
        raise error

    with pytest.raises(pyfuse3.FUSEError) as ei:
        await handler()
    assert ei.value.errno == errno_
    messages = [r.getMessage() for r in caplog.records]
    assert (messages == []) if logged is None else messages[-1].startswith(logged)


async def test_corrupt_block_is_eio_never_bad_bytes(fs):
    fh, ino = await new_file(fs)
    await fs.write(fh, 0, os.urandom(BS))
    await fs.fsync(fh, False)
    await fs.release(fh)
    loc = fs.store.blocks.locate(fs.live.block_hash(ino, 0))
    path = fs.store.packs.path(loc.pack_id)
    with open(path, "r+b") as f:
        f.seek(loc.offset + loc.record_len - 1)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    fh = (await fs.open(ino, os.O_RDONLY, CTX)).fh
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.read(fh, 0, BS)
    assert e.value.errno == errno.EIO


async def test_commit_with_a_full_disk_keeps_data_buffered_and_commits_metadata(fs, monkeypatch):
    fh, ino = await new_file(fs)
    await fs.write(fh, 0, b"unsealed")
    real_put_many = fs.store.blocks.put_many

    async def full(blocks, hurry=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs.store.blocks, "put_many", full)
    await fs.mkdir(ROOT, b"made-while-full", stat.S_IFDIR | 0o755, CTX)
    commits = fs.txg.commits
    with pytest.raises(OSError) as e:
        await fs.txg.commit()
    assert e.value.errno == errno.ENOSPC
    assert fs.txg.commits == commits + 1          # the metadata went in all the same
    assert fs.data.has_dirty(ino)                 # the bytes wait, nothing lost
    assert await fs.read(fh, 0, 100) == b"unsealed"
    monkeypatch.setattr(fs.store.blocks, "put_many", real_put_many)
    await fs.txg.commit()                         # space again: stored
    assert not fs.data.has_dirty(ino)
    assert await fs.read(fh, 0, 100) == b"unsealed"


async def test_background_sealers_store_full_blocks_without_a_flush(fs, monkeypatch):
    """With the sealers running, a write of full blocks answers at once and the blocks
    reach the store and the block map in the background; a writer that gets ahead by
    more than SEAL_AHEAD waits; cancelling the sealers loses nothing."""
    from backupfs.fs import filedata

    monkeypatch.setattr(filedata, "SEAL_AHEAD", 4 * BS)
    fh, ino = await new_file(fs)
    data = os.urandom(64 * BS)
    seal_calls = []
    real_seal_many = fs.data.seal_many

    async def seal_many(wanted, hurry=False):
        seal_calls.append(len(list(wanted)))
        await real_seal_many(wanted, hurry)

    monkeypatch.setattr(fs.data, "seal_many", seal_many)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.data.run_sealers)
            while not fs.data._sealers:
                await trio.lowlevel.checkpoint()
            for off in range(0, 32 * BS, 8 * BS):
                await fs.write(fh, off, data[off:off + 8 * BS])
                # Backpressure: never more than SEAL_AHEAD queued behind the sealers.
                assert len(fs.data._full) * BS <= 4 * BS + 8 * BS
            while fs.data.pending_blocks(ino):
                await trio.sleep(0.01)
            assert seal_calls and max(seal_calls) <= filedata.SEAL_BATCH
            live = fs.ns.live
            assert all(live.block_hash(ino, n) is not None for n in range(32))
            # Cancelled with work queued: the blocks stay dirty, nothing is dropped.
            await fs.write(fh, 32 * BS, data[32 * BS:])
            nursery.cancel_scope.cancel()
    assert fs.data._sealers == 0
    await fs.fsync(fh, False)
    await fs.release(fh)
    fh = (await fs.open(ino, os.O_RDONLY, CTX)).fh
    assert await fs.read(fh, 0, len(data)) == data
    assert all(fs.ns.live.block_hash(ino, n) is not None for n in range(64))


async def test_the_per_write_capability_probe_costs_no_lmdb_work(fs, monkeypatch):
    """The kernel asks for security.capability before every write: a file known to have
    no xattrs is answered from memory; setting one makes it be read again."""
    calls = []
    for method in ("getxattr", "listxattr"):
        real = getattr(fs.live, method)

        def counted(*args, real=real, method=method):
            calls.append(method)
            return real(*args)

        monkeypatch.setattr(fs.live, method, counted)
    cap = b"security.capability"

    async def probe(ino):
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await fs.getxattr(ino, cap, CTX)
        assert ei.value.errno == pyfuse3.ENOATTR

    _, new = await new_file(fs, name=b"new")
    for _ in range(3):
        await probe(new)
    assert calls == []  # created here: known to have none
    fs._no_xattrs.discard(new)  # as after a remount
    for _ in range(3):
        await probe(new)
    assert calls == ["listxattr"]  # learnt once
    await fs.setxattr(new, cap, b"\x01\x00\x00\x02" + bytes(16), CTX)
    assert await fs.getxattr(new, cap, CTX) == b"\x01\x00\x00\x02" + bytes(16)
    await fs.removexattr(new, cap, CTX)
    await probe(new)


async def test_buffered_bytes_stay_under_the_dirty_limit(fs):
    """Partial blocks, which no sealer takes, of many files at once: past the dirty
    limit a write seals them all in one batch, so the daemon's memory stays bounded,
    and nothing is lost."""
    fs.data.dirty_limit = 8 * BS
    files = []
    for i in range(40):
        fh, ino = await new_file(fs, name=b"f%d" % i)
        await fs.write(fh, 0, b"x" * 100 + bytes([i]))
        assert fs.data.dirty_bytes <= fs.data.dirty_limit
        files.append((fh, ino))
    assert sum(fs.ns.live.block_hash(ino, 0) is not None for _, ino in files) >= 36
    for i, (fh, ino) in enumerate(files):
        assert await fs.read(fh, 0, 200) == b"x" * 100 + bytes([i])


async def test_sealers_hurry_only_while_writes_outpace_them(fs, monkeypatch):
    """A block stored before the next arrives is compressed at the store's level; a
    backlog of half the sealers' allowance or more asks for the faster one."""
    from backupfs.fs import filedata

    monkeypatch.setattr(filedata, "SEAL_AHEAD", 4 * BS)
    calls = []
    real_put_many = fs.store.blocks.put_many

    async def put_many(blocks, hurry=False):
        calls.append((len(blocks), hurry))
        return await real_put_many(blocks, hurry)

    monkeypatch.setattr(fs.store.blocks, "put_many", put_many)
    fh, ino = await new_file(fs)

    async def stored():
        while fs.data.pending_blocks(ino):
            await trio.sleep(0.01)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.data.run_sealers)
            while not fs.data._sealers:
                await trio.lowlevel.checkpoint()
            for n in range(3):
                await fs.write(fh, n * BS, os.urandom(BS))
                await stored()
            assert calls == [(1, False)] * 3
            calls.clear()
            await fs.write(fh, 3 * BS, os.urandom(8 * BS))    # twice the allowance at once
            await stored()
            assert calls == [(8, True)]
            nursery.cancel_scope.cancel()
    calls.clear()
    await fs.write(fh, 11 * BS, b"tail")
    await fs.fsync(fh, False)                          # an fsync's seal is never hurried
    assert calls == [(1, False)]


async def test_a_sealer_that_fails_keeps_the_blocks_and_the_mount(fs, monkeypatch):
    """An unexpected error while sealing (a bug, say) must not end the sealers, whose
    nursery is the daemon's: the blocks go back to dirty and the next seal stores them."""

    fh, ino = await new_file(fs)
    data = os.urandom(8 * BS)
    real_put_many = fs.store.blocks.put_many
    failures = []

    async def put_many(blocks, hurry=False):
        if not failures:
            failures.append(len(blocks))
            raise RuntimeError("injected sealing bug")
        return await real_put_many(blocks, hurry)

    monkeypatch.setattr(fs.store.blocks, "put_many", put_many)
    monkeypatch.setattr(trio, "sleep", _fast_sleep(trio.sleep))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.data.run_sealers)
            while not fs.data._sealers:
                await trio.lowlevel.checkpoint()
            await fs.write(fh, 0, data)
            while not failures:
                await trio.lowlevel.checkpoint()
            assert fs.data.has_dirty(ino)  # given back, not dropped
            await fs.fsync(fh, False)  # the sealers are alive; this seals for real
            assert fs.data._sealers == 1
            nursery.cancel_scope.cancel()
    assert all(fs.ns.live.block_hash(ino, n) is not None for n in range(8))
    assert await fs.read(fh, 0, len(data)) == data


def _fast_sleep(real_sleep):
    async def sleep(seconds):
        await real_sleep(min(seconds, 0.01))
    return sleep
