"""`backupfs mount` and `umount` as users run them: detached, named in the mount table,
logging to the store, one mount per store, stopped by umount or a signal."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from mounting import backupfs, fails_with, has_exited, is_mounted, mount_table_entry

pytestmark = [pytest.mark.mount, pytest.mark.timeout(150)]


def daemon_pid(store: Path) -> int:
    return int((store / "writer.pid").read_text())


def wait_exited(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not has_exited(pid):
        assert time.monotonic() < deadline, f"daemon {pid} still running"
        time.sleep(0.05)


def test_a_detached_mount_serves_when_the_command_returns(tmp_path, detached):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    detached.add(store, mnt)
    r = backupfs("mount", store, mnt)
    pid = daemon_pid(store)
    assert f"daemon pid {pid}" in r.stdout
    # Served at once: no wait, no retry.
    assert os.stat(mnt).st_dev != os.stat(tmp_path).st_dev
    (mnt / "f").write_bytes(b"written through a detached mount")
    entry = mount_table_entry(mnt)
    assert (entry["type"], entry["source"]) == ("fuse.backupfs", f"backupfs:{store}")
    assert f"mounted {store} at {mnt}" in (store / "backupfs.log").read_text()
    # One mount per store, and one store per mountpoint: refused, one line each.
    (tmp_path / "mnt2").mkdir()
    fails_with("mount", store, tmp_path / "mnt2", match="already mounted at")
    fails_with("mount", store, mnt, match="already a backupfs mount")
    # umount returns only once the daemon has exited.
    backupfs("umount", mnt)
    assert not is_mounted(mnt) and has_exited(pid)
    assert not (store / "writer.pid").exists()
    backupfs("mount", store, mnt)
    assert (mnt / "f").read_bytes() == b"written through a detached mount"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_unmounts_as_cleanly_as_umount(tmp_path, detached, sig):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    detached.add(store, mnt)
    backupfs("mount", "--txg-interval", "3600", store, mnt)
    # Not fsynced, and no transaction group due for an hour: only the clean shutdown
    # the signal starts can store it.
    (mnt / "f").write_bytes(b"x" * 300_000)
    pid = daemon_pid(store)
    os.kill(pid, sig)
    wait_exited(pid)
    assert not is_mounted(mnt)
    assert not (store / "writer.pid").exists()  # closed, not left as after a crash
    log = (store / "backupfs.log").read_text()
    assert "Traceback" not in log and f"store {store} closed" in log
    backupfs("mount", store, mnt)
    assert (mnt / "f").read_bytes() == b"x" * 300_000
