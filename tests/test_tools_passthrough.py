"""tools/passthroughfs.py, the benchmarks' FUSE-over-the-disk baseline, through a real
mount: a baseline that lost files or answered wrongly would make every ratio against it
a lie."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mounting import force_unmount, is_mounted

TOOL = Path(__file__).resolve().parent.parent / "tools" / "passthroughfs.py"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=[[], ["--threads", "4"]], ids=["loop", "threads"])
def passthrough(request, tmp_path):
    source, mnt = tmp_path / "source", tmp_path / "mnt"
    source.mkdir()
    mnt.mkdir()
    log = open(tmp_path / "daemon.log", "w+")
    proc = subprocess.Popen([sys.executable, str(TOOL), *request.param, str(source), str(mnt)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            assert proc.poll() is None, "passthroughfs exited before mounting"
            assert time.monotonic() < deadline, "passthroughfs did not mount in 30 s"
            time.sleep(0.05)
        yield source, mnt
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=60)
        assert proc.wait(timeout=60) == 0
        log.seek(0)
        assert "Traceback" not in log.read()
    finally:
        force_unmount(mnt)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        log.close()


def test_files_round_trip_and_land_in_the_source(passthrough):
    source, mnt = passthrough
    data = os.urandom(3 << 20) + b"tail"
    with open(mnt / "big", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    assert (source / "big").read_bytes() == data
    assert (mnt / "big").read_bytes() == data
    with open(mnt / "big", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"X" * 10)
        f.truncate(2 << 20)
    expect = data[:1 << 20] + b"X" * 10 + data[(1 << 20) + 10:2 << 20]
    assert (source / "big").read_bytes() == expect
    assert os.stat(mnt / "big").st_size == 2 << 20
    assert os.stat(mnt / "big").st_ino == os.stat(source / "big").st_ino


def test_renamed_directory_keeps_its_children_reachable(passthrough):
    source, mnt = passthrough
    (mnt / "a" / "b").mkdir(parents=True)
    (mnt / "a" / "b" / "f").write_text("deep")
    assert (mnt / "a" / "b" / "f").read_text() == "deep"  # the kernel now holds it
    os.rename(mnt / "a", mnt / "c")
    (mnt / "c" / "b" / "f").write_text("moved")
    assert (source / "c" / "b" / "f").read_text() == "moved"
    assert sorted(os.listdir(mnt / "c" / "b")) == ["f"]
    assert not (mnt / "a").exists()


def test_hard_link_outlives_the_names_it_was_made_from(passthrough):
    source, mnt = passthrough
    (mnt / "link-00").write_text("linked")
    for i in range(1, 16):
        os.link(mnt / "link-00", mnt / f"link-{i:02}")
    assert os.stat(mnt / "link-15").st_nlink == 16
    for i in range(15):  # the daemon must not answer by a name that is gone
        os.unlink(mnt / f"link-{i:02}")
    (mnt / "link-15").write_text("still here")
    assert (source / "link-15").read_text() == "still here"
    assert os.stat(mnt / "link-15").st_nlink == 1


def test_files_a_listing_gave_the_kernel_can_be_opened(passthrough):
    source, mnt = passthrough
    for i in range(50):
        (source / f"made-beneath-{i:02}").write_text(str(i))
    assert len(os.listdir(mnt)) == 50  # READDIRPLUS: the kernel needs no LOOKUP after it
    for i in range(50):
        assert (mnt / f"made-beneath-{i:02}").read_text() == str(i)


def test_open_file_with_no_name_left_still_changes(passthrough):
    source, mnt = passthrough
    with open(mnt / "doomed", "w+b") as f:
        f.write(b"x" * 10000)
        os.unlink(mnt / "doomed")
        os.ftruncate(f.fileno(), 100)
        os.fchmod(f.fileno(), 0o600)
        assert os.fstat(f.fileno()).st_size == 100
        assert os.fstat(f.fileno()).st_mode & 0o777 == 0o600
        f.seek(0)
        assert f.read() == b"x" * 100
    assert os.listdir(source) == []


def test_rename_over_a_file_replaces_it(passthrough):
    source, mnt = passthrough
    (mnt / "old").write_text("old")
    (mnt / "new").write_text("new")
    os.rename(mnt / "new", mnt / "old")
    assert (mnt / "old").read_text() == "new"
    assert sorted(os.listdir(mnt)) == ["old"]
    assert sorted(os.listdir(source)) == ["old"]
    (mnt / "old").write_text("after")
    assert (source / "old").read_text() == "after"


def test_modes_owners_times_links_and_xattrs_pass_through(passthrough):
    source, mnt = passthrough
    old = os.umask(0o002)
    try:
        (mnt / "file").touch()
        (mnt / "dir").mkdir()
    finally:
        os.umask(old)
    assert os.stat(source / "file").st_mode & 0o777 == 0o664
    assert os.stat(source / "dir").st_mode & 0o777 == 0o775
    os.chown(mnt / "file", 1234, 5678)
    os.chmod(mnt / "file", 0o640)
    os.utime(mnt / "file", ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(source / "file")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 5678, 0o640)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    assert os.stat(mnt / "file").st_mtime_ns == 2_000_000_456
    os.symlink("file", mnt / "sym")
    assert os.readlink(mnt / "sym") == "file"
    os.setxattr(mnt / "file", "user.note", b"kept")
    assert os.getxattr(source / "file", "user.note") == b"kept"
    assert "user.note" in os.listxattr(mnt / "file")
    os.removexattr(mnt / "file", "user.note")
    assert os.listxattr(source / "file") == []


def test_errors_come_back_as_the_source_gives_them(passthrough):
    source, mnt = passthrough
    (mnt / "dir").mkdir()
    (mnt / "dir" / "f").touch()
    with pytest.raises(OSError) as e:
        os.rmdir(mnt / "dir")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "missing")
    with pytest.raises(FileExistsError):
        os.mkdir(mnt / "dir")
    statfs = os.statvfs(mnt)
    assert statfs.f_blocks == os.statvfs(source).f_blocks
