"""Replication against the namespace's own views (hypothesis stateful testing).

The namespace machine's random steps (creates, links, renames, writes, truncates,
xattrs, snapshots, snapshot deletions in pieces, garbage collection) run on a source
store, with three more rules: replicate into a second store, write into that replica's
live tree, and replicate with --rollback. After every step, every replica snapshot that
the source still has must read exactly as the source's (paths, inode numbers,
attributes, block maps, xattrs), the replica's live tree as its newest snapshot unless
written into, and the replica's versions and block refcounts must be exact.
"""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from backupfs.namespace import ROOT_INO, Namespace
from backupfs.namespace.records import U64, unpack_inode
from backupfs.admin import replication
from backupfs.admin.replication import ReplicationError, plan, run, same_snapshot
from backupfs.store import Store, codec
from nsmodel import check_versions_exact, describe_view
from test_namespace_model import BS, NamespaceMachine


class ReplicationMachine(NamespaceMachine):
    def __init__(self):
        super().__init__()
        self.replicas = 0
        self._new_replica()

    def _new_replica(self) -> None:
        self.replicas += 1
        path = self.tmp / f"replica-{self.replicas}"
        Store.init(path, block_size=BS)
        self.rstore = Store.open(path)
        self.rns = Namespace(self.rstore)
        self.written_into = False

    def _replace_replica(self) -> None:
        self.rstore.close()
        self._new_replica()

    # -- rules -------------------------------------------------------------------------

    @rule(rollback=st.booleans())
    def replicate(self, rollback):
        ours = self.rns.snapshots()
        theirs = self.ns.snapshots()
        base = next((s for s in theirs if ours and same_snapshot(s, ours[-1])), None)
        not_a_replica = (ours and base is None) or (self.written_into and not ours)
        if not_a_replica or (self.written_into and not rollback):
            with pytest.raises(ReplicationError):
                plan(self.ns, self.rns, rollback)
            if not_a_replica:
                self._replace_replica()  # what the error says to do
            return
        done = list(run(plan(self.ns, self.rns, rollback), self.ns, self.rns, rollback))
        assert [s.name for s in done if not s.rollback] == \
            [s.name for s in theirs if base is None or s.epoch > base.epoch]
        assert [s.rollback for s in done].count(True) == self.written_into
        self.written_into = False
        # Run again: nothing left to send.
        assert list(run(plan(self.ns, self.rns), self.ns, self.rns)) == []

    @rule(rollback=st.booleans())
    def snapshot_and_replicate(self, rollback):
        """The nightly job: a snapshot, sent at once."""
        self.snapshot(hold=False, label="nightly")
        self.replicate(rollback)

    @rule(name=st.sampled_from([b"local", b"a"]), how=st.sampled_from(["new", "link", "unlink"]))
    def write_into_replica(self, name, how):
        """A user writing into the replica's live tree: a new file, a new name, or a name
        removed while the file is open (an orphan, until closed)."""
        live = self.rns.live
        if how == "unlink":
            files = [n for n, a in live.readdir(ROOT_INO) if stat.S_ISREG(a.mode)]
            if not files:
                return
            live.unlink(ROOT_INO, files[0], self.now())
            self.written_into = True
            return
        if live.child(ROOT_INO, name) is not None:
            return
        if how == "link":
            files = [a.ino for _, a in live.readdir(ROOT_INO) if stat.S_ISREG(a.mode)]
            if not files:
                return
            live.link(files[0], ROOT_INO, name, self.now())
        else:
            attr = live.create(ROOT_INO, name, stat.S_IFREG | 0o644, 0, 0, self.now())
            live.write_block(attr.ino, 0, self.rstore.blocks.put(b"replica only"))
        self.written_into = True

    @precondition(lambda self: self.rns.snapshots())
    @rule()
    def delete_oldest_replica_snapshot(self):
        """The replica's own retention: any but the newest may go."""
        ours = self.rns.snapshots()
        if len(ours) > 1:
            self.rns.delete_snapshot(ours[0].id)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def replica_snapshots_read_as_the_sources(self):
        theirs = {(s.name, s.created_ns): s for s in self.ns.snapshots()}
        ours = self.rns.snapshots()
        for s in ours:
            source = theirs.get((s.name, s.created_ns))
            paths, _ = described = describe_view(self.rns.view(s.epoch), BS)
            if source is not None:
                assert s.label == source.label
                assert described == describe_view(self.ns.view(source.epoch), BS), s.name
            # A file made in the replica never takes a number a replicated one has.
            assert all(ino < self.rns.next_ino for ino in paths.values())
        if ours and not self.written_into:
            assert describe_view(self.rns.live, BS) == describe_view(self.rns.view(ours[-1].epoch), BS)

    @invariant()
    def replica_holds_only_reachable_files(self):
        """No record of a file no name reaches (an open unlinked file's, or a removed
        file's block map) in any replica view, nor an orphan: nothing there would ever
        free them."""
        views = [self.rns.view(s.epoch) for s in self.rns.snapshots()]
        if not self.written_into:
            views.append(self.rns.live)
            assert self.rns.orphans() == []
        for view in views:
            paths, _ = describe_view(view, BS)
            inodes = {U64.unpack_from(p)[0]: unpack_inode(U64.unpack_from(p)[0], v)
                      for p, v in self.rns.inodes.scan(b"", view.epoch)}
            assert set(inodes) == set(paths.values()) | {ROOT_INO}
            assert all(a.nlink > 0 for a in inodes.values())
            for table in (self.rns.blockmap, self.rns.xattrs):
                owners = {U64.unpack_from(p)[0] for p, _ in table.scan(b"", view.epoch)}
                assert owners <= set(inodes), table.name

    @invariant()
    def replica_versions_and_refcounts_are_exact(self):
        refs = check_versions_exact(self.rns)
        for loc in self.rstore.blocks.iter_locations():
            assert loc.refcount == refs.get(loc.hash, 0), loc
            # Compaction finds unreferenced blocks by the dead index.
            assert self.rstore.blocks.in_dead_index(loc) == (loc.refcount == 0), loc
            if loc.refcount:
                assert self.rstore.blocks.get(loc.hash)  # readable, checked

    def teardown(self):
        try:
            self.rstore.close(commit=False)
        finally:
            super().teardown()


ReplicationMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("REPLICATION_EXAMPLES", 40)), stateful_step_count=40,
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_replication_against_the_source = ReplicationMachine.TestCase


# -- the cases the machine reaches rarely, one by one ---------------------------------


@pytest.fixture
def machine():
    m = ReplicationMachine()
    yield m
    m.teardown()


def new_file(m, name: bytes, content: bytes = b"x" * 100) -> int:
    attr = m.ns.live.create(ROOT_INO, name, stat.S_IFREG | 0o644, 0, 0, m.now())
    m.ns.live.write_block(attr.ino, 0, m.store.blocks.put(content))
    m.ns.live.setattr(attr.ino, size=len(content))
    return attr.ino


def send_all(m, rollback: bool = False) -> list:
    return list(run(plan(m.ns, m.rns, rollback), m.ns, m.rns, rollback))


def check(m) -> None:
    m.replica_snapshots_read_as_the_sources()
    m.replica_holds_only_reachable_files()
    m.replica_versions_and_refcounts_are_exact()


def test_a_file_open_but_unlinked_at_the_snapshot_is_not_sent(machine):
    m = machine
    new_file(m, b"kept")
    gone = new_file(m, b"open")
    m.ns.live.unlink(ROOT_INO, b"open", m.now())   # still open: an orphan
    m.ns.snapshot(now_ns=m.now())
    [sent] = send_all(m)
    assert m.rns.inodes.read(U64.pack(gone), m.rns.epoch) is None
    check(m)
    m.ns.reclaim(gone)                              # closed; its records go later
    m.ns.snapshot(now_ns=m.now())
    send_all(m)
    check(m)


def test_a_file_removed_since_the_base_is_freed_in_the_replica(machine):
    """The source has not yet freed the file's block map when the next snapshot is
    taken (its garbage collection runs later): the replica frees it all the same."""
    m = machine
    ino = new_file(m, b"soon gone", b"only here")
    m.ns.snapshot(now_ns=m.now())
    send_all(m)
    h = m.rns.blockmap.read(U64.pack(ino) + U64.pack(0), m.rns.epoch)
    m.ns.live.unlink(ROOT_INO, b"soon gone", m.now())
    m.ns.reclaim(ino)
    m.ns.snapshot(now_ns=m.now())
    assert m.ns.blockmap.read(U64.pack(ino) + U64.pack(0), m.ns.epoch) is not None
    send_all(m)
    check(m)
    m.rns.delete_snapshot(m.rns.snapshots()[0].id)  # the replica's retention
    assert m.rstore.blocks.refcount(h) == 0


def test_a_rollback_names_again_a_file_unlinked_in_the_replica(machine):
    m = machine
    ino = new_file(m, b"f")
    m.ns.snapshot(now_ns=m.now())
    send_all(m)
    m.rns.live.unlink(ROOT_INO, b"f", m.now())      # open in the replica's mount
    assert m.rns.orphans() == [ino]
    with pytest.raises(ReplicationError, match="--rollback"):
        plan(m.ns, m.rns)
    [undone] = send_all(m, rollback=True)
    assert undone.rollback and m.rns.orphans() == []
    assert m.rns.live.lookup(ROOT_INO, b"f").nlink == 1
    check(m)


def test_an_interrupted_send_keeps_the_blocks_it_committed(machine, monkeypatch):
    """Blocks go over first, committed as they go, as blocks nothing refers to yet; a
    send cut short after them leaves a consistent replica, and the next run takes them
    as they are instead of copying them again."""
    m = machine
    contents = [bytes([i]) * 1000 for i in range(5)]
    for i, c in enumerate(contents):
        new_file(m, b"f%d" % i, c)
    m.ns.snapshot(now_ns=m.now())
    m.store.commit()
    monkeypatch.setattr(replication, "COMMIT_BYTES", 1)  # a commit after every block

    def cut_short(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(replication.Sender, "_copy", cut_short)
    with pytest.raises(KeyboardInterrupt):
        send_all(m)
    m.rstore.close(commit=False)                  # what the command does then
    m.rstore = Store.open(m.rstore.path)
    m.rns = Namespace(m.rstore)
    assert m.rns.snapshots() == []
    dead = [loc for loc in m.rstore.blocks.iter_locations()]
    assert len(dead) == 5 and all(loc.refcount == 0 for loc in dead)
    check(m)                                      # exact: unreferenced, listed dead
    monkeypatch.undo()
    [sent] = send_all(m)
    assert (sent.blocks_copied, sent.blocks_shared) == (0, 5)
    check(m)
    assert all(loc.refcount == 1 for loc in m.rstore.blocks.iter_locations())


def test_a_snapshot_being_deleted_in_the_replica_is_not_sent_over_it(machine):
    m = machine
    new_file(m, b"f")
    m.ns.snapshot(now_ns=m.now())
    new_file(m, b"g")
    m.ns.snapshot(now_ns=m.now())
    send_all(m)
    second = m.rns.snapshots()[-1]
    m.rns.mark_deleting(second.id)   # deleted in the replica's mount while open there
    with pytest.raises(ReplicationError, match="--rollback"):
        plan(m.ns, m.rns)
    with pytest.raises(ReplicationError, match=f"{second.name} that is being deleted"):
        plan(m.ns, m.rns, rollback=True)
    m.rns.delete_snapshot(second.id)  # what the next mount does
    done = send_all(m, rollback=True)
    assert [(s.name, s.rollback) for s in done] == [(m.rns.snapshots()[0].name, True),
                                                   (second.name, False)]
    check(m)


def test_a_version_1_source_goes_into_a_checked_replica(tmp_path):
    """Records of a store made before records carried a checksum are encoded again as
    the replica's (format version 2), not copied as they are."""
    Store.init(tmp_path / "old", block_size=BS)
    cfg = tmp_path / "old" / "config.toml"
    cfg.write_text(cfg.read_text().replace("format_version = 2", "format_version = 1"))
    source = Store.open(tmp_path / "old")
    ns = Namespace(source)
    data = [b"text " * 500, bytes(range(256)) * 16]
    for i, content in enumerate(data):
        attr = ns.live.create(ROOT_INO, b"f%d" % i, stat.S_IFREG | 0o644, 0, 0, i)
        ns.live.write_block(attr.ino, 0, source.blocks.put(content))
        ns.live.setattr(attr.ino, size=len(content))
    ns.snapshot(now_ns=1)
    source.commit()
    Store.init(tmp_path / "replica", block_size=BS)
    replica = Store.open(tmp_path / "replica")
    try:
        rns = Namespace(replica)
        [sent] = run(plan(ns, rns), ns, rns)
        assert sent.blocks_copied == 2
        assert describe_view(rns.view(rns.snapshots()[0].epoch), BS) == \
            describe_view(ns.view(ns.snapshots()[0].epoch), BS)
        refs = check_versions_exact(rns)
        for loc in replica.blocks.iter_locations():
            assert loc.codec & codec.CHECKED and loc.refcount == refs[loc.hash] == 1
            assert not replica.blocks.in_dead_index(loc)
        assert sorted(replica.blocks.get(h) for h in refs) == sorted(data)
    finally:
        replica.close()
        source.close()
