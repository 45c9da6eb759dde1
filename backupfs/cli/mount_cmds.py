"""mount, umount and sync."""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import click

from ..errors import BackupfsError
from . import main

MOUNT_WAIT = 60.0
UMOUNT_WAIT = 300.0
LOG_NAME = "backupfs.log"


def _setup_daemon_logging(log_file: str | None, verbose: int) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    # Watched: when logrotate moves the file away, the next line opens a new one, with
    # no signal to the daemon and no `copytruncate` (which can lose lines).
    handler = (logging.handlers.WatchedFileHandler(log_file) if log_file
               else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)


def _split_options(values: tuple[str, ...]) -> list[str]:
    return [o for v in values for o in v.split(",") if o]


@main.command("mount")
@click.argument("store", type=click.Path(file_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground, log to stderr.")
@click.option("-o", "options", multiple=True, metavar="OPT[,OPT...]",
              help="Mount options, e.g. allow_other (needed to serve over Samba/NFS).")
@click.option("--log-file", type=click.Path(dir_okay=False),
              help=f"Log here (default when detached: STORE/{LOG_NAME}).")
@click.option("--txg-interval", type=float, default=5.0, show_default=True,
              help="Seconds between transaction groups (the most un-fsynced work a crash loses).")
@click.option("--writeback-cache/--no-writeback-cache", default=False, show_default=True,
              help="Let the kernel cache writes and send them later: faster small writes "
                   "through read-write opens, but write-only opens then go through the page "
                   "cache too (slower big copies), a full disk shows only at fsync or "
                   "close, and a snapshot holds only what the kernel has sent (guide.md, "
                   "\"Mount and unmount\").")
@click.option("--control-group", metavar="GROUP",
              help="Let GROUP's members run snapshot, list and the other control commands "
                   "(control.sock mode 0660); overrides [control] group in config.toml.")
@click.pass_context
def mount_cmd(ctx, store, mountpoint, foreground, options, log_file, txg_interval,
              writeback_cache, control_group):
    """Mount STORE at MOUNTPOINT. Detaches and returns once the mount answers, unless -f."""
    from ..daemon.mountinfo import find_mount, mounts_of_store

    store_path = Path(store).resolve()
    mnt = Path(mountpoint).resolve()
    if not (store_path / "config.toml").is_file():
        raise BackupfsError(f"{store}: not a backupfs store (run `backupfs init {store}` first)")
    if not mnt.is_dir():
        raise BackupfsError(f"{mountpoint}: mountpoint does not exist or is not a directory")
    # Checked here, not left to the daemon: the wait below would take an existing mount at
    # MOUNTPOINT for the new one and report success.
    existing = find_mount(mnt)
    if existing is not None:
        raise BackupfsError(f"{mountpoint}: already a backupfs mount (of {existing.store})")
    for m in mounts_of_store(store_path):
        raise BackupfsError(f"{store}: already mounted at {m.mountpoint}")
    verbose = ctx.parent.params.get("verbose", 0) if ctx.parent else 0
    if foreground:
        from ..daemon.serve import Daemon

        _setup_daemon_logging(log_file, verbose)
        Daemon(store_path, mnt, _split_options(options), txg_interval=txg_interval,
               writeback_cache=writeback_cache, control_group=control_group).run()
        return
    log_path = Path(log_file).resolve() if log_file else store_path / LOG_NAME
    cmd = [sys.executable, "-m", "backupfs", *(["-v"] * verbose), "mount", "-f",
           "--log-file", str(log_path), "--txg-interval", str(txg_interval)]
    cmd += [a for o in options for a in ("-o", o)]
    if control_group is not None:
        cmd += ["--control-group", control_group]
    if writeback_cache:
        cmd.append("--writeback-cache")
    cmd += [str(store_path), str(mnt)]
    with open(log_path, "ab") as log_out:
        start = log_out.tell()
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_out, stderr=log_out,
                                 start_new_session=True, close_fds=True)
    deadline = time.monotonic() + MOUNT_WAIT
    while time.monotonic() < deadline:
        if find_mount(mnt):
            click.echo(f"mounted {store_path} at {mnt} (daemon pid {child.pid}, log {log_path})")
            return
        if child.poll() is not None:
            with open(log_path, "rb") as f:
                f.seek(start)
                lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"daemon exited with status {child.returncode}"
            raise BackupfsError(f"mount failed: {reason.removeprefix('backupfs: ')}")
        time.sleep(0.05)
    child.terminate()
    raise BackupfsError(f"mount did not come up within {MOUNT_WAIT:.0f} s (see {log_path})")


def _daemon_of(store: Path) -> int | None:
    """A pidfd of the daemon serving `store`, which its writer mark names, to wait for
    its exit; None if that is no running `backupfs mount`."""
    from ..store.store import WRITER_MARK

    try:
        pid = int((store / WRITER_MARK).read_text())
        pidfd = os.pidfd_open(pid)
    except (OSError, ValueError):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        argv = []
    if b"mount" in argv and any(b"backupfs" in a for a in argv):
        return pidfd
    os.close(pidfd)
    return None


def _wait_for_exit(pidfd: int, timeout: float) -> bool:
    """True once the process has exited (a pidfd turns readable then, reaped or not)."""
    ready, _, _ = select.select([pidfd], [], [], max(timeout, 0))
    return bool(ready)


def _wait_for_store_release(store: Path, timeout: float) -> bool:
    """True once no process holds the store's lock (the daemon has closed it)."""
    deadline = time.monotonic() + timeout
    lock = store / "lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
        finally:
            os.close(fd)
        time.sleep(0.05)


@main.command("umount")
@click.argument("mountpoint", type=click.Path())
@click.option("--lazy", "-z", is_flag=True, help="Detach now even if busy (fusermount3 -z).")
@click.option("--force", is_flag=True,
              help="Unmount even if written data cannot be stored (a full disk): it is lost.")
def umount_cmd(mountpoint, lazy, force):
    """Flush, commit and unmount MOUNTPOINT; waits for the daemon to exit.

    If written data cannot be stored first (the store's disk is full), MOUNTPOINT stays
    mounted, the data kept, until space is freed or --force is given."""
    from ..daemon.mountinfo import find_mount

    m = find_mount(mountpoint)
    if m is None:
        raise BackupfsError(f"{mountpoint}: not a backupfs mount")
    daemon = _daemon_of(m.store)
    try:
        _unmount(m, mountpoint, lazy, force)
        # Its exit, not only the store's lock: its files (the log, say) stay open until
        # then, and an unmount of the store's disk right after ours must not find them
        # busy. A daemon we cannot name is waited for by its lock.
        done = (_wait_for_exit(daemon, UMOUNT_WAIT) if daemon is not None
                else _wait_for_store_release(m.store, UMOUNT_WAIT))
        if not done:
            raise BackupfsError(f"{mountpoint}: unmounted, but the daemon has not finished "
                                f"writing after {UMOUNT_WAIT:.0f} s")
    finally:
        if daemon is not None:
            os.close(daemon)


def _unmount(m, mountpoint: str, lazy: bool, force: bool) -> None:
    """Have the daemon store everything, then unmount."""
    from ..daemon.protocol import ControlClient, DaemonError

    try:
        # Stored while still mounted, so a failure can leave the data where it is.
        ControlClient(m.store, timeout=UMOUNT_WAIT).call("flush")
    except DaemonError as e:
        if e.errno is not None and not force:
            raise BackupfsError(f"{mountpoint}: not unmounted: {e}; free space on the "
                                f"store's disk and try again, or --force to lose it") from None
    except (BackupfsError, OSError):
        # No access to the control socket, or no answer: unmounting still writes
        # everything back, and the wait below reports a daemon that does not finish.
        pass
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(m.mountpoint)]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "fusermount3 failed"
        raise BackupfsError(f"{mountpoint}: cannot unmount: {msg}")


@main.command("sync")
@click.argument("target", metavar="MOUNTPOINT|STORE")
def sync_cmd(target):
    """Make everything written to a mount so far durable, and release the space of
    deleted files; returns when it is on disk.

    `sync` and syncfs() stop at the kernel: it writes its cached pages to the daemon but
    does not ask a FUSE filesystem to commit. Without fsync or this command, writes
    become durable at the next transaction group (5 s by default)."""
    from ..daemon.protocol import ControlClient
    from .target import resolve_store

    ControlClient(resolve_store(target)).call("flush")
