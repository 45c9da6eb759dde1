"""The first thing that must work: mount, write, read back, snapshot, unmount, remount."""

import os

import pytest

from mounting import backupfs

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]


def test_write_snapshot_remount(mount_factory):
    m = mount_factory().start()
    data = os.urandom(300_000)
    (m.path / "a.bin").write_bytes(data)
    (m.path / "dir").mkdir()
    (m.path / "dir" / "note").write_text("one")
    name = backupfs("snapshot", m.path).stdout.strip()
    (m.path / "dir" / "note").write_text("two")
    assert (m.path / "snapshots" / name / "dir" / "note").read_text() == "one"
    assert (m.path / "snapshots" / name / "a.bin").read_bytes() == data
    m.stop()
    m.start()
    assert (m.path / "a.bin").read_bytes() == data
    assert (m.path / "dir" / "note").read_text() == "two"
    assert (m.path / "snapshots" / name / "dir" / "note").read_text() == "one"
    assert os.readlink(m.path / "snapshots" / "latest") == name
    m.stop()
