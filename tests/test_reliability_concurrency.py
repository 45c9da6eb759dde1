"""Concurrency: 8 processes write, read and rename while snapshots come and go.

Files are replaced atomically (written under a temporary name, then renamed over), and
every file carries the hash of its own bytes: any read of a final name, in the live tree
or in any snapshot, must give a whole, self-consistent file, also when the kernel's page
cache is dropped under it. 60 s in CI;
BACKUPFS_RELIABILITY=full runs 10 minutes.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest

from mounting import backupfs, drop_page_cache

FULL = os.environ.get("BACKUPFS_RELIABILITY") == "full"
DURATION = 600 if FULL else 60
WORKERS = 8

pytestmark = [pytest.mark.mount, pytest.mark.reliability, pytest.mark.timeout(DURATION + 240)]


def make_content(rng: random.Random, label: bytes) -> bytes:
    body = label + b"\n" + rng.randbytes(rng.choice([0, 100, 5000, 131_072, 200_000]))
    return body + hashlib.sha256(body).digest()


def whole(data: bytes) -> bool:
    return len(data) >= 32 and hashlib.sha256(data[:-32]).digest() == data[-32:]


def describe(f, data: bytes) -> str:
    """What a torn read looked like, and whether reading again through the same open
    file (from the kernel's cache or the daemon) gives the same bytes."""
    st = os.fstat(f.fileno())
    again = os.pread(f.fileno(), len(data) + 1, 0)
    zeros = len(data) - len(data.rstrip(b"\0"))
    return (f"{len(data)} bytes (st_size {st.st_size}, ino {st.st_ino}, nlink "
            f"{st.st_nlink}), head {data[:16]!r}, {zeros} trailing zero bytes; read again: "
            f"{'the same' if again == data else 'whole' if whole(again) else 'torn'}")


def worker(root: str, n: int, deadline: float, errors, counts) -> None:
    rng = random.Random(n)
    mine = Path(root) / f"w{n}"
    mine.mkdir(exist_ok=True)
    ops = 0
    try:
        while time.time() < deadline:
            name = mine / f"f{rng.randrange(12)}"
            r = rng.random()
            if r < 0.4:
                tmp = mine / f".tmp{rng.randrange(1000)}"
                tmp.write_bytes(make_content(rng, b"%d %d" % (n, ops)))
                os.rename(tmp, name)
            elif r < 0.55:
                try:
                    os.rename(name, mine / f"f{rng.randrange(12)}")
                except FileNotFoundError:
                    pass
            else:
                # Read a final name of any worker.
                other = Path(root) / f"w{rng.randrange(WORKERS)}" / f"f{rng.randrange(12)}"
                try:
                    with open(other, "rb") as f:
                        data = f.read()
                        if not whole(data):
                            errors.put(f"torn read of {other}: {describe(f, data)}")
                except FileNotFoundError:
                    continue
            ops += 1
    except Exception as e:  # any other error is a failure too
        errors.put(f"worker {n}: {type(e).__name__}: {e}")
    counts.put(ops)


def test_writers_readers_renamers_with_snapshots_coming_and_going(mounted):
    root = mounted.path
    ctx = multiprocessing.get_context("fork")
    errors, counts = ctx.Queue(), ctx.Queue()
    deadline = time.time() + DURATION
    procs = [ctx.Process(target=worker, args=(str(root), n, deadline, errors, counts))
             for n in range(WORKERS)]
    for p in procs:
        p.start()
    rng = random.Random(99)
    taken, snap_reads = [], 0
    while time.time() < deadline:
        taken.append(backupfs("snapshot", root).stdout.strip())
        if len(taken) > 4:
            backupfs("delete", root, taken.pop(rng.randrange(len(taken) - 1)))
        # Snapshot files are whole too.
        snap = root / "snapshots" / rng.choice(taken)
        for f in snap.glob("w*/f*"):
            data = f.read_bytes()
            assert whole(data), f"torn file in snapshot: {f}"
            snap_reads += 1
        # Memory pressure may evict any cached page: reads must then come whole from
        # the daemon too (a file replaced while a reader had found it once read as zeros).
        for _ in range(5):
            drop_page_cache()
            time.sleep(0.1)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []
    total_ops = sum(counts.get() for _ in procs)
    assert total_ops > WORKERS * 50 and snap_reads > 0
    print(f"{total_ops} operations by {WORKERS} processes, {len(taken)} snapshots kept, "
          f"{snap_reads} snapshot files read whole")
