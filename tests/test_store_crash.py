"""Crash safety: a writer process killed with SIGKILL at random moments, 30 times.

The writer (this file run as a script) loops: put a few blocks, commit, and only then
append "put N" for each block to a side file and fsync it. Now and then it releases the
blocks of an earlier round ("drop N" is written and fsynced *before* the decref, so a
kill between the two never makes the check demand a block the store let go of) and
compacts. Block bytes derive from their counter, so the checker can rebuild them.

After each kill the store must open without help; every block whose commit returned
reads back verified with the right bytes; every block the index knows reads back
verified (nothing points at missing or torn bytes); no pack file holds bytes past its
committed length, and no pack file is unknown to the index.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from backupfs.store import Store, block_hash

CYCLES = 30
ROTATE = 512 * 1024  # small packs: rotation, new pack files and compaction happen often
ROUND = 4  # blocks per commit
KiB = 1024


def block_data(n: int) -> bytes:
    """The bytes of block number n: random, compressible or both, 1 B .. 96 KiB."""
    rng = random.Random(n)
    size = rng.choice([1, 100, 4 * KiB, 32 * KiB, 96 * KiB])
    kind = n % 3
    if kind == 0:
        return rng.randbytes(size)
    text = (f"block {n} " * (size // 6 + 1)).encode()[:size]
    if kind == 1:
        return text
    return rng.randbytes(size // 2) + text[: size - size // 2]


def writer(store: str, side_file: str, first: int) -> None:
    rng = random.Random(first)
    s = Store.open(store, rotate_size=ROTATE)
    side = os.open(side_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def note(lines: list[str]) -> None:
        os.write(side, "".join(f"{ln}\n" for ln in lines).encode())
        os.fsync(side)

    print("ready", flush=True)
    live_rounds: list[list[int]] = []
    n = first
    while True:
        numbers = list(range(n, n + ROUND))
        n += ROUND
        for i in numbers:
            s.blocks.put(block_data(i))
        s.commit()
        note([f"put {i}" for i in numbers])
        live_rounds.append(numbers)
        if len(live_rounds) > 3 and rng.random() < 0.4:
            gone = live_rounds.pop(rng.randrange(len(live_rounds) - 1))
            note([f"drop {i}" for i in gone])
            for i in gone:
                s.blocks.decref(block_hash(block_data(i)))
            if rng.random() < 0.5:
                s.commit()
            else:
                s.blocks.compact(threshold=0.2)  # commits when it rewrites a pack


def read_side_file(path: Path) -> tuple[set[int], set[int]]:
    put, drop = set(), set()
    if path.exists():
        # the last piece is "" or a line cut short by the kill: either way not a record
        for line in path.read_text().split("\n")[:-1]:
            what, _, num = line.partition(" ")
            if num.isdigit():
                (put if what == "put" else drop).add(int(num))
    return put, drop


def check_store(store_dir: Path, must_read: set[int]) -> list[str]:
    """Open the store as is, check it; returns what recovery did on opening."""
    with Store.open(store_dir, rotate_size=ROTATE) as s:
        for i in sorted(must_read):
            h = block_hash(block_data(i))
            assert s.blocks.refcount(h) >= 1, f"block {i} lost its reference"
            assert s.blocks.get(h) == block_data(i), f"block {i} reads back wrong"
        for loc in s.blocks.iter_locations():
            s.blocks.read_verified(loc)  # raises CorruptBlock on torn or missing bytes
        committed = s.committed_pack_lengths()
        on_disk = {int(p.stem): p for p in (store_dir / "packs").glob("*/*.pack")}
        assert set(on_disk) <= set(committed), "a pack file the index does not know"
        for pack_id, path in on_disk.items():
            assert path.stat().st_size == committed[pack_id], f"pack {pack_id} has a tail"
        return s.recovery_actions


@pytest.mark.timeout(120)
def test_sigkill_at_random_moments(tmp_path):
    store_dir = tmp_path / "store"
    side_file = tmp_path / "committed.txt"
    Store.init(store_dir)
    rng = random.Random(os.environ.get("CRASH_SEED", 12345))
    recoveries = 0
    for cycle in range(CYCLES):
        proc = subprocess.Popen(
            [sys.executable, __file__, str(store_dir), str(side_file), str(cycle * 1_000_000)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode()
            try:
                proc.wait(timeout=rng.uniform(0.05, 0.5))  # the random moment of the crash
            except subprocess.TimeoutExpired:
                pass
            assert proc.poll() is None, f"writer died by itself:\n{proc.stderr.read().decode()}"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        put, drop = read_side_file(side_file)
        recoveries += bool(check_store(store_dir, put - drop))
    put, drop = read_side_file(side_file)
    print(f"{len(put)} blocks committed, {len(drop)} released, "
          f"{recoveries} of {CYCLES} opens cut uncommitted bytes")
    assert len(put) > CYCLES * ROUND and drop, "too little work to prove anything"
    assert recoveries, "no kill ever left an uncommitted tail: the test proved little"


if __name__ == "__main__":
    writer(sys.argv[1], sys.argv[2], int(sys.argv[3]))
