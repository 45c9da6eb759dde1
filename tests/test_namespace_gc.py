"""Deleting snapshots frees exactly what nobody sees any more (the deadlist rule), and
readdir stays exact while a directory empties under it."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupfs.namespace import ROOT_INO, Namespace
from backupfs.store import Store
from backupfs.store.codec import block_hash
from nsmodel import check_versions_exact

BS = 4096
FILES = [b"f0", b"f1", b"f2"]
CONTENTS = [b"A", b"B" * 10, b"C" * 100, b"D" * BS]

OPS = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(FILES), st.integers(0, 2),
              st.sampled_from(CONTENTS)),
    st.tuples(st.just("hole"), st.sampled_from(FILES), st.integers(0, 2)),
    st.tuples(st.just("truncate"), st.sampled_from(FILES), st.integers(0, 3 * BS)),
    st.tuples(st.just("replace"), st.sampled_from(FILES)),   # unlink, reclaim, create anew
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("delete"), st.integers(0, 30)),
    st.tuples(st.just("delete"), st.integers(0, 30)),
    st.tuples(st.just("gc")),
)


def read_files(view) -> dict[bytes, tuple]:
    out = {}
    for name, attr in view.readdir(ROOT_INO):
        out[name] = (attr.size, tuple(view.block_range(attr.ino)))
    return out


@contextmanager
def fresh_namespace():
    tmp = Path(tempfile.mkdtemp(prefix="nsgc-"))
    Store.init(tmp / "s", block_size=BS)
    store = Store.open(tmp / "s")
    try:
        yield Namespace(store)
    finally:
        store.close(commit=False)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def ns():
    with fresh_namespace() as ns:
        yield ns


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=50))
def test_deleting_snapshots_frees_exactly_the_invisible_versions(ops):
    with fresh_namespace() as ns:
        run_program(ns, ops)


def run_program(ns, ops):
    live, blocks = ns.live, ns.store.blocks
    now = iter(range(10**9, 10**10))
    inos = {n: live.create(ROOT_INO, n, stat.S_IFREG | 0o644, 0, 0, next(now)).ino
            for n in FILES}
    model = {n: (0, {}) for n in FILES}              # name -> (size, {block: hash})
    snaps = []                                        # (record, frozen model)

    def as_view(m):
        return {n: (size, tuple(sorted(b.items()))) for n, (size, b) in m.items()}

    for op in ops:
        kind = op[0]
        if kind == "write":
            _, name, n, content = op
            size, bmap = model[name]
            h = blocks.put(content)
            live.write_block(inos[name], n, h)
            end = max(size, n * BS + len(content))
            live.setattr(inos[name], size=end)
            model[name] = (end, {**bmap, n: h})
        elif kind == "hole":
            _, name, n = op
            live.write_block(inos[name], n, None)
            size, bmap = model[name]
            model[name] = (size, {k: v for k, v in bmap.items() if k != n})
        elif kind == "truncate":
            _, name, size = op
            live.setattr(inos[name], size=size)
            keep = -(-size // BS)
            model[name] = (size, {k: v for k, v in model[name][1].items() if k < keep})
        elif kind == "replace":
            name = op[1]
            assert live.unlink(ROOT_INO, name, next(now)).nlink == 0
            ns.reclaim(inos[name])
            inos[name] = live.create(ROOT_INO, name, stat.S_IFREG | 0o644, 0, 0, next(now)).ino
            model[name] = (0, {})
        elif kind == "snapshot":
            snaps.append((ns.snapshot(now_ns=next(now)), as_view(model)))
        elif kind == "delete" and snaps:
            record, _ = snaps.pop(op[1] % len(snaps))
            ns.delete_snapshot(record.id)
        elif kind == "gc":
            ns.collect_garbage(2)
        # Nothing still visible was freed ...
        assert read_files(live) == as_view(model)
        for record, frozen in snaps:
            assert read_files(ns.view(record.epoch)) == frozen
        # ... and nothing invisible remains; refcounts equal the references.
        refs = check_versions_exact(ns)
        for loc in blocks.iter_locations():
            assert loc.refcount == refs.get(loc.hash, 0)


def test_second_snapshot_with_no_change_between_keeps_shared_versions(ns):
    """A version born at the epoch of the previous snapshot is still that snapshot's."""
    ino = ns.live.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, 0, 0, 1).ino
    ns.live.write_block(ino, 0, ns.store.blocks.put(b"old"))
    ns.live.setattr(ino, size=3)
    first = ns.snapshot(now_ns=2 * 10**9)
    second = ns.snapshot(now_ns=3 * 10**9)
    ns.live.write_block(ino, 0, ns.store.blocks.put(b"new"))
    ns.delete_snapshot(second.id)
    h = ns.view(first.epoch).block_hash(ino, 0)
    assert ns.store.blocks.get(h) == b"old"
    check_versions_exact(ns)


def test_a_name_removed_twice_across_snapshots_leaves_no_tombstone(ns):
    """Found by the model test: removed, snapshot, created and removed again gives two
    tombstones in a row. Deleting the snapshots must drop both, not only the oldest."""
    live = ns.live
    live.create(ROOT_INO, b"a", stat.S_IFREG | 0o644, 0, 0, 1)
    ns.snapshot(now_ns=2 * 10**9)
    live.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0, 3)
    ns.snapshot(now_ns=4 * 10**9)
    live.create(ROOT_INO, b"a", stat.S_IFREG | 0o644, 0, 0, 5)
    live.unlink(ROOT_INO, b"a", 6)
    for record in ns.snapshots():
        ns.delete_snapshot(record.id)
    check_versions_exact(ns)
    assert live.child(ROOT_INO, b"a") is None
    names = [k for k, _ in ns.store.txn.cursor(db=ns.entries.db)]
    assert len(names) == 1  # "b" alone: nothing is left of "a"


def test_a_deletion_in_pieces_frees_what_writes_between_the_pieces_kill(ns):
    """A snapshot freed a piece at a time, while the live tree goes on changing: a
    version only it saw, killed after the walk has passed the key its deadlist entry
    would have, must still be freed, and the snapshots left must read as before."""
    live, blocks = ns.live, ns.store.blocks
    inos = []
    for i in range(6):
        ino = live.create(ROOT_INO, b"f%d" % i, stat.S_IFREG | 0o644, 0, 0, 1).ino
        live.write_block(ino, 0, blocks.put(b"old %d" % i))
        live.setattr(ino, size=5)
        inos.append(ino)
    keep = ns.snapshot(now_ns=2 * 10**9)
    kept_view = read_files(ns.view(keep.epoch))
    for ino in inos:  # born after `keep`: seen by `doomed` alone once killed
        live.write_block(ino, 0, blocks.put(b"mid %d" % ino))
    doomed = ns.snapshot(now_ns=3 * 10**9)
    for ino in inos[3:]:
        live.write_block(ino, 0, blocks.put(b"new %d" % ino))
    deletion = ns.start_deleting(doomed.id)
    assert not deletion.free_some(1)
    assert [r.id for r in ns.snapshots()] == [keep.id]
    for ino in inos[:3]:  # their deadlist keys would sort before where the walk is
        live.write_block(ino, 0, blocks.put(b"late %d" % ino))
    ns.snapshot(now_ns=4 * 10**9)  # taken mid-deletion: it sees only the live tree
    while not deletion.free_some(1):
        check_versions_exact(ns)
    assert deletion.freed == 3   # the three killed before it started; the others at once
    assert read_files(ns.view(keep.epoch)) == kept_view
    refs = check_versions_exact(ns)
    for loc in blocks.iter_locations():
        assert loc.refcount == refs.get(loc.hash, 0)
    assert not any(refs.get(block_hash(b"mid %d" % ino)) for ino in inos)


def test_snapshot_is_one_small_write_whatever_the_tree_size(ns):
    for i in range(2000):
        ns.live.create(ROOT_INO, b"%d" % i, stat.S_IFREG | 0o644, 0, 0, i)
    txn = ns.store.txn

    def total_entries():
        return sum(txn.stat(t.db)["entries"] for t in ns.tables.values()) + \
            txn.stat(ns.deadlist.db)["entries"]

    before = total_entries()
    record = ns.snapshot()
    assert total_entries() == before          # no record of the tree was copied
    assert ns.epoch == record.epoch + 1
    # Changing one file after the snapshot costs one new version, not a copy.
    ns.live.setattr(ns.live.lookup(ROOT_INO, b"7").ino, mode=stat.S_IFREG | 0o600)
    assert total_entries() == before + 2      # the new inode version + its deadlist entry


def test_readdir_resumes_exactly_while_entries_are_removed(ns):
    """Like `rm -rf`: list a batch, unlink it, resume after the last name seen."""
    live = ns.live
    d = live.create(ROOT_INO, b"d", stat.S_IFDIR | 0o755, 0, 0, 1).ino
    names = {b"entry-%05d" % i for i in range(10_000)}
    for name in names:
        live.create(d, name, stat.S_IFREG | 0o644, 0, 0, 2)
    snap = ns.snapshot()
    seen: list[bytes] = []
    after = None
    while True:
        batch = []
        for name, _ in live.readdir(d, after):
            batch.append(name)
            live.unlink(d, name, 3)        # removed while the listing goes on
            if len(batch) == 97:
                break
        if not batch:
            break
        seen += batch
        after = batch[-1]
    assert len(seen) == len(set(seen)) == 10_000
    assert set(seen) == names
    assert live.is_empty_dir(d)
    # The snapshot still lists all of them, in byte order.
    listed = [n for n, _ in ns.view(snap.epoch).readdir(d)]
    assert listed == sorted(names)


def test_garbage_collection_reads_no_more_than_its_budget(ns, monkeypatch):
    """The daemon releases a deleted file's records a small budget at a time, between
    requests: each call must cost its budget, not the whole file (it read every entry
    of the file for every budget, ~0.3 s per call for 131,072 blocks)."""
    live, blocks = ns.live, ns.store.blocks
    ino = live.create(ROOT_INO, b"big", stat.S_IFREG | 0o644, 0, 0, 1).ino
    h = blocks.put(b"x")
    for n in range(2000):
        blocks.incref(h)
        live.write_block(ino, n, h)
    live.setattr(ino, size=2000 * BS)
    live.unlink(ROOT_INO, b"big", 2)
    ns.reclaim(ino)
    scan, pulled = ns.blockmap.scan, []

    def counted(*args, **kw):
        for item in scan(*args, **kw):
            pulled.append(item)
            yield item

    monkeypatch.setattr(ns.blockmap, "scan", counted)
    calls = 0
    while ns.collect_garbage(100):
        calls += 1
        assert len(pulled) <= 101 * calls
    assert calls == 20 and blocks.refcount(h) == 1  # the put's own reference
    check_versions_exact(ns)


def test_a_listing_goes_on_across_commits_and_changes(ns):
    """One scan keeps its cursor while the transaction lasts; a commit between two items
    (a transaction group while an admin walk waits) must not end or misplace it, nor
    must names created or removed behind and ahead of it."""
    live = ns.live
    d = live.create(ROOT_INO, b"d", stat.S_IFDIR | 0o755, 0, 0, 1).ino
    for i in range(0, 100, 2):
        live.create(d, b"n%03d" % i, stat.S_IFREG | 0o644, 0, 0, 2)
    ns.store.commit()
    listed = []
    for name, attr in live.readdir(d):
        listed.append(name)
        if name == b"n020":
            ns.store.commit()
            live.unlink(d, b"n030", 3)                                    # ahead: gone
            live.create(d, b"n031", stat.S_IFREG | 0o644, 0, 0, 3)       # ahead: listed
            live.create(d, b"n011", stat.S_IFREG | 0o644, 0, 0, 3)       # behind: not
        if name == b"n050":
            ns.store.commit()
            ns.store.commit()
            live.unlink(d, b"n052", 4)
        assert live.child(d, name) == attr.ino  # each name with its own inode
    expected = [b"n%03d" % i for i in range(0, 100, 2) if i not in (30, 52)] + [b"n031"]
    assert listed == sorted(expected)


def test_a_deleted_snapshots_name_is_not_given_again(ns):
    """Two snapshots in one second are T and T-2; after both are deleted, the next in
    that second is T-3, and the name given last survives a reopen of the store."""
    second = 1_700_000_000 * 10**9
    first = ns.snapshot(now_ns=second)
    again = ns.snapshot(now_ns=second + 1)
    assert again.name == first.name + "-2"
    ns.delete_snapshot(again.id)
    ns.delete_snapshot(first.id)
    assert ns.snapshot(now_ns=second + 2).name == first.name + "-3"
    path = ns.store.path
    ns.store.close()
    with Store.open(path) as store:
        reopened = Namespace(store)
        for r in reopened.snapshots():
            reopened.delete_snapshot(r.id)
        assert reopened.snapshot(now_ns=second + 3).name == first.name + "-4"
        # The next second starts again at its plain name.
        later = reopened.snapshot(now_ns=second + 10**9)
        assert later.name != first.name and "-" not in later.name[10:]


def test_an_epoch_index_walked_in_pieces_gives_every_entry_once_in_order(ns):
    live = ns.live
    for e in range(4):
        for i in range(5):
            live.create(ROOT_INO, b"e%d-%d" % (e, i), stat.S_IFREG | 0o644, 0, 0, 1)
        ns.snapshot(now_ns=10**18 + e)
    whole = ns.births.between(2, ns.epoch)
    assert len(whole) > 10
    for piece in (1, 3, len(whole), len(whole) + 1):
        assert list(ns.births.walk(2, ns.epoch, piece)) == whole
    assert list(ns.births.walk(ns.epoch + 1, ns.epoch + 5, 3)) == []
