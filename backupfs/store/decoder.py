"""A decoder process: reads, decompresses and verifies pack records for the daemon.

The daemon's event loop is one thread, and the work of a cold read (decompressing and
hashing every block) kept it busy while the machine's other core idled: handing blocks
to worker threads lost more than it gained on this project's VMs, both to the GIL and to
waking a halted core for each hand-off (docs/performance.md). A process has no GIL to
share, and takes a whole READ's blocks per hand-off.

Started by DecodePool as `python -m backupfs.store.decoder SOCK_FD SHM_FD SLOT_START
SLOT_SIZE PACK_ROOT`: it maps only its own slot of the shared memory. The daemon sends
one request per READ over a SOCK_SEQPACKET socket: the records to read and where in the
slot each block's plaintext goes. The process answers once every block is there and its
BLAKE3 hash checked *where it lies in the slot*, so the daemon replies with exactly the
bytes that were verified. Any failure (a corrupt record, a pack compacted away, a disk
error) is answered as such; the daemon then reads those blocks itself, which reports
corruption and follows moved blocks as it always has. Packs are opened per request, so
a pack removed by compaction is never held open here.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import struct
import sys
from pathlib import Path

from ..errors import CorruptBlock
from . import codec
from .layout import pack_path

# Request: id, record count; then per record:
#   pack id, offset, record length, raw length, offset in the slot, hash
REQUEST = struct.Struct(">IH")
RECORD = struct.Struct(">IQIII32s")
# Reply: id, 0 if every block is in place and verified, else 1
REPLY = struct.Struct(">IB")
OK, FAILED = 0, 1
MAX_RECORDS = 257  # a READ of 1 MiB over 4 KiB blocks, starting inside one
MAX_REQUEST = REQUEST.size + MAX_RECORDS * RECORD.size


def decode_request(msg: bytes, slot: memoryview, root: Path) -> int:
    """Decode every record of one request into the slot; OK or FAILED."""
    _, n = REQUEST.unpack_from(msg)
    fds: dict[int, int] = {}
    try:
        for i in range(n):
            pack_id, offset, record_len, raw_len, out, h = RECORD.unpack_from(
                msg, REQUEST.size + i * RECORD.size)
            if out + raw_len > len(slot):
                return FAILED
            fd = fds.get(pack_id)
            if fd is None:
                fd = fds[pack_id] = os.open(pack_path(root, pack_id), os.O_RDONLY | os.O_CLOEXEC)
            record = os.pread(fd, record_len, offset)
            codec.decode_record_into(record, h, slot[out:out + raw_len], pack_id, offset)
    except (OSError, CorruptBlock, ValueError):
        return FAILED
    finally:
        for fd in fds.values():
            os.close(fd)
    return OK


def serve(sock: socket.socket, slot: memoryview, root: Path) -> None:
    while True:
        try:
            msg = sock.recv(MAX_REQUEST)
            if not msg:
                return  # the daemon closed its end: it is stopping
            req_id, _ = REQUEST.unpack_from(msg)
            sock.send(REPLY.pack(req_id, decode_request(msg, slot, root)))
        except (ConnectionResetError, BrokenPipeError):
            return  # the daemon died (killed) with our answer unread


def main(argv: list[str]) -> None:
    # A ^C at a foreground daemon, or systemd stopping its unit, signals every process
    # of it: the daemon decides when to stop, and we stop when it closes the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock_fd, shm_fd, slot_start, slot_size = (int(a) for a in argv[:4])
    sock = socket.socket(fileno=sock_fd)
    slot = mmap.mmap(shm_fd, slot_size, offset=slot_start)
    os.close(shm_fd)
    serve(sock, memoryview(slot), Path(argv[4]))


if __name__ == "__main__":
    main(sys.argv[1:])
