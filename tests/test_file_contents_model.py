"""File contents against a bytearray: random writes, truncates, reads and fsyncs on one
file through the Operations (no kernel), with the background sealers on or off, must read
back exactly what the model holds, before and after the store is closed and reopened
(then with or without a decoder process).

This covers the dirty-buffer layer where it is subtle: a block buffered as a view of the
write that covered it whole and then changed in part, a block written again while it is
being sealed, a truncate into buffered and stored blocks, all-zero blocks as holes."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from unittest import mock
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupfs.fs import BackupFS, filedata
from backupfs.namespace import Namespace
from backupfs.store import Store

BS = 4096
CTX = SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022)
SIZE_FIELDS = SimpleNamespace(update_atime=False, update_mtime=False, update_ctime=False,
                              update_mode=False, update_uid=False, update_gid=False,
                              update_size=True)

# Offsets and lengths mostly on or next to block boundaries, where the buffering changes
# its mind (a block written whole is kept as a view; a part of one is copied).
offsets = st.one_of(st.integers(0, 8).map(lambda n: n * BS),
                    st.integers(0, 8 * BS),
                    st.tuples(st.integers(0, 8), st.integers(-2, 2)).map(
                        lambda t: max(0, t[0] * BS + t[1])))
lengths = st.one_of(st.integers(1, 3).map(lambda n: n * BS),
                    st.integers(0, 3 * BS),
                    st.integers(1, 16))
fills = st.sampled_from(["random", "random", "byte", "zeros", "zeros then random"])
write = st.tuples(st.just("write"), offsets, lengths, fills)

op = st.one_of(
    write, write, write,
    st.tuples(st.just("truncate"), st.one_of(offsets, st.integers(0, 9 * BS))),
    st.tuples(st.just("read"), offsets, lengths),
    st.tuples(st.just("fsync")),
    st.tuples(st.just("pause")),  # lets the background sealers catch up
)


def payload(fill: str, n: int, seed: int) -> bytes:
    if fill == "zeros":
        return bytes(n)
    if fill == "zeros then random":  # not a hole, though it starts like one
        return bytes(n - n // 4) + os.urandom(n // 4)
    if fill == "byte":
        return bytes([seed % 251 + 1]) * n
    return os.urandom(n)


async def run_ops(ops, sealers: bool, root: Path) -> bytes:
    store = Store.open(root)
    fs = BackupFS(store, Namespace(store))
    model = bytearray()
    info, entry = await fs.create(pyfuse3.ROOT_INODE, b"f", stat.S_IFREG | 0o644,
                                  os.O_RDWR, CTX)
    fh, ino = info.fh, entry.st_ino

    async def check(off: int, size: int) -> None:
        got = await fs.read(fh, off, size)
        assert got == bytes(model[off:off + size]), (off, size)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            if sealers:
                nursery.start_soon(fs.data.run_sealers)
                while not fs.data._sealers:  # else full blocks are sealed in the write
                    await trio.lowlevel.checkpoint()
            for i, (name, *args) in enumerate(ops):
                if name == "write":
                    off, n, fill = args
                    data = payload(fill, n, i)
                    assert await fs.write(fh, off, data) == n
                    if n:
                        if len(model) < off:
                            model.extend(bytes(off - len(model)))
                        model[off:off + n] = data
                elif name == "truncate":
                    attr = pyfuse3.EntryAttributes()
                    attr.st_size = args[0]
                    await fs.setattr(ino, attr, SIZE_FIELDS, fh, CTX)
                    del model[args[0]:]
                    model.extend(bytes(args[0] - len(model)))
                elif name == "read":
                    await check(*args)
                elif name == "fsync":
                    await fs.fsync(fh, False)
                else:
                    await trio.sleep(0.002)
                assert (await fs.getattr(ino)).st_size == len(model)
            await check(0, len(model) + BS)
            nursery.cancel_scope.cancel()
    await fs.fsync(fh, False)
    await fs.release(fh)
    store.close(commit=True)
    return bytes(model)


async def read_back(root: Path, decoders: bool) -> bytes:
    """The whole file after a reopen, checked piece by piece against itself too; with
    `decoders`, every read of stored blocks a decoder process can take goes to one."""
    store = Store.open(root)
    if decoders:
        store.blocks.use_decoders(1)
    try:
        fs = BackupFS(store, Namespace(store))
        entry = await fs.lookup(pyfuse3.ROOT_INODE, b"f", CTX)
        ino, size = entry.st_ino, entry.st_size
        fh = (await fs.open(ino, os.O_RDONLY, CTX)).fh
        reads = [(0, size + BS)] + [(off, 2 * BS + 3)
                                    for off in range(0, size + 1, 3 * BS // 2 + 1)]
        whole = bytes(await fs.read(fh, *reads[0]))
        for off, n in reads[1:]:
            assert bytes(await fs.read(fh, off, n)) == whole[off:off + n]
        # A decoder answered exactly the reads it can take: of stored blocks only, all
        # whole but the last (one read at a time here, so it is always idle).
        def runs(off: int, n: int) -> bool:
            blocks = range(off // BS, (min(off + n, size) - 1) // BS + 1)
            hashes = [fs.ns.live.block_hash(ino, b) for b in blocks]
            return off < size and None not in hashes and all(
                store.blocks.locate(h).raw_len == BS for h in hashes[:-1])
        served = store.blocks.decoders.served if decoders else 0
        assert served == (sum(runs(off, n) for off, n in reads) if decoders else 0)
        return whole
    finally:
        store.blocks.stop_decoders()
        store.close(commit=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=40), sealers=st.booleans(), decoders=st.booleans())
def test_random_file_operations_match_a_bytearray(ops, sealers, decoders):
    d = Path(tempfile.mkdtemp(prefix="bkfs-contents-"))
    try:
        Store.init(d / "s", block_size=BS)
        # Truncates release stored blocks two at a time: the chunked path, every time.
        with mock.patch.object(filedata, "DROP_CHUNK", 2):
            expected = trio.run(run_ops, ops, sealers, d / "s")
        assert trio.run(read_back, d / "s", decoders) == expected
    finally:
        shutil.rmtree(d)
