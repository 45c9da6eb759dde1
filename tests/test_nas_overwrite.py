"""Overwriting a file with shorter content (`echo x > file`, an SMB client saving over a
document) leaves exactly the new content, after a remount too.

libfuse asks the kernel for atomic O_TRUNC, so the truncation comes as a flag of open(),
not as a setattr(size=0): the filesystem must do it there."""

import os
import stat
from types import SimpleNamespace

import pyfuse3
import pytest

from backupfs.fs import BackupFS
from backupfs.namespace import Namespace
from backupfs.store import Store

CTX = SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022)


@pytest.mark.mount
@pytest.mark.timeout(120)
def test_o_trunc_overwrite_survives_remount(mount_factory):
    m = mount_factory().start()
    f = m.path / "file"
    f.write_bytes(b"a much longer first version\n")
    m.syncfs()
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"short\n")
    os.close(fd)
    assert f.read_bytes() == b"short\n"
    m.stop()
    m.start()
    assert f.stat().st_size == 6
    assert f.read_bytes() == b"short\n"
    m.stop()


async def test_open_with_o_trunc_truncates(tmp_path):
    Store.init(tmp_path / "store", block_size=4096)
    store = Store.open(tmp_path / "store")
    try:
        fs = BackupFS(store, Namespace(store))
        info, entry = await fs.create(pyfuse3.ROOT_INODE, b"f", stat.S_IFREG | 0o644,
                                      os.O_RDWR, CTX)
        await fs.write(info.fh, 0, b"x" * 10000)
        await fs.release(info.fh)
        before = await fs.getattr(entry.st_ino)
        fh = (await fs.open(entry.st_ino, os.O_WRONLY | os.O_TRUNC, CTX)).fh
        after = await fs.getattr(entry.st_ino)
        assert after.st_size == 0 and after.st_mtime_ns >= before.st_mtime_ns
        await fs.write(fh, 0, b"short\n")
        await fs.release(fh)
        fh = (await fs.open(entry.st_ino, os.O_RDONLY, CTX)).fh
        assert await fs.read(fh, 0, 100) == b"short\n"
        assert (await fs.getattr(entry.st_ino)).st_size == 6
        await fs.release(fh)
    finally:
        store.close(commit=False)
