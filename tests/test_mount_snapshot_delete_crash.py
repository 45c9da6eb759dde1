"""A snapshot deleted while a file in it is open stays deleted after a crash."""

import json
import os

import pytest

from mounting import backupfs

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]


def test_delete_of_an_open_snapshot_survives_sigkill(mount_factory):
    m = mount_factory().start()
    (m.path / "f").write_bytes(os.urandom(300_000))
    name = backupfs("snapshot", m.path).stdout.strip()
    keep = backupfs("snapshot", m.path).stdout.strip()
    (m.path / "f").write_bytes(os.urandom(300_000))   # the first snapshot's data is its own
    with open(m.path / "snapshots" / name / "f", "rb") as f:
        first = f.read(1000)
        backupfs("delete", m.path, name)            # answered: the deletion is promised
        assert not (m.path / "snapshots" / name).exists()
        assert f.read(1000) and first               # the open file reads on
        m.proc.kill()                               # crash while it is still open
        m.proc.wait()
    m.kill()
    m.start()
    listed = [s["name"] for s in json.loads(backupfs("list", m.path, "--json").stdout)]
    assert listed == [keep]
    assert not (m.path / "snapshots" / name).exists()
    m.stop()
    r = backupfs("fsck", m.store, "--json", check=False)
    assert r.returncode == 0, r.stdout
