"""`stats` computes each view's usage from the one before it and what changed between
them (births and the deadlist), not by walking every view: checked here against the
walk, over random histories of writes, hard links, unlinked files still open,
snapshots, deletions (some left half done) and garbage collection."""

from __future__ import annotations

import stat

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupfs.admin.stats import usage_by_view
from backupfs.admin.block_users import walk_files
from backupfs.namespace import ROOT_INO
from test_namespace_gc import BS, CONTENTS, FILES, fresh_namespace

OPS = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(FILES), st.integers(0, 2),
              st.sampled_from(CONTENTS)),
    st.tuples(st.just("hole"), st.sampled_from(FILES), st.integers(0, 2)),
    # A block's content changed, its inode record not (write_blocks rewrites the inode
    # only when the count of stored blocks changes).
    st.tuples(st.just("overwrite"), st.sampled_from(FILES), st.integers(0, 2),
              st.sampled_from(CONTENTS)),
    st.tuples(st.just("truncate"), st.sampled_from(FILES), st.integers(0, 3 * BS)),
    st.tuples(st.just("replace"), st.sampled_from(FILES)),   # unlink, reclaim, create anew
    st.tuples(st.just("orphan"), st.sampled_from(FILES)),    # unlink, kept open; create anew
    st.tuples(st.just("link"), st.sampled_from(FILES)),      # a second name for the file
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("delete"), st.integers(0, 30)),
    st.tuples(st.just("start delete"), st.integers(0, 30)),  # one piece freed, the rest left
    st.tuples(st.just("gc")),
)


def walked_usage(view, locations: dict) -> dict:
    """The model: every regular file reached from the root, once however many names."""
    seen: dict[int, tuple[int, int]] = {}
    for _, attr in walk_files(view):
        if attr.ino not in seen:
            referenced = sum(locations[h].raw_len for _, h in view.block_range(attr.ino)
                             if h in locations)
            seen[attr.ino] = (attr.size, referenced)
    return {"files": len(seen), "logical_bytes": sum(s for s, _ in seen.values()),
            "referenced_bytes": sum(r for _, r in seen.values())}


def run(ns, ops) -> None:
    live, blocks = ns.live, ns.store.blocks
    now = iter(range(10**9, 10**10))
    inos = {n: live.create(ROOT_INO, n, stat.S_IFREG | 0o644, 0, 0, next(now)).ino
            for n in FILES}
    snaps, deletion = [], None

    def finish_deletion():
        nonlocal deletion
        if deletion is not None:
            while not deletion.free_some(2):
                pass
            deletion = None

    for op in ops:
        kind = op[0]
        if kind == "write":
            _, name, n, content = op
            live.write_block(inos[name], n, blocks.put(content))
            size = live.getattr(inos[name]).size
            live.setattr(inos[name], size=max(size, n * BS + len(content)))
        elif kind == "overwrite":
            _, name, n, content = op
            live.write_block(inos[name], n, blocks.put(content))
        elif kind == "hole":
            live.write_block(inos[op[1]], op[2], None)
        elif kind == "truncate":
            live.setattr(inos[op[1]], size=op[2])
        elif kind in ("replace", "orphan"):
            name = op[1]
            for other in [n for n in list_names(live) if n == b"L" + name]:
                live.unlink(ROOT_INO, other, next(now))
            assert live.unlink(ROOT_INO, name, next(now)).nlink == 0
            if kind == "replace":
                ns.reclaim(inos[name])
            inos[name] = live.create(ROOT_INO, name, stat.S_IFREG | 0o644, 0, 0, next(now)).ino
        elif kind == "link" and live.child(ROOT_INO, b"L" + op[1]) is None:
            live.link(inos[op[1]], ROOT_INO, b"L" + op[1], next(now))
        elif kind == "snapshot":
            snaps.append(ns.snapshot(now_ns=next(now)))
        elif kind == "delete" and snaps:
            finish_deletion()
            ns.delete_snapshot(snaps.pop(op[1] % len(snaps)).id)
        elif kind == "start delete" and snaps:
            finish_deletion()
            deletion = ns.start_deleting(snaps.pop(op[1] % len(snaps)).id)
            deletion.free_some(1)
        elif kind == "gc":
            ns.collect_garbage(2)


def list_names(view) -> list[bytes]:
    return [name for name, _ in view.readdir(ROOT_INO)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=60))
def test_each_views_usage_from_what_changed_equals_the_walk(ops):
    with fresh_namespace() as ns:
        run(ns, ops)
        locations = {loc.hash: loc for loc in ns.store.blocks.iter_locations()}
        epochs = sorted(set(ns.snapshot_epochs())) + [ns.epoch]
        usage = usage_by_view(ns, epochs, locations)
        assert usage[ns.epoch] == walked_usage(ns.live, locations)
        for r in ns.snapshots():
            assert usage[r.epoch] == walked_usage(ns.view(r.epoch), locations), r


def test_usage_counts_a_file_once_and_skips_unlinked_open_ones():
    with fresh_namespace() as ns:
        live, blocks = ns.live, ns.store.blocks
        a = live.create(ROOT_INO, b"a", stat.S_IFREG | 0o644, 0, 0, 1).ino
        live.write_block(a, 0, blocks.put(b"x" * BS))
        live.setattr(a, size=BS)
        live.link(a, ROOT_INO, b"a2", 2)
        gone = live.create(ROOT_INO, b"gone", stat.S_IFREG | 0o644, 0, 0, 3).ino
        live.write_block(gone, 0, blocks.put(b"y" * BS))
        live.setattr(gone, size=BS)
        snap = ns.snapshot(now_ns=4)
        live.unlink(ROOT_INO, b"gone", 5)   # open somewhere: its blocks stay
        locations = {loc.hash: loc for loc in blocks.iter_locations()}
        usage = usage_by_view(ns, [snap.epoch, ns.epoch], locations)
        assert usage[snap.epoch] == {"files": 2, "logical_bytes": 2 * BS,
                                     "referenced_bytes": 2 * BS}
        assert usage[ns.epoch] == {"files": 1, "logical_bytes": BS, "referenced_bytes": BS}


def test_a_block_rewritten_in_place_of_another_is_seen():
    """Replacing a block by another leaves the inode record as it was (the count of
    stored blocks is the same): the block map's births alone show the change."""
    with fresh_namespace() as ns:
        live, blocks = ns.live, ns.store.blocks
        f = live.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, 0, 0, 1).ino
        live.write_block(f, 0, blocks.put(b"x" * 100))
        live.setattr(f, size=BS)
        snap = ns.snapshot(now_ns=2)
        live.write_block(f, 0, blocks.put(b"y" * BS))
        locations = {loc.hash: loc for loc in blocks.iter_locations()}
        usage = usage_by_view(ns, [snap.epoch, ns.epoch], locations)
        assert usage[snap.epoch]["referenced_bytes"] == 100
        assert usage[ns.epoch]["referenced_bytes"] == BS
