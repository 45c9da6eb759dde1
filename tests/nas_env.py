"""What the NAS tests share: world-traversable scratch dirs, throw-away users and groups.

pytest's tmp_path is under a 0700 directory, which another user (an SMB user, a member
of the control group) cannot traverse; these tests use /tmp/nas-* instead, and remove
every user and group they add.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def nas_dir():
    """A fresh /tmp/nas-XXXX directory, mode 0755, removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="nas-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr}")


@contextmanager
def system_group(prefix: str = "nasg"):
    """A new group; yields its name."""
    name = f"{prefix}{secrets.token_hex(4)}"
    _run("groupadd", "--system", name)
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], capture_output=True)


@contextmanager
def system_user(prefix: str = "nasu", groups: tuple[str, ...] = ()):
    """A new user without a home or a login shell; yields its name."""
    name = f"{prefix}{secrets.token_hex(4)}"
    cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
           "--user-group"]
    if groups:
        cmd += ["--groups", ",".join(groups)]
    _run(*cmd, name)
    try:
        yield name
    finally:
        # --force: a process of the user that is still exiting must not keep it in passwd.
        subprocess.run(["userdel", "--force", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


def as_user(user: str, *cmd: str, **kw) -> subprocess.CompletedProcess:
    """Run cmd as `user` with its uid, primary group and supplementary groups."""
    return subprocess.run(["setpriv", "--reuid", user, "--regid", user, "--init-groups",
                           "--", *cmd], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, **kw)
