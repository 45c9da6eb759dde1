"""The namespace against a plain in-memory model (hypothesis stateful testing).

Random creates, links, unlinks, rmdirs, renames (all flags), block writes, truncates,
xattrs, snapshots (held or not) and snapshot deletions (whole, or in pieces with other
steps between them), commits and garbage collection.
After every step the live view and every remaining snapshot view must equal the model's
tree at that moment, every stored version must be visible to someone (GC exactness), and
every block's refcount must equal the versions that refer to it. At the end, deleting all
snapshots and the whole tree must bring every refcount to zero.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from backupfs.namespace import (RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INO, Namespace,
                                SnapshotHeld)
from backupfs.namespace import paths
from backupfs.namespace.namespace import InodeSet
from backupfs.store import Store
from nsmodel import MInode, Model, assert_view_matches, check_versions_exact, expect_errno

BS = 4096
NAMES = st.sampled_from([b"a", b"b", b"c", b"d\xff", b"e e"])
CONTENTS = st.sampled_from([None, b"x" * 100, b"y" * BS, b"z", b"x" * 100 + b"!"])
KINDS = st.sampled_from(["file", "dir", "symlink", "fifo"])
MODES = {"file": stat.S_IFREG | 0o644, "dir": stat.S_IFDIR | 0o755,
         "symlink": stat.S_IFLNK | 0o777, "fifo": stat.S_IFIFO | 0o600}


class NamespaceMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="nsmodel-"))
        Store.init(self.tmp / "s", block_size=BS)
        self.store = Store.open(self.tmp / "s")
        self.ns = Namespace(self.store)
        self.live = self.ns.live
        self.model = Model(self.live.getattr(ROOT_INO))
        self.snaps: list[tuple[object, Model]] = []   # (record, frozen model)
        self.orphans: set[int] = set()
        self.clock = 1_000_000_000
        self.deletion = None   # a snapshot deletion under way, freed in pieces

    def now(self) -> int:
        self.clock += 1
        return self.clock

    # -- picking things --------------------------------------------------------------

    def pick_dir(self, data) -> int:
        return data.draw(st.sampled_from(sorted(d for d in self.model.dirs)))

    def pick_file(self, data) -> int | None:
        files = sorted(i for i in self.model.reachable().values()
                       if stat.S_ISREG(self.model.inodes[i].mode))
        return data.draw(st.sampled_from(files)) if files else None

    def pick_any(self, data) -> int:
        return data.draw(st.sampled_from(sorted(set(self.model.reachable().values())
                                                | {ROOT_INO})))

    def _drop_link(self, ino: int) -> None:
        node = self.model.inodes[ino]
        node.nlink = 0 if stat.S_ISDIR(node.mode) else node.nlink - 1
        if node.nlink == 0:
            self.orphans.add(ino)
            self.model.dirs.pop(ino, None)

    # -- rules: the tree -------------------------------------------------------------

    @rule(data=st.data(), kind=KINDS, name=NAMES)
    def create(self, data, kind, name):
        parent = self.pick_dir(data)
        target = b"target/" + name if kind == "symlink" else None
        exists = name in self.model.dirs[parent]
        attr = expect_errno(errno.EEXIST if exists else None, self.live.create, parent, name,
                            MODES[kind], 1000, 100, self.now(), target=target)
        if attr is None:
            return
        mode, gid = MODES[kind], 100
        pnode = self.model.inodes[parent]
        if pnode.mode & stat.S_ISGID:  # a setgid directory hands on its group
            gid = pnode.gid
            mode |= stat.S_ISGID if kind == "dir" else 0
        self.model.inodes[attr.ino] = MInode(
            attr.ino, mode, 1000, gid, size=len(target or b""),
            nlink=2 if kind == "dir" else 1, atime_ns=self.clock, target=target or b"",
            parent=parent)
        self.model.dirs[parent][name] = attr.ino
        if kind == "dir":
            self.model.dirs[attr.ino] = {}
            self.model.inodes[parent].nlink += 1

    @rule(data=st.data(), name=NAMES)
    def link(self, data, name):
        ino = self.pick_file(data)
        if ino is None:
            return
        parent = self.pick_dir(data)
        code = errno.EEXIST if name in self.model.dirs[parent] else None
        if expect_errno(code, self.live.link, ino, parent, name, self.now()) is not None:
            self.model.dirs[parent][name] = ino
            self.model.inodes[ino].nlink += 1
            self.model.inodes[ino].parent = parent

    @rule(data=st.data(), name=NAMES)
    def unlink(self, data, name):
        parent = self.pick_dir(data)
        child = self.model.dirs[parent].get(name)
        code = errno.ENOENT if child is None else errno.EISDIR if self.model.is_dir(child) else None
        if expect_errno(code, self.live.unlink, parent, name, self.now()) is not None:
            del self.model.dirs[parent][name]
            self._drop_link(child)

    @rule(data=st.data(), name=NAMES)
    def rmdir(self, data, name):
        parent = self.pick_dir(data)
        child = self.model.dirs[parent].get(name)
        code = (errno.ENOENT if child is None else
                errno.ENOTDIR if not self.model.is_dir(child) else
                errno.ENOTEMPTY if self.model.dirs[child] else None)
        if expect_errno(code, self.live.rmdir, parent, name, self.now()) is not None:
            del self.model.dirs[parent][name]
            self.model.inodes[parent].nlink -= 1
            self._drop_link(child)

    @rule(data=st.data(), old_name=NAMES, new_name=NAMES,
          flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, data, old_name, new_name, flags):
        m = self.model
        op, np_ = self.pick_dir(data), self.pick_dir(data)
        src, dst = m.dirs[op].get(old_name), m.dirs[np_].get(new_name)
        code, outcome = self._expected_rename(op, src, np_, dst, flags)
        result = expect_errno(code, self.live.rename, op, old_name, np_, new_name, flags,
                              self.now())
        if code is not None or outcome == "noop":
            assert result is None
            return
        if outcome == "exchange":
            m.dirs[op][old_name], m.dirs[np_][new_name] = dst, src
            m.inodes[src].parent, m.inodes[dst].parent = np_, op
            if op != np_:
                delta = int(m.is_dir(src)) - int(m.is_dir(dst))
                m.inodes[op].nlink -= delta
                m.inodes[np_].nlink += delta
            return
        del m.dirs[op][old_name]
        m.dirs[np_][new_name] = src
        m.inodes[src].parent = np_
        if m.is_dir(src) and op != np_:
            m.inodes[op].nlink -= 1
            m.inodes[np_].nlink += 1
        if dst is not None:
            assert result is not None and result.ino == dst
            if m.is_dir(dst):
                m.inodes[np_].nlink -= 1
            self._drop_link(dst)
            assert result.nlink == m.inodes[dst].nlink
        else:
            assert result is None

    def _expected_rename(self, op, src, np_, dst, flags):
        m = self.model
        if src is None:
            return errno.ENOENT, None
        if flags & RENAME_EXCHANGE:
            if dst is None:
                return errno.ENOENT, None
            if src == dst:
                return None, "noop"
            if (m.is_dir(src) and m.is_ancestor(src, np_)) or \
                    (m.is_dir(dst) and m.is_ancestor(dst, op)):
                return errno.EINVAL, None
            return None, "exchange"
        if dst is not None and flags & RENAME_NOREPLACE:
            return errno.EEXIST, None
        if m.is_dir(src) and m.is_ancestor(src, np_):
            return errno.EINVAL, None
        if dst is not None:
            if dst == src:
                return None, "noop"
            if m.is_dir(src) and not m.is_dir(dst):
                return errno.ENOTDIR, None
            if not m.is_dir(src) and m.is_dir(dst):
                return errno.EISDIR, None
            if m.is_dir(dst) and m.dirs[dst]:
                return errno.ENOTEMPTY, None
        return None, "move"

    # -- rules: contents and attributes ----------------------------------------------

    @rule(data=st.data(), writes=st.lists(st.tuples(st.integers(0, 5), CONTENTS),
                                          min_size=1, max_size=3))
    def write_blocks(self, data, writes):
        """One block through write_block, several (the same one twice, maybe) through
        write_blocks, as the filesystem seals them."""
        ino = self.pick_file(data)
        if ino is None:
            return
        blocks = [(n, self.store.blocks.put(c) if c is not None else None) for n, c in writes]
        if len(blocks) == 1:
            self.live.write_block(ino, *blocks[0])
        else:
            self.live.write_blocks(ino, blocks)
        node = self.model.inodes[ino]
        for (n, h), (_, content) in zip(blocks, writes):
            if h is None:
                node.blocks.pop(n, None)
            else:
                node.blocks[n] = h
            end = n * BS + (len(content) if content else 0)
            if end > node.size:
                self.live.setattr(ino, size=end)
                node.size = end

    @rule(data=st.data(), size=st.integers(0, 6 * BS))
    def truncate(self, data, size):
        ino = self.pick_file(data)
        if ino is None:
            return
        self.live.setattr(ino, size=size)
        node = self.model.inodes[ino]
        keep = -(-size // BS)
        node.blocks = {n: h for n, h in node.blocks.items() if n < keep}
        node.size = size

    @rule(data=st.data(), mode=st.sampled_from([0o600, 0o755, 0o4711, 0o2750]),
          uid=st.integers(0, 3), atime=st.integers(0, 2**62))
    def setattr(self, data, mode, uid, atime):
        ino = self.pick_any(data)
        node = self.model.inodes[ino]
        node.mode = stat.S_IFMT(node.mode) | mode
        node.uid, node.atime_ns = uid, atime
        self.live.setattr(ino, mode=node.mode, uid=uid, atime_ns=atime)

    @rule(data=st.data(), name=st.sampled_from([b"user.a", b"user.b", b"trusted.c"]),
          value=st.sampled_from([b"", b"1", b"two"]), remove=st.booleans())
    def xattr(self, data, name, value, remove):
        ino = self.pick_any(data)
        node = self.model.inodes[ino]
        if remove:
            code = None if name in node.xattrs else errno.ENODATA
            expect_errno(code, self.live.removexattr, ino, name)
            node.xattrs.pop(name, None)
        else:
            self.live.setxattr(ino, name, value)
            node.xattrs[name] = value

    # -- rules: snapshots, commits, garbage ------------------------------------------

    @rule(hold=st.booleans(), label=st.sampled_from([None, "nightly"]))
    def snapshot(self, hold, label):
        record = self.ns.snapshot(label=label, hold=hold, now_ns=self.now())
        assert record.label == label and record.hold == hold
        self.snaps.append((record, self.model.copy()))

    @precondition(lambda self: self.snaps and self.deletion is None)
    @rule(data=st.data(), release_first=st.booleans(), in_pieces=st.booleans())
    def delete_snapshot(self, data, release_first, in_pieces):
        """Whole, or started here and freed a piece at a time by `free_some` below, with
        any other rules run between the pieces."""
        i = data.draw(st.integers(0, len(self.snaps) - 1))
        record, _ = self.snaps[i]
        if record.hold and release_first:
            record = self.ns.set_hold(record.id, False)
        delete = self.ns.start_deleting if in_pieces else self.ns.delete_snapshot
        if record.hold:
            with pytest.raises(SnapshotHeld):
                delete(record.id)
            return
        deletion = delete(record.id)
        if in_pieces:
            self.deletion = deletion
        del self.snaps[i]

    @precondition(lambda self: self.deletion is not None)
    @rule(budget=st.integers(1, 3))
    def free_some(self, budget):
        snap_id = self.deletion.record.id
        if self.deletion.free_some(budget):
            self.deletion = None
            assert snap_id not in {r.id for r in self.ns.catalog.records}
        else:
            assert self.ns.catalog.get(snap_id).deleting

    @precondition(lambda self: self.orphans)
    @rule()
    def reclaim(self):
        assert sorted(self.ns.orphans()) == sorted(self.orphans)
        for ino in self.orphans:
            self.ns.reclaim(ino)
            del self.model.inodes[ino]
        self.orphans.clear()

    @rule(budget=st.integers(1, 4))
    def collect_garbage(self, budget):
        self.ns.collect_garbage(budget)

    @rule()
    def commit(self):
        self.store.commit()

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def views_match_the_model(self):
        assert_view_matches(self.live, self.model, BS)
        assert [r.id for r in self.ns.snapshots()] == [r.id for r, _ in self.snaps]
        for record, frozen in self.snaps:
            assert_view_matches(self.ns.view(record.epoch), frozen, BS)

    @invariant()
    def paths_follow_recorded_directories(self):
        """path_of names each inode by its recorded directory, as the model says, in
        the live view and every snapshot: the path it gives is always one of the
        inode's, and only a file whose recorded directory no longer names it has none."""
        views = [(self.live, self.model)] + [(self.ns.view(r.epoch), m) for r, m in self.snaps]
        for view, model in views:
            for ino in set(model.reachable().values()):
                expected = model.recorded_path(ino)
                assert paths.path_of(self.ns, view, ino) == expected, ino
                if model.is_dir(ino):
                    assert expected is not None

    @invariant()
    def live_caches_match_the_store(self):
        """What each table keeps in memory for the live epoch is what LMDB holds."""
        for table in self.ns.tables.values():
            for prefix, cached in table._recent.items():
                stored = table.versions(prefix)
                expect = (stored[0][0], stored[0][1], len(stored) > 1) if stored else None
                assert cached == expect, (table.name, prefix)
        # The orphan set's copy in memory (asked on every FORGET), against LMDB, a copy
        # loaded afresh (as at the next mount) and the model.
        stored = {ino for ino, _ in self.ns.orphan_set.items()}
        assert self.ns.orphan_set._mirror == stored == self.orphans
        assert InodeSet(self.store, "orphans", mirrored=True)._mirror == stored
        assert all(ino in self.ns.orphan_set for ino in stored)
        assert ROOT_INO not in self.ns.orphan_set

    @invariant()
    def garbage_collection_is_exact(self):
        refs = check_versions_exact(self.ns)
        for loc in self.store.blocks.iter_locations():
            assert loc.refcount == refs.get(loc.hash, 0), loc

    def teardown(self):
        try:
            self._delete_everything()
        finally:
            self.store.close(commit=False)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _delete_everything(self):
        if self.deletion is not None:
            self.deletion.free_some()
        for record in self.ns.snapshots():
            if record.hold:
                self.ns.set_hold(record.id, False)
            self.ns.delete_snapshot(record.id)
        self._remove_tree(ROOT_INO)
        for name in self.live.listxattr(ROOT_INO):
            self.live.removexattr(ROOT_INO, name)
        for ino in self.ns.orphans():
            self.ns.reclaim(ino)
        while self.ns.collect_garbage(3):
            pass
        assert all(loc.refcount == 0 for loc in self.store.blocks.iter_locations())
        check_versions_exact(self.ns)
        for table in (self.ns.entries, self.ns.blockmap, self.ns.xattrs):
            assert self.store.txn.stat(table.db)["entries"] == 0, table.name
        assert self.store.txn.stat(self.ns.inodes.db)["entries"] == 1  # the root
        assert len(self.ns.deadlist) == 0

    def _remove_tree(self, ino):
        for name, attr in list(self.live.readdir(ino)):
            if stat.S_ISDIR(attr.mode):
                self._remove_tree(attr.ino)
                self.live.rmdir(ino, name, self.now())
            else:
                self.live.unlink(ino, name, self.now())


NamespaceMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("NS_EXAMPLES", 60)), stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_namespace_against_model = NamespaceMachine.TestCase
