"""Deleting a snapshot that many changes followed: the mount answers other requests
meanwhile, and a crash in the middle leaves a store that passes fsck and that the next
mount finishes deleting."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from backupfs.namespace import Namespace
from backupfs.store import Store
from backupfs.store.index import open_environment
from mounting import BACKUPFS, answer_times, assert_fsck_clean, backupfs, longest_wait

pytestmark = [pytest.mark.mount, pytest.mark.timeout(240)]

CHUNK = os.urandom(4096) * 256   # 1 MiB of 256 distinct 4 KiB blocks
BLOCKS = 65536                   # 256 MiB in 4 KiB blocks: 65,536 block map entries


def fill_and_cut(m) -> str:
    """A file of BLOCKS block map entries, a snapshot of it, then the file cut to one
    block: the snapshot alone sees the other entries, which deleting it must free."""
    big = m.path / "big"
    with open(big, "wb") as f:
        for _ in range(BLOCKS // 256):
            f.write(CHUNK)  # deduplicated: quick to store, still one entry per block
        os.fsync(f.fileno())
    name = backupfs("snapshot", m.path).stdout.strip()
    os.truncate(big, 4096)
    return name


def test_a_big_snapshot_deletion_leaves_the_mount_answering(mount_factory):
    m = mount_factory("m", init_args=("--block-size", "4K")).start()
    name = fill_and_cut(m)
    with answer_times(m.path) as answers:
        start = time.monotonic()
        backupfs("delete", m.path, name)
        end = time.monotonic()
    assert end - start > 0.5, "too quick to tell: give the snapshot more changes"
    # The longest wait for an answer while the deletion ran: one piece of it, not the
    # whole (measured: 0.05-0.07 s of 2.2-2.7 s; in one piece 1.42 s of 1.76 s).
    longest = longest_wait(answers, start, end)
    assert longest < 0.2 * (end - start), (longest, end - start)
    assert not (m.path / "snapshots" / name).exists()
    assert (m.path / "big").read_bytes() == CHUNK[:4096]
    m.stop()
    assert_fsck_clean(m.store)
    assert_nothing_left(m.store)


def assert_nothing_left(store_path) -> None:
    """No snapshot, no deadlist entry, one block map entry and one referenced block."""
    store = Store.open(store_path, readonly=True)
    try:
        ns = Namespace(store)
        assert ns.catalog.records == []
        assert len(ns.deadlist) == 0
        assert store.txn.stat(ns.blockmap.db)["entries"] == 1
        assert sum(loc.refcount for loc in store.blocks.iter_locations()) == 1
    finally:
        store.close()


def test_a_crash_during_a_snapshot_deletion_is_finished_by_the_next_mount(mount_factory):
    """SIGKILL while the deletion frees 65,535 versions, with the transaction group
    committing every 50 ms meanwhile, once when a commit holds a tenth of it and once
    when it holds two thirds: the store as the crash left it passes fsck, the snapshot
    does not come back, and the next mount frees the rest."""
    m = mount_factory("crash", init_args=("--block-size", "4K"), txg_interval=0.05)
    for share_freed in (0.1, 0.67):
        m.start()
        name = fill_and_cut(m)
        deadline = time.monotonic() + 30
        while (before := committed_deletion(m.store)[1]) < BLOCKS - 1:  # the cut's commit
            assert time.monotonic() < deadline, before
            time.sleep(0.01)
        marked, before = committed_deletion(m.store)
        assert not marked and before >= BLOCKS - 1  # the blocks cut off, the inode
        deleting = subprocess.Popen([*BACKUPFS, "delete", str(m.path), name],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while committed_deletion(m.store)[1] > (1 - share_freed) * before:
            assert time.monotonic() < deadline and deleting.poll() is None
            time.sleep(0.002)
        m.kill()
        deleting.communicate(timeout=60)
        marked, left = committed_deletion(m.store)
        assert marked and 0 < left < before, (marked, left)  # killed half way
        assert_fsck_clean(m.store)
        m.start()
        assert json.loads(backupfs("list", m.path, "--json").stdout) == []
        assert not (m.path / "snapshots" / name).exists()
        assert (m.path / "big").read_bytes() == CHUNK[:4096]
        m.stop()
        assert_fsck_clean(m.store)
        assert_nothing_left(m.store)


def committed_deletion(store_path) -> tuple[bool, int]:
    """What the last commit holds: whether a snapshot is marked deleting, and how many
    deadlist entries are left. Read by a second process beside the daemon, as LMDB lets
    any number of readers do."""
    env = open_environment(store_path, readonly=True)
    try:
        with env.begin() as txn:
            snapshots = env.open_db(b"snapshots", txn=txn, create=False)
            marked = any(json.loads(v).get("deleting") for _, v in txn.cursor(db=snapshots))
            deadlist = env.open_db(b"deadlist", txn=txn, create=False)
            return marked, txn.stat(deadlist)["entries"]
    finally:
        env.close()

