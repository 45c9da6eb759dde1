#!/usr/bin/env python3
"""Block store throughput against the raw disk, measured in the same run.

    .venv/bin/python tools/bench_store.py [--size 1G] [--dir DIR] [--json out.json]

Data: SIZE of distinct blocks (the store's block size), half random bytes, half text
(windows of the Python standard library's source, each block made unique by a counter
line). It is generated in memory first, so no timing includes making it.

  raw write     the same bytes written sequentially to one file in DIR, then fsync
  store put     `put_many` in batches + a commit every --commit-every bytes + a final commit
                (hash, dedup lookup, zstd, pack append, fsync, LMDB commit)
  raw read      that file read back sequentially, cold (its pages dropped with fadvise)
  store get     every block read back verified (read, decompress, re-hash), cold: with
                `get_async` from --readers trio tasks (a worker thread hop per block), with
                plain `get` in one thread, and with `get_many` in batches of --batch blocks
                (one hop per share, both cores)

Prints a table (MB/s and the ratio to the raw figure) and writes it as JSON on request.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backupfs.store import Store  # noqa: E402

MB = 1_000_000  # throughput in decimal MB/s, as disks and the design's table quote it


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M or 1G)")
    return int(float(m.group(1)) * 1024 ** " kmg".index(m.group(2).lower() or " "))


def text_corpus(limit: int = 16 * 1024 * 1024) -> bytes:
    """Source code and text from the standard library: real-world compressible bytes."""
    parts, total = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"),
                                 recursive=True)):
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        parts.append(data)
        total += len(data)
        if total >= limit:
            break
    corpus = b"".join(parts)
    if len(corpus) < 1024 * 1024:  # no stdlib sources installed: synthesize prose
        rng = random.Random(0)
        words = [bytes(rng.choices(b"etaoinshrdlucmfwyp", k=rng.randint(2, 9)))
                 for _ in range(2000)]
        corpus = b" ".join(rng.choices(words, k=1_500_000))
    return corpus


def make_blocks(size: int, block_size: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    corpus = text_corpus()
    span = len(corpus) - block_size
    blocks = []
    for i in range(max(1, size // block_size)):
        if i % 2 == 0:
            blocks.append(rng.randbytes(block_size))
        else:
            head = f"# block {i}\n".encode()
            start = rng.randrange(span)
            blocks.append(head + corpus[start:start + block_size - len(head)])
    return blocks


def drop_cache(paths) -> None:
    """Evict these files' (clean, synced) pages, so that reads come from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def settle(seconds: float = 15.0) -> None:
    """Start each write test on a quiet disk: the one before may still be flushing (this
    VM's disk absorbs a burst in a host cache, then runs slower for some 15 s while it
    drains: a put right after the raw write measured 240 MB/s, 350 after a pause)."""
    os.sync()
    time.sleep(seconds)


def raw_write(path: Path, blocks: list[bytes]) -> float:
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for b in blocks:
            f.write(b)
        os.fsync(f.fileno())
    return time.perf_counter() - t


def raw_read(path: Path, block_size: int) -> tuple[float, int]:
    buf = bytearray(block_size)
    n = 0
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while (got := f.readinto(buf)) > 0:
            n += got
    return time.perf_counter() - t, n


async def store_put(store: Store, blocks: list[bytes], batch: int, commit_every: int,
                    block_size: int) -> tuple[float, list[bytes]]:
    hashes: list[bytes] = []
    since_commit = 0
    t = time.perf_counter()
    for i in range(0, len(blocks), batch):
        hashes += await store.blocks.put_many(blocks[i:i + batch])
        since_commit += batch * block_size
        if since_commit >= commit_every:
            store.commit()
            since_commit = 0
    store.commit()
    return time.perf_counter() - t, hashes


async def store_get_parallel(store: Store, hashes: list[bytes], readers: int) -> tuple[float, int]:
    total = 0

    async def reader(share: list[bytes]) -> None:
        nonlocal total
        for h in share:
            data = await store.blocks.get_async(h)
            total += len(data)  # not `total += len(await ...)`: total is read before the await

    t = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for r in range(readers):
            nursery.start_soon(reader, hashes[r::readers])
    return time.perf_counter() - t, total


async def store_get_batched(store: Store, hashes: list[bytes], batch: int) -> tuple[float, int]:
    total = 0
    t = time.perf_counter()
    for i in range(0, len(hashes), batch):
        total += sum(map(len, await store.blocks.get_many(hashes[i:i + batch])))
    return time.perf_counter() - t, total


def store_get_serial(store: Store, hashes: list[bytes]) -> tuple[float, int]:
    t = time.perf_counter()
    total = sum(len(store.blocks.get(h)) for h in hashes)
    return time.perf_counter() - t, total


def pack_paths(store_dir: Path) -> list[Path]:
    return sorted((store_dir / "packs").glob("*/*.pack"))


async def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    try:
        store_dir, raw_path = workdir / "store", workdir / "raw.bin"
        Store.init(store_dir, compression=args.compression)
        store = Store.open(store_dir)
        block_size = store.config.block_size
        print(f"generating {args.size / 2**20:.0f} MiB of mixed data in {block_size // 1024} KiB "
              f"blocks (half random, half text) ...", file=sys.stderr)
        blocks = make_blocks(args.size, block_size)
        nbytes = sum(map(len, blocks))
        try:
            settle()
            print("raw write ...", file=sys.stderr)
            t_raw_write = raw_write(raw_path, blocks)
            # Its pages back to the free list: on this VM, page cache on memory the host
            # has not backed yet costs about as much as the disk (a put after the raw write
            # measured 212 MB/s with the raw file cached, 369 with it dropped).
            drop_cache([raw_path])
            settle()
            print("store put ...", file=sys.stderr)
            t_put, hashes = await store_put(store, blocks, args.batch, args.commit_every,
                                            block_size)
            assert len(set(hashes)) == len(blocks), "benchmark blocks must be distinct"
            stored = sum(p.stat().st_size for p in pack_paths(store_dir))
            del blocks
            drop_cache([raw_path])
            print("raw read ...", file=sys.stderr)
            t_raw_read, n = raw_read(raw_path, block_size)
            assert n == nbytes
            drop_cache(pack_paths(store_dir))
            print("store get ...", file=sys.stderr)
            t_get, n = await store_get_parallel(store, hashes, args.readers)
            assert n == nbytes
            drop_cache(pack_paths(store_dir))
            t_get1, n = store_get_serial(store, hashes)
            assert n == nbytes
            drop_cache(pack_paths(store_dir))
            t_getm, n = await store_get_batched(store, hashes, args.batch)
            assert n == nbytes
        finally:
            store.close()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    def mbs(seconds: float) -> float:
        return nbytes / seconds / MB

    raw_w, raw_r = mbs(t_raw_write), mbs(t_raw_read)
    rows = [
        ("raw write + fsync", mbs(t_raw_write), raw_w),
        ("store put_many + commit", mbs(t_put), raw_w),
        ("raw read (cold)", raw_r, raw_r),
        (f"store get_async x{args.readers} (verified, cold)", mbs(t_get), raw_r),
        ("store get, 1 thread (verified, cold)", mbs(t_get1), raw_r),
        (f"store get_many x{args.batch} (verified, cold)", mbs(t_getm), raw_r),
    ]
    return {
        "bytes": nbytes,
        "block_size": block_size,
        "compression": args.compression,
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work sharing the CPUs
        "dir": str(Path(args.dir).resolve()),
        "stored_bytes": stored,
        "stored_over_raw": stored / nbytes,
        "results": [{"what": w, "mb_per_s": round(v, 1), "ratio_to_raw": round(v / base, 3)}
                    for w, v, base in rows],
    }


def print_table(report: dict) -> None:
    print(f"{report['bytes'] / 2**20:.0f} MiB, {report['block_size'] // 1024} KiB blocks, "
          f"{report['compression']}, {report['cpus']} CPUs (load {report['load_average_1min']}), "
          f"in {report['dir']}")
    width = max(len(r["what"]) for r in report["results"])
    print(f"{'':<{width}}  {'MB/s':>8}  {'vs raw':>7}")
    for r in report["results"]:
        print(f"{r['what']:<{width}}  {r['mb_per_s']:>8.1f}  {r['ratio_to_raw']:>7.2f}")
    print(f"stored/raw size: {report['stored_over_raw']:.3f} "
          f"({report['stored_bytes'] / 2**20:.0f} MiB of packs)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_bytes, default=parse_bytes("1G"),
                    help="bytes of data (default 1G)")
    ap.add_argument("--dir", default=tempfile.gettempdir(),
                    help="where the store and the raw file go (same filesystem for both; "
                         "default %(default)s)")
    ap.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    ap.add_argument("--compression", default="zstd:3", help="store compression (default zstd:3)")
    ap.add_argument("--batch", type=int, default=64, help="blocks per put_many call (default 64)")
    ap.add_argument("--commit-every", type=parse_bytes, default=parse_bytes("256M"),
                    help="bytes put between commits (default 256M)")
    ap.add_argument("--readers", type=int, default=4,
                    help="concurrent get_async tasks (default 4)")
    ap.add_argument("--keep", action="store_true", help="keep the store and raw file")
    args = ap.parse_args(argv)
    report = trio.run(run, args)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
