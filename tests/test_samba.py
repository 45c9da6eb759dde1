"""Windows Previous Versions: a real smbd on loopback serves a backupfs mount with the
[backup] share of docs/smb.conf.example (stock vfs_shadow_copy2), and smbclient sees each
snapshot as an @GMT token and reads the old content through it."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from mounting import Mount, backupfs
from nas_env import nas_dir, system_user

pytestmark = [pytest.mark.mount, pytest.mark.timeout(150)]

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "smb.conf.example"
PASSWORD = "Backup-test-1"

if not (shutil.which("smbd") and shutil.which("smbclient")):
    pytest.skip("samba is not installed (tools/setup.sh installs it)", allow_module_level=True)


def example_share(mountpoint: Path) -> dict[str, str]:
    cp = configparser.ConfigParser(delimiters=("=",), comment_prefixes=("#", ";"),
                                   interpolation=None, strict=True)
    cp.optionxform = str
    cp.read_string(EXAMPLE.read_text())
    return {k: v.replace("/mnt/backupfs", str(mountpoint)) for k, v in cp["backup"].items()}


def free_port(start: int = 4450) -> int:
    for port in range(start, start + 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port")


class Smbd:
    """smbd in the foreground with its own config and state under `root`."""

    def __init__(self, root: Path, share: dict[str, str]):
        self.root = root
        self.port = free_port()
        self.conf = root / "smb.conf"
        dirs = {k: root / k for k in ("private", "lock", "state", "cache", "pid", "ncalrpc", "log")}
        for d in dirs.values():
            d.mkdir()
        glob = {
            "server role": "standalone server", "map to guest": "never",
            "server min protocol": "SMB2",
            "smb ports": str(self.port), "interfaces": "127.0.0.1", "bind interfaces only": "yes",
            "private dir": dirs["private"], "lock directory": dirs["lock"],
            "state directory": dirs["state"], "cache directory": dirs["cache"],
            "pid directory": dirs["pid"], "ncalrpc dir": dirs["ncalrpc"],
            "log file": dirs["log"] / "smbd.log", "log level": "1",
            "passdb backend": f"tdbsam:{dirs['private'] / 'passdb.tdb'}",
            "load printers": "no", "printing": "bsd", "printcap name": "/dev/null",
            "disable spoolss": "yes",
        }
        lines = ["[global]", *(f"   {k} = {v}" for k, v in glob.items()), "[backup]",
                 *(f"   {k} = {v}" for k, v in share.items())]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def add_user(self, user: str) -> None:
        r = subprocess.run(["smbpasswd", "-c", str(self.conf), "-s", "-a", user],
                           input=f"{PASSWORD}\n{PASSWORD}\n", capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    def start(self) -> None:
        self.out = open(self.root / "smbd.out", "wb")
        self.proc = subprocess.Popen(["smbd", "--foreground", "--no-process-group",
                                      "-s", str(self.conf)],
                                     stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.out,
                                     # smbd signals its whole process group when it stops.
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"smbd exited {self.proc.returncode}: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"smbd did not listen: {self.log()}")
                time.sleep(0.1)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in
                       [self.root / "smbd.out", *sorted((self.root / "log").glob("*"))]
                       if p.is_file())

    def _pids(self) -> list[int]:
        """smbd processes running our config: the parent and its per-client children."""
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    cmd = (d / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if str(self.conf).encode() in cmd and d.name != str(os.getpid()):
                    pids.append(int(d.name))
        return pids

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.out.close()
        deadline = time.monotonic() + 10
        while self._pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self._pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def client(self, user: str, command: str, check: bool = True) -> str:
        r = subprocess.run(["smbclient", f"//127.0.0.1/backup", "-p", str(self.port),
                            "-s", "/dev/null", "-m", "SMB3", "-U", f"{user}%{PASSWORD}",
                            "-c", command], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        out = r.stdout + r.stderr
        if check:
            assert r.returncode == 0 and "NT_STATUS" not in out, \
                f"smbclient -c {command!r} exited {r.returncode}:\n{out}\n{self.log()}"
        return out


def gmt_token(snapshot_name: str) -> str:
    t = datetime.strptime(snapshot_name, "%Y-%m-%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    return t.strftime("@GMT-%Y.%m.%d-%H.%M.%S")


def next_second() -> None:
    time.sleep(1.02 - time.time() % 1)


@pytest.fixture
def served():
    """(mount, smbd, user): a backupfs mount with allow_other served by smbd."""
    with nas_dir() as root, system_user("nassmb", groups=("users",)) as user:
        m = Mount(root / "store", root / "mnt", "allow_other")
        smbd = Smbd(root, example_share(m.path))
        smbd.add_user(user)
        try:
            m.start()
            smbd.start()
            yield m, smbd, user
            smbd.stop()
            m.stop()
        finally:
            smbd.stop()
            m.cleanup()


def test_previous_versions_listed_and_readable(served, tmp_path):
    m, smbd, user = served
    (m.path / "docs").mkdir()
    (m.path / "docs" / "report.txt").write_text("version one\n")
    for p in (m.path / "docs", m.path / "docs" / "report.txt"):
        shutil.chown(p, user, user)
    (m.path / "secret.txt").write_text("root only\n")
    os.chmod(m.path / "secret.txt", 0o600)
    first = backupfs("snapshot", m.path).stdout.strip()
    next_second()
    (m.path / "docs" / "report.txt").write_text("version two, longer\n")
    second = backupfs("snapshot", m.path).stdout.strip()
    (m.path / "docs" / "report.txt").write_text("live\n")
    (m.path / "docs" / "new.txt").write_text("born after the snapshots\n")
    assert first != second and (m.path / "snapshots" / "latest").is_symlink()

    info = smbd.client(user, r"allinfo docs\report.txt")
    tokens = re.findall(r"^@GMT-\S+", info, re.M)
    # Exactly the two snapshots: `latest` (and anything else not a timestamp) is no version.
    assert sorted(tokens) == sorted([gmt_token(first), gmt_token(second)]), info

    def get(path: str) -> str:
        out = tmp_path / "got"
        out.unlink(missing_ok=True)
        smbd.client(user, f'get "{path}" "{out}"')
        return out.read_text()

    assert get(rf"{gmt_token(first)}\docs\report.txt") == "version one\n"
    assert get(rf"{gmt_token(second)}\docs\report.txt") == "version two, longer\n"
    assert get(r"docs\report.txt") == "live\n"
    # A file the snapshot does not hold is not there.
    out = smbd.client(user, rf'get "{gmt_token(second)}\docs\new.txt" "{tmp_path / "x"}"',
                      check=False)
    assert "NT_STATUS_OBJECT_NAME_NOT_FOUND" in out or "NT_STATUS_OBJECT_PATH_NOT_FOUND" in out, out
    # Owners and modes hold in snapshots: root's 0600 file is closed to the user there too.
    for path in (r"secret.txt", rf"{gmt_token(first)}\secret.txt"):
        out = smbd.client(user, f'get "{path}" "{tmp_path / "x"}"', check=False)
        assert "NT_STATUS_ACCESS_DENIED" in out, out
    # The user writes the live tree through the share, but never a previous version.
    src = tmp_path / "upload"
    src.write_text("overwrite\n")
    smbd.client(user, rf'put "{src}" "docs\report.txt"')
    assert (m.path / "docs" / "report.txt").read_text() == "overwrite\n"
    out = smbd.client(user, rf'put "{src}" "{gmt_token(first)}\docs\report.txt"', check=False)
    assert "NT_STATUS_" in out, out
    assert (m.path / "snapshots" / first / "docs" / "report.txt").read_text() == "version one\n"
