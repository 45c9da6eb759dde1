"""Real tools on a real tree: `cp -a`, `tar` and `rsync -aHAX` copy a tree into the mount
and back out, and the copy out equals the original byte for byte and in every piece of
metadata a backup must keep; and a crash loses nothing that was fsynced.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from mounting import backupfs

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180)]

BS = 128 * 1024


def build_tree(root: Path) -> None:
    """Files of awkward sizes, empty and sparse files, nested dirs, symlinks (dangling,
    absolute, to dirs), hard links across dirs, xattrs, odd modes, owners, times, a FIFO."""
    root.mkdir()
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    for i, size in enumerate([0, 1, 100, BS - 1, BS, BS + 1, 3 * BS + 7, 1 << 20]):
        (root / "docs" / f"f{i}").write_bytes(os.urandom(size))
    (root / "docs" / "deep" / "er" / "text").write_text("hello\n" * 1000)
    with open(root / "sparse", "wb") as f:
        f.seek(10 << 20)
        f.write(b"tail")
    os.symlink("docs/f1", root / "link-rel")
    os.symlink("/nonexistent/target", root / "link-dangling")
    os.symlink("docs/deep", root / "link-dir")
    os.link(root / "docs" / "f2", root / "hard-a")
    os.link(root / "docs" / "f2", root / "docs" / "deep" / "hard-b")
    os.mkfifo(root / "fifo", 0o600)
    os.setxattr(root / "docs" / "f3", "user.comment", b"a value")
    os.setxattr(root / "docs" / "f3", "user.empty", b"")
    os.setxattr(root / "docs", "user.dir", b"on a dir")
    os.setxattr(root / "docs" / "f4", "trusted.secret", os.urandom(200))
    os.chmod(root / "docs" / "f5", 0o4751)
    os.chmod(root / "docs" / "f6", 0o400)
    os.chmod(root / "empty-dir", 0o1777)
    os.chown(root / "docs" / "f7", 1001, 2002)
    os.chown(root / "link-rel", 3003, 4004, follow_symlinks=False)
    os.chmod(root / "docs" / "deep", 0o2750)
    for i, p in enumerate(sorted(root.rglob("*"), reverse=True)):
        os.utime(p, ns=(1_500_000_000_000_000_000 + i * 1_000_000_007,
                        1_400_000_000_123_456_789 + i * 999_999_937), follow_symlinks=False)
    os.utime(root, ns=(1_000_000_000_000_000_001, 1_000_000_000_000_000_002))


def snapshot_tree(root: Path, with_atime: bool = False) -> dict:
    """Everything that must survive a copy, per relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + ([] if dirpath != str(root) else ["."]):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            item = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
                    "mtime": st.st_mtime_ns, "nlink": st.st_nlink}
            if with_atime:
                item["atime"] = st.st_atime_ns
            if stat.S_ISREG(st.st_mode):
                item["size"] = st.st_size
                item["data"] = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                item["target"] = os.readlink(p)
            if not stat.S_ISLNK(st.st_mode) and not stat.S_ISFIFO(st.st_mode):
                item["xattrs"] = {k: os.getxattr(p, k) for k in sorted(os.listxattr(p))}
            out[rel] = item
    return out


def hardlink_groups(root: Path) -> list[list[str]]:
    by_ino: dict[int, list[str]] = {}
    for p in root.rglob("*"):
        st = os.lstat(p)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            by_ino.setdefault(st.st_ino, []).append(str(p.relative_to(root)))
    return sorted(sorted(g) for g in by_ino.values())


def assert_same_tree(a: Path, b: Path) -> None:
    ta, tb = snapshot_tree(a), snapshot_tree(b)
    assert sorted(ta) == sorted(tb)
    for rel in ta:
        for key in ta[rel]:
            assert ta[rel][key] == tb[rel][key], f"{rel}: {key} differs"
    assert hardlink_groups(a) == hardlink_groups(b)
    assert hardlink_groups(a)


def run(*cmd, cwd=None):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                       timeout=120)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"


def test_cp_tar_rsync_in_and_out(mount_factory, tmp_path):
    src = tmp_path / "src"
    build_tree(src)
    m = mount_factory().start()
    # in: three tools, three copies
    run("cp", "-a", src, m.path / "cp")
    run("rsync", "-aHAX", f"{src}/", m.path / "rsync")
    (m.path / "tar").mkdir()
    archive = tmp_path / "tree.tar"
    run("tar", "--xattrs", "--xattrs-include=*", "-cSpf", archive, "-C", src, ".")
    run("tar", "--xattrs", "--xattrs-include=*", "-xpf", archive, "-C", m.path / "tar")
    for name in ("cp", "rsync", "tar"):
        assert_same_tree(src, m.path / name)
    # the sparse file went in sparse through every tool that keeps holes
    assert os.stat(m.path / "rsync" / "sparse").st_blocks * 512 <= BS
    # the copies survive a new daemon, and come back out unchanged
    m.stop()
    m.start()
    out = tmp_path / "out"
    out.mkdir()
    run("cp", "-a", m.path / "cp", out / "cp")
    run("rsync", "-aHAX", f"{m.path}/rsync/", out / "rsync")
    run("tar", "--xattrs", "--xattrs-include=*", "-cSpf", tmp_path / "back.tar", "-C",
        m.path / "tar", ".")
    (out / "tar").mkdir()
    run("tar", "--xattrs", "--xattrs-include=*", "-xpf", tmp_path / "back.tar", "-C", out / "tar")
    for name in ("cp", "rsync", "tar"):
        assert_same_tree(src, out / name)
    # rsync finds nothing to do between the source and the mount: metadata is exact
    r = subprocess.run(["rsync", "-aHAXni", f"{src}/", f"{m.path}/rsync/"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout
    m.stop()


def test_fsynced_data_survives_sigkill(mount_factory):
    # A long transaction-group interval: only the fsync can have made this durable.
    m = mount_factory(txg_interval=3600).start()
    # Metadata made durable by an fsync of a directory...
    (m.path / "dir").mkdir()
    os.symlink("durable", m.path / "dir" / "link")
    (m.path / "xa").write_bytes(b"")
    os.setxattr(m.path / "xa", "user.k", b"v")
    m.syncfs()
    # ...and files by their own fsync / fdatasync, nothing else after them.
    data = os.urandom(3 * BS + 11)
    fd = os.open(m.path / "durable", os.O_CREAT | os.O_WRONLY, 0o640)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    fd = os.open(m.path / "dir" / "small", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"tiny")
    os.fdatasync(fd)
    os.close(fd)
    m.kill()                      # SIGKILL: no flush, no commit, no unmount
    m.start()
    assert (m.path / "durable").read_bytes() == data
    assert stat.S_IMODE(os.stat(m.path / "durable").st_mode) == 0o640
    assert (m.path / "dir" / "small").read_bytes() == b"tiny"
    assert os.readlink(m.path / "dir" / "link") == "durable"
    assert os.getxattr(m.path / "xa", "user.k") == b"v"
    # and the mount after the crash works normally
    (m.path / "after").write_bytes(b"x" * BS)
    m.stop()
    m.start()
    assert (m.path / "after").read_bytes() == b"x" * BS
    m.stop()


def test_unsynced_writes_lost_cleanly_on_sigkill(mount_factory):
    """What was not synced may be lost, but the store opens and the synced state is whole."""
    m = mount_factory(txg_interval=3600).start()
    (m.path / "kept").write_bytes(b"k" * 1000)
    m.syncfs()
    with open(m.path / "kept", "r+b") as f:
        f.write(b"CHANGED")
    (m.path / "maybe").write_bytes(os.urandom(5 * BS + 3))
    m.kill()
    m.start()
    kept = (m.path / "kept").read_bytes()
    assert kept in (b"k" * 1000, b"CHANGED" + b"k" * 993)
    if (m.path / "maybe").exists():
        os.stat(m.path / "maybe")
    m.stop()


def test_backupfs_sync_makes_unfsynced_writes_durable(mount_factory):
    """`sync` stops at the kernel (FUSE gets no syncfs): `backupfs sync` commits."""
    m = mount_factory(txg_interval=3600).start()
    data = os.urandom(3 * BS + 5)
    (m.path / "synced").write_bytes(data)         # closed, never fsynced
    (m.path / "d").mkdir()
    os.sync()                                     # what an admin would try first
    backupfs("sync", m.path)
    (m.path / "late").write_bytes(b"after the sync")
    m.kill()                                      # no transaction group ran meanwhile
    m.start()
    assert (m.path / "synced").read_bytes() == data
    assert (m.path / "d").is_dir()
    assert not (m.path / "late").exists()         # only the sync committed anything
    m.stop()


def test_fsync_of_one_file_commits_closed_files_whole(mount_factory):
    """A commit is ordered: a file whose size it records has its data in it too, never
    a size with holes where unsealed bytes were."""
    m = mount_factory(txg_interval=3600).start()
    other = os.urandom(5 * BS + 3)
    (m.path / "other").write_bytes(other)        # closed, not fsynced
    fd = os.open(m.path / "synced", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"s")
    os.fsync(fd)
    os.close(fd)
    m.kill()
    m.start()
    assert (m.path / "synced").read_bytes() == b"s"
    assert (m.path / "other").read_bytes() == other
    m.stop()


def test_truncations_reach_the_store(mount_factory):
    """Every way of truncating is seen by the daemon, not only by the kernel's cache:
    after a remount the sizes and bytes are the ones the programs left."""
    m = mount_factory().start()
    old = os.urandom(3 * BS + 5)
    for name in ("otrunc", "shell", "ftrunc", "trunc", "grow"):
        (m.path / name).write_bytes(old)
    fd = os.open(m.path / "otrunc", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"new")
    os.close(fd)
    subprocess.run(f"echo x > {m.path / 'shell'}", shell=True, check=True)
    with open(m.path / "ftrunc", "r+b") as f:
        f.truncate(BS + 1)
    os.truncate(m.path / "trunc", 10)
    os.truncate(m.path / "grow", 5 * BS)
    m.stop()
    m.start()
    assert (m.path / "otrunc").read_bytes() == b"new"
    assert (m.path / "shell").read_bytes() == b"x\n"
    assert (m.path / "ftrunc").read_bytes() == old[:BS + 1]
    assert (m.path / "trunc").read_bytes() == old[:10]
    assert (m.path / "grow").read_bytes() == old + bytes(5 * BS - len(old))
    m.stop()


def test_small_writes_to_a_full_disk_fail_at_close_not_only_at_fsync(mount_factory, tmp_path):
    """Small files are buffered, not stored, at close; still a write the disk has no room
    for is refused when it reaches the daemon (the close reports it), as ext4 refuses it
    at write time, rather than vanish into a buffer that only an fsync would question."""
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], check=True)
    try:
        from mounting import Mount
        m = Mount(disk / "s", tmp_path / "mnt")
        m.start()
        try:
            st = os.statvfs(disk)
            reserve = min(256 << 20, int(st.f_blocks * st.f_frsize * 0.02))
            ballast = st.f_bavail * st.f_frsize - reserve - (64 << 10)
            (disk / "ballast").write_bytes(bytes(ballast))
            failed = None
            for i in range(200):
                try:
                    with open(m.path / f"f{i}", "wb") as f:
                        f.write(os.urandom(4096))
                except OSError as e:
                    failed = (i, e.errno)
                    break
            assert failed is not None and failed[1] == errno.ENOSPC, failed
            (disk / "ballast").unlink()
            (m.path / "after").write_bytes(b"room again")
            m.stop()
            m.start()
            assert (m.path / "after").read_bytes() == b"room again"
            m.stop()
        finally:
            m.cleanup()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
