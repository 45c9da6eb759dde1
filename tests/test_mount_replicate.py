"""`backupfs replicate` through the real command: a mounted store's snapshots sent into a
second store, which mounted shows the same snapshots, file for file and inode for inode;
what it refuses, and that it says so in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mounting import BACKUPFS, assert_fsck_clean, backupfs, fails_with
from test_mount_snapshot_content import build_tree, manifest

pytestmark = [pytest.mark.mount, pytest.mark.timeout(240)]


def with_inodes(root: Path) -> dict:
    """The manifest, and every object's inode number within its tree (a snapshot's
    numbers carry its slot in the high bits): a replica keeps them."""
    m = manifest(root)
    for rel in m:
        m[rel]["ino"] = os.lstat(root / rel).st_ino & 0xFFFFFFFF
    return m


def packs_size(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "packs").rglob("*.pack")) \
        if (store / "packs").is_dir() else 0


def snapshots_in(store: Path) -> int:
    return json.loads(backupfs("fsck", store, "--json").stdout)["checked"]["snapshots"]


def test_snapshots_go_over_whole_then_only_what_changed(mount_factory, tmp_path):
    src = mount_factory().start()
    tree = src.path / "tree"
    build_tree(tree)
    (tree / "big").write_bytes(os.urandom(3 << 20))
    first = backupfs("snapshot", src.path).stdout.strip()
    replica = tmp_path / "replica-store"   # where mount_factory("replica") looks
    out = backupfs("replicate", src.path, replica).stdout
    assert out.startswith(f"{first}: ") and "blocks copied" in out

    # Changes: a few bytes of a big file, a file gone, a directory renamed, new names.
    with open(tree / "big", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"changed")
    os.unlink(tree / "a.bin")
    os.rename(tree / "sub", tree / "moved")
    (tree / "new").write_text("new\n")
    os.link(tree / "new", tree / "new-link")
    os.setxattr(tree / "hl1", b"user.shared", b"changed")
    second = backupfs("snapshot", src.path).stdout.strip()
    third = backupfs("snapshot", src.path).stdout.strip()   # nothing changed since
    out = backupfs("replicate", src.path, replica).stdout.splitlines()
    assert [line.split(": ")[0] for line in out] == [second, third]
    # The changed block of `big` and the new file's: nothing else went over again.
    assert ", 2 blocks copied" in out[0], out
    assert out[1].startswith(f"{third}: 0 records"), out
    assert backupfs("replicate", src.path, replica).stdout.strip() == f"{replica}: up to date"

    names = (first, second, third)
    expected = {name: with_inodes(src.path / "snapshots" / name) for name in names}
    live = with_inodes(src.path)
    src.stop()
    assert_fsck_clean(replica)
    assert "0 bad" in backupfs("verify", replica).stdout
    rep = mount_factory("replica", init=False).start()
    listed = sorted(os.listdir(rep.path / "snapshots"))
    assert listed == sorted(names) + ["latest"]
    for name in names:
        assert with_inodes(rep.path / "snapshots" / name) == expected[name], name
    live.pop("snapshots")
    got = with_inodes(rep.path)
    got.pop("snapshots")
    assert got == live  # the replica's live tree is the newest snapshot
    rep.stop()


def test_what_replicate_refuses(mount_factory, tmp_path):
    src = mount_factory().start()
    (src.path / "f").write_text("one\n")
    first = backupfs("snapshot", src.path).stdout.strip()
    replica = tmp_path / "replica-store"
    backupfs("replicate", src.path, replica)

    # Written into while mounted: refused, until --rollback drops what was written.
    rep = mount_factory("replica", init=False).start()
    fails_with("replicate", src.path, replica, match=r"in use \(mounted\?\)")
    (rep.path / "f").write_text("written in the replica\n")
    (rep.path / "other").write_text("also\n")
    rep.stop()
    (src.path / "f").write_text("two\n")
    second = backupfs("snapshot", src.path).stdout.strip()
    fails_with("replicate", src.path, replica, match="--rollback discards")
    out = backupfs("replicate", "--rollback", src.path, replica).stdout.splitlines()
    assert out[0].endswith(f"rolled back") and f"since {first}" in out[0]
    assert out[1].startswith(f"{second}: ")
    rep.start()
    assert sorted(os.listdir(rep.path)) == ["f", "snapshots"]
    assert (rep.path / "f").read_text() == "two\n"
    rep.stop()
    assert_fsck_clean(replica)

    # The replica's newest snapshot deleted in the source: nothing to send changes against.
    backupfs("delete", src.path, second)
    backupfs("snapshot", src.path)
    fails_with("replicate", src.path, replica, match=f"newest snapshot, {second}, is not in")
    # Not a store and not empty; another store's files; the source itself; no source.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    fails_with("replicate", src.path, tmp_path / "junk", match="not empty")
    other = tmp_path / "other-store"
    backupfs("init", other)
    fails_with("replicate", other, replica, match="is not in the source")
    fails_with("replicate", src.path, src.store, match="is the source")
    fails_with("replicate", tmp_path / "nowhere", replica, match="no such file")
    src.stop()
    assert_fsck_clean(replica)


def test_a_replica_of_other_block_size_is_refused(mount_factory, tmp_path):
    src = mount_factory().start()
    backupfs("snapshot", src.path)
    backupfs("init", "--block-size", "64K", tmp_path / "small")
    fails_with("replicate", src.path, tmp_path / "small", match="block size 64 KiB")
    src.stop()


def test_a_run_killed_midway_leaves_a_replica_that_the_next_run_completes(
        mount_factory, tmp_path):
    src = mount_factory().start()
    names = []
    for i in range(3):
        (src.path / f"part-{i}").write_bytes(os.urandom(40 << 20))
        names.append(backupfs("snapshot", src.path).stdout.strip())
    expected = with_inodes(src.path / "snapshots" / names[-1])
    replica = tmp_path / "replica-store"
    sent_before_kill = []
    for kill_at in (5 << 20, 60 << 20):  # packs' bytes: into the first snapshot, the second
        proc = subprocess.Popen([*BACKUPFS, "replicate", str(src.path), str(replica)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while proc.poll() is None and packs_size(replica) < kill_at:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert_fsck_clean(replica)
        sent_before_kill.append(snapshots_in(replica))
    # Cut short with none sent yet, and with some but not all.
    assert sent_before_kill == [0, 1]
    out = backupfs("replicate", src.path, replica, timeout=180).stdout
    assert [line.split(": ")[0] for line in out.splitlines()] == names[1:]
    src.stop()
    assert_fsck_clean(replica)
    assert "0 bad" in backupfs("verify", replica).stdout
    rep = mount_factory("replica", init=False).start()
    assert sorted(os.listdir(rep.path / "snapshots")) == sorted(names) + ["latest"]
    assert with_inodes(rep.path / "snapshots" / names[-1]) == expected
    rep.stop()
