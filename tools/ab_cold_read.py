#!/usr/bin/env python3
"""Cold-read A/B of backupfs versions (and memfs), interleaved finely enough to trust.

    tools/ab_cold_read.py [--rounds 24] [--segment 128M] [--size 1G] [--dir DIR]
                          VERSION [VERSION ...]

A VERSION is a source tree of backupfs (a checkout or `git worktree`), optionally with
`@ENV` appended, which sets the daemon's BFS_EXP variable for experiment switches; the
word `memfs` is this tree's tools/memfs.py, `memfs-zstd` the same with `--zstd` (its
file kept compressed as backupfs stores it, decoded on every READ), and
`memfs-zstd-threads` that with `--decode-threads 2`. Each version gets
its own copy of a store holding 1 GiB of bench_fs's data, written by its own tree's
code (so versions of different store formats compare), and every version is mounted at
once. Then each round drops the page cache and reads the same cold segment from each
mount, in a shuffled order; the next round takes the next segment. It prints each version's median MB/s, the
CPU its processes (daemon and decoders) and the whole machine spent per GiB, and how
often each version beat the first.

Why not one whole read per mount, version after version: this machine's speed drifts
by a third within minutes, so neighbouring whole reads differ by more than most
changes do (docs/performance.md, "A steady ceiling, and the cold read against it").
Each daemon runs from /tmp with PYTHONPATH set to its tree: `python -m` puts the working
directory first on sys.path, so run from a checkout it would run that checkout's code.

Needs root (drop_caches); leaves nothing mounted.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_fs import (busy_cpu_s, drop_caches, mixed_data, parse_size,  # noqa: E402
                      seq_write, wait_mounted)

PY = sys.executable
MEMFS_FLAGS = {"memfs": [], "memfs-zstd": ["--zstd"],
               "memfs-zstd-threads": ["--zstd", "--decode-threads", "2"]}


class Version:
    def __init__(self, spec: str, work: Path, index: int):
        self.spec = spec
        tree, _, exp = spec.partition("@")
        self.tree = tree
        self.memfs = tree in MEMFS_FLAGS
        self.env = dict(os.environ, BFS_EXP=exp)
        if not self.memfs:
            self.env["PYTHONPATH"] = str(Path(tree).resolve())
        self.store = work / f"store-{index}"
        self.mnt = work / f"mnt-{index}"
        self.proc: subprocess.Popen | None = None
        self.mbps: list[float] = []
        self.cpu: list[float] = []
        self.busy: list[float] = []

    def run(self, *args: str) -> None:
        subprocess.run([PY, "-m", "backupfs", *args], check=True, capture_output=True,
                       env=self.env, cwd="/tmp")

    def mount(self, template: Path | None, data: bytes) -> None:
        """Mount a copy of `template` (a store), or memfs holding `data`."""
        self.mnt.mkdir(parents=True, exist_ok=True)
        if self.memfs:
            self.proc = subprocess.Popen(
                [PY, str(HERE / "memfs.py"), *MEMFS_FLAGS[self.tree], str(self.mnt)])
            wait_mounted(self.mnt, self.proc, "memfs")
            seq_write(self.mnt / "big", data)
            return
        shutil.copytree(template, self.store)
        self.run("mount", str(self.store), str(self.mnt))

    def unmount(self) -> None:
        if self.memfs:
            subprocess.run(["fusermount3", "-u", str(self.mnt)])
            if self.proc:
                self.proc.wait()
        else:
            subprocess.run([PY, "-m", "backupfs", "umount", str(self.mnt)],
                           capture_output=True, env=self.env, cwd="/tmp")

    def pids(self) -> list[int]:
        if self.memfs:
            return [self.proc.pid] if self.proc else []
        mine = str(self.store).encode()
        found = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    args = (p / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                # The daemon names the store, its decoders the store's packs directory.
                if any(a == mine or a.startswith(mine + b"/") for a in args):
                    found.append(int(p.name))
        return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def read_segment(v: Version, offset: int, size: int) -> None:
    pids = v.pids()
    cpu, busy = cpu_seconds(pids), busy_cpu_s()
    t = time.perf_counter()
    n = 0
    with open(v.mnt / "big", "rb", buffering=0) as f:
        f.seek(offset)
        while n < size and (chunk := f.read(1 << 20)):
            n += len(chunk)
    wall = time.perf_counter() - t
    v.mbps.append(n / 1e6 / wall)
    v.cpu.append((cpu_seconds(pids) - cpu) * (1 << 30) / n)
    v.busy.append((busy_cpu_s() - busy) * (1 << 30) / n)


def make_template(work: Path, data: bytes, tree: str, index: int) -> Path:
    """A store holding the data as `big`, written through a mount of `tree`'s code."""
    store, mnt = work / f"template-{index}", work / f"mnt-template-{index}"
    mnt.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
    bfs = [PY, "-m", "backupfs"]
    subprocess.run([*bfs, "init", str(store)], check=True, capture_output=True, env=env, cwd="/tmp")
    subprocess.run([*bfs, "mount", str(store), str(mnt)], check=True, capture_output=True,
                   env=env, cwd="/tmp")
    try:
        seq_write(mnt / "big", data)
    finally:
        subprocess.run([*bfs, "umount", str(mnt)], check=True, capture_output=True, env=env,
                       cwd="/tmp")
    return store


def report(versions: list[Version]) -> None:
    med = statistics.median
    for v in versions:
        print(f"{v.spec:36} {med(v.mbps):6.0f} MB/s ({min(v.mbps):.0f}-{max(v.mbps):.0f})  "
              f"its CPU {med(v.cpu):.2f} s/GiB  machine busy {med(v.busy):.2f} s/GiB")
    first = versions[0]
    for v in versions[1:]:
        wins = sum(a > b for a, b in zip(v.mbps, first.mbps))
        ratio = med(a / b for a, b in zip(v.mbps, first.mbps))
        print(f"{v.spec} / {first.spec}: median ratio {ratio:.3f}, "
              f"faster in {wins} of {len(first.mbps)} segments")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("versions", nargs="+", metavar="VERSION",
                    help="a backupfs source tree, TREE@EXPERIMENT, or one of: "
                         + ", ".join(MEMFS_FLAGS))
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--segment", type=parse_size, default=128 << 20)
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="the file read (default 1G)")
    ap.add_argument("--dir", type=Path, help="work directory (default: a new one in /var/tmp)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("ab_cold_read: needs root (it drops the page cache)")
    if args.segment <= 0 or args.segment > args.size:
        raise SystemExit("ab_cold_read: --segment must be between 1 byte and --size")
    work = Path(args.dir or Path("/var/tmp") / f"ab-cold-read-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=False)
    data = mixed_data(args.size)
    versions = [Version(spec, work, i) for i, spec in enumerate(args.versions)]
    try:
        templates: dict[str, Path] = {}
        for v in versions:
            if not v.memfs and v.tree not in templates:
                templates[v.tree] = make_template(work, data, v.tree, len(templates))
            v.mount(templates.get(v.tree), data)
        del data
        segments = args.size // args.segment
        for r in range(args.rounds):
            offset = (r % segments) * args.segment
            for v in random.sample(versions, len(versions)):
                drop_caches()
                read_segment(v, offset, args.segment)
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, end="\r", flush=True)
        print(file=sys.stderr)
        report(versions)
    finally:
        for v in versions:
            v.unmount()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
