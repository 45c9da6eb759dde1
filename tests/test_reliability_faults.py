"""Faults: a full disk, corrupted packs and index, and hostile input."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
from pathlib import Path

import pytest

from mounting import Mount, backupfs, fails_with, flip_byte

pytestmark = [pytest.mark.mount, pytest.mark.reliability, pytest.mark.timeout(240)]


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs: a disk that fills up quickly."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_disk_mount(small_disk, tmp_path):
    """A mount of a store on the small disk, always unmounted at teardown:
    small_disk_mount(**Mount options)."""
    made: list[Mount] = []

    def make(**kw) -> Mount:
        m = Mount(small_disk / "s", tmp_path / "mnt", log_path=tmp_path / "daemon.log", **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()


def write_file(path: Path, data: bytes, chunk: int = 1 << 20) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(0, len(data), chunk):
            os.write(fd, data[i:i + chunk])
        os.fsync(fd)
    finally:
        os.close(fd)


def fsck_clean(store: Path) -> dict:
    r = backupfs("fsck", store, "--json", check=False)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["problems"] == [], report
    return report


def test_full_disk_is_enospc_and_harms_nothing(small_disk, small_disk_mount):
    m = small_disk_mount().start()
    keep = os.urandom(2_000_000)
    write_file(m.path / "keep", keep)
    statfs_before = os.statvfs(m.path)
    (small_disk / "ballast").write_bytes(bytes(30 << 20))
    with pytest.raises(OSError) as e:
        write_file(m.path / "big", os.urandom(80 << 20))
    assert e.value.errno == errno.ENOSPC
    assert os.statvfs(m.path).f_bavail < statfs_before.f_bavail
    # Nothing already stored is harmed, and metadata changes still work.
    assert (m.path / "keep").read_bytes() == keep
    (m.path / "dir").mkdir()
    os.rename(m.path / "dir", m.path / "dir2")
    # Space freed (the ballast, and the failed file): writes resume.
    (m.path / "big").unlink()
    (small_disk / "ballast").unlink()
    after = os.urandom(5_000_000)
    write_file(m.path / "after", after)
    m.stop()
    fsck_clean(m.store)
    m.start()
    assert (m.path / "keep").read_bytes() == keep
    assert (m.path / "after").read_bytes() == after
    assert (m.path / "dir2").is_dir()
    m.stop()


def fill_disk(disk: Path, leave: int = 256 << 10) -> Path:
    """Something other than the store fills its disk, to less than the store's reserve."""
    st = os.statvfs(disk)
    ballast = disk / "ballast"
    ballast.write_bytes(bytes(st.f_bavail * st.f_frsize - leave))
    return ballast


def write_back(path: Path) -> None:
    """syncfs: the kernel hands what it caches for the mount to the daemon."""
    subprocess.run(["sync", "-f", str(path)], check=True)


def test_a_failed_writeback_is_reported_and_held_data_stops_umount(small_disk,
                                                                   small_disk_mount):
    """A full disk is told, never papered over. Bytes the kernel could not hand over are
    named by the next snapshot; bytes the daemon holds and cannot store keep the mount
    (and them) until there is space, or go only when umount is told to lose them.
    Under the writeback cache, which holds a writer's bytes in the kernel; without it a
    full disk fails the write() itself (test_a_full_disk_fails_the_write_itself)."""
    m = small_disk_mount(txg_interval=3600, flags=("--writeback-cache",)).start()
    keep = os.urandom(2_000_000)
    write_file(m.path / "keep", keep)
    ballast = fill_disk(small_disk)

    # Written into the kernel's cache; the daemon refuses it when the kernel writes it back.
    big = os.open(m.path / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    for _ in range(8):
        os.write(big, os.urandom(1 << 20))
    r = backupfs("snapshot", m.path)
    assert r.stderr.startswith("backupfs: warning: some bytes written before this snapshot "
                               "could not be stored (No space left on device)"), r.stderr
    first = r.stdout.strip()
    assert [s["name"] for s in json.loads(backupfs("list", m.path, "--json").stdout)] == [first]
    # Reported once (the log has it); the next snapshot has nothing to warn of.
    r = backupfs("snapshot", m.path)
    assert r.stderr == "", r.stderr
    assert "the kernel could not write back some bytes" in m.log()
    with pytest.raises(OSError) as e:
        os.fsync(big)  # and its writer is told
    assert e.value.errno == errno.ENOSPC
    os.close(big)
    (m.path / "big").unlink()

    # A partial block the daemon holds (nobody fsyncs it), then the disk fills up.
    ballast.unlink()
    tail = os.open(m.path / "tail", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(tail, os.urandom(100_000))
    write_back(m.path)
    ballast = fill_disk(small_disk)
    fails_with("snapshot", m.path, match="No space left on device")
    with pytest.raises(OSError) as e:
        os.fsync(tail)
    assert e.value.errno == errno.ENOSPC
    os.close(tail)
    fails_with("umount", m.path,
               match="^" + re.escape(f"backupfs: {m.path}: not unmounted: No space left on device"))
    assert (m.path / "keep").read_bytes() == keep  # still mounted, still serving
    assert (m.path / "tail").stat().st_size == 100_000

    # A commit that cannot store the bytes records the size they would have made, not
    # zeros: after a crash the file ends where its stored bytes do (here: empty).
    fails_with("sync", m.path, match="No space left on device")
    m.kill()
    m.start()
    assert (m.path / "tail").stat().st_size == 0
    assert (m.path / "keep").read_bytes() == keep

    # Likewise when umount is told to give them up.
    ballast.unlink()
    with open(m.path / "keep", "ab") as f:
        f.write(b"appended, never stored")
    write_back(m.path)
    ballast = fill_disk(small_disk)
    m.stop("--force", daemon_exit=1)
    assert "unmounting: buffered data of 1 files could not be stored" in m.log()
    ballast.unlink()
    fsck_clean(m.store)
    m.start()
    assert (m.path / "keep").read_bytes() == keep
    assert len(json.loads(backupfs("list", m.path, "--json").stdout)) == 2
    m.stop()


def test_a_full_disk_fails_the_write_itself(small_disk, small_disk_mount):
    """Without the writeback cache (the default) every write() reaches the daemon before
    it returns, so a full disk is ENOSPC from that write(), through write-only opens (past
    the page cache) and read-write ones (through it) alike, and nothing is left held
    that a snapshot would have to leave out."""
    m = small_disk_mount(txg_interval=3600).start()
    keep = os.urandom(2_000_000)
    write_file(m.path / "keep", keep)
    ballast = fill_disk(small_disk)
    for name, flags in (("wronly", os.O_WRONLY), ("rdwr", os.O_RDWR)):
        fd = os.open(m.path / name, flags | os.O_CREAT, 0o644)
        try:
            with pytest.raises(OSError) as e:
                for _ in range(64):
                    os.write(fd, os.urandom(1 << 20))
            assert e.value.errno == errno.ENOSPC, name
        finally:
            os.close(fd)
    r = backupfs("snapshot", m.path)
    assert r.stderr == "", r.stderr
    assert (m.path / "keep").read_bytes() == keep
    ballast.unlink()
    m.stop()
    fsck_clean(m.store)


def test_sigterm_on_a_full_disk_ends_files_at_their_stored_bytes(small_disk,
                                                                 small_disk_mount):
    """What systemd's stop does once `backupfs umount` has refused: SIGTERM unmounts,
    the daemon commits what it can, says what it lost, and exits 1."""
    m = small_disk_mount(txg_interval=3600).start()
    write_file(m.path / "keep", b"stored")
    with open(m.path / "keep", "ab") as f:
        f.write(b" and appended")
    write_back(m.path)
    ballast = fill_disk(small_disk)
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(timeout=60) == 1
    m.kill()  # already gone: closes its log, detaches nothing
    assert "unmounting: buffered data of 1 files could not be stored" in m.log()
    m.check_log()
    ballast.unlink()
    fsck_clean(m.store)
    m.start()
    assert (m.path / "keep").read_bytes() == b"stored"
    m.stop()


def test_flipped_bytes_in_packs_give_eio_never_wrong_bytes(mount_factory):
    m = mount_factory("flip", init_args=("--block-size", "4K")).start()
    files = {f"f{i}": os.urandom(random.randrange(1, 200_000)) for i in range(30)}
    for name, data in files.items():
        write_file(m.path / name, data)
    m.stop()
    rng = random.Random(7)
    packs = sorted((m.store / "packs").rglob("*.pack"))
    for _ in range(40):
        pack = rng.choice(packs)
        size = pack.stat().st_size
        with open(pack, "r+b") as f:
            pos = rng.randrange(16, size)  # past the pack header
            f.seek(pos)
            b = f.read(1)
            f.seek(pos)
            f.write(bytes([b[0] ^ (1 << rng.randrange(8))]))
    m.start()
    eio = good = 0
    for name, data in files.items():
        try:
            got = (m.path / name).read_bytes()
        except OSError as e:
            assert e.errno == errno.EIO
            eio += 1
            continue
        assert got == data, f"{name}: wrong bytes returned"
        good += 1
    assert eio > 0 and good > 0
    m.stop()
    m.check_log()
    # verify names exactly the files that gave EIO.
    r = backupfs("verify", m.store, "--json", check=False)
    assert r.returncode == 1
    named = {u.split(": /")[1] for b in json.loads(r.stdout)["bad"] for u in b["used_by"]}
    assert len(named) == eio


def test_a_corrupt_block_is_logged_with_the_file_and_block_it_belongs_to(mount_factory):
    """EIO, and a log line that names the file by its path in the mount (in the live
    tree and in a snapshot, where it has another name) and the block's number in it;
    also for a write or a truncate that must read the block first."""
    m = mount_factory("named", init_args=("--block-size", "4K")).start()
    (m.path / "photos" / "2026").mkdir(parents=True)
    data = os.urandom(10 * 4096)  # random: stored raw, so the pack holds it verbatim
    write_file(m.path / "photos" / "2026" / "a.jpg", data)
    name = backupfs("snapshot", m.path).stdout.strip()
    os.rename(m.path / "photos" / "2026" / "a.jpg", m.path / "photos" / "2026" / "b.jpg")
    m.stop()
    [pack] = [p for p in (m.store / "packs").rglob("*.pack")
              if data[7 * 4096:8 * 4096] in p.read_bytes()]
    flip_byte(pack, pack.read_bytes().index(data[7 * 4096:8 * 4096]) + 100)
    m.start()
    for path in (m.path / "photos" / "2026" / "b.jpg",
                 m.path / "snapshots" / name / "photos" / "2026" / "a.jpg"):
        with pytest.raises(OSError) as ei:
            path.read_bytes()
        assert ei.value.errno == errno.EIO
    with open(m.path / "photos" / "2026" / "b.jpg", "r+b", buffering=0) as f:
        f.seek(7 * 4096 + 5)  # part of the block: the daemon reads the rest first
        with pytest.raises(OSError) as ei:
            f.write(b"x" * 10)
        assert ei.value.errno == errno.EIO
        f.seek(2 * 4096)  # a sound block is written as ever
        f.write(b"y" * 4096)
    with pytest.raises(OSError) as ei:  # a cut inside it reads the part that stays
        os.truncate(m.path / "photos" / "2026" / "b.jpg", 7 * 4096 + 10)
    assert ei.value.errno == errno.EIO
    assert (m.path / "photos" / "2026" / "b.jpg").stat().st_size == len(data)
    m.stop()
    log = m.log()
    failed = [line for line in log.splitlines() if "backupfs.fs:" in line]
    assert failed and all(" block 7 failed: corrupt block" in line for line in failed)
    assert "read: reading /photos/2026/b.jpg block 7 failed: corrupt block" in log
    assert f"read: reading /snapshots/{name}/photos/2026/a.jpg block 7 failed: corrupt" in log
    assert "write: reading /photos/2026/b.jpg block 7 failed: corrupt block" in log
    assert "setattr: reading /photos/2026/b.jpg block 7 failed: corrupt block" in log
    m.check_log()


def test_a_damaged_index_is_a_clear_refusal(mount_factory, tmp_path):
    m = mount_factory("lmdb").start()
    (m.path / "f").write_bytes(b"x" * 1000)
    m.stop()
    data = m.store / "index.lmdb" / "data.mdb"
    with open(data, "r+b") as f:  # both meta pages: LMDB cannot find a valid root
        for page in (0, 4096):
            f.seek(page + 16)
            f.write(os.urandom(64))
    r = backupfs("mount", m.store, tmp_path / "mnt2", check=False)
    (tmp_path / "mnt2").mkdir(exist_ok=True)
    r = backupfs("mount", m.store, tmp_path / "mnt2", check=False)
    assert r.returncode != 0
    assert r.stderr.startswith("backupfs: ") and "Traceback" not in r.stderr + r.stdout
    assert len(r.stderr.strip().splitlines()) == 1
    r = backupfs("fsck", m.store, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_hostile_names_deep_trees_and_huge_sparse_files(mounted):
    root = mounted.path
    d = root / "names"
    d.mkdir()
    names = [bytes([b]) + b"x" for b in range(1, 256) if b != ord("/")]
    names += [b"\xff" * 255, b"a" * 255, "ünïcødé".encode(), b"sp ace", b"-dash", b"\n"]
    for n in names:
        with open(os.path.join(bytes(d), n), "wb") as f:
            f.write(n)
    assert sorted(os.listdir(bytes(d))) == sorted(names)
    for n in names:
        with open(os.path.join(bytes(d), n), "rb") as f:
            assert f.read() == n
    with pytest.raises(OSError) as e:
        open(os.path.join(bytes(d), b"b" * 256), "wb")
    assert e.value.errno == errno.ENAMETOOLONG
    # 1,000 levels deep (paths past PATH_MAX are walked relative to a directory fd).
    fd = os.open(root, os.O_RDONLY)
    for _ in range(1000):
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"deep")
    os.close(fd)
    # 0 B and 20 GiB sparse.
    (root / "empty").write_bytes(b"")
    with open(root / "sparse", "wb") as f:
        f.truncate(20 << 30)
        f.seek((20 << 30) - 4)
        f.write(b"tail")
    st = os.stat(root / "sparse")
    assert st.st_size == 20 << 30 and st.st_blocks * 512 < 1 << 20
    with open(root / "sparse", "rb") as f:
        f.seek(10 << 30)
        assert f.read(4096) == bytes(4096)
        f.seek((20 << 30) - 4)
        assert f.read() == b"tail"
    name = backupfs("snapshot", root).stdout.strip()
    snap = root / "snapshots" / name
    assert sorted(os.listdir(bytes(snap / "names"))) == sorted(names)
    assert os.stat(snap / "sparse").st_size == 20 << 30
    # Remove the deep tree again (rm -rf recurses 1,000 levels).
    subprocess.run(["rm", "-rf", str(root / "d")], check=True)
    assert not (root / "d").exists()
    mounted.stop()
    fsck_clean(mounted.store)
