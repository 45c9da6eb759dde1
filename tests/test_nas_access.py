"""Who may do what on a served mount: the control socket is root's unless a control group
is configured, and other users see in snapshots exactly what they could see live."""

from __future__ import annotations

import grp
import os
import pwd
import stat

import pytest

from mounting import BACKUPFS, Mount, backupfs, force_unmount
from nas_env import as_user, nas_dir, system_group, system_user

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

DENIED = "permission denied (run as root, or as a member of the store's control group)"


@pytest.fixture
def people():
    """(group, member, outsider)."""
    with system_group() as group, system_user(groups=(group,)) as member, \
            system_user() as outsider:
        yield group, member, outsider


@pytest.fixture
def root():
    with nas_dir() as d:
        yield d


def backupfs_cmd(*args) -> list[str]:
    return [*BACKUPFS, *map(str, args)]


def refused(r) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert DENIED in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_control_socket_is_root_only_by_default(root, people):
    group, member, outsider = people
    with Mount(root / "store", root / "mnt", "allow_other") as m:
        sock = (m.store / "control.sock").stat()
        assert stat.S_IMODE(sock.st_mode) == 0o600 and sock.st_uid == 0
        assert stat.S_IMODE(m.store.stat().st_mode) == 0o700
        for user in (member, outsider):
            # By mountpoint and by store directory: one clear line, no traceback.
            refused(as_user(user, *backupfs_cmd("list", m.path)))
            refused(as_user(user, *backupfs_cmd("snapshot", m.path)))
            refused(as_user(user, *backupfs_cmd("list", m.store)))
        assert backupfs("list", m.path).stdout.strip() == "no snapshots"


def test_control_group_members_run_snapshot_and_list(root, people):
    group, member, outsider = people
    m = Mount(root / "store", root / "mnt", "allow_other")
    with open(m.store / "config.toml", "a") as f:
        f.write(f'\n[control]\ngroup = "{group}"\n')
    with m:
        gid = grp.getgrnam(group).gr_gid
        sock = (m.store / "control.sock").stat()
        assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o660, gid)
        st = m.store.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o710, gid)

        r = as_user(member, *backupfs_cmd("snapshot", m.path, "--label", "by member"))
        assert r.returncode == 0, r.stderr
        name = r.stdout.strip()
        r = as_user(member, *backupfs_cmd("list", m.path))
        assert r.returncode == 0 and name in r.stdout and "by member" in r.stdout, r
        assert (m.path / "snapshots" / name).is_dir()
        r = as_user(member, *backupfs_cmd("list", m.store))
        assert r.returncode == 0 and name in r.stdout, r

        refused(as_user(outsider, *backupfs_cmd("list", m.path)))
        refused(as_user(outsider, *backupfs_cmd("snapshot", m.path)))
        # The group reaches the socket and nothing else: not the index (every file name
        # of every user is in it), not the packs, not the listing.
        for cmd in (["ls", m.store], ["cat", m.store / "index.lmdb" / "data.mdb"],
                    ["ls", m.store / "packs"], ["cat", m.store / "config.toml"],
                    ["cat", m.store / "lock"]):
            r = as_user(member, *map(str, cmd))
            assert r.returncode != 0 and "Permission denied" in r.stderr, (cmd, r)
    # Without the group again, the store is root's alone.
    (m.store / "config.toml").write_text(
        (m.store / "config.toml").read_text().replace(f'group = "{group}"', ""))
    with m:
        assert stat.S_IMODE(m.store.stat().st_mode) == 0o700
        refused(as_user(member, *backupfs_cmd("list", m.path)))


def test_unknown_control_group_fails_the_mount(root):
    m = Mount(root / "store", root / "mnt")
    m.path.mkdir()
    try:
        r = backupfs("mount", "--control-group", "no-such-group-here", m.store, m.path,
                     check=False)
    finally:
        force_unmount(m.path)
    assert r.returncode == 1 and "no such group" in r.stderr, r


def test_snapshots_keep_owners_and_modes_for_other_users(root, people):
    """Through an allow_other mount (default_permissions), a user reads in a snapshot what
    the user could read live, and nothing more."""
    group, member, outsider = people
    with Mount(root / "store", root / "mnt", "allow_other") as m:
        files = {  # name: (owner, group, mode)
            "root-only": ("root", "root", 0o600),
            "group-read": ("root", group, 0o640),
            "member-own": (member, member, 0o600),
            "public": ("root", "root", 0o644),
        }
        for name, (owner, owner_group, mode) in files.items():
            p = m.path / name
            p.write_text(f"{name}\n")
            os.chown(p, pwd.getpwnam(owner).pw_uid, grp.getgrnam(owner_group).gr_gid)
            os.chmod(p, mode)
        (m.path / "private-dir").mkdir(mode=0o700)
        (m.path / "private-dir" / "inside").write_text("x\n")
        snap = backupfs("snapshot", m.path).stdout.strip()
        can_read = {member: {"group-read", "member-own", "public"},
                    outsider: {"public"}}
        for tree in (m.path, m.path / "snapshots" / snap):
            for user, allowed in can_read.items():
                for name in files:
                    r = as_user(user, "cat", str(tree / name))
                    if name in allowed:
                        assert r.returncode == 0 and r.stdout == f"{name}\n", (tree, user, name, r)
                    else:
                        assert r.returncode != 0 and "Permission denied" in r.stderr, \
                            (tree, user, name, r)
                r = as_user(user, "ls", str(tree / "private-dir"))
                assert r.returncode != 0 and "Permission denied" in r.stderr, r
        snap_st = (m.path / "snapshots" / snap / "member-own").stat()
        assert (snap_st.st_uid, stat.S_IMODE(snap_st.st_mode)) == (pwd.getpwnam(member).pw_uid,
                                                                  0o600)
