"""A real backupfs mount for tests: the CLI in a subprocess, always unmounted.

Following the design's rules for testing a mount: start `backupfs mount -f` in a
subprocess, poll until the mountpoint is a mount (failing at once if the daemon exits),
unmount with the CLI and check its exit status; in every teardown also detach lazily and
kill the daemon if it is still there; fail when the daemon log holds a traceback.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

BACKUPFS = [sys.executable, "-m", "backupfs"]
MOUNT_TIMEOUT = 30.0
UMOUNT_TIMEOUT = 120.0


def backupfs(*args, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the backupfs CLI; returns the completed process (text output)."""
    r = subprocess.run([*BACKUPFS, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"backupfs {' '.join(map(str, args))} exited {r.returncode}:\n"
                             f"{r.stdout}{r.stderr}")
    return r


def fails_with(*args, match: str, code: int = 1) -> str:
    """Run the CLI, expect a one-line error matching `match`; returns that line."""
    r = backupfs(*args, check=False, timeout=60)
    assert r.returncode == code, f"exit {r.returncode}: {r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"not one line:\n{r.stderr}"
    assert lines[0].startswith("backupfs: "), lines[0]
    assert re.search(match, lines[0]), lines[0]
    assert r.stdout == ""
    return lines[0]


def assert_fsck_clean(store: Path) -> None:
    r = backupfs("fsck", store, "--json", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@contextmanager
def answer_times(path: Path) -> Iterator[list[float]]:
    """While the body runs, a thread asks the daemon for `path`'s xattr names over and
    over (the kernel keeps no xattrs, so each goes to the daemon); yields the list of
    times the answers came, filled as they come."""
    answers: list[float] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            os.listxattr(path)
            answers.append(time.monotonic())

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        time.sleep(0.2)
        yield answers
    finally:
        stop.set()
        asker.join(30)


def longest_wait(answers: list[float], start: float, end: float) -> float:
    """The longest time between two answers, of those around [start, end]."""
    return max(b - a for a, b in zip(answers, answers[1:]) if b > start and a < end)


def drop_page_cache() -> None:
    """Make the kernel drop cached file pages (as memory pressure may at any time): the
    reads that follow come from the daemon."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")


def flip_byte(path: Path, offset: int) -> None:
    """Damage a file (a pack) at `offset`, durably: one bit of one byte."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
        f.flush()
        os.fsync(f.fileno())


def is_mounted(path: Path) -> bool:
    path = str(Path(path).resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def mount_table_entry(path: Path) -> dict[str, str]:
    """The mount at `path` in /proc/self/mountinfo: its per-mount options, filesystem
    type, source and the filesystem's own options."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == str(path):
                fstype, source, fs_options = right.split()[:3]
                return {"options": left.split()[5], "type": fstype, "source": source,
                        "fs_options": fs_options}
    raise AssertionError(f"{path} is not mounted")


def force_unmount(path: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


class Mount:
    """One mounted store. Use as a context manager, or call start()/stop()."""

    def __init__(self, store: Path, mountpoint: Path, *options: str, txg_interval: float = 5.0,
                 init: bool = True, init_args: tuple[str, ...] = (), log_path: Path | None = None,
                 flags: tuple[str, ...] = ()):
        self.store = Path(store)
        self.path = Path(mountpoint)
        self.options = options
        self.flags = flags  # more `backupfs mount` arguments, e.g. ("--writeback-cache",)
        self.txg_interval = txg_interval
        self.log_path = log_path or self.store.parent / f"{self.store.name}-daemon.log"
        self.proc: subprocess.Popen | None = None
        if init and not (self.store / "config.toml").exists():
            backupfs("init", self.store, *init_args)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> "Mount":
        self.path.mkdir(parents=True, exist_ok=True)
        cmd = [*BACKUPFS, "mount", "-f", "--txg-interval", str(self.txg_interval)]
        for o in self.options:
            cmd += ["-o", o]
        cmd += [*self.flags, str(self.store), str(self.path)]
        self._log = open(self.log_path, "ab")
        self._log_start = self._log.tell()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(self.path):
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode} before "
                                     f"mounting:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"mount did not appear in {MOUNT_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.02)
        # Mounted is not yet answering: the daemon creates its control socket, then
        # serves. A stat waits for the first answer, as `backupfs mount` itself does.
        os.stat(self.path)
        return self

    def stop(self, *umount_args: str, daemon_exit: int = 0) -> None:
        """Unmount with the CLI, which must succeed, and wait for the daemon to exit
        with `daemon_exit`."""
        if self.proc is None:
            return
        r = backupfs("umount", *umount_args, self.path, check=False, timeout=UMOUNT_TIMEOUT)
        try:
            code = self.proc.wait(timeout=UMOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not exit after umount:\n{self.log()}")
        self.proc = None
        self._log.close()
        assert r.returncode == 0, f"umount failed: {r.stderr}\n{self.log()}"
        assert code == daemon_exit, f"daemon exited with {code}:\n{self.log()}"
        self.check_log()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the daemon (a crash when SIGKILL) and detach the dead mount."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        force_unmount(self.path)
        self.proc = None
        if getattr(self, "_log", None) is not None and not self._log.closed:
            self._log.close()

    def cleanup(self) -> None:
        """For teardowns: never leave a mount or a daemon behind."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop()
                return
            except Exception:
                pass
        self.kill()

    def __enter__(self) -> "Mount":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.stop()
        else:
            self.cleanup()

    # -- looking at it ---------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_log(self) -> None:
        text = self.log()
        assert "Traceback" not in text, f"the daemon logged a traceback:\n{text}"

    def syncfs(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Detached:
    """Stores mounted by something else than the test harness; unmounted at the end."""

    def __init__(self):
        self.mounts: list[tuple[Path, Path]] = []

    def add(self, store: Path, mountpoint: Path) -> None:
        backupfs("init", store)
        mountpoint.mkdir()
        self.mounts.append((store, mountpoint))

    def cleanup(self) -> None:
        for store, mnt in self.mounts:
            if is_mounted(mnt):
                backupfs("umount", mnt, check=False)
                force_unmount(mnt)
            try:
                pid = int((store / "writer.pid").read_text())
            except (OSError, ValueError):
                continue
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not has_exited(pid):
                time.sleep(0.1)
            if not has_exited(pid) and b"backupfs" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


def has_exited(pid: int) -> bool:
    """Gone, or a zombie: a detached daemon's parent (`backupfs mount`) is gone, and
    whether whoever inherits it reaps it is not ours to say."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in "ZX"
    except FileNotFoundError:
        return True
