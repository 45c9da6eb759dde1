"""Scheduled snapshots: `[schedule]` in STORE/config.toml makes the daemon take snapshots
every `snapshot_every` and prune them by its keep rules."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from mounting import backupfs, is_mounted

pytestmark = [pytest.mark.mount, pytest.mark.timeout(90)]

SCHEDULE = '\n[schedule]\nsnapshot_every = "1s"\nkeep_last = 2\n'


def listed(m) -> list[dict]:
    return json.loads(backupfs("list", m.path, "--json").stdout)


def from_log(m, what: str) -> list[str]:
    return re.findall(rf"{what} (\S+Z(?:-\d+)?)", m.log())


def test_one_second_schedule_keeps_last_two(mount_factory):
    m = mount_factory()
    config = m.store / "config.toml"
    plain = config.read_text()
    config.write_text(plain + SCHEDULE)
    m.start()
    (m.path / "data").write_text("scheduled content\n")
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, f"schedule did not run:\n{m.log()}"
        # Read before listing: nothing pruned by then can be listed (read after, a
        # snapshot listed a moment ago may already be pruned by the next tick).
        pruned = from_log(m, "pruned snapshot")
        snaps = listed(m)
        taken = from_log(m, "scheduled snapshot")   # after: it has all that was listed
        assert len(snaps) <= 3          # at most one taken and not yet pruned
        if len(taken) >= 4 and len(snaps) == 2 and len(pruned) >= 2:
            break
        time.sleep(0.2)
    assert all(s["label"] == "scheduled" for s in snaps)
    # The two it keeps are the two newest it took, and the older ones are gone.
    newest = [s["name"] for s in snaps]
    assert set(newest) <= set(taken[-3:])
    assert len(pruned) >= 2 and set(pruned).isdisjoint(newest)
    assert (m.path / "snapshots" / newest[-1] / "data").read_text() == "scheduled content\n"
    m.stop()

    # Without the schedule nothing more is taken; what was kept is exactly what the
    # daemon took and did not prune.
    taken, pruned = from_log(m, "scheduled snapshot"), from_log(m, "pruned snapshot")
    config.write_text(plain)
    m.start()
    names = [s["name"] for s in listed(m)]
    assert names == [n for n in taken if n not in pruned]
    assert 2 <= len(names) <= 3
    time.sleep(1.5)
    assert [s["name"] for s in listed(m)] == names
    m.stop()


def test_bad_schedule_fails_the_mount(mount_factory):
    m = mount_factory()
    config = m.store / "config.toml"
    plain = config.read_text()
    m.path.mkdir()
    try:
        for bad, message in (('snapshot_every = "1 hour"', "not a duration"),
                             ('snapshot_every = "1h"\nkeep_lst = 2', "keep_lst")):
            config.write_text(f"{plain}\n[schedule]\n{bad}\n")
            r = backupfs("mount", m.store, m.path, check=False, timeout=60)
            assert r.returncode == 1, r
            assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
            assert not is_mounted(m.path)
    finally:
        if is_mounted(m.path):
            backupfs("umount", m.path, check=False)


def test_the_schedule_gives_pruned_space_back_to_the_disk(mount_factory):
    """What pruning frees goes back to the disk with no `compact` run by hand: a file
    deleted from the live tree leaves the snapshots that held it as they are pruned,
    and the pack it shared with a kept file, now mostly dead, is rewritten."""
    m = mount_factory()
    config = m.store / "config.toml"
    config.write_text(config.read_text() + '\n[schedule]\nsnapshot_every = "1s"\n'
                      'keep_last = 1\ncompact_threshold = 0.3\n')
    m.start()
    with open(m.path / "kept", "wb") as kept, open(m.path / "gone", "wb") as gone:
        for _ in range(40):  # interleaved, so the first pack (64 MiB) is half of each
            for f in (kept, gone):
                f.write(os.urandom(1 << 20))
                f.flush()
                os.fsync(f.fileno())  # in this order: the kernel writes back as it likes
    first_pack = m.store / "packs" / "00" / "000001.pack"
    assert first_pack.exists(), sorted(p.name for p in (m.store / "packs").rglob("*"))
    taken_before = len(from_log(m, "scheduled snapshot"))
    deadline = time.monotonic() + 30
    while len(from_log(m, "scheduled snapshot")) == taken_before:  # one holds "gone"
        assert time.monotonic() < deadline, m.log()
        time.sleep(0.1)
    (m.path / "gone").unlink()
    # The snapshot holding "gone" is pruned, then the pack is compacted.
    while not re.search(r"compacted [1-9]\d* packs", m.log()):
        assert time.monotonic() < deadline, m.log()
        time.sleep(0.1)
    assert not first_pack.exists()
    # "gone" took 40 MiB, 32 of them in the first pack; what is left dead is the 8 MiB
    # in the pack still being appended to, which compaction leaves alone.
    stats = json.loads(backupfs("stats", m.path, "--json").stdout)
    assert 8 << 20 <= stats["dead_bytes"] < 9 << 20, stats
    m.stop()
    r = backupfs("fsck", m.store, "--json", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
