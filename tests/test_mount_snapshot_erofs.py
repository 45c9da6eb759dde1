"""Everything under /snapshots is read-only: every mutating system call on a snapshot's
files, directories and root, and on /snapshots itself, fails with EROFS; and the live
root keeps the name `snapshots` for itself (EEXIST to create, EPERM to rename to)."""

from __future__ import annotations

import errno
import os

import pytest

from mounting import Mount, backupfs

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    """One mount for the whole matrix: a live tree, a snapshot of it, and the paths."""
    base = tmp_path_factory.mktemp("erofs")
    m = Mount(base / "store", base / "mnt").start()
    try:
        live = m.path
        (live / "d").mkdir()
        (live / "d" / "e").mkdir()            # an empty directory
        (live / "d" / "f").write_bytes(b"snapshot data\n")
        os.setxattr(live / "d" / "f", b"user.k", b"v")
        os.setxattr(live / "d", b"user.k", b"v")
        os.symlink("f", live / "d" / "s")
        (live / "top").write_text("top\n")
        (live / "livefile").write_text("live\n")
        name = backupfs("snapshot", live).stdout.strip()
        root = live / "snapshots" / name
        paths = {"root": root, "dir": root / "d", "file": root / "d" / "f",
                 "empty": root / "d" / "e", "symlink": root / "d" / "s",
                 "snapshots": live / "snapshots", "live": live, "name": name}
        yield m, paths
        # Nothing under /snapshots moved: the snapshot is exactly what it was.
        assert (root / "d" / "f").read_bytes() == b"snapshot data\n"
        assert sorted(os.listdir(root / "d")) == ["e", "f", "s"]
        assert sorted(os.listdir(root)) == ["d", "livefile", "top"]
        assert os.getxattr(root / "d" / "f", b"user.k") == b"v"
        assert sorted(os.listdir(live / "snapshots")) == sorted([name, "latest"])
        m.stop()
    finally:
        m.cleanup()


def erofs(fn, *args, expect=(errno.EROFS,), **kw):
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    assert e.value.errno in expect, (
        f"{fn.__name__}{args}: {errno.errorcode.get(e.value.errno)}, expected "
        f"{'/'.join(errno.errorcode[x] for x in expect)}")


WRITE_OPENS = {
    "O_WRONLY": os.O_WRONLY,
    "O_RDWR": os.O_RDWR,
    "O_TRUNC": os.O_RDONLY | os.O_TRUNC,
    "O_APPEND": os.O_WRONLY | os.O_APPEND,
    "O_CREAT existing": os.O_WRONLY | os.O_CREAT,
}


@pytest.mark.parametrize("flags", WRITE_OPENS.values(), ids=WRITE_OPENS.keys())
def test_open_for_write(snap, flags):
    _, p = snap
    erofs(os.open, p["file"], flags)
    # Through the `latest` symlink too.
    erofs(os.open, p["snapshots"] / "latest" / "d" / "f", flags)


def test_write(snap):
    """No descriptor for writing can be had, and a read-only one cannot write."""
    _, p = snap
    erofs(os.open, p["file"], os.O_WRONLY)
    fd = os.open(p["file"], os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.write(fd, b"x")
        assert e.value.errno == errno.EBADF
        assert os.pread(fd, 100, 0) == b"snapshot data\n"
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["root", "dir", "empty", "snapshots"])
def test_create(snap, where):
    _, p = snap
    erofs(os.open, p[where] / "new", os.O_WRONLY | os.O_CREAT, 0o644)
    erofs(os.open, p[where] / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    erofs(os.mkdir, p[where] / "newdir")
    erofs(os.symlink, "target", p[where] / "newlink")
    erofs(os.mkfifo, p[where] / "newfifo")
    erofs(os.mknod, p[where] / "newnode", 0o600 | 0o100000)  # S_IFREG through mknod
    erofs(os.link, p["live"] / "livefile", p[where] / "newhardlink")
    assert not os.path.lexists(p[where] / "new")


def test_truncate(snap):
    _, p = snap
    erofs(os.truncate, p["file"], 0)
    erofs(os.truncate, p["file"], 1000)
    fd = os.open(p["file"], os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, 0)
        assert e.value.errno in (errno.EINVAL, errno.EBADF, errno.EROFS)
    finally:
        os.close(fd)
    assert os.path.getsize(p["file"]) == len(b"snapshot data\n")


def test_unlink(snap):
    _, p = snap
    erofs(os.unlink, p["file"])
    erofs(os.unlink, p["symlink"])
    erofs(os.unlink, p["root"] / "top")
    erofs(os.unlink, p["snapshots"] / "latest")


def test_rmdir(snap):
    _, p = snap
    erofs(os.rmdir, p["empty"])
    erofs(os.rmdir, p["dir"])       # not empty: still EROFS, not ENOTEMPTY
    erofs(os.rmdir, p["root"])      # a snapshot, from /snapshots
    erofs(os.rmdir, p["snapshots"])  # /snapshots itself, from the live root


def test_rename_within(snap):
    _, p = snap
    erofs(os.rename, p["file"], p["dir"] / "g")
    erofs(os.rename, p["file"], p["root"] / "g")
    erofs(os.rename, p["file"], p["root"] / "top")        # replacing
    erofs(os.rename, p["empty"], p["root"] / "e2")
    erofs(os.rename, p["root"], p["snapshots"] / "renamed")
    erofs(os.rename, p["snapshots"] / "latest", p["snapshots"] / "newest")


def test_rename_in(snap):
    _, p = snap
    live = p["live"]
    erofs(os.rename, live / "livefile", p["dir"] / "moved")
    erofs(os.rename, live / "livefile", p["file"])        # replacing
    erofs(os.rename, live / "livefile", p["snapshots"] / "moved")
    assert (live / "livefile").read_text() == "live\n"


def test_rename_out(snap):
    _, p = snap
    live = p["live"]
    erofs(os.rename, p["file"], live / "stolen")
    erofs(os.rename, p["dir"], live / "stolen")
    erofs(os.rename, p["root"], live / "stolen")
    erofs(os.rename, p["file"], live / "livefile")        # replacing
    assert not os.path.lexists(live / "stolen")


def test_link(snap):
    _, p = snap
    live = p["live"]
    erofs(os.link, p["file"], p["dir"] / "l")             # within
    erofs(os.link, p["file"], live / "l")                 # out
    erofs(os.link, live / "livefile", p["dir"] / "l")     # in
    assert not os.path.lexists(live / "l")


@pytest.mark.parametrize("where", ["file", "dir", "root", "snapshots"])
def test_chmod_chown_utimens(snap, where):
    _, p = snap
    path = p[where]
    before = os.stat(path)
    erofs(os.chmod, path, 0o600)
    erofs(os.chown, path, 1234, 1234)
    erofs(os.chown, path, -1, 1234)
    erofs(os.utime, path, ns=(1, 2))
    erofs(os.utime, path)                                 # "now"
    after = os.stat(path)
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns) == \
        (before.st_mode, before.st_uid, before.st_gid, before.st_mtime_ns)


def test_symlink_attributes(snap):
    _, p = snap
    for link in (p["symlink"], p["snapshots"] / "latest"):
        erofs(os.lchown, link, 1234, 1234)
        erofs(os.utime, link, ns=(1, 2), follow_symlinks=False)


@pytest.mark.parametrize("where", ["file", "dir", "root", "snapshots"])
def test_xattrs(snap, where):
    _, p = snap
    path = p[where]
    erofs(os.setxattr, path, b"user.k", b"new")
    erofs(os.setxattr, path, b"user.new", b"x")
    erofs(os.setxattr, path, b"user.new", b"x", os.XATTR_CREATE)
    erofs(os.removexattr, path, b"user.k", expect=(errno.EROFS,))
    if where in ("file", "dir"):
        assert os.getxattr(path, b"user.k") == b"v"


def test_live_root_reserves_snapshots(snap):
    _, p = snap
    live = p["live"]
    erofs(os.mkdir, live / "snapshots", expect=(errno.EEXIST,))
    erofs(os.open, live / "snapshots", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644,
          expect=(errno.EEXIST,))
    erofs(os.symlink, "x", live / "snapshots", expect=(errno.EEXIST,))
    erofs(os.mkfifo, live / "snapshots", expect=(errno.EEXIST,))
    erofs(os.link, live / "livefile", live / "snapshots", expect=(errno.EEXIST,))
    (live / "tmpdir").mkdir()
    try:
        erofs(os.rename, live / "tmpdir", live / "snapshots", expect=(errno.EPERM,))
        # A file onto a directory: the kernel answers EISDIR before asking us.
        erofs(os.rename, live / "livefile", live / "snapshots", expect=(errno.EPERM,
                                                                        errno.EISDIR))
        erofs(os.rename, live / "snapshots", live / "tmpdir" / "x", expect=(errno.EPERM,))
    finally:
        (live / "tmpdir").rmdir()
    # The name is free below the root.
    (live / "d" / "snapshots").mkdir()
    (live / "d" / "snapshots").rmdir()
    assert os.path.isdir(live / "snapshots")
