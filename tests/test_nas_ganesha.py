"""A real NFS server over a backupfs mount: NFS-Ganesha (userspace, FSAL_VFS) exports the
mount, and libnfs's command-line client talks NFSv3 (and NFSv4 for reads) to it.

This machine's kernel has neither the NFS server nor the client, so the kernel's own
nfsd is tested only through what it relies on (test_nas_nfs.py). Ganesha's VFS backend
relies on the same thing, file handles (`name_to_handle_at`, `open_by_handle_at`) of
the mount, and then serves every NFS operation through them: so this is the NFS path
of a NAS end to end, writes, reads, listings and the read-only snapshots included.
(libnfs 5.0's NFSv4 writes fail against any Ganesha export, a plain directory's too:
it never sends the WRITE. So writes go over NFSv3, which needs rpcbind.)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mounting import assert_fsck_clean, backupfs

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180),
              pytest.mark.skipif(shutil.which("ganesha.nfsd") is None
                                 or shutil.which("nfs-cp") is None
                                 or shutil.which("rpcbind") is None,
                                 reason="needs nfs-ganesha-vfs, libnfs-utils and rpcbind "
                                        "(tools/setup.sh installs them)")]

CONFIG = """
NFS_CORE_PARAM {{ Protocols = 3, 4; Bind_addr = 127.0.0.1;
                 Enable_NLM = false; Enable_RQUOTA = false; }}
NFSV4 {{ Graceless = true; RecoveryBackend = fs; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{
    Export_Id = 1; Path = {path}; Pseudo = /backup; Access_Type = RW;
    Squash = No_Root_Squash; SecType = sys; Protocols = 3, 4;
    FSAL {{ Name = VFS; }}
}}
"""


def rpcbind_answers() -> bool:
    return subprocess.run(["rpcinfo", "-p", "127.0.0.1"], capture_output=True,
                          timeout=30).returncode == 0


class Ganesha:
    """ganesha.nfsd in the foreground, exporting `export` (and rpcbind, if none runs)."""

    def __init__(self, export: Path, workdir: Path):
        self.export = export
        self.rpcbind = None
        if not rpcbind_answers():
            self.rpcbind = subprocess.Popen(["rpcbind", "-f", "-w"])
            wait_for(rpcbind_answers, "rpcbind")
        config = workdir / "ganesha.conf"
        config.write_text(CONFIG.format(path=export))
        self.log = workdir / "ganesha.log"
        self.proc = subprocess.Popen(
            ["ganesha.nfsd", "-F", "-f", str(config), "-L", str(self.log),
             "-p", str(workdir / "ganesha.pid"), "-N", "NIV_EVENT"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.proc.poll() is None
                 and self.run("nfs-ls", self.url(""), check=False).returncode == 0,
                 "ganesha", self.log)

    def url(self, path: str, version: int = 3) -> str:
        if version == 4:
            return f"nfs://127.0.0.1/backup/{path}?version=4"
        return f"nfs://127.0.0.1{self.export}/{path}?version=3"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(args, capture_output=True, timeout=60)
        if check:
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    def stop(self) -> None:
        for proc in (self.proc, self.rpcbind):
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(ready, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + 30
    while not ready():
        assert time.monotonic() < deadline, f"{what} did not start: " + (
            log.read_text() if log and log.exists() else "")
        time.sleep(0.2)


@pytest.fixture
def nfs(mount_factory, tmp_path):
    m = mount_factory().start()
    server = Ganesha(m.path, tmp_path)
    try:
        yield m, server
    finally:
        server.stop()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_files_written_and_read_over_nfs(nfs, tmp_path):
    m, server = nfs
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3_000_000) + b"text " * 2_000_000)   # 13 MB, half compressible
    server.run("nfs-cp", str(big), server.url("big"))
    assert digest(m.path / "big") == digest(big)           # as the mount has it
    back = tmp_path / "back"
    server.run("nfs-cp", server.url("big"), str(back))
    assert digest(back) == digest(big)
    (m.path / "docs").mkdir()
    for i in range(300):
        (m.path / "docs" / f"f{i:03d}").write_bytes(b"%d\n" % i)
    listing = server.run("nfs-ls", server.url("docs")).stdout.decode().split("\n")
    assert sorted(line.split()[-1] for line in listing if line.strip()) == \
        [f"f{i:03d}" for i in range(300)]
    for version in (3, 4):
        assert server.run("nfs-cat", server.url("docs/f123", version)).stdout == b"123\n"


def test_snapshots_over_nfs_are_read_only_and_keep_old_bytes(nfs, tmp_path):
    m, server = nfs
    new = tmp_path / "new"
    new.write_bytes(b"version 1\n")
    server.run("nfs-cp", str(new), server.url("report.txt"))
    name = backupfs("snapshot", m.path).stdout.strip()
    # (libnfs's nfs-cp only creates files, so the change is made through the mount.)
    (m.path / "report.txt").write_bytes(b"version 2\n")
    for version in (3, 4):
        assert server.run("nfs-cat", server.url("report.txt", version)).stdout == \
            b"version 2\n"
        assert server.run("nfs-cat", server.url(f"snapshots/{name}/report.txt", version)
                          ).stdout == b"version 1\n"
    r = server.run("nfs-cp", str(new), server.url(f"snapshots/{name}/other.txt"),
                   check=False)
    assert r.returncode != 0 and b"ROFS" in r.stdout + r.stderr, r
    assert sorted(os.listdir(m.path / "snapshots" / name)) == ["report.txt"]
    server.stop()
    m.stop()
    assert_fsck_clean(m.store)
