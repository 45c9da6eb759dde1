"""The snapshot commands against a real mount: snapshot, list, delete, hold, release,
prune; names; `latest`; what the user sees in /snapshots as snapshots come and go; and
the errors the commands give."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mounting import BACKUPFS, backupfs, drop_page_cache

pytestmark = [pytest.mark.mount, pytest.mark.timeout(150)]

NAME = re.compile(r"^\d{4}-\d\d-\d\dT\d{6}Z(-\d+)?$")


def listed(target) -> list[dict]:
    return json.loads(backupfs("list", target, "--json").stdout)


def names(target) -> list[str]:
    return [s["name"] for s in listed(target)]


def in_tree(m) -> list[str]:
    return sorted(os.listdir(m.path / "snapshots"))


def fails(*args, match: str, code: int = 1) -> str:
    """Run a command that must fail with one clear line on stderr; return the line."""
    r = backupfs(*args, check=False)
    assert r.returncode == code, (args, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("backupfs: "), r.stderr
    assert re.search(match, r.stderr), r.stderr
    return lines[-1]


def test_snapshot_list_label_hold(mount_factory):
    m = mount_factory().start()
    (m.path / "f").write_text("one")
    a = backupfs("snapshot", m.path, "--label", "before upgrade", "--hold").stdout
    assert NAME.match(a.strip()) and a.count("\n") == 1, a
    a = a.strip()
    b = backupfs("snapshot", m.store).stdout.strip()       # the store path works as well
    assert NAME.match(b) and b != a
    assert in_tree(m) == sorted([a, b, "latest"])
    assert os.readlink(m.path / "snapshots" / "latest") == b

    snaps = listed(m.path)
    assert [s["name"] for s in snaps] == [a, b]
    assert snaps[0]["label"] == "before upgrade" and snaps[0]["hold"] is True
    assert snaps[1]["label"] is None and snaps[1]["hold"] is False
    for s in snaps:
        # created is ISO 8601 UTC and agrees with the name (taken in that second)
        assert s["created"].endswith("Z")
        assert s["name"].startswith(s["created"][:10] + "T" + s["created"][11:19].replace(":", ""))
    assert listed(m.store) == snaps

    text = backupfs("list", m.path).stdout.splitlines()
    assert text[0].split() == ["NAME", "CREATED", "HOLD", "LABEL"]
    row_a = next(line for line in text if line.startswith(a + " "))
    row_b = next(line for line in text if line.startswith(b + " "))
    assert "before upgrade" in row_a and " yes " in row_a
    assert " yes " not in row_b
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row_a)

    backupfs("release", m.path, a)
    assert [s["hold"] for s in listed(m.path)] == [False, False]
    backupfs("hold", m.store, b)
    assert [s["hold"] for s in listed(m.path)] == [False, True]
    m.stop()
    # Names, labels and holds survive a remount.
    m.start()
    again = listed(m.path)
    assert [(s["name"], s["label"], s["hold"]) for s in again] == \
        [(a, "before upgrade", False), (b, None, True)]
    assert (m.path / "snapshots" / a / "f").read_text() == "one"
    m.stop()


def test_two_snapshots_in_one_second(mount_factory):
    m = mount_factory().start()
    for _ in range(6):
        # Start at a fresh second: one that an earlier round's snapshot took already
        # would rightly make this round's names -2 and -3.
        time.sleep(1.02 - time.time() % 1)
        procs = [subprocess.Popen([*BACKUPFS, "snapshot", m.path], stdout=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        got = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert all(p.returncode == 0 for p in procs)
        base = got[0].removesuffix("-2")
        if got == [base, base + "-2"]:
            break
        assert got[0][:18] != got[1][:18], f"same second but not -2: {got}"
    else:
        pytest.fail("never got two snapshots in one second")
    assert base.endswith("Z") and NAME.match(base)
    assert set(got) <= set(in_tree(m))
    assert len(set(names(m.path))) == len(names(m.path))
    m.stop()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_appear_disappear_latest_and_open_files(mount_factory):
    m = mount_factory().start()
    snapdir = m.path / "snapshots"
    assert in_tree(m) == []
    assert not os.path.lexists(snapdir / "latest")
    data = os.urandom(4 * 1024 * 1024 + 123)
    (m.path / "unique").write_bytes(data)
    first = backupfs("snapshot", m.path).stdout.strip()
    # At once: in the listing, by name, and as `latest`.
    assert in_tree(m) == [first, "latest"]
    assert os.path.isdir(snapdir / first)
    assert os.readlink(snapdir / "latest") == first
    os.unlink(m.path / "unique")        # now only the snapshot holds these blocks
    (m.path / "other").write_text("x")
    second = backupfs("snapshot", m.path).stdout.strip()
    assert in_tree(m) == sorted([first, second, "latest"])
    assert os.readlink(snapdir / "latest") == second
    assert sorted(os.listdir(snapdir / "latest")) == ["other"]

    # A file open in a snapshot keeps reading after the snapshot is deleted.
    fd = os.open(snapdir / first / "unique", os.O_RDONLY)
    try:
        head = os.pread(fd, 65536, 0)
        backupfs("delete", m.path, first)
        assert in_tree(m) == sorted([second, "latest"])
        assert not os.path.exists(snapdir / first)
        assert not os.path.exists(snapdir / first / "unique")
        assert first not in names(m.path)
        drop_page_cache()                # what follows must come from the daemon
        rest = b""
        while chunk := os.pread(fd, 1 << 20, 65536 + len(rest)):
            rest += chunk
        assert head + rest == data
        assert os.fstat(fd).st_size == len(data)
    finally:
        os.close(fd)
    wait_for(lambda: f"snapshot {first} closed and deleted" in m.log())  # release is async

    # The newest goes: `latest` moves back; the last goes: `latest` goes too.
    third = backupfs("snapshot", m.path).stdout.strip()
    assert os.readlink(snapdir / "latest") == third
    backupfs("delete", m.path, third)
    assert os.readlink(snapdir / "latest") == second
    assert in_tree(m) == sorted([second, "latest"])
    backupfs("delete", m.store, second)
    assert in_tree(m) == []
    assert not os.path.lexists(snapdir / "latest")
    m.stop()
    m.start()
    assert in_tree(m) == [] and names(m.path) == []
    assert sorted(os.listdir(m.path)) == ["other", "snapshots"]
    m.stop()


def test_deleted_while_open_stays_deleted_after_unmount(mount_factory):
    """The daemon stopped (SIGTERM, the mount busy) while a deleted snapshot is still
    open: the deletion is completed, not forgotten."""
    m = mount_factory().start()
    (m.path / "f").write_bytes(b"abc" * 100000)
    name = backupfs("snapshot", m.path).stdout.strip()
    f = open(m.path / "snapshots" / name / "f", "rb")
    try:
        assert f.read(3) == b"abc"
        backupfs("delete", m.path, name)
        assert names(m.path) == []
        assert f.read(6) == b"abcabc"
        m.kill(signal.SIGTERM)
        assert "snapshot %s closed and deleted" % name not in m.log()
    finally:
        try:
            f.close()
        except OSError:
            pass
    m.start()
    assert names(m.path) == [] and in_tree(m) == []
    assert (m.path / "f").read_bytes() == b"abc" * 100000
    m.stop()


def stats(target) -> dict:
    return json.loads(backupfs("stats", target, "--quick", "--json").stdout)


def test_hold_release_prune_and_space(mount_factory):
    m = mount_factory().start()
    taken = []
    big = os.urandom(3 * 1024 * 1024)
    for i in range(5):
        (m.path / "counter").write_text(str(i))
        if i == 1:
            (m.path / "big").write_bytes(big)      # only snapshot 1 will hold it
        if i == 2:
            os.unlink(m.path / "big")
        taken.append(backupfs("snapshot", m.path, "--label", f"n{i}").stdout.strip())
    held = taken[0]
    backupfs("hold", m.path, held)

    # A held snapshot refuses delete, alone or among others: nothing is deleted.
    fails("delete", m.path, held, match="held")
    fails("delete", m.path, taken[3], held, match="held")
    assert names(m.path) == taken

    # Dry run: what would go, and why each kept one stays; nothing changes.
    r = backupfs("prune", m.path, "--keep-last", "2", "--dry-run").stdout.splitlines()
    would = sorted(line.split()[-1] for line in r if line.startswith("would delete "))
    assert would == sorted(taken[1:3])
    kept = {line.split()[1]: line for line in r if line.startswith("keep ")}
    assert set(kept) == {held, taken[3], taken[4]}
    assert "(last 1)" in kept[taken[4]] and "(last 2)" in kept[taken[3]]
    assert "held" in kept[held]
    assert len(r) == 5
    assert names(m.path) == taken

    before = stats(m.path)
    r = backupfs("prune", m.store, "--keep-last", "2").stdout.splitlines()
    assert sorted(line.split()[-1] for line in r if line.startswith("deleted ")) == \
        sorted(taken[1:3])
    assert names(m.path) == [held, taken[3], taken[4]]
    assert in_tree(m) == sorted([held, taken[3], taken[4], "latest"])
    # Snapshot 1 alone held `big`: its blocks are freed.
    after = stats(m.path)
    freed = before["stored_bytes"] - after["stored_bytes"]
    assert freed >= len(big), (before, after)
    assert after["dead_bytes"] - before["dead_bytes"] >= len(big)

    # Calendar rules: all were taken today, so --keep-daily 1 keeps the newest (and the
    # held one); the held one survives every prune until released.
    r = backupfs("prune", m.path, "--keep-daily", "1").stdout
    assert re.search(rf"keep +{taken[4]} +\(daily \d{{4}}-\d+-\d+\)", r), r
    assert names(m.path) == [held, taken[4]]
    backupfs("release", m.path, held)
    backupfs("prune", m.path, "--keep-last", "1")
    assert names(m.path) == [taken[4]]
    assert (m.path / "snapshots" / taken[4] / "counter").read_text() == "4"
    m.stop()


def test_errors(mount_factory, tmp_path):
    m = mount_factory().start()
    name = backupfs("snapshot", m.path).stdout.strip()
    plain = tmp_path / "plain"
    plain.mkdir()
    for cmd in (["snapshot"], ["delete", name], ["prune", "--keep-last", "1"]):
        fails(cmd[0], plain, *cmd[1:], match="not a backupfs mount")
    fails("snapshot", tmp_path / "missing", match="no such file")
    fails("list", m.path / "snapshots", match="not a backupfs mount")
    for args in (["hold", m.path, "nope"], ["release", m.store, "nope"],
                 ["delete", m.path, name, "2000-01-01T000000Z"]):
        fails(*args, match="no snapshot named")
    assert names(m.path) == [name]                 # the failed delete deleted nothing
    fails("prune", m.path, match="keep", code=2)   # no rule: a usage error
    m.stop()
    # The store is not mounted: no daemon to talk to.
    for args in (["snapshot", m.store], ["delete", m.store, name]):
        fails(*args, match="no backupfs daemon is running")
    # A daemon that died leaves its socket behind: still "no daemon running".
    m.start()
    m.kill()
    assert (m.store / "control.sock").exists()
    fails("snapshot", m.store, match="no backupfs daemon is running")
    fails("list", m.store, match="no backupfs daemon is running")
