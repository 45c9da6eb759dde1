"""`verify` names the files that use a bad block from the oldest view's block map and
what was born since (admin/block_users.py), not by walking every view: checked here
against the walk, over random histories of writes, directories, renames, hard links,
files unlinked while open, snapshots and their deletion."""

from __future__ import annotations

import stat

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupfs.admin.block_users import walk_files
from backupfs.admin.verify import BadBlock, VerifyState, name_users
from backupfs.namespace import ROOT_INO
from test_namespace_gc import BS, fresh_namespace

CONTENTS = [b"A" * BS, b"B" * 10, b"C" * 100, b"D" * BS, b"E"]
PICK = st.integers(0, 1000)
NAME = st.sampled_from([b"a", b"b", b"c"])

OPS = st.one_of(
    st.tuples(st.just("mkdir"), PICK, NAME),
    st.tuples(st.just("create"), PICK, NAME),
    st.tuples(st.just("create"), PICK, NAME),
    st.tuples(st.just("write"), PICK, st.integers(0, 2), st.integers(0, len(CONTENTS) - 1)),
    st.tuples(st.just("write"), PICK, st.integers(0, 2), st.integers(0, len(CONTENTS) - 1)),
    st.tuples(st.just("hole"), PICK, st.integers(0, 2)),
    st.tuples(st.just("link"), PICK, PICK, NAME),
    st.tuples(st.just("unlink"), PICK, NAME),
    st.tuples(st.just("rename"), PICK, NAME, PICK, NAME),
    st.tuples(st.just("reclaim"), PICK),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("delete"), PICK),
)


def run(ns, ops) -> None:
    live, blocks = ns.live, ns.store.blocks
    now = iter(range(10**9, 10**10))
    inos, snaps = [ROOT_INO], []

    def kind(want):
        out = []
        for i in inos:
            try:
                a = live.getattr(i)
            except OSError:
                continue
            if want(a.mode) and (a.nlink or not stat.S_ISDIR(a.mode)):
                out.append(i)
        return out or None

    for op in ops:
        dirs, files = kind(stat.S_ISDIR), kind(stat.S_ISREG)
        try:
            if op[0] in ("mkdir", "create"):
                mode = stat.S_IFDIR | 0o755 if op[0] == "mkdir" else stat.S_IFREG | 0o644
                inos.append(live.create(dirs[op[1] % len(dirs)], op[2], mode, 0, 0, next(now)).ino)
            elif op[0] == "write" and files:
                live.write_block(files[op[1] % len(files)], op[2], blocks.put(CONTENTS[op[3]]))
            elif op[0] == "hole" and files:
                live.write_block(files[op[1] % len(files)], op[2], None)
            elif op[0] == "link" and files:
                live.link(files[op[1] % len(files)], dirs[op[2] % len(dirs)], op[3], next(now))
            elif op[0] == "unlink":
                live.unlink(dirs[op[1] % len(dirs)], op[2], next(now))
            elif op[0] == "rename":
                live.rename(dirs[op[1] % len(dirs)], op[2], dirs[op[3] % len(dirs)], op[4], 0,
                            next(now))
            elif op[0] == "reclaim" and ns.orphans():
                ns.reclaim(ns.orphans()[op[1] % len(ns.orphans())])
            elif op[0] == "snapshot":
                snaps.append(ns.snapshot(now_ns=next(now)))
            elif op[0] == "delete" and snaps:
                ns.delete_snapshot(snaps.pop(op[1] % len(snaps)).id)
        except OSError:
            pass  # EEXIST, ENOENT, EISDIR, ENOTEMPTY, EINVAL: the step does nothing


def walked(ns, bad: set[bytes]) -> set[tuple[str, str]]:
    """The model: (hash, "where: path") from walking every view's files."""
    views = [("live", ns.live)] + [(f"snapshot {r.name}", ns.view(r.epoch))
                                   for r in ns.snapshots()]
    found = set()
    for where, view in views:
        for path, attr in walk_files(view):
            for _, h in view.block_range(attr.ino):
                if h in bad:
                    found.add((h.hex(), f"{where}: {path.decode()}"))
    return found


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=10, max_size=70),
       bad=st.sets(st.integers(0, len(CONTENTS) - 1), min_size=1))
def test_the_users_of_bad_blocks_from_what_changed_equal_the_walk(ops, bad):
    with fresh_namespace() as ns:
        run(ns, ops)
        hashes = {ns.store.blocks.put(CONTENTS[i]) for i in bad}
        state = VerifyState(scope="all", started=0.0,
                            bad=[vars(BadBlock(h.hex(), 0, 0, "test")) for h in hashes])
        name_users(ns, state)
        named = [(b["hash"], use) for b in state.bad for use in b["used_by"]]
        assert len(named) == len(set(named))  # each use once
        assert set(named) == walked(ns, hashes)
