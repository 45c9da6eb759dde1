"""Scheduled snapshots: `[schedule]` in STORE/config.toml makes the daemon take snapshots
every `snapshot_every` and prune them by its keep rules."""

from __future__ import annotations

import json
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
