"""`mount.fuse.backupfs`: the helper mount(8) runs for `mount -t fuse.backupfs` and fstab.

mount(8) looks for /sbin/mount.fuse.backupfs and runs it as

    mount.fuse.backupfs STORE MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS] [-t fuse.backupfs]

with no PATH in its environment. This helper drops what is only meant for mount(8),
fstab and systemd (`defaults`, `auto`, `_netdev`, `nofail`, `user`, `x-*`, ...), turns
the backupfs options below into flags, and runs `backupfs mount` (detached: it returns
once the mount answers). Install it with

    ln -s /path/to/.venv/bin/mount.fuse.backupfs /sbin/mount.fuse.backupfs

Options of its own (in fstab, joined to the others with commas):
    txg_interval=SECONDS   backupfs mount --txg-interval
    log_file=PATH          backupfs mount --log-file
    control_group=GROUP    backupfs mount --control-group
    writeback_cache        backupfs mount --writeback-cache
"""

from __future__ import annotations

import getopt
import os
import subprocess
import sys
from pathlib import Path

from ..daemon.mountinfo import find_mount

# Options for mount(8), fstab and systemd only: never for the filesystem.
IGNORED = {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
           "_netdev", "nofail", "async", "relatime", "loud", "silent"}
IGNORED_PREFIXES = ("x-", "X-", "comment=")
FLAG_OPTIONS = {"txg_interval": "--txg-interval", "log_file": "--log-file",
                "control_group": "--control-group"}
SWITCH_OPTIONS = {"writeback_cache": "--writeback-cache"}
USAGE = "usage: mount.fuse.backupfs STORE MOUNTPOINT [-sfnv] [-o OPTIONS]"


def translate(options: list[str]) -> tuple[list[str], list[str]]:
    """(fuse options for -o, extra `backupfs mount` arguments) from mount's options."""
    fuse, extra = [], []
    for o in options:
        name, eq, value = o.partition("=")
        if not o or o in IGNORED or o.startswith(IGNORED_PREFIXES):
            continue
        if name in FLAG_OPTIONS and eq:
            extra += [FLAG_OPTIONS[name], value]
        elif o in SWITCH_OPTIONS:
            extra.append(SWITCH_OPTIONS[o])
        else:
            fuse.append(o)
    return fuse, extra


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        # mount(8) puts STORE and MOUNTPOINT first; options may come anywhere.
        opts, positional = getopt.gnu_getopt(argv, "sfnvo:t:N:")
    except getopt.GetoptError as e:
        print(f"mount.fuse.backupfs: {e}\n{USAGE}", file=sys.stderr)
        return 1
    if len(positional) != 2:
        print(USAGE, file=sys.stderr)
        return 1
    store, mountpoint = positional
    # The old fuse syntax: `backupfs#STORE`.
    store = store.removeprefix("backupfs#")
    options, fake, verbose = [], False, False
    for flag, value in opts:
        if flag == "-o":
            options += value.split(",")
        elif flag == "-f":
            fake = True
        elif flag == "-v":
            verbose = True
        elif flag == "-t" and value not in ("fuse.backupfs", "backupfs"):
            print(f"mount.fuse.backupfs: not a backupfs type: {value}", file=sys.stderr)
            return 1
    fuse, extra = translate(options)
    m = find_mount(mountpoint)
    if m is not None and m.store == Path(os.path.realpath(store)):
        # `mount -a` runs again for a line already mounted: nothing to do.
        return 0
    cmd = [sys.executable, "-m", "backupfs", "mount", *extra]
    if fuse:
        cmd += ["-o", ",".join(fuse)]
    cmd += [store, mountpoint]
    if verbose or fake:
        print(" ".join(cmd), file=sys.stderr)
    if fake:
        return 0
    env = dict(os.environ)
    # mount(8) clears PATH; backupfs runs fusermount3.
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL).returncode


if __name__ == "__main__":
    sys.exit(main())
