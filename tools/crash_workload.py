#!/usr/bin/env python3
"""A mixed workload for crash testing: run it against a mounted backupfs, kill the daemon
at any moment, then check what it journaled (tests/test_reliability_crash.py).

It writes *durable* files (written, fsynced, then journaled: they must survive any crash
byte for byte), churns other files (writes, renames, deletes with no fsync: anything may
be lost of those, but the store must stay consistent), takes snapshots (journaled with a
manifest of their contents once the command returned: they must survive unchanged) and
deletes some (journaled before and after). The journal lives outside the mount and is
fsynced line by line.

    crash_workload.py MOUNTPOINT JOURNAL [--seed N] [--snapshot-every SECONDS]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

BACKUPFS = [sys.executable, "-m", "backupfs"]


def content(seed: int, seq: int, size: int) -> bytes:
    """Deterministic, partly compressible bytes for durable file number `seq`."""
    rng = random.Random(seed * 1_000_003 + seq)
    half = size // 2
    text = (b"durable %d " % seq) * ((size - half) // 10 + 1)
    return (rng.randbytes(half) + text)[:size]


def manifest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file, symlink target for symlinks."""
    out = {}

    def fail(e: OSError) -> None:
        raise e  # a snapshot that cannot be listed is a failure, not an empty manifest

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        for name in filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Journal:
    def __init__(self, path: Path):
        self.f = open(path, "a")

    def write(self, kind: str, **fields) -> None:
        self.f.write(json.dumps({"kind": kind, **fields}) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())


def run(mnt: Path, journal: Journal, seed: int, snapshot_every: float) -> None:
    rng = random.Random(seed)
    # Once the dead mount is detached, the path is a plain directory again: a write
    # that lands there must not be journaled as stored.
    device = os.stat(mnt).st_dev
    (mnt / "dur").mkdir(exist_ok=True)
    (mnt / "churn").mkdir(exist_ok=True)
    seq = int(time.time() * 1000) % 10**9  # new names in every cycle
    last_snapshot = time.monotonic()
    taken: list[str] = []
    while True:
        r = rng.random()
        if r < 0.4:
            seq += 1
            data = content(seed, seq, rng.choice([0, 1, 4095, 4096, 70_000, 131_073, 300_000]))
            name = f"dur/{seq:09d}"
            fd = os.open(mnt / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                if os.fstat(fd).st_dev != device:
                    raise OSError(f"{mnt} is no longer the mount")
            finally:
                os.close(fd)
            journal.write("file", name=name, seed=seed, seq=seq, size=len(data),
                          sha256=hashlib.sha256(data).hexdigest())
        elif r < 0.75:
            a, b = mnt / "churn" / f"c{rng.randrange(20)}", mnt / "churn" / f"c{rng.randrange(20)}"
            op = rng.choice(["write", "append", "rename", "unlink", "truncate"])
            try:
                if op == "write":
                    a.write_bytes(rng.randbytes(rng.randrange(200_000)))
                elif op == "append":
                    with open(a, "ab") as f:
                        f.write(rng.randbytes(rng.randrange(50_000)))
                elif op == "rename":
                    os.rename(a, b)
                elif op == "unlink":
                    os.unlink(a)
                else:
                    os.truncate(a, rng.randrange(100_000))
            except FileNotFoundError:
                pass
        elif time.monotonic() - last_snapshot > snapshot_every:
            last_snapshot = time.monotonic()
            if taken and rng.random() < 0.3:
                victim = taken.pop(rng.randrange(len(taken)))
                # When: a snapshot taken later in the same second may get the name again.
                journal.write("deleting", name=victim, at_ns=time.time_ns())
                subprocess.run([*BACKUPFS, "delete", str(mnt), victim], check=True,
                               capture_output=True)
                journal.write("deleted", name=victim)
            else:
                r = subprocess.run([*BACKUPFS, "snapshot", str(mnt)], check=True,
                                   capture_output=True, text=True)
                name = r.stdout.strip()
                taken.append(name)
                journal.write("snapshot", name=name,
                              manifest=manifest(mnt / "snapshots" / name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mountpoint", type=Path)
    ap.add_argument("journal", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--snapshot-every", type=float, default=0.5)
    args = ap.parse_args()
    try:
        run(args.mountpoint, Journal(args.journal), args.seed, args.snapshot_every)
    except (OSError, subprocess.CalledProcessError) as e:
        # The daemon was killed under us: that is the point.
        print(f"workload stopped: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
