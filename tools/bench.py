#!/usr/bin/env python3
"""bench: the whole benchmark suite in one command, every figure beside a baseline
measured in the same run (these machines are shared and noisy: compare ratios).

Workloads (needs root: it drops the page cache and mounts):
  1. filesystem    sequential write + fsync, cold read, 10,000 small files (create+write,
                   cold stat, ls -l, read, cp -a in, unlink) on backupfs, memfs (the
                   Python FUSE ceiling, tools/memfs.py), passthroughfs (a bare FUSE
                   filesystem over the same disk) and the raw disk (tools/bench_fs.py)
  2. restore       `cp -a` of a tree out of a snapshot, vs the same copy on the raw disk
                   and out of memfs (medians of three rounds)
  3. nightly       rsync a tree in + snapshot; change 1% of the files; rsync + snapshot
                   again; beside `borg create` and `restic backup` of the same trees when
                   installed (time and bytes stored)
  4. snapshots     creation at 1k / 100k / 1M inodes, deletion after 1% / 10% changed
                   (tools/bench_snapshot.py)
  5. memory        the daemon's peak RSS over the run (VmHWM)
  6. replicate     `backupfs replicate` to a second store, whole and after 1% changed,
                   beside `cp -a` of the packs and `rsync -a` of the tree
                   (tools/bench_replicate.py)

    sudo .venv/bin/python tools/bench.py [--size 1G] [--files 10000] [--tree 1G]
        [--tree-files 16000] [--snapshot-sizes 1000,100000,1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_fs  # noqa: E402
import bench_snapshot  # noqa: E402

PY = sys.executable
BACKUPFS = [PY, "-m", "backupfs"]


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", HERE.parent)
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                          **kw)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def du_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def make_tree(root: Path, total: int, files: int, rng: random.Random) -> list[Path]:
    """`files` files of mixed data adding up to about `total` bytes, 100 per directory."""
    data = bench_fs.mixed_data(min(total, 64 << 20))
    out = []
    mean = total // files
    for i in range(files):
        d = root / f"d{i // 100:04d}"
        d.mkdir(parents=True, exist_ok=True)
        size = max(0, int(rng.expovariate(1 / mean))) if mean else 0
        start = rng.randrange(max(1, len(data) - size))
        p = d / f"f{i:06d}"
        p.write_bytes(data[start:start + size] + os.urandom(16))  # unique: no dedup luck
        out.append(p)
    return out


def change_one_percent(paths: list[Path], rng: random.Random) -> None:
    for p in rng.sample(paths, max(1, len(paths) // 100)):
        with open(p, "r+b") as f:
            f.seek(rng.randrange(max(1, p.stat().st_size)))
            f.write(os.urandom(4096))


def daemon_pid(mount_stdout: str) -> int:
    return int(mount_stdout.split("daemon pid ")[1].split(",")[0].split(")")[0])


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_restore(mnt: Path, raw: Path, tree: Path, work: Path, rounds: int = 3) -> dict:
    """cp -a of the tree out of a snapshot, against cp -a of it on the raw disk and out of
    memfs (the Python FUSE ceiling: the same requests, no store behind them). Medians of
    `rounds`, the three copies in a rotated order each round."""
    run("rsync", "-a", f"{tree}/", f"{mnt}/restore-src/")
    name = run(*BACKUPFS, "snapshot", mnt).stdout.strip()
    mnt_m = work / "mnt-memfs-restore"
    mnt_m.mkdir(exist_ok=True)
    memfs = subprocess.Popen([PY, str(HERE / "memfs.py"), str(mnt_m)])
    try:
        bench_fs.wait_mounted(mnt_m, memfs, "memfs")
        run("rsync", "-a", f"{tree}/", f"{mnt_m}/restore-src/")
        sources = [("raw", tree), ("memfs", mnt_m / "restore-src"),
                   ("backupfs", mnt / "snapshots" / name / "restore-src")]
        times: dict[str, list[float]] = {k: [] for k, _ in sources}
        for r in range(rounds):
            for what, src in sources[r % 3:] + sources[:r % 3]:
                out = raw / "restore-out"
                bench_fs.drop_caches()
                times[what].append(timed(lambda: run("cp", "-a", src, out)))
                shutil.rmtree(out)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt_m)])
        memfs.wait()
    size = du_bytes(tree)
    shutil.rmtree(mnt / "restore-src")
    run(*BACKUPFS, "delete", mnt, name)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {f"{k}_MBps": size / 1e6 / t for k, t in med.items()} | {
        "ratio": med["raw"] / med["backupfs"], "vs_memfs": med["memfs"] / med["backupfs"],
        "rounds_s": times}


def bench_nightly(mnt: Path, store: Path, work: Path, tree: Path, paths, rng) -> dict:
    res: dict[str, dict] = {"backupfs": {}}
    packs = lambda: du_bytes(store / "packs")  # noqa: E731
    before = packs()
    res["backupfs"]["full_s"] = timed(lambda: (run("rsync", "-a", f"{tree}/", f"{mnt}/nightly/"),
                                               run(*BACKUPFS, "snapshot", mnt)))
    run(*BACKUPFS, "compact", mnt)  # count what is kept, not dead space
    res["backupfs"]["full_bytes"] = packs() - before
    borg, restic = shutil.which("borg"), shutil.which("restic")
    env = {**os.environ, "BORG_PASSPHRASE": "", "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
           "RESTIC_PASSWORD": "bench"}
    if borg:
        repo = work / "borg"
        run(borg, "init", "--encryption=none", repo, env=env)
        res["borg"] = {"full_s": timed(lambda: run(borg, "create", "--compression", "zstd,3",
                                                   f"{repo}::a", ".", cwd=tree, env=env))}
        res["borg"]["full_bytes"] = du_bytes(repo)
    if restic:
        repo = work / "restic"
        run(restic, "init", "-r", repo, env=env)
        res["restic"] = {"full_s": timed(lambda: run(restic, "-r", repo, "backup", "-q", ".",
                                                     cwd=tree, env=env))}
        res["restic"]["full_bytes"] = du_bytes(repo)
    change_one_percent(paths, rng)
    mid = packs()
    res["backupfs"]["incremental_s"] = timed(lambda: (
        run("rsync", "-a", f"{tree}/", f"{mnt}/nightly/"), run(*BACKUPFS, "snapshot", mnt)))
    res["backupfs"]["incremental_bytes"] = packs() - mid
    if borg:
        repo = work / "borg"
        mid = du_bytes(repo)
        res["borg"]["incremental_s"] = timed(lambda: run(
            borg, "create", "--compression", "zstd,3", f"{repo}::b", ".", cwd=tree, env=env))
        res["borg"]["incremental_bytes"] = du_bytes(repo) - mid
        res["borg"]["total_bytes"] = du_bytes(repo)
    if restic:
        repo = work / "restic"
        mid = du_bytes(repo)
        res["restic"]["incremental_s"] = timed(lambda: run(restic, "-r", repo, "backup", "-q",
                                                           ".", cwd=tree, env=env))
        res["restic"]["incremental_bytes"] = du_bytes(repo) - mid
        res["restic"]["total_bytes"] = du_bytes(repo)
    res["backupfs"]["total_bytes"] = packs() - before
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="sequential file size (default 1G)")
    ap.add_argument("--files", type=int, default=10000, help="small files (default 10000)")
    ap.add_argument("--rounds", type=int, default=3, help="bench_fs rounds (default 3)")
    ap.add_argument("--tree", default="1G", help="nightly/restore tree size (default 1G)")
    ap.add_argument("--tree-files", type=int, default=16000, help="files in that tree")
    ap.add_argument("--snapshot-sizes", default="1000,100000,1000000")
    ap.add_argument("--dir", help="work directory on the disk to measure (default: /tmp/...)")
    ap.add_argument("--json", metavar="PATH", help="write all results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench needs root (it drops the page cache and mounts)")
    rng = random.Random(1)
    work = Path(args.dir or tempfile.mkdtemp(prefix="backupfs-bench-all-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"loadavg_start": os.getloadavg(), "cpus": os.cpu_count()}

    # 1. the filesystem workloads, with their baselines (tools/bench_fs.py)
    fs_json = work / "bench_fs.json"
    subprocess.run([PY, str(HERE / "bench_fs.py"), "--size", args.size, "--files",
                    str(args.files), "--rounds", str(args.rounds), "--json", str(fs_json)], check=True)
    results["filesystem"] = json.loads(fs_json.read_text())

    # 2, 3, 5 on one mount
    raw, store, mnt = work / "raw", work / "store", work / "mnt"
    raw.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    print("building the tree ...", flush=True)
    tree = raw / "tree"
    paths = make_tree(tree, bench_fs.parse_size(args.tree), args.tree_files, rng)
    run(*BACKUPFS, "init", store)
    pid = daemon_pid(run(*BACKUPFS, "mount", store, mnt).stdout)
    try:
        # The nightly run first: on a fresh store, so no block of it is stored already.
        print("nightly backup ...", flush=True)
        results["nightly"] = bench_nightly(mnt, store, work, tree, paths, rng)
        print("restore ...", flush=True)
        results["restore"] = bench_restore(mnt, raw, tree, work)
        results["daemon_peak_rss_MiB"] = peak_rss_mib(pid)
    finally:
        subprocess.run([*BACKUPFS, "umount", str(mnt)], cwd=HERE.parent)

    # 4. snapshots, through the namespace (tools/bench_snapshot.py)
    print("snapshots ...", flush=True)
    results["snapshots"] = [bench_snapshot.measure(int(n), work, 20)
                            for n in args.snapshot_sizes.split(",")]

    # 6. replication (tools/bench_replicate.py), on a tree and mount of its own
    print("replicate ...", flush=True)
    rep_json, rep_dir = work / "bench_replicate.json", work / "replicate"
    subprocess.run([PY, str(HERE / "bench_replicate.py"), "--tree", args.tree, "--tree-files",
                    str(args.tree_files), "--dir", str(rep_dir), "--json", str(rep_json)],
                   check=True)
    results["replicate"] = json.loads(rep_json.read_text())
    results["loadavg_end"] = os.getloadavg()
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


def report(r: dict) -> None:
    fs, ratios = r["filesystem"]["medians"], r["filesystem"]["ratios"]
    print(f"\nload average {r['loadavg_start'][0]:.1f} at start, {r['loadavg_end'][0]:.1f} at end, "
          f"{r['cpus']} CPUs; filesystem figures are medians of "
          f"{len(r['filesystem']['rounds'])} rounds")
    print(f"{'measure':30} {'raw':>9} {'memfs':>9} {'passthru':>9} {'backupfs':>9} "
          f"{'b/raw':>6} {'b/memfs':>7} {'b/pt':>6}")
    for k, ratio in ratios.items():
        a, m, p, b = (fs[t][k] for t in ("raw", "memfs", "passthrough", "backupfs"))
        print(f"{k:30} {a:9.1f} {m:9.1f} {p:9.1f} {b:9.1f} {ratio['vs_raw']:6.2f} "
              f"{ratio['vs_memfs']:7.2f} {ratio['vs_passthrough']:6.2f}")
    rs = r["restore"]
    print(f"{'restore cp -a MB/s':30} {rs['raw_MBps']:9.1f} {rs['memfs_MBps']:9.1f} {'':9} "
          f"{rs['backupfs_MBps']:9.1f} {rs['ratio']:6.2f} {rs['vs_memfs']:7.2f}")
    print(f"\nnightly backup{'':16} {'full s':>8} {'full MB':>8} {'1% s':>8} {'1% MB':>8} {'total MB':>9}")
    for tool, v in r["nightly"].items():
        print(f"{tool:30} {v['full_s']:8.2f} {v['full_bytes'] / 1e6:8.1f} "
              f"{v['incremental_s']:8.2f} {v['incremental_bytes'] / 1e6:8.1f} "
              f"{v['total_bytes'] / 1e6:9.1f}")
    print(f"\n{'snapshot inodes':>16} {'create ms':>10} {'del 1% ms':>10} {'del 10% ms':>11}")
    for s in r["snapshots"]:
        print(f"{s['inodes']:>16,} {s['create_median_ms']:10.3f} {s['delete_1pct_ms']:10.1f} "
              f"{s['delete_10pct_ms']:11.1f}")
    full, inc = r["replicate"]["full"], r["replicate"]["incremental"]
    print(f"\nreplicate: whole {full['replicate_s']:.1f} s ({full['vs_cp_packs']:.2f}x cp -a "
          f"of the packs, {full['vs_rsync']:.2f}x rsync -a of the tree); 1% changed "
          f"{inc['replicate_s']:.2f} s ({inc['vs_rsync']:.2f}x rsync -a)")
    print(f"\ndaemon peak RSS: {r['daemon_peak_rss_MiB']:.0f} MiB")


if __name__ == "__main__":
    main()
