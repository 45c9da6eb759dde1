#!/usr/bin/env python3
"""bench_replicate: `backupfs replicate` of a mounted store to a second store, beside the
ways of keeping a second copy without it, measured in the same run on the same disk.

    sudo .venv/bin/python tools/bench_replicate.py [--tree 1G] [--tree-files 16000]
        [--dir DIR] [--json out.json]

A tree of mixed data (bench.py's nightly tree) is rsynced into a fresh mount and
snapshotted. Then:
  full         `backupfs replicate` into a new store, against `cp -a` of the store's
               packs (the same bytes, copied as files: the floor) and `rsync -a` of the
               mounted tree to a directory (a second copy as plain files)
  1% changed   1% of the files changed, rsynced in, snapshotted; `backupfs replicate`
               again, against `rsync -a` of the mounted tree over that directory
Each is timed with the page cache dropped first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench import BACKUPFS, change_one_percent, du_bytes, make_tree, run, timed
from bench_fs import drop_caches, parse_size


def cold_timed(fn) -> float:
    subprocess.run(["sync"], check=True)
    drop_caches()
    return timed(fn)


def measure(work: Path, tree_size: int, tree_files: int, rng: random.Random) -> dict:
    raw, store, mnt = work / "raw", work / "store", work / "mnt"
    replica, mirror = work / "replica", raw / "mirror"
    raw.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    tree = raw / "tree"
    paths = make_tree(tree, tree_size, tree_files, rng)
    run(*BACKUPFS, "init", store)
    run(*BACKUPFS, "mount", store, mnt)
    res: dict[str, dict] = {"full": {}, "incremental": {}}
    try:
        run("rsync", "-a", f"{tree}/", f"{mnt}/data/")
        run(*BACKUPFS, "snapshot", mnt)
        full = res["full"]
        full["replicate_s"] = cold_timed(lambda: run(*BACKUPFS, "replicate", mnt, replica))
        full["cp_packs_s"] = cold_timed(lambda: run("cp", "-a", store / "packs", raw / "packs-copy"))
        full["rsync_tree_s"] = cold_timed(lambda: run("rsync", "-a", f"{mnt}/data/", f"{mirror}/"))
        full["replica_bytes"] = du_bytes(replica / "packs")
        full["store_bytes"] = du_bytes(store / "packs")
        full["tree_bytes"] = du_bytes(tree)
        change_one_percent(paths, rng)
        run("rsync", "-a", f"{tree}/", f"{mnt}/data/")
        run(*BACKUPFS, "snapshot", mnt)
        inc = res["incremental"]
        before = du_bytes(replica / "packs")
        sent = []
        inc["replicate_s"] = cold_timed(lambda: sent.extend(json.loads(
            run(*BACKUPFS, "replicate", "--json", mnt, replica).stdout)))
        inc["replica_bytes_added"] = du_bytes(replica / "packs") - before
        inc["records"] = sum(s["records"] for s in sent)
        inc["blocks_copied"] = sum(s["blocks_copied"] for s in sent)
        inc["rsync_tree_s"] = cold_timed(lambda: run("rsync", "-a", f"{mnt}/data/", f"{mirror}/"))
    finally:
        subprocess.run([*BACKUPFS, "umount", str(mnt)], check=False)
    for v in res.values():
        v["vs_rsync"] = v["replicate_s"] / v["rsync_tree_s"]
    res["full"]["vs_cp_packs"] = res["full"]["replicate_s"] / res["full"]["cp_packs_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default="1G", help="tree size (default 1G)")
    ap.add_argument("--tree-files", type=int, default=16000, help="files in it (default 16000)")
    ap.add_argument("--dir", help="work directory on the disk to measure (default: /var/tmp/...)")
    ap.add_argument("--json", metavar="PATH", help="write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_replicate needs root (it drops the page cache and mounts)")
    work = Path(args.dir or tempfile.mkdtemp(prefix="backupfs-bench-replicate-",
                                             dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = measure(work, parse_size(args.tree), args.tree_files, random.Random(1))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    full, inc = res["full"], res["incremental"]
    print(f"full:       replicate {full['replicate_s']:.1f} s, cp -a of the packs "
          f"{full['cp_packs_s']:.1f} s ({full['vs_cp_packs']:.2f}x), rsync -a of the tree "
          f"{full['rsync_tree_s']:.1f} s ({full['vs_rsync']:.2f}x); replica "
          f"{full['replica_bytes'] / 1e6:.0f} MB, store {full['store_bytes'] / 1e6:.0f} MB, "
          f"tree {full['tree_bytes'] / 1e6:.0f} MB")
    print(f"1% changed: replicate {inc['replicate_s']:.2f} s, rsync -a of the tree "
          f"{inc['rsync_tree_s']:.2f} s ({inc['vs_rsync']:.2f}x); replica grew "
          f"{inc['replica_bytes_added'] / 1e6:.1f} MB ({inc['records']} records, "
          f"{inc['blocks_copied']} blocks)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
