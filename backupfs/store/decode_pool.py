"""Decoder processes (decoder.py), seen from the daemon's event loop.

Each process owns one slot of a shared memory region and takes one request at a time: a
READ's blocks, decoded end to end into its slot. The loop sends the request, waits for
the answer without blocking, and replies to the kernel straight from the slot.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import trio

from ..errors import BackupfsError
from .decoder import MAX_RECORDS, OK, RECORD, REPLY, REQUEST

log = logging.getLogger(__name__)

_PACKAGE_PARENT = Path(__file__).resolve().parents[2]
READ_MAX = 1 << 20  # the most one FUSE READ asks for (256 pages)
DEFAULT_DECODERS_MAX = 4  # ~16 MB each; a sequential read keeps two busy
RESTART_AFTER = 60.0  # seconds (DecodePool.restart_after)


def decoder_count(config: dict) -> int:
    """`[read] decoders` of config.toml: how many decoder processes a mount starts, by
    default one per core up to DEFAULT_DECODERS_MAX; 0 reads every block in the
    daemon's own process."""
    table = config.get("read", {})
    if not isinstance(table, dict):
        raise BackupfsError("config.toml [read]: must be a table")
    n = table.get("decoders", min(os.cpu_count() or 1, DEFAULT_DECODERS_MAX))
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 64:
        raise BackupfsError(f"config.toml [read] decoders: a number from 0 to 64, not {n!r}")
    return n


@dataclass
class _Decoder:
    proc: subprocess.Popen
    sock: socket.socket
    index: int  # which slot of the shared memory is its
    slot: memoryview
    started: float
    requests: int = 0


class DecodePool:
    def __init__(self, pack_root: Path, processes: int, block_size: int):
        # A READ that starts inside a block spans one block more than its size.
        self.slot_size = slot_size = READ_MAX + block_size
        self.pack_root = Path(pack_root).resolve()
        self._idle: list[_Decoder] = []
        self._all: list[_Decoder] = []
        self._due: dict[int, float] = {}  # slot -> when a decoder for it may start again
        self._shm: mmap.mmap | None = None
        self._shm_fd = -1
        self.served = 0  # requests answered with every block in place
        # A decoder that ends is replaced at once if it had run this long, else only
        # this long after it started: one that fails as it starts (its code replaced
        # under a running daemon, say) is not restarted in a loop.
        self.restart_after = RESTART_AFTER
        self._clock = time.monotonic
        size = slot_size * processes
        try:
            self._shm_fd = os.memfd_create("backupfs-decode", os.MFD_CLOEXEC)
            os.ftruncate(self._shm_fd, size)
            self._shm = mmap.mmap(self._shm_fd, size)
            for i in range(processes):
                self._start(i)
        except BaseException:
            self.close()
            raise

    def _start(self, index: int) -> None:
        start = index * self.slot_size
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            try:
                # Run from the directory this package was imported from (`-m` looks in
                # the working directory first): the processes run the daemon's own code.
                proc = subprocess.Popen(
                    [sys.executable, "-m", "backupfs.store.decoder", str(theirs.fileno()),
                     str(self._shm_fd), str(start), str(self.slot_size), str(self.pack_root)],
                    pass_fds=(theirs.fileno(), self._shm_fd), stdin=subprocess.DEVNULL,
                    cwd=_PACKAGE_PARENT)
            except BaseException:
                ours.close()
                raise
        ours.setblocking(False)
        slot = memoryview(self._shm)[start:start + self.slot_size]
        d = _Decoder(proc, ours, index, slot, self._clock())
        self._idle.append(d)
        self._all.append(d)

    def ready(self) -> bool:
        """Whether a decoder is idle; first restarts those due to be replaced."""
        if self._due:
            now = self._clock()
            for index, when in list(self._due.items()):
                if when <= now:
                    del self._due[index]
                    try:
                        self._start(index)
                    except OSError as e:
                        self._due[index] = now + self.restart_after
                        log.warning("cannot restart a decoder process (%s)", e)
        return bool(self._idle)

    @property
    def alive(self) -> int:
        """Decoders not known to have ended."""
        return sum(1 for d in self._all if d.proc.returncode is None)

    async def decode_run(self, records: Sequence[tuple[int, int, int, int, bytes]]
                         ) -> memoryview | None:
        """The plaintexts of (pack, offset, record length, raw length, hash) records end
        to end, read and verified by an idle decoder process; None if none is idle, the
        blocks do not fit a slot or the decoder reports any failure.

        The view is the decoder's slot, which it gets again as this returns: it stays as
        it is until the calling task next waits (a trio checkpoint), since only another
        task can send that decoder a request. pyfuse3 replies to a READ before then."""
        if (not self._idle or len(records) > MAX_RECORDS
                or sum(r[3] for r in records) > self.slot_size):
            return None
        d = self._idle.pop()
        d.requests = (d.requests + 1) & 0xFFFFFFFF
        parts = [REQUEST.pack(d.requests, len(records))]
        out = 0
        for pack_id, offset, record_len, raw_len, h in records:
            parts.append(RECORD.pack(pack_id, offset, record_len, raw_len, out, h))
            out += raw_len
        reply = await self._ask(d, b"".join(parts))
        if reply is None:
            self._lost(d)
            return None
        self._idle.append(d)
        req_id, status = REPLY.unpack(reply)
        if status != OK or req_id != d.requests:
            return None
        self.served += 1
        return d.slot[:out]

    async def _ask(self, d: _Decoder, request: bytes) -> bytes | None:
        """Send a request and wait for its answer; None if the process is gone."""
        try:
            d.sock.send(request)
        except OSError:
            return None
        # Shielded: until it answers, the process may still write into the slot.
        with trio.CancelScope(shield=True):
            while True:
                await trio.lowlevel.wait_readable(d.sock)
                try:
                    reply = d.sock.recv(REPLY.size)
                except BlockingIOError:
                    continue
                except OSError:
                    return None
                return reply if len(reply) == REPLY.size else None

    def _lost(self, d: _Decoder) -> None:
        """Drop a decoder whose socket failed, the process ended if it has not, and
        have another take its slot (see restart_after)."""
        d.sock.close()
        try:
            # Its socket ended because it is ending, as a rule: a moment to be reaped.
            what = f"ended (status {d.proc.wait(timeout=1)})"
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()
            what = "stopped answering and was killed"
        self._all.remove(d)
        d.slot.release()  # its views (answers already sent) are separate exports
        now = self._clock()
        self._due[d.index] = due = max(now, d.started + self.restart_after)
        when = "at the next read" if due <= now else f"at the first read {due - now:.0f} s from now"
        log.warning("decoder process %d %s; %d left, another starts %s (the daemon reads "
                    "blocks itself when no decoder is free)", d.proc.pid, what, self.alive, when)

    def close(self) -> None:
        """Stop every process (closing its socket ends it) and wait for it."""
        for d in self._all:
            d.sock.close()
        for d in self._all:
            try:
                d.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait()
        self._idle = []
        self._due = {}
        for d in self._all:
            d.slot.release()
        if self._shm_fd >= 0:
            os.close(self._shm_fd)
            self._shm_fd = -1
        if self._shm is not None:
            try:
                self._shm.close()
            except BufferError:
                pass  # a view of a slot is still held somewhere: freed with it
