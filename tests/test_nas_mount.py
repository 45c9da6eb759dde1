"""Mounting as a NAS does: `mount -t fuse.backupfs`, an fstab line, a systemd unit."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mounting import BACKUPFS, backupfs, force_unmount, is_mounted, mount_table_entry
from nas_env import nas_dir

pytestmark = [pytest.mark.mount, pytest.mark.timeout(150)]

REPO = Path(__file__).resolve().parent.parent
HELPER = Path("/sbin/mount.fuse.backupfs")
UNIT = REPO / "contrib" / "systemd" / "backupfs@.service"
# What mount(8) and systemd add or keep in fstab, which must never reach FUSE.
FSTAB_NOISE = "defaults,rw,suid,dev,exec,auto,user,users,owner,async,_netdev,nofail," \
              "x-systemd.requires=local-fs.target,x-systemd.mount-timeout=2min,comment=x"


@pytest.fixture
def root():
    with nas_dir() as d:
        yield d


def mount_options(mnt: Path) -> tuple[str, str]:
    """(per-mount options, filesystem options) of the mount at mnt."""
    entry = mount_table_entry(mnt)
    return entry["options"], entry["fs_options"]


def clean_umount(store: Path, mnt: Path) -> None:
    backupfs("umount", mnt)
    assert not is_mounted(mnt)
    # The daemon closed the store cleanly (it removes the mark of an open writer).
    assert not (store / "writer.pid").exists()


def require_helper() -> None:
    if not HELPER.exists():
        pytest.fail(f"{HELPER} is missing: run tools/setup.sh (it links it into .venv/bin)")


def test_fstab_line_mounts_with_mount_a(root, detached):
    require_helper()
    store, mnt = root / "store", root / "mnt"
    detached.add(store, mnt)
    fstab = root / "fstab"
    fstab.write_text(f"# test fstab\n{store} {mnt} fuse.backupfs "
                     f"{FSTAB_NOISE},allow_other,noatime,txg_interval=1,writeback_cache 0 0\n")
    r = subprocess.run(["mount", "-a", "-T", str(fstab)], capture_output=True, text=True,
                       timeout=90)
    assert r.returncode == 0, r.stderr
    assert is_mounted(mnt)
    per_mount, fs_opts = mount_options(mnt)
    assert "allow_other" in fs_opts.split(",") and "noatime" in per_mount.split(","), fs_opts
    # The helper's own options became the daemon's flags.
    daemon = int((store / "writer.pid").read_text())
    argv = Path(f"/proc/{daemon}/cmdline").read_bytes().split(b"\0")
    assert b"--writeback-cache" in argv and float(argv[argv.index(b"--txg-interval") + 1]) == 1
    (mnt / "hello").write_text("from fstab\n")
    assert backupfs("list", mnt).stdout.strip() == "no snapshots"
    # `mount -a` again: the line is mounted already; nothing happens, and no error.
    r = subprocess.run(["mount", "-a", "-T", str(fstab)], capture_output=True, text=True,
                       timeout=90)
    assert r.returncode == 0, r.stderr
    with open("/proc/self/mountinfo") as f:
        assert sum(line.split()[4] == str(mnt) for line in f) == 1
    clean_umount(store, mnt)
    # The data went through the daemon into the store: it is there on the next mount.
    r = subprocess.run(["mount", "-a", "-T", str(fstab)], capture_output=True, text=True,
                       timeout=90)
    assert r.returncode == 0, r.stderr
    assert (mnt / "hello").read_text() == "from fstab\n"
    clean_umount(store, mnt)


def test_mount_t_fuse_backupfs_and_plain_umount(root, detached):
    require_helper()
    store, mnt = root / "store", root / "mnt"
    detached.add(store, mnt)
    r = subprocess.run(["mount", "-t", "fuse.backupfs", str(store), str(mnt),
                        "-o", "allow_other,_netdev,nofail,control_group=root"],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "allow_other" in mount_options(mnt)[1].split(",")
    # control_group= became --control-group: the socket is open to that group.
    assert (store / "control.sock").stat().st_mode & 0o777 == 0o660
    (mnt / "f").write_bytes(b"x" * 300_000)
    # umount(8), as systemd and shutdown scripts use it, also lets the daemon finish.
    r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 60
    while (store / "writer.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (store / "writer.pid").exists(), "the daemon did not close the store"
    # A type that is not ours is refused by the helper, and nothing is mounted.
    r = subprocess.run([str(HELPER), str(store), str(mnt), "-t", "fuse.other"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and not is_mounted(mnt)
    # An option backupfs does not know fails the mount with one line naming it.
    r = subprocess.run(["mount", "-t", "fuse.backupfs", str(store), str(mnt), "-o", "bogus"],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode != 0 and "bogus" in r.stderr and not is_mounted(mnt), r.stderr
    r = subprocess.run(["mount", "-t", "fuse.backupfs", str(store), str(mnt)],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    assert (mnt / "f").read_bytes() == b"x" * 300_000
    clean_umount(store, mnt)


# -- systemd ------------------------------------------------------------------------------

def test_unit_verifies():
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    with nas_dir() as d:
        shutil.copy(UNIT, d / UNIT.name)
        (d / "backupfs@mnt-backupfs.service").symlink_to(UNIT.name)
        r = subprocess.run(["systemd-analyze", "verify", str(d / "backupfs@mnt-backupfs.service")],
                           capture_output=True, text=True, timeout=60)
    # verify exits 0 on many problems it only warns about: any output is a defect.
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr


def unit_service_section() -> dict[str, list[str]]:
    section, out = None, {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def expand(command: str, env: dict[str, str], specifiers: dict[str, str]) -> list[str]:
    """A unit's command line as systemd runs it: specifiers, then `$VAR` as whitespace-
    split words and `${VAR}` inside a word."""
    for k, v in specifiers.items():
        command = command.replace(k, v)
    words = []
    for w in shlex.split(command):
        if re.fullmatch(r"\$[A-Za-z_]\w*", w):
            words += env.get(w[1:], "").split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), w))
    return words


def test_unit_commands_mount_and_stop_cleanly(root, detached):
    """Runs the unit's ExecStartPre/ExecStart/ExecStartPost/ExecStop as systemd would
    (no systemd runs here): started means mounted, stop means unmounted and closed."""
    svc = unit_service_section()
    assert svc["Type"] == ["simple"] and svc["KillSignal"] == ["SIGTERM"]
    store, mnt = root / "store", root / "data" / "mnt"
    backupfs("init", store)
    detached.mounts.append((store, mnt))
    instance = subprocess.run(["systemd-escape", "--path", str(mnt)], capture_output=True,
                              text=True, check=True).stdout.strip()
    specifiers = {"%f": str(mnt), "%i": instance, "%I": instance}
    env = {}
    for assignment in svc.get("Environment", []):
        k, _, v = shlex.split(assignment)[0].partition("=")
        env[k] = v
    assert svc["EnvironmentFile"] == ["/etc/backupfs/%i.conf"]
    # What the admin writes in /etc/backupfs/<instance>.conf:
    env.update(STORE=str(store), OPTIONS="-o allow_other --txg-interval 1")
    run = lambda key: [expand(c, env, specifiers) for c in svc.get(key, [])]  # noqa: E731
    for cmd in run("ExecStartPre"):
        subprocess.run(cmd, check=True, timeout=30)
    [start] = run("ExecStart")
    assert start[0] == "/usr/local/bin/backupfs" and "-f" in start
    if not Path(start[0]).exists():
        pytest.fail(f"{start[0]} is missing: run tools/setup.sh")
    log = open(root / "journal", "wb")
    main = subprocess.Popen(start, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        for cmd in run("ExecStartPost"):
            subprocess.run(cmd, check=True, timeout=150)
        assert is_mounted(mnt) and main.poll() is None
        assert "allow_other" in mount_options(mnt)[1].split(",")
        (mnt / "written").write_bytes(b"y" * 200_000)
        for cmd in run("ExecStop"):
            subprocess.run(cmd, check=True, timeout=300)
        assert main.wait(timeout=60) == 0
        assert not is_mounted(mnt) and not (store / "writer.pid").exists()
        # Logged to stdout/stderr, which systemd sends to the journal.
        text = (root / "journal").read_text()
        assert "mounted" in text and "Traceback" not in text, text
    finally:
        if main.poll() is None:
            force_unmount(mnt)
            main.send_signal(signal.SIGTERM)
            main.wait(timeout=60)
        log.close()


def test_sigterm_after_unmount_does_not_kill_the_final_flush(root):
    """systemd stops a fstab mount with umount and then SIGTERMs what is left of the
    unit: the daemon, still writing back the last data. That must not lose it."""
    store, mnt = root / "store", root / "mnt"
    backupfs("init", store)
    mnt.mkdir()
    log = open(root / "daemon.log", "wb")
    cmd = [*BACKUPFS, "mount", "-f", "--txg-interval", "3600", str(store), str(mnt)]
    daemon = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            assert daemon.poll() is None and time.monotonic() < deadline, "no mount"
            time.sleep(0.05)
        data = os.urandom(1 << 20) * 64
        (mnt / "big").write_bytes(data)  # closed, not fsynced: in buffers and page cache
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=60)
        # SIGTERM again and again until it exits: none may cut the final commit short.
        # (One arriving after the store is closed, in Python's own shutdown, may still end
        # the process with -15: harmless, nothing is left to write.)
        deadline = time.monotonic() + 120
        while daemon.poll() is None and time.monotonic() < deadline:
            daemon.send_signal(signal.SIGTERM)
            time.sleep(0.01)
        text = (root / "daemon.log").read_text()
        assert daemon.poll() in (0, -signal.SIGTERM), text
        assert "closed" in text and "Traceback" not in text, text
        # Closed cleanly (an unclean close leaves this mark of the open writer).
        assert not (store / "writer.pid").exists(), text
    finally:
        if daemon.poll() is None:
            force_unmount(mnt)
            daemon.kill()
            daemon.wait()
        log.close()
    daemon = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            assert daemon.poll() is None and time.monotonic() < deadline, "no mount"
            time.sleep(0.05)
        assert (mnt / "big").read_bytes() == data
        backupfs("umount", mnt)
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            force_unmount(mnt)
            daemon.kill()
            daemon.wait()


def test_helper_keeps_fuse_options_and_drops_mount_ones(capsys):
    from backupfs.cli.mount_helper import main as helper

    # -f (fake): say what would run, mount nothing. Options may come before the paths.
    assert helper(["-f", "-o", f"{FSTAB_NOISE},allow_other,ro,noatime,txg_interval=2,"
                   "log_file=/var/log/b.log,control_group=backup",
                   "backupfs#/srv/store", "/mnt/b", "-t", "fuse.backupfs", "-n"]) == 0
    cmd = capsys.readouterr().err.split()
    assert cmd[cmd.index("mount"):] == [
        "mount", "--txg-interval", "2", "--log-file", "/var/log/b.log",
        "--control-group", "backup", "-o", "rw,suid,dev,exec,allow_other,ro,noatime",
        "/srv/store", "/mnt/b"]
    assert helper(["/srv/store"]) == 1
    assert helper(["/srv/store", "/mnt/b", "-t", "fuse.sshfs", "-f"]) == 1


def test_the_detached_daemons_log_follows_logrotate(root, detached):
    """logrotate's default moves the log away and expects the daemon to write a new
    one (nothing signals it here, and no `copytruncate`)."""
    store, mnt = root / "store", root / "mnt"
    detached.add(store, mnt)
    backupfs("mount", store, mnt)
    log, rotated = store / "backupfs.log", store / "backupfs.log.1"
    first = backupfs("snapshot", mnt).stdout.strip()
    log.rename(rotated)
    second = backupfs("snapshot", mnt).stdout.strip()
    clean_umount(store, mnt)
    before, after = rotated.read_text(), log.read_text()
    assert f"snapshot {first} taken" in before and "mounted" in before
    assert f"snapshot {second} taken" in after and "store" in after and "closed" in after
    assert f"snapshot {second} taken" not in before
    assert f"snapshot {first} taken" not in after
