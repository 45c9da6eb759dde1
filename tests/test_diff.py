"""`backupfs diff` against a model of what the test changed."""

from __future__ import annotations

import random
import stat

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupfs.admin.diff import Change, diff
from backupfs.namespace import ROOT_INO
from mounting import backupfs
from test_namespace_gc import fresh_namespace

NAMES = [b"a", b"b", b"c", b"d", b"e", b"f"]
OPS = st.lists(st.tuples(st.sampled_from(["create", "remove", "modify", "rename", "chmod"]),
                         st.sampled_from(NAMES), st.sampled_from(NAMES)), max_size=12)


def tree(view) -> dict[bytes, tuple]:
    """path -> (ino, mode, size, blocks) of a one-level tree under /d."""
    d = view.child(ROOT_INO, b"d")
    return {b"/d/" + n: (a.ino, a.mode, a.size, tuple(view.block_range(a.ino)))
            for n, a in view.readdir(d)}


def expected(before: dict, after: dict) -> list[Change]:
    by_ino_before = {v[0]: p for p, v in before.items()}
    by_ino_after = {v[0]: p for p, v in after.items()}
    out = []
    for ino, p in by_ino_before.items():
        if ino not in by_ino_after:
            out.append(Change(p, "-"))
        elif by_ino_after[ino] != p:
            out.append(Change(p, "R", by_ino_after[ino]))
    for ino, p in by_ino_after.items():
        if ino not in by_ino_before:
            out.append(Change(p, "+"))
        elif before[by_ino_before[ino]][1:] != after[p][1:]:
            out.append(Change(p, "M"))
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=OPS, ops=OPS, seed=st.integers(0, 1000))
def test_diff_reports_what_changed(setup, ops, seed):
    rng = random.Random(seed)
    with fresh_namespace() as ns:
        live, now = ns.live, iter(range(1, 10**6))
        d = live.create(ROOT_INO, b"d", stat.S_IFDIR | 0o755, 0, 0, next(now)).ino

        def apply(op, x, y):
            present = {n for n, _ in live.readdir(d)}
            if op == "create" and x not in present:
                live.create(d, x, stat.S_IFREG | 0o644, 0, 0, next(now))
            elif op == "remove" and x in present:
                ino = live.unlink(d, x, next(now)).ino
                ns.reclaim(ino)
            elif op == "modify" and x in present:
                ino = live.child(d, x)
                live.write_block(ino, 0, ns.store.blocks.put(b"%d" % rng.random()))
                live.setattr(ino, size=8)
            elif op == "rename" and x in present and y not in present:
                live.rename(d, x, d, y, 0, next(now))
            elif op == "chmod" and x in present:
                live.setattr(live.child(d, x), mode=stat.S_IFREG | 0o600)

        for op in setup:
            apply(*op)
        snap = ns.snapshot()
        before = tree(ns.view(snap.epoch))
        for i, op in enumerate(ops):
            apply(*op)
            if i == len(ops) // 2:
                ns.snapshot()  # a snapshot in between must not change the answer
        after = tree(live)
        got = [c for c in diff(ns, snap.epoch) if c.path != b"/d"]
        assert sorted(Change(c.path, c.kind, c.new_path) for c in got) == \
            sorted(expected(before, after))
        last = ns.snapshot()
        assert diff(ns, snap.epoch, last.epoch) == diff(ns, snap.epoch)


@pytest.mark.mount
@pytest.mark.timeout(120)
def test_diff_command_on_a_mount(mounted):
    root = mounted.path
    (root / "docs").mkdir()
    for name in ("keep", "change", "move", "drop"):
        (root / "docs" / name).write_text(name)
    first = backupfs("snapshot", root).stdout.strip()
    (root / "docs" / "change").write_text("changed")
    (root / "docs" / "move").rename(root / "docs" / "moved")
    (root / "docs" / "drop").unlink()
    (root / "docs" / "new").write_text("new")
    lines = set(backupfs("diff", root, first).stdout.splitlines())
    assert {"M\t/docs/change", "R\t/docs/move -> /docs/moved", "-\t/docs/drop",
            "+\t/docs/new"} <= lines
    assert not any(line.endswith("/docs/keep") for line in lines)
    second = backupfs("snapshot", root).stdout.strip()
    assert set(backupfs("diff", root, first, second).stdout.splitlines()) == lines
    r = backupfs("diff", root, "no-such-snapshot", check=False)
    assert r.returncode == 1 and r.stderr.startswith("backupfs: ") and "Traceback" not in r.stderr
