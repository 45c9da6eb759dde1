#!/usr/bin/env python3
"""bench_fs: backupfs against the raw disk, the Python FUSE ceiling (tools/memfs.py) and
a bare FUSE filesystem over the same disk (tools/passthroughfs.py).

Mounts a fresh backupfs store, memfs and passthroughfs (over a directory beside the store)
side by side, then runs the same work on each and on a plain directory of the disk that
holds the store:

  seq write     one file of --size bytes of mixed data (half random, half text-like, so
                zstd halves it; no two blocks equal, so no dedup) in 1 MiB writes + fsync
  seq rewrite   the same bytes again into a second file: what a nightly full copy of an
                unchanged tree costs (backupfs stores nothing new; the others write it all)
  cold read     the same file after `echo 3 > /proc/sys/vm/drop_caches`, 1 MiB reads
  create+write  --files files of 4 KiB in one directory (open, write, close); then a
                6 s pause, so the deferred work of each (journal commit, transaction
                group) is not timed in the measures that follow
  stat          os.lstat of every file, cold (caches dropped first)
  ls -l         `ls -l` of the directory, cold
  read          open, read, close every file, cold
  cp -a in      `cp -a` of the raw disk's copy of those files into the filesystem
  unlink        unlink every file

For the sequential write and the cold read it also reads the busy CPU seconds of the
whole machine (`/proc/stat`), and prints what that work would allow if it kept every
core busy: a target above that ceiling needs less work, not better overlap.

After each round, the sequential write also goes into `memfs --discard-data`, which keeps
no bytes: the cost of FUSE and pyfuse3 alone (memfs itself is no ceiling for big writes:
it pays for the fresh memory it stores them in); and into `memfs --discard-data --seal`,
which first hashes and compresses every block as backupfs does and then keeps nothing:
a write with no index, packs or disk behind that work. And the cold read is also
measured from `memfs --zstd`, which keeps the file compressed in memory as backupfs
stores it and decodes it on every READ: the ceiling of a cold read that must decode.

passthroughfs does each request with a system call or two on the disk: what the FUSE
channel and pyfuse3's loop cost a filesystem that keeps its bytes on the disk as they are,
with nothing of backupfs's own work.

The work runs in --rounds rounds (default 3), each with fresh data and the four targets
in a rotated order, so a burst of noise (a busy neighbour, the host flushing its cache)
falls on one round of one target rather than on one target's only figure. The table gives
medians over the rounds: of each figure, and of the per-round ratios backupfs/raw,
backupfs/memfs and backupfs/passthroughfs (above 1 is better for rates; for times it is
the slowdown), with the range of the memfs ratio beside it. --json writes every round's
figures.
Needs root (drop_caches). Run it on an otherwise quiet machine.

    sudo .venv/bin/python tools/bench_fs.py [--size 1G] [--files 10000] [--rounds 3]
                                            [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
CHUNK = 1 << 20
TARGETS = ("raw", "memfs", "passthrough", "backupfs")
SETTLE_S = 6.0


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().removesuffix("IB").removesuffix("B")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def mixed_data(size: int) -> bytes:
    """Unique, half-compressible bytes: per MiB, 512 KiB random and 512 KiB of random
    letters from a 16-letter alphabet (4 bits of entropy per byte)."""
    table = bytes(b"etaoinshrdlucmfw"[i % 16] for i in range(256))
    out = bytearray()
    while len(out) < size:
        out += os.urandom(CHUNK // 2)
        out += os.urandom(CHUNK // 2).translate(table)
    return bytes(out[:size])


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def is_mounted(path: Path) -> bool:
    path = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def wait_mounted(path: Path, proc: subprocess.Popen | None, what: str) -> None:
    deadline = time.monotonic() + 60
    while not is_mounted(path):
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before mounting")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not mount in 60 s")
        time.sleep(0.05)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def busy_cpu_s() -> float:
    """CPU seconds every core together has been busy since boot: user, system and
    interrupts, not idle, waiting for I/O or stolen by the hypervisor."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def timed_with_cpu(fn) -> tuple[float, float]:
    """Seconds `fn` took, and the busy CPU seconds of the whole machine meanwhile (the
    daemon, the kernel's side of FUSE and of the disk, and the caller)."""
    cpu = busy_cpu_s()
    wall = timed(fn)
    return wall, busy_cpu_s() - cpu


def seq_write(path: Path, data: bytes) -> tuple[float, float]:
    """Write `data` to a new file in 1 MiB writes, then fsync: MB/s, and the busy CPU
    seconds of the machine meanwhile."""
    def write():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            mv = memoryview(data)
            for off in range(0, len(data), CHUNK):
                os.write(fd, mv[off:off + CHUNK])
            os.fsync(fd)
        finally:
            os.close(fd)

    wall, cpu = timed_with_cpu(write)
    return len(data) / 1e6 / wall, cpu


def cold_read(path: Path, size: int) -> tuple[float, float]:
    """Drop the page cache, then read the file of `size` bytes in 1 MiB reads: MB/s,
    and the busy CPU seconds of the machine meanwhile."""
    drop_caches()

    def read_big():
        fd = os.open(path, os.O_RDONLY)
        try:
            n = 0
            while True:
                b = os.read(fd, CHUNK)
                if not b:
                    break
                n += len(b)
            assert n == size, (n, size)
        finally:
            os.close(fd)

    wall, cpu = timed_with_cpu(read_big)
    return size / 1e6 / wall, cpu


def bench_target(root: Path, data: bytes, nfiles: int, source_small: Path) -> dict:
    res: dict[str, float] = {}
    size = len(data)
    big = root / "big"
    res["seq_write_MBps"], res["seq_write_cpu_s"] = seq_write(big, data)
    res["seq_rewrite_MBps"] = seq_write(root / "big2", data)[0]
    os.unlink(root / "big2")
    res["cold_read_MBps"], res["cold_read_cpu_s"] = cold_read(big, size)
    os.unlink(big)

    small = root / "small"
    small.mkdir()
    payload = os.urandom(4096)
    names = [f"file-{i:05d}" for i in range(nfiles)]

    def create_write():
        dfd = os.open(small, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in names:
                fd = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644, dir_fd=dfd)
                os.write(fd, payload)
                os.close(fd)
        finally:
            os.close(dfd)

    res["create_write_files_per_s"] = nfiles / timed(create_write)
    # Let deferred work finish before the next measure, on every target alike: ext4
    # commits its journal every 5 s, backupfs seals small files in its transaction group
    # every 5 s (`sync` does not reach a FUSE daemon), and neither belongs in `stat`/`ls`.
    time.sleep(SETTLE_S)
    drop_caches()

    def stat_all():
        for name in names:
            os.lstat(small / name)

    res["stat_files_per_s"] = nfiles / timed(stat_all)
    drop_caches()
    res["ls_l_s"] = timed(lambda: subprocess.run(["ls", "-l", str(small)], check=True,
                                                  stdout=subprocess.DEVNULL))
    drop_caches()

    def read_all():
        for name in names:
            with open(small / name, "rb") as f:
                assert len(f.read()) == 4096

    res["read_files_per_s"] = nfiles / timed(read_all)
    res["cp_a_in_files_per_s"] = nfiles / timed(lambda: subprocess.run(
        ["cp", "-a", str(source_small), str(root / "copy")], check=True))
    res["unlink_files_per_s"] = nfiles / timed(lambda: [os.unlink(small / n) for n in names])
    small.rmdir()
    shutil.rmtree(root / "copy")
    return res


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def median_table(rounds: list[dict[str, dict]]) -> tuple[dict, dict]:
    """Medians over the rounds: {target: {measure: value}} and {measure: {ratio: value}},
    each ratio the median of the per-round ratios (not the ratio of the medians), plus
    the lowest and highest backupfs/memfs ratio of any round."""
    keys = list(rounds[0]["raw"])
    medians = {t: {k: statistics.median(r[t][k] for r in rounds) for k in keys}
               for t in rounds[0]}
    ratios = {}
    for k in keys:
        vs_raw = [_ratio(r["backupfs"][k], r["raw"][k]) for r in rounds]
        vs_mem = [_ratio(r["backupfs"][k], r["memfs"][k]) for r in rounds]
        vs_pt = [_ratio(r["backupfs"][k], r["passthrough"][k]) for r in rounds]
        ratios[k] = {"vs_raw": statistics.median(vs_raw), "vs_memfs": statistics.median(vs_mem),
                     "vs_memfs_min": min(vs_mem), "vs_memfs_max": max(vs_mem),
                     "vs_passthrough": statistics.median(vs_pt)}
    return medians, ratios


def cpu_ceiling_MBps(cpu_s_per_gib: float) -> float:
    """The rate a GiB's worth of work allows if it keeps every core busy."""
    cores = os.cpu_count() or 1
    return 2**30 / 1e6 * cores / cpu_s_per_gib if cpu_s_per_gib > 0 else float("inf")


def print_cpu_ceilings(medians: dict, size: int) -> None:
    """What each target's work would reach if it kept every core busy: the bytes over
    (busy CPU seconds / cores). A rate above a target's ceiling cannot come from
    spreading the same work better, only from doing less of it."""
    cores = os.cpu_count() or 1
    print(f"CPU per GiB (the whole machine's busy seconds) and the ceiling that work "
          f"allows on {cores} cores:")
    for op in ("seq_write", "cold_read"):
        parts = []
        for t in TARGETS:
            cpu = medians[t][f"{op}_cpu_s"]
            per_gib = cpu * 2**30 / size
            parts.append(f"{t} {per_gib:.2f} s ({cpu_ceiling_MBps(per_gib):.0f} MB/s)")
        print(f"  {op:10} " + ", ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description="backupfs vs raw disk vs memfs vs passthroughfs")
    ap.add_argument("--size", default="1G", help="size of the sequential file (default 1G)")
    ap.add_argument("--files", type=int, default=10000, help="small files (default 10000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds to take medians over "
                    "(default 3)")
    ap.add_argument("--dir", default=None, help="work directory on the disk to measure "
                    "(default: a new one under /tmp)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_fs needs root (it drops the page cache)")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    size = parse_size(args.size)
    work = Path(args.dir or tempfile.mkdtemp(prefix="backupfs-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    raw, store, source = work / "raw", work / "store", work / "small-source"
    mnt_b, mnt_m, mnt_s = work / "mnt-backupfs", work / "mnt-memfs", work / "mnt-sink"
    mnt_z, mnt_seal = work / "mnt-zstd", work / "mnt-seal"
    mnt_p, backing = work / "mnt-passthrough", work / "passthrough-source"
    for p in (raw, mnt_b, mnt_m, mnt_s, mnt_z, mnt_seal, mnt_p, backing, source):
        p.mkdir(exist_ok=False)
    # The tree that `cp -a` copies in, on the raw disk.
    for i in range(args.files):
        (source / f"file-{i:05d}").write_bytes(os.urandom(4096))
    memfs = sink = zstd = seal = passthrough = None
    rounds: list[dict[str, dict]] = []
    sink_MBps: list[float] = []  # sequential write into memfs --discard-data
    seal_write: list[tuple[float, float]] = []  # ... and with --seal: MB/s, CPU s
    zstd_read: list[tuple[float, float]] = []  # cold read out of memfs --zstd: MB/s, CPU s
    roots = {"raw": raw, "memfs": mnt_m, "passthrough": mnt_p, "backupfs": mnt_b}
    targets = [(name, roots[name]) for name in TARGETS]
    try:
        subprocess.run([PY, "-m", "backupfs", "init", str(store)], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
        subprocess.run([PY, "-m", "backupfs", "mount", str(store), str(mnt_b)], check=True,
                       cwd=REPO, stdout=subprocess.DEVNULL)
        memfs = subprocess.Popen([PY, str(HERE / "memfs.py"), str(mnt_m)],
                                 stdin=subprocess.DEVNULL)
        sink = subprocess.Popen([PY, str(HERE / "memfs.py"), "--discard-data", str(mnt_s)],
                                stdin=subprocess.DEVNULL)
        zstd = subprocess.Popen([PY, str(HERE / "memfs.py"), "--zstd", str(mnt_z)],
                                stdin=subprocess.DEVNULL)
        seal = subprocess.Popen([PY, str(HERE / "memfs.py"), "--discard-data", "--seal",
                                 str(mnt_seal)], stdin=subprocess.DEVNULL)
        passthrough = subprocess.Popen([PY, str(HERE / "passthroughfs.py"), str(backing),
                                        str(mnt_p)], stdin=subprocess.DEVNULL)
        wait_mounted(mnt_m, memfs, "memfs")
        wait_mounted(mnt_s, sink, "memfs --discard-data")
        wait_mounted(mnt_z, zstd, "memfs --zstd")
        wait_mounted(mnt_seal, seal, "memfs --discard-data --seal")
        wait_mounted(mnt_p, passthrough, "passthroughfs")
        wait_mounted(mnt_b, None, "backupfs")
        for n in range(args.rounds):
            # Fresh bytes every round: backupfs must not dedup against the last round.
            print(f"round {n + 1}: generating {size / 2**20:.0f} MiB of mixed data ...",
                  flush=True)
            data = mixed_data(size)
            results: dict[str, dict] = {}
            turn = n % len(targets)
            for name, root in targets[turn:] + targets[:turn]:
                print(f"round {n + 1}: measuring {name} ...", flush=True)
                results[name] = bench_target(root, data, args.files, source)
            rounds.append(results)
            print(f"round {n + 1}: measuring the FUSE channel alone ...", flush=True)
            sink_MBps.append(seq_write(mnt_s / "big", data)[0])
            os.unlink(mnt_s / "big")
            print(f"round {n + 1}: measuring the write that only seals ...", flush=True)
            seal_write.append(seq_write(mnt_seal / "big", data))
            os.unlink(mnt_seal / "big")
            print(f"round {n + 1}: measuring the cold read that only decodes ...", flush=True)
            seq_write(mnt_z / "big", data)  # compressed as its close returns
            zstd_read.append(cold_read(mnt_z / "big", size))
            os.unlink(mnt_z / "big")
        subprocess.run(["sync"], check=True)
        stored = sum(f.stat().st_size for f in (store / "packs").rglob("*") if f.is_file())
    finally:
        if is_mounted(mnt_b):
            subprocess.run([PY, "-m", "backupfs", "umount", str(mnt_b)], cwd=REPO)
        for proc, mnt in ((memfs, mnt_m), (sink, mnt_s), (zstd, mnt_z), (seal, mnt_seal),
                          (passthrough, mnt_p)):
            if proc is None:
                continue
            subprocess.run(["fusermount3", "-u", str(mnt)])
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    medians, ratios = median_table(rounds)
    print()
    load = os.getloadavg()
    print(f"size {size / 2**20:.0f} MiB, {args.files} small files, {args.rounds} rounds "
          f"(medians), load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on "
          f"{os.cpu_count()} CPUs (other work on the machine depresses every column)")
    head = (f"{'measure':26} {'raw':>9} {'memfs':>9} {'passthru':>9} {'backupfs':>9} "
            f"{'bfs/raw':>8} {'bfs/mem':>8} {'(range)':>12} {'bfs/pt':>7}")
    print(head)
    print("-" * len(head))
    for k, r in ratios.items():
        m = [medians[t][k] for t in TARGETS]
        span = f"{r['vs_memfs_min']:.2f}-{r['vs_memfs_max']:.2f}"
        print(f"{k:26} {m[0]:9.2f} {m[1]:9.2f} {m[2]:9.2f} {m[3]:9.2f} {r['vs_raw']:8.2f} "
              f"{r['vs_memfs']:8.2f} {span:>12} {r['vs_passthrough']:7.2f}")
    channel = statistics.median(sink_MBps)
    print(f"FUSE channel alone (memfs --discard-data), seq write + fsync: {channel:.0f} MB/s, "
          f"{channel / medians['raw']['seq_write_MBps']:.2f}x raw; backupfs writes at "
          f"{medians['backupfs']['seq_write_MBps'] / channel:.2f}x of it")
    seal_MBps = statistics.median(r[0] for r in seal_write)
    seal_cpu = statistics.median(r[1] for r in seal_write) * 2**30 / size
    print(f"write that only hashes and compresses (memfs --discard-data --seal): "
          f"{seal_MBps:.0f} MB/s, {seal_MBps / medians['raw']['seq_write_MBps']:.2f}x raw, "
          f"at {seal_cpu:.2f} busy CPU s per GiB (at most {cpu_ceiling_MBps(seal_cpu):.0f} "
          f"MB/s on {os.cpu_count()} cores); backupfs writes at "
          f"{medians['backupfs']['seq_write_MBps'] / seal_MBps:.2f}x of it")
    zstd_MBps = statistics.median(r[0] for r in zstd_read)
    print(f"cold read that only decodes (memfs --zstd): {zstd_MBps:.0f} MB/s, "
          f"{zstd_MBps / medians['memfs']['cold_read_MBps']:.2f}x memfs, at "
          f"{statistics.median(r[1] for r in zstd_read) * 2**30 / size:.2f} busy CPU s per "
          f"GiB; backupfs reads at {medians['backupfs']['cold_read_MBps'] / zstd_MBps:.2f}x "
          f"of it")
    print_cpu_ceilings(medians, size)
    print(f"backupfs packs on disk after the run: {stored / 1e6:.0f} MB (each round stores "
          f"{size / 1e6:.0f} MB of half-compressible data once, its rewrite dedups)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "files": args.files, "loadavg": load,
                       "cpus": os.cpu_count(), "rounds": rounds, "medians": medians,
                       "ratios": ratios, "sink_seq_write_MBps": sink_MBps,
                       "zstd_cold_read": [{"MBps": r[0], "cpu_s": r[1]} for r in zstd_read],
                       "seal_seq_write": [{"MBps": r[0], "cpu_s": r[1]} for r in seal_write],
                       "store_packs_MB_after_run": stored / 1e6},
                      f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
