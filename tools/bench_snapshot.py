#!/usr/bin/env python3
"""Snapshot cost against tree size, through the namespace (no FUSE in the way).

For each tree size: build a live tree of N inodes (files of one block each, 1,000 per
directory), then time `Namespace.snapshot` + the durable commit, median of 20; then change
1% and 10% of the files and time deleting the snapshot that saw them (delete + commit).
Creation should not grow with N; deletion should grow with the changes, not with N.

    .venv/bin/python tools/bench_snapshot.py [--sizes 1000,100000,1000000] [--json out.json]
"""

from __future__ import annotations

import json
import random
import shutil
import stat
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backupfs.namespace import ROOT_INO, Namespace  # noqa: E402
from backupfs.store import Store  # noqa: E402

PER_DIR = 1000


def build_tree(ns: Namespace, n: int) -> list[int]:
    live, blocks = ns.live, ns.store.blocks
    shared = blocks.put(b"x" * 4096)
    files = []
    d = None
    for i in range(n):
        if i % PER_DIR == 0:
            d = live.create(ROOT_INO, b"d%07d" % (i // PER_DIR), stat.S_IFDIR | 0o755, 0, 0, i)
            ns.store.commit()  # keep each LMDB transaction a sensible size
        ino = live.create(d.ino, b"f%07d" % i, stat.S_IFREG | 0o644, 0, 0, i).ino
        if i:
            blocks.incref(shared)  # put gave the first reference
        live.write_block(ino, 0, shared)
        live.setattr(ino, size=4096)
        files.append(ino)
    ns.store.commit()
    return files


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(n: int, workdir: Path, repeats: int) -> dict:
    path = workdir / f"store-{n}"
    Store.init(path, block_size=4096)
    store = Store.open(path)
    try:
        ns = Namespace(store)
        t = time.perf_counter()
        files = build_tree(ns, n)
        build = time.perf_counter() - t

        def snap():
            ns.snapshot()
            store.commit()

        creation = [timed(snap) for _ in range(repeats)]
        for r in ns.snapshots():  # nothing changed between them: deleting is free
            ns.delete_snapshot(r.id)
        store.commit()
        deletion = {}
        rng = random.Random(n)
        for share in (0.01, 0.10):
            target = ns.snapshot()
            store.commit()
            changed = rng.sample(files, max(1, int(n * share)))
            for ino in changed:
                ns.live.write_block(ino, 0, store.blocks.put(b"%d" % ino))
            store.commit()
            deletion[share] = timed(lambda: (ns.delete_snapshot(target.id), store.commit()))
        return {"inodes": n, "build_s": build,
                "create_median_ms": statistics.median(creation) * 1e3,
                "create_p90_ms": sorted(creation)[int(len(creation) * 0.9) - 1] * 1e3,
                "delete_1pct_ms": deletion[0.01] * 1e3, "delete_10pct_ms": deletion[0.10] * 1e3}
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)


@click.command()
@click.option("--sizes", default="1000,100000,1000000", show_default=True,
              help="Comma-separated tree sizes (inodes).")
@click.option("--repeats", default=20, show_default=True, help="Snapshots timed per size.")
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Where to build the stores (default: a temporary directory).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write results here.")
def main(sizes, repeats, workdir, json_out):
    """Measure snapshot creation and deletion cost against tree size."""
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    base.mkdir(parents=True, exist_ok=True)
    results = []
    for n in (int(s) for s in sizes.split(",")):
        click.echo(f"building {n:,} inodes ...", err=True)
        results.append(measure(n, base, repeats))
    first = results[0]
    click.echo(f"{'inodes':>10} {'build s':>8} {'create ms':>10} {'vs first':>9} "
               f"{'del 1% ms':>10} {'del 10% ms':>11}")
    for r in results:
        ratio = r["create_median_ms"] / first["create_median_ms"]
        r["create_ratio_vs_first"] = ratio
        click.echo(f"{r['inodes']:>10,} {r['build_s']:>8.1f} {r['create_median_ms']:>10.3f} "
                   f"{ratio:>9.2f} {r['delete_1pct_ms']:>10.1f} {r['delete_10pct_ms']:>11.1f}")
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    if not workdir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
