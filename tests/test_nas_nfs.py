"""What an NFS export of a backupfs mount needs: file handles that outlive the kernel's
inode cache and a restart of the daemon, and that never name the wrong object.

The kernel NFS server is not available here (no nfsd in this kernel), so these tests use
what nfsd uses: name_to_handle_at(2) and open_by_handle_at(2), across a remount; and the
"." / ".." lookups the kernel sends to turn a handle back into an inode.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import struct
from pathlib import Path

import pyfuse3
import pytest

from backupfs.fs import BackupFS
from backupfs.fs import inodes
from backupfs.namespace import Namespace
from backupfs.store import Store
from mounting import backupfs

ROOT = pyfuse3.ROOT_INODE
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
AT_FDCWD = -100
MAX_HANDLE_SZ = 128


def handle_of(path: Path) -> tuple[int, bytes]:
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    struct.pack_into("Ii", buf, 0, MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), buf, ctypes.byref(mount_id), 0):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))
    size, kind = struct.unpack_from("Ii", buf, 0)
    return kind, buf.raw[8:8 + size]


def open_handle(mount: Path, handle: tuple[int, bytes]) -> int:
    kind, data = handle
    buf = ctypes.create_string_buffer(8 + len(data))
    struct.pack_into("Ii", buf, 0, len(data), kind)
    buf[8:8 + len(data)] = data
    mfd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = _libc.open_by_handle_at(mfd, buf, os.O_RDONLY)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return fd
    finally:
        os.close(mfd)


def read_by_handle(mount: Path, handle) -> bytes:
    fd = open_handle(mount, handle)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


@pytest.mark.mount
@pytest.mark.timeout(120)
def test_file_handles_survive_a_remount_and_never_name_another_snapshot(mount_factory):
    m = mount_factory().start()
    (m.path / "dir").mkdir()
    f = m.path / "dir" / "file"
    names = []
    for content in (b"one\n", b"two\n", b"three\n"):
        f.write_bytes(content)
        names.append(backupfs("snapshot", m.path).stdout.strip())
    f.write_bytes(b"live\n")
    (m.path / "gone").write_bytes(b"soon deleted\n")
    live, live_dir, gone = handle_of(f), handle_of(m.path / "dir"), handle_of(m.path / "gone")
    snap = [handle_of(m.path / "snapshots" / n / "dir" / "file") for n in names]
    assert read_by_handle(m.path, live) == b"live\n"
    assert read_by_handle(m.path, snap[1]) == b"two\n"
    # The middle snapshot goes: after a remount, the third one takes its slot.
    backupfs("delete", m.path, names[1])
    (m.path / "gone").unlink()
    m.stop()
    m.start()
    # A restarted server: live handles still open the same objects...
    assert read_by_handle(m.path, live) == b"live\n"
    fd = open_handle(m.path, live_dir)
    try:
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
        assert os.fstat(fd).st_ino == os.stat(m.path / "dir").st_ino
    finally:
        os.close(fd)
    assert read_by_handle(m.path, snap[0]) == b"one\n"
    # ...a deleted file's handle is stale, and so is the deleted snapshot's: never the
    # object that now has its kernel inode number (the third snapshot's file).
    for h in (gone, snap[1]):
        with pytest.raises(OSError) as e:
            read_by_handle(m.path, h)
        assert e.value.errno == errno.ESTALE
    assert (m.path / "snapshots" / names[2] / "dir" / "file").read_bytes() == b"three\n"
    m.stop()


SYS_GETDENTS64 = 217  # x86-64
DIRENT64 = struct.Struct("QqHB")  # d_ino, d_off, d_reclen, d_type; then the name


def getdents(fd: int, size: int = 1024) -> list[tuple[bytes, int]]:
    """(name, d_off) of the entries one getdents64 call gives: what nfsd and Ganesha read
    a directory with, a piece at a time."""
    buf = ctypes.create_string_buffer(size)
    n = _libc.syscall(SYS_GETDENTS64, fd, buf, size)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    out, pos = [], 0
    while pos < n:
        _, off, reclen, _ = DIRENT64.unpack_from(buf, pos)
        name = buf.raw[pos + DIRENT64.size:pos + reclen].split(b"\0", 1)[0]
        out.append((name, off))
        pos += reclen
    return out


@pytest.mark.mount
@pytest.mark.timeout(120)
def test_a_listing_resumes_from_its_cookie_after_the_daemon_restarted(mount_factory):
    """An NFS client keeps the cookie of the last entry it got and sends it back with
    its next READDIR, and the server opens the directory afresh and seeks to it, also
    after the daemon restarted (an upgrade): the listing goes on where it stopped."""
    m = mount_factory().start()
    d = m.path / "dir"
    d.mkdir()
    names = {b"file-%04d-%s" % (i, b"x" * (i % 40)) for i in range(600)}
    for name in names:
        (d / os.fsdecode(name)).touch()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = getdents(fd)
    finally:
        os.close(fd)
    assert 10 < len(first) < len(names)
    m.stop()
    m.start()
    for last in (len(first) - 1, len(first) // 2):   # the piece's end, or its middle
        listed = [name for name, _ in first[:last + 1]]
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.lseek(fd, first[last][1], os.SEEK_SET)
            while piece := getdents(fd):
                listed += [name for name, _ in piece]
        finally:
            os.close(fd)
        assert len(listed) == len(set(listed)) == len(names) and set(listed) == names
    # A cookie the directory never gave: refused, not a listing from somewhere.
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.lseek(fd, 12345, os.SEEK_SET)
        with pytest.raises(OSError) as e:
            getdents(fd)
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    m.stop()


@pytest.fixture
def fs(tmp_path):
    Store.init(tmp_path / "store", block_size=4096)
    store = Store.open(tmp_path / "store")
    ops = BackupFS(store, Namespace(store))
    yield ops
    store.close(commit=False)


async def test_dot_and_dotdot_lookups(fs):
    from types import SimpleNamespace
    ctx = SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022)
    a = await fs.mkdir(ROOT, b"a", stat.S_IFDIR | 0o755, ctx)
    b = await fs.mkdir(a.st_ino, b"b", stat.S_IFDIR | 0o755, ctx)
    info, f = await fs.create(b.st_ino, b"f", stat.S_IFREG | 0o644, os.O_RDWR, ctx)
    await fs.release(info.fh)
    assert (await fs.lookup(f.st_ino, b".")).st_ino == f.st_ino
    assert (await fs.lookup(b.st_ino, b"..")).st_ino == a.st_ino
    assert (await fs.lookup(a.st_ino, b"..")).st_ino == ROOT
    assert (await fs.lookup(ROOT, b"..")).st_ino == ROOT
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.lookup(f.st_ino, b"..")
    assert e.value.errno == errno.ENOTDIR
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.lookup(999_999, b".")
    assert e.value.errno in (errno.ENOENT, errno.ESTALE)
    await fs.take_snapshot(label=None, hold=False)
    [record] = fs.visible_snapshots()
    slot = fs.snapshots.slot(record.id)
    snap_b = inodes.join(slot, b.st_ino)
    e = await fs.lookup(snap_b, b".")
    assert e.st_ino == snap_b and e.generation == record.id
    assert (await fs.lookup(snap_b, b"..")).st_ino == inodes.join(slot, a.st_ino)
    assert (await fs.lookup(inodes.join(slot, ROOT), b"..")).st_ino == inodes.SNAPSHOTS_DIR_INO
    assert (await fs.lookup(inodes.SNAPSHOTS_DIR_INO, b"..")).st_ino == ROOT
    assert (await fs.lookup(inodes.SNAPSHOTS_DIR_INO, b".")).st_ino == inodes.SNAPSHOTS_DIR_INO
