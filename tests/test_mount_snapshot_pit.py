"""Point in time under load: writer processes append sequence-numbered records while
`backupfs snapshot` runs again and again. Every snapshot must hold, for every writer, a
gap-free prefix of its sequence that includes every record whose write() had returned
before the snapshot command started."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import time

import pytest

from mounting import BACKUPFS

pytestmark = [pytest.mark.mount, pytest.mark.timeout(240)]

WRITERS = 4
SNAPSHOTS = 20
RECORD = 64


def record(writer: int, seq: int) -> bytes:
    head = f"w{writer} seq {seq:012d} ".encode()
    # Varying filler so blocks neither dedup nor compress away to nothing.
    filler = (f"{(seq * 2654435761 + writer) & 0xffffffff:08x}" * 8).encode()
    return (head + filler)[:RECORD - 1] + b"\n"


def writer_main(path: str, writer: int, done, stop, pause: float) -> None:
    """Append records one write() at a time; publish each seq once write() returned."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    seq = 0
    try:
        while not stop.is_set():
            n = os.write(fd, record(writer, seq))
            assert n == RECORD
            done[writer] = seq     # completed: published only after write() returned
            seq += 1
            if seq % 64 == 0:
                time.sleep(pause)  # keep the volume (and the checking) bounded
    finally:
        os.close(fd)


def check_prefix(data: bytes, writer: int) -> int:
    """The number of records in `data`, which must be exactly records 0..n-1."""
    assert len(data) % RECORD == 0, f"writer {writer}: torn record ({len(data)} bytes)"
    n = len(data) // RECORD
    for seq in range(n):
        got = data[seq * RECORD:(seq + 1) * RECORD]
        if got != record(writer, seq):
            start = seq * RECORD
            zeros = len(data[start:]) - len(data[start:].lstrip(b"\0"))
            raise AssertionError(
                f"writer {writer}: record {seq} of {n} (byte {start}) is {got[:40]!r}; "
                f"{zeros} zero bytes from there, then {data[start + zeros:][:24]!r}")
    return n


def test_snapshots_are_points_in_time(mount_factory):
    m = mount_factory().start()
    ctx = multiprocessing.get_context("fork")
    done = ctx.Array("q", [-1] * WRITERS, lock=False)
    stop = ctx.Event()
    paths = [str(m.path / f"writer{w}.log") for w in range(WRITERS)]
    procs = [ctx.Process(target=writer_main, args=(paths[w], w, done, stop, 0.002))
             for w in range(WRITERS)]
    taken: list[tuple[str, list[int]]] = []
    try:
        for p in procs:
            p.start()
        while min(done) < 100:
            time.sleep(0.01)
        for i in range(SNAPSHOTS):
            before = list(done)  # read just before the command starts
            r = subprocess.run([*BACKUPFS, "snapshot", m.path], capture_output=True, text=True,
                               timeout=60)
            assert r.returncode == 0, r.stderr
            taken.append((r.stdout.strip(), before))
            time.sleep(0.05 * (i % 3))
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    names = [n for n, _ in taken]
    assert len(set(names)) == SNAPSHOTS, names
    assert sorted(os.listdir(m.path / "snapshots")) == sorted(names + ["latest"])
    previous = [0] * WRITERS
    for name, before in taken:
        for w in range(WRITERS):
            data = (m.path / "snapshots" / name / f"writer{w}.log").read_bytes()
            n = check_prefix(data, w)
            assert n >= before[w] + 1, (f"{name}: writer {w} had finished record {before[w]} "
                                        f"before the snapshot, which holds only {n}")
            assert n >= previous[w], f"{name}: writer {w} went back from {previous[w]} to {n}"
            previous[w] = n
    # And the live files hold everything, in order.
    for w in range(WRITERS):
        n = check_prefix((m.path / f"writer{w}.log").read_bytes(), w)
        assert n == done[w] + 1
        assert n > previous[w], "the writers stopped before the last snapshot"
    m.stop()
