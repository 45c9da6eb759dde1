"""POSIX semantics through a real mount: every operation a backup target must get right,
checked with the same system calls applications make (issue 4).

Most tests share one mount (module scope, `-o allow_other`) and work in a directory of
their own; the ones that remount or kill the daemon make their own.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from mounting import Mount, answer_times, assert_fsck_clean, longest_wait

pytestmark = [pytest.mark.mount, pytest.mark.timeout(240)]

BS = 128 * 1024
TIB = 1 << 40
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

libc = ctypes.CDLL(None, use_errno=True)
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
libc.syncfs.argtypes = [ctypes.c_int]
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_READ, MAP_SHARED, PAGE = 1, 1, os.sysconf("SC_PAGE_SIZE")


def renameat2(old, new, flags: int) -> None:
    if libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


def cached_pages(path, size: int) -> int:
    """How many of the file's first `size` bytes' pages the kernel's page cache holds
    (mincore of a mapping that is never touched, so mapping it brings nothing in). No
    stat: a fresh mtime from the daemon would make the kernel drop the pages first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, PROT_READ, MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            vec = ctypes.create_string_buffer((size + PAGE - 1) // PAGE)
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def errno_of(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    raise AssertionError(f"{fn.__name__}{args} succeeded")


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory):
    base = tmp_path_factory.mktemp("posix")
    # Other uids must reach the mountpoint: pytest's own tmp directory is 0700.
    top = Path(tempfile.mkdtemp(prefix="backupfs-posix-"))
    os.chmod(top, 0o755)
    m = Mount(base / "store", top / "mnt", "allow_other", "suid")  # suid: exec tests
    try:
        m.start()
        yield m
        # Everything the tests left must be what a new daemon reads from the store: the
        # kernel's caches (writeback, attributes) must not have hidden a lost update.
        before = tree_state(m.path)
        m.stop()
        m.start()
        after = tree_state(m.path)
        assert sorted(before) == sorted(after)
        for path in before:
            assert before[path] == after[path], path
    except BaseException:
        m.cleanup()
        raise
    else:
        m.stop()
    finally:
        if not os.path.ismount(top / "mnt"):
            shutil.rmtree(top, ignore_errors=True)


def tree_state(root: Path) -> dict:
    """What each object under root looks like: metadata, xattrs, and its bytes (of huge
    sparse files, the first and last MiB)."""
    import hashlib
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [n for n in dirnames if n != "snapshots"]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            item = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_rdev,
                    st.st_mtime_ns)
            if stat.S_ISLNK(st.st_mode):
                item += (os.readlink(p),)
            else:
                item += (sorted((k, os.getxattr(p, k)) for k in os.listxattr(p)),)
            if stat.S_ISREG(st.st_mode):
                h = hashlib.blake2b()
                with open(p, "rb") as f:
                    if st.st_size <= 64 << 20:
                        h.update(f.read())
                    else:
                        h.update(f.read(1 << 20))
                        f.seek(st.st_size - (1 << 20))
                        h.update(f.read())
                item += (h.hexdigest(),)
            out[p] = item
    return out


@pytest.fixture
def d(shared_mount, request) -> Path:
    """A fresh directory of the shared mount for one test."""
    p = shared_mount.path / request.node.name[:200]
    p.mkdir()
    os.chmod(p, 0o777)
    return p


# -- data ------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, BS - 1, BS, BS + 1, 3 * BS + 17])
def test_round_trip_sizes(d, size):
    data = os.urandom(size)
    (d / "f").write_bytes(data)
    assert os.stat(d / "f").st_size == size
    assert (d / "f").read_bytes() == data


def test_round_trip_100mib_survives_remount(mount_factory):
    m = mount_factory().start()
    # Half random, half repetitive: stored blocks of both codecs, and dedup of equal blocks.
    chunk = os.urandom(BS)
    data = os.urandom(50 << 20) + chunk * ((50 << 20) // BS)
    with open(m.path / "big", "wb") as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i:i + (1 << 20)])
    assert os.stat(m.path / "big").st_size == 100 << 20
    m.stop()
    m.start()   # a new daemon: nothing can come from a cache
    with open(m.path / "big", "rb") as f:
        got = f.read()
    assert got == data
    m.stop()


def test_mount_reads_ahead_four_megabytes(shared_mount):
    """The daemon raises the mount's read-ahead from the kernel's 128 KiB, so sequential
    reads arrive as 1 MiB requests, four at a time (the kernel caps it at the INIT reply:
    it must be raised after the mount answered)."""
    mountpoint = str(shared_mount.path.resolve())
    device = next(line.split()[2] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if line.split()[4] == mountpoint)
    knob = Path("/sys/class/bdi", device, "read_ahead_kb")
    deadline = time.monotonic() + 10
    while knob.read_text().strip() != "4096" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert knob.read_text().strip() == "4096"


def test_overwrite_inside_stored_block(d):
    data = bytearray(os.urandom(2 * BS + 100))
    (d / "f").write_bytes(data)
    with open(d / "f", "r+b") as f:
        f.seek(BS - 3)
        f.write(b"abcdef")       # across a block boundary
        f.seek(2 * BS + 50)
        f.write(b"Z" * 200)      # past the end: grows the file
    data[BS - 3:BS + 3] = b"abcdef"
    data[2 * BS + 50:] = b"Z" * 200
    assert (d / "f").read_bytes() == bytes(data)


def test_sparse_file_holes_not_stored(d):
    p = d / "sparse"
    with open(p, "wb") as f:
        f.seek(TIB)
        f.write(b"end")
        f.seek(5 * BS)
        f.write(b"middle")
    st = os.stat(p)
    assert st.st_size == TIB + 3
    # Two partial blocks stored, one TiB of holes not: a few blocks' worth at most.
    assert st.st_blocks * 512 <= 4 * BS, st.st_blocks
    with open(p, "rb") as f:
        f.seek(TIB - 10)
        assert f.read() == bytes(10) + b"end"
        f.seek(5 * BS - 4)
        assert f.read(10) == bytes(4) + b"middle"
        f.seek(123 * BS)
        assert f.read(BS) == bytes(BS)


def test_zero_blocks_written_become_holes(d):
    p = d / "zeros"
    p.write_bytes(bytes(4 * BS) + b"x")
    os.sync()
    assert os.stat(p).st_blocks * 512 <= BS
    assert p.read_bytes() == bytes(4 * BS) + b"x"


def test_truncate_grow_and_shrink(d):
    p = d / "t"
    data = os.urandom(3 * BS + 5)
    p.write_bytes(data)
    os.truncate(p, BS + 7)                     # shrink into a stored block
    assert os.stat(p).st_size == BS + 7
    assert p.read_bytes() == data[:BS + 7]
    os.truncate(p, 4 * BS)                     # grow: the cut bytes must read as zeros
    assert p.read_bytes() == data[:BS + 7] + bytes(4 * BS - BS - 7)
    with open(p, "r+b") as f:
        os.ftruncate(f.fileno(), 10)
        assert os.fstat(f.fileno()).st_size == 10
        f.seek(0)
        assert f.read() == data[:10]
        os.ftruncate(f.fileno(), 0)
        os.ftruncate(f.fileno(), TIB)
        assert os.fstat(f.fileno()).st_size == TIB
    assert os.stat(p).st_blocks * 512 <= BS
    with open(p, "rb") as f:
        f.seek(TIB // 2)
        assert f.read(100) == bytes(100)


def test_a_big_truncate_leaves_the_mount_answering(mount_factory):
    """Truncating a file of 65,536 stored blocks keeps the daemon busy a while (it
    releases every block); other requests are answered meanwhile, not after it."""
    m = mount_factory("m", init_args=("--block-size", "4K")).start()
    big, other = m.path / "big", m.path / "other"
    other.write_bytes(b"x")
    with open(big, "wb") as f:
        chunk = os.urandom(4096) * 256  # deduplicated: quick to store, still 65,536 entries
        for _ in range(256):
            f.write(chunk)
        os.fsync(f.fileno())
    with answer_times(other) as answers:
        start = time.monotonic()
        os.truncate(big, 4096)
        end = time.monotonic()
    assert end - start > 0.5, "too quick to tell: give the file more blocks"
    # The longest wait for an answer while the truncate ran: one chunk of the release,
    # not the whole of it (measured: 0.02 s of 1.2-1.4 s; in one piece ~1.1 s of a
    # 1.4 s truncate).
    longest = longest_wait(answers, start, end)
    assert longest < 0.2 * (end - start), (longest, end - start)
    assert big.stat().st_size == 4096 and big.read_bytes() == chunk[:4096]
    m.stop()
    assert_fsck_clean(m.store)


def test_truncate_then_write_same_open(d):
    p = d / "t"
    p.write_bytes(b"A" * (BS + 10))
    with open(p, "r+b") as f:
        f.truncate(5)
        f.seek(BS + 2)
        f.write(b"B")
    assert p.read_bytes() == b"A" * 5 + bytes(BS + 2 - 5) + b"B"


def test_o_append(d):
    p = d / "log"
    p.write_bytes(b"start\n")
    fd1 = os.open(p, os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(20):
            os.write(fd1 if i % 2 else fd2, b"line %02d\n" % i)
            os.lseek(fd1, 0, os.SEEK_SET)   # O_APPEND ignores the position
    finally:
        os.close(fd1)
        os.close(fd2)
    assert p.read_bytes() == b"start\n" + b"".join(b"line %02d\n" % i for i in range(20))


def test_write_only_opens_keep_readers_and_times_right(d):
    """Write-only opens go past the kernel's page cache (direct_io). A reader holding the
    file's pages sees their writes at once, and each write moves mtime, also while the
    writer keeps the file open (the kernel would keep an mtime of its own under the
    writeback cache, which a direct write never moves)."""
    p = d / "f"
    p.write_bytes(b"x" * 10_000)
    assert cached_pages(p, 10_000) == 0  # past the page cache
    q = d / "g"
    fd = os.open(q, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"x" * 10_000)
    os.close(fd)
    assert cached_pages(q, 10_000) > 0   # what a write through the page cache leaves
    r = os.open(p, os.O_RDONLY)
    w = os.open(p, os.O_WRONLY)
    try:
        assert os.pread(r, 20_000, 0) == b"x" * 10_000  # now in the page cache
        os.utime(p, ns=(10, 10))
        os.pwrite(w, b"y" * 100, 5_000)
        assert os.pread(r, 20_000, 0) == b"x" * 5_000 + b"y" * 100 + b"x" * 4_900
        first = os.stat(p).st_mtime_ns
        assert first > 10
        time.sleep(0.02)
        os.pwrite(w, b"z" * 10, 10_000)   # past the end: the reader sees the new size
        assert os.stat(p).st_mtime_ns > first
        assert os.pread(r, 20_000, 9_995) == b"x" * 5 + b"z" * 10
    finally:
        os.close(w)
        os.close(r)
    assert os.stat(p).st_size == 10_010


def test_o_direct_works_or_einval_and_mount_survives(d):
    p = d / "direct"
    buf = ctypes.create_string_buffer(BS + 4096)
    addr = ctypes.addressof(buf)
    aligned = (addr + 4095) & ~4095
    data = os.urandom(BS)
    ctypes.memmove(aligned, data, BS)
    mv = (ctypes.c_char * BS).from_address(aligned)
    try:
        fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    except OSError as e:
        assert e.errno == errno.EINVAL
    else:
        try:
            assert os.write(fd, mv) == BS
            os.lseek(fd, 0, os.SEEK_SET)
            rd = (ctypes.c_char * BS).from_address(aligned)
            ctypes.memset(aligned, 0, BS)
            assert os.readv(fd, [rd]) == BS
            assert bytes(rd) == data
        finally:
            os.close(fd)
        assert p.read_bytes() == data
    # the mount still answers
    (d / "after").write_bytes(b"ok")
    assert (d / "after").read_bytes() == b"ok"


def test_fsync_fdatasync_syncfs(d):
    p = d / "f"
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"x" * 1000)
        os.fsync(fd)
        os.write(fd, b"y" * 1000)
        os.fdatasync(fd)
        assert libc.syncfs(fd) == 0
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert p.read_bytes() == b"x" * 1000 + b"y" * 1000


# -- kinds of files ------------------------------------------------------------------

def test_directories(d):
    (d / "a" / "b" / "c").mkdir(parents=True)
    assert os.stat(d / "a").st_nlink == 3
    assert os.stat(d / "a" / "b" / "c").st_nlink == 2
    (d / "a" / "file").write_text("x")
    assert sorted(os.listdir(d / "a")) == ["b", "file"]
    assert os.stat(d / "a").st_nlink == 3    # files do not count
    os.rmdir(d / "a" / "b" / "c")
    assert os.stat(d / "a" / "b").st_nlink == 2
    os.rmdir(d / "a" / "b")
    assert os.stat(d / "a").st_nlink == 2
    assert os.listdir(d / "a") == ["file"]


def test_symlinks(d):
    os.symlink("target/does/not/exist", d / "dangling")
    assert os.readlink(d / "dangling") == "target/does/not/exist"
    st = os.lstat(d / "dangling")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("target/does/not/exist")
    (d / "real").write_text("hello")
    os.symlink("real", d / "link")
    assert (d / "link").read_text() == "hello"
    assert os.stat(d / "link").st_ino == os.stat(d / "real").st_ino
    long_target = "x/" * 2000 + "y" * 95
    assert len(long_target) == 4095
    os.symlink(long_target, d / "long")
    assert os.readlink(d / "long") == long_target
    assert errno_of(os.symlink, "z" * 4096, d / "toolong") == errno.ENAMETOOLONG
    assert errno_of(os.readlink, d / "real") == errno.EINVAL


def test_hard_links(d):
    (d / "a").write_bytes(b"data")
    os.link(d / "a", d / "b")
    (d / "sub").mkdir()
    os.link(d / "a", d / "sub" / "c")
    sa, sb, sc = (os.stat(p) for p in (d / "a", d / "b", d / "sub" / "c"))
    assert sa.st_ino == sb.st_ino == sc.st_ino
    assert sa.st_nlink == sb.st_nlink == sc.st_nlink == 3
    with open(d / "b", "ab") as f:
        f.write(b"more")
    assert (d / "sub" / "c").read_bytes() == b"datamore"
    os.unlink(d / "a")
    assert os.stat(d / "b").st_nlink == 2
    os.unlink(d / "sub" / "c")
    assert os.stat(d / "b").st_nlink == 1
    assert (d / "b").read_bytes() == b"datamore"
    assert errno_of(os.link, d / "sub", d / "dirlink") == errno.EPERM


def test_unlinked_open_file_stays_readable(d):
    p = d / "f"
    p.write_bytes(b"still here" * 10000)
    with open(p, "rb") as f:
        os.unlink(p)
        assert not p.exists()
        assert f.read() == b"still here" * 10000
        assert os.fstat(f.fileno()).st_nlink == 0


def test_fifo_and_device_nodes(d):
    os.mkfifo(d / "fifo", 0o640)
    st = os.stat(d / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 & ~current_umask()
    os.mknod(d / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.stat(d / "chr")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    os.mknod(d / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    assert stat.S_ISBLK(os.stat(d / "blk").st_mode)
    assert os.stat(d / "blk").st_rdev == os.makedev(7, 0)
    os.mknod(d / "sock", 0o600 | stat.S_IFSOCK)
    assert stat.S_ISSOCK(os.stat(d / "sock").st_mode)
    os.mknod(d / "reg", 0o600 | stat.S_IFREG)
    assert stat.S_ISREG(os.stat(d / "reg").st_mode)
    # A FIFO works as a FIFO: the kernel handles it, the filesystem only stores it.
    got = []
    t = threading.Thread(target=lambda: got.append(open(d / "fifo", "rb").read()))
    t.start()
    with open(d / "fifo", "wb") as w:
        w.write(b"through the pipe")
    t.join(10)
    assert got == [b"through the pipe"]


def current_umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def test_xattrs(d):
    p = d / "f"
    p.write_text("x")
    assert os.listxattr(p) == []
    os.setxattr(p, "user.a", b"1")
    os.setxattr(p, "user.empty", b"")
    os.setxattr(p, "user.big", b"v" * 60000)
    os.setxattr(p, "trusted.t", b"root only")
    assert os.getxattr(p, "user.a") == b"1"
    assert os.getxattr(p, "user.empty") == b""
    assert os.getxattr(p, "user.big") == b"v" * 60000
    assert sorted(os.listxattr(p)) == ["trusted.t", "user.a", "user.big", "user.empty"]
    os.setxattr(p, "user.a", b"2")
    assert os.getxattr(p, "user.a") == b"2"
    os.removexattr(p, "user.a")
    assert errno_of(os.getxattr, p, "user.a") == errno.ENODATA
    assert errno_of(os.removexattr, p, "user.a") == errno.ENODATA
    assert "user.a" not in os.listxattr(p)
    # on directories and (without following) symlinks
    os.setxattr(d, "user.dir", b"d")
    assert os.getxattr(d, "user.dir") == b"d"
    os.symlink("f", d / "l")
    os.setxattr(d / "l", "trusted.l", b"l", follow_symlinks=False)
    assert os.getxattr(d / "l", "trusted.l", follow_symlinks=False) == b"l"
    assert "trusted.l" not in os.listxattr(p)
    # a file written after getting an xattr still reports it (no stale "none" cache)
    q = d / "g"
    q.write_bytes(b"1")
    with open(q, "ab") as f:
        f.write(b"2")
    os.setxattr(q, "security.capability", b"\x01\x00\x00\x02" + bytes(16))
    assert os.getxattr(q, "security.capability") == b"\x01\x00\x00\x02" + bytes(16)
    assert errno_of(os.getxattr, p, "user.nope") == errno.ENODATA
    # ACLs and SELinux labels are not supported (so `ls -l` stops asking for them)
    for name in ("system.posix_acl_access", "system.posix_acl_default", "security.selinux"):
        assert errno_of(os.getxattr, p, name) == errno.EOPNOTSUPP
    assert errno_of(os.setxattr, p, "security.selinux", b"system_u:object_r:etc_t:s0") == \
        errno.EOPNOTSUPP


def test_names_looked_up_while_absent_appear_once_created(d):
    """The kernel keeps "no such name" answers (negative entries): every way of making
    a name must still show it at once, to this process and to another one."""
    (d / "src").write_bytes(b"source")

    def rename_onto(p: Path) -> None:
        (d / "moved").write_bytes(b"moved")
        os.rename(d / "moved", p)

    makers = {
        "file": lambda p: p.write_bytes(b"new"),
        "dir": lambda p: p.mkdir(),
        "symlink": lambda p: p.symlink_to("src"),
        "hardlink": lambda p: os.link(d / "src", p),
        "fifo": lambda p: os.mkfifo(p),
        "rename": rename_onto,
        "exclusive": lambda p: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
    }
    for kind, make in makers.items():
        p = d / f"later-{kind}"
        for _ in range(3):
            assert errno_of(os.lstat, p) == errno.ENOENT
        assert subprocess.run(["stat", p], capture_output=True).returncode != 0
        make(p)
        assert os.lstat(p), kind
        assert subprocess.run(["stat", p], capture_output=True).returncode == 0, kind
        assert p.name in os.listdir(d)
    # Gone again after unlink and rename away, and back when made again.
    p = d / "later-file"
    os.unlink(p)
    assert errno_of(os.lstat, p) == errno.ENOENT
    os.rename(d / "later-rename", p)
    assert p.read_bytes() == b"moved"


def test_ls_l_asks_for_labels_and_acls_once_per_listing(d):
    """`ls -l` stops asking a filesystem that answered EOPNOTSUPP: two xattr round trips
    per listing instead of two per file (what `ls -l` of a big directory costs)."""
    for i in range(20):
        (d / f"f{i}").write_bytes(b"x")
    trace = subprocess.run(["strace", "-f", "-e", "trace=getxattr,lgetxattr", "ls", "-l", str(d)],
                           capture_output=True, text=True, check=True).stderr
    asked = [line for line in trace.splitlines() if "xattr(" in line]
    assert asked and all("EOPNOTSUPP" in line for line in asked)
    assert len(asked) <= 3, asked


def test_xattr_limits(d):
    p = d / "f"
    p.write_text("x")
    assert errno_of(os.setxattr, p, "user." + "n" * 251, b"v") == errno.ERANGE
    os.setxattr(p, "user." + "n" * 250, b"v")
    assert errno_of(os.setxattr, p, "user.huge", b"v" * 65537) in (errno.E2BIG, errno.ERANGE)


# -- names, renames, errors ----------------------------------------------------------

def test_name_lengths(d):
    ok = "n" * 255
    (d / ok).write_text("x")
    assert ok in os.listdir(d)
    assert errno_of(open, d / ("n" * 256), "w") == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, d / ("m" * 256)) == errno.ENAMETOOLONG
    assert errno_of(os.stat, d / ("m" * 256)) == errno.ENAMETOOLONG
    (d / "x").write_text("x")
    assert errno_of(os.rename, d / "x", d / ("r" * 256)) == errno.ENAMETOOLONG
    assert errno_of(os.link, d / "x", d / ("l" * 256)) == errno.ENAMETOOLONG
    assert errno_of(os.symlink, "x", d / ("s" * 256)) == errno.ENAMETOOLONG
    # every byte but / and NUL
    odd = bytes(range(1, 256)).replace(b"/", b"").replace(b".", b"")
    (d / os.fsdecode(odd)).write_bytes(b"odd")
    assert odd in os.listdir(os.fsencode(d))


def test_long_path(d):
    # Components of 200 bytes up to a path of ~4000 bytes below the mount.
    root_len = len(os.fsencode(d))
    p = d
    while len(os.fsencode(p)) + 201 < 4090:
        p = p / ("d" * 200)
        os.mkdir(p)
    rest = 4094 - len(os.fsencode(p)) - 1
    f = p / ("f" * rest)
    f.write_bytes(b"deep")
    assert len(os.fsencode(f)) == 4094
    assert f.read_bytes() == b"deep"
    assert len(os.fsencode(f)) > root_len
    assert errno_of(os.stat, str(f) + "/" + "x" * 10) in (errno.ENAMETOOLONG, errno.ENOTDIR)


def test_rename(d):
    (d / "a").write_text("A")
    (d / "b").write_text("B")
    ino_a = os.stat(d / "a").st_ino
    os.rename(d / "a", d / "b")             # replace
    assert (d / "b").read_text() == "A" and os.stat(d / "b").st_ino == ino_a
    assert not (d / "a").exists()
    (d / "sub").mkdir()
    os.rename(d / "b", d / "sub" / "c")     # across directories
    assert (d / "sub" / "c").read_text() == "A"
    (d / "x").write_text("X")
    renameat2(d / "x", d / "sub" / "c", RENAME_EXCHANGE)
    assert (d / "x").read_text() == "A" and (d / "sub" / "c").read_text() == "X"
    assert errno_of(renameat2, d / "x", d / "sub" / "c", RENAME_NOREPLACE) == errno.EEXIST
    assert (d / "x").read_text() == "A"
    renameat2(d / "x", d / "y", RENAME_NOREPLACE)
    assert (d / "y").read_text() == "A" and not (d / "x").exists()
    assert errno_of(renameat2, d / "y", d / "nope", RENAME_EXCHANGE) == errno.ENOENT


def test_rename_directories(d):
    (d / "a" / "b" / "c").mkdir(parents=True)
    (d / "e").mkdir()
    assert errno_of(os.rename, d / "a", d / "a" / "b" / "c" / "a") == errno.EINVAL
    assert errno_of(os.rename, d / "a", d / "a" / "x") == errno.EINVAL
    (d / "full").mkdir()
    (d / "full" / "f").write_text("x")
    assert errno_of(os.rename, d / "e", d / "full") == errno.ENOTEMPTY
    (d / "file").write_text("x")
    assert errno_of(os.rename, d / "e", d / "file") == errno.ENOTDIR
    assert errno_of(os.rename, d / "file", d / "e") == errno.EISDIR
    (d / "empty").mkdir()
    os.rename(d / "e", d / "empty")         # a directory replaces an empty one
    assert not (d / "e").exists()
    nlink = os.stat(d).st_nlink
    os.rename(d / "a" / "b", d / "b")       # moving a directory moves a link of ..
    assert os.stat(d).st_nlink == nlink + 1
    assert os.stat(d / "a").st_nlink == 2
    assert os.stat(d / "b" / "c").st_ino
    renameat2(d / "a", d / "b", RENAME_EXCHANGE)   # exchange two directories
    assert (d / "a" / "c").is_dir() and not (d / "b" / "c").exists()
    # a directory into a cousin, then its parent .. resolves to the new place
    os.rename(d / "a", d / "empty" / "moved")
    assert os.stat(d / "empty" / "moved" / "c" / ".." / "..").st_ino == os.stat(d / "empty").st_ino


def test_error_cases(d):
    (d / "file").write_text("x")
    (d / "dir").mkdir()
    (d / "dir" / "inner").write_text("y")
    assert errno_of(os.stat, d / "missing") == errno.ENOENT
    assert errno_of(open, d / "missing" / "f", "w") == errno.ENOENT
    assert errno_of(os.unlink, d / "missing") == errno.ENOENT
    assert errno_of(os.rename, d / "missing", d / "x") == errno.ENOENT
    assert errno_of(os.mkdir, d / "file") == errno.EEXIST
    assert errno_of(os.mkdir, d / "dir") == errno.EEXIST
    assert errno_of(os.link, d / "file", d / "dir") == errno.EEXIST
    assert errno_of(os.symlink, "x", d / "file") == errno.EEXIST
    assert errno_of(os.open, d / "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert errno_of(os.mkfifo, d / "file") == errno.EEXIST
    assert errno_of(os.rmdir, d / "dir") == errno.ENOTEMPTY
    assert errno_of(os.unlink, d / "dir") == errno.EISDIR
    assert errno_of(open, d / "dir", "w") == errno.EISDIR
    assert errno_of(os.rmdir, d / "file") == errno.ENOTDIR
    assert errno_of(os.listdir, d / "file") == errno.ENOTDIR
    assert errno_of(os.stat, d / "file" / "x") == errno.ENOTDIR
    assert errno_of(os.mkdir, d / "file" / "x") == errno.ENOTDIR
    assert errno_of(os.truncate, d / "dir", 0) == errno.EISDIR


# -- attributes ----------------------------------------------------------------------

def test_utimens_ns_precision(d):
    p = d / "f"
    p.write_text("x")
    os.utime(p, ns=(1_234_567_890_123_456_789, 1_600_000_000_987_654_321))
    st = os.stat(p)
    assert st.st_atime_ns == 1_234_567_890_123_456_789
    assert st.st_mtime_ns == 1_600_000_000_987_654_321
    os.utime(p, ns=(1, 2))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1, 2)
    # pre-1970 and symlinks themselves
    os.symlink("f", d / "l")
    os.utime(d / "l", ns=(-1_000_000_001, 5), follow_symlinks=False)
    st = os.lstat(d / "l")
    assert (st.st_atime_ns, st.st_mtime_ns) == (-1_000_000_001, 5)
    assert os.stat(p).st_mtime_ns == 2
    before = time.time_ns()
    os.utime(p)                              # now
    assert os.stat(p).st_mtime_ns >= before - 10_000_000
    # a write updates mtime and ctime; a chmod only ctime
    os.utime(p, ns=(10, 10))
    with open(p, "ab") as f:
        f.write(b"y")
    st = os.stat(p)
    assert st.st_mtime_ns > 10 and st.st_ctime_ns >= before - 10_000_000
    os.utime(p, ns=(10, 10))
    c0 = os.stat(p).st_ctime_ns
    time.sleep(0.01)
    os.chmod(p, 0o600)
    st = os.stat(p)
    assert st.st_mtime_ns == 10 and st.st_ctime_ns > c0


def test_chmod_chown(d):
    p = d / "f"
    p.write_text("x")
    for mode in (0o000, 0o4755, 0o2711, 0o1777, 0o644):
        os.chmod(p, mode)
        assert stat.S_IMODE(os.stat(p).st_mode) == mode
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(p, -1, 42)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 42)
    os.symlink("f", d / "l")
    os.chown(d / "l", 7, 8, follow_symlinks=False)
    assert (os.lstat(d / "l").st_uid, os.lstat(d / "l").st_gid) == (7, 8)
    assert os.stat(p).st_uid == 1234
    (d / "dir").mkdir()
    os.chmod(d / "dir", 0o3750)
    assert stat.S_IMODE(os.stat(d / "dir").st_mode) == 0o3750


def _as_user(uid: int, gid: int, fn) -> int:
    """Run fn() in a forked child with the given ids; returns its exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            fn()
            os._exit(0)
        except BaseException as e:  # noqa: BLE001 - report it through the status
            os.write(2, f"child failed: {e!r}\n".encode())
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_new_files_belong_to_the_caller(d):
    def work():
        os.umask(0o022)
        with open(d / "userfile", "w") as f:
            f.write("mine")
        os.mkdir(d / "userdir", 0o777)
        os.symlink("userfile", d / "userlink")
        os.mkfifo(d / "userfifo", 0o666)
        # the kernel checks permissions (default_permissions) for this uid
        try:
            open(d / "rootonly", "r")
        except PermissionError:
            pass
        else:
            raise AssertionError("read a 0600 root file as another user")
        try:
            os.chown(d / "userfile", 0, 0)
        except PermissionError:
            pass
        else:
            raise AssertionError("gave a file away")

    (d / "rootonly").write_text("secret")
    os.chmod(d / "rootonly", 0o600)
    assert _as_user(4321, 8765, work) == 0
    for name in ("userfile", "userdir", "userlink", "userfifo"):
        st = os.lstat(d / name)
        assert (st.st_uid, st.st_gid) == (4321, 8765), name
    assert stat.S_IMODE(os.stat(d / "userdir").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(d / "userfile").st_mode) == 0o644
    # setgid directories pass their group on
    (d / "sgid").mkdir()
    os.chown(d / "sgid", 0, 999)
    os.chmod(d / "sgid", 0o2777)
    assert _as_user(4321, 8765, lambda: os.mkdir(d / "sgid" / "sub")) == 0
    st = os.stat(d / "sgid" / "sub")
    assert st.st_gid == 999 and st.st_mode & stat.S_ISGID and st.st_uid == 4321


def test_a_write_by_another_user_clears_set_id_bits(d):
    """As ext4 does: a write by someone other than root drops set-user-ID, and
    set-group-ID where group execute is set, whether the file was opened for writing
    only (past the page cache, so the daemon clears them) or for reading and writing
    (the kernel does); root's writes keep them."""
    for flags in (os.O_WRONLY, os.O_RDWR):
        for mode, left in ((0o6777, 0o0777), (0o2767, 0o2767), (0o4777, 0o0777)):
            p = d / f"setid-{flags}-{mode:o}"
            p.write_bytes(b"x")
            os.chmod(p, mode)

            def write():
                fd = os.open(p, flags)
                try:
                    os.write(fd, b"y")
                finally:
                    os.close(fd)

            assert _as_user(4321, 8765, write) == 0
            assert stat.S_IMODE(os.stat(p).st_mode) == left, (flags, oct(mode))
            assert p.read_bytes() == b"y"
            os.chmod(p, mode)
            write()  # as root
            assert stat.S_IMODE(os.stat(p).st_mode) == mode, (flags, oct(mode))


def test_a_program_another_user_wrote_to_runs_without_its_set_uid(d):
    """The kernel checks exec against the mode it caches: after another user's write
    cleared set-user-ID, the program runs as its caller, not as its owner."""
    p = d / "id"
    shutil.copy("/usr/bin/id", p)
    os.chmod(p, 0o4777)
    assert os.stat(p).st_mode & stat.S_ISUID  # the kernel caches the mode with the bit

    def append_then_run():
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"\0")  # past the ELF image: still runs
        finally:
            os.close(fd)
        euid = subprocess.run([p, "-u"], capture_output=True, text=True, check=True).stdout
        assert euid.strip() == "4321", euid

    assert _as_user(4321, 8765, append_then_run) == 0


def test_statfs_reports_the_store_disk(shared_mount):
    mnt = os.statvfs(shared_mount.path)
    disk = os.statvfs(shared_mount.store)
    assert mnt.f_namemax == 255
    assert mnt.f_blocks * mnt.f_frsize == disk.f_blocks * disk.f_frsize
    # free space is the disk's, less the store's index reserve (at most 256 MiB), give
    # or take what other processes write meanwhile
    diff = disk.f_bavail * disk.f_frsize - mnt.f_bavail * mnt.f_frsize
    assert -(64 << 20) < diff < (256 + 64) << 20
    assert mnt.f_bavail > 0


# -- directories under change --------------------------------------------------------

def test_readdir_during_concurrent_unlink(d):
    """A listing resumes after the last name it returned, not at a position: unlinking
    what was already listed (as rm -rf does) and, from another thread, what is still to
    come must neither skip nor repeat a name that stays."""
    n = 3000
    names = [f"f{i:05d}" for i in range(n)]
    for name in names:
        os.mknod(d / name, stat.S_IFREG | 0o644)
    first, second = names[: n // 2], names[n // 2:]
    stop = threading.Event()

    def unlinker():
        for name in reversed(second):
            if stop.is_set():
                return
            try:
                os.unlink(d / name)
            except FileNotFoundError:
                pass  # the lister got there first

    seen: list[str] = []
    t = threading.Thread(target=unlinker)
    t.start()
    try:
        with os.scandir(d) as it:
            for entry in it:
                seen.append(entry.name)
                try:
                    os.unlink(entry.path)         # behind the reader's position
                except FileNotFoundError:
                    pass
    finally:
        stop.set()
        t.join()
    assert len(seen) == len(set(seen)), "a name was listed twice"
    missed = set(first) - set(seen)
    assert not missed, f"{len(missed)} names skipped, e.g. {sorted(missed)[:3]}"
    assert set(seen) <= set(names)
    assert os.listdir(d) == []


def test_rm_rf_100k_entries(mount_factory):
    """rm -rf unlinks while it reads the directory: no name may be skipped (rm would
    then fail with ENOTEMPTY). The 100,000 entries are made through the namespace API
    on the unmounted store (seconds, instead of a minute of FUSE round trips); the
    listing, the lookups and the unlinks all go through the mount."""
    from backupfs.namespace import Namespace
    from backupfs.store import Store

    m = mount_factory()
    n = 100_000
    t0 = time.monotonic()
    store = Store.open(m.store)
    try:
        live = Namespace(store).live
        now = time.time_ns()
        top = live.create(1, b"many", stat.S_IFDIR | 0o755, 0, 0, now)
        for i in range(n):
            live.create(top.ino, b"file-%06d" % i, stat.S_IFREG | 0o644, 0, 0, now)
        sub = live.create(top.ino, b"subdir", stat.S_IFDIR | 0o755, 0, 0, now)
        live.create(sub.ino, b"file", stat.S_IFREG | 0o644, 0, 0, now)
    finally:
        store.close(commit=True)
    created = time.monotonic() - t0
    m.start()
    top = m.path / "many"
    (top / "written").write_bytes(b"data" * 1000)     # one made through the mount too
    assert len(os.listdir(top)) == n + 2
    r = subprocess.run(["rm", "-rf", str(top)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert not top.exists()
    print(f"created {n} in {created:.1f}s, rm -rf in {time.monotonic() - t0 - created:.1f}s")
    m.stop()
    m.start()
    assert os.listdir(m.path) == ["snapshots"]
    m.stop()


def test_xattr_create_and_replace_flags(d):
    p = d / "f"
    p.write_text("x")
    assert errno_of(os.setxattr, p, "user.r", b"v", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(p, "user.c", b"1", os.XATTR_CREATE)
    assert errno_of(os.setxattr, p, "user.c", b"2", os.XATTR_CREATE) == errno.EEXIST
    os.setxattr(p, "user.c", b"3", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.c") == b"3"


def test_mmap_shared_write_and_read(d):
    import mmap
    p = d / "m"
    p.write_bytes(bytes(3 * BS))
    with open(p, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 3 * BS)
        mm[BS - 2:BS + 2] = b"MMAP"
        mm[2 * BS + 5:2 * BS + 9] = b"tail"
        mm.flush()
        mm.close()
    data = p.read_bytes()
    assert data[BS - 2:BS + 2] == b"MMAP" and data[2 * BS + 5:2 * BS + 9] == b"tail"
    assert data.count(0) == 3 * BS - 8


def test_concurrent_writers_one_block(d):
    """Threads writing disjoint slices of the same blocks through separate handles:
    read-modify-write of a block must never lose another writer's bytes."""
    p = d / "shared"
    p.write_bytes(b"." * (2 * BS))
    os.sync()
    n = 16
    piece = (2 * BS) // n

    def writer(i):
        fd = os.open(p, os.O_WRONLY)
        try:
            for _ in range(5):
                os.pwrite(fd, bytes([65 + i]) * piece, i * piece)
                os.fsync(fd)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert p.read_bytes() == b"".join(bytes([65 + i]) * piece for i in range(n))


def test_open_unlinked_file_can_still_be_written(d):
    p = d / "gone"
    with open(p, "w+b") as f:
        f.write(b"a" * BS)
        os.unlink(p)
        f.write(b"b" * 10)
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        assert f.read() == b"a" * BS + b"b" * 10
    assert not p.exists()
    assert os.listdir(d) == []


def test_o_trunc_and_o_excl(d):
    p = d / "f"
    p.write_bytes(os.urandom(3 * BS))
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"new")
    os.close(fd)
    assert p.read_bytes() == b"new"
    assert errno_of(os.open, p, os.O_CREAT | os.O_EXCL | os.O_RDWR) == errno.EEXIST


def test_random_writes_truncates_against_a_model(d):
    """fsx in miniature: random writes, truncates and reads near block boundaries, with
    the kernel's page cache dropped now and then so the daemon's own answers are read."""
    import random
    rng = random.Random(4)
    p = d / "fsx"
    model = bytearray()
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        def spot():
            b = rng.randrange(0, 12)
            return max(0, b * BS + rng.randrange(-300, 300))

        for step in range(600):
            op = rng.random()
            if op < 0.55:
                off, n = spot(), rng.choice([1, 17, 4096, BS - 1, BS, BS + 3, 3 * BS])
                data = rng.randbytes(n) if rng.random() < 0.8 else bytes(n)
                os.pwrite(fd, data, off)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + n] = data
            elif op < 0.7:
                size = spot()
                os.ftruncate(fd, size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            elif op < 0.9:
                off, n = spot(), rng.choice([1, 100, BS, 2 * BS + 1])
                assert os.pread(fd, n, off) == bytes(model[off:off + n]), f"step {step}"
            else:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                assert os.fstat(fd).st_size == len(model)
                assert os.pread(fd, len(model) + 10, 0) == bytes(model), f"step {step}"
    finally:
        os.close(fd)
    assert p.read_bytes() == bytes(model)


def test_st_blocks_follows_stored_bytes(d):
    (d / "small").write_bytes(b"x" * 4000)
    (d / "dense").write_bytes(os.urandom(3 * BS + 1))
    os.sync()
    assert os.stat(d / "small").st_blocks == 8              # du says 4 KiB, not a block
    assert os.stat(d / "dense").st_blocks == -(-(3 * BS + 1) // 512)
    with open(d / "holey", "wb") as f:
        f.seek(10 * BS)
        f.write(b"x")
    os.sync()
    assert 0 < os.stat(d / "holey").st_blocks <= BS // 512


def test_random_namespace_churn_against_a_model(d):
    """Writes, hard links, renames (plain, NOREPLACE, EXCHANGE), unlinks and truncates of
    files with buffered data, checked against a model; the module's remount check then
    proves the store agrees with what the kernel showed."""
    import random
    rng = random.Random(7)
    dirs = [d / "a", d / "b"]
    for p in dirs:
        p.mkdir()
    names = [p / f"n{i}" for p in dirs for i in range(6)]
    where: dict[Path, int] = {}      # path -> model inode
    data: dict[int, bytearray] = {}
    next_ino = 0
    for step in range(400):
        op = rng.random()
        p, q = rng.choice(names), rng.choice(names)
        kind = ("write" if op < 0.3 else "link" if op < 0.4 else "rename" if op < 0.55 else
                "noreplace" if op < 0.62 else "exchange" if op < 0.7 else
                "unlink" if op < 0.85 else "truncate")
        if kind == "write":
            expected = None
        elif p not in where or (kind == "exchange" and q not in where):
            expected = errno.ENOENT
        elif kind in ("link", "noreplace") and q in where:
            expected = errno.EEXIST
        else:
            expected = None
        try:
            if kind == "write":
                off = rng.choice([0, 5, BS - 2, BS, 2 * BS + 9])
                chunk = rng.randbytes(rng.choice([1, 100, BS + 7]))
                fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
                os.pwrite(fd, chunk, off)
                os.close(fd)
            elif kind == "link":
                os.link(p, q)
            elif kind == "rename":
                os.rename(p, q)
            elif kind == "noreplace":
                renameat2(p, q, RENAME_NOREPLACE)
            elif kind == "exchange":
                renameat2(p, q, RENAME_EXCHANGE)
            elif kind == "unlink":
                os.unlink(p)
            else:
                size = rng.choice([0, 3, BS, BS + 1, 3 * BS])
                os.truncate(p, size)
        except OSError as e:
            assert e.errno == expected, (step, kind, p, q, e)
            continue
        assert expected is None, (step, kind, p, q, "succeeded")
        if kind == "write":
            if p not in where:
                where[p] = next_ino
                data[next_ino] = bytearray()
                next_ino += 1
            buf = data[where[p]]
            buf.extend(bytes(max(0, off - len(buf))))
            buf[off:off + len(chunk)] = chunk
        elif kind == "link":
            where[q] = where[p]
        elif kind in ("rename", "noreplace"):
            if where.get(q) != where[p]:      # two names of one file: nothing happens
                where[q] = where.pop(p)
        elif kind == "exchange":
            where[p], where[q] = where[q], where[p]
        elif kind == "unlink":
            del where[p]
        else:
            buf = data[where[p]]
            del buf[size:]
            buf.extend(bytes(size - len(buf)))
        if step % 50 == 49:
            os.sync()
    for p in names:
        if p in where:
            assert p.read_bytes() == bytes(data[where[p]]), p
            links = sum(1 for v in where.values() if v == where[p])
            assert os.stat(p).st_nlink == links, p
        else:
            assert not os.path.lexists(p), p
