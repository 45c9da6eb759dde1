"""The CLI on bad input: one line `backupfs: ...` on stderr, a non-zero exit, no traceback.
And every command answers --help."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from mounting import backupfs, fails_with


@pytest.fixture
def store(tmp_path):
    s = tmp_path / "store"
    backupfs("init", s)
    return s


def test_init_non_empty_dir(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "precious").write_text("keep me")
    fails_with("init", d, match="not empty")
    assert [p.name for p in d.iterdir()] == ["precious"]


def test_init_existing_store(store):
    fails_with("init", store, match="already a backupfs store")


@pytest.mark.parametrize("args, match", [
    (("--block-size", "3K"), "power of two"),
    (("--block-size", "lots"), "not a size"),
    (("--compression", "lz4"), "unknown compression"),
    (("--compression", "zstd:99"), "level"),
])
def test_init_bad_parameters(tmp_path, args, match):
    fails_with("init", tmp_path / "s", *args, match=match)
    assert not (tmp_path / "s").exists()


def test_init_says_and_keeps_whether_compression_adapts(tmp_path):
    out = backupfs("init", tmp_path / "a").stdout
    assert "compression zstd:3, adaptive" in out
    assert "adaptive_compression = true" in (tmp_path / "a" / "config.toml").read_text()
    out = backupfs("init", tmp_path / "f", "--compression", "zstd:5", "--fixed-compression").stdout
    assert "compression zstd:5)" in out
    assert "adaptive_compression = false" in (tmp_path / "f" / "config.toml").read_text()


def test_mount_non_store(tmp_path):
    (tmp_path / "notastore").mkdir()
    (tmp_path / "mnt").mkdir()
    fails_with("mount", tmp_path / "notastore", tmp_path / "mnt", match="not a backupfs store")
    fails_with("mount", tmp_path / "nothing", tmp_path / "mnt", match="not a backupfs store")


def test_mount_missing_mountpoint(store, tmp_path):
    fails_with("mount", store, tmp_path / "missing", match="mountpoint does not exist")


@pytest.mark.parametrize("foreground", [False, True])
def test_mount_unknown_format_version(store, tmp_path, foreground):
    cfg = store / "config.toml"
    cfg.write_text(cfg.read_text().replace("format_version = 2", "format_version = 9"))
    (tmp_path / "mnt").mkdir()
    args = ("mount", "-f") if foreground else ("mount",)
    fails_with(*args, store, tmp_path / "mnt", match="format version 9 is not supported")


def test_snapshot_of_a_plain_directory():
    fails_with("snapshot", "/tmp", match="/tmp: not a backupfs mount or store")


def test_snapshot_of_a_missing_path(tmp_path):
    fails_with("snapshot", tmp_path / "gone", match="no such file or directory")


@pytest.mark.parametrize("cmd", [("list",), ("snapshot",), ("delete", "x"), ("hold", "x"),
                                 ("prune", "--keep-last", "1"), ("sync",)])
def test_commands_on_a_store_with_no_daemon(store, cmd):
    fails_with(cmd[0], store, *cmd[1:], match="no backupfs daemon is running")


OPEN_AND_WAIT = ("import sys; from backupfs.store import Store; s = Store.open(sys.argv[1]); "
                 "print('open', flush=True); sys.stdin.read()")


@pytest.mark.timeout(120)
def test_mount_of_a_store_another_process_holds(store, tmp_path):
    (tmp_path / "mnt").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", OPEN_AND_WAIT, str(store)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        fails_with("mount", "-f", store, tmp_path / "mnt", match="in use by another process")
        fails_with("mount", store, tmp_path / "mnt", match="mount failed: .* in use")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_umount_of_a_plain_directory(tmp_path):
    fails_with("umount", tmp_path, match="not a backupfs mount")


@pytest.mark.mount
@pytest.mark.timeout(120)
def test_errors_from_a_running_daemon(mount_factory, tmp_path):
    m = mount_factory().start()
    fails_with("delete", m.path, "2000-01-01T000000Z", match="no snapshot named")
    fails_with("hold", m.path, "nope", match="no snapshot named")
    (tmp_path / "mnt2").mkdir()
    fails_with("mount", m.store, tmp_path / "mnt2", match=f"already mounted at {m.path}")
    fails_with("mount", m.store, m.path, match="already a backupfs mount")
    other = tmp_path / "other-store"
    backupfs("init", other)
    fails_with("mount", other, m.path, match="already a backupfs mount")
    assert not (other / "control.sock").exists()
    name = backupfs("snapshot", m.path, "--hold").stdout.strip()
    fails_with("delete", m.store, name, match="held")
    m.stop()


def subcommands() -> list[str]:
    out = backupfs("--help").stdout
    section = out.split("Commands:", 1)[1]
    return [ln.split()[0] for ln in section.splitlines() if re.match(r"  \S", ln)]


def test_every_command_has_help():
    cmds = subcommands()
    assert {"init", "mount", "umount", "snapshot", "list", "delete", "prune"} <= set(cmds)
    for cmd in cmds:
        r = backupfs(cmd, "--help", timeout=60)
        assert r.stdout.startswith("Usage: backupfs " + cmd), r.stdout
        assert r.stderr == ""


def test_usage_errors_name_the_command():
    r = backupfs("delete", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "Usage: backupfs delete" in r.stderr and "Missing argument" in r.stderr
    r = backupfs("no-such-command", check=False)
    assert r.returncode == 2 and "No such command" in r.stderr


@pytest.mark.mount
@pytest.mark.timeout(120)
def test_umount_without_the_control_socket_still_stores_everything(mount_factory):
    """umount asks the daemon to store what it holds before unmounting; when it cannot
    ask (the socket is gone, or denied to the caller), unmounting still writes it all."""
    m = mount_factory().start()
    data = os.urandom(300_000)
    (m.path / "unsynced").write_bytes(data)
    (m.store / "control.sock").unlink()
    m.stop()
    m.start()
    assert (m.path / "unsynced").read_bytes() == data
    m.stop()
