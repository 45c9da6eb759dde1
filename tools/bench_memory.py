#!/usr/bin/env python3
"""bench_memory: whether the daemon's memory stays bounded through a long mount.

    sudo .venv/bin/python tools/bench_memory.py [--steps 3] [--files 100000]
        [--snapshots 9000] [--dir DIR] [--json out.json]

Two workloads on one fresh mount. After each step it reads the daemon's anonymous
memory (its heap, where a leak grows; the index and packs it maps belong to the page
cache):
  files      STEPS steps of FILES small files (3 KB each, 1,000 per directory), each
             step followed by a transaction group and `drop_caches`, so the kernel
             forgets the inodes as it would on a busy NAS
  snapshots  SNAPSHOTS rounds of: change a file, snapshot, list and read a directory
             in the snapshot, delete all but the newest 10 (a year of hourly snapshots
             takes 8,760), reported in six steps
The first step fills the daemon's bounded caches (namespace records, directory cookies
up to 4,096 directories); the growth after it, per 100,000 files or per 1,000 snapshots,
is what a mount that runs for months keeps growing by, and should be about zero.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench import BACKUPFS, daemon_pid, run
from bench_fs import drop_caches

from backupfs.daemon.protocol import ControlClient

SETTLE_S = 7  # past one transaction group (5 s): the last step's files are sealed
KEEP = 10
FILE_BYTES = 3000


def anon_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Anonymous line for pid {pid}")


def settled_anon_mib(pid: int) -> float:
    time.sleep(SETTLE_S)
    drop_caches()
    time.sleep(1)  # the kernel's FORGETs reach the daemon
    return anon_mib(pid)


def write_files(mnt: Path, steps: int, files: int, pid: int) -> list[float]:
    payload = os.urandom(FILE_BYTES)
    out = []
    for s in range(steps):
        for d in range(files // 1000):
            directory = mnt / f"files-{s}-{d}"
            directory.mkdir()
            for k in range(1000):
                (directory / f"f{k}").write_bytes(payload)
        out.append(settled_anon_mib(pid))
        print(f"files: {(s + 1) * files:,} written, daemon heap {out[-1]:.0f} MiB", flush=True)
    return out


def churn_snapshots(mnt: Path, control: ControlClient, rounds: int,
                    pid: int) -> list[tuple[int, float]]:
    """The rounds ask the control socket as the CLI does, through its client: starting
    a CLI process for each would take longer than the snapshot itself."""
    work = mnt / "churn"
    for d in range(3):
        (work / f"d{d}").mkdir(parents=True)
        for k in range(50):
            (work / f"d{d}" / f"f{k}").write_bytes(os.urandom(2000))
    names: list[str] = []
    out = []
    step = max(1, rounds // 6)
    for r in range(1, rounds + 1):
        stamp = str(r).encode()
        (work / "d0" / "f0").write_bytes(os.urandom(2000) + stamp)
        names.append(control.call("snapshot")["name"])
        snap = mnt / "snapshots" / names[-1] / "churn"
        for p in (snap / "d0").iterdir():
            p.stat()
        if not (snap / "d0" / "f0").read_bytes().endswith(stamp):
            raise SystemExit(f"snapshot {names[-1]} does not hold round {r}'s write")
        if len(names) > KEEP:
            control.call("delete", names=names[:-KEEP])
            names = names[-KEEP:]
        if r % step == 0 or r == rounds:
            out.append((r, anon_mib(pid)))
            print(f"snapshots: {r:,} taken, daemon heap {out[-1][1]:.0f} MiB", flush=True)
    return out


def growth(points: list[tuple[int, float]], per: int, since: int) -> float | None:
    """MiB gained per `per` units from the first point at `since` units or more to the
    last point (None: no two such points)."""
    later = [pt for pt in points if pt[0] >= since]
    if len(later) < 2:
        return None
    (x0, y0), (x1, y1) = later[0], later[-1]
    return (y1 - y0) / (x1 - x0) * per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="steps of files (default 3)")
    ap.add_argument("--files", type=int, default=100000,
                    help="files per step, a multiple of 1,000 (default 100000)")
    ap.add_argument("--snapshots", type=int, default=9000,
                    help="snapshot rounds (default 9000)")
    ap.add_argument("--dir", help="work directory on the disk to measure (default: /var/tmp/...)")
    ap.add_argument("--json", metavar="PATH", help="write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_memory needs root (it drops the page cache and mounts)")
    if args.steps < 2 or args.files < 1000:
        raise SystemExit("bench_memory needs at least 2 steps of at least 1,000 files")
    work = Path(args.dir or tempfile.mkdtemp(prefix="backupfs-bench-memory-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    store, mnt = work / "store", work / "mnt"
    mnt.mkdir(exist_ok=True)
    run(*BACKUPFS, "init", store)
    pid = daemon_pid(run(*BACKUPFS, "mount", store, mnt).stdout)
    try:
        start = anon_mib(pid)
        print(f"daemon heap at the start: {start:.0f} MiB", flush=True)
        files = write_files(mnt, args.steps, args.files, pid)
        snaps = churn_snapshots(mnt, ControlClient(store), args.snapshots, pid)
    finally:
        subprocess.run([*BACKUPFS, "umount", str(mnt)], check=False)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    file_points = [((i + 1) * args.files, m) for i, m in enumerate(files)]
    res = {
        "start_MiB": start,
        "files": file_points,
        "files_growth_MiB_per_100k": growth(file_points, 100_000, args.files),
        "snapshots": snaps,
        # The second half: past the directory cookies' bound with the default rounds.
        "snapshots_growth_MiB_per_1000": growth(snaps, 1000, args.snapshots // 2),
    }
    print(f"files: {res['files_growth_MiB_per_100k']:+.1f} MiB per 100,000 written after "
          f"the first step ({files[0] - start:+.0f} MiB in it)")
    if res["snapshots_growth_MiB_per_1000"] is not None:
        print(f"snapshots: {res['snapshots_growth_MiB_per_1000']:+.2f} MiB per 1,000 taken "
              f"and deleted in the second half")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
