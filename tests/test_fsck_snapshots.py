"""fsck checks each snapshot's tree from the one before it and what was born between
them (admin/snapshot_trees.py), not by counting every tree whole: checked here against
a count of each tree whole, over random histories of namespace changes, snapshots,
deletions and damage written straight into the tables."""

from __future__ import annotations

import re
import stat
import struct
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupfs.admin.fsck import Fsck
from backupfs.admin.snapshot_trees import SnapshotTrees
from backupfs.namespace import ROOT_INO
from backupfs.namespace.records import U64, entry_prefix, inode_prefix, pack_inode, unpack_inode
from test_namespace_gc import fresh_namespace

NAMES = [b"a", b"b", b"c"]
PICK = st.integers(0, 1000)   # an index into whatever exists when the step runs
NAME = st.sampled_from(NAMES)

CHANGES = [
    st.tuples(st.just("mkdir"), PICK, NAME),
    st.tuples(st.just("mkdir"), PICK, NAME),
    st.tuples(st.just("create"), PICK, NAME),
    st.tuples(st.just("create"), PICK, NAME),
    st.tuples(st.just("create"), PICK, NAME),
    st.tuples(st.just("link"), PICK, PICK, NAME),
    st.tuples(st.just("unlink"), PICK, NAME),
    st.tuples(st.just("rmdir"), PICK, NAME),
    st.tuples(st.just("rename"), PICK, NAME, PICK, NAME),
    st.tuples(st.just("reclaim"), PICK),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("delete"), PICK),
]
DAMAGE = [
    st.tuples(st.just("ghost entry"), PICK, NAME, st.integers(0, 3)),  # names a missing inode
    st.tuples(st.just("entry to"), PICK, NAME, PICK),    # points an entry at any inode
    st.tuples(st.just("drop entry"), PICK, NAME),
    st.tuples(st.just("nlink"), PICK, st.integers(-2, 2)),
    st.tuples(st.just("drop inode"), PICK),
    st.tuples(st.just("restore inode"), PICK),            # back as it was when dropped
    st.tuples(st.just("flip kind"), PICK),                # a file becomes a directory or back
]


class _Skip(Exception):
    """A step with nothing to act on."""


def apply(ns, ops) -> bool:
    """Run the steps; whether any damaged the tree."""
    live = ns.live
    now = iter(range(10**9, 10**10))
    inos, dropped, snaps = [ROOT_INO], {}, []
    damaged = False

    def dirs():  # not those removed (still open, say): the kernel creates nothing there
        return [i for i in inos if (a := _attr(live, i)) and stat.S_ISDIR(a.mode) and a.nlink]

    def pick(seq, i):
        if not seq:
            raise _Skip
        return seq[i % len(seq)]

    for op in ops:
        kind = op[0]
        try:
            if kind in ("mkdir", "create"):
                mode = (stat.S_IFDIR | 0o755) if kind == "mkdir" else (stat.S_IFREG | 0o644)
                inos.append(live.create(pick(dirs(), op[1]), op[2], mode, 0, 0, next(now)).ino)
            elif kind == "link":
                live.link(pick(inos, op[1]), pick(dirs(), op[2]), op[3], next(now))
            elif kind == "unlink":
                live.unlink(pick(dirs(), op[1]), op[2], next(now))
            elif kind == "rmdir":
                live.rmdir(pick(dirs(), op[1]), op[2], next(now))
            elif kind == "rename" and not damaged:  # damage may loop its walk up to the root
                live.rename(pick(dirs(), op[1]), op[2], pick(dirs(), op[3]), op[4], 0, next(now))
            elif kind == "reclaim":
                ns.reclaim(pick(ns.orphans(), op[1]))
            elif kind == "snapshot":
                snaps.append(ns.snapshot(now_ns=next(now)))
            elif kind == "delete" and snaps:
                ns.delete_snapshot(snaps.pop(op[1] % len(snaps)).id)
            else:
                damaged |= damage(ns, op, inos, dropped, dirs(), pick)
        except (OSError, _Skip):
            pass
        except struct.error:
            assert damaged  # a link count below 0, from damage: the namespace trusts it
    return damaged


def damage(ns, op, inos, dropped, dirs, pick) -> bool:
    kind, live = op[0], ns.live
    if kind == "ghost entry":
        ns.entries.write(entry_prefix(pick(dirs, op[1]), op[2]), U64.pack(10**6 + op[3]))
    elif kind == "entry to":
        ns.entries.write(entry_prefix(pick(dirs, op[1]), op[2]), U64.pack(pick(inos, op[3])))
    elif kind == "drop entry":
        ns.entries.write(entry_prefix(pick(dirs, op[1]), op[2]), None)
    elif kind == "nlink":
        attr = live.getattr(pick(inos, op[1]))
        ns.inodes.write(inode_prefix(attr.ino), pack_inode(attr.changed(nlink=max(0, attr.nlink + op[2]))))
    elif kind == "drop inode":
        attr = live.getattr(pick(inos[1:], op[1]))  # not the root: nothing would follow
        dropped[attr.ino] = attr
        ns.inodes.write(inode_prefix(attr.ino), None)
    elif kind == "restore inode":
        attr = dropped.pop(pick(sorted(dropped), op[1]))
        ns.inodes.write(inode_prefix(attr.ino), pack_inode(attr))
    elif kind == "flip kind":
        attr = live.getattr(pick(inos[1:], op[1]))
        flipped = stat.S_IFREG if stat.S_ISDIR(attr.mode) else stat.S_IFDIR
        ns.inodes.write(inode_prefix(attr.ino),
                        pack_inode(attr.changed(mode=flipped | stat.S_IMODE(attr.mode))))
    else:
        return False
    return True


def _attr(view, ino):
    try:
        return view.getattr(ino)
    except OSError:
        return None


def counted_whole(ns, epoch) -> set[tuple]:
    """The model: every problem of the tree at `epoch`, from every entry and inode."""
    inodes = {U64.unpack(p)[0]: unpack_inode(U64.unpack(p)[0], v)
              for p, v in ns.inodes.scan(b"", epoch)}
    names, inside, subdirs = Counter(), Counter(), Counter()
    for p, v in ns.entries.scan(b"", epoch):
        parent, child = U64.unpack_from(p)[0], U64.unpack(v)[0]
        names[child] += 1
        inside[parent] += 1
        if child in inodes and stat.S_ISDIR(inodes[child].mode):
            subdirs[parent] += 1
    found = {("dangling-entry", i) for i, n in names.items() if n and i not in inodes}
    found |= {("stray-entry", d) for d, n in inside.items()
              if n and (d not in inodes or not stat.S_ISDIR(inodes[d].mode))}
    for ino, attr in inodes.items():
        if not names[ino] and ino != ROOT_INO:
            want = 0
        else:
            want = 2 + subdirs[ino] if stat.S_ISDIR(attr.mode) else names[ino]
        if attr.nlink != want:
            found.add(("nlink", ino, want))
    return found


def per_view(problems, count: int) -> list[set[tuple]]:
    views: list[set[tuple]] = [set() for _ in range(count)]
    for p in problems:
        key = (p.kind, p.ino)
        if p.kind == "nlink":
            key += (int(re.search(r"(\d+) expected", p.message).group(1)),)
        for i in range(p.first, p.last + 1):
            views[i].add(key)
    return views


def check_against_whole_counts(ns) -> list[set[tuple]]:
    epochs = [r.epoch for r in ns.snapshots()] + [ns.epoch]
    want = [counted_whole(ns, e) for e in epochs]
    for trust_births in (True, False):
        found = SnapshotTrees(ns, trust_births).run(epochs)
        assert per_view(found, len(epochs)) == want
    return want


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.one_of(*CHANGES, *DAMAGE), min_size=20, max_size=80))
def test_each_snapshots_problems_from_what_changed_equal_a_whole_count(ops):
    with fresh_namespace() as ns:
        apply(ns, ops)
        check_against_whole_counts(ns)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.one_of(*CHANGES), min_size=20, max_size=80))
def test_namespace_changes_alone_leave_no_problem_in_any_snapshot(ops):
    with fresh_namespace() as ns:
        assert not apply(ns, ops)
        assert check_against_whole_counts(ns) == [set()] * (len(ns.snapshots()) + 1)


def test_unchanged_snapshots_are_not_counted_again(monkeypatch):
    """Only the first tree is counted whole; the rest cost what changed."""
    with fresh_namespace() as ns:
        live = ns.live
        d = live.create(ROOT_INO, b"d", stat.S_IFDIR | 0o755, 0, 0, 1).ino
        for i in range(50):
            live.create(d, b"f%d" % i, stat.S_IFREG | 0o644, 0, 0, 1)
        for i in range(5):
            ns.snapshot(now_ns=10 + i)
            live.create(ROOT_INO, b"new%d" % i, stat.S_IFREG | 0o644, 0, 0, 1)
        whole = []
        real = SnapshotTrees._count_whole
        monkeypatch.setattr(SnapshotTrees, "_count_whole",
                            lambda self, e: whole.append(e) or real(self, e))
        judged = []
        real_judge = SnapshotTrees._problems_of
        monkeypatch.setattr(SnapshotTrees, "_problems_of",
                            lambda self, c, e, ino: judged.append(ino) or real_judge(self, c, e, ino))
        trees = SnapshotTrees(ns)
        epochs = [r.epoch for r in ns.snapshots()]
        assert trees.run(epochs) == []
        assert whole == [epochs[0]]
        # 52 inodes in the first; then one new file and the root for each of four more
        assert len(judged) == 52 + 4 * 2
        assert trees.inodes_checked == sum(52 + i for i in range(5))


def test_fsck_names_the_snapshots_a_problem_is_seen_in():
    with fresh_namespace() as ns:
        live = ns.live
        f = live.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, 0, 0, 1)
        ns.snapshot(now_ns=10**18)
        attr = live.getattr(f.ino)
        ns.inodes.write(inode_prefix(f.ino), pack_inode(attr.changed(nlink=3)))  # damage
        first = ns.snapshot(now_ns=2 * 10**18)
        last = ns.snapshot(now_ns=3 * 10**18)
        ns.inodes.write(inode_prefix(f.ino), pack_inode(attr))                   # mended
        ns.snapshot(now_ns=4 * 10**18)
        report = Fsck(ns.store, ns, show_progress=False).run()
        trees = [p for p in report.problems if p.kind == "nlink"]
        assert [p.message for p in trees] == [
            f"snapshots {first.name} to {last.name} (2): inode {f.ino} has link count 3, "
            f"1 expected"]
        assert report.checked["snapshots"] == 4
